//! The Engagement service over real gRPC: ingest, answers, batch scoring,
//! every bad input, and durability across `kill -9` of the real binary.

use crate::common;

use palaver::proto::v1 as pb;
use palaver::proto::v1::engagement_client::EngagementClient;
use palaver::sendtime::store::RedbStore;
use palaver::sendtime::{Engagement, EngagementConfig};
use palaver::server::{self, ServeOptions};
use pb::suggest_send_windows_request::Contact;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::Channel;
use tonic::Code;

fn start(db: &Path) -> std::net::SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    let db = db.to_path_buf();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let e = Engagement::open(Arc::new(RedbStore::open(&db).unwrap()), EngagementConfig::default()).unwrap();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            let opts = ServeOptions { max_concurrent_requests: 64, max_background_requests: 64, max_request_bytes: 4 << 20, startup_taxonomies: vec![] };
            server::serve(listener, server::Services { assist: None, engagement: Some(e) }, opts, std::future::pending()).await.unwrap();
        });
    });
    rx.recv().unwrap()
}

async fn client(addr: impl std::fmt::Display) -> EngagementClient<Channel> {
    let url = format!("http://{addr}");
    for _ in 0..600 {
        if let Ok(c) = Channel::from_shared(url.clone()).unwrap().connect().await {
            return EngagementClient::new(c);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no server at {url}");
}

fn ts(t: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp { seconds: t, nanos: 0 })
}

/// Unix seconds of a wall-clock time in `zone`.
fn local(zone: &str, dt: &str) -> i64 {
    let dt: jiff::civil::DateTime = dt.parse().unwrap();
    dt.to_zoned(jiff::tz::TimeZone::get(zone).unwrap()).unwrap().timestamp().as_second()
}

fn event(contact: &str, kind: pb::EventType, at: i64, id: &str) -> pb::EngagementEvent {
    pb::EngagementEvent {
        tenant: "acme".into(),
        contact_id: contact.into(),
        r#type: kind as i32,
        occurred_at: ts(at),
        channel: pb::Channel::Whatsapp as i32,
        message_id: id.into(),
        attributes: None,
    }
}

/// A São Paulo customer who answers weekday messages around 12:30 within minutes,
/// over the four weeks before 2026-03-28.
fn lunch_history(contact: &str) -> Vec<pb::EngagementEvent> {
    let mut out = Vec::new();
    for week in 0..4 {
        for day in 0..5 {
            let sent = local("America/Sao_Paulo", &format!("2026-03-{:02}T12:30", 2 + week * 7 + day));
            let id = format!("{contact}-m{week}{day}");
            out.push(event(contact, pb::EventType::OutboundSent, sent, &id));
            out.push(event(contact, pb::EventType::Read, sent + 120, &id));
            out.push(event(contact, pb::EventType::Replied, sent + 420, &id));
        }
    }
    out[0].attributes = Some(pb::ContactAttributes { phone: Some("+55 11 98765-4321".into()), ..Default::default() });
    out
}

fn suggest_req(contact: &str, now: i64) -> pb::SuggestSendWindowsRequest {
    pb::SuggestSendWindowsRequest {
        tenant: "acme".into(),
        contact: Some(Contact::ContactId(contact.into())),
        now: ts(now),
        horizon_hours: 168,
        channel: pb::Channel::Whatsapp as i32,
        max_windows: 3,
        quiet_hours: None,
    }
}

async fn record(c: &mut EngagementClient<Channel>, events: Vec<pb::EngagementEvent>) -> Result<pb::RecordEventsResponse, tonic::Status> {
    c.record_events(tokio_stream::iter(events)).await.map(|r| r.into_inner())
}

#[tokio::test]
async fn events_in_answers_out() {
    let dir = common::temp_dir("engagement-grpc");
    let addr = start(&dir.join("e.redb"));
    let mut c = client(addr).await;

    let r = record(&mut c, lunch_history("ana")).await.unwrap();
    assert_eq!((r.accepted, r.duplicates), (60, 0));
    // A retried stream (out of order this time) counts nothing twice.
    let mut again = lunch_history("ana");
    again.reverse();
    let r = record(&mut c, again).await.unwrap();
    assert_eq!((r.accepted, r.duplicates), (0, 60));

    let now = local("America/Sao_Paulo", "2026-03-28T10:00"); // Saturday
    let s = c.suggest_send_windows(suggest_req("ana", now)).await.unwrap().into_inner();
    assert_eq!(s.time_zone, "America/Sao_Paulo");
    assert_eq!(s.time_zone_source, pb::TimeZoneSource::PhoneNumber as i32);
    let w = &s.windows[0];
    assert!(w.weekday >= pb::Weekday::Monday as i32 && w.weekday <= pb::Weekday::Friday as i32 && !w.weekend, "{w:?}");
    assert!(w.start_hour <= 12 && w.end_hour >= 13, "{w:?}");
    assert!(w.next_start.unwrap().seconds > now - 3 * 3600 && w.confidence > 0.5, "{w:?}");
    // Monday 12:00 local is 15:00 UTC.
    let next = s.next_best_time.unwrap().seconds;
    assert_eq!(jiff::Timestamp::from_second(next).unwrap().to_zoned(jiff::tz::TimeZone::UTC).hour(), 15);
    let e = s.engagement.unwrap();
    assert!(e.reply_probability_24h > 0.7 && e.events == 60, "{e:?}");
    assert!(e.median_reply_delay_seconds.unwrap() < 900.0);
    assert!(s.reason.contains("replies within") && s.reason.contains("60 events"), "{}", s.reason);
    // No inbound message from Ana: the WhatsApp window is closed.
    let m = s.messaging_window.unwrap();
    assert!(!m.open && m.template_required);

    // She writes: the window opens for 24 hours.
    let wrote = now - 3600;
    record(&mut c, vec![event("ana", pb::EventType::InboundMessage, wrote, "ana-in-1")]).await.unwrap();
    let s = c.suggest_send_windows(suggest_req("ana", now)).await.unwrap().into_inner();
    let m = s.messaging_window.unwrap();
    assert!(m.open && !m.template_required && m.closes_at.unwrap().seconds == wrote + 86_400, "{m:?}");
    assert!(s.best_time_in_messaging_window.unwrap().seconds < wrote + 86_400);

    // Her own quiet hours override the tenant's.
    c.set_contact(pb::SetContactRequest {
        tenant: "acme".into(),
        contact_id: "ana".into(),
        attributes: Some(pb::ContactAttributes { quiet_hours: Some(pb::QuietHours { start_minute: 11 * 60, end_minute: 14 * 60 }), ..Default::default() }),
    })
    .await
    .unwrap();
    let s = c.suggest_send_windows(suggest_req("ana", now)).await.unwrap().into_inner();
    assert!(s.windows.iter().all(|w| w.end_hour <= 11 || w.start_hour >= 14), "{:?}", s.windows);
    let got = c.get_contact(pb::GetContactRequest { tenant: "acme".into(), contact_id: "ana".into() }).await.unwrap().into_inner();
    assert_eq!(got.events, 61);
    assert_eq!(got.attributes.unwrap().quiet_hours.unwrap().start_minute, 660);

    // Another tenant does not see her.
    let mut other = suggest_req("ana", now);
    other.tenant = "other".into();
    assert_eq!(c.suggest_send_windows(other).await.unwrap_err().code(), Code::NotFound);

    // Inline: a contact not stored, in India, with no history.
    let mut inline = suggest_req("", now);
    inline.contact = Some(Contact::Inline(pb::InlineContact {
        contact_id: "walk-in".into(),
        attributes: Some(pb::ContactAttributes { time_zone: Some("Asia/Kolkata".into()), ..Default::default() }),
        events: vec![],
    }));
    let s = c.suggest_send_windows(inline).await.unwrap().into_inner();
    assert_eq!((s.time_zone.as_str(), s.time_zone_source), ("Asia/Kolkata", pb::TimeZoneSource::Contact as i32));
    assert!(s.windows.iter().all(|w| w.start_hour >= 8 && w.end_hour <= 21 && w.confidence == 0.0));

    // Batch scoring: in order, a bad request answered in place.
    let mut reqs = Vec::new();
    for i in 0..600 {
        let contact = if i == 7 { "nobody" } else { "ana" };
        let mut r = suggest_req(contact, now);
        if i == 9 {
            r.horizon_hours = 100_000;
        }
        reqs.push(pb::ScoreContactsRequest { request_id: format!("r{i}"), request: Some(r) });
    }
    let mut out = c.score_contacts(tokio_stream::iter(reqs)).await.unwrap().into_inner();
    let mut n = 0;
    while let Some(s) = out.message().await.unwrap() {
        assert_eq!(s.request_id, format!("r{n}"));
        match n {
            7 => assert!(s.error.contains("\"nobody\"") && s.result.is_none(), "{s:?}"),
            9 => assert!(s.error.contains("request.horizon_hours") && s.error.contains("limit"), "{s:?}"),
            _ => assert!(s.error.is_empty() && s.result.as_ref().unwrap().windows.len() == 3, "{s:?}"),
        }
        n += 1;
    }
    assert_eq!(n, 600);

    // Deleted: forgotten.
    assert!(c.delete_contact(pb::DeleteContactRequest { tenant: "acme".into(), contact_id: "ana".into() }).await.unwrap().into_inner().deleted);
    assert_eq!(c.suggest_send_windows(suggest_req("ana", now)).await.unwrap_err().code(), Code::NotFound);
}

fn invalid(r: Result<impl std::fmt::Debug, tonic::Status>, needle: &str) {
    let e = r.expect_err(needle);
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains(needle), "{needle:?} not in {:?}", e.message());
}

#[tokio::test]
async fn bad_input_is_rejected_naming_the_field() {
    let dir = common::temp_dir("engagement-bad");
    let addr = start(&dir.join("e.redb"));
    let mut c = client(addr).await;
    let t = local("UTC", "2026-03-02T12:00");
    let now = jiff::Timestamp::now().as_second();

    // Events.
    let mut e = event("x", pb::EventType::Unspecified, t, "1");
    invalid(record(&mut c, vec![e.clone()]).await, "events[0].type: must be set");
    e.r#type = pb::EventType::InboundMessage as i32;
    e.occurred_at = None;
    invalid(record(&mut c, vec![e.clone()]).await, "events[0].occurred_at: required");
    e.occurred_at = ts(local("UTC", "1999-12-31T23:00"));
    invalid(record(&mut c, vec![e.clone()]).await, "events[0].occurred_at: 1999-12-31T23:00:00Z is before 2000-01-01");
    e.occurred_at = ts(now + 3 * 86_400);
    invalid(record(&mut c, vec![e.clone()]).await, "more than 24 hours ahead");
    e.occurred_at = ts(t);
    e.contact_id = String::new();
    invalid(record(&mut c, vec![e.clone()]).await, "events[0].contact_id: must not be empty");
    e.contact_id = "x".into();
    e.attributes = Some(pb::ContactAttributes { time_zone: Some("Mars/Olympus_Mons".into()), ..Default::default() });
    invalid(record(&mut c, vec![e.clone()]).await, "events[0].attributes.time_zone: unknown IANA time zone \"Mars/Olympus_Mons\"");
    e.attributes = Some(pb::ContactAttributes { phone: Some("+1 555".into()), ..Default::default() });
    invalid(record(&mut c, vec![e.clone()]).await, "events[0].attributes.phone");
    e.attributes = Some(pb::ContactAttributes { country: Some("XX".into()), ..Default::default() });
    invalid(record(&mut c, vec![e.clone()]).await, "events[0].attributes.country");
    e.attributes = Some(pb::ContactAttributes { quiet_hours: Some(pb::QuietHours { start_minute: 1440, end_minute: 0 }), ..Default::default() });
    invalid(record(&mut c, vec![e.clone()]).await, "events[0].attributes.quiet_hours.start_minute");
    e.attributes = None;
    e.channel = 42;
    invalid(record(&mut c, vec![e.clone()]).await, "events[0].channel: unknown channel 42");

    // A bad event mid-stream: the ones before it are durable, and it says so.
    let mut batch: Vec<pb::EngagementEvent> = (0..5).map(|i| event("y", pb::EventType::InboundMessage, t + i, &format!("y{i}"))).collect();
    batch.push(event("y", pb::EventType::Unspecified, t, "bad"));
    batch.push(event("y", pb::EventType::InboundMessage, t + 10, "after"));
    invalid(record(&mut c, batch).await, "events[5].type: must be set (5 earlier events are recorded");
    let got = c.get_contact(pb::GetContactRequest { tenant: "acme".into(), contact_id: "y".into() }).await.unwrap().into_inner();
    assert_eq!(got.events, 5);

    // Questions.
    assert_eq!(c.suggest_send_windows(suggest_req("nobody", t)).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(c.get_contact(pb::GetContactRequest { tenant: "acme".into(), contact_id: "nobody".into() }).await.unwrap_err().code(), Code::NotFound);
    let mut r = suggest_req("y", t);
    r.horizon_hours = 24 * 365 * 3;
    invalid(c.suggest_send_windows(r).await, "horizon_hours: 26280 hours; the limit is 744 hours");
    let mut r = suggest_req("y", t);
    r.now = ts(local("UTC", "1990-01-01T00:00"));
    invalid(c.suggest_send_windows(r).await, "now: 1990-01-01T00:00:00Z is before 2000-01-01");
    let mut r = suggest_req("y", t);
    r.max_windows = 1000;
    invalid(c.suggest_send_windows(r).await, "max_windows: 1000; the limit is 24");
    let mut r = suggest_req("y", t);
    r.contact = None;
    invalid(c.suggest_send_windows(r).await, "contact: set contact_id or inline");
    let mut r = suggest_req("y", t);
    r.contact = Some(Contact::ContactId(String::new()));
    invalid(c.suggest_send_windows(r).await, "contact_id: must not be empty");
    let mut r = suggest_req("y", t);
    r.contact = Some(Contact::Inline(pb::InlineContact { contact_id: "i".into(), attributes: None, events: vec![event("i", pb::EventType::Read, 5, "m")] }));
    invalid(c.suggest_send_windows(r).await, "inline.events[0].occurred_at");
    invalid(
        c.set_contact(pb::SetContactRequest {
            tenant: "acme".into(),
            contact_id: "y".into(),
            attributes: Some(pb::ContactAttributes { time_zone: Some("Europe/Atlantis".into()), ..Default::default() }),
        })
        .await,
        "attributes.time_zone: unknown IANA time zone",
    );
    invalid(c.set_contact(pb::SetContactRequest { tenant: "acme".into(), contact_id: "y".into(), attributes: None }).await, "attributes: set at least one");
}

const BIN: &str = env!("CARGO_BIN_EXE_palaver");

fn spawn_engagement_only(db: &Path, port: u16) -> std::process::Child {
    std::process::Command::new(BIN)
        .args(["serve", "--services", "engagement"])
        .env("PALAVER_ADDR", format!("127.0.0.1:{port}"))
        .env("PALAVER_ENGAGEMENT_DB", db)
        .env("PALAVER_METRICS_ADDR", "off")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start palaver serve")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Every acknowledged event survives `kill -9` in the middle of ingest.
#[tokio::test]
async fn acknowledged_events_survive_kill_9_mid_ingest() {
    let dir: PathBuf = common::temp_dir("engagement-kill");
    let db = dir.join("e.redb");
    let port = free_port();
    let mut child = spawn_engagement_only(&db, port);
    let c = client(format!("127.0.0.1:{port}")).await;
    let t0 = local("UTC", "2026-01-05T00:00");
    // Four writers, each streaming batches of 200 events for its own contacts.
    let acked = Arc::new(std::sync::Mutex::new(std::collections::HashMap::<String, u64>::new()));
    let mut tasks = Vec::new();
    for w in 0..4 {
        let (mut c, acked) = (c.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            for b in 0..10_000 {
                let contact = format!("w{w}-b{b}");
                let evs: Vec<_> = (0..200).map(|i| event(&contact, pb::EventType::InboundMessage, t0 + i * 600, &format!("{contact}-{i}"))).collect();
                match record(&mut c, evs).await {
                    Ok(r) => {
                        assert_eq!(r.accepted, 200);
                        acked.lock().unwrap().insert(contact, r.accepted);
                    }
                    Err(_) => return, // the server died under us
                }
            }
        }));
    }
    // Let some batches land, then kill it mid-stream.
    for _ in 0..600 {
        if acked.lock().unwrap().len() >= 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 20, "only {} batches acknowledged before the kill", acked.len());

    let port = free_port();
    let mut child = spawn_engagement_only(&db, port);
    let mut c = client(format!("127.0.0.1:{port}")).await;
    for (contact, n) in &acked {
        let got = c.get_contact(pb::GetContactRequest { tenant: "acme".into(), contact_id: contact.clone() }).await;
        let got = got.unwrap_or_else(|e| panic!("{contact} acknowledged but lost: {e:?}")).into_inner();
        assert_eq!(got.events, *n, "{contact}");
    }
    // Retrying an acknowledged batch after the restart adds nothing.
    let (contact, _) = acked.iter().next().unwrap();
    let evs: Vec<_> = (0..200).map(|i| event(contact, pb::EventType::InboundMessage, t0 + i * 600, &format!("{contact}-{i}"))).collect();
    let r = record(&mut c, evs).await.unwrap();
    assert_eq!((r.accepted, r.duplicates), (0, 200));
    child.kill().unwrap();
    child.wait().unwrap();
}

/// SIGTERM (what systemd, Docker and Kubernetes send) drains: a stream already
/// open is answered in full, then the process exits cleanly.
#[tokio::test]
async fn sigterm_lets_an_open_stream_finish_then_exits_cleanly() {
    let dir: PathBuf = common::temp_dir("engagement-term");
    let db = dir.join("e.redb");
    let port = free_port();
    let mut child = spawn_engagement_only(&db, port);
    let mut c = client(format!("127.0.0.1:{port}")).await;
    let t0 = local("UTC", "2026-01-05T00:00");
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let call = tokio::spawn(async move { c.record_events(tokio_stream::wrappers::ReceiverStream::new(rx)).await });
    let ev = |i: i64| event("drain", pb::EventType::InboundMessage, t0 + i * 600, &format!("drain-{i}"));
    for i in 0..5 {
        tx.send(ev(i)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 5..10 {
        tx.send(ev(i)).await.unwrap();
    }
    drop(tx);
    let r = call.await.unwrap().expect("the open stream is answered").into_inner();
    assert_eq!(r.accepted, 10);
    let mut status = None;
    for _ in 0..100 {
        status = child.try_wait().unwrap();
        if status.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = status.unwrap_or_else(|| {
        let _ = child.kill();
        panic!("still running 10 s after SIGTERM")
    });
    assert!(status.success(), "{status:?}");
}
