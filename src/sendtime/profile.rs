//! A contact's engagement history folded into compact decayed counters, so
//! ingest is O(1) per event and reads never rescan history.
//!
//! Every counter is kept "as of" `ref_time`, the latest event seen. A newer
//! event first decays everything to its own time; an older (out-of-order) one
//! is added with the weight it would have had, so arrival order does not
//! change the result beyond rounding.

use super::events::{Channel, ContactAttrs, Event, EventType, QuietHours};
use jiff::tz::TimeZone;

pub const HOURS: usize = 168;
/// Reply-delay histogram bucket upper bounds, in seconds (last: beyond 24 h).
pub const DELAY_BOUNDS: [i64; 16] =
    [30, 60, 120, 300, 600, 900, 1200, 1800, 2700, 3600, 7200, 14_400, 28_800, 43_200, 86_400, i64::MAX];
/// The `recent` counter's mean lifetime: "about the last 30 days".
const RECENT_SECS: f64 = 30.0 * 86_400.0;
/// Outbound messages remembered to match replies and reads to.
const MAX_PENDING: usize = 16;
/// A reply within this time after an outbound message counts as its answer.
pub const REPLY_WINDOW_SECS: i64 = 24 * 3600;

/// An outbound message waiting for its answer, or (arrived out of order) an
/// answer waiting for its outbound message: `reply_at > 0` and `at == 0`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pending {
    pub id_hash: u64,
    pub at: i64,
    pub replied: bool,
    pub reply_at: i64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Profile {
    pub attrs: ContactAttrs,
    /// The zone `local` was binned in ("" when no zone was known at ingest).
    pub local_tz: String,
    pub ref_time: i64,
    /// Decayed engagement weight per hour of the week (Monday 00:00 = 0).
    pub local: [f32; HOURS],
    pub utc: [f32; HOURS],
    /// Decayed outbound messages, and those answered within 24 hours.
    pub sent: f32,
    pub replied: f32,
    pub delays: [f32; DELAY_BOUNDS.len()],
    /// Engagement events with a ~30-day mean lifetime.
    pub recent: f32,
    /// Raw count of events folded in (duplicates excluded).
    pub events: u32,
    pub first_at: i64,
    pub last_engaged_at: i64,
    pub last_inbound: Vec<(Channel, i64)>,
    /// The latest opt-out or opt-in decides; `opt_at` orders them.
    pub opted_out: bool,
    pub opt_at: i64,
    pub pending: Vec<Pending>,
}

impl Default for Profile {
    fn default() -> Self {
        Profile {
            attrs: ContactAttrs::default(),
            local_tz: String::new(),
            ref_time: 0,
            local: [0.0; HOURS],
            utc: [0.0; HOURS],
            sent: 0.0,
            replied: 0.0,
            delays: [0.0; DELAY_BOUNDS.len()],
            recent: 0.0,
            events: 0,
            first_at: 0,
            last_engaged_at: 0,
            last_inbound: Vec::new(),
            opted_out: false,
            opt_at: 0,
            pending: Vec::new(),
        }
    }
}

/// Weight added to one hour of the week (for the population prior).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Contribution {
    pub hour: usize,
    pub weight: f32,
    pub at: i64,
}

/// What one event taught, for the population prior.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Applied {
    pub hours: Vec<Contribution>,
    /// An outbound message sent at this time.
    pub sent_at: Option<i64>,
    /// An outbound message sent at this time was answered within 24 hours.
    pub answered_sent_at: Option<i64>,
}

/// Hour of the week (Monday 00:00 = 0) of `t` in `tz`.
pub fn hour_of_week(t: i64, tz: &TimeZone) -> usize {
    let z = jiff::Timestamp::from_second(t).unwrap_or(jiff::Timestamp::UNIX_EPOCH).to_zoned(tz.clone());
    z.weekday().to_monday_zero_offset() as usize * 24 + z.hour() as usize
}

fn id_hash(s: &str) -> u64 {
    // FNV-1a: stable across runs and versions, unlike std's hasher.
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// Weight left after `dt_secs` with this half-life.
pub(crate) fn decay(dt_secs: i64, half_life_secs: f64) -> f32 {
    (-(dt_secs.max(0) as f64) * std::f64::consts::LN_2 / half_life_secs).exp() as f32
}

impl Profile {
    /// Brings every counter to time `t` (no-op for the past).
    fn advance(&mut self, t: i64, half_life_secs: f64) {
        if self.events == 0 {
            self.ref_time = t;
            return;
        }
        if t <= self.ref_time {
            return;
        }
        let dt = t - self.ref_time;
        let f = decay(dt, half_life_secs);
        for v in self.local.iter_mut().chain(self.utc.iter_mut()).chain(self.delays.iter_mut()) {
            *v *= f;
        }
        self.sent *= f;
        self.replied *= f;
        self.recent *= (-(dt as f64) / RECENT_SECS).exp() as f32;
        self.ref_time = t;
    }

    /// Folds one (validated, not duplicate) event in. `tz` is the zone local
    /// hours are binned in, if one is known now. Returns what the population
    /// prior should learn from it.
    pub fn apply(&mut self, e: &Event, tz: Option<&TimeZone>, tz_name: &str, half_life_secs: f64) -> Applied {
        self.attrs.merge(&e.attrs);
        let mut applied = Applied::default();
        match tz {
            Some(z) if self.events > 0 && self.local_tz != tz_name => self.rebin(z, tz_name),
            _ if self.events == 0 => self.local_tz = tz_name.to_string(),
            _ => {}
        }
        if e.kind == EventType::ContactUpdated {
            return applied;
        }
        self.advance(e.at, half_life_secs);
        let w = decay(self.ref_time - e.at, half_life_secs);
        if self.events == 0 || e.at < self.first_at {
            self.first_at = e.at;
        }
        self.events += 1;
        match e.kind {
            EventType::OutboundSent => {
                self.sent += w;
                applied.sent_at = Some(e.at);
                let id = id_hash(&e.message_id);
                let orphan = (!e.message_id.is_empty())
                    .then(|| self.pending.iter().position(|p| p.id_hash == id && p.at == 0 && p.reply_at >= e.at))
                    .flatten();
                if let Some(i) = orphan {
                    // Its answer came first: match them now.
                    let reply_at = self.pending.remove(i).reply_at;
                    self.pending.push(Pending { id_hash: id, at: e.at, replied: true, reply_at });
                    self.answered(e.at, reply_at, tz, half_life_secs, &mut applied);
                } else if !self.pending.iter().any(|p| p.id_hash == id && !e.message_id.is_empty()) {
                    self.pending.push(Pending { id_hash: id, at: e.at, replied: false, reply_at: 0 });
                }
                self.trim_pending();
            }
            // An older opt event than the one applied changes nothing.
            EventType::OptOut | EventType::OptIn if e.at >= self.opt_at => {
                self.opted_out = e.kind == EventType::OptOut;
                self.opt_at = e.at;
            }
            kind if kind.engagement_weight() > 0.0 => {
                let ew = kind.engagement_weight() * w;
                self.credit(e.at, ew, tz, &mut applied);
                self.recent += ew * (-((self.ref_time - e.at) as f64) / RECENT_SECS).exp() as f32;
                self.last_engaged_at = self.last_engaged_at.max(e.at);
                if kind == EventType::Inbound {
                    match self.last_inbound.iter_mut().find(|(c, _)| *c == e.channel) {
                        Some((_, t)) => *t = (*t).max(e.at),
                        None => self.last_inbound.push((e.channel, e.at)),
                    }
                }
                if matches!(kind, EventType::Inbound | EventType::Replied) {
                    // The answer to an outbound message: the named one for
                    // REPLIED, else the latest unanswered one within 24 h.
                    let named = (kind == EventType::Replied && !e.message_id.is_empty()).then(|| id_hash(&e.message_id));
                    let hit = self.pending.iter().rposition(|p| {
                        p.at > 0 && !p.replied && p.at <= e.at && e.at - p.at <= REPLY_WINDOW_SECS && named.is_none_or(|id| id == p.id_hash)
                    });
                    match (hit, named) {
                        (Some(i), _) => {
                            let p = &mut self.pending[i];
                            p.replied = true;
                            p.reply_at = e.at;
                            let sent_at = p.at;
                            self.answered(sent_at, e.at, tz, half_life_secs, &mut applied);
                        }
                        (None, Some(id)) if !self.pending.iter().any(|p| p.id_hash == id) => {
                            self.pending.push(Pending { id_hash: id, at: 0, replied: true, reply_at: e.at });
                            self.trim_pending();
                        }
                        _ => {}
                    }
                }
            }
            _ => {} // DELIVERED: the phone was on, nothing more.
        }
        applied
    }

    /// An outbound message sent at `sent_at` was answered at `reply_at`.
    fn answered(&mut self, sent_at: i64, reply_at: i64, tz: Option<&TimeZone>, half_life_secs: f64, applied: &mut Applied) {
        let delay = reply_at - sent_at;
        if !(0..=REPLY_WINDOW_SECS).contains(&delay) {
            return;
        }
        let w = decay(self.ref_time - reply_at, half_life_secs);
        self.replied += w;
        applied.answered_sent_at = Some(sent_at);
        let b = DELAY_BOUNDS.iter().position(|&ub| delay < ub).unwrap();
        self.delays[b] += w;
        // A fast answer says the *send* hour works: credit it, 1.0 for an
        // instant reply, fading over a couple of hours.
        let speed = (-(delay as f64) / 7200.0).exp() as f32 * w;
        self.credit(sent_at, speed, tz, applied);
    }

    /// Engagement weight at the hour of `at`, in UTC and (zone known) local time.
    fn credit(&mut self, at: i64, weight: f32, tz: Option<&TimeZone>, applied: &mut Applied) {
        self.utc[hour_of_week(at, &TimeZone::UTC)] += weight;
        if let Some(z) = tz {
            let h = hour_of_week(at, z);
            self.local[h] += weight;
            applied.hours.push(Contribution { hour: h, weight, at });
        }
    }

    /// Bounds the list: matched pairs go first (they only guard against
    /// double counting), then the oldest.
    fn trim_pending(&mut self) {
        self.pending.sort_by_key(|p| p.at.max(p.reply_at));
        while self.pending.len() > MAX_PENDING {
            let i = self.pending.iter().position(|p| p.at > 0 && p.replied).unwrap_or(0);
            self.pending.remove(i);
        }
    }

    /// Re-bins local hours for a newly known zone by shifting the UTC bins by
    /// its offset now (approximate across DST only for past events).
    pub fn rebin(&mut self, tz: &TimeZone, tz_name: &str) {
        let offset_h = (tz.to_offset(jiff::Timestamp::from_second(self.ref_time.max(0)).unwrap_or_default()).seconds() as f64 / 3600.0).round() as i64;
        self.local = shift(&self.utc, offset_h);
        self.local_tz = tz_name.to_string();
    }

    pub fn last_inbound(&self, channel: Channel) -> Option<i64> {
        self.last_inbound.iter().filter(|(c, _)| channel == Channel::Unspecified || *c == channel).map(|(_, t)| *t).max()
    }

    /// The channel the customer last wrote on.
    pub fn main_channel(&self) -> Channel {
        self.last_inbound.iter().max_by_key(|(_, t)| *t).map(|(c, _)| *c).unwrap_or_default()
    }

    /// Decay factor from `ref_time` to `now`.
    pub fn age_factor(&self, now: i64, half_life_secs: f64) -> f32 {
        decay(now - self.ref_time, half_life_secs)
    }

    /// Median of the reply-delay histogram, interpolated on a log scale
    /// within the bucket; `None` without any answered message.
    pub fn median_reply_delay(&self) -> Option<f64> {
        let total: f32 = self.delays.iter().sum();
        if total <= 1e-6 {
            return None;
        }
        let mut acc = 0.0f32;
        for (i, &c) in self.delays.iter().enumerate() {
            if acc + c >= total / 2.0 && c > 0.0 {
                let lo = if i == 0 { 10.0 } else { DELAY_BOUNDS[i - 1] as f64 };
                let hi = if DELAY_BOUNDS[i] == i64::MAX { 2.0 * 86_400.0 } else { DELAY_BOUNDS[i] as f64 };
                let frac = ((total / 2.0 - acc) / c).clamp(0.0, 1.0) as f64;
                return Some((lo.ln() + frac * (hi.ln() - lo.ln())).exp());
            }
            acc += c;
        }
        None
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(1500);
        b.push(2u8); // format version
        put_str(&mut b, &self.local_tz);
        for s in [&self.attrs.time_zone, &self.attrs.country, &self.attrs.phone] {
            put_str(&mut b, s.as_deref().unwrap_or(""));
        }
        let q = self.attrs.quiet_hours.unwrap_or(QuietHours::NONE);
        b.extend_from_slice(&q.start_min.to_le_bytes());
        b.extend_from_slice(&q.end_min.to_le_bytes());
        b.push(self.attrs.quiet_hours.is_some() as u8);
        for v in [self.ref_time, self.first_at, self.last_engaged_at, self.opt_at] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&self.events.to_le_bytes());
        b.push(self.opted_out as u8);
        for v in self.local.iter().chain(&self.utc).chain(&self.delays).chain([&self.sent, &self.replied, &self.recent]) {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.push(self.last_inbound.len() as u8);
        for (c, t) in &self.last_inbound {
            b.push(c.code());
            b.extend_from_slice(&t.to_le_bytes());
        }
        b.push(self.pending.len() as u8);
        for p in &self.pending {
            b.extend_from_slice(&p.id_hash.to_le_bytes());
            b.extend_from_slice(&p.at.to_le_bytes());
            b.push(p.replied as u8);
            b.extend_from_slice(&p.reply_at.to_le_bytes());
        }
        b
    }

    pub fn from_bytes(b: &[u8]) -> Option<Profile> {
        let mut r = Reader(b);
        if r.u8()? != 2 {
            return None;
        }
        let mut p = Profile { local_tz: r.str()?, ..Profile::default() };
        let opt = |s: String| (!s.is_empty()).then_some(s);
        p.attrs.time_zone = opt(r.str()?);
        p.attrs.country = opt(r.str()?);
        p.attrs.phone = opt(r.str()?);
        let q = QuietHours { start_min: r.u16()?, end_min: r.u16()? };
        p.attrs.quiet_hours = (r.u8()? == 1).then_some(q);
        p.ref_time = r.i64()?;
        p.first_at = r.i64()?;
        p.last_engaged_at = r.i64()?;
        p.opt_at = r.i64()?;
        p.events = r.u32()?;
        p.opted_out = r.u8()? == 1;
        for v in p.local.iter_mut().chain(p.utc.iter_mut()).chain(p.delays.iter_mut()) {
            *v = r.f32()?;
        }
        p.sent = r.f32()?;
        p.replied = r.f32()?;
        p.recent = r.f32()?;
        for _ in 0..r.u8()? {
            p.last_inbound.push((Channel::from_code(r.u8()?), r.i64()?));
        }
        for _ in 0..r.u8()? {
            p.pending.push(Pending { id_hash: r.u64()?, at: r.i64()?, replied: r.u8()? == 1, reply_at: r.i64()? });
        }
        r.0.is_empty().then_some(p)
    }
}

/// Rotates hour-of-week bins by `hours` (positive: UTC to a zone east of it).
pub fn shift(bins: &[f32; HOURS], hours: i64) -> [f32; HOURS] {
    let mut out = [0.0; HOURS];
    for (h, v) in bins.iter().enumerate() {
        out[(h as i64 + hours).rem_euclid(HOURS as i64) as usize] = *v;
    }
    out
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u16).to_le_bytes());
    b.extend_from_slice(s.as_bytes());
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|a| a[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|a| u16::from_le_bytes(a.try_into().unwrap()))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|a| u32::from_le_bytes(a.try_into().unwrap()))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|a| u64::from_le_bytes(a.try_into().unwrap()))
    }
    fn i64(&mut self) -> Option<i64> {
        self.u64().map(|v| v as i64)
    }
    fn f32(&mut self) -> Option<f32> {
        self.u32().map(f32::from_bits)
    }
    fn str(&mut self) -> Option<String> {
        let n = self.u16()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
}
