//! Notes already written, one per thread id. A helpdesk asks again for a
//! thread that has not changed: the note prepared in the background after the
//! last message, then the agent opening the chat; a page reload; a second
//! agent on the same chat. The note is a function of the request (greedy
//! decoding, the same model and settings), so the stored one is what the
//! model would write again, and serving it costs no model time.

use super::thread::SummarizeInput;
use super::{SummarizeConfig, Summary};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};

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
pub struct NoteCache {
    budget: usize,
    used: usize,
    clock: u64,
    by_thread: HashMap<String, Entry>,
    /// Last use -> thread id, oldest first.
    order: BTreeMap<u64, String>,
}

struct Entry {
    key: Key,
    summary: Summary,
    bytes: usize,
    used_at: u64,
}

impl NoteCache {
    /// `budget` bytes; 0 stores nothing.
    pub fn new(budget: usize) -> Self {
        Self { budget, used: 0, clock: 0, by_thread: HashMap::new(), order: BTreeMap::new() }
    }

    pub fn enabled(&self) -> bool {
        self.budget > 0
    }

    /// The note stored for this thread, if it was written for exactly this request.
    pub fn get(&mut self, thread_id: &str, key: &Key) -> Option<Summary> {
        self.clock += 1;
        let e = self.by_thread.get_mut(thread_id).filter(|e| e.key == *key)?;
        self.order.remove(&e.used_at);
        e.used_at = self.clock;
        self.order.insert(self.clock, thread_id.to_string());
        Some(e.summary.clone())
    }

    /// Stores a thread's note in place of its previous one. A note larger than
    /// the whole budget is not kept.
    pub fn put(&mut self, key: Key, summary: &Summary) {
        let id = summary.thread_id.clone();
        self.remove(&id);
        let bytes = size_of(summary);
        if id.is_empty() || bytes > self.budget {
            return;
        }
        while self.used + bytes > self.budget {
            let Some((_, oldest)) = self.order.pop_first() else { break };
            if let Some(e) = self.by_thread.remove(&oldest) {
                self.used -= e.bytes;
            }
        }
        self.clock += 1;
        self.used += bytes;
        self.order.insert(self.clock, id.clone());
        self.by_thread.insert(id, Entry { key, summary: summary.clone(), bytes, used_at: self.clock });
    }

    fn remove(&mut self, thread_id: &str) {
        if let Some(e) = self.by_thread.remove(thread_id) {
            self.order.remove(&e.used_at);
            self.used -= e.bytes;
        }
    }

    pub fn len(&self) -> usize {
        self.by_thread.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_thread.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.used
    }
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
