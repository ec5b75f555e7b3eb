//! Intent, sentiment and urgency against each business's own taxonomy.
//!
//! Registering a taxonomy embeds its examples with the shared encoder, trains
//! a head on them (`head`), and stores both (`store`). Classifying embeds the
//! message once and reads intent and sentiment off the same vector.

pub mod head;
pub mod signals;
pub mod store;
pub mod taxonomy;

use crate::encoder::{EncodeTimings, EncoderError, EncoderHandle};
use crate::llm::ModelState;
use crate::summarize::thread::{Role, Thread};
use head::{Head, TrainOptions};
use signals::{Sentiment, Urgency, UrgencyInput};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use store::{Stored, TaxonomyStore};
use taxonomy::{Taxonomy, TaxonomyLimits};

/// The customer-support taxonomy palaver ships, written by this team.
pub const DEFAULT_TAXONOMY_TOML: &str = include_str!("../../taxonomies/support.toml");
/// Examples of negative, neutral and positive customer messages.
const SENTIMENT_TOML: &str = include_str!("../../taxonomies/sentiment.toml");
const SENTIMENT: &str = "palaver.sentiment";

#[derive(Debug, thiserror::Error)]
pub enum IntentError {
    #[error("{field}: {msg}")]
    InvalidArgument { field: String, msg: String },
    #[error("{field}: {msg}")]
    NotFound { field: String, msg: String },
    #[error("{0}")]
    Unavailable(String),
    #[error("taxonomy store: {0}")]
    Store(String),
    #[error(transparent)]
    Encoder(#[from] EncoderError),
}

fn invalid(field: impl Into<String>, msg: impl Into<String>) -> IntentError {
    IntentError::InvalidArgument { field: field.into(), msg: msg.into() }
}

#[derive(Debug, Clone)]
pub struct IntentConfig {
    pub limits: TaxonomyLimits,
    pub train: TrainOptions,
    /// Taxonomy used when a request names none.
    pub default_taxonomy: String,
    /// Characters of one message to classify.
    pub max_text_chars: usize,
    /// Messages in one batch call.
    pub max_batch_texts: usize,
    pub max_top_k: usize,
}

impl Default for IntentConfig {
    fn default() -> Self {
        Self {
            limits: TaxonomyLimits::default(),
            train: TrainOptions::default(),
            default_taxonomy: "support".into(),
            max_text_chars: 8_000,
            max_batch_texts: 1_024,
            max_top_k: 50,
        }
    }
}

/// What to classify.
#[derive(Debug, Clone)]
pub enum Source {
    Text(String),
    /// The customer's latest turns decide.
    Thread(Thread),
}

#[derive(Debug, Clone)]
pub struct ClassifyInput {
    pub source: Source,
    pub taxonomy: Option<String>,
    /// 0: the server default (3).
    pub top_k: usize,
}

#[derive(Debug, Clone)]
pub struct Classification {
    pub taxonomy: String,
    pub taxonomy_version: String,
    pub intents: Vec<(String, f32)>,
    pub out_of_scope: bool,
    pub out_of_scope_score: f32,
    pub sentiment: Sentiment,
    pub sentiment_score: f32,
    pub urgency: Urgency,
    pub urgency_reasons: Vec<String>,
    pub language: String,
    /// The text that was classified (the latest customer turns of a thread).
    pub text: String,
    pub timings: ClassifyTimings,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct ClassifyTimings {
    pub tokenize: Duration,
    pub queue: Duration,
    pub inference: Duration,
    pub total: Duration,
    pub batch_size: usize,
}

/// What a head is trained on: every example and each intent's description
/// (a free extra example), plus the out-of-scope examples as a "none" class.
pub struct TrainingSet {
    pub texts: Vec<String>,
    pub y: Vec<usize>,
    pub labels: Vec<String>,
    pub has_none: bool,
}

impl TrainingSet {
    pub fn of(t: &Taxonomy) -> TrainingSet {
        let mut texts = Vec::with_capacity(t.example_count() + t.intents.len());
        let mut y = Vec::with_capacity(texts.capacity());
        for (c, intent) in t.intents.iter().enumerate() {
            for e in intent.examples.iter().chain((!intent.description.is_empty()).then_some(&intent.description)) {
                texts.push(e.clone());
                y.push(c);
            }
        }
        let has_none = !t.out_of_scope.is_empty();
        for e in &t.out_of_scope {
            texts.push(e.clone());
            y.push(t.intents.len());
        }
        let mut labels: Vec<String> = t.intents.iter().map(|i| i.label.clone()).collect();
        if has_none {
            labels.push("none".into());
        }
        TrainingSet { texts, y, labels, has_none }
    }
}

/// Cheap to clone; all clones share the registry.
#[derive(Clone)]
pub struct Intents {
    inner: Arc<Inner>,
}

struct Inner {
    encoder: EncoderHandle,
    store: Box<dyn TaxonomyStore>,
    registry: RwLock<HashMap<String, Arc<Stored>>>,
    /// Serialises registrations so the store and the registry agree.
    writes: tokio::sync::Mutex<()>,
    cfg: IntentConfig,
    /// Loading until `init` has registered the built-in heads.
    state: tokio::sync::watch::Sender<ModelState>,
}

/// Text fed to the encoder for a thread: the customer's turns since the last
/// reply from the business (at most three), or the last customer message.
pub fn latest_customer_turns(thread: &Thread) -> (String, usize) {
    let mut turns = Vec::new();
    for m in thread.messages.iter().rev() {
        match m.role {
            Role::Customer => turns.push(m.text.trim()),
            Role::Agent | Role::Bot if !turns.is_empty() => break,
            _ => {}
        }
    }
    let unanswered = turns.len();
    turns.truncate(3);
    turns.reverse();
    (turns.join("\n"), unanswered)
}

impl Intents {
    pub fn new(encoder: EncoderHandle, store: Box<dyn TaxonomyStore>, cfg: IntentConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                encoder,
                store,
                registry: RwLock::new(HashMap::new()),
                writes: tokio::sync::Mutex::new(()),
                cfg,
                state: tokio::sync::watch::Sender::new(ModelState::Loading),
            }),
        }
    }

    pub fn encoder(&self) -> &EncoderHandle {
        &self.inner.encoder
    }

    /// Waits for the encoder, loads the store (retraining heads made with
    /// another encoder), registers the built-in sentiment head, the default
    /// taxonomy if absent, and the `--taxonomy` files.
    pub async fn init(&self, startup: Vec<Taxonomy>) -> Result<(), IntentError> {
        let result = self.init_inner(startup).await;
        let state = match &result {
            Ok(()) => ModelState::Ready { context: self.inner.encoder.max_tokens() },
            Err(e) => ModelState::Failed(e.to_string()),
        };
        self.inner.state.send_replace(state);
        result
    }

    pub fn state(&self) -> ModelState {
        self.inner.state.borrow().clone()
    }

    fn check_ready(&self) -> Result<(), IntentError> {
        match self.state() {
            ModelState::Ready { .. } => Ok(()),
            ModelState::Loading => Err(IntentError::Unavailable("intents are starting: the encoder is loading or the built-in taxonomies are training; retry shortly".into())),
            ModelState::Failed(e) => Err(IntentError::Unavailable(format!("intents are unavailable: {e}"))),
        }
    }

    async fn init_inner(&self, startup: Vec<Taxonomy>) -> Result<(), IntentError> {
        if let ModelState::Failed(e) = self.inner.encoder.wait_loaded().await {
            return Err(IntentError::Unavailable(format!("encoder failed to load: {e}")));
        }
        let (stored, problems) = self.inner.store.load_all()?;
        for p in problems {
            tracing::warn!("{p}");
        }
        for s in stored {
            if s.encoder == self.inner.encoder.id() {
                self.inner.registry.write().expect("registry lock").insert(s.taxonomy.name.clone(), Arc::new(s));
            } else {
                tracing::info!(taxonomy = %s.taxonomy.name, was = %s.encoder, "retraining for the current encoder");
                self.register(s.taxonomy, true).await?;
            }
        }
        let sentiment = Taxonomy::from_toml(SENTIMENT_TOML)?;
        self.register(Taxonomy { name: SENTIMENT.into(), ..sentiment }, true).await?;
        let default = Taxonomy::from_toml(DEFAULT_TAXONOMY_TOML)?;
        if self.lookup(&default.name).is_none() {
            self.register(default.normalise_and_validate(&self.inner.cfg.limits)?, false).await?;
        }
        for t in startup {
            let name = t.name.clone();
            let (_, created) = self.register(t.normalise_and_validate(&self.inner.cfg.limits)?, false).await?;
            tracing::info!(taxonomy = %name, trained = created, "taxonomy from file");
        }
        Ok(())
    }

    fn lookup(&self, name: &str) -> Option<Arc<Stored>> {
        self.inner.registry.read().expect("registry lock").get(name).cloned()
    }

    /// Validates, trains and stores. Returns the stored entry and whether
    /// anything changed (an identical taxonomy is not trained again).
    pub async fn put(&self, t: Taxonomy) -> Result<(Arc<Stored>, bool), IntentError> {
        self.check_ready()?;
        let t = t.normalise_and_validate(&self.inner.cfg.limits)?;
        self.register(t, false).await
    }

    async fn register(&self, t: Taxonomy, force: bool) -> Result<(Arc<Stored>, bool), IntentError> {
        let _guard = self.inner.writes.lock().await;
        let hash = t.content_hash();
        if let Some(existing) = self.lookup(&t.name) {
            if !force && existing.content_hash == hash && existing.encoder == self.inner.encoder.id() {
                return Ok((existing, false));
            }
        }
        let head = self.train(&t).await?;
        let registered_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
        let stored = Stored { taxonomy: t, content_hash: hash, encoder: self.inner.encoder.id().to_string(), head, registered_at };
        let inner = self.inner.clone();
        let stored = tokio::task::spawn_blocking(move || inner.store.put(&stored).map(|_| stored))
            .await
            .map_err(|_| IntentError::Store("store task panicked".into()))??;
        let stored = Arc::new(stored);
        self.inner.registry.write().expect("registry lock").insert(stored.taxonomy.name.clone(), stored.clone());
        tracing::info!(
            taxonomy = %stored.taxonomy.name, intents = stored.taxonomy.intents.len(),
            cv_accuracy = stored.head.cv_accuracy.unwrap_or(f32::NAN), threshold = stored.head.threshold, "taxonomy trained"
        );
        Ok((stored, true))
    }

    async fn train(&self, t: &Taxonomy) -> Result<Head, IntentError> {
        let set = TrainingSet::of(t);
        let (encoded, _) = self.inner.encoder.encode(set.texts).await?;
        let x: Vec<Vec<f32>> = encoded.into_iter().map(|e| e.embedding).collect();
        let opts = self.inner.cfg.train;
        let (y, labels, has_none) = (set.y, set.labels, set.has_none);
        tokio::task::spawn_blocking(move || Head::train(&x, &y, labels, has_none, opts))
            .await
            .map_err(|_| IntentError::Unavailable("training task panicked".into()))
    }

    pub fn get(&self, name: &str) -> Result<Arc<Stored>, IntentError> {
        self.check_ready()?;
        taxonomy::validate_name("name", name)?;
        self.lookup(name)
            .filter(|s| s.taxonomy.name != SENTIMENT)
            .ok_or_else(|| IntentError::NotFound { field: "name".into(), msg: format!("no taxonomy named `{name}`") })
    }

    /// Registered taxonomies by name (the built-in sentiment head is not one).
    pub fn list(&self) -> Result<Vec<Arc<Stored>>, IntentError> {
        self.check_ready()?;
        let mut all: Vec<_> =
            self.inner.registry.read().expect("registry lock").values().filter(|s| s.taxonomy.name != SENTIMENT).cloned().collect();
        all.sort_by(|a, b| a.taxonomy.name.cmp(&b.taxonomy.name));
        Ok(all)
    }

    pub async fn delete(&self, name: &str) -> Result<bool, IntentError> {
        self.check_ready()?;
        taxonomy::validate_name("name", name)?;
        if name.starts_with("palaver.") {
            return Err(invalid("name", "names starting with `palaver.` are reserved"));
        }
        let _guard = self.inner.writes.lock().await;
        let inner = self.inner.clone();
        let owned = name.to_string();
        let existed = tokio::task::spawn_blocking(move || inner.store.delete(&owned))
            .await
            .map_err(|_| IntentError::Store("store task panicked".into()))??;
        let removed = self.inner.registry.write().expect("registry lock").remove(name).is_some();
        Ok(existed || removed)
    }

    fn resolve(&self, taxonomy: Option<&str>, field: &str) -> Result<Arc<Stored>, IntentError> {
        let name = taxonomy.filter(|n| !n.is_empty()).unwrap_or(&self.inner.cfg.default_taxonomy);
        taxonomy::validate_name(field, name)?;
        self.lookup(name).filter(|s| s.taxonomy.name != SENTIMENT).ok_or_else(|| IntentError::NotFound {
            field: field.into(),
            msg: format!("no taxonomy named `{name}`; register it with Taxonomies.PutTaxonomy"),
        })
    }

    fn check_text(&self, field: &str, text: &str) -> Result<(), IntentError> {
        let max = self.inner.cfg.max_text_chars;
        if text.trim().is_empty() {
            return Err(invalid(field, "is empty"));
        }
        let n = text.chars().count();
        if n > max {
            return Err(invalid(field, format!("{n} characters, the limit is {max} (--max-classify-chars)")));
        }
        Ok(())
    }

    fn check_top_k(&self, top_k: usize) -> Result<usize, IntentError> {
        let max = self.inner.cfg.max_top_k;
        if top_k > max {
            return Err(invalid("top_k", format!("{top_k} is above the limit of {max}")));
        }
        Ok(if top_k == 0 { 3 } else { top_k })
    }

    /// Checks a request without doing any work, so bad input fails before admission.
    pub fn validate(&self, input: &ClassifyInput) -> Result<(), IntentError> {
        self.check_ready()?;
        self.check_top_k(input.top_k)?;
        self.resolve(input.taxonomy.as_deref(), "taxonomy")?;
        match &input.source {
            Source::Text(t) => self.check_text("text", t),
            Source::Thread(th) => {
                if th.messages.is_empty() {
                    return Err(invalid("thread.messages", "is empty"));
                }
                let (text, _) = latest_customer_turns(th);
                if text.is_empty() {
                    return Err(invalid("thread.messages", "no message with ROLE_CUSTOMER to classify"));
                }
                self.check_text("thread.messages (latest customer turns)", &text)
            }
        }
    }

    pub async fn classify(&self, input: ClassifyInput) -> Result<Classification, IntentError> {
        self.validate(&input)?;
        let (text, unanswered) = match input.source {
            Source::Text(t) => (t, 1),
            Source::Thread(th) => latest_customer_turns(&th),
        };
        let mut out = self.classify_texts(vec![(text, unanswered)], input.taxonomy.as_deref(), input.top_k).await?;
        Ok(out.pop().expect("one result per text"))
    }

    /// Many messages against one taxonomy: they share the encoder's batches.
    pub async fn classify_batch(&self, texts: Vec<String>, taxonomy: Option<&str>, top_k: usize) -> Result<Vec<Classification>, IntentError> {
        self.check_ready()?;
        let max = self.inner.cfg.max_batch_texts;
        if texts.is_empty() {
            return Err(invalid("texts", "is empty"));
        }
        if texts.len() > max {
            return Err(invalid("texts", format!("{} messages, the limit is {max} per call (--max-batch-texts)", texts.len())));
        }
        for (i, t) in texts.iter().enumerate() {
            self.check_text(&format!("texts[{i}]"), t)?;
        }
        self.classify_texts(texts.into_iter().map(|t| (t, 1)).collect(), taxonomy, top_k).await
    }

    async fn classify_texts(&self, items: Vec<(String, usize)>, taxonomy: Option<&str>, top_k: usize) -> Result<Vec<Classification>, IntentError> {
        let started = Instant::now();
        let top_k = self.check_top_k(top_k)?;
        let stored = self.resolve(taxonomy, "taxonomy")?;
        let sentiment = self.lookup(SENTIMENT).ok_or_else(|| IntentError::Unavailable("still starting: the sentiment head is not trained yet".into()))?;
        let texts: Vec<String> = items.iter().map(|(t, _)| t.clone()).collect();
        let for_lang = texts.clone();
        let langs = tokio::task::spawn_blocking(move || {
            for_lang.iter().map(|t| crate::summarize::language::detect_text(t).unwrap_or_else(|| "und".into())).collect::<Vec<_>>()
        });
        let (encoded, timings) = self.inner.encoder.encode(texts).await?;
        let langs = langs.await.map_err(|_| IntentError::Unavailable("language detection panicked".into()))?;
        let EncodeTimings { tokenize, queue, inference, batch_size } = timings;
        let total = started.elapsed();
        let m = crate::metrics::global();
        for (phase, d) in [("tokenize", tokenize), ("queue", queue), ("inference", inference), ("total", total)] {
            m.classify_seconds.with(&[phase]).observe_duration(d);
        }
        m.classify_texts.with(&[]).add(items.len() as u64);
        let head = &stored.head;
        Ok(items
            .into_iter()
            .zip(encoded)
            .zip(langs)
            .map(|(((text, unanswered), e), language)| {
                let p = head.predict(&e.embedding);
                let s = sentiment.head.predict(&e.embedding);
                let (s_idx, s_score) = s.ranked[0];
                let sent = Sentiment::from_label(&sentiment.head.labels[s_idx]);
                let top_label = (!p.out_of_scope).then(|| head.labels[p.ranked[0].0].to_lowercase());
                let (urgency, urgency_reasons) = signals::urgency(&UrgencyInput {
                    text: &text,
                    sentiment: sent,
                    sentiment_score: s_score,
                    unanswered_customer_messages: unanswered,
                    top_intent: top_label.as_deref(),
                });
                Classification {
                    taxonomy: stored.taxonomy.name.clone(),
                    taxonomy_version: stored.taxonomy.version.clone(),
                    intents: p.ranked.iter().take(top_k).map(|&(i, score)| (head.labels[i].clone(), score)).collect(),
                    out_of_scope: p.out_of_scope,
                    out_of_scope_score: p.out_of_scope_score,
                    sentiment: sent,
                    sentiment_score: s_score,
                    urgency,
                    urgency_reasons,
                    language,
                    text,
                    timings: ClassifyTimings { tokenize, queue, inference, total, batch_size },
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::summarize::thread::Message;

    fn msg(role: Role, text: &str) -> Message {
        Message { id: String::new(), role, sent_at: None, text: text.into(), channel: String::new() }
    }

    #[test]
    fn latest_customer_turns_stop_at_the_last_reply() {
        let t = Thread {
            id: "t".into(),
            messages: vec![
                msg(Role::Customer, "old question"),
                msg(Role::Agent, "answer"),
                msg(Role::Customer, "one"),
                msg(Role::System, "assigned"),
                msg(Role::Customer, "two"),
            ],
        };
        assert_eq!(latest_customer_turns(&t), ("one\ntwo".to_string(), 2));
        let t = Thread { id: "t".into(), messages: vec![msg(Role::Customer, "hi"), msg(Role::Agent, "hello")] };
        assert_eq!(latest_customer_turns(&t), ("hi".to_string(), 1));
    }

    #[test]
    fn shipped_taxonomies_are_valid() {
        let t = Taxonomy::from_toml(DEFAULT_TAXONOMY_TOML).unwrap().normalise_and_validate(&TaxonomyLimits::default()).unwrap();
        assert!((20..=30).contains(&t.intents.len()), "{} intents", t.intents.len());
        assert!(t.intents.iter().all(|i| i.examples.len() >= 6), "every intent needs examples in several languages");
        let s = Taxonomy::from_toml(SENTIMENT_TOML).unwrap();
        assert_eq!(s.intents.iter().map(|i| i.label.as_str()).collect::<Vec<_>>(), ["negative", "neutral", "positive"]);
    }
}
