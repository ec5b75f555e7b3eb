//! Events files for batch jobs: CSV, JSON Lines or Parquet, one event per
//! row with the columns `contact_id, type, occurred_at, channel, message_id`
//! and optionally `time_zone, country, phone`. Each row is reported with its
//! number, so a broken row can be skipped or stop the job.

use super::events::{parse_time, Channel, ContactAttrs, Event, EventType};
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Csv,
    Jsonl,
    Parquet,
}

impl Format {
    pub fn of(path: &Path) -> Option<Format> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "csv" => Some(Format::Csv),
            "jsonl" | "ndjson" => Some(Format::Jsonl),
            "parquet" | "pq" => Some(Format::Parquet),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{path}: {msg}")]
    Io { path: String, msg: String },
    #[error("row {row}: {msg}")]
    Row { row: u64, msg: String },
}

/// Field values of one row, as text.
#[derive(Default)]
struct Fields {
    contact_id: String,
    kind: String,
    occurred_at: String,
    channel: String,
    message_id: String,
    time_zone: String,
    country: String,
    phone: String,
}

fn to_event(f: Fields) -> Result<Event, String> {
    if f.contact_id.trim().is_empty() {
        return Err("contact_id: empty".into());
    }
    let kind = EventType::parse(&f.kind).ok_or_else(|| format!("type: unknown event type {:?}", f.kind))?;
    let at = parse_time(&f.occurred_at).ok_or_else(|| format!("occurred_at: {:?} is neither RFC 3339 nor unix seconds", f.occurred_at))?;
    let channel = Channel::parse(&f.channel).ok_or_else(|| format!("channel: unknown channel {:?}", f.channel))?;
    let some = |s: String| (!s.trim().is_empty()).then(|| s.trim().to_string());
    let attrs = ContactAttrs { time_zone: some(f.time_zone), country: some(f.country), phone: some(f.phone), quiet_hours: None };
    Ok(Event { contact_id: f.contact_id, kind, at, channel, message_id: f.message_id, attrs })
}

/// Calls `each(row_number, event_or_error)` for every row, in order; `each`
/// returns false to stop. Rows are numbered from 1 (CSV: the header is row 0).
pub fn read_events(path: &Path, format: Format, mut each: impl FnMut(u64, Result<Event, String>) -> bool) -> Result<(), FileError> {
    let io = |e: &dyn std::fmt::Display| FileError::Io { path: path.display().to_string(), msg: e.to_string() };
    match format {
        Format::Csv => {
            let mut r = csv::ReaderBuilder::new().flexible(true).from_path(path).map_err(|e| io(&e))?;
            let headers = r.headers().map_err(|e| io(&e))?.clone();
            let col = |name: &str| headers.iter().position(|h| h.trim().eq_ignore_ascii_case(name));
            let cols = [col("contact_id"), col("type"), col("occurred_at"), col("channel"), col("message_id"), col("time_zone"), col("country"), col("phone")];
            for (name, c) in ["contact_id", "type", "occurred_at"].iter().zip(&cols) {
                if c.is_none() {
                    return Err(io(&format!("missing column {name:?} (have {:?})", headers.iter().collect::<Vec<_>>())));
                }
            }
            let mut rec = csv::StringRecord::new();
            let mut row = 0u64;
            loop {
                row += 1;
                let ev = match r.read_record(&mut rec) {
                    Ok(false) => break,
                    Ok(true) => {
                        let get = |i: usize| cols[i].and_then(|c| rec.get(c)).unwrap_or("").to_string();
                        to_event(Fields {
                            contact_id: get(0),
                            kind: get(1),
                            occurred_at: get(2),
                            channel: get(3),
                            message_id: get(4),
                            time_zone: get(5),
                            country: get(6),
                            phone: get(7),
                        })
                    }
                    Err(e) => Err(format!("unreadable: {e}")),
                };
                if !each(row, ev) {
                    break;
                }
            }
        }
        Format::Jsonl => {
            use std::io::BufRead;
            let f = std::fs::File::open(path).map_err(|e| io(&e))?;
            for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
                let line = line.map_err(|e| io(&e))?;
                if line.trim().is_empty() {
                    continue;
                }
                let ev = serde_json::from_str::<serde_json::Value>(&line).map_err(|e| format!("not JSON: {e}")).and_then(|v| {
                    let get = |k: &str| match v.get(k) {
                        Some(serde_json::Value::String(s)) => s.clone(),
                        Some(serde_json::Value::Null) | None => String::new(),
                        Some(other) => other.to_string(),
                    };
                    to_event(Fields {
                        contact_id: get("contact_id"),
                        kind: get("type"),
                        occurred_at: get("occurred_at"),
                        channel: get("channel"),
                        message_id: get("message_id"),
                        time_zone: get("time_zone"),
                        country: get("country"),
                        phone: get("phone"),
                    })
                });
                if !each(i as u64 + 1, ev) {
                    break;
                }
            }
        }
        Format::Parquet => read_parquet(path, &mut each).map_err(|e| io(&e))?,
    }
    Ok(())
}

fn read_parquet(path: &Path, each: &mut impl FnMut(u64, Result<Event, String>) -> bool) -> Result<(), String> {
    use arrow_array::{Array, Int64Array, StringArray};
    use arrow_schema::{DataType, TimeUnit};
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| e.to_string())?
        .with_batch_size(8192)
        .build()
        .map_err(|e| e.to_string())?;
    let mut row = 0u64;
    for batch in reader {
        let batch = batch.map_err(|e| e.to_string())?;
        let text = |name: &str| -> Result<Option<StringArray>, String> {
            let Some(c) = batch.column_by_name(name) else { return Ok(None) };
            let c = arrow_cast::cast(c, &DataType::Utf8).map_err(|e| format!("column {name}: {e}"))?;
            Ok(c.as_any().downcast_ref::<StringArray>().cloned())
        };
        let need = |name: &str, c: Option<StringArray>| c.ok_or_else(|| format!("missing column {name:?}"));
        let ids = Some(need("contact_id", text("contact_id")?)?);
        let kinds = Some(need("type", text("type")?)?);
        // Timestamps of any unit become unix seconds; integers are seconds.
        let at = batch.column_by_name("occurred_at").ok_or("missing column \"occurred_at\"")?;
        let secs: Option<Int64Array> = match at.data_type() {
            DataType::Timestamp(_, _) | DataType::Int64 | DataType::Int32 => {
                let c = if matches!(at.data_type(), DataType::Timestamp(_, _)) {
                    arrow_cast::cast(at, &DataType::Timestamp(TimeUnit::Second, None)).map_err(|e| e.to_string())?
                } else {
                    at.clone()
                };
                let c = arrow_cast::cast(&c, &DataType::Int64).map_err(|e| e.to_string())?;
                c.as_any().downcast_ref::<Int64Array>().cloned()
            }
            _ => None,
        };
        let at_text = if secs.is_none() { Some(need("occurred_at", text("occurred_at")?)?) } else { None };
        let (channels, msgs, zones, countries, phones) = (text("channel")?, text("message_id")?, text("time_zone")?, text("country")?, text("phone")?);
        let val = |a: &Option<StringArray>, i: usize| a.as_ref().filter(|a| a.is_valid(i)).map(|a| a.value(i).to_string()).unwrap_or_default();
        for i in 0..batch.num_rows() {
            row += 1;
            let occurred_at = match (&secs, &at_text) {
                (Some(s), _) if s.is_valid(i) => s.value(i).to_string(),
                (None, t @ Some(_)) => val(t, i),
                _ => String::new(),
            };
            let ev = to_event(Fields {
                contact_id: val(&ids, i),
                kind: val(&kinds, i),
                occurred_at,
                channel: val(&channels, i),
                message_id: val(&msgs, i),
                time_zone: val(&zones, i),
                country: val(&countries, i),
                phone: val(&phones, i),
            });
            if !each(row, ev) {
                return Ok(());
            }
        }
    }
    Ok(())
}
