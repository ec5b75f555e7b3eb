//! The model on hand-made histories.

use super::events::{Channel, ContactAttrs, Event, EventType, QuietHours};
use super::model::{builtin_prior, suggest, ModelConfig, Request, Suggestion};
use super::profile::Profile;
use super::tz::{self, ResolvedTz, TzSource};
use super::{fold, store::RedbStore, Engagement, EngagementConfig, Subject};
use jiff::civil::DateTime;
use jiff::tz::TimeZone;
use jiff::Timestamp;
use std::sync::Arc;

/// Unix seconds of a local wall-clock time in `zone`.
fn local(zone: &str, dt: &str) -> i64 {
    dt.parse::<DateTime>().unwrap().to_zoned(TimeZone::get(zone).unwrap()).unwrap().timestamp().as_second()
}

fn ev(kind: EventType, at: i64, id: &str) -> Event {
    Event { contact_id: "c".into(), kind, at, channel: Channel::WhatsApp, message_id: id.into(), attrs: ContactAttrs::default() }
}

fn with_zone(zone: &str) -> ContactAttrs {
    ContactAttrs { time_zone: Some(zone.into()), ..Default::default() }
}

fn answer(profile: &Profile, now: i64) -> Suggestion {
    answer_q(profile, now, QuietHours { start_min: 21 * 60, end_min: 8 * 60 })
}

fn answer_q(profile: &Profile, now: i64, quiet: QuietHours) -> Suggestion {
    let default = ResolvedTz { tz: TimeZone::UTC, name: "UTC".into(), source: TzSource::Default, country: None, approximate: false };
    let prior = builtin_prior();
    let tz = tz::from_attrs(&profile.attrs).unwrap_or_else(|| tz::resolve(&profile.attrs, &profile.utc, &prior.hours, &default));
    let req = Request { now, horizon_secs: 7 * 86_400, channel: Channel::WhatsApp, quiet: profile.attrs.quiet_hours.unwrap_or(quiet), max_windows: 5 };
    suggest(profile, &prior, tz, &req, &ModelConfig::default())
}

fn local_hour(t: i64, zone: &str) -> (i8, i8, jiff::civil::Weekday) {
    let z = Timestamp::from_second(t).unwrap().to_zoned(TimeZone::get(zone).unwrap());
    (z.hour(), z.minute(), z.weekday())
}

/// Reads and replies at 12:xx on weekdays over four weeks.
fn lunch_reader(zone: &str) -> Vec<Event> {
    let mut out = Vec::new();
    for week in 0..4 {
        for day in 0..5 {
            let date = format!("2026-03-{:02}", 2 + week * 7 + day);
            let sent = local(zone, &format!("{date}T12:05"));
            let id = format!("m{week}{day}");
            out.push(ev(EventType::OutboundSent, sent, &id));
            out.push(ev(EventType::Read, sent + 300, &id));
            out.push(ev(EventType::Replied, sent + 600, &id));
        }
    }
    out
}

#[test]
fn a_weekday_lunch_reader_gets_weekday_lunchtime() {
    let zone = "America/Sao_Paulo";
    let p = fold(with_zone(zone), &mut lunch_reader(zone), 60.0 * 86_400.0);
    let now = local(zone, "2026-03-28T09:00"); // a Saturday
    let s = answer(&p, now);
    let top = &s.windows[0];
    assert!(top.weekday < 5, "{:?}", s.windows);
    assert!(top.start_hour <= 12 && top.end_hour >= 13, "{:?}", s.windows);
    assert!(s.windows.iter().take(3).all(|w| w.weekday < 5 && w.start_hour <= 12 && w.end_hour > 12), "{:?}", s.windows);
    // Next good moment: Monday lunchtime, not the weekend.
    let (h, _, wd) = local_hour(s.next_best_time.unwrap(), zone);
    assert_eq!((wd, h), (jiff::civil::Weekday::Monday, 12), "{}", s.reason);
    // Replies in ~10 minutes, and the reason says so.
    let d = s.engagement.median_reply_delay_secs.unwrap();
    assert!((300.0..=900.0).contains(&d), "{d}");
    assert!(s.reason.contains("replies within") && s.reason.contains("weekdays 1"), "{}", s.reason);
    assert!(s.engagement.reply_probability_24h > 0.7, "{:?}", s.engagement);
    assert!(top.confidence > 0.5, "{top:?}");
    assert_eq!(s.engagement.events, 60);
}

#[test]
fn a_night_owl_gets_late_hours_unless_they_are_quiet() {
    let zone = "Europe/Kyiv";
    let mut evs = Vec::new();
    for d in 0..20 {
        let date = Timestamp::from_second(local(zone, "2026-04-01T00:00") + d * 86_400).unwrap().to_zoned(TimeZone::get(zone).unwrap()).date();
        evs.push(ev(EventType::Inbound, local(zone, &format!("{date}T23:10")), &format!("in{d}")));
        evs.push(ev(EventType::Inbound, local(zone, &format!("{date}T22:40")), &format!("in{d}b")));
    }
    let p = fold(with_zone(zone), &mut evs, 60.0 * 86_400.0);
    let now = local(zone, "2026-04-25T10:00");
    let open = answer_q(&p, now, QuietHours::NONE);
    assert!(open.windows[0].start_hour >= 21, "{:?}", open.windows);
    // With the tenant's 21:00-08:00 quiet hours nothing may fall inside them.
    let quiet = QuietHours { start_min: 21 * 60, end_min: 8 * 60 };
    let s = answer_q(&p, now, quiet);
    for w in &s.windows {
        assert!(w.start_hour >= 8 && w.end_hour <= 21, "{w:?}");
    }
    let (h, m, _) = local_hour(s.next_best_time.unwrap(), zone);
    assert!(!quiet.contains(h as u16 * 60 + m as u16), "{h}:{m}");
    // The closest allowed hour to their activity wins: the evening.
    assert!(s.windows[0].end_hour == 21, "{:?}", s.windows);
}

#[test]
fn the_same_habit_in_two_zones_gives_the_same_local_windows() {
    let a = fold(with_zone("America/Sao_Paulo"), &mut lunch_reader("America/Sao_Paulo"), 60.0 * 86_400.0);
    let b = fold(with_zone("Asia/Kolkata"), &mut lunch_reader("Asia/Kolkata"), 60.0 * 86_400.0);
    let now = local("UTC", "2026-03-28T09:00");
    let (sa, sb) = (answer(&a, now), answer(&b, now));
    let key = |s: &Suggestion| s.windows.iter().map(|w| (w.weekday, w.start_hour, w.end_hour)).collect::<Vec<_>>();
    assert_eq!(key(&sa), key(&sb));
    // ... but 8.5 hours apart in UTC (UTC-3 versus UTC+5:30).
    assert_eq!(sa.windows[0].next_start - sb.windows[0].next_start, 8 * 3600 + 1800);
    assert_eq!(sb.tz.name, "Asia/Kolkata");
}

#[test]
fn daylight_saving_keeps_the_local_hour() {
    // Berlin moves to summer time on 2026-03-29. A 12:00 habit before and
    // after the change stays at 12:00 local (10:00 UTC after, 11:00 before).
    let zone = "Europe/Berlin";
    let mut evs = Vec::new();
    for d in 0..28 {
        let date = Timestamp::from_second(local(zone, "2026-03-16T00:00") + d * 86_400).unwrap().to_zoned(TimeZone::get(zone).unwrap()).date();
        if date.weekday().to_monday_zero_offset() < 5 {
            evs.push(ev(EventType::Inbound, local(zone, &format!("{date}T12:20")), &format!("i{d}")));
        }
    }
    let p = fold(with_zone(zone), &mut evs, 60.0 * 86_400.0);
    let s = answer(&p, local(zone, "2026-04-12T08:00"));
    assert_eq!(s.windows[0].start_hour, 12, "{:?}", s.windows);
    let (h, _, _) = local_hour(s.windows[0].next_start, zone);
    assert_eq!(h, 12);
    // Its next occurrence is 10:00 UTC in summer time.
    assert_eq!(local_hour(s.windows[0].next_start, "UTC").0, 10);
    // Asked in winter time (a week before the change), the same window is at 11:00 UTC.
    let w = answer(&p, local(zone, "2026-03-22T08:00"));
    assert_eq!(local_hour(w.windows[0].next_start, "UTC").0, 11);
}

#[test]
fn a_contact_with_no_history_gets_the_population_pattern() {
    let p = Profile { attrs: ContactAttrs { phone: Some("+5511987654321".into()), ..Default::default() }, ..Profile::default() };
    let s = answer(&p, local("America/Sao_Paulo", "2026-05-04T07:00"));
    assert_eq!(s.tz.source, TzSource::PhoneNumber);
    assert_eq!(s.tz.name, "America/Sao_Paulo");
    assert_eq!(s.windows.len(), 5);
    assert!(s.windows.iter().all(|w| w.start_hour >= 8 && w.end_hour <= 21), "{:?}", s.windows);
    assert!(s.windows.iter().all(|w| w.confidence == 0.0));
    assert!(s.reason.contains("no history"), "{}", s.reason);
    let (h, _, _) = local_hour(s.next_best_time.unwrap(), "America/Sao_Paulo");
    assert!((8..21).contains(&h));
    // No inbound message: the WhatsApp window is closed.
    assert!(!s.messaging.open && s.messaging.template_required);
    assert_eq!(s.engagement.median_reply_delay_secs, None);
}

#[test]
fn the_service_window_closes_24_hours_after_the_last_customer_message() {
    let t = local("UTC", "2026-06-01T10:00");
    let p = fold(with_zone("UTC"), &mut [ev(EventType::Inbound, t, "a"), ev(EventType::OutboundSent, t + 60, "b")], 60.0 * 86_400.0);
    let just_before = answer(&p, t + 24 * 3600 - 1);
    assert!(just_before.messaging.open && !just_before.messaging.template_required);
    assert_eq!(just_before.messaging.closes_at, Some(t + 24 * 3600));
    let at_edge = answer(&p, t + 24 * 3600);
    assert!(!at_edge.messaging.open && at_edge.messaging.template_required && at_edge.messaging.closes_at.is_none());
    // An outbound message does not reopen it; a read does not either.
    let mut evs = vec![ev(EventType::Inbound, t, "a"), ev(EventType::OutboundSent, t + 30 * 3600, "b"), ev(EventType::Read, t + 31 * 3600, "b")];
    let p = fold(with_zone("UTC"), &mut evs, 60.0 * 86_400.0);
    assert!(!answer(&p, t + 32 * 3600).messaging.open);
    // Telegram has no such window: the business may always write there.
    let prior = builtin_prior();
    let req = Request { now: t + 32 * 3600, horizon_secs: 86_400, channel: Channel::Telegram, quiet: QuietHours::NONE, max_windows: 1 };
    let utc = tz::from_attrs(&p.attrs).unwrap();
    let tg = suggest(&p, &prior, utc, &req, &ModelConfig::default()).messaging;
    assert!(tg.open && !tg.template_required && tg.closes_at.is_none() && tg.channel == Channel::Telegram, "{tg:?}");
    // The best moment inside the window falls before it closes.
    let open = answer(&fold(with_zone("UTC"), &mut [ev(EventType::Inbound, t, "a")], 60.0 * 86_400.0), t + 3600);
    let within = open.best_time_in_service_window.unwrap();
    assert!(within >= t + 3600 && within < t + 24 * 3600);
}

#[test]
fn out_of_order_and_duplicate_events_give_the_same_profile() {
    let zone = "America/Mexico_City";
    let evs = lunch_reader(zone);
    let a = fold(with_zone(zone), &mut evs.clone(), 30.0 * 86_400.0);
    let mut shuffled: Vec<Event> = evs.iter().rev().cloned().collect();
    shuffled.extend(evs.iter().take(10).cloned()); // duplicates
    // Folding sorts; the store applies events as they come, so check that path too.
    let mut b = Profile { attrs: with_zone(zone), ..Profile::default() };
    let z = tz::from_attrs(&b.attrs).unwrap();
    let mut seen = std::collections::HashSet::new();
    for e in &shuffled {
        if seen.insert(e.dedup_key()) {
            b.apply(e, Some(&z.tz), &z.name, 30.0 * 86_400.0);
        }
    }
    assert_eq!(a.events, b.events);
    for (x, y) in a.local.iter().zip(&b.local) {
        assert!((x - y).abs() <= 1e-4 * x.abs().max(1.0), "{x} vs {y}");
    }
    assert!((a.sent - b.sent).abs() < 1e-3 && (a.replied - b.replied).abs() < 1e-3, "{} {} / {} {}", a.sent, a.replied, b.sent, b.replied);
    assert_eq!(Profile::from_bytes(&b.to_bytes()), Some(b.clone()));
    assert_eq!(Profile::from_bytes(&b.to_bytes()[..100]), None);
}

#[test]
fn older_behaviour_fades() {
    let zone = "UTC";
    // Mornings a year ago, evenings in the last month.
    let mut evs = Vec::new();
    for d in 0..30 {
        evs.push(ev(EventType::Inbound, local(zone, "2025-05-01T09:30") + d * 86_400, &format!("old{d}")));
        evs.push(ev(EventType::Inbound, local(zone, "2026-04-01T19:30") + d * 86_400, &format!("new{d}")));
    }
    let p = fold(with_zone(zone), &mut evs, 30.0 * 86_400.0);
    let s = answer(&p, local(zone, "2026-05-01T08:00"));
    assert!(s.windows[0].start_hour <= 19 && s.windows[0].end_hour > 19, "{:?}", s.windows);
}

#[test]
fn opt_out_suppresses_suggestions_until_opt_in() {
    let t = local("UTC", "2026-06-01T10:00");
    let mut evs = vec![ev(EventType::Inbound, t, "a"), ev(EventType::OptOut, t + 100, "")];
    let p = fold(with_zone("UTC"), &mut evs.clone(), 60.0 * 86_400.0);
    let s = answer(&p, t + 3600);
    assert!(s.opted_out && s.next_best_time.is_none() && s.reason.contains("opted out"));
    evs.push(ev(EventType::OptIn, t + 200, ""));
    let s = answer(&fold(with_zone("UTC"), &mut evs, 60.0 * 86_400.0), t + 3600);
    assert!(!s.opted_out && s.next_best_time.is_some());
}

#[tokio::test]
async fn the_store_dedups_keeps_counts_across_reopen_and_deletes() {
    let dir = std::env::temp_dir().join(format!("palaver-sendtime-unit-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let path = dir.join("engagement.redb");
    let mut evs = lunch_reader("UTC");
    evs[0].attrs.time_zone = Some("UTC".into());
    {
        let e = Engagement::open(Arc::new(RedbStore::open(&path).unwrap()), EngagementConfig::default()).unwrap();
        let r = e.record("t", evs.clone()).await.unwrap();
        assert_eq!((r.accepted, r.duplicates), (60, 0));
        let r = e.record("t", evs[..7].to_vec()).await.unwrap();
        assert_eq!((r.accepted, r.duplicates), (0, 7));
        e.close().await.unwrap();
    }
    let e = Engagement::open(Arc::new(RedbStore::open(&path).unwrap()), EngagementConfig::default()).unwrap();
    let p = e.profile("t", "c").unwrap().unwrap();
    assert_eq!(p.events, 60);
    assert!(e.profile("other-tenant", "c").unwrap().is_none());
    let req = Request { now: local("UTC", "2026-03-28T09:00"), horizon_secs: 86_400 * 7, channel: Channel::Unspecified, quiet: QuietHours::NONE, max_windows: 3 };
    let s = e.suggest("t", Subject::Stored { tenant: "t".into(), contact_id: "c".into() }, &req).unwrap();
    assert!(s.prior.contains("tenant"), "{}", s.prior);
    assert!(matches!(e.suggest("t", Subject::Stored { tenant: "t".into(), contact_id: "nobody".into() }, &req), Err(super::SendTimeError::UnknownContact(_))));
    // Two attribute updates in the same second both apply (they are not duplicates).
    let update = |q: u16| Event {
        kind: EventType::ContactUpdated,
        at: local("UTC", "2026-03-28T09:00"),
        message_id: String::new(),
        attrs: ContactAttrs { quiet_hours: Some(QuietHours { start_min: q, end_min: 480 }), ..Default::default() },
        ..ev(EventType::ContactUpdated, 0, "")
    };
    assert_eq!(e.record("t", vec![update(1200)]).await.unwrap().accepted, 1);
    assert_eq!(e.record("t", vec![update(1320)]).await.unwrap().accepted, 1);
    let p = e.profile("t", "c").unwrap().unwrap();
    assert_eq!((p.attrs.quiet_hours.unwrap().start_min, p.events), (1320, 60));
    assert!(e.delete("t", "c").await.unwrap());
    assert!(e.profile("t", "c").unwrap().is_none());
    // Deleted means forgotten: the same events count again.
    assert_eq!(e.record("t", evs).await.unwrap().accepted, 60);
    let _ = std::fs::remove_dir_all(&dir);
}
