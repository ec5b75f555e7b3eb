//! The one place where errors become gRPC statuses.

use crate::summarize::SummarizeError;
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

/// tonic answers an over-size request with OUT_OF_RANGE; gRPC's convention (and
/// what clients retry on) is RESOURCE_EXHAUSTED, with the limit named.
pub fn remap_oversize<B>(mut resp: http::Response<B>) -> http::Response<B> {
    let h = resp.headers();
    let is_oversize = h.get("grpc-status").is_some_and(|v| v == "11")
        && h.get("grpc-message").and_then(|v| v.to_str().ok()).is_some_and(|m| m.contains("too large"));
    if is_oversize {
        let msg = h.get("grpc-message").and_then(|v| v.to_str().ok()).unwrap_or_default();
        let msg = format!("request: {} (--max-request-bytes)", percent_decode(msg).replace("Error, decoded ", ""));
        let headers = resp.headers_mut();
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
        if let Ok(v) = http::HeaderValue::from_str(&msg.replace('%', "%25")) {
            headers.insert("grpc-message", v);
        }
    }
    resp
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
