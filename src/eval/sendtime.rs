//! Send-time backtest on real activity: fit each customer on their earlier
//! events, then count how much of their later activity falls inside the
//! suggested windows, against a global best hour and the customer's own most
//! frequent hour, all in one run.

use crate::sendtime::events::{parse_time, Channel, ContactAttrs, Event, EventType, QuietHours};
use crate::sendtime::model::{normalise, suggest, ModelConfig, PriorView, Request};
use crate::sendtime::profile::{hour_of_week, HOURS};
use crate::sendtime::tz::{ResolvedTz, TzSource};
use std::collections::HashMap;
use std::path::Path;

/// One customer's events, oldest first.
pub type Histories = HashMap<String, Vec<Event>>;

fn push(h: &mut Histories, contact: &str, kind: EventType, at: i64, id: &str) {
    h.entry(contact.to_string()).or_default().push(Event {
        contact_id: contact.to_string(),
        kind,
        at,
        channel: Channel::Other,
        message_id: id.to_string(),
        attrs: ContactAttrs::default(),
    });
}

/// twcs: customers' tweets are INBOUND_MESSAGE; a company tweet answering a
/// customer tweet is OUTBOUND_SENT to that customer.
pub fn load_twcs(path: &Path, h: &mut Histories) -> Result<(), String> {
    let mut r = csv::Reader::from_path(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let head = r.headers().map_err(|e| e.to_string())?.clone();
    let col = |n: &str| head.iter().position(|c| c == n).ok_or(format!("{}: no column {n}", path.display()));
    let (id, author, inbound, created, reply_to) = (col("tweet_id")?, col("author_id")?, col("inbound")?, col("created_at")?, col("in_response_to_tweet_id")?);
    let rows: Vec<csv::StringRecord> = r.records().filter_map(Result::ok).collect();
    let author_of: HashMap<String, (String, bool)> =
        rows.iter().map(|r| (r[id].to_string(), (r[author].to_string(), &r[inbound] == "True"))).collect();
    for row in &rows {
        let Some(at) = parse_time(&row[created]) else { continue };
        if &row[inbound] == "True" {
            push(h, &format!("twcs:{}", &row[author]), EventType::Inbound, at, &row[id]);
        } else {
            let parent = row[reply_to].trim_end_matches(".0");
            if let Some((customer, true)) = author_of.get(parent) {
                push(h, &format!("twcs:{customer}"), EventType::OutboundSent, at, &row[id]);
            }
        }
    }
    Ok(())
}

/// IBM customer-care threads: client turns are INBOUND_MESSAGE, agent turns
/// OUTBOUND_SENT to the thread's client.
pub fn load_ibm(path: &Path, h: &mut Histories) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    for dialog in v.as_array().ok_or("expected a JSON array")? {
        let Some(turns) = dialog.get("dialogContent").and_then(|c| c.as_array()) else { continue };
        let client = turns.iter().find_map(|t| t.get("client").and_then(|c| c.as_str()));
        let Some(client) = client else { continue };
        for t in turns {
            let (Some(at), id) = (t.get("datetime").and_then(|d| d.as_str()).and_then(parse_time), t.get("tweet_ID").and_then(|d| d.as_str()).unwrap_or("")) else { continue };
            if t.get("client").is_some() || t.get("client1").is_some() {
                let who = t.get("client").or(t.get("client1")).and_then(|c| c.as_str()).unwrap_or(client);
                push(h, &format!("ibm:{who}"), EventType::Inbound, at, id);
            } else if t.get("agent").is_some() {
                push(h, &format!("ibm:{client}"), EventType::OutboundSent, at, id);
            }
        }
    }
    Ok(())
}

#[derive(Debug, Default, Clone)]
pub struct MethodScore {
    pub hits: f64,
    /// Mean of each customer's share.
    pub per_customer: f64,
    /// Hours of the week covered, summed over customers.
    pub coverage_hours: f64,
}

#[derive(Debug, Default)]
pub struct Backtest {
    pub customers: usize,
    pub test_events: usize,
    /// (name, score), in report order.
    pub methods: Vec<(String, MethodScore)>,
}

impl Backtest {
    pub fn print(&self) {
        println!("customers {}  later activity events {}", self.customers, self.test_events);
        println!("{:<34} {:>12} {:>14} {:>12} {:>8}", "method", "share hit", "mean/customer", "hours/week", "lift");
        for (name, m) in &self.methods {
            let share = m.hits / self.test_events.max(1) as f64;
            let cover = m.coverage_hours / self.customers.max(1) as f64;
            println!("{name:<34} {:>11.1}% {:>13.1}% {cover:>12.1} {:>8.2}", 100.0 * share, 100.0 * m.per_customer / self.customers.max(1) as f64, share / (cover / HOURS as f64).max(1e-9));
        }
    }
}

/// Customers with at least `min_activity` inbound events; the first
/// `train_share` of their activity (at least one event) fits, the rest scores.
pub fn backtest(h: &Histories, min_activity: usize, train_share: f64, cfg: &ModelConfig) -> Backtest {
    let utc = ResolvedTz { tz: jiff::tz::TimeZone::UTC, name: "UTC".into(), source: TzSource::Contact, country: None, approximate: false };
    // Split every eligible customer.
    let mut splits = Vec::new();
    for (id, evs) in h {
        let mut evs = evs.clone();
        evs.sort_by_key(|e| e.at);
        let inbound: Vec<i64> = evs.iter().filter(|e| e.kind == EventType::Inbound).map(|e| e.at).collect();
        if inbound.len() < min_activity {
            continue;
        }
        let k = ((inbound.len() as f64 * train_share).floor() as usize).clamp(1, inbound.len() - 1);
        let cut = inbound[k - 1];
        let later: Vec<i64> = inbound[k..].to_vec();
        let train: Vec<Event> = evs.into_iter().filter(|e| e.at <= cut).collect();
        splits.push((id.clone(), train, later, cut));
    }
    splits.sort_by(|a, b| a.0.cmp(&b.0));
    // The population prior and the global baseline: training activity only.
    let mut pop = [0.0f32; HOURS];
    for (_, train, _, _) in &splits {
        for e in train.iter().filter(|e| e.kind == EventType::Inbound) {
            pop[hour_of_week(e.at, &jiff::tz::TimeZone::UTC)] += 1.0;
        }
    }
    let mut day = [0.0f32; 24];
    for (i, v) in pop.iter().enumerate() {
        day[i % 24] += v;
    }
    let mut order: Vec<usize> = (0..24).collect();
    order.sort_by(|&a, &b| day[b].total_cmp(&day[a]).then(a.cmp(&b)));
    let global_top: Vec<usize> = order[..3].to_vec();
    normalise(&mut pop);
    let prior = PriorView { hours: pop, reply_rate: 0.3, reply_strength: 4.0, label: "training population".into() };

    let names = ["palaver top-1 window", "palaver top-3 windows", "global best hour", "global best 3 hours", "own most frequent hour", "own 3 most frequent hours"];
    let mut scores = vec![MethodScore::default(); names.len()];
    let mut bt = Backtest { customers: splits.len(), ..Default::default() };
    let hod = |t: i64| ((t.rem_euclid(86_400)) / 3600) as usize;
    for (_, train, later, cut) in &splits {
        let mut train = train.clone();
        let p = crate::sendtime::fold(ContactAttrs { time_zone: Some("UTC".into()), ..Default::default() }, &mut train, cfg.half_life_secs);
        let req = Request { now: cut + 1, horizon_secs: 7 * 86_400, channel: Channel::Other, quiet: QuietHours::NONE, max_windows: 3 };
        let s = suggest(&p, &prior, utc.clone(), &req, cfg);
        let in_windows = |n: usize, t: i64| {
            let how = hour_of_week(t, &utc.tz);
            s.windows.iter().take(n).any(|w| how / 24 == w.weekday as usize && (w.start_hour as usize..w.end_hour as usize).contains(&(how % 24)))
        };
        // Own hours: most frequent training hours of day, ties to the latest seen.
        let mut own = [0.0f64; 24];
        for (i, e) in train.iter().filter(|e| e.kind == EventType::Inbound).enumerate() {
            own[hod(e.at)] += 1.0 + i as f64 * 1e-6;
        }
        let mut own_order: Vec<usize> = (0..24).collect();
        own_order.sort_by(|&a, &b| own[b].total_cmp(&own[a]).then(a.cmp(&b)));
        let width = |n: usize| s.windows.iter().take(n).map(|w| (w.end_hour - w.start_hour) as f64).sum::<f64>();
        let covers = [width(1), width(3), 7.0, 21.0, 7.0, 21.0];
        for (m, score) in scores.iter_mut().enumerate() {
            let hit = |t: i64| match m {
                0 => in_windows(1, t),
                1 => in_windows(3, t),
                2 => global_top[0] == hod(t),
                3 => global_top.contains(&hod(t)),
                4 => own_order[0] == hod(t),
                _ => own_order[..3].contains(&hod(t)),
            };
            let hits = later.iter().filter(|&&t| hit(t)).count() as f64;
            score.hits += hits;
            score.per_customer += hits / later.len() as f64;
            score.coverage_hours += covers[m];
        }
        bt.test_events += later.len();
    }
    bt.methods = names.iter().map(|n| n.to_string()).zip(scores).collect();
    bt
}
