//! A business's intents: what it registers, how it is validated, and the TOML
//! a support lead edits by hand.
//!
//! ```toml
//! name = "acme-support"
//! version = "2026-11"
//! description = "what ACME's agents see"
//!
//! [[intent]]
//! label = "refund"
//! description = "the customer wants money back"
//! examples = ["I want my money back", "quero o reembolso"]
//!
//! # Optional: messages that belong to none of the intents above.
//! out_of_scope = ["what's the weather tomorrow?"]
//! ```

use super::IntentError;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    pub label: String,
    #[serde(default)]
    pub description: String,
    pub examples: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Taxonomy {
    pub name: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub description: String,
    #[serde(rename = "intent")]
    pub intents: Vec<Intent>,
    /// Examples of messages that fit no intent; they teach the head what
    /// "none of these" looks like for this business.
    #[serde(default)]
    pub out_of_scope: Vec<String>,
}

/// What a taxonomy may hold; each bound is a `palaver serve` flag.
#[derive(Debug, Clone)]
pub struct TaxonomyLimits {
    pub max_intents: usize,
    pub max_examples_per_intent: usize,
    pub max_examples: usize,
    pub max_text_chars: usize,
}

impl Default for TaxonomyLimits {
    fn default() -> Self {
        Self { max_intents: 500, max_examples_per_intent: 500, max_examples: 25_000, max_text_chars: 2_000 }
    }
}

const MAX_NAME: usize = 64;
const MAX_LABEL: usize = 100;

fn invalid(field: impl Into<String>, msg: impl Into<String>) -> IntentError {
    IntentError::InvalidArgument { field: field.into(), msg: msg.into() }
}

/// Names become file names in the store: keep them boring.
pub fn validate_name(field: &str, name: &str) -> Result<(), IntentError> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(invalid(field, format!("must be 1 to {MAX_NAME} characters, got {}", name.len())));
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) || name.starts_with('.') {
        return Err(invalid(field, format!("`{name}` may use only ASCII letters, digits, '-', '_' and '.' (not first)")));
    }
    Ok(())
}

impl Taxonomy {
    pub fn from_toml(text: &str) -> Result<Self, IntentError> {
        toml::from_str(text).map_err(|e| invalid("taxonomy", format!("not a valid taxonomy TOML: {e}")))
    }

    pub fn from_file(path: &Path) -> Result<Self, IntentError> {
        let text = std::fs::read_to_string(path).map_err(|e| IntentError::Store(format!("{}: {e}", path.display())))?;
        Self::from_toml(&text).map_err(|e| match e {
            IntentError::InvalidArgument { msg, .. } => invalid(path.display().to_string(), msg),
            other => other,
        })
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a taxonomy always serialises")
    }

    /// Trims whitespace, then checks every rule, naming the offender.
    pub fn normalise_and_validate(mut self, limits: &TaxonomyLimits) -> Result<Self, IntentError> {
        self.name = self.name.trim().to_string();
        validate_name("taxonomy.name", &self.name)?;
        if self.name.starts_with("palaver.") {
            return Err(invalid("taxonomy.name", "names starting with `palaver.` are reserved"));
        }
        if self.version.len() > MAX_NAME {
            return Err(invalid("taxonomy.version", format!("at most {MAX_NAME} characters")));
        }
        if self.intents.is_empty() {
            return Err(invalid("taxonomy.intents", "at least one intent is required"));
        }
        if self.intents.len() > limits.max_intents {
            return Err(invalid(
                "taxonomy.intents",
                format!("{} intents, the limit is {} (--max-taxonomy-intents)", self.intents.len(), limits.max_intents),
            ));
        }
        let mut seen = HashSet::new();
        let mut total = 0usize;
        let check_text = |field: String, t: &str| -> Result<(), IntentError> {
            if t.is_empty() {
                return Err(invalid(field, "is empty"));
            }
            if t.chars().count() > limits.max_text_chars {
                return Err(invalid(field, format!("longer than {} characters", limits.max_text_chars)));
            }
            Ok(())
        };
        for (i, intent) in self.intents.iter_mut().enumerate() {
            intent.label = intent.label.trim().to_string();
            intent.description = intent.description.trim().to_string();
            let field = format!("taxonomy.intents[{i}]");
            if intent.label.is_empty() || intent.label.chars().count() > MAX_LABEL {
                return Err(invalid(format!("{field}.label"), format!("must be 1 to {MAX_LABEL} characters")));
            }
            if !seen.insert(intent.label.to_lowercase()) {
                return Err(invalid(format!("{field}.label"), format!("duplicate label `{}`", intent.label)));
            }
            if intent.description.chars().count() > limits.max_text_chars {
                return Err(invalid(format!("{field}.description"), format!("longer than {} characters", limits.max_text_chars)));
            }
            for e in intent.examples.iter_mut() {
                *e = e.trim().to_string();
            }
            if intent.examples.is_empty() {
                return Err(invalid(format!("{field}.examples"), format!("intent `{}` has no examples; give at least one", intent.label)));
            }
            if intent.examples.len() > limits.max_examples_per_intent {
                return Err(invalid(
                    format!("{field}.examples"),
                    format!(
                        "intent `{}` has {} examples, the limit is {} (--max-examples-per-intent)",
                        intent.label,
                        intent.examples.len(),
                        limits.max_examples_per_intent
                    ),
                ));
            }
            for (j, e) in intent.examples.iter().enumerate() {
                check_text(format!("{field}.examples[{j}]"), e)?;
            }
            total += intent.examples.len();
        }
        for (j, e) in self.out_of_scope.iter_mut().enumerate() {
            *e = e.trim().to_string();
            check_text(format!("taxonomy.out_of_scope[{j}]"), e)?;
        }
        total += self.out_of_scope.len();
        if total > limits.max_examples {
            return Err(invalid(
                "taxonomy",
                format!("{total} examples in all, the limit is {} (--max-taxonomy-examples)", limits.max_examples),
            ));
        }
        Ok(self)
    }

    /// Identifies the content: registering an identical taxonomy again is a no-op.
    pub fn content_hash(&self) -> String {
        let canonical = serde_json::to_vec(self).expect("serialisable");
        let mut h = Sha256::new();
        h.update(&canonical);
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn example_count(&self) -> usize {
        self.intents.iter().map(|i| i.examples.len()).sum::<usize>() + self.out_of_scope.len()
    }
}

/// Loads `--taxonomy` arguments: TOML files, or folders of them.
pub fn load_paths(paths: &[std::path::PathBuf]) -> Result<Vec<Taxonomy>, IntentError> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut files: Vec<_> = std::fs::read_dir(p)
                .map_err(|e| IntentError::Store(format!("{}: {e}", p.display())))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "toml"))
                .collect();
            files.sort();
            for f in files {
                out.push(Taxonomy::from_file(&f)?);
            }
        } else {
            out.push(Taxonomy::from_file(p)?);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tax() -> Taxonomy {
        Taxonomy::from_toml(
            r#"
name = "shop"
version = "1"
[[intent]]
label = "refund"
examples = ["I want my money back", " quero reembolso "]
[[intent]]
label = "order_status"
description = "where is my order"
examples = ["where is my order?"]
"#,
        )
        .unwrap()
    }

    fn err(t: Taxonomy) -> String {
        t.normalise_and_validate(&TaxonomyLimits::default()).unwrap_err().to_string()
    }

    #[test]
    fn valid_taxonomy_is_trimmed_and_round_trips_through_toml() {
        let t = tax().normalise_and_validate(&TaxonomyLimits::default()).unwrap();
        assert_eq!(t.intents[0].examples[1], "quero reembolso");
        let back = Taxonomy::from_toml(&t.to_toml()).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.content_hash(), t.content_hash());
    }

    #[test]
    fn every_rule_names_the_offender() {
        let mut t = tax();
        t.intents[1].label = "Refund".into();
        assert!(err(t).contains("taxonomy.intents[1].label: duplicate label `Refund`"));
        let mut t = tax();
        t.intents[0].examples.clear();
        assert!(err(t).contains("taxonomy.intents[0].examples"));
        let mut t = tax();
        t.intents[0].examples[0] = "  ".into();
        assert!(err(t).contains("taxonomy.intents[0].examples[0]: is empty"));
        let mut t = tax();
        t.name = "../etc".into();
        assert!(err(t).contains("taxonomy.name"));
        let mut t = tax();
        t.intents.clear();
        assert!(err(t).contains("at least one intent"));
        let limits = TaxonomyLimits { max_intents: 1, ..Default::default() };
        assert!(tax().normalise_and_validate(&limits).unwrap_err().to_string().contains("the limit is 1"));
        let limits = TaxonomyLimits { max_examples_per_intent: 1, ..Default::default() };
        let e = tax().normalise_and_validate(&limits).unwrap_err().to_string();
        assert!(e.contains("taxonomy.intents[0].examples") && e.contains("limit is 1"), "{e}");
    }

    #[test]
    fn content_hash_changes_with_content() {
        let a = tax();
        let mut b = tax();
        b.intents[0].examples.push("devolução".into());
        assert_ne!(a.content_hash(), b.content_hash());
    }
}
