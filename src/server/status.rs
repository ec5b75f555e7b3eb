//! The one place where errors become gRPC statuses.

use crate::intent::IntentError;
use crate::summarize::SummarizeError;
use http::HeaderMap;
use tonic::{Code, Status};

impl From<SummarizeError> for Status {
    fn from(e: SummarizeError) -> Self {
        let code = match &e {
            SummarizeError::InvalidArgument { .. } => Code::InvalidArgument,
            SummarizeError::ResourceExhausted(_) => Code::ResourceExhausted,
            SummarizeError::Unavailable(_) => Code::Unavailable,
            SummarizeError::Cancelled => Code::Cancelled,
            SummarizeError::Internal(_) => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}

impl From<IntentError> for Status {
    fn from(e: IntentError) -> Self {
        use crate::encoder::EncoderError;
        match &e {
            IntentError::InvalidArgument { .. } => Status::invalid_argument(e.to_string()),
            IntentError::NotFound { .. } => Status::not_found(e.to_string()),
            IntentError::Unavailable(_) | IntentError::Encoder(EncoderError::Load(_) | EncoderError::WorkerGone) => {
                Status::unavailable(e.to_string())
            }
            IntentError::Store(_) | IntentError::Encoder(_) => Status::internal(e.to_string()),
        }
    }
}

impl From<crate::sendtime::SendTimeError> for Status {
    fn from(e: crate::sendtime::SendTimeError) -> Self {
        use crate::sendtime::SendTimeError as E;
        let code = match &e {
            E::Invalid { .. } => Code::InvalidArgument,
            E::UnknownContact(_) => Code::NotFound,
            E::Overloaded(_) => Code::ResourceExhausted,
            E::WriterGone => Code::Unavailable,
            E::Store(_) => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}

/// tonic answers an over-size request with OUT_OF_RANGE, in the headers or the
/// trailers; gRPC's convention (and what clients back off on) is
/// RESOURCE_EXHAUSTED, and the message should name the flag that sets the limit.
pub(super) fn remap_oversize(h: &mut HeaderMap) {
    let msg = match h.get("grpc-message").and_then(|v| v.to_str().ok()) {
        Some(m) if h.get("grpc-status").is_some_and(|v| v == "11") && (m.contains("too%20large") || m.contains("too large")) => {
            percent_decode(m)
        }
        _ => return,
    };
    let msg = format!("request: {} (--max-request-bytes)", msg.replace("Error, decoded ", ""));
    h.insert("grpc-status", http::HeaderValue::from_static("8"));
    if let Ok(v) = http::HeaderValue::from_str(&msg.replace('%', "%25")) {
        h.insert("grpc-message", v);
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
