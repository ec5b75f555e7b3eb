//! `palaver score` on CSV, JSONL and Parquet events files, with broken rows.

use crate::common;

use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use std::process::Command;
use std::sync::Arc;

const BIN: &str = env!("CARGO_BIN_EXE_palaver");
const NOW: &str = "2026-04-01T00:00:00Z";

fn score(events: &std::path::Path, out: &std::path::Path, extra: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(["score", "--events", events.to_str().unwrap(), "--out", out.to_str().unwrap(), "--now", NOW])
        .args(extra)
        .output()
        .unwrap()
}

/// Three contacts; "ana" answers weekday lunchtime messages in São Paulo.
fn csv_rows() -> String {
    let mut s = String::from("contact_id,type,occurred_at,channel,message_id,time_zone,phone\n");
    for d in 2..=6 {
        s += &format!("ana,OUTBOUND_SENT,2026-03-{d:02}T15:05:00Z,WHATSAPP,m{d},,+5511987654321\n");
        s += &format!("ana,REPLIED,2026-03-{d:02}T15:12:00Z,WHATSAPP,m{d},,\n");
    }
    s += "bo,INBOUND_MESSAGE,2026-03-30T10:00:00Z,TELEGRAM,b1,Europe/Kyiv,\n";
    s += "cy,INBOUND_MESSAGE,1710000000,WHATSAPP,c1,,\n";
    s
}

#[test]
fn csv_scores_every_contact_and_reports_broken_rows() {
    let dir = common::temp_dir("score-csv");
    let (events, out) = (dir.join("events.csv"), dir.join("scores.csv"));
    let mut rows = csv_rows();
    rows += "dee,NOT_A_TYPE,2026-03-02T10:00:00Z,WHATSAPP,x,,\n"; // row 13
    rows += "eve,INBOUND_MESSAGE,1999-01-01T00:00:00Z,WHATSAPP,y,,\n"; // row 14
    std::fs::write(&events, rows).unwrap();

    let o = score(&events, &out, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("row 13: type: unknown event type \"NOT_A_TYPE\""), "{err}");
    assert!(err.contains("row 14: occurred_at: 1999-01-01T00:00:00Z is before 2000-01-01"), "{err}");
    let text = std::fs::read_to_string(&out).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    let ana = lines.iter().find(|l| l.starts_with("ana,")).unwrap();
    assert!(ana.contains("America/Sao_Paulo,phone number"), "{ana}");
    assert!(ana.contains(",12,") || ana.contains(",11,"), "a lunchtime window: {ana}");
    assert!(lines.iter().any(|l| l.starts_with("bo,") && l.contains("Europe/Kyiv,contact")));

    // Stop at the first broken row: an error naming it, and no output at all.
    let out2 = dir.join("stopped.csv");
    let o = score(&events, &out2, &["--on-error", "stop"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("row 13"), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!out2.exists() && !dir.join("stopped.csv.partial").exists());

    // --grouped with a contact's rows split: within one chunk they are merged
    // and the contact is scored once.
    let mut split = csv_rows();
    split += "ana,INBOUND_MESSAGE,2026-03-20T15:00:00Z,WHATSAPP,late,,\n";
    std::fs::write(&events, split).unwrap();
    let o = score(&events, &dir.join("g.csv"), &["--grouped"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read_to_string(dir.join("g.csv")).unwrap().lines().filter(|l| l.starts_with("ana,")).count(), 1);
}

#[test]
fn jsonl_and_parquet_give_the_same_scores_as_csv() {
    let dir = common::temp_dir("score-formats");
    let csv = dir.join("events.csv");
    std::fs::write(&csv, csv_rows()).unwrap();
    let o = score(&csv, &dir.join("from-csv.jsonl"), &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // The same rows as JSON Lines and as Parquet (occurred_at as unix seconds).
    let mut r = csv::Reader::from_path(&csv).unwrap();
    let rows: Vec<csv::StringRecord> = r.records().map(|x| x.unwrap()).collect();
    let secs = |s: &str| palaver::sendtime::events::parse_time(s).unwrap();
    let jsonl: String = rows
        .iter()
        .map(|x| {
            serde_json::json!({"contact_id": &x[0], "type": &x[1], "occurred_at": secs(&x[2]), "channel": &x[3], "message_id": &x[4], "time_zone": &x[5], "phone": &x[6]}).to_string() + "\n"
        })
        .collect();
    std::fs::write(dir.join("events.jsonl"), jsonl).unwrap();
    let col = |i: usize| -> ArrayRef { Arc::new(StringArray::from(rows.iter().map(|x| x[i].to_string()).collect::<Vec<_>>())) };
    let batch = RecordBatch::try_from_iter([
        ("contact_id", col(0)),
        ("type", col(1)),
        ("occurred_at", Arc::new(Int64Array::from(rows.iter().map(|x| secs(&x[2])).collect::<Vec<_>>())) as ArrayRef),
        ("channel", col(3)),
        ("message_id", col(4)),
        ("time_zone", col(5)),
        ("phone", col(6)),
    ])
    .unwrap();
    let f = std::fs::File::create(dir.join("events.parquet")).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(f, batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();

    let sorted = |p: &std::path::Path| {
        let mut l: Vec<String> = std::fs::read_to_string(p).unwrap().lines().map(String::from).collect();
        l.sort();
        l
    };
    let want = sorted(&dir.join("from-csv.jsonl"));
    assert_eq!(want.len(), 3);
    for input in ["events.jsonl", "events.parquet"] {
        let out = dir.join(format!("from-{input}.jsonl"));
        let o = score(&dir.join(input), &out, &[]);
        assert!(o.status.success(), "{input}: {}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(sorted(&out), want, "{input}");
    }
}
