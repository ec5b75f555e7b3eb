//! `palaver eval intent`: accuracy, macro-F1, out-of-scope precision and
//! recall and the most frequent confusions of a taxonomy's head on labelled
//! messages; and `palaver taxonomy build`, which turns a labelled training
//! split into a taxonomy with k examples per intent.
//!
//! Labelled data: CSV with a header (text in `text` or `utterance`, label in
//! `label` or `intent`), JSONL (`{"text", "label"}`), or a JSON object of
//! `[text, label]` lists (CLINC150) read from the keys given as the split.

use crate::intent::head::Head;
use crate::intent::taxonomy::{Intent, Taxonomy};
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("{path}: {msg}")]
    Data { path: PathBuf, msg: String },
    #[error("embedding cache {0}: {1}")]
    Cache(PathBuf, std::io::Error),
}

/// One labelled message; `label` is None when it is out of scope.
#[derive(Debug, Clone, PartialEq)]
pub struct Labelled {
    pub text: String,
    pub label: Option<String>,
}

fn data_err(path: &Path, msg: impl Into<String>) -> EvalError {
    EvalError::Data { path: path.to_path_buf(), msg: msg.into() }
}

/// Reads labelled messages. `split` names the JSON keys (comma-separated);
/// rows labelled `oos_label` are out of scope.
pub fn load_labelled(path: &Path, split: Option<&str>, oos_label: &str) -> Result<Vec<Labelled>, EvalError> {
    let text = std::fs::read_to_string(path).map_err(|e| data_err(path, e.to_string()))?;
    let text = text.trim_start_matches('\u{feff}');
    let label = |l: String| if l == oos_label { None } else { Some(l) };
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or_default();
    let rows = match ext {
        "csv" => {
            let mut r = csv::Reader::from_reader(text.as_bytes());
            let headers = r.headers().map_err(|e| data_err(path, e.to_string()))?.clone();
            let col = |names: &[&str]| headers.iter().position(|h| names.contains(&h.trim()));
            let t = col(&["text", "utterance"]).ok_or_else(|| data_err(path, "no `text` or `utterance` column"))?;
            let l = col(&["label", "intent"]).ok_or_else(|| data_err(path, "no `label` or `intent` column"))?;
            let mut rows = Vec::new();
            for (i, rec) in r.records().enumerate() {
                let rec = rec.map_err(|e| data_err(path, format!("row {}: {e}", i + 2)))?;
                let field = |c: usize| rec.get(c).map(str::to_string).ok_or_else(|| data_err(path, format!("row {}: missing column", i + 2)));
                rows.push(Labelled { text: field(t)?, label: label(field(l)?) });
            }
            rows
        }
        "jsonl" => text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                #[derive(serde::Deserialize)]
                struct Row {
                    text: String,
                    label: String,
                }
                let r: Row = serde_json::from_str(l).map_err(|e| data_err(path, format!("line {}: {e}", i + 1)))?;
                Ok(Labelled { text: r.text, label: label(r.label) })
            })
            .collect::<Result<_, EvalError>>()?,
        "json" => {
            let split = split.ok_or_else(|| data_err(path, "a JSON object of splits needs --split (for example `test,oos_test`)"))?;
            let all: HashMap<String, Vec<(String, String)>> =
                serde_json::from_str(text).map_err(|e| data_err(path, format!("expected {{split: [[text, label], ...]}}: {e}")))?;
            let mut rows = Vec::new();
            for key in split.split(',').map(str::trim) {
                let part = all.get(key).ok_or_else(|| data_err(path, format!("no split `{key}`")))?;
                rows.extend(part.iter().map(|(t, l)| Labelled { text: t.clone(), label: label(l.clone()) }));
            }
            rows
        }
        other => return Err(data_err(path, format!("unknown extension `{other}`: use .csv, .jsonl or .json"))),
    };
    if rows.is_empty() {
        return Err(data_err(path, "no rows"));
    }
    Ok(rows)
}

/// A taxonomy with the first `k` examples of each label (all when None), in
/// file order, and up to `oos_examples` out-of-scope rows as "none" examples.
pub fn build_taxonomy(name: &str, rows: &[Labelled], k: Option<usize>, oos_examples: usize) -> Taxonomy {
    let mut by_label: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut out_of_scope = Vec::new();
    for r in rows {
        match &r.label {
            Some(l) => {
                let e = by_label.entry(l.as_str()).or_default();
                if k.is_none_or(|k| e.len() < k) && !e.contains(&r.text) {
                    e.push(r.text.clone());
                }
            }
            None if out_of_scope.len() < oos_examples => out_of_scope.push(r.text.clone()),
            None => {}
        }
    }
    Taxonomy {
        name: name.into(),
        version: k.map(|k| format!("k{k}")).unwrap_or_else(|| "all".into()),
        description: String::new(),
        intents: by_label
            .into_iter()
            .map(|(label, examples)| Intent { label: label.into(), description: String::new(), examples })
            .collect(),
        out_of_scope,
    }
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub rows: usize,
    pub in_scope_rows: usize,
    pub oos_rows: usize,
    /// Right intent and not flagged out of scope, over in-scope rows.
    pub in_scope_accuracy: f64,
    /// Right top intent ignoring the out-of-scope flag.
    pub top1_accuracy: f64,
    /// Every row, out of scope counting as a class.
    pub overall_accuracy: f64,
    pub macro_f1: f64,
    pub oos_precision: f64,
    pub oos_recall: f64,
    /// (expected, predicted, count), most frequent first.
    pub confusions: Vec<(String, String, usize)>,
}

/// Scores predictions on embedded rows; `truth` holds label names (None: out of scope).
pub fn evaluate(head: &Head, x: &[Vec<f32>], truth: &[Option<String>]) -> Report {
    const OOS: &str = "<out of scope>";
    let mut r = Report { rows: x.len(), ..Default::default() };
    let (mut in_right, mut top1_right, mut all_right) = (0usize, 0usize, 0usize);
    let (mut oos_tp, mut oos_fp) = (0usize, 0usize);
    let mut tp: HashMap<String, usize> = HashMap::new();
    let mut fp: HashMap<String, usize> = HashMap::new();
    let mut fnn: HashMap<String, usize> = HashMap::new();
    let mut confusions: HashMap<(String, String), usize> = HashMap::new();
    use rayon::prelude::*;
    let preds: Vec<_> = x.par_iter().map(|v| head.predict(v)).collect();
    for (p, t) in preds.into_iter().zip(truth) {
        let top = head.labels[p.ranked[0].0].clone();
        let predicted = if p.out_of_scope { OOS.to_string() } else { top.clone() };
        let expected = t.clone().unwrap_or_else(|| OOS.to_string());
        match t {
            Some(_) => {
                r.in_scope_rows += 1;
                top1_right += usize::from(top == expected);
                in_right += usize::from(predicted == expected);
                oos_fp += usize::from(p.out_of_scope);
            }
            None => {
                r.oos_rows += 1;
                oos_tp += usize::from(p.out_of_scope);
            }
        }
        if predicted == expected {
            all_right += 1;
            *tp.entry(expected).or_default() += 1;
        } else {
            *fp.entry(predicted.clone()).or_default() += 1;
            *fnn.entry(expected.clone()).or_default() += 1;
            *confusions.entry((expected, predicted)).or_default() += 1;
        }
    }
    let ratio = |a: usize, b: usize| if b == 0 { f64::NAN } else { a as f64 / b as f64 };
    r.in_scope_accuracy = ratio(in_right, r.in_scope_rows);
    r.top1_accuracy = ratio(top1_right, r.in_scope_rows);
    r.overall_accuracy = ratio(all_right, r.rows);
    r.oos_recall = ratio(oos_tp, r.oos_rows);
    r.oos_precision = ratio(oos_tp, oos_tp + oos_fp);
    // Macro-F1 over the classes present in the truth (out of scope included when present).
    let mut classes: Vec<String> = truth.iter().map(|t| t.clone().unwrap_or_else(|| OOS.to_string())).collect();
    classes.sort();
    classes.dedup();
    let f1s: Vec<f64> = classes
        .iter()
        .map(|c| {
            let (t, f, n) = (tp.get(c).copied().unwrap_or(0), fp.get(c).copied().unwrap_or(0), fnn.get(c).copied().unwrap_or(0));
            if t == 0 { 0.0 } else { 2.0 * t as f64 / (2 * t + f + n) as f64 }
        })
        .collect();
    r.macro_f1 = f1s.iter().sum::<f64>() / f1s.len().max(1) as f64;
    let mut conf: Vec<(String, String, usize)> = confusions.into_iter().map(|((a, b), n)| (a, b, n)).collect();
    conf.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| a.0.cmp(&b.0)));
    r.confusions = conf;
    r
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "rows {} ({} in scope, {} out of scope)", self.rows, self.in_scope_rows, self.oos_rows)?;
        writeln!(f, "in-scope accuracy   {:.2}%  (top-1 ignoring the out-of-scope flag: {:.2}%)", 100.0 * self.in_scope_accuracy, 100.0 * self.top1_accuracy)?;
        writeln!(f, "overall accuracy    {:.2}%", 100.0 * self.overall_accuracy)?;
        writeln!(f, "macro-F1            {:.2}%", 100.0 * self.macro_f1)?;
        writeln!(f, "out of scope        precision {:.2}%  recall {:.2}%", 100.0 * self.oos_precision, 100.0 * self.oos_recall)?;
        writeln!(f, "most frequent confusions (expected -> predicted):")?;
        for (a, b, n) in self.confusions.iter().take(10) {
            writeln!(f, "  {n:>4}  {a} -> {b}")?;
        }
        Ok(())
    }
}

/// Embeddings already computed, keyed by encoder and text, so re-running an
/// evaluation with another k or threshold does not re-encode 20,000 messages.
/// An append-only file: a line of JSON per text.
pub struct EmbeddingCache {
    path: PathBuf,
    map: HashMap<String, Vec<f32>>,
}

impl EmbeddingCache {
    pub fn open(dir: &Path, encoder: &str) -> Result<Self, EvalError> {
        let path = dir.join(format!("{encoder}.jsonl"));
        let mut map = HashMap::new();
        if let Ok(mut f) = std::fs::File::open(&path) {
            let mut s = String::new();
            f.read_to_string(&mut s).map_err(|e| EvalError::Cache(path.clone(), e))?;
            // A torn last line (a crash mid-append) is simply recomputed.
            for line in s.lines() {
                if let Ok((t, v)) = serde_json::from_str::<(String, Vec<f32>)>(line) {
                    map.insert(t, v);
                }
            }
        }
        Ok(Self { path, map })
    }

    pub fn get(&self, text: &str) -> Option<&Vec<f32>> {
        self.map.get(text)
    }

    pub fn insert_all(&mut self, items: Vec<(String, Vec<f32>)>) -> Result<(), EvalError> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| EvalError::Cache(self.path.clone(), e))?;
        }
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&self.path).map_err(|e| EvalError::Cache(self.path.clone(), e))?;
        let mut buf = String::new();
        for (t, v) in items {
            buf.push_str(&serde_json::to_string(&(&t, &v)).expect("serialisable"));
            buf.push('\n');
            self.map.insert(t, v);
        }
        f.write_all(buf.as_bytes()).map_err(|e| EvalError::Cache(self.path.clone(), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intent::head::TrainOptions;

    #[test]
    fn builds_k_shot_taxonomies_and_keeps_oos_apart() {
        let rows: Vec<Labelled> = [("a1", Some("a")), ("a2", Some("a")), ("a3", Some("a")), ("b1", Some("b")), ("x", None)]
            .iter()
            .map(|(t, l)| Labelled { text: t.to_string(), label: l.map(String::from) })
            .collect();
        let t = build_taxonomy("t", &rows, Some(2), 0);
        assert_eq!(t.intents[0].examples, ["a1", "a2"]);
        assert_eq!(t.intents[1].examples, ["b1"]);
        assert!(t.out_of_scope.is_empty());
        assert_eq!(build_taxonomy("t", &rows, None, 5).out_of_scope, ["x"]);
    }

    #[test]
    fn reads_csv_jsonl_and_clinc_json() {
        let dir = std::env::temp_dir().join(format!("palaver-eval-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let csv = dir.join("d.csv");
        std::fs::write(&csv, "\u{feff}flags,utterance,category,intent\nB,\"hi, there\",X,greet\nB,bye,X,oos\n").unwrap();
        let rows = load_labelled(&csv, None, "oos").unwrap();
        assert_eq!(rows, vec![Labelled { text: "hi, there".into(), label: Some("greet".into()) }, Labelled { text: "bye".into(), label: None }]);
        let jsonl = dir.join("d.jsonl");
        std::fs::write(&jsonl, "{\"text\":\"oi\",\"label\":\"greet\"}\n\n").unwrap();
        assert_eq!(load_labelled(&jsonl, None, "oos").unwrap().len(), 1);
        let json = dir.join("d.json");
        std::fs::write(&json, r#"{"test":[["a","x"]],"oos_test":[["b","oos"]]}"#).unwrap();
        assert_eq!(load_labelled(&json, Some("test,oos_test"), "oos").unwrap().len(), 2);
        assert!(load_labelled(&json, Some("train"), "oos").unwrap_err().to_string().contains("no split `train`"));
        std::fs::write(&jsonl, "{\"text\":\"oi\"}\n").unwrap();
        assert!(load_labelled(&jsonl, None, "oos").unwrap_err().to_string().contains("line 1"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn report_counts_out_of_scope_and_confusions() {
        let x = vec![vec![1.0, 0.0], vec![0.0, 1.0], vec![1.0, 0.05], vec![0.05, 1.0]];
        let head = Head::train(&x, &[0, 1, 0, 1], vec!["a".into(), "b".into()], false, TrainOptions::default());
        let truth = vec![Some("a".to_string()), Some("a".to_string()), None];
        let r = evaluate(&head, &x[..3], &truth);
        assert_eq!((r.in_scope_rows, r.oos_rows), (2, 1));
        assert!((r.top1_accuracy - 0.5).abs() < 1e-9, "{r}");
        assert!(r.confusions.iter().any(|(e, p, n)| e == "<out of scope>" && p == "a" && *n == 1), "{:?}", r.confusions);
    }
}
