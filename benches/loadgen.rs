//! Load generator for ClassifyIntent over gRPC: p50/p95 latency and
//! throughput of single-message calls under 1, 8 and 32 concurrent clients,
//! and messages/s of ClassifyIntentBatch.
//!
//!   cargo bench --bench loadgen                       # starts its own server
//!   PALAVER_LOADGEN_ADDR=127.0.0.1:50051 cargo bench --bench loadgen
//!   PALAVER_LOADGEN_SECS=20 ...                       # seconds per level (default 10)

use palaver::proto::v1::{self as pb, assist_client::AssistClient, classify_intent_request::Input};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

mod common;

const MESSAGES: &str = include_str!("messages.txt");

fn start_server() -> String {
    let llm = palaver::llm::LlmOptions { prefix_cache_bytes: Some(256 << 20), ..Default::default() };
    common::start_server(palaver::models::FIXTURE_LLM, llm, palaver::summarize::SummarizeConfig::default()).0
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)].as_secs_f64() * 1e3
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let secs: u64 = std::env::var("PALAVER_LOADGEN_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
    let addr = std::env::var("PALAVER_LOADGEN_ADDR").unwrap_or_else(|_| start_server());
    let ch = Channel::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
    let msgs: Vec<String> = MESSAGES.lines().filter(|l| !l.is_empty()).map(String::from).collect();
    let req = |i: usize| pb::ClassifyIntentRequest { input: Some(Input::Text(msgs[i % msgs.len()].clone())), top_k: 3, ..Default::default() };
    // Wait until the intents side serves.
    let mut c = AssistClient::new(ch.clone());
    loop {
        match c.classify_intent(req(0)).await {
            Ok(_) => break,
            Err(e) if e.code() == tonic::Code::Unavailable => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(e) => panic!("{e}"),
        }
    }
    println!("ClassifyIntent on {addr}, {secs} s per level, messages of ~28 tokens");
    for clients in [1usize, 8, 32] {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let tasks: Vec<_> = (0..clients)
            .map(|w| {
                let mut c = AssistClient::new(ch.clone());
                let msgs = msgs.clone();
                tokio::spawn(async move {
                    let mut lat = Vec::new();
                    let mut batch = Vec::new();
                    let mut i = w;
                    while Instant::now() < deadline {
                        let r = pb::ClassifyIntentRequest { input: Some(Input::Text(msgs[i % msgs.len()].clone())), top_k: 3, ..Default::default() };
                        let t = Instant::now();
                        let resp = c.classify_intent(r).await.expect("classify").into_inner();
                        lat.push(t.elapsed());
                        batch.push(resp.timings.map(|t| t.batch_size).unwrap_or(0));
                        i += clients;
                    }
                    (lat, batch)
                })
            })
            .collect();
        let started = Instant::now();
        let mut lat = Vec::new();
        let mut batches = Vec::new();
        for t in tasks {
            let (l, b) = t.await.unwrap();
            lat.extend(l);
            batches.extend(b);
        }
        let wall = started.elapsed().as_secs_f64();
        lat.sort();
        let mean_batch = batches.iter().map(|&b| b as f64).sum::<f64>() / batches.len().max(1) as f64;
        println!(
            "clients {clients:>2}: {:>7.1} requests/s  p50 {:>7.1} ms  p95 {:>7.1} ms  mean batch {:.1}  ({} requests)",
            lat.len() as f64 / wall, pct(&lat, 0.5), pct(&lat, 0.95), mean_batch, lat.len()
        );
    }
    for n in [128usize, 512] {
        let texts: Vec<String> = (0..n).map(|i| msgs[i % msgs.len()].clone()).collect();
        let t = Instant::now();
        let mut runs = 0;
        while t.elapsed() < Duration::from_secs(secs) || runs == 0 {
            let r = pb::ClassifyIntentBatchRequest { texts: texts.clone(), taxonomy: String::new(), top_k: 1 };
            c.classify_intent_batch(r).await.expect("batch");
            runs += 1;
        }
        println!("ClassifyIntentBatch of {n}: {:.1} messages/s", (n * runs) as f64 / t.elapsed().as_secs_f64());
    }
}
