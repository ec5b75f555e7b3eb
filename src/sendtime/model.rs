//! From a contact's counters to an answer: the propensity to engage in each
//! of the 168 hours of their week, ranked send windows, the next good moment
//! outside quiet hours, the service window and an engagement score.

use super::events::{fmt_time, Channel, QuietHours};
use super::profile::{Profile, HOURS};
use super::tz::ResolvedTz;
use jiff::tz::TimeZone;
use jiff::{civil, Timestamp, ToSpan};

#[derive(Clone, Debug)]
pub struct ModelConfig {
    /// Older behaviour counts half after this long.
    pub half_life_secs: f64,
    /// Pseudo-events of the population prior a contact's own history is
    /// weighed against: 3 events are mostly prior, 300 mostly their own.
    pub prior_strength: f32,
    /// Share of each hour's weight pooled with the same hour on the other days
    /// of its kind (weekdays or weekend): sparse histories borrow from
    /// similar days.
    pub day_pooling: f32,
    /// Widest window, in hours.
    pub max_window_hours: usize,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig { half_life_secs: 60.0 * 86_400.0, prior_strength: 8.0, day_pooling: 0.5, max_window_hours: 3 }
    }
}

/// What the population (the tenant's contacts, by country or channel) says.
#[derive(Clone, Debug)]
pub struct PriorView {
    /// Share of engagement per local hour of the week; sums to 1.
    pub hours: [f32; HOURS],
    /// Reply-within-24-hours rate of outbound messages, and its weight.
    pub reply_rate: f32,
    pub reply_strength: f32,
    /// Where it came from ("country BR", "built-in").
    pub label: String,
}

/// A daytime pattern for when nothing is known yet: weekdays 09-21 with lunch
/// and evening peaks, weekends later and flatter, nights near zero.
pub fn builtin_prior() -> PriorView {
    let mut hours = [0.0f32; HOURS];
    for (i, v) in hours.iter_mut().enumerate() {
        let (day, h) = (i / 24, i % 24);
        let weekend = day >= 5;
        *v = match h {
            0..=6 => 0.05,
            7 | 8 => if weekend { 0.2 } else { 0.5 },
            9..=11 => if weekend { 0.6 } else { 0.9 },
            12 | 13 => 1.2,
            14..=17 => if weekend { 0.9 } else { 0.8 },
            18 | 19 => 1.0,
            20 | 21 => if weekend { 1.0 } else { 0.9 },
            _ => 0.3,
        };
    }
    normalise(&mut hours);
    PriorView { hours, reply_rate: 0.3, reply_strength: 4.0, label: "built-in daytime pattern".into() }
}

pub fn normalise(h: &mut [f32; HOURS]) {
    let s: f32 = h.iter().sum();
    if s > 0.0 {
        h.iter_mut().for_each(|v| *v /= s);
    } else {
        h.fill(1.0 / HOURS as f32);
    }
}

#[derive(Clone, Debug)]
pub struct Request {
    pub now: i64,
    pub horizon_secs: i64,
    pub channel: Channel,
    pub quiet: QuietHours,
    pub max_windows: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Window {
    /// 0 = Monday.
    pub weekday: u8,
    pub start_hour: u8,
    /// Exclusive; 24 = midnight.
    pub end_hour: u8,
    pub next_start: i64,
    pub next_end: i64,
    /// Share of the contact's weekly engagement expected inside it.
    pub share: f32,
    /// Mean propensity relative to an average hour (1.0 = average).
    pub lift: f32,
    /// Share of this estimate that comes from the contact's own history.
    pub confidence: f32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct MessagingWindow {
    pub channel: Channel,
    pub open: bool,
    pub closes_at: Option<i64>,
    pub template_required: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Engagement {
    /// Probability of a reply within 24 hours of a message sent at the best time.
    pub reply_probability_24h: f32,
    pub recency_secs: Option<i64>,
    /// Engagement events in about the last 30 days.
    pub frequency_30d: f32,
    pub median_reply_delay_secs: Option<f64>,
    pub events: u32,
}

#[derive(Clone, Debug)]
pub struct Suggestion {
    pub windows: Vec<Window>,
    pub next_best_time: Option<i64>,
    /// The best moment before the service window closes, when it is open.
    pub best_time_in_service_window: Option<i64>,
    pub messaging: MessagingWindow,
    pub engagement: Engagement,
    pub tz: ResolvedTz,
    pub quiet: QuietHours,
    pub opted_out: bool,
    pub prior: String,
    pub reason: String,
}

/// The contact's propensity per local hour of the week (sums to 1) and the
/// share of each hour's estimate that is their own evidence.
pub fn propensity(local: &[f32; HOURS], age: f32, prior: &[f32; HOURS], cfg: &ModelConfig) -> ([f32; HOURS], [f32; HOURS], f32) {
    let counts: Vec<f32> = local.iter().map(|v| v * age).collect();
    let n: f32 = counts.iter().sum();
    // Pool with the same hour on days of the same kind.
    let mut pooled = [0.0f32; HOURS];
    for h in 0..24 {
        let (wd, we) = ((0..5).map(|d| counts[d * 24 + h]).sum::<f32>() / 5.0, (5..7).map(|d| counts[d * 24 + h]).sum::<f32>() / 2.0);
        for d in 0..7 {
            let mean = if d < 5 { wd } else { we };
            pooled[d * 24 + h] = (1.0 - cfg.day_pooling) * counts[d * 24 + h] + cfg.day_pooling * mean;
        }
    }
    // Smooth over neighbouring hours (the week wraps around): someone active
    // at 22:40 is likelier than not to read at 20:00 too.
    const KERNEL: [f32; 7] = [0.05, 0.1, 0.2, 0.3, 0.2, 0.1, 0.05];
    let mut own = [0.0f32; HOURS];
    for h in 0..HOURS {
        own[h] = KERNEL.iter().enumerate().map(|(i, k)| k * pooled[(h + HOURS + i - 3) % HOURS]).sum();
    }
    let k = cfg.prior_strength;
    let mut p = [0.0f32; HOURS];
    let mut evidence = [0.0f32; HOURS];
    for h in 0..HOURS {
        let prior_part = k * prior[h];
        p[h] = (own[h] + prior_part) / (n + k);
        evidence[h] = if own[h] + prior_part > 0.0 { own[h] / (own[h] + prior_part) } else { 0.0 };
    }
    (p, evidence, n)
}

fn allowed_hour(quiet: QuietHours, hour_of_day: usize) -> bool {
    let start = (hour_of_day * 60) as u16;
    !(start..start + 60).any(|m| quiet.contains(m))
}

/// Ranked windows: the best hour outside quiet hours, widened within its day
/// to neighbours at least 70% as good, then the next best elsewhere.
pub fn windows(p: &[f32; HOURS], evidence: &[f32; HOURS], quiet: QuietHours, max: usize, max_width: usize) -> Vec<(u8, u8, u8, f32, f32, f32)> {
    let mut used = [false; HOURS];
    for (h, u) in used.iter_mut().enumerate() {
        *u = !allowed_hour(quiet, h % 24);
    }
    let mut out = Vec::new();
    while out.len() < max {
        let Some(best) = (0..HOURS).filter(|&h| !used[h]).max_by(|&a, &b| p[a].total_cmp(&p[b]).then(b.cmp(&a))) else { break };
        let day = best / 24;
        let (mut s, mut e) = (best, best + 1);
        let ok = |h: usize, used: &[bool; HOURS]| h / 24 == day && !used[h] && p[h] >= 0.7 * p[best];
        while e - s < max_width {
            let left = s.checked_sub(1).filter(|&h| ok(h, &used));
            let right = Some(e).filter(|&h| h < HOURS && ok(h, &used));
            match (left, right) {
                (Some(l), Some(r)) => if p[l] >= p[r] { s = l } else { e = r + 1 },
                (Some(l), None) => s = l,
                (None, Some(r)) => e = r + 1,
                (None, None) => break,
            }
        }
        let share: f32 = p[s..e].iter().sum();
        let lift = share / (e - s) as f32 * HOURS as f32;
        let conf = (s..e).map(|h| evidence[h] * p[h]).sum::<f32>() / share.max(1e-12);
        out.push((day as u8, (s % 24) as u8, ((e - 1) % 24 + 1) as u8, share, lift, conf));
        // Keep windows apart: the hours next to this one are not a new window.
        used[s.saturating_sub(1)..(e + 1).min(HOURS)].fill(true);
    }
    out
}

fn weekday_of(d: u8) -> jiff::civil::Weekday {
    jiff::civil::Weekday::from_monday_zero_offset(d as i8).unwrap()
}

fn at_local(date: civil::Date, hour: u8, tz: &TimeZone) -> i64 {
    let dt = if hour >= 24 { date.tomorrow().unwrap_or(date).at(0, 0, 0, 0) } else { date.at(hour as i8, 0, 0, 0) };
    dt.to_zoned(tz.clone()).map(|z| z.timestamp().as_second()).unwrap_or(0)
}

/// The next (or current) occurrence of a weekly window in `tz`.
pub fn next_occurrence(now: i64, tz: &TimeZone, weekday: u8, start: u8, end: u8) -> (i64, i64) {
    let today = Timestamp::from_second(now).unwrap_or_default().to_zoned(tz.clone()).date();
    let wd = weekday_of(weekday);
    for i in 0..=7 {
        let Ok(d) = today.checked_add(i.days()) else { break };
        if d.weekday() != wd {
            continue;
        }
        let (s, e) = (at_local(d, start, tz), at_local(d, end, tz));
        if e > now {
            return (s, e);
        }
    }
    (0, 0)
}

/// Candidate moments: now, then each local hour boundary within the horizon;
/// quiet ones dropped. Returns (instant, hour of week).
fn candidates(now: i64, horizon_secs: i64, tz: &TimeZone, quiet: QuietHours) -> Vec<(i64, usize)> {
    let mut out = Vec::new();
    let Ok(start) = Timestamp::from_second(now) else { return out };
    let mut z = start.to_zoned(tz.clone());
    let end = now + horizon_secs;
    let mut first = true;
    loop {
        let t = z.timestamp().as_second();
        if t >= end {
            break;
        }
        let minute = z.hour() as u16 * 60 + z.minute() as u16;
        if !quiet.contains(minute) {
            out.push((t, z.weekday().to_monday_zero_offset() as usize * 24 + z.hour() as usize));
        }
        // Move to the next local hour boundary.
        let step = if first { 3600 - (z.minute() as i64 * 60 + z.second() as i64) } else { 3600 };
        first = false;
        match z.checked_add(step.seconds()) {
            Ok(n) => z = n,
            Err(_) => break,
        }
    }
    out
}

/// The earliest candidate at least 90% as good as the best one: a moment
/// almost as good today beats the perfect one next Thursday.
fn earliest_good(c: &[(i64, usize)], p: &[f32; HOURS]) -> Option<i64> {
    let best = c.iter().map(|&(_, h)| p[h]).fold(f32::MIN, f32::max);
    c.iter().find(|&&(_, h)| p[h] >= 0.9 * best).map(|&(t, _)| t)
}

pub fn suggest(profile: &Profile, prior: &PriorView, tz: ResolvedTz, req: &Request, cfg: &ModelConfig) -> Suggestion {
    let age = if profile.events > 0 { profile.age_factor(req.now, cfg.half_life_secs) } else { 0.0 };
    // Local bins are exact when they were kept in this zone; otherwise shift
    // the UTC bins by the zone's offset now.
    let local = if !profile.local_tz.is_empty() && profile.local_tz == tz.name {
        profile.local
    } else {
        let off = tz.tz.to_offset(Timestamp::from_second(req.now).unwrap_or_default()).seconds() as f64 / 3600.0;
        super::profile::shift(&profile.utc, off.round() as i64)
    };
    let (p, evidence, n) = propensity(&local, age, &prior.hours, cfg);
    let wins: Vec<Window> = windows(&p, &evidence, req.quiet, req.max_windows, cfg.max_window_hours)
        .into_iter()
        .map(|(weekday, start_hour, end_hour, share, lift, confidence)| {
            let (next_start, next_end) = next_occurrence(req.now, &tz.tz, weekday, start_hour, end_hour);
            Window { weekday, start_hour, end_hour, next_start, next_end, share, lift, confidence }
        })
        .collect();

    let channel = if req.channel == Channel::Unspecified { profile.main_channel() } else { req.channel };
    let last_in = profile.last_inbound(channel);
    let messaging = match channel.service_window_secs() {
        Some(w) => {
            let closes = last_in.map(|t| t + w).filter(|&c| c > req.now);
            MessagingWindow { channel, open: closes.is_some(), closes_at: closes, template_required: closes.is_none() }
        }
        None => MessagingWindow { channel, open: true, closes_at: None, template_required: false },
    };

    let cands = if profile.opted_out { Vec::new() } else { candidates(req.now, req.horizon_secs, &tz.tz, req.quiet) };
    let next_best_time = earliest_good(&cands, &p);
    let best_time_in_service_window = messaging
        .closes_at
        .and_then(|c| earliest_good(&cands.iter().copied().filter(|&(t, _)| t < c).collect::<Vec<_>>(), &p));

    let sent = profile.sent * age;
    let replied = profile.replied * age;
    let base = (replied + prior.reply_strength * prior.reply_rate) / (sent + prior.reply_strength);
    let lift_best = next_best_time
        .and_then(|t| cands.iter().find(|c| c.0 == t))
        .map(|&(_, h)| p[h] * HOURS as f32)
        .unwrap_or(1.0);
    // A heuristic, stated as one: better hours raise the odds of a reply, damped
    // because hours with few observations overstate their lift.
    let odds = base / (1.0 - base).max(1e-6) * lift_best.sqrt().clamp(0.5, 3.0);
    let engagement = Engagement {
        reply_probability_24h: (odds / (1.0 + odds)).clamp(0.0, 0.999),
        recency_secs: (profile.last_engaged_at > 0).then(|| (req.now - profile.last_engaged_at).max(0)),
        frequency_30d: profile.recent * (-((req.now - profile.ref_time).max(0) as f64) / (30.0 * 86_400.0)).exp() as f32,
        median_reply_delay_secs: profile.median_reply_delay(),
        events: profile.events,
    };
    let reason = explain(profile, &wins, &engagement, &messaging, &tz, n / (n + cfg.prior_strength), req.now);
    Suggestion {
        windows: wins,
        next_best_time,
        best_time_in_service_window,
        messaging,
        engagement,
        tz,
        quiet: req.quiet,
        opted_out: profile.opted_out,
        prior: prior.label.clone(),
        reason,
    }
}

const DAYS: [&str; 7] = ["Mondays", "Tuesdays", "Wednesdays", "Thursdays", "Fridays", "Saturdays", "Sundays"];

pub fn fmt_duration(secs: f64) -> String {
    match secs {
        s if s < 90.0 => format!("{} seconds", s.round().max(1.0)),
        s if s < 5400.0 => format!("{} minutes", (s / 60.0).round()),
        s if s < 2.0 * 86_400.0 => format!("{} hours", (s / 3600.0).round()),
        s => format!("{} days", (s / 86_400.0).round()),
    }
}

/// "replies within 10 minutes on weekdays 12:00-14:00; 41 events; ..."
fn explain(profile: &Profile, wins: &[Window], e: &Engagement, m: &MessagingWindow, tz: &ResolvedTz, own: f32, now: i64) -> String {
    let mut parts = Vec::new();
    if profile.opted_out {
        parts.push(format!("opted out on {}: do not message", fmt_time(profile.opt_at)));
    }
    let when = wins.first().map(|w| {
        let same: Vec<u8> = wins.iter().filter(|o| o.start_hour == w.start_hour && o.end_hour == w.end_hour).map(|o| o.weekday).collect();
        let days = if same.len() >= 3 && same.iter().all(|&d| d < 5) {
            "weekdays".to_string()
        } else if same.len() == 2 && same.iter().all(|&d| d >= 5) {
            "weekends".to_string()
        } else {
            DAYS[w.weekday as usize].to_string()
        };
        format!("{days} {:02}:00-{:02}:00", w.start_hour, w.end_hour)
    });
    let activity = match (e.median_reply_delay_secs, profile.events) {
        (_, 0) => "no history yet, so the population's pattern".to_string(),
        (Some(d), _) => format!("replies within {}", fmt_duration(d)),
        (None, _) => "active".to_string(),
    };
    match when {
        Some(w) => parts.push(format!("{activity} on {w}")),
        None => parts.push(format!("{activity}; every hour falls in quiet hours")),
    }
    parts.push(format!("{} events ({:.0}% of the estimate their own)", profile.events, 100.0 * own));
    let mut z = format!("time zone {} from {}", tz.name, tz.source.name());
    if tz.approximate {
        z.push_str(" (approximate)");
    }
    parts.push(z);
    match (m.open, m.closes_at) {
        (true, Some(c)) => parts.push(format!("{} window open for {} more", m.channel.name(), fmt_duration((c - now) as f64))),
        (false, _) => parts.push(format!("{} window closed: template required", m.channel.name())),
        _ => {}
    }
    parts.join("; ")
}
