//! Prometheus metrics scraped over HTTP after real gRPC calls. The registry is
//! the process's, shared with the suites running beside this one, so every
//! check compares a scrape after the calls with one before and asks for at
//! least what these calls add.

use crate::common::fixture_server;
use palaver::models;
use palaver::proto::v1::{self as pb, classify_intent_request::Input, summarize_chunk::Chunk};
use std::collections::HashMap;

async fn scrape(addr: std::net::SocketAddr) -> HashMap<String, f64> {
    let text = crate::common::http_get(addr, "/metrics").await;
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {l}"));
            (series.to_string(), value.parse::<f64>().unwrap_or_else(|e| panic!("{l}: {e}")))
        })
        .collect()
}

fn grew(before: &HashMap<String, f64>, after: &HashMap<String, f64>, series: &str, at_least: f64) {
    let (b, a) = (before.get(series).copied().unwrap_or(0.0), after.get(series).copied());
    let a = a.unwrap_or_else(|| panic!("no series {series}"));
    assert!(a - b >= at_least, "{series}: {b} -> {a}, expected at least +{at_least}");
}

fn thread(id: &str) -> pb::SummarizeRequest {
    let m = |i: usize, role: pb::Role, text: &str| pb::Message { id: i.to_string(), role: role as i32, text: text.into(), ..Default::default() };
    pb::SummarizeRequest {
        thread: Some(pb::Thread {
            thread_id: id.into(),
            messages: vec![
                m(0, pb::Role::Customer, &format!("Hi, my parcel {id} never arrived.")),
                m(1, pb::Role::Agent, "Sorry! I opened a claim with the courier."),
            ],
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn calls_are_counted_by_method_and_code_and_responses_feed_their_phases() {
    let s = fixture_server();
    s.wait_serving().await;
    s.wait_intents().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(palaver::server::metrics::serve_metrics(listener, std::future::pending()));
    let before = scrape(addr).await;

    let mut c = s.client().await;
    c.summarize(thread("M-5521")).await.expect("summarize");
    let err = c.summarize(pb::SummarizeRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let mut stream = c.summarize_stream(thread("M-7730")).await.expect("stream").into_inner();
    let mut responses = 0;
    while let Some(chunk) = stream.message().await.expect("chunk") {
        responses += usize::from(matches!(chunk.chunk, Some(Chunk::Response(_))));
    }
    assert_eq!(responses, 1);
    // The first thread again, unchanged: its stored note.
    assert!(c.summarize(thread("M-5521")).await.expect("summarize").into_inner().cached);
    let req = pb::ClassifyIntentRequest { input: Some(Input::Text("where is my order?".into())), top_k: 2, ..Default::default() };
    c.classify_intent(req).await.expect("classify");

    let after = scrape(addr).await;
    let summarize = "/palaver.v1.Assist/Summarize";
    grew(&before, &after, &format!("palaver_requests_total{{method=\"{summarize}\",code=\"OK\"}}"), 1.0);
    grew(&before, &after, &format!("palaver_requests_total{{method=\"{summarize}\",code=\"InvalidArgument\"}}"), 1.0);
    // A stream counts when it ends, with the status of its trailers.
    grew(&before, &after, "palaver_requests_total{method=\"/palaver.v1.Assist/SummarizeStream\",code=\"OK\"}", 1.0);
    grew(&before, &after, "palaver_requests_total{method=\"/palaver.v1.Assist/ClassifyIntent\",code=\"OK\"}", 1.0);
    grew(&before, &after, &format!("palaver_request_duration_seconds_count{{method=\"{summarize}\"}}"), 2.0);
    // Both summaries' own timings, phase by phase, and their tokens.
    for phase in ["tokenize", "queue", "prompt", "generation", "total"] {
        grew(&before, &after, &format!("palaver_summarize_phase_seconds_count{{phase=\"{phase}\"}}"), 2.0);
    }
    grew(&before, &after, "palaver_summarize_phase_seconds_sum{phase=\"total\"}", 1e-4);
    grew(&before, &after, "palaver_summarize_phase_seconds_count{phase=\"total\"}", 3.0);
    grew(&before, &after, "palaver_summarize_note_cache_total{outcome=\"miss\"}", 2.0);
    grew(&before, &after, "palaver_summarize_note_cache_total{outcome=\"hit\"}", 1.0);
    assert!(after.get("palaver_summarize_note_cache_bytes").is_some_and(|b| *b > 0.0), "stored notes take memory");
    grew(&before, &after, "palaver_summarize_tokens_total{kind=\"prompt\"}", 20.0);
    grew(&before, &after, "palaver_summarize_tokens_total{kind=\"generated\"}", 2.0);
    let model = models::FIXTURE_LLM;
    grew(&before, &after, &format!("palaver_llm_passes_total{{model=\"{model}\",pass=\"prompt\"}}"), 2.0);
    grew(&before, &after, &format!("palaver_llm_passes_total{{model=\"{model}\",pass=\"decode\"}}"), 2.0);
    grew(&before, &after, &format!("palaver_llm_rows_total{{model=\"{model}\",pass=\"prompt\"}}"), 20.0);
    for phase in ["tokenize", "queue", "inference", "total"] {
        grew(&before, &after, &format!("palaver_classify_phase_seconds_count{{phase=\"{phase}\"}}"), 1.0);
    }
    grew(&before, &after, "palaver_classify_texts_total", 1.0);
    grew(&before, &after, "palaver_encoder_batch_size_count", 1.0);
    // Gauges exist; their values depend on what the other suites are doing.
    for gauge in [format!("palaver_llm_sequences{{model=\"{model}\",state=\"running\"}}"), "palaver_admitted_requests{service=\"assist\"}".into()] {
        assert!(after.get(&gauge).is_some_and(|v| *v >= 0.0), "{gauge}");
    }
}
