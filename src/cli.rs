//! The JSON thread format of `palaver summarize FILE`, converted to the same
//! wire request the gRPC service takes, so both paths validate alike.

use crate::proto::v1 as pb;
use serde::Deserialize;
use std::str::FromStr;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThreadJson {
    #[serde(default)]
    pub thread_id: String,
    /// BCP-47; empty or absent: the thread's own language.
    #[serde(default)]
    pub language: String,
    #[serde(default)]
    pub max_words: u32,
    pub messages: Vec<MessageJson>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageJson {
    #[serde(default)]
    pub id: String,
    /// customer, agent, bot or system.
    pub role: String,
    /// RFC 3339, e.g. "2026-11-20T14:03:00Z".
    #[serde(default)]
    pub sent_at: Option<String>,
    pub text: String,
    #[serde(default)]
    pub channel: String,
}

impl ThreadJson {
    pub fn into_request(self) -> Result<pb::SummarizeRequest, String> {
        let messages = self
            .messages
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                let role = match m.role.to_ascii_lowercase().as_str() {
                    "customer" => pb::Role::Customer,
                    "agent" => pb::Role::Agent,
                    "bot" => pb::Role::Bot,
                    "system" => pb::Role::System,
                    other => return Err(format!("messages[{i}].role: `{other}` is not customer, agent, bot or system")),
                };
                let sent_at = m
                    .sent_at
                    .map(|s| prost_types::Timestamp::from_str(&s).map_err(|e| format!("messages[{i}].sent_at: {e}")))
                    .transpose()?;
                Ok(pb::Message { id: m.id, role: role as i32, sent_at, text: m.text, channel: m.channel })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(pb::SummarizeRequest {
            thread: Some(pb::Thread { thread_id: self.thread_id, messages }),
            language: self.language,
            max_words: self.max_words,
            ..Default::default()
        })
    }
}
