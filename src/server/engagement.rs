//! gRPC adapter of the `Engagement` service: wire conversions and streaming;
//! the store and the model live in `crate::sendtime`.

use crate::proto::v1 as pb;
use crate::sendtime::events::{now_secs, validate_contact_id, validate_time, Channel, ContactAttrs, Event, EventType, QuietHours};
use crate::sendtime::model::Suggestion;
use crate::sendtime::tz::TzSource;
use crate::sendtime::{validate_horizon, Engagement, SendTimeError, Subject, SuggestRequest, DEFAULT_WINDOWS, MAX_WINDOWS};
use futures_util::{FutureExt, StreamExt};
use std::pin::Pin;
use std::time::Instant;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// Events committed together while a RecordEvents stream is read.
const RECORD_CHUNK: usize = 4096;
/// ScoreContacts requests scored together (on the blocking pool, in parallel).
const SCORE_CHUNK: usize = 256;
/// Inline events one request may carry.
const MAX_INLINE_EVENTS: usize = 10_000;

pub struct EngagementService {
    engagement: Engagement,
}

impl EngagementService {
    pub fn new(engagement: Engagement) -> Self {
        Self { engagement }
    }
}

fn ts(t: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: t, nanos: 0 }
}

fn validate_tenant(t: &str, field: &str) -> Result<(), SendTimeError> {
    if t.len() > 256 || t.chars().any(char::is_control) {
        return Err(SendTimeError::invalid(field, "at most 256 bytes, no control characters"));
    }
    Ok(())
}

fn attrs_from_wire(a: Option<pb::ContactAttributes>, field: &str) -> Result<ContactAttrs, SendTimeError> {
    let Some(a) = a else { return Ok(ContactAttrs::default()) };
    let quiet_hours = a.quiet_hours.map(|q| QuietHours::new(q.start_minute, q.end_minute, &format!("{field}.quiet_hours"))).transpose()?;
    let mut attrs = ContactAttrs { time_zone: a.time_zone, country: a.country, phone: a.phone, quiet_hours };
    attrs.validate(field)?;
    Ok(attrs)
}

fn attrs_to_wire(a: &ContactAttrs) -> pb::ContactAttributes {
    pb::ContactAttributes {
        time_zone: a.time_zone.clone(),
        country: a.country.clone(),
        phone: a.phone.clone(),
        quiet_hours: a.quiet_hours.map(|q| pb::QuietHours { start_minute: q.start_min as u32, end_minute: q.end_min as u32 }),
    }
}

fn channel_from_wire(c: i32, field: &str) -> Result<Channel, SendTimeError> {
    let c = pb::Channel::try_from(c).map_err(|_| SendTimeError::invalid(field, format!("unknown channel {c}")))?;
    Ok(match c {
        pb::Channel::Unspecified => Channel::Unspecified,
        pb::Channel::Whatsapp => Channel::WhatsApp,
        pb::Channel::Telegram => Channel::Telegram,
        pb::Channel::Viber => Channel::Viber,
        pb::Channel::Sms => Channel::Sms,
        pb::Channel::Email => Channel::Email,
        pb::Channel::Other => Channel::Other,
    })
}

fn channel_to_wire(c: Channel) -> pb::Channel {
    match c {
        Channel::Unspecified => pb::Channel::Unspecified,
        Channel::WhatsApp => pb::Channel::Whatsapp,
        Channel::Telegram => pb::Channel::Telegram,
        Channel::Viber => pb::Channel::Viber,
        Channel::Sms => pb::Channel::Sms,
        Channel::Email => pb::Channel::Email,
        Channel::Other => pb::Channel::Other,
    }
}

/// A wire event, validated; `field` names it in errors (`events[3]`).
pub fn event_from_wire(e: pb::EngagementEvent, now: i64, field: &str) -> Result<(String, Event), SendTimeError> {
    validate_tenant(&e.tenant, &format!("{field}.tenant"))?;
    let kind = match pb::EventType::try_from(e.r#type) {
        Ok(pb::EventType::Unspecified) => return Err(SendTimeError::invalid(format!("{field}.type"), "must be set")),
        Ok(t) => EventType::parse(t.as_str_name()).expect("wire names match"),
        Err(_) => return Err(SendTimeError::invalid(format!("{field}.type"), format!("unknown event type {}", e.r#type))),
    };
    let at = e.occurred_at.ok_or_else(|| SendTimeError::invalid(format!("{field}.occurred_at"), "required"))?.seconds;
    let mut ev = Event {
        contact_id: e.contact_id,
        kind,
        at,
        channel: channel_from_wire(e.channel, &format!("{field}.channel"))?,
        message_id: e.message_id,
        attrs: ContactAttrs::default(),
    };
    let attrs = e.attributes.map(|a| attrs_from_wire(Some(a), &format!("{field}.attributes"))).transpose()?;
    ev.attrs = attrs.unwrap_or_default();
    ev.validate(now, field)?;
    Ok((e.tenant, ev))
}

/// Validates a request and turns it into the model's question.
fn question(engagement: &Engagement, r: pb::SuggestSendWindowsRequest, field: &str) -> Result<(String, Subject, SuggestRequest), SendTimeError> {
    let server_now = now_secs();
    validate_tenant(&r.tenant, &format!("{field}tenant"))?;
    let now = match r.now {
        Some(t) => {
            validate_time(t.seconds, server_now, &format!("{field}now"))?;
            t.seconds
        }
        None => server_now,
    };
    let cfg = engagement.config();
    let horizon = if r.horizon_hours == 0 { 168 } else { r.horizon_hours as i64 } * 3600;
    validate_horizon(horizon, cfg.max_horizon_secs, &format!("{field}horizon_hours"))?;
    let max_windows = match r.max_windows as usize {
        0 => DEFAULT_WINDOWS,
        n if n > MAX_WINDOWS => {
            return Err(SendTimeError::invalid(format!("{field}max_windows"), format!("{n}; the limit is {MAX_WINDOWS}")));
        }
        n => n,
    };
    let quiet = match r.quiet_hours {
        Some(q) => QuietHours::new(q.start_minute, q.end_minute, &format!("{field}quiet_hours"))?,
        None => cfg.quiet_hours,
    };
    let channel = channel_from_wire(r.channel, &format!("{field}channel"))?;
    let subject = match r.contact {
        None => return Err(SendTimeError::invalid(format!("{field}contact"), "set contact_id or inline")),
        Some(pb::suggest_send_windows_request::Contact::ContactId(id)) => {
            validate_contact_id(&id, &format!("{field}contact_id"))?;
            Subject::Stored { tenant: r.tenant.clone(), contact_id: id }
        }
        Some(pb::suggest_send_windows_request::Contact::Inline(c)) => {
            if c.events.len() > MAX_INLINE_EVENTS {
                return Err(SendTimeError::invalid(
                    format!("{field}inline.events"),
                    format!("{} events; the limit is {MAX_INLINE_EVENTS}", c.events.len()),
                ));
            }
            let attrs = attrs_from_wire(c.attributes, &format!("{field}inline.attributes"))?;
            let mut events = Vec::with_capacity(c.events.len());
            for (i, e) in c.events.into_iter().enumerate() {
                events.push(event_from_wire(e, server_now.max(now), &format!("{field}inline.events[{i}]"))?.1);
            }
            Subject::Inline { contact_id: c.contact_id, attrs, events }
        }
    };
    Ok((r.tenant, subject, SuggestRequest { now, horizon_secs: horizon, channel, quiet, max_windows }))
}

fn tz_source(s: TzSource) -> pb::TimeZoneSource {
    match s {
        TzSource::Contact => pb::TimeZoneSource::Contact,
        TzSource::PhoneNumber => pb::TimeZoneSource::PhoneNumber,
        TzSource::Country => pb::TimeZoneSource::Country,
        TzSource::InferredFromActivity => pb::TimeZoneSource::InferredFromActivity,
        TzSource::Default => pb::TimeZoneSource::Default,
    }
}

pub fn suggestion_to_wire(s: &Suggestion, total_ms: f64) -> pb::SuggestSendWindowsResponse {
    pb::SuggestSendWindowsResponse {
        windows: s
            .windows
            .iter()
            .map(|w| pb::SendWindow {
                weekday: w.weekday as i32 + 1,
                weekend: w.weekday >= 5,
                start_hour: w.start_hour as u32,
                end_hour: w.end_hour as u32,
                next_start: Some(ts(w.next_start)),
                next_end: Some(ts(w.next_end)),
                score: w.share,
                lift: w.lift,
                confidence: w.confidence,
            })
            .collect(),
        next_best_time: s.next_best_time.map(ts),
        best_time_in_messaging_window: s.best_time_in_service_window.map(ts),
        messaging_window: Some(pb::MessagingWindow {
            channel: channel_to_wire(s.messaging.channel) as i32,
            open: s.messaging.open,
            closes_at: s.messaging.closes_at.map(ts),
            template_required: s.messaging.template_required,
        }),
        engagement: Some(pb::EngagementScore {
            reply_probability_24h: s.engagement.reply_probability_24h,
            recency_hours: s.engagement.recency_secs.map(|r| r as f64 / 3600.0),
            frequency_30d: s.engagement.frequency_30d,
            median_reply_delay_seconds: s.engagement.median_reply_delay_secs,
            events: s.engagement.events as u64,
        }),
        time_zone: s.tz.name.clone(),
        time_zone_source: tz_source(s.tz.source) as i32,
        time_zone_approximate: s.tz.approximate,
        quiet_hours: Some(pb::QuietHours { start_minute: s.quiet.start_min as u32, end_minute: s.quiet.end_min as u32 }),
        opted_out: s.opted_out,
        prior: s.prior.clone(),
        reason: s.reason.clone(),
        total_ms,
    }
}

fn score_one(engagement: &Engagement, r: pb::ScoreContactsRequest) -> pb::ContactScore {
    let t = Instant::now();
    let Some(req) = r.request else {
        return pb::ContactScore { request_id: r.request_id, error: "request: required".into(), ..Default::default() };
    };
    let contact_id = match &req.contact {
        Some(pb::suggest_send_windows_request::Contact::ContactId(id)) => id.clone(),
        Some(pb::suggest_send_windows_request::Contact::Inline(c)) => c.contact_id.clone(),
        None => String::new(),
    };
    let result = question(engagement, req, "request.").and_then(|(tenant, subject, q)| engagement.suggest(&tenant, subject, &q));
    match result {
        Ok(s) => pb::ContactScore {
            request_id: r.request_id,
            contact_id,
            result: Some(suggestion_to_wire(&s, t.elapsed().as_secs_f64() * 1e3)),
            error: String::new(),
        },
        Err(e) => pb::ContactScore { request_id: r.request_id, contact_id, result: None, error: e.to_string() },
    }
}

type ScoreStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::ContactScore, Status>> + Send>>;

#[tonic::async_trait]
impl pb::engagement_server::Engagement for EngagementService {
    async fn record_events(&self, req: Request<tonic::Streaming<pb::EngagementEvent>>) -> Result<Response<pb::RecordEventsResponse>, Status> {
        let t = Instant::now();
        let mut stream = req.into_inner();
        let mut total = crate::sendtime::Recorded::default();
        let mut index = 0usize;
        let mut done = false;
        while !done {
            let (items, end) = next_chunk(&mut stream, RECORD_CHUNK).await?;
            done = end;
            let now = now_secs();
            let mut chunk = Vec::with_capacity(items.len());
            for e in items {
                let field = format!("events[{index}]");
                index += 1;
                match event_from_wire(e, now, &field) {
                    Ok(ev) => chunk.push(ev),
                    Err(err) => {
                        // Commit what came before, then say where it stopped.
                        let r = self.record_chunk(chunk).await?;
                        let recorded = total.accepted + r.accepted + total.duplicates + r.duplicates;
                        return Err(Status::invalid_argument(format!(
                            "{err} ({recorded} earlier events are recorded; sending the stream again is safe: duplicates are not counted twice)"
                        )));
                    }
                }
            }
            let r = self.record_chunk(chunk).await?;
            total.accepted += r.accepted;
            total.duplicates += r.duplicates;
        }
        Ok(Response::new(pb::RecordEventsResponse {
            accepted: total.accepted,
            duplicates: total.duplicates,
            total_ms: t.elapsed().as_secs_f64() * 1e3,
        }))
    }

    async fn set_contact(&self, req: Request<pb::SetContactRequest>) -> Result<Response<pb::SetContactResponse>, Status> {
        let r = req.into_inner();
        validate_tenant(&r.tenant, "tenant")?;
        validate_contact_id(&r.contact_id, "contact_id")?;
        let attrs = attrs_from_wire(r.attributes, "attributes")?;
        if attrs.is_empty() {
            return Err(SendTimeError::invalid("attributes", "set at least one attribute").into());
        }
        let ev = Event { contact_id: r.contact_id, kind: EventType::ContactUpdated, at: now_secs(), channel: Channel::Unspecified, message_id: String::new(), attrs };
        self.engagement.record(&r.tenant, vec![ev]).await?;
        Ok(Response::new(pb::SetContactResponse {}))
    }

    async fn get_contact(&self, req: Request<pb::GetContactRequest>) -> Result<Response<pb::GetContactResponse>, Status> {
        let r = req.into_inner();
        validate_tenant(&r.tenant, "tenant")?;
        validate_contact_id(&r.contact_id, "contact_id")?;
        let p = self.engagement.profile(&r.tenant, &r.contact_id)?.ok_or_else(|| SendTimeError::UnknownContact(r.contact_id.clone()))?;
        Ok(Response::new(pb::GetContactResponse {
            contact_id: r.contact_id,
            attributes: Some(attrs_to_wire(&p.attrs)),
            events: p.events as u64,
            first_event_at: (p.events > 0).then(|| ts(p.first_at)),
            last_engaged_at: (p.last_engaged_at > 0).then(|| ts(p.last_engaged_at)),
            opted_out: p.opted_out,
        }))
    }

    async fn delete_contact(&self, req: Request<pb::DeleteContactRequest>) -> Result<Response<pb::DeleteContactResponse>, Status> {
        let r = req.into_inner();
        validate_tenant(&r.tenant, "tenant")?;
        validate_contact_id(&r.contact_id, "contact_id")?;
        let deleted = self.engagement.delete(&r.tenant, &r.contact_id).await?;
        Ok(Response::new(pb::DeleteContactResponse { deleted }))
    }

    async fn suggest_send_windows(&self, req: Request<pb::SuggestSendWindowsRequest>) -> Result<Response<pb::SuggestSendWindowsResponse>, Status> {
        let t = Instant::now();
        let (tenant, subject, q) = question(&self.engagement, req.into_inner(), "")?;
        let s = self.engagement.suggest(&tenant, subject, &q)?;
        Ok(Response::new(suggestion_to_wire(&s, t.elapsed().as_secs_f64() * 1e3)))
    }

    type ScoreContactsStream = ScoreStream;

    async fn score_contacts(&self, req: Request<tonic::Streaming<pb::ScoreContactsRequest>>) -> Result<Response<ScoreStream>, Status> {
        let mut input = req.into_inner();
        let engagement = self.engagement.clone();
        let (tx, rx) = mpsc::channel::<Result<pb::ContactScore, Status>>(SCORE_CHUNK);
        tokio::spawn(async move {
            loop {
                let (chunk, end) = match next_chunk(&mut input, SCORE_CHUNK).await {
                    Ok(c) => c,
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                };
                if !chunk.is_empty() {
                    let e = engagement.clone();
                    let scored = tokio::task::spawn_blocking(move || {
                        use rayon::prelude::*;
                        chunk.into_par_iter().map(|r| score_one(&e, r)).collect::<Vec<_>>()
                    })
                    .await;
                    let Ok(scored) = scored else {
                        let _ = tx.send(Err(Status::internal("scoring panicked"))).await;
                        return;
                    };
                    crate::metrics::global().contacts_scored.with(&[]).add(scored.len() as u64);
                    // Waiting for room here is the backpressure: nothing more
                    // is read from the client until the reader catches up.
                    for s in scored {
                        if tx.send(Ok(s)).await.is_err() {
                            return;
                        }
                    }
                }
                if end {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// What has already arrived on a client stream (waiting only for the first
/// item), up to `max`, and whether the stream has ended.
async fn next_chunk<T>(stream: &mut tonic::Streaming<T>, max: usize) -> Result<(Vec<T>, bool), Status> {
    let mut chunk = Vec::new();
    while chunk.len() < max {
        let next = if chunk.is_empty() { Some(stream.next().await) } else { stream.next().now_or_never() };
        match next {
            None => return Ok((chunk, false)),
            Some(None) => return Ok((chunk, true)),
            Some(Some(item)) => chunk.push(item?),
        }
    }
    Ok((chunk, false))
}

impl EngagementService {
    async fn record_chunk(&self, chunk: Vec<(String, Event)>) -> Result<crate::sendtime::Recorded, Status> {
        let mut total = crate::sendtime::Recorded::default();
        // Group by tenant, keeping each tenant's order.
        let mut by_tenant: Vec<(String, Vec<Event>)> = Vec::new();
        for (tenant, e) in chunk {
            match by_tenant.iter_mut().find(|(t, _)| *t == tenant) {
                Some((_, v)) => v.push(e),
                None => by_tenant.push((tenant, vec![e])),
            }
        }
        for (tenant, events) in by_tenant {
            let r = self.engagement.record(&tenant, events).await?;
            total.accepted += r.accepted;
            total.duplicates += r.duplicates;
        }
        Ok(total)
    }
}
