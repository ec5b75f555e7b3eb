//! The binary as a newcomer runs it: `palaver serve` answering gRPC, and
//! `palaver summarize -` printing JSON. Uses the SmolLM2 fixture for speed.

mod common;

use palaver::models;
use palaver::proto::v1 as pb;
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_palaver");

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test]
async fn serve_answers_health_and_summarize() {
    common::llm_files(models::FIXTURE_LLM);
    let port = free_port();
    let child = Command::new(BIN)
        .args(["serve", "--summarizer", models::FIXTURE_LLM])
        .env("PALAVER_ADDR", format!("127.0.0.1:{port}")) // flags also come from the environment
        .env("PALAVER_MODELS_DIR", common::models_dir())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start palaver serve");
    let _guard = Killed(child);
    let url = format!("http://127.0.0.1:{port}");
    let mut channel = None;
    for _ in 0..600 {
        if let Ok(c) = tonic::transport::Channel::from_shared(url.clone()).unwrap().connect().await {
            channel = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let channel = channel.expect("server listening");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let mut serving = false;
    for _ in 0..600 {
        let r = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap();
        if r.into_inner().status == 1 {
            serving = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(serving, "never SERVING");
    let req = pb::SummarizeRequest {
        thread: Some(pb::Thread {
            thread_id: "cli".into(),
            messages: vec![pb::Message {
                id: "1".into(),
                role: pb::Role::Customer as i32,
                text: "My order 5521 is late, where is it?".into(),
                ..Default::default()
            }],
        }),
        ..Default::default()
    };
    let r = pb::assist_client::AssistClient::new(channel).summarize(req).await.expect("summarize").into_inner();
    assert_eq!(r.thread_id, "cli");
    assert_eq!(r.model, models::FIXTURE_LLM);
    assert!(!r.summary.is_empty());
}

fn summarize_stdin(json: &str) -> std::process::Output {
    let mut child = Command::new(BIN)
        .args(["summarize", "-", "--summarizer", models::FIXTURE_LLM])
        .env("PALAVER_MODELS_DIR", common::models_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(json.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn summarize_prints_json_and_rejects_bad_threads() {
    common::llm_files(models::FIXTURE_LLM);
    let out = summarize_stdin(
        r#"{"thread_id": "t", "messages": [
            {"id": "1", "role": "customer", "sent_at": "2026-11-20T14:03:00Z", "text": "Hi, parcel 8812 never came."},
            {"id": "2", "role": "agent", "sent_at": "2026-11-20T14:05:00Z", "text": "Sorry, I opened a claim."}]}"#,
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(v["thread_id"], "t");
    assert!(v["summary"].as_str().is_some_and(|s| !s.is_empty()), "{v}");
    assert_eq!(v["coverage"]["used_message_ids"], serde_json::json!(["1", "2"]));

    let bad = summarize_stdin(r#"{"messages": [{"role": "client", "text": "hi"}]}"#);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("messages[0].role"));
    let late = summarize_stdin(
        r#"{"messages": [{"role": "customer", "sent_at": "2026-11-20T14:03:00Z", "text": "a"},
                         {"role": "agent", "sent_at": "2026-11-20T13:00:00Z", "text": "b"}]}"#,
    );
    assert!(!late.status.success());
    assert!(String::from_utf8_lossy(&late.stderr).contains("thread.messages[1].sent_at"));
}
