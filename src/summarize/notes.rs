//! Notes already written, one per thread id, and notes being written. A
//! helpdesk asks again for a thread that has not changed: the note prepared
//! in the background after the last message, then the agent opening the
//! chat; a page reload; a second agent on the same chat. The note is a
//! function of the request (greedy decoding, the same model and settings), so
//! the stored one is what the model would write again, and serving it costs
//! no model time; a request for a note still being written waits for it,
//! and raises it to interactive when an agent is the one waiting.

use super::thread::SummarizeInput;
use super::{SummarizeConfig, Summary};
use crate::llm::batching::Priority;
use crate::llm::Raise;
use sha2::{Digest, Sha256};
use crate::lru::Lru;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// Identifies everything a note depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key([u8; 32]);

impl Key {
    /// Every message field, the requested language and length, the model and
    /// the settings that shape an answer. Priority is left out: it changes when
    /// a note is written, not what it says.
    pub fn of(input: &SummarizeInput, model: &str, cfg: &SummarizeConfig) -> Self {
        let mut h = Sha256::new();
        // Length-prefixed, so that no two different requests hash the same bytes.
        let mut field = |bytes: &[u8]| {
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        field(model.as_bytes());
        for n in [cfg.prompt_token_budget, cfg.max_new_tokens, cfg.default_max_words as usize, cfg.faithfulness_retries as usize] {
            field(&(n as u64).to_le_bytes());
        }
        field(input.language.as_deref().unwrap_or("").as_bytes());
        field(&input.max_words.map_or(u64::MAX, u64::from).to_le_bytes());
        field(input.thread.id.as_bytes());
        for m in &input.thread.messages {
            field(m.id.as_bytes());
            field(&[m.role as u8]);
            field(&m.sent_at.map_or(i128::MAX, i128::from).to_le_bytes());
            field(m.text.as_bytes());
            field(m.channel.as_bytes());
        }
        Self(h.finalize().into())
    }
}

/// The latest note of each thread id, least recently used evicted first,
/// within a byte budget.
pub struct NoteCache(Lru<Entry>);

struct Entry {
    key: Key,
    summary: Summary,
}

impl NoteCache {
    /// `budget` bytes; 0 stores nothing.
    pub fn new(budget: usize) -> Self {
        Self(Lru::new(budget))
    }

    pub fn enabled(&self) -> bool {
        self.0.budget() > 0
    }

    /// The note stored for this thread, if it was written for exactly this request.
    pub fn get(&mut self, thread_id: &str, key: &Key) -> Option<Summary> {
        self.0.peek(thread_id).filter(|e| e.key == *key)?;
        self.0.get(thread_id).map(|e| e.summary.clone())
    }

    /// Stores a thread's note in place of its previous one. A note larger than
    /// the whole budget is not kept.
    pub fn put(&mut self, key: Key, summary: &Summary) {
        let id = summary.thread_id.clone();
        if id.is_empty() {
            return;
        }
        self.0.put(&id, Entry { key, summary: summary.clone() }, size_of(summary));
    }

    /// Drops the thread's note; whether there was one.
    pub fn forget(&mut self, thread_id: &str) -> bool {
        self.0.remove(thread_id).is_some()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.0.bytes()
    }
}

/// Notes being written, by thread id: one writer per version of a thread.
#[derive(Default)]
pub struct Writing {
    next_id: u64,
    by_thread: HashMap<String, Pending>,
}

struct Pending {
    key: Key,
    id: u64,
    done: watch::Receiver<Option<Summary>>,
    urgent: Arc<Urgent>,
    discard: Arc<AtomicBool>,
}

impl Writing {
    /// The thread was forgotten: its note being written is handed to those
    /// waiting for it but not stored, and later requests write their own.
    pub fn forget(&mut self, thread_id: &str) {
        if let Some(p) = self.by_thread.remove(thread_id) {
            p.discard.store(true, Ordering::SeqCst);
        }
    }
}

/// What a request whose note is not stored does.
pub enum Turn {
    /// The same note is being written: wait for it.
    Wait(Waiter),
    /// Write it; requests for the same note wait for this one.
    Write(Writer),
}

/// Whether someone waiting for a note wants it written as interactive, and
/// the writer's current generation to raise.
#[derive(Default)]
pub struct Urgent {
    wanted: AtomicBool,
    current: Mutex<Raise>,
}

impl Urgent {
    /// An agent waits for this note: its generation runs as interactive from
    /// the next pass, and so does a regeneration after a failed check.
    pub fn raise(&self) {
        self.wanted.store(true, Ordering::SeqCst);
        if let Ok(r) = self.current.lock() {
            r.ask();
        }
    }

    /// The priority and raise handle of the writer's next generation.
    pub fn attempt(&self, priority: Priority) -> (Priority, Raise) {
        let raise = Raise::new();
        if let Ok(mut c) = self.current.lock() {
            *c = raise.clone();
        }
        // After the swap: a raise that came before it is seen here, one that
        // comes after it asks the new handle.
        let priority = if self.wanted.load(Ordering::SeqCst) { Priority::Interactive } else { priority };
        (priority, raise)
    }
}

pub struct Waiter {
    done: watch::Receiver<Option<Summary>>,
    pub urgent: Arc<Urgent>,
}

impl Waiter {
    /// The note, or None when its writer failed or went away (the waiter
    /// then writes it itself).
    pub async fn note(mut self) -> Option<Summary> {
        loop {
            if let Some(s) = self.done.borrow_and_update().clone() {
                return Some(s);
            }
            if self.done.changed().await.is_err() {
                return self.done.borrow().clone();
            }
        }
    }
}

pub struct Writer {
    writing: Arc<Mutex<Writing>>,
    thread_id: String,
    id: u64,
    done: watch::Sender<Option<Summary>>,
    pub urgent: Arc<Urgent>,
    discard: Arc<AtomicBool>,
}

impl Writer {
    /// Whether its note is to be stored: not once the thread was forgotten.
    pub fn keeps(&self) -> bool {
        !self.discard.load(Ordering::SeqCst)
    }

    /// Hands the note to everyone waiting for it.
    pub fn finish(self, s: &Summary) {
        let _ = self.done.send(Some(s.clone()));
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let mut w = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        if w.by_thread.get(&self.thread_id).is_some_and(|p| p.id == self.id) {
            w.by_thread.remove(&self.thread_id);
        }
    }
}

/// Waits for the same note if it is being written, else becomes its writer
/// (replacing the writer of an older version of the thread, whose waiters
/// still get that version's note).
pub fn turn(writing: &Arc<Mutex<Writing>>, thread_id: &str, key: Key) -> Turn {
    let mut w = writing.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = w.by_thread.get(thread_id).filter(|p| p.key == key) {
        return Turn::Wait(Waiter { done: p.done.clone(), urgent: p.urgent.clone() });
    }
    w.next_id += 1;
    let id = w.next_id;
    let (tx, rx) = watch::channel(None);
    let urgent = Arc::new(Urgent::default());
    let discard = Arc::new(AtomicBool::new(false));
    w.by_thread.insert(thread_id.to_string(), Pending { key, id, done: rx, urgent: urgent.clone(), discard: discard.clone() });
    Turn::Write(Writer { writing: writing.clone(), thread_id: thread_id.to_string(), id, done: tx, urgent, discard })
}

/// Heap and inline bytes of a stored note, near enough for a budget: its
/// strings dominate, and serialising counts each of them once.
fn size_of(s: &Summary) -> usize {
    std::mem::size_of::<Entry>() + serde_json::to_vec(s).map_or(0, |v| v.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::batching::Priority;
    use crate::summarize::language::Language;
    use crate::summarize::parse::{Note, Status};
    use crate::summarize::thread::{Message, Role, Thread};
    use crate::summarize::{Coverage, Faithfulness, Timings};

    fn input(thread: &str, texts: &[&str]) -> SummarizeInput {
        let messages = texts
            .iter()
            .enumerate()
            .map(|(i, t)| Message { id: format!("m{i}"), role: Role::Customer, sent_at: Some(1_763_640_000), text: t.to_string(), channel: "whatsapp".into() })
            .collect();
        SummarizeInput { thread: Thread { id: thread.into(), messages }, language: None, max_words: None, priority: Priority::Interactive }
    }

    fn summary(thread: &str, text: &str) -> Summary {
        Summary {
            thread_id: thread.into(),
            note: Note { summary: text.into(), customer_issue: String::new(), actions_taken: String::new(), status: Status::Unknown, next_steps: vec![] },
            language: Language { tag: "en".into(), name: "English".into(), source: "detected" },
            coverage: Coverage { used_message_ids: vec![], omitted_message_ids: vec![], shortened_message_ids: vec![], truncated: false },
            faithfulness: Faithfulness::default(),
            references: vec![],
            model: "m".into(),
            timings: Timings::default(),
            raw: text.into(),
            cached: false,
        }
    }

    fn key(i: &SummarizeInput) -> Key {
        Key::of(i, "model", &SummarizeConfig::default())
    }

    fn write(t: Turn) -> Writer {
        match t {
            Turn::Write(w) => w,
            Turn::Wait(_) => panic!("expected to write"),
        }
    }

    fn wait(t: Turn) -> Waiter {
        match t {
            Turn::Wait(w) => w,
            Turn::Write(_) => panic!("expected to wait"),
        }
    }

    #[tokio::test]
    async fn a_note_being_written_is_waited_for_not_written_twice() {
        let writing = Arc::new(Mutex::new(Writing::default()));
        let (a, a2) = (key(&input("t", &["hello"])), key(&input("t", &["hello", "any news?"])));
        let first = write(turn(&writing, "t", a));
        let waiter = wait(turn(&writing, "t", a));
        // An agent waits: the writer's generations become interactive.
        assert_eq!(first.urgent.attempt(Priority::Background).0, Priority::Background);
        waiter.urgent.raise();
        let (p, raise) = first.urgent.attempt(Priority::Background);
        assert_eq!(p, Priority::Interactive);
        assert!(!raise.is_asked(), "a new generation starts interactive; nothing to raise");
        let (_, running) = first.urgent.attempt(Priority::Background);
        waiter.urgent.raise();
        assert!(running.is_asked(), "the running generation is raised");
        // The grown thread writes its own note; the older writer's waiters keep theirs.
        let second = write(turn(&writing, "t", a2));
        let waits = tokio::spawn(waiter.note());
        first.finish(&summary("t", "first"));
        assert_eq!(waits.await.unwrap().unwrap().note.summary, "first");
        assert!(matches!(turn(&writing, "t", a2), Turn::Wait(_)), "the older writer left the newer one's entry alone");
        // A writer that goes away without a note releases its waiters and its entry.
        let waiter = wait(turn(&writing, "t", a2));
        drop(second);
        assert!(waiter.note().await.is_none());
        drop(write(turn(&writing, "t", a2)));
        assert!(writing.lock().unwrap().by_thread.is_empty());
        // Forgetting the thread: the writer still answers its waiters, stores
        // nothing, and the next request writes its own note.
        let third = write(turn(&writing, "t", a2));
        let waiter = wait(turn(&writing, "t", a2));
        assert!(third.keeps());
        writing.lock().unwrap().forget("t");
        assert!(!third.keeps());
        let fresh = write(turn(&writing, "t", a2));
        third.finish(&summary("t", "third"));
        assert_eq!(waiter.note().await.unwrap().note.summary, "third");
        assert!(fresh.keeps());
    }

    #[test]
    fn every_field_that_shapes_a_note_changes_the_key() {
        let base = input("t", &["my order 4821 is late", "sorry"]);
        let k = key(&base);
        assert_eq!(k, key(&input("t", &["my order 4821 is late", "sorry"])));
        // Priority decides when, not what.
        assert_eq!(k, key(&SummarizeInput { priority: Priority::Background, ..base.clone() }));
        let mut changed = vec![
            input("t", &["my order 4821 is late", "sorry", "any news?"]),
            input("t", &["my order 4822 is late", "sorry"]),
            input("u", &["my order 4821 is late", "sorry"]),
            // Field boundaries count: the same bytes split differently.
            input("t", &["my order 4821 is latesorry", ""]),
            SummarizeInput { language: Some("pt".into()), ..base.clone() },
            SummarizeInput { max_words: Some(30), ..base.clone() },
        ];
        let mut edited = base.clone();
        edited.thread.messages[1].role = Role::Agent;
        changed.push(edited);
        let mut edited = base.clone();
        edited.thread.messages[0].id = "x".into();
        changed.push(edited);
        for c in &changed {
            assert_ne!(key(c), k, "{c:?}");
        }
        assert_ne!(Key::of(&base, "other-model", &SummarizeConfig::default()), k);
        let cfg = SummarizeConfig { max_new_tokens: 100, ..SummarizeConfig::default() };
        assert_ne!(Key::of(&base, "model", &cfg), k);
    }

    #[test]
    fn a_note_is_served_only_for_the_request_it_answered() {
        let mut c = NoteCache::new(1 << 20);
        let (a, a2) = (input("t", &["hello"]), input("t", &["hello", "order 99812?"]));
        assert!(c.get("t", &key(&a)).is_none());
        c.put(key(&a), &summary("t", "first"));
        assert_eq!(c.get("t", &key(&a)).unwrap().note.summary, "first");
        assert!(c.get("t", &key(&a2)).is_none(), "the thread grew: the old note is not its answer");
        // The grown thread's note replaces the old one.
        c.put(key(&a2), &summary("t", "second"));
        assert_eq!(c.len(), 1);
        assert!(c.get("t", &key(&a)).is_none());
        assert_eq!(c.get("t", &key(&a2)).unwrap().note.summary, "second");
        // No thread id, no entry: nothing could ask for it again.
        c.put(key(&input("", &["hi"])), &summary("", "anonymous"));
        assert_eq!(c.len(), 1);
        // Forgotten: gone, its bytes returned.
        assert!(c.forget("t") && !c.forget("t"));
        assert!(c.get("t", &key(&a2)).is_none());
        assert_eq!((c.len(), c.bytes()), (0, 0));
    }

    #[test]
    fn the_least_recently_used_note_goes_first_and_the_budget_holds() {
        let one = size_of(&summary("t0", "a note of some length"));
        let mut c = NoteCache::new(3 * one + one / 2);
        let keys: Vec<Key> = (0..4).map(|i| key(&input(&format!("t{i}"), &["x"]))).collect();
        for (i, k) in keys.iter().take(3).enumerate() {
            c.put(*k, &summary(&format!("t{i}"), "a note of some length"));
        }
        assert_eq!(c.len(), 3);
        // t0 is read, so t1 is now the oldest.
        assert!(c.get("t0", &keys[0]).is_some());
        c.put(keys[3], &summary("t3", "a note of some length"));
        assert_eq!(c.len(), 3);
        assert!(c.get("t1", &keys[1]).is_none());
        for i in [0, 2, 3] {
            assert!(c.get(&format!("t{i}"), &keys[i]).is_some(), "t{i}");
        }
        assert!(c.bytes() <= 3 * one + one / 2);
        // A note larger than the whole budget is not kept, and evicts nothing.
        c.put(key(&input("big", &["x"])), &summary("big", &"long ".repeat(one)));
        assert_eq!(c.len(), 3);
        // Budget 0: off.
        let mut off = NoteCache::new(0);
        assert!(!off.enabled());
        off.put(keys[0], &summary("t0", "x"));
        assert!(off.is_empty());
    }
}
