//! `palaver score`: an events file in, one score per contact out, folded and
//! scored in parallel. With `grouped` input (all of a contact's rows
//! together, as exports sorted by contact are) memory stays bounded by one
//! chunk of contacts; otherwise every contact's profile is held until the end.

use super::events::{fmt_time, Channel, ContactAttrs, Event};
use super::file::{read_events, FileError, Format};
use super::model::{builtin_prior, ModelConfig, PriorView, Request, Suggestion};
use super::profile::Profile;
use super::tz::{self, ResolvedTz, TzSource};
use rayon::prelude::*;
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnError {
    /// Report the row and go on.
    Skip,
    /// Stop at the first broken row; nothing is written.
    Stop,
}

pub struct ScoreJob {
    pub events: PathBuf,
    pub format: Format,
    pub out: PathBuf,
    pub now: i64,
    pub horizon_secs: i64,
    pub channel: Channel,
    pub quiet: super::events::QuietHours,
    /// IANA zone for contacts with no zone, phone, country or enough activity.
    pub default_tz: String,
    pub model: ModelConfig,
    pub on_error: OnError,
    pub grouped: bool,
    pub progress: bool,
}

#[derive(Debug, Default)]
pub struct ScoreSummary {
    pub rows: u64,
    pub bad_rows: u64,
    pub contacts: u64,
    /// The first few broken rows, for the report.
    pub errors: Vec<String>,
}

/// Contacts scored together on the rayon pool.
const CHUNK: usize = 8192;

#[derive(Debug, thiserror::Error)]
pub enum ScoreError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{0}")]
    Write(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: contact {contact:?} reappears at row {row} after its rows ended; sort the file by contact or drop --grouped")]
    NotGrouped { path: String, contact: String, row: u64 },
}

struct Pending {
    id: String,
    attrs: ContactAttrs,
    events: Vec<Event>,
}

/// Runs the job; the output file appears (renamed into place) only when the
/// job succeeds, so a stopped job leaves nothing half-written.
pub fn score_file(job: &ScoreJob) -> Result<ScoreSummary, ScoreError> {
    let zone = jiff::tz::TimeZone::get(&job.default_tz)
        .map_err(|_| ScoreError::Invalid(format!("--default-time-zone: unknown IANA time zone {:?}", job.default_tz)))?;
    let default = ResolvedTz { tz: zone, name: job.default_tz.clone(), source: TzSource::Default, country: None, approximate: false };
    let prior = builtin_prior();
    let tmp = job.out.with_extension(format!("{}.partial", job.out.extension().and_then(|e| e.to_str()).unwrap_or("out")));
    let werr = |e: std::io::Error| ScoreError::Write(format!("{}: {e}", tmp.display()));
    let file = std::fs::File::create(&tmp).map_err(werr)?;
    let mut out = std::io::BufWriter::new(file);
    let jsonl = job.out.extension().is_some_and(|e| e == "jsonl");
    if !jsonl {
        writeln!(out, "contact_id,reply_probability_24h,best_weekday,best_start_hour,best_end_hour,next_best_time,messaging_window_open,template_required,time_zone,time_zone_source,events,recency_hours,median_reply_delay_s,frequency_30d,opted_out,reason").map_err(werr)?;
    }
    let bar = if job.progress { indicatif::ProgressBar::new_spinner() } else { indicatif::ProgressBar::hidden() };
    bar.set_style(indicatif::ProgressStyle::with_template("{spinner} {human_pos} rows, {per_sec}, {elapsed} {msg}").unwrap());

    let mut summary = ScoreSummary::default();
    let mut open: Vec<Pending> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    // Hashes of contacts already scored (8 bytes each, not their ids).
    let mut closed: HashSet<u64> = HashSet::new();
    let mut failure: Option<ScoreError> = None;
    let path = job.events.display().to_string();
    let mut write_err = None;

    let flush = |batch: Vec<Pending>, out: &mut std::io::BufWriter<std::fs::File>| -> std::io::Result<()> {
        let lines: Vec<String> = batch.into_par_iter().map(|p| render(&score(p, job, &prior, &default), jsonl)).collect();
        for l in lines {
            out.write_all(l.as_bytes())?;
        }
        Ok(())
    };

    read_events(&job.events, job.format, |row, ev| {
        summary.rows += 1;
        if row % 65_536 == 0 {
            bar.set_position(row);
        }
        let mut ev = match ev.and_then(|mut e| e.validate(job.now, "").map(|_| e).map_err(|e| e.to_string().trim_start_matches('.').to_string())) {
            Ok(e) => e,
            Err(msg) => {
                summary.bad_rows += 1;
                if summary.errors.len() < 20 {
                    summary.errors.push(format!("row {row}: {msg}"));
                }
                if job.on_error == OnError::Stop {
                    failure = Some(ScoreError::File(FileError::Row { row, msg }));
                    return false;
                }
                return true;
            }
        };
        let attrs = std::mem::take(&mut ev.attrs);
        if job.grouped && open.last().is_some_and(|p| p.id != ev.contact_id) {
            if closed.contains(&id_hash(&ev.contact_id)) {
                failure = Some(ScoreError::NotGrouped { path: path.clone(), contact: ev.contact_id.clone(), row });
                return false;
            }
            // The previous contact is complete; score a full chunk at a time.
            if open.len() >= CHUNK {
                let batch = std::mem::take(&mut open);
                index.clear();
                summary.contacts += batch.len() as u64;
                for p in &batch {
                    closed.insert(id_hash(&p.id));
                }
                if let Err(e) = flush(batch, &mut out) {
                    write_err = Some(e);
                    return false;
                }
            }
        }
        let i = *index.entry(ev.contact_id.clone()).or_insert_with(|| {
            open.push(Pending { id: ev.contact_id.clone(), attrs: ContactAttrs::default(), events: Vec::new() });
            open.len() - 1
        });
        let p = &mut open[i];
        p.attrs.merge(&attrs);
        ev.attrs = attrs;
        p.events.push(ev);
        true
    })?;
    bar.finish_and_clear();
    if let Some(e) = failure {
        drop(out);
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    if let Some(e) = write_err {
        return Err(werr(e));
    }
    summary.contacts += open.len() as u64;
    flush(open, &mut out).map_err(werr)?;
    out.flush().map_err(werr)?;
    out.get_ref().sync_all().map_err(werr)?;
    drop(out);
    std::fs::rename(&tmp, &job.out).map_err(|e| ScoreError::Write(format!("{}: {e}", job.out.display())))?;
    Ok(summary)
}

fn score(mut p: Pending, job: &ScoreJob, prior: &PriorView, default: &ResolvedTz) -> (String, Suggestion) {
    let profile: Profile = super::fold(p.attrs, &mut p.events, job.model.half_life_secs);
    let tz = tz::resolve(&profile.attrs, &profile.utc, &prior.hours, default);
    let quiet = profile.attrs.quiet_hours.unwrap_or(job.quiet);
    let req = Request { now: job.now, horizon_secs: job.horizon_secs, channel: job.channel, quiet, max_windows: 1 };
    (p.id, super::model::suggest(&profile, prior, tz, &req, &job.model))
}

fn id_hash(s: &str) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault};
    BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(s)
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn render((id, s): &(String, Suggestion), jsonl: bool) -> String {
    let w = s.windows.first();
    const DAYS: [&str; 7] = ["MONDAY", "TUESDAY", "WEDNESDAY", "THURSDAY", "FRIDAY", "SATURDAY", "SUNDAY"];
    let e = &s.engagement;
    if jsonl {
        let v = serde_json::json!({
            "contact_id": id,
            "reply_probability_24h": e.reply_probability_24h,
            "best_window": w.map(|w| serde_json::json!({"weekday": DAYS[w.weekday as usize], "start_hour": w.start_hour, "end_hour": w.end_hour, "confidence": w.confidence})),
            "next_best_time": s.next_best_time.map(fmt_time),
            "messaging_window_open": s.messaging.open,
            "template_required": s.messaging.template_required,
            "time_zone": s.tz.name,
            "time_zone_source": s.tz.source.name(),
            "events": e.events,
            "recency_hours": e.recency_secs.map(|r| r as f64 / 3600.0),
            "median_reply_delay_s": e.median_reply_delay_secs,
            "frequency_30d": e.frequency_30d,
            "opted_out": s.opted_out,
            "reason": s.reason,
        });
        format!("{v}\n")
    } else {
        format!(
            "{},{:.4},{},{},{},{},{},{},{},{},{},{},{},{:.2},{},{}\n",
            csv_field(id),
            e.reply_probability_24h,
            w.map(|w| DAYS[w.weekday as usize]).unwrap_or(""),
            w.map(|w| w.start_hour.to_string()).unwrap_or_default(),
            w.map(|w| w.end_hour.to_string()).unwrap_or_default(),
            s.next_best_time.map(fmt_time).unwrap_or_default(),
            s.messaging.open,
            s.messaging.template_required,
            s.tz.name,
            s.tz.source.name(),
            e.events,
            e.recency_secs.map(|r| format!("{:.1}", r as f64 / 3600.0)).unwrap_or_default(),
            e.median_reply_delay_secs.map(|d| format!("{d:.0}")).unwrap_or_default(),
            e.frequency_30d,
            s.opted_out,
            csv_field(&s.reason)
        )
    }
}
