//! Prometheus metrics. What every response reports (tokenize, queue, prompt,
//! generation and inference times; prompt tokens read, reused and generated)
//! is summed here too, with the depth of each model's queue, so a dashboard
//! and a response never disagree. `server::metrics` serves the text format.
//!
//! Written here rather than taken from a metrics crate: a few atomics and one
//! text renderer are all palaver needs, and the label sets are closed (no
//! series is made from a client's string), so memory stays bounded.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

/// Latency buckets (seconds): a 1 ms intent call to a minute-long summary
/// under load.
pub const SECONDS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0];
/// Batch-size buckets.
pub const SIZES: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// A value that goes up and down: queue depths, bytes held.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn set(&self, v: i64) {
        self.0.store(v, Relaxed);
    }

    pub fn add(&self, d: i64) {
        self.0.fetch_add(d, Relaxed);
    }

    pub fn get(&self) -> i64 {
        self.0.load(Relaxed)
    }
}

#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Observations per bucket (not cumulative); the last is +Inf.
    buckets: Box<[AtomicU64]>,
    /// The sum's f64 bits.
    sum: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]), "bucket bounds must increase");
        Self { bounds, buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(), sum: AtomicU64::new(0f64.to_bits()) }
    }

    pub fn observe(&self, v: f64) {
        let v = if v.is_finite() { v } else { 0.0 };
        let i = self.bounds.partition_point(|&b| b < v);
        self.buckets[i].fetch_add(1, Relaxed);
        let _ = self.sum.fetch_update(Relaxed, Relaxed, |bits| Some((f64::from_bits(bits) + v).to_bits()));
    }

    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64());
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Relaxed)).sum()
    }

    pub fn sum(&self) -> f64 {
        f64::from_bits(self.sum.load(Relaxed))
    }
}

/// What a family's series are made of.
pub trait Metric: Send + Sync {
    const TYPE: &'static str;
    fn render(&self, out: &mut String, name: &str, labels: &str);
}

impl Metric for Counter {
    const TYPE: &'static str = "counter";
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let _ = writeln!(out, "{name}{} {}", braces(labels), self.get());
    }
}

impl Metric for Gauge {
    const TYPE: &'static str = "gauge";
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let _ = writeln!(out, "{name}{} {}", braces(labels), self.get());
    }
}

impl Metric for Histogram {
    const TYPE: &'static str = "histogram";
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            cumulative += b.load(Relaxed);
            let le = self.bounds.get(i).map_or_else(|| "+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_sum{} {}", braces(labels), self.sum());
        let _ = writeln!(out, "{name}_count{} {cumulative}", braces(labels));
    }
}

fn braces(labels: &str) -> String {
    if labels.is_empty() { String::new() } else { format!("{{{labels}}}") }
}

/// One metric's series, by label values.
pub struct Family<M> {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    make: Box<dyn Fn() -> M + Send + Sync>,
    series: Mutex<BTreeMap<Vec<String>, Arc<M>>>,
}

impl<M: Metric> Family<M> {
    pub fn new(name: &'static str, help: &'static str, labels: &'static [&'static str], make: impl Fn() -> M + Send + Sync + 'static) -> Self {
        Self { name, help, labels, make: Box::new(make), series: Mutex::new(BTreeMap::new()) }
    }

    /// The series for these label values (in the order of the family's
    /// label names), made on first use.
    pub fn with(&self, values: &[&str]) -> Arc<M> {
        assert_eq!(values.len(), self.labels.len(), "{}: label values", self.name);
        let key: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        let mut series = self.series.lock().unwrap_or_else(|e| e.into_inner());
        series.entry(key).or_insert_with(|| Arc::new((self.make)())).clone()
    }

    fn render(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP {} {}", self.name, self.help);
        let _ = writeln!(out, "# TYPE {} {}", self.name, M::TYPE);
        let series = self.series.lock().unwrap_or_else(|e| e.into_inner());
        for (values, m) in series.iter() {
            let labels: Vec<String> = self.labels.iter().zip(values).map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
            m.render(out, self.name, &labels.join(","));
        }
    }
}

/// Label values escaped as the text format requires.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Every metric palaver exports.
pub struct Metrics {
    pub requests: Family<Counter>,
    pub request_seconds: Family<Histogram>,
    pub in_flight: Family<Gauge>,
    pub summarize_seconds: Family<Histogram>,
    pub summarize_tokens: Family<Counter>,
    pub summarize_faithfulness: Family<Counter>,
    pub summarize_note_cache: Family<Counter>,
    pub summarize_note_cache_bytes: Family<Gauge>,
    pub llm_sequences: Family<Gauge>,
    pub llm_passes: Family<Counter>,
    pub llm_rows: Family<Counter>,
    pub llm_prefix_cache_bytes: Family<Gauge>,
    pub classify_seconds: Family<Histogram>,
    pub classify_texts: Family<Counter>,
    pub encoder_batch_size: Family<Histogram>,
    pub encoder_queue: Family<Gauge>,
    pub engagement_events: Family<Counter>,
    pub contacts_scored: Family<Counter>,
}

impl Metrics {
    fn new() -> Self {
        let seconds = || Histogram::new(SECONDS);
        Self {
            requests: Family::new("palaver_requests_total", "gRPC calls finished, by method and status code.", &["method", "code"], Counter::default),
            request_seconds: Family::new(
                "palaver_request_duration_seconds",
                "gRPC call duration, from the request to the last byte of the response (the end of a stream).",
                &["method"],
                seconds,
            ),
            in_flight: Family::new(
                "palaver_admitted_requests",
                "Requests holding an admission slot (--max-concurrent-requests; assist_background: --max-background-requests); at the limit, more get RESOURCE_EXHAUSTED.",
                &["service"],
                Gauge::default,
            ),
            summarize_seconds: Family::new(
                "palaver_summarize_phase_seconds",
                "Where a summary's time went, as in its response's timings: tokenize, queue, prompt, generation, total.",
                &["phase"],
                seconds,
            ),
            summarize_tokens: Family::new(
                "palaver_summarize_tokens_total",
                "Summary tokens: prompt (final prompt size), reused (from a cached prefix), processed (run through the model), generated, drafted (confirmed drafts).",
                &["kind"],
                Counter::default,
            ),
            summarize_faithfulness: Family::new(
                "palaver_summarize_faithfulness_total",
                "Faithfulness check: summaries whose first answer passed (passed_first_time), summaries regenerated, facts removed from final answers.",
                &["outcome"],
                Counter::default,
            ),
            summarize_note_cache: Family::new(
                "palaver_summarize_note_cache_total",
                "Summaries of a thread id looked up among stored notes (--note-cache-mb): hit (the thread had not changed, no model time), miss; joined: a miss that waited for the same note being written for another request.",
                &["outcome"],
                Counter::default,
            ),
            summarize_note_cache_bytes: Family::new(
                "palaver_summarize_note_cache_bytes",
                "Bytes of stored notes (--note-cache-mb).",
                &[],
                Gauge::default,
            ),
            llm_sequences: Family::new(
                "palaver_llm_sequences",
                "Generations at the model thread: waiting for admission, or running in the batch.",
                &["model", "state"],
                Gauge::default,
            ),
            llm_passes: Family::new("palaver_llm_passes_total", "Forward passes of the summarizer, prompt or decode.", &["model", "pass"], Counter::default),
            llm_rows: Family::new(
                "palaver_llm_rows_total",
                "Rows of those passes: prompt tokens read, or sequences stepped (rows / passes is the mean decode batch).",
                &["model", "pass"],
                Counter::default,
            ),
            llm_prefix_cache_bytes: Family::new(
                "palaver_llm_prefix_cache_bytes",
                "Bytes of prompt caches kept for reuse, and of evicted threads' last answers kept as drafts (--prefix-cache-mb).",
                &["model"],
                Gauge::default,
            ),
            classify_seconds: Family::new(
                "palaver_classify_phase_seconds",
                "Where an intent call's time went, as in its response's timings: tokenize, queue, inference, total.",
                &["phase"],
                seconds,
            ),
            classify_texts: Family::new("palaver_classify_texts_total", "Texts classified.", &[], Counter::default),
            encoder_batch_size: Family::new("palaver_encoder_batch_size", "Texts per encoder forward pass.", &[], || Histogram::new(SIZES)),
            encoder_queue: Family::new("palaver_encoder_queue", "Texts waiting for the encoder.", &[], Gauge::default),
            engagement_events: Family::new(
                "palaver_engagement_events_total",
                "Engagement events recorded: accepted, or a duplicate of one already stored.",
                &["outcome"],
                Counter::default,
            ),
            contacts_scored: Family::new("palaver_contacts_scored_total", "Contacts scored by ScoreContacts (errors included).", &[], Counter::default),
        }
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# HELP palaver_build_info The running build.\n# TYPE palaver_build_info gauge");
        let _ = writeln!(out, "palaver_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
        self.requests.render(&mut out);
        self.request_seconds.render(&mut out);
        self.in_flight.render(&mut out);
        self.summarize_seconds.render(&mut out);
        self.summarize_tokens.render(&mut out);
        self.summarize_faithfulness.render(&mut out);
        self.summarize_note_cache.render(&mut out);
        self.summarize_note_cache_bytes.render(&mut out);
        self.llm_sequences.render(&mut out);
        self.llm_passes.render(&mut out);
        self.llm_rows.render(&mut out);
        self.llm_prefix_cache_bytes.render(&mut out);
        self.classify_seconds.render(&mut out);
        self.classify_texts.render(&mut out);
        self.encoder_batch_size.render(&mut out);
        self.encoder_queue.render(&mut out);
        self.engagement_events.render(&mut out);
        self.contacts_scored.render(&mut out);
        render_process(&mut out);
        out
    }
}

/// The process's memory, CPU time, threads and start time, read from
/// `/proc/self/stat` at each scrape, under the names Prometheus's own client
/// libraries use. Nothing where there is no such file.
fn render_process(out: &mut String) {
    let Some(p) = process_stats() else { return };
    let mut put = |name: &str, kind: &str, help: &str, v: f64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
    };
    put("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", p.resident_bytes);
    put("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.", p.virtual_bytes);
    put("process_cpu_seconds_total", "counter", "User and system CPU time spent in seconds.", p.cpu_seconds);
    put("process_threads", "gauge", "OS threads in the process.", p.threads);
    put("process_start_time_seconds", "gauge", "Start time of the process since the Unix epoch in seconds.", p.start_time);
}

struct ProcessStats {
    resident_bytes: f64,
    virtual_bytes: f64,
    cpu_seconds: f64,
    threads: f64,
    start_time: f64,
}

#[cfg(target_os = "linux")]
fn process_stats() -> Option<ProcessStats> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name, in parentheses, may hold spaces: fields start after it.
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split_whitespace().collect();
    // proc(5) numbers fields from 1 (pid) and 2 (comm); `fields[0]` is field 3.
    let field = |n: usize| fields.get(n - 3)?.parse::<f64>().ok();
    // SAFETY: sysconf only reads a configuration value.
    let (ticks, page) = unsafe { (libc::sysconf(libc::_SC_CLK_TCK) as f64, libc::sysconf(libc::_SC_PAGESIZE) as f64) };
    let boot = std::fs::read_to_string("/proc/stat").ok()?.lines().find_map(|l| l.strip_prefix("btime ")?.trim().parse::<f64>().ok())?;
    Some(ProcessStats {
        resident_bytes: field(24)? * page,
        virtual_bytes: field(23)?,
        cpu_seconds: (field(14)? + field(15)?) / ticks,
        threads: field(20)?,
        start_time: boot + field(22)? / ticks,
    })
}

#[cfg(not(target_os = "linux"))]
fn process_stats() -> Option<ProcessStats> {
    None
}

/// The process's metrics.
pub fn global() -> &'static Metrics {
    static M: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &M
}

/// Holds a gauge one higher while alive (an admission slot, a queued text).
pub struct GaugeGuard(Arc<Gauge>);

impl GaugeGuard {
    pub fn new(g: Arc<Gauge>) -> Self {
        g.add(1);
        Self(g)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.add(-1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_counts_each_value_in_its_bucket_and_renders_cumulative() {
        let h = Histogram::new(&[0.1, 1.0]);
        for v in [0.05, 0.1, 0.5, 3.0, f64::NAN] {
            h.observe(v);
        }
        assert_eq!(h.count(), 5);
        assert!((h.sum() - 3.65).abs() < 1e-9, "{}", h.sum());
        let mut out = String::new();
        h.render(&mut out, "x", "phase=\"total\"");
        // 0.05, 0.1 (a bound is inclusive) and NaN (counted as 0) are <= 0.1.
        assert_eq!(
            out,
            "x_bucket{phase=\"total\",le=\"0.1\"} 3\nx_bucket{phase=\"total\",le=\"1\"} 4\nx_bucket{phase=\"total\",le=\"+Inf\"} 5\n\
             x_sum{phase=\"total\"} 3.65\nx_count{phase=\"total\"} 5\n"
        );
    }

    #[test]
    fn a_family_keeps_one_series_per_label_set_and_escapes_values() {
        let f = Family::new("t_total", "help", &["method", "code"], Counter::default);
        f.with(&["/a", "OK"]).add(2);
        f.with(&["/a", "OK"]).add(1);
        f.with(&["/b\"x", "Internal"]).add(1);
        let mut out = String::new();
        f.render(&mut out);
        assert_eq!(
            out,
            "# HELP t_total help\n# TYPE t_total counter\nt_total{method=\"/a\",code=\"OK\"} 3\nt_total{method=\"/b\\\"x\",code=\"Internal\"} 1\n"
        );
        let g = Family::new("g", "h", &[], Gauge::default);
        {
            let _held = GaugeGuard::new(g.with(&[]));
            assert_eq!(g.with(&[]).get(), 1);
        }
        assert_eq!(g.with(&[]).get(), 0);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_process_reports_its_memory_cpu_and_start() {
        // Spin for 50 ms of CPU (the kernel counts in 10 ms ticks).
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        let p = process_stats().expect("/proc/self/stat");
        // This test binary holds at least a megabyte and has run for some CPU time.
        assert!(p.resident_bytes > 1e6 && p.virtual_bytes >= p.resident_bytes, "{} {}", p.resident_bytes, p.virtual_bytes);
        assert!(p.cpu_seconds > 0.0 && p.threads >= 1.0);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        assert!(p.start_time <= now + 1.0 && p.start_time > now - 86_400.0, "{} vs {now}", p.start_time);
    }

    #[test]
    fn every_line_of_the_export_is_a_comment_or_a_sample() {
        let m = Metrics::new();
        m.summarize_seconds.with(&["total"]).observe(1.5);
        m.requests.with(&["/palaver.v1.Assist/Summarize", "OK"]).add(1);
        let text = m.render();
        assert!(text.contains("palaver_summarize_phase_seconds_count{phase=\"total\"} 1\n"), "{text}");
        assert!(text.contains("palaver_requests_total{method=\"/palaver.v1.Assist/Summarize\",code=\"OK\"} 1\n"));
        let sample = regex::Regex::new(r#"^[a-z_]+(\{([a-z_]+="[^"]*",?)+\})? -?[0-9.e+]+$"#).unwrap();
        for line in text.lines() {
            assert!(line.starts_with("# HELP ") || line.starts_with("# TYPE ") || sample.is_match(line), "{line}");
        }
    }
}
