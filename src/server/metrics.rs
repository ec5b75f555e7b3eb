//! The metrics' two ends in the server: a tower layer that counts every gRPC
//! call by method and final status code and times it to the end of its
//! response (a stream's end, not its first byte), and a plain HTTP listener
//! that answers `GET /metrics` for Prometheus.

use super::status::remap_oversize;
use crate::metrics;
use http::HeaderMap;
use http_body::{Body, Frame};
use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Wraps the router: see [`Observe`].
#[derive(Clone, Copy, Default)]
pub struct ObserveLayer;

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = Observe<S>;
    fn layer(&self, inner: S) -> Observe<S> {
        Observe { inner }
    }
}

/// Counts and times each call; also rewrites tonic's over-size status
/// (`status::remap_oversize`), in the headers or the trailers.
#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
}

type Resp = http::Response<tonic::body::Body>;

impl<S, B> tower::Service<http::Request<B>> for Observe<S>
where
    S: tower::Service<http::Request<B>, Response = Resp> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Resp;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Resp, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let call = Call { method: method_label(req.uri().path()), start: Instant::now() };
        let fut = self.inner.call(req);
        Box::pin(async move { Ok(observe(fut.await?, call)) })
    }
}

/// One call being timed.
struct Call {
    method: &'static str,
    start: Instant,
}

impl Call {
    fn finish(&self, code: &str) {
        let m = metrics::global();
        m.requests.with(&[self.method, code]).add(1);
        m.request_seconds.with(&[self.method]).observe_duration(self.start.elapsed());
    }
}

fn observe(mut resp: Resp, call: Call) -> Resp {
    remap_oversize(resp.headers_mut());
    // A status in the headers is a trailers-only response: the call is over.
    if let Some(code) = code_name(resp.headers()) {
        call.finish(code);
        return resp;
    }
    resp.map(|b| tonic::body::Body::new(Observed { inner: b, call: Some(call) }))
}

/// The response body, watched for the trailers that carry the status.
struct Observed {
    inner: tonic::body::Body,
    /// Taken when the call is recorded.
    call: Option<Call>,
}

impl Body for Observed {
    type Data = <tonic::body::Body as Body>::Data;
    type Error = <tonic::body::Body as Body>::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match polled {
            Poll::Ready(Some(Ok(mut frame))) => {
                if let Some(t) = frame.trailers_mut() {
                    remap_oversize(t);
                    let code = code_name(t).unwrap_or("Unknown");
                    if let Some(call) = self.call.take() {
                        call.finish(code);
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                if let Some(call) = self.call.take() {
                    call.finish("Unknown");
                }
                Poll::Ready(None)
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Observed {
    /// The body went away before its trailers: the client cancelled.
    fn drop(&mut self) {
        if let Some(call) = self.call.take() {
            call.finish("Cancelled");
        }
    }
}

/// gRPC's name of the status code in `grpc-status`, if there is one.
fn code_name(h: &HeaderMap) -> Option<&'static str> {
    let code = tonic::Code::from_bytes(h.get("grpc-status")?.as_bytes());
    Some(match code {
        tonic::Code::Ok => "OK",
        tonic::Code::Cancelled => "Cancelled",
        tonic::Code::Unknown => "Unknown",
        tonic::Code::InvalidArgument => "InvalidArgument",
        tonic::Code::DeadlineExceeded => "DeadlineExceeded",
        tonic::Code::NotFound => "NotFound",
        tonic::Code::AlreadyExists => "AlreadyExists",
        tonic::Code::PermissionDenied => "PermissionDenied",
        tonic::Code::ResourceExhausted => "ResourceExhausted",
        tonic::Code::FailedPrecondition => "FailedPrecondition",
        tonic::Code::Aborted => "Aborted",
        tonic::Code::OutOfRange => "OutOfRange",
        tonic::Code::Unimplemented => "Unimplemented",
        tonic::Code::Internal => "Internal",
        tonic::Code::Unavailable => "Unavailable",
        tonic::Code::DataLoss => "DataLoss",
        tonic::Code::Unauthenticated => "Unauthenticated",
    })
}

/// The method's path if the server has such a method, else "unknown": a
/// client's made-up paths must not each become a series.
fn method_label(path: &str) -> &'static str {
    static KNOWN: LazyLock<HashSet<String>> = LazyLock::new(|| {
        use prost::Message;
        let mut known = HashSet::new();
        for set in [crate::proto::FILE_DESCRIPTOR_SET, tonic_health::pb::FILE_DESCRIPTOR_SET, tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET] {
            let Ok(set) = prost_types::FileDescriptorSet::decode(set) else { continue };
            for file in set.file {
                for service in &file.service {
                    for method in &service.method {
                        known.insert(format!("/{}.{}/{}", file.package(), service.name(), method.name()));
                    }
                }
            }
        }
        known
    });
    KNOWN.get(path).map_or("unknown", String::as_str)
}

/// A request line and headers larger than this are refused.
const MAX_REQUEST_HEAD: usize = 8 << 10;
/// A scraper that sends nothing for this long is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Answers `GET /metrics` (the Prometheus text format) until `shutdown`.
/// Plain HTTP/1.1, one request per connection, no authentication: bind it to
/// localhost or a private interface.
pub async fn serve_metrics(listener: TcpListener, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((conn, _)) => {
                    tokio::spawn(async move {
                        if let Err(e) = answer(conn).await {
                            tracing::debug!(error = %e, "metrics connection");
                        }
                    });
                }
                // Out of file descriptors and the like: wait, do not spin.
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

async fn answer(mut conn: TcpStream) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let end = loop {
        if let Some(p) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break Some(p);
        }
        if head.len() > MAX_REQUEST_HEAD {
            break None;
        }
        let n = tokio::time::timeout(READ_TIMEOUT, conn.read(&mut buf)).await.map_err(|_| std::io::ErrorKind::TimedOut)??;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    };
    let (status, content_type, body) = if end.is_none_or(|p| p > MAX_REQUEST_HEAD) {
        ("431 Request Header Fields Too Large", "text/plain", "request head over 8 KiB\n".to_string())
    } else {
        route(std::str::from_utf8(&head).unwrap_or("").lines().next().unwrap_or(""))
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(reply.as_bytes()).await?;
    conn.shutdown().await
}

/// Status, content type and body for a request line.
fn route(request_line: &str) -> (&'static str, &'static str, String) {
    let mut parts = request_line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if !parts.next().is_some_and(|v| v.starts_with("HTTP/1.")) {
        return ("400 Bad Request", "text/plain", "expected an HTTP/1.x request line\n".into());
    }
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", metrics::global().render()),
        (_, "/metrics") => ("405 Method Not Allowed", "text/plain", "only GET /metrics\n".into()),
        _ => ("404 Not Found", "text/plain", "metrics are at GET /metrics\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_are_labelled_by_path_only_when_the_server_has_them() {
        assert_eq!(method_label("/palaver.v1.Assist/Summarize"), "/palaver.v1.Assist/Summarize");
        assert_eq!(method_label("/palaver.v1.Engagement/ScoreContacts"), "/palaver.v1.Engagement/ScoreContacts");
        assert_eq!(method_label("/grpc.health.v1.Health/Check"), "/grpc.health.v1.Health/Check");
        assert_eq!(method_label("/palaver.v1.Assist/Made-Up-1"), "unknown");
        assert_eq!(method_label("/"), "unknown");
    }

    #[test]
    fn codes_are_named_as_grpc_names_them() {
        let mut h = HeaderMap::new();
        assert_eq!(code_name(&h), None);
        h.insert("grpc-status", http::HeaderValue::from_static("8"));
        assert_eq!(code_name(&h), Some("ResourceExhausted"));
        h.insert("grpc-status", http::HeaderValue::from_static("0"));
        assert_eq!(code_name(&h), Some("OK"));
    }

    async fn get(addr: std::net::SocketAddr, request: &[u8]) -> String {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(request).await.unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn the_listener_serves_the_text_format_and_refuses_the_rest() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_metrics(listener, async {
            let _ = stopped.await;
        }));
        metrics::global().contacts_scored.with(&[]).add(1);
        let ok = get(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("Content-Type: text/plain; version=0.0.4"));
        let (head, body) = ok.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        assert!(body.contains("# TYPE palaver_requests_total counter"));
        let scored = body.lines().find_map(|l| l.strip_prefix("palaver_contacts_scored_total ")).unwrap();
        assert!(scored.parse::<u64>().unwrap() >= 1);

        assert!(get(addr, b"GET /other HTTP/1.1\r\n\r\n").await.starts_with("HTTP/1.1 404"));
        assert!(get(addr, b"POST /metrics HTTP/1.1\r\n\r\n").await.starts_with("HTTP/1.1 405"));
        assert!(get(addr, b"hello\r\n\r\n").await.starts_with("HTTP/1.1 400"));
        let huge = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_REQUEST_HEAD + 10));
        assert!(get(addr, huge.as_bytes()).await.starts_with("HTTP/1.1 431"));

        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server).await.expect("stops on shutdown").unwrap();
    }
}
