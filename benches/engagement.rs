//! Engagement benchmarks (harness = false; prints one line per figure):
//! - ingest: events/s into the durable store (redb, fsync per group commit),
//!   4 concurrent writers of 1,000-event batches, as RecordEvents streams do;
//! - SuggestSendWindows over gRPC on localhost: p50/p95 of one client's calls
//!   for contacts with 50 events each, and the model alone;
//! - `PALAVER_SYNTH_OUT=file.parquet`: writes the synthetic batch-scoring input
//!   (PALAVER_SYNTH_CONTACTS contacts x 50 events, grouped by contact) for
//!   `palaver score --grouped`, which BENCHMARKS.md times with /usr/bin/time.
//!
//! cargo bench --bench engagement

use palaver::proto::v1 as pb;
use palaver::sendtime::events::{Channel, ContactAttrs, Event, EventType, QuietHours};
use palaver::sendtime::store::RedbStore;
use palaver::sendtime::{Engagement, EngagementConfig, Subject, SuggestRequest};
use std::sync::Arc;
use std::time::Instant;

const T0: i64 = 1_767_225_600; // 2026-01-01T00:00Z

/// A deterministic contact: 50 events over ~8 weeks around a personal hour.
fn history(contact: &str, seed: u64) -> Vec<Event> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let hour = 8 + (rnd() % 13) as i64;
    let tz = ["America/Sao_Paulo", "Asia/Kolkata", "Europe/Kyiv", "America/Mexico_City", "Europe/Moscow"][(rnd() % 5) as usize];
    let mut out = Vec::with_capacity(50);
    for i in 0..50 {
        let day = (rnd() % 56) as i64;
        let at = T0 + day * 86_400 + (hour + (rnd() % 3) as i64 - 1) * 3600 + (rnd() % 3600) as i64;
        let kind = [EventType::OutboundSent, EventType::Read, EventType::Replied, EventType::Inbound][i % 4];
        let attrs = if i == 0 { ContactAttrs { time_zone: Some(tz.into()), ..Default::default() } } else { ContactAttrs::default() };
        out.push(Event { contact_id: contact.into(), kind, at, channel: Channel::WhatsApp, message_id: format!("{contact}-{}", i / 4), attrs });
    }
    out
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

fn main() {
    if let Ok(out) = std::env::var("PALAVER_SYNTH_OUT") {
        let n: usize = std::env::var("PALAVER_SYNTH_CONTACTS").ok().and_then(|s| s.parse().ok()).unwrap_or(1_000_000);
        synth(&out, n);
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let dir = std::env::temp_dir().join(format!("palaver-bench-engagement-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let e = Engagement::open(Arc::new(RedbStore::open(&dir.join("e.redb")).unwrap()), EngagementConfig::default()).unwrap();

        // Ingest: 4 writers x 50 batches of 1,000 events (20 contacts x 50).
        let t = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..4 {
            let e = e.clone();
            tasks.push(tokio::spawn(async move {
                for b in 0..50 {
                    let batch: Vec<Event> = (0..20).flat_map(|c| history(&format!("w{w}-b{b}-c{c}"), (w * 10_000 + b * 100 + c) as u64)).collect();
                    e.record("bench", batch).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let secs = t.elapsed().as_secs_f64();
        println!("ingest: 200,000 events (4,000 contacts) in {secs:.2} s = {:.0} events/s (durable, group commit)", 200_000.0 / secs);

        // The model alone.
        let req = SuggestRequest { now: T0 + 60 * 86_400, horizon_secs: 7 * 86_400, channel: Channel::WhatsApp, quiet: QuietHours { start_min: 1260, end_min: 480 }, max_windows: 5 };
        let mut lat = Vec::new();
        for i in 0..2000 {
            let t = Instant::now();
            let s = e.suggest("bench", Subject::Stored { tenant: "bench".into(), contact_id: format!("w{}-b{}-c{}", i % 4, i % 50, i % 20) }, &req).unwrap();
            lat.push(t.elapsed().as_secs_f64() * 1e6);
            assert!(!s.windows.is_empty());
        }
        println!("suggest (store read + model, in process): p50 {:.1} us, p95 {:.1} us", pct(&mut lat, 0.5), pct(&mut lat, 0.95));

        // Over gRPC.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let opts = palaver::server::ServeOptions { max_concurrent_requests: 64, max_background_requests: 64, max_request_bytes: 4 << 20, startup_taxonomies: vec![] };
        let services = palaver::server::Services { assist: None, engagement: Some(e.clone()) };
        tokio::spawn(palaver::server::serve(listener, services, opts, std::future::pending()));
        let ch = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
        let mut c = pb::engagement_client::EngagementClient::new(ch);
        let mut lat = Vec::new();
        for i in 0..3000 {
            let r = pb::SuggestSendWindowsRequest {
                tenant: "bench".into(),
                contact: Some(pb::suggest_send_windows_request::Contact::ContactId(format!("w{}-b{}-c{}", i % 4, i % 50, i % 20))),
                now: Some(prost_types::Timestamp { seconds: req.now, nanos: 0 }),
                horizon_hours: 168,
                channel: pb::Channel::Whatsapp as i32,
                max_windows: 5,
                quiet_hours: None,
            };
            let t = Instant::now();
            c.suggest_send_windows(r).await.unwrap();
            if i >= 200 {
                lat.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        println!("SuggestSendWindows over gRPC (1 client, localhost): p50 {:.0} us, p95 {:.0} us", pct(&mut lat, 0.5), pct(&mut lat, 0.95));
        let _ = std::fs::remove_dir_all(&dir);
    });
}

fn synth(out: &str, contacts: usize) {
    use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray};
    let f = std::fs::File::create(out).unwrap();
    let mut w: Option<parquet::arrow::ArrowWriter<std::fs::File>> = None;
    let chunk = 20_000;
    let t = Instant::now();
    for start in (0..contacts).step_by(chunk) {
        let evs: Vec<Event> = (start..(start + chunk).min(contacts)).flat_map(|c| history(&format!("c{c:07}"), c as u64)).collect();
        let s = |f: &dyn Fn(&Event) -> String| -> ArrayRef { Arc::new(StringArray::from(evs.iter().map(f).collect::<Vec<_>>())) };
        let batch = RecordBatch::try_from_iter([
            ("contact_id", s(&|e| e.contact_id.clone())),
            ("type", s(&|e| e.kind.name().to_string())),
            ("occurred_at", Arc::new(Int64Array::from(evs.iter().map(|e| e.at).collect::<Vec<_>>())) as ArrayRef),
            ("channel", s(&|e| e.channel.name().to_string())),
            ("message_id", s(&|e| e.message_id.clone())),
            ("time_zone", s(&|e| e.attrs.time_zone.clone().unwrap_or_default())),
        ])
        .unwrap();
        let w = w.get_or_insert_with(|| parquet::arrow::ArrowWriter::try_new(f.try_clone().unwrap(), batch.schema(), None).unwrap());
        w.write(&batch).unwrap();
    }
    w.unwrap().close().unwrap();
    println!("wrote {contacts} contacts x 50 events to {out} in {:.1} s", t.elapsed().as_secs_f64());
}
