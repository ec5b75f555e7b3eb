//! Thread summaries: validate -> pick the language -> fit the thread into the
//! token budget -> prompt -> generate -> parse -> check faithfulness.

pub mod cut;
pub mod faithful;
pub mod language;
pub mod notes;
pub mod parse;
pub mod prompt;
pub mod references;
pub mod thread;

use crate::llm::batching::Priority;
use crate::llm::{GenerateParams, Generation, LlmError, LlmHandle};
use language::Language;
use parse::Note;
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use thread::SummarizeInput;
use tokio::sync::mpsc;

#[derive(Debug, thiserror::Error)]
pub enum SummarizeError {
    #[error("{field}: {msg}")]
    InvalidArgument { field: String, msg: String },
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("request cancelled")]
    Cancelled,
    #[error("{0}")]
    Internal(String),
}

impl From<LlmError> for SummarizeError {
    fn from(e: LlmError) -> Self {
        match e {
            LlmError::NotReady | LlmError::LoadFailed(_) | LlmError::WorkerGone => Self::Unavailable(e.to_string()),
            LlmError::Cancelled => Self::Cancelled,
            LlmError::ContextExceeded { .. } => Self::ResourceExhausted(e.to_string()),
            other => Self::Internal(other.to_string()),
        }
    }
}

/// Request limits; each is a `palaver serve` flag.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_messages: usize,
    pub max_message_chars: usize,
    pub max_thread_chars: usize,
    pub min_words: u32,
    pub max_words: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_messages: 2000, max_message_chars: 16_000, max_thread_chars: 400_000, min_words: 10, max_words: 200 }
    }
}

#[derive(Debug, Clone)]
pub struct SummarizeConfig {
    pub limits: Limits,
    /// Tokens of transcript the prompt may carry; longer threads are cut.
    pub prompt_token_budget: usize,
    pub max_new_tokens: usize,
    pub default_max_words: u32,
    /// How many times an answer that fails the faithfulness check is generated
    /// again before the offending sentences are removed.
    pub faithfulness_retries: u32,
    /// Bytes of finished notes kept per thread id and served again while the
    /// thread is unchanged (`notes`); 0 keeps none.
    pub note_cache_bytes: usize,
}

impl Default for SummarizeConfig {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            prompt_token_budget: 1536,
            max_new_tokens: 320,
            default_max_words: 60,
            faithfulness_retries: 1,
            note_cache_bytes: 64 << 20,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Coverage {
    pub used_message_ids: Vec<String>,
    pub omitted_message_ids: Vec<String>,
    pub shortened_message_ids: Vec<String>,
    pub truncated: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Faithfulness {
    pub passed_first_time: bool,
    pub regenerated: bool,
    pub removed_facts: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    pub tokenize_ms: f64,
    pub queue_ms: f64,
    pub prompt_ms: f64,
    pub generation_ms: f64,
    pub total_ms: f64,
    /// Size of the (final) prompt.
    pub prompt_tokens: usize,
    /// Of those, tokens served from the thread's cached prompt.
    pub reused_prompt_tokens: usize,
    /// Prompt tokens run through the model over all attempts (reused ones excluded).
    pub prompt_tokens_processed: usize,
    /// Generated over all attempts.
    pub generated_tokens: usize,
    /// Of those, tokens from confirmed drafts (no decode pass of their own).
    pub drafted_tokens: usize,
    /// Generations run: 1, or more when the faithfulness check asked for another.
    pub attempts: u32,
}

/// The response's own numbers, summed for metrics (once per summary).
pub fn record_metrics(t: &Timings, faith: &Faithfulness) {
    let m = crate::metrics::global();
    for (phase, ms) in [("tokenize", t.tokenize_ms), ("queue", t.queue_ms), ("prompt", t.prompt_ms), ("generation", t.generation_ms), ("total", t.total_ms)] {
        m.summarize_seconds.with(&[phase]).observe(ms / 1e3);
    }
    for (kind, n) in [
        ("prompt", t.prompt_tokens),
        ("reused", t.reused_prompt_tokens),
        ("processed", t.prompt_tokens_processed),
        ("generated", t.generated_tokens),
        ("drafted", t.drafted_tokens),
    ] {
        m.summarize_tokens.with(&[kind]).add(n as u64);
    }
    for (outcome, n) in
        [("passed_first_time", usize::from(faith.passed_first_time)), ("regenerated", usize::from(faith.regenerated)), ("facts_removed", faith.removed_facts.len())]
    {
        m.summarize_faithfulness.with(&[outcome]).add(n as u64);
    }
}

impl Timings {
    fn add(&mut self, g: &Generation) {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        self.queue_ms += ms(g.queue);
        self.prompt_ms += ms(g.prompt_time);
        self.generation_ms += ms(g.generation_time);
        self.prompt_tokens = g.prompt_tokens;
        self.reused_prompt_tokens = g.reused_prompt_tokens;
        self.prompt_tokens_processed += g.prompt_tokens - g.reused_prompt_tokens;
        self.generated_tokens += g.generated_tokens;
        self.drafted_tokens += g.drafted_tokens;
        self.attempts += 1;
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub thread_id: String,
    #[serde(flatten)]
    pub note: Note,
    pub language: Language,
    pub coverage: Coverage,
    pub faithfulness: Faithfulness,
    /// Ids, amounts, contacts and links quoted in the thread, verbatim.
    pub references: Vec<references::Reference>,
    pub model: String,
    pub timings: Timings,
    /// The raw model output of the final attempt.
    pub raw: String,
    /// Served from the stored notes: the thread had not changed since this
    /// note was written, and the model did no work (timings and token counts
    /// say so).
    pub cached: bool,
}

/// What `Summarizer::forget` found and dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forgotten {
    pub note: bool,
    pub prompt: bool,
}

/// What a streaming caller receives while the summary is generated.
#[derive(Debug, Clone)]
pub enum StreamEvent {
    /// First, before the model reads the thread.
    Preview(Box<Preview>),
    Text(String),
    /// The text so far failed the faithfulness check; a new attempt follows.
    Restart(String),
}

/// What is known of a summary before the model reads the thread. Under load
/// the note can be a minute away; the thread's ids, amounts and contacts, its
/// language and what fits the prompt are not.
#[derive(Debug, Clone)]
pub struct Preview {
    pub language: Language,
    pub coverage: Coverage,
    /// As in the final response, with `in_summary` false (no note yet).
    pub references: Vec<references::Reference>,
    /// Summaries the model thread held, queued or being written, when this
    /// one was ready for it, of its priority or a more urgent one: how much
    /// work is ahead of it.
    pub ahead: u64,
}

#[derive(Clone)]
pub struct Summarizer {
    llm: LlmHandle,
    cfg: SummarizeConfig,
    notes: Arc<Mutex<notes::NoteCache>>,
    writing: Arc<Mutex<notes::Writing>>,
    /// The note's labels as tokens, for drafts (`prompt::outline`).
    outline: Vec<Vec<u32>>,
}

/// A request after its note was looked up: the stored note, or what the model needs.
// Lives for one hop off the runtime; boxing either variant would only move the bytes.
#[allow(clippy::large_enum_variant)]
enum Ready {
    Stored(Summary),
    Fresh(Prepared),
}

/// The prompt-independent part of a request, computed off the async runtime.
struct Prepared {
    language: Language,
    transcript: String,
    coverage: Coverage,
    support: faithful::Support,
    references: Vec<references::Reference>,
    max_words: u32,
    priority: crate::llm::batching::Priority,
}

impl Summarizer {
    pub fn new(llm: LlmHandle, cfg: SummarizeConfig) -> Self {
        let notes = Arc::new(Mutex::new(notes::NoteCache::new(cfg.note_cache_bytes)));
        // Drafts only save passes, so labels the tokenizer cannot encode
        // leave the notes as they are, just without these drafts.
        let outline = prompt::outline(llm.tokenizer()).unwrap_or_default();
        Self { llm, cfg, notes, writing: Arc::default(), outline }
    }

    pub fn config(&self) -> &SummarizeConfig {
        &self.cfg
    }

    pub fn llm(&self) -> &LlmHandle {
        &self.llm
    }

    /// Validation only; the server calls it before taking an admission permit.
    pub fn validate(&self, input: &SummarizeInput) -> Result<(), SummarizeError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        thread::validate(input, &self.cfg.limits, now)?;
        if let Some(tag) = &input.language {
            language::from_request(tag)?;
        }
        Ok(())
    }

    pub async fn summarize(
        &self,
        input: SummarizeInput,
        stream: Option<mpsc::UnboundedSender<StreamEvent>>,
    ) -> Result<Summary, SummarizeError> {
        let start = Instant::now();
        self.validate(&input)?;
        let mut timings = Timings::default();

        let t = Instant::now();
        let this = self.clone();
        // Hashing a long thread, detecting its language and cutting it are
        // CPU work: off the async runtime.
        let (key, ready, input) = tokio::task::spawn_blocking(move || {
            let (key, stored) = this.look_up(&input);
            let ready = match stored {
                Some(s) => Ok(Ready::Stored(s)),
                None => this.prepare(&input).map(Ready::Fresh),
            };
            (key, ready, input)
        })
        .await
        .map_err(|e| SummarizeError::Internal(e.to_string()))?;
        let prepared = match ready? {
            Ready::Fresh(p) => p,
            Ready::Stored(stored) => {
                let s = served(stored, start);
                if let Some(out) = &stream {
                    for ev in replay(&s) {
                        let _ = out.send(ev);
                    }
                }
                return Ok(s);
            }
        };
        timings.tokenize_ms += t.elapsed().as_secs_f64() * 1e3;
        if let Some(s) = &stream {
            let preview = Preview {
                language: prepared.language.clone(),
                coverage: prepared.coverage.clone(),
                references: prepared.references.clone(),
                ahead: self.llm.ahead_of(prepared.priority),
            };
            let _ = s.send(StreamEvent::Preview(Box::new(preview)));
        }

        // The same note being written (the background note of the chat an
        // agent opens; a reload): wait for it rather than write it twice.
        let mut writer = None;
        while let Some(key) = key {
            match notes::turn(&self.writing, &input.thread.id, key) {
                notes::Turn::Write(w) => {
                    writer = Some(w);
                    break;
                }
                notes::Turn::Wait(waiter) => {
                    if prepared.priority == Priority::Interactive {
                        waiter.urgent.raise();
                    }
                    // None: the writer failed or left; this request writes it.
                    if let Some(s) = waiter.note().await {
                        return Ok(joined(s, start, timings.tokenize_ms, stream.as_ref()));
                    }
                }
            }
        }

        let mut forbidden: Vec<String> = Vec::new();
        let mut faith = Faithfulness::default();
        let mut attempt = 0;
        let (note, raw) = loop {
            let urgent = writer.as_ref().map(|w| &*w.urgent);
            let (gen, tok_ms) = self.generate(&input.thread.id, &prepared, &forbidden, urgent, stream.as_ref()).await?;
            timings.tokenize_ms += tok_ms;
            timings.add(&gen);
            let note = parse::parse(&gen.text);
            let bad = unsupported(&note, &prepared.support);
            if attempt == 0 {
                faith.passed_first_time = bad.is_empty();
            }
            if bad.is_empty() || attempt >= self.cfg.faithfulness_retries {
                break (note, gen.text);
            }
            attempt += 1;
            faith.regenerated = true;
            tracing::info!(thread = %input.thread.id, facts = ?bad, "output failed the faithfulness check; regenerating");
            if let Some(s) = &stream {
                let _ = s.send(StreamEvent::Restart(format!("not in the thread: {}", bad.join(", "))));
            }
            for f in bad {
                if !forbidden.contains(&f) {
                    forbidden.push(f);
                }
            }
        };
        let mut note = remove_unsupported(note, &prepared.support, &mut faith.removed_facts);
        note.summary = parse::limit_words(&parse::limit_sentences(&note.summary, 3), prepared.max_words as usize);
        let mut references = prepared.references;
        references::mark_in_summary(&mut references, note_texts(&note));
        timings.total_ms = start.elapsed().as_secs_f64() * 1e3;
        record_metrics(&timings, &faith);
        let summary = Summary {
            thread_id: input.thread.id,
            note,
            language: prepared.language,
            coverage: prepared.coverage,
            faithfulness: faith,
            references,
            model: self.llm.id().to_string(),
            timings,
            raw,
            cached: false,
        };
        if let (Some(key), Ok(mut notes)) = (key, self.notes.lock()) {
            // Checked under the notes lock, which `forget` holds while it marks
            // the writer: either the note is stored and then forgotten, or never stored.
            if writer.as_ref().is_none_or(|w| w.keeps()) {
                counting_bytes(&mut notes, |n| n.put(key, &summary));
            }
        }
        if let Some(w) = writer {
            w.finish(&summary);
        }
        Ok(summary)
    }

    /// The stored note for exactly this request (the thread unchanged since it
    /// was written), as served: what the server still answers when every
    /// request slot is taken.
    pub fn stored(&self, input: &SummarizeInput) -> Option<Summary> {
        let start = Instant::now();
        self.look_up(input).1.map(|s| served(s, start))
    }

    /// Forgets what is kept of a thread: its stored note, its cached prompt
    /// and answer (a data-deletion request, a closed chat). A summary of it
    /// being written now is still answered, but nothing of it is kept.
    pub async fn forget(&self, thread_id: &str) -> Result<Forgotten, SummarizeError> {
        if thread_id.is_empty() {
            return Err(thread::invalid("thread_id", "empty: name the thread to forget"));
        }
        let note = {
            let mut notes = self.notes.lock().unwrap_or_else(|e| e.into_inner());
            self.writing.lock().unwrap_or_else(|e| e.into_inner()).forget(thread_id);
            counting_bytes(&mut notes, |n| n.forget(thread_id))
        };
        // Nothing is cached before the model is loaded.
        let prompt = match self.llm.state() {
            crate::llm::ModelState::Ready { .. } => self.llm.forget(thread_id).await?,
            _ => false,
        };
        Ok(Forgotten { note, prompt })
    }

    /// The note key of a request whose thread has an id, and the note stored
    /// under it; counted as a hit or a miss.
    fn look_up(&self, input: &SummarizeInput) -> (Option<notes::Key>, Option<Summary>) {
        if self.cfg.note_cache_bytes == 0 || input.thread.id.is_empty() {
            return (None, None);
        }
        let key = notes::Key::of(input, self.llm.id(), &self.cfg);
        let stored = self.notes.lock().ok().and_then(|mut n| n.get(&input.thread.id, &key));
        let outcome = if stored.is_some() { "hit" } else { "miss" };
        crate::metrics::global().summarize_note_cache.with(&[outcome]).add(1);
        (Some(key), stored)
    }

    fn prepare(&self, input: &SummarizeInput) -> Result<Prepared, SummarizeError> {
        let language = match &input.language {
            Some(tag) => language::from_request(tag)?,
            None => language::detect(&input.thread),
        };
        let tok = self.llm.tokenizer();
        let count = |s: &str| tok.encode(s, false).map(|e| e.len()).unwrap_or(s.len() / 3 + 1);
        let msgs = &input.thread.messages;
        let cut = cut::fit(msgs, self.cfg.prompt_token_budget, &count);
        let ids = |idx: &mut dyn Iterator<Item = usize>| idx.map(|i| msgs[i].id.clone()).collect::<Vec<_>>();
        let coverage = Coverage {
            used_message_ids: ids(&mut cut.kept.iter().map(|k| k.index)),
            omitted_message_ids: ids(&mut cut.omitted.iter().copied()),
            shortened_message_ids: ids(&mut cut.kept.iter().filter(|k| k.shortened).map(|k| k.index)),
            truncated: cut.truncated(),
        };
        // One extraction serves the faithfulness check and the references.
        let facts: Vec<Vec<faithful::Fact>> = msgs.iter().map(|m| faithful::extract(&m.text)).collect();
        let support = faithful::Support::from_facts(facts.iter().flatten());
        Ok(Prepared {
            transcript: prompt::transcript(msgs, &cut, &language.tag),
            language,
            coverage,
            support,
            references: references::from_facts(msgs, &facts),
            max_words: input.max_words.unwrap_or(self.cfg.default_max_words),
            priority: input.priority,
        })
    }

    /// One generation; returns it with the time spent tokenizing the prompt.
    async fn generate(
        &self,
        thread_id: &str,
        p: &Prepared,
        forbidden: &[String],
        urgent: Option<&notes::Urgent>,
        stream: Option<&mpsc::UnboundedSender<StreamEvent>>,
    ) -> Result<(Generation, f64), SummarizeError> {
        let spec = prompt::PromptSpec {
            language_name: &p.language.name,
            language_tag: &p.language.tag,
            max_words: p.max_words,
            forbidden,
        };
        let (text, start) = prompt::build(&spec, &p.transcript);
        let tok = self.llm.tokenizer().clone();
        let t = Instant::now();
        let ids = tokio::task::spawn_blocking(move || tok.encode(text, false).map(|e| e.get_ids().to_vec()))
            .await
            .map_err(|e| SummarizeError::Internal(e.to_string()))?
            .map_err(|e| SummarizeError::Internal(format!("tokenizer: {e}")))?;
        let tok_ms = t.elapsed().as_secs_f64() * 1e3;

        let (priority, raise) = match urgent {
            Some(u) => {
                let (p, r) = u.attempt(p.priority);
                (p, Some(r))
            }
            None => (p.priority, None),
        };
        let params = GenerateParams {
            max_new_tokens: self.cfg.max_new_tokens,
            priority,
            raise,
            outline: self.outline.clone(),
            ..GenerateParams::default()
        };
        // A helpdesk summarises the same thread again after each message: its
        // cached prompt lets the model read only what is new.
        let conversation = (!thread_id.is_empty()).then(|| thread_id.to_string());
        let mut gen = match stream {
            None => self.llm.generate(ids, conversation, params, None).await?,
            Some(out) => {
                if !start.is_empty() {
                    let _ = out.send(StreamEvent::Text(start.clone()));
                }
                // Forward pieces as they come; the model thread never blocks on the client.
                let (tx, mut rx) = mpsc::unbounded_channel::<String>();
                let out2 = out.clone();
                let fwd = tokio::spawn(async move {
                    while let Some(piece) = rx.recv().await {
                        if out2.send(StreamEvent::Text(piece)).is_err() {
                            break;
                        }
                    }
                });
                let g = self.llm.generate(ids, conversation, params, Some(tx)).await;
                let _ = fwd.await;
                g?
            }
        };
        // The forced start is part of the answer.
        gen.text.insert_str(0, &start);
        Ok((gen, tok_ms))
    }
}

/// Runs `change` on the stored notes and adds the bytes it took or freed to
/// the gauge: by deltas, so that the gauge sums every summarizer in the
/// process (one in a server, several in the tests).
fn counting_bytes<R>(notes: &mut notes::NoteCache, change: impl FnOnce(&mut notes::NoteCache) -> R) -> R {
    let before = notes.bytes() as i64;
    let r = change(notes);
    crate::metrics::global().summarize_note_cache_bytes.with(&[]).add(notes.bytes() as i64 - before);
    r
}

/// A stored note as a response: no model work, so no prompt read, nothing
/// generated, no attempt; every prompt token counts as reused.
fn served(mut s: Summary, start: Instant) -> Summary {
    let prompt_tokens = s.timings.prompt_tokens;
    let total_ms = start.elapsed().as_secs_f64() * 1e3;
    s.timings = Timings { prompt_tokens, reused_prompt_tokens: prompt_tokens, total_ms, ..Timings::default() };
    s.cached = true;
    crate::metrics::global().summarize_seconds.with(&["total"]).observe(total_ms / 1e3);
    s
}

/// The note another request was writing for the same thread, as this
/// request's answer: that generation's numbers, this request's own tokenize
/// and total times; streamed as a stored note is.
fn joined(mut s: Summary, start: Instant, tokenize_ms: f64, stream: Option<&mpsc::UnboundedSender<StreamEvent>>) -> Summary {
    s.timings.tokenize_ms = tokenize_ms;
    s.timings.total_ms = start.elapsed().as_secs_f64() * 1e3;
    let m = crate::metrics::global();
    m.summarize_note_cache.with(&["joined"]).add(1);
    m.summarize_seconds.with(&["total"]).observe(s.timings.total_ms / 1e3);
    if let Some(out) = stream {
        // The preview went out before the wait.
        let _ = out.send(StreamEvent::Text(s.raw.clone()));
    }
    s
}

/// What a streaming caller receives for a stored note: the preview, then the
/// final attempt's text in one piece.
pub fn replay(s: &Summary) -> [StreamEvent; 2] {
    let mut references = s.references.clone();
    for r in &mut references {
        r.in_summary = false;
    }
    let preview = Preview { language: s.language.clone(), coverage: s.coverage.clone(), references, ahead: 0 };
    [StreamEvent::Preview(Box::new(preview)), StreamEvent::Text(s.raw.clone())]
}

fn note_texts(n: &Note) -> impl Iterator<Item = &str> {
    [n.summary.as_str(), n.customer_issue.as_str(), n.actions_taken.as_str()]
        .into_iter()
        .chain(n.next_steps.iter().map(String::as_str))
}

fn unsupported(n: &Note, support: &faithful::Support) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for t in note_texts(n) {
        for f in support.unsupported(t) {
            if !out.contains(&f.raw) {
                out.push(f.raw);
            }
        }
    }
    out
}

fn remove_unsupported(n: Note, support: &faithful::Support, removed: &mut Vec<String>) -> Note {
    let mut clean = |s: &str| {
        let (c, r) = faithful::remove_unsupported(s, support);
        removed.extend(r);
        c
    };
    let customer_issue = clean(&n.customer_issue);
    let mut summary = clean(&n.summary);
    if summary.is_empty() {
        // Every sentence carried an invented fact: fall back to the issue.
        summary = customer_issue.clone();
    }
    let actions_taken = clean(&n.actions_taken);
    let next_steps = n.next_steps.iter().map(|s| clean(s)).filter(|s| !s.is_empty()).collect();
    removed.dedup();
    Note { summary, customer_issue, actions_taken, status: n.status, next_steps }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parse::Status;

    #[test]
    fn invented_facts_are_removed_and_reported() {
        let support = faithful::Support::from_texts(["Meu pedido 558812 de R$ 259,90 não chegou"]);
        let note = Note {
            summary: "Pedido 558812 de R$ 259,90 não chegou. Foi prometido reembolso de R$ 300 até 20/12.".into(),
            customer_issue: "Pedido 558812 atrasado".into(),
            actions_taken: "Agente abriu o chamado 99812.".into(),
            status: Status::WaitingOnAgent,
            next_steps: vec!["Verificar a entrega do pedido 558812".into(), "Ligar para 11 4002-8922".into()],
        };
        assert_eq!(unsupported(&note, &support), vec!["300", "20/12", "99812", "11 4002-8922"]);
        let mut removed = Vec::new();
        let clean = remove_unsupported(note, &support, &mut removed);
        assert_eq!(clean.summary, "Pedido 558812 de R$ 259,90 não chegou.");
        assert_eq!(clean.actions_taken, "");
        assert_eq!(clean.next_steps, vec!["Verificar a entrega do pedido 558812"]);
        assert_eq!(removed, vec!["300", "20/12", "99812", "11 4002-8922"]);
        assert!(unsupported(&clean, &support).is_empty());
    }
}
