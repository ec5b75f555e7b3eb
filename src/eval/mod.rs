//! `palaver eval summaries`: ROUGE against human summaries (TweetSumm) and a
//! count of invented facts, through the same pipeline the service runs.

use crate::summarize::thread::{Message, Role, SummarizeInput, Thread};
pub mod intent;
pub mod sendtime;

use serde::Deserialize;
use std::collections::HashMap;

#[derive(Debug, Deserialize)]
pub struct TweetSummDialog {
    pub conversation_id: String,
    /// Missing (null) on a few dialogs; those are skipped by the evaluation.
    #[serde(default)]
    pub abstractive_summaries: Option<Vec<String>>,
    /// Missing (null) where the tweet text could not be joined; skipped too.
    #[serde(default)]
    pub turns_exact: Option<Vec<Turn>>,
}

#[derive(Debug, Deserialize)]
pub struct Turn {
    pub speaker: String,
    pub text: String,
}

impl TweetSummDialog {
    /// Has both the dialog text and at least one human summary.
    pub fn usable(&self) -> bool {
        self.turns_exact.as_ref().is_some_and(|t| !t.is_empty())
            && self.abstractive_summaries.as_ref().is_some_and(|s| !s.is_empty())
    }

    pub fn to_input(&self) -> SummarizeInput {
        let messages = self
            .turns_exact
            .iter()
            .flatten()
            // Media-only tweets have no text left; a helpdesk would not send them either.
            .filter(|t| !t.text.trim().is_empty())
            .enumerate()
            .map(|(i, t)| Message {
                id: format!("{i}"),
                role: if t.speaker.eq_ignore_ascii_case("customer") { Role::Customer } else { Role::Agent },
                sent_at: None,
                text: t.text.clone(),
                channel: "twitter".into(),
            })
            .collect();
        SummarizeInput { thread: Thread { id: self.conversation_id.clone(), messages }, language: None, max_words: None, priority: Default::default() }
    }
}

/// A long thread for benchmarks: consecutive dialogs from `dialogs[start..]`
/// joined until the messages reach about `target` tokens under `count`.
pub fn long_thread(dialogs: &[TweetSummDialog], start: usize, target: usize, count: impl Fn(&str) -> usize) -> SummarizeInput {
    let mut input = dialogs[start % dialogs.len()].to_input();
    input.thread.messages.clear();
    let mut n = 0;
    for d in dialogs.iter().cycle().skip(start) {
        for mut m in d.to_input().thread.messages {
            n += count(&m.text) + 4; // a role label and a newline per message
            m.id = input.thread.messages.len().to_string();
            input.thread.messages.push(m);
            if n >= target {
                return input;
            }
        }
    }
    input
}

/// `input` as a thread the service has never seen: id `id` and a first message
/// of its own, so that a benchmark repeating one thread reuses only the
/// instructions before the transcript, never the transcript itself.
pub fn as_new_thread(input: &SummarizeInput, id: &str) -> SummarizeInput {
    let mut x = input.clone();
    x.thread.id = id.to_string();
    if let Some(m) = x.thread.messages.first_mut() {
        m.text = format!("Hi, this is chat {id}. {}", m.text);
    }
    x
}

/// `input` after one more ~30-token customer message (id `new-{tag}`): what a
/// helpdesk re-summarises.
pub fn grown(input: &SummarizeInput, tag: &str) -> SummarizeInput {
    let mut x = input.clone();
    let customer = x.thread.messages.iter().find(|m| m.role == Role::Customer);
    let mut m = customer.or(x.thread.messages.last()).cloned().expect("a thread has messages");
    m.role = Role::Customer;
    m.id = format!("new-{tag}");
    m.text = "Still nothing arrived today. Can you send me the tracking link or refund me, please?".into();
    x.thread.messages.push(m);
    x
}

/// Lower-cased alphanumeric tokens (no stemming, no stop-word removal).
pub fn tokens(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(str::to_lowercase).collect()
}

fn f1(overlap: usize, cand: usize, refr: usize) -> f64 {
    if overlap == 0 || cand == 0 || refr == 0 {
        return 0.0;
    }
    let p = overlap as f64 / cand as f64;
    let r = overlap as f64 / refr as f64;
    2.0 * p * r / (p + r)
}

fn ngram_counts(t: &[String], n: usize) -> HashMap<&[String], usize> {
    let mut m = HashMap::new();
    for w in t.windows(n) {
        *m.entry(w).or_insert(0) += 1;
    }
    m
}

/// ROUGE-N F1 with clipped counts.
pub fn rouge_n(cand: &[String], refr: &[String], n: usize) -> f64 {
    let (c, r) = (ngram_counts(cand, n), ngram_counts(refr, n));
    let overlap: usize = c.iter().map(|(g, k)| (*k).min(*r.get(g).unwrap_or(&0))).sum();
    f1(overlap, cand.len().saturating_sub(n - 1), refr.len().saturating_sub(n - 1))
}

/// ROUGE-L F1 (longest common subsequence).
pub fn rouge_l(cand: &[String], refr: &[String]) -> f64 {
    let mut dp = vec![vec![0usize; refr.len() + 1]; cand.len() + 1];
    for i in 1..=cand.len() {
        for j in 1..=refr.len() {
            dp[i][j] = if cand[i - 1] == refr[j - 1] { dp[i - 1][j - 1] + 1 } else { dp[i - 1][j].max(dp[i][j - 1]) };
        }
    }
    f1(dp[cand.len()][refr.len()], cand.len(), refr.len())
}

/// (R1, R2, RL) F1 of `cand`, each the best over the references.
pub fn rouge(cand: &str, refs: &[String]) -> (f64, f64, f64) {
    let c = tokens(cand);
    let mut best = (0.0f64, 0.0f64, 0.0f64);
    for r in refs {
        let r = tokens(r);
        best.0 = best.0.max(rouge_n(&c, &r, 1));
        best.1 = best.1.max(rouge_n(&c, &r, 2));
        best.2 = best.2.max(rouge_l(&c, &r));
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rouge_matches_hand_computed_values() {
        let refs = vec!["the cat sat on the mat".to_string()];
        let (r1, r2, rl) = rouge("the cat sat on the mat", &refs);
        assert!((r1 - 1.0).abs() < 1e-9 && (r2 - 1.0).abs() < 1e-9 && (rl - 1.0).abs() < 1e-9);
        // cand: "the cat was on the mat" -> unigram overlap 5/6, bigrams 3/5, LCS 5.
        let (r1, r2, rl) = rouge("The cat was on the mat.", &refs);
        assert!((r1 - 5.0 / 6.0).abs() < 1e-9, "{r1}");
        assert!((r2 - 0.6).abs() < 1e-9, "{r2}");
        assert!((rl - 5.0 / 6.0).abs() < 1e-9, "{rl}");
        assert_eq!(rouge("", &refs), (0.0, 0.0, 0.0));
    }
}

/// A thread of `tests/data/multilingual_threads.jsonl`: support chats written by
/// the palaver team, each with the language its note must be in, one id or
/// amount the note must keep, and the status the team reads in it.
#[derive(Debug, Deserialize)]
pub struct LabelledThread {
    pub thread_id: String,
    pub expected_language: String,
    pub must_keep: String,
    /// `waiting_on_agent`, `waiting_on_customer` or `resolved`.
    pub expected_status: String,
    pub messages: Vec<crate::cli::MessageJson>,
}

impl LabelledThread {
    pub fn request(&self) -> Result<crate::proto::v1::SummarizeRequest, String> {
        let (thread_id, messages) = (self.thread_id.clone(), self.messages.clone());
        crate::cli::ThreadJson { thread_id, language: String::new(), max_words: 0, messages }.into_request()
    }
}

/// What the multilingual check scores for one note.
#[derive(Debug, Clone)]
pub struct NoteCheck {
    pub in_language: bool,
    pub complete: bool,
    pub kept: bool,
    /// The id is among the thread's references shown beside the note.
    pub referenced: bool,
    /// The note's status as the prompt names it (`waiting_on_agent`...).
    pub status: String,
    pub status_right: bool,
    pub passed_first_time: bool,
}

pub fn check_note(s: &crate::summarize::Summary, t: &LabelledThread) -> NoteCheck {
    let (expected_language, must_keep) = (t.expected_language.as_str(), t.must_keep.as_str());
    let n = &s.note;
    let status = serde_json::to_value(n.status).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
    let mut text = vec![n.summary.clone(), n.customer_issue.clone(), n.actions_taken.clone()];
    text.extend(n.next_steps.iter().cloned());
    let text = text.join("\n");
    NoteCheck {
        in_language: s.language.tag == expected_language
            && crate::summarize::language::detect_text(&text).as_deref() == Some(expected_language),
        complete: !n.summary.is_empty() && !n.customer_issue.is_empty() && !n.next_steps.is_empty(),
        kept: text.contains(must_keep),
        referenced: s.references.iter().any(|r| r.text.contains(must_keep)),
        status_right: status == t.expected_status,
        status,
        passed_first_time: s.faithfulness.passed_first_time,
    }
}
