//! The faithfulness check: every number, amount, order or ticket id, e-mail,
//! phone number and URL in the model's output must appear in the thread.
//!
//! Facts are compared in a normalised form so that formatting does not count
//! as invention: digits only for anything numeric ("R$ 1.234,56" == "1234,56",
//! "+55 (11) 98765-4321" == "5511987654321"), lower case for e-mails and URLs.
//! A bare single digit ("1 order", "2 days") is not treated as a fact.

use regex::Regex;
use serde::Serialize;
use std::collections::HashSet;
use std::sync::LazyLock;

static URL: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"(?i)\b(?:https?://|www\.)[^\s<>()\[\]]+").unwrap());
static EMAIL: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?i)\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b").unwrap());
/// Phone numbers: digits with spaces, dots, dashes and parentheses inside.
static PHONE: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\+?\d[\d\s().-]{6,}\d").unwrap());
/// Numbers grouped by spaces: "2 990", "1 234 567".
static SPACED: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\b\d{1,3}(?:[ \u{a0}\u{202f}]\d{3})+\b").unwrap());
/// Words with inner separators; kept when they carry a digit: "BR-48213", "1.234,56", "15/03".
static TOKEN: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"#?[\p{L}\d]+(?:[.,:/\-][\p{L}\d]+)*").unwrap());
static DIGIT_RUN: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\d+").unwrap());

/// What a fact looks like; a frontend can link e-mails, phones and URLs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FactKind {
    Url,
    Email,
    Phone,
    /// An id, amount, date or other number.
    Number,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Fact {
    /// As written in the output.
    pub raw: String,
    pub kind: FactKind,
    /// The normalised form compared against the thread.
    pub(crate) key: String,
}

fn trim_punct(s: &str) -> &str {
    s.trim_end_matches(['.', ',', ';', ':', '!', '?', ')', '"', '\''])
}

/// Facts in a text, in order of appearance.
pub fn extract(text: &str) -> Vec<Fact> {
    let mut found: Vec<(usize, usize, Fact)> = Vec::new();
    for (i, re) in [&*URL, &*EMAIL, &*PHONE, &*SPACED, &*TOKEN].into_iter().enumerate() {
        for m in re.find_iter(text) {
            if found.iter().any(|&(s, e, _)| m.start() < e && s < m.end()) {
                continue;
            }
            let raw = trim_punct(m.as_str().trim());
            let has_letter = raw.chars().any(char::is_alphabetic);
            let digits: String = raw.chars().filter(char::is_ascii_digit).collect();
            let kind = match i {
                0 => FactKind::Url,
                1 => FactKind::Email,
                // Long digit runs are also tracking and card numbers: a phone
                // is what has a "+" or separators and a phone's length.
                2 if raw.starts_with('+')
                    || ((9..=15).contains(&digits.len()) && raw.contains([' ', '-', '(', '.'])) =>
                {
                    FactKind::Phone
                }
                _ => FactKind::Number,
            };
            let key = match i {
                0 | 1 => raw.to_lowercase(),
                _ if digits.is_empty() => continue,
                _ if digits.len() < 2 && !has_letter => continue, // "1 order", "2 days"
                // Ids such as "BR-48213" or "A17": letters matter, separators do not.
                _ if has_letter => raw.chars().filter(|c| c.is_alphanumeric()).flat_map(char::to_lowercase).collect(),
                _ => digits,
            };
            found.push((m.start(), m.end(), Fact { raw: raw.to_string(), kind, key }));
        }
    }
    found.sort_by_key(|&(s, _, _)| s);
    found.into_iter().map(|(_, _, f)| f).collect()
}

/// What the thread supports: each fact's key, and each digit run inside the
/// thread's numeric tokens (so "15" is supported by "15/03", and "03" by "3").
pub struct Support {
    keys: HashSet<String>,
}

impl Support {
    pub fn from_texts<'a>(texts: impl IntoIterator<Item = &'a str>) -> Self {
        Self::from_facts(texts.into_iter().flat_map(extract).collect::<Vec<_>>().iter())
    }

    /// As [`from_texts`](Self::from_texts), from facts already extracted.
    pub fn from_facts<'a>(facts: impl IntoIterator<Item = &'a Fact>) -> Self {
        let mut keys = HashSet::new();
        for f in facts {
            for run in DIGIT_RUN.find_iter(&f.raw) {
                keys.insert(run.as_str().to_string());
                keys.insert(run.as_str().trim_start_matches('0').to_string());
            }
            // An id quoted without its letters ("48213" for "BR-48213") is supported.
            let digits: String = f.raw.chars().filter(char::is_ascii_digit).collect();
            keys.insert(digits);
            keys.insert(f.key.clone());
        }
        Self { keys }
    }

    pub fn supports(&self, fact: &Fact) -> bool {
        self.supports_key(&fact.key)
    }

    /// `key`: a `Fact`'s normalised form.
    pub fn supports_key(&self, key: &str) -> bool {
        self.keys.contains(key) || self.keys.contains(key.trim_start_matches('0'))
    }

    /// The facts of `text` that the thread does not support.
    pub fn unsupported(&self, text: &str) -> Vec<Fact> {
        extract(text).into_iter().filter(|f| !self.supports(f)).collect()
    }
}

/// Drops every sentence of `text` that carries an unsupported fact; returns
/// the cleaned text and the facts removed.
pub fn remove_unsupported(text: &str, support: &Support) -> (String, Vec<String>) {
    let mut removed = Vec::new();
    let kept: Vec<&str> = split_sentences(text)
        .into_iter()
        .filter(|s| {
            let bad = support.unsupported(s);
            removed.extend(bad.iter().map(|f| f.raw.clone()));
            bad.is_empty()
        })
        .collect();
    (kept.join(" ").trim().to_string(), removed)
}

/// Sentence boundaries: `.`, `!`, `?`, `।` (Devanagari danda) or `;` followed by
/// whitespace, and line breaks. A dot between digits ("1.234") is not one.
pub(crate) fn split_sentences(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    for (i, &(pos, c)) in chars.iter().enumerate() {
        let next_ws = chars.get(i + 1).is_none_or(|&(_, n)| n.is_whitespace());
        let end = matches!(c, '.' | '!' | '?' | '।' | ';') && next_ws || c == '\n';
        if end {
            let s = text[start..pos + c.len_utf8()].trim();
            if !s.is_empty() {
                out.push(s);
            }
            start = pos + c.len_utf8();
        }
    }
    let s = text[start..].trim();
    if !s.is_empty() {
        out.push(s);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raws(text: &str) -> Vec<String> {
        extract(text).into_iter().map(|f| f.raw).collect()
    }

    #[test]
    fn extracts_numbers_ids_amounts_contacts() {
        let t = "Pedido #BR-48213 de R$ 1.234,56 em 15/03; ligue +55 (11) 98765-4321, \
                 escreva a ana.souza@loja.com.br ou veja https://loja.com.br/rastreio?id=77.";
        let f = raws(t);
        assert!(f.contains(&"#BR-48213".to_string()), "{f:?}");
        assert!(f.contains(&"1.234,56".to_string()), "{f:?}");
        assert!(f.contains(&"15/03".to_string()), "{f:?}");
        assert!(f.iter().any(|x| x.contains("98765-4321")), "{f:?}");
        assert!(f.contains(&"ana.souza@loja.com.br".to_string()), "{f:?}");
        assert!(f.contains(&"https://loja.com.br/rastreio?id=77".to_string()), "{f:?}");
        assert!(raws("He ordered 1 item 2 days ago").is_empty());
    }

    #[test]
    fn formatting_differences_are_not_invention() {
        let s = Support::from_texts(["Valor: R$ 1.234,56, pedido BR-48213, prazo 15/03, tel +55 (11) 98765-4321"]);
        for ok in ["1234,56", "R$1.234,56", "br48213", "48213", "15", "03", "3", "5511987654321"] {
            assert!(s.unsupported(ok).is_empty(), "{ok} should be supported");
        }
    }

    #[test]
    fn flags_invented_facts() {
        let s = Support::from_texts(["Заказ 558812 на сумму 2 990 руб. не пришёл, пишите на help@shop.ru"]);
        let bad = s.unsupported("Заказ 558813 на 3 990 руб.; письмо на sales@shop.ru; см. https://shop.ru/x");
        let bad: Vec<String> = bad.into_iter().map(|f| f.raw).collect();
        assert_eq!(bad, vec!["558813", "3 990", "sales@shop.ru", "https://shop.ru/x"]);
        assert!(s.unsupported("Заказ 558812 на 2 990 руб., help@shop.ru").is_empty());
    }

    #[test]
    fn removes_only_the_sentences_with_invented_facts() {
        let s = Support::from_texts(["order 4471 was late"]);
        let (text, removed) = remove_unsupported("Order 4471 was late. A refund of $50 was promised. Customer is upset.", &s);
        assert_eq!(text, "Order 4471 was late. Customer is upset.");
        assert_eq!(removed, vec!["50".to_string()]);
        assert_eq!(split_sentences("Total 1.234,56 paid. Next"), vec!["Total 1.234,56 paid.", "Next"]);
    }
}
