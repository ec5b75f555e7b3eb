//! The thread as the summarizer sees it, and the checks every request passes
//! before any work is queued.

use super::{Limits, SummarizeError};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Customer,
    Agent,
    Bot,
    System,
}

impl Role {
    /// How the role is labelled in the transcript shown to the model.
    pub fn label(self) -> &'static str {
        match self {
            Role::Customer => "Customer",
            Role::Agent => "Agent",
            Role::Bot => "Bot",
            Role::System => "System",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Message {
    /// The caller's id, or `#N` (the 0-based position) when it sent none.
    pub id: String,
    pub role: Role,
    /// Unix seconds, when given.
    pub sent_at: Option<i64>,
    pub text: String,
    pub channel: String,
}

#[derive(Debug, Clone)]
pub struct Thread {
    pub id: String,
    pub messages: Vec<Message>,
}

#[derive(Debug, Clone)]
pub struct SummarizeInput {
    pub thread: Thread,
    /// BCP-47 tag asked for, if any.
    pub language: Option<String>,
    pub max_words: Option<u32>,
    /// Interactive (an agent waits) or background (a note prepared ahead).
    pub priority: crate::llm::batching::Priority,
}

/// 2000-01-01T00:00:00Z: nothing in a helpdesk is older.
const MIN_TIMESTAMP: i64 = 946_684_800;
/// Clock skew tolerated for timestamps in the future.
const MAX_FUTURE_SECS: i64 = 24 * 3600;

pub fn invalid(field: impl Into<String>, msg: impl Into<String>) -> SummarizeError {
    SummarizeError::InvalidArgument { field: field.into(), msg: msg.into() }
}

/// Checks limits and consistency; the error names the offending field and the limit.
pub fn validate(input: &SummarizeInput, limits: &Limits, now_unix: i64) -> Result<(), SummarizeError> {
    let msgs = &input.thread.messages;
    if msgs.is_empty() {
        return Err(invalid("thread.messages", "the thread has no messages"));
    }
    if msgs.len() > limits.max_messages {
        return Err(invalid(
            "thread.messages",
            format!("{} messages; the limit is {} (--max-messages)", msgs.len(), limits.max_messages),
        ));
    }
    let mut total = 0usize;
    let mut prev: Option<(usize, i64)> = None;
    for (i, m) in msgs.iter().enumerate() {
        let field = |f: &str| format!("thread.messages[{i}].{f}");
        if m.text.trim().is_empty() {
            return Err(invalid(field("text"), "the message has no text"));
        }
        let chars = m.text.chars().count();
        if chars > limits.max_message_chars {
            return Err(invalid(
                field("text"),
                format!("{chars} characters; the limit is {} (--max-message-chars)", limits.max_message_chars),
            ));
        }
        total += chars;
        if let Some(t) = m.sent_at {
            if t < MIN_TIMESTAMP {
                return Err(invalid(field("sent_at"), format!("{t} is before 2000-01-01")));
            }
            if t > now_unix + MAX_FUTURE_SECS {
                return Err(invalid(field("sent_at"), "more than 24 hours in the future"));
            }
            if let Some((j, pt)) = prev {
                if t < pt {
                    return Err(invalid(
                        field("sent_at"),
                        format!("earlier than thread.messages[{j}].sent_at; messages must be oldest first"),
                    ));
                }
            }
            prev = Some((i, t));
        }
    }
    if total > limits.max_thread_chars {
        return Err(invalid(
            "thread.messages",
            format!("{total} characters in all; the limit is {} (--max-thread-chars)", limits.max_thread_chars),
        ));
    }
    if let Some(w) = input.max_words {
        if !(limits.min_words..=limits.max_words).contains(&w) {
            return Err(invalid(
                "max_words",
                format!("{w} is outside {}..={} (0 means the default)", limits.min_words, limits.max_words),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: Role, text: &str, t: Option<i64>) -> Message {
        Message { id: String::new(), role, sent_at: t, text: text.into(), channel: String::new() }
    }
    fn input(messages: Vec<Message>) -> SummarizeInput {
        SummarizeInput { thread: Thread { id: "t".into(), messages }, language: None, max_words: None, priority: Default::default() }
    }
    const NOW: i64 = 1_763_700_000;

    fn field_of(r: Result<(), SummarizeError>) -> String {
        match r {
            Err(SummarizeError::InvalidArgument { field, .. }) => field,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn accepts_a_normal_thread() {
        let i = input(vec![msg(Role::Customer, "oi", Some(NOW - 60)), msg(Role::Agent, "olá", Some(NOW))]);
        assert!(validate(&i, &Limits::default(), NOW).is_ok());
    }

    #[test]
    fn names_the_offending_field() {
        let l = Limits::default();
        assert_eq!(field_of(validate(&input(vec![]), &l, NOW)), "thread.messages");
        let blank = input(vec![msg(Role::Customer, "hi", None), msg(Role::Agent, "  ", None)]);
        assert_eq!(field_of(validate(&blank, &l, NOW)), "thread.messages[1].text");
        let order = input(vec![msg(Role::Customer, "a", Some(NOW)), msg(Role::Agent, "b", Some(NOW - 5))]);
        assert_eq!(field_of(validate(&order, &l, NOW)), "thread.messages[1].sent_at");
        let old = input(vec![msg(Role::Customer, "a", Some(10))]);
        assert_eq!(field_of(validate(&old, &l, NOW)), "thread.messages[0].sent_at");
        let future = input(vec![msg(Role::Customer, "a", Some(NOW + 3 * 86_400))]);
        assert_eq!(field_of(validate(&future, &l, NOW)), "thread.messages[0].sent_at");
        let mut words = input(vec![msg(Role::Customer, "a", None)]);
        words.max_words = Some(100_000);
        assert_eq!(field_of(validate(&words, &l, NOW)), "max_words");
    }

    #[test]
    fn enforces_size_limits() {
        let l = Limits { max_messages: 2, max_message_chars: 5, max_thread_chars: 8, ..Limits::default() };
        let many = input((0..3).map(|_| msg(Role::Customer, "a", None)).collect());
        assert_eq!(field_of(validate(&many, &l, NOW)), "thread.messages");
        let long = input(vec![msg(Role::Customer, "abcdefg", None)]);
        assert_eq!(field_of(validate(&long, &l, NOW)), "thread.messages[0].text");
        let total = input(vec![msg(Role::Customer, "abcde", None), msg(Role::Agent, "abcde", None)]);
        assert_eq!(field_of(validate(&total, &l, NOW)), "thread.messages");
    }
}
