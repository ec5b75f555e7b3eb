//! The binary as a newcomer runs it: `palaver serve` answering gRPC, and
//! `palaver summarize -` printing JSON. Uses the SmolLM2 fixture for speed.

use crate::common;

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
    let (port, metrics_port) = (free_port(), free_port());
    let child = Command::new(BIN)
        .args(["serve", "--summarizer", models::FIXTURE_LLM])
        .env("PALAVER_ADDR", format!("127.0.0.1:{port}")) // flags also come from the environment
        .env("PALAVER_METRICS_ADDR", format!("127.0.0.1:{metrics_port}"))
        .env("PALAVER_MODELS_DIR", common::models_dir())
        .env("PALAVER_TAXONOMY_STORE", common::temp_dir("cli-store"))
        .env("PALAVER_ENGAGEMENT_DB", common::temp_dir("cli-engagement").join("e.redb"))
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
    // Loading the encoder and training the built-in taxonomies comes first.
    for _ in 0..3000 {
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
    // The process's own metrics count that call.
    let metrics = common::http_get(([127, 0, 0, 1], metrics_port).into(), "/metrics").await;
    assert!(metrics.starts_with("HTTP/1.1 200 OK"), "{metrics}");
    assert!(metrics.contains("palaver_requests_total{method=\"/palaver.v1.Assist/Summarize\",code=\"OK\"} 1\n"), "{metrics}");
    assert!(metrics.contains("palaver_summarize_phase_seconds_count{phase=\"total\"} 1\n"), "{metrics}");
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

const TAXONOMY_TOML: &str = r#"
name = "from-file"
version = "1"

[[intent]]
label = "refund"
description = "the customer wants their money back"
examples = ["I want a refund", "give me my money back", "refund my order please"]

[[intent]]
label = "opening_hours"
examples = ["when do you open", "what are your opening hours", "are you open on Sunday"]
"#;

fn serve(store: &std::path::Path, port: u16, extra: &[&str]) -> Killed {
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--summarizer", models::FIXTURE_LLM]).args(extra);
    let child = cmd
        .env("PALAVER_ADDR", format!("127.0.0.1:{port}"))
        .env("PALAVER_MODELS_DIR", common::models_dir())
        .env("PALAVER_TAXONOMY_STORE", store)
        .env("PALAVER_SERVICES", "assist")
        .env("PALAVER_METRICS_ADDR", "off")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start palaver serve");
    Killed(child)
}

/// Connects once the Taxonomies service says SERVING.
async fn wait_taxonomies(port: u16) -> tonic::transport::Channel {
    let url = format!("http://127.0.0.1:{port}");
    for _ in 0..3000 {
        if let Ok(c) = tonic::transport::Channel::from_shared(url.clone()).unwrap().connect().await {
            let mut h = tonic_health::pb::health_client::HealthClient::new(c.clone());
            let req = tonic_health::pb::HealthCheckRequest { service: "palaver.v1.Taxonomies".into() };
            if matches!(h.check(req).await, Ok(r) if r.get_ref().status == 1) {
                return c;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("Taxonomies never SERVING");
}

#[tokio::test]
async fn taxonomies_survive_kill_9_and_bad_files_fail_the_start() {
    common::llm_files(models::FIXTURE_LLM);
    let dir = common::temp_dir("cli-kill");
    let store = dir.join("store");
    let file = dir.join("from-file.toml");
    std::fs::write(&file, TAXONOMY_TOML).unwrap();

    let port = free_port();
    let mut first = serve(&store, port, &["--taxonomy", file.to_str().unwrap()]);
    let ch = wait_taxonomies(port).await;
    let mut assist = pb::assist_client::AssistClient::new(ch.clone());
    let classify = |text: &str| pb::ClassifyIntentRequest {
        input: Some(pb::classify_intent_request::Input::Text(text.into())),
        taxonomy: "from-file".into(),
        top_k: 1,
        request_id: String::new(),
    };
    let r = assist.classify_intent(classify("quero meu dinheiro de volta")).await.unwrap().into_inner();
    assert_eq!(r.intents[0].label, "refund");
    let mut tax = pb::taxonomies_client::TaxonomiesClient::new(ch);
    let mut extra = palaver::server::taxonomy_to_wire(&palaver::intent::taxonomy::Taxonomy::from_toml(TAXONOMY_TOML).unwrap());
    extra.name = "via-grpc".into();
    assert!(tax.put_taxonomy(pb::PutTaxonomyRequest { taxonomy: Some(extra) }).await.unwrap().into_inner().trained);
    // SIGKILL: no shutdown hook runs. Everything acknowledged must be on disk.
    first.0.kill().unwrap();
    first.0.wait().unwrap();

    let port = free_port();
    let _second = serve(&store, port, &[]);
    let ch = wait_taxonomies(port).await;
    let mut tax = pb::taxonomies_client::TaxonomiesClient::new(ch.clone());
    let names: Vec<String> =
        tax.list_taxonomies(pb::ListTaxonomiesRequest {}).await.unwrap().into_inner().taxonomies.into_iter().map(|t| t.name).collect();
    for name in ["from-file", "via-grpc", "support"] {
        assert!(names.contains(&name.to_string()), "{name} lost across kill -9: {names:?}");
    }
    let r = pb::assist_client::AssistClient::new(ch).classify_intent(classify("when are you open?")).await.unwrap().into_inner();
    assert_eq!(r.intents[0].label, "opening_hours");

    // A taxonomy file with a duplicate label stops the start with the offender named.
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, TAXONOMY_TOML.replace("opening_hours", "Refund")).unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--summarizer", models::FIXTURE_LLM, "--taxonomy", bad.to_str().unwrap()])
        .env("PALAVER_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("PALAVER_METRICS_ADDR", "off")
        .env("PALAVER_MODELS_DIR", common::models_dir())
        .env("PALAVER_TAXONOMY_STORE", &store)
        .env("PALAVER_SERVICES", "assist")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("taxonomy.intents[1].label: duplicate label `Refund`"), "{err}");
}
