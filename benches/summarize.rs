//! End-to-end summary latency on real models, in-process (no gRPC):
//! a ~200-token and a ~1,000-token TweetSumm thread, each summarised RUNS times
//! (default 3) after one warm-up; prints the median latency and the prompt and
//! generation speeds. Every run is a new thread (its own id and first
//! message), so only the instructions before the transcript are reused; then
//! the ~1,000-token thread grows by one ~30-token customer message and is
//! summarised again under the same id (prefix reuse), then asked for again
//! unchanged (its stored note, and the model with the notes off). Not criterion: one
//! sample of the 1.5B model takes minutes on 2 cores, and criterion's minimum
//! of 10 samples would take an hour.
//!
//!   cargo bench --bench summarize                 # default summarizer
//!   PALAVER_MAX_DRAFT=0 cargo bench --bench summarize   # without drafted decoding
//!   PALAVER_PREFILL_DRAFT=0 cargo bench --bench summarize   # no previous note checked with the prompt
//!   PALAVER_PROMPT_CHUNK=256 cargo bench --bench summarize   # another prompt chunk (default 256)
//!   PALAVER_SUMMARIZER=qwen2.5-coder-0.5b-instruct cargo bench --bench summarize
//!   SHOW=1 cargo bench --bench summarize          # also print the notes (first run of each)
//!   RESUMMARISE_ONLY=1 cargo bench --bench summarize   # only the grown thread, against its own first summaries
//!   PREFIX_CACHE_MB=48 EVICT=1 RESUMMARISE_ONLY=1 cargo bench --bench summarize
//!       # another new thread summarised before the grown one, with room for one thread's prompt
//!       # cache (default 256): the grown thread reads its whole prompt, drafting from its last note
//!   GROWN=8 cargo bench --bench summarize   # 8 other threads, each re-summarised after its own last
//!       # customer message, with the rows and passes each run needed and the floor they set
//!   SINGLE=1 GROWN=8 cargo bench --bench summarize   # the same on single TweetSumm dialogs

use palaver::eval::TweetSummDialog;
use palaver::llm::LlmHandle;
use palaver::models::{self, FetchOptions, HubOptions};
use palaver::summarize::thread::SummarizeInput;
use palaver::summarize::{SummarizeConfig, Summarizer};
use std::time::Instant;

/// The helpdesk case: the thread was summarised, a customer message arrived,
/// the agent opens it again.
/// `cold_latency`: the new thread's median, or None to take the median of
/// these runs' own first summaries.
/// Then the grown thread is asked for again, unchanged (the agent opens the
/// chat whose note was prepared in the background): from the stored notes,
/// and from the model with the notes off.
async fn resummarise(s: &Summarizer, input: &SummarizeInput, runs: usize, cold_latency: Option<f64>) {
    let (mut lat, mut prompt_ms, mut gen_ms, mut reused, mut total, mut generated, mut drafted) = (vec![], vec![], vec![], 0, 0, 0, 0);
    let mut firsts = vec![];
    let model_only = Summarizer::new(s.llm().clone(), SummarizeConfig { note_cache_bytes: 0, ..s.config().clone() });
    let (mut stored, mut rerun, mut rerun_drafts) = (vec![], vec![], (0, 0));
    for i in 0..runs {
        // Each run its own thread: another run's grown prompt would be reused whole.
        let x = palaver::eval::as_new_thread(input, &format!("grow-{i}"));
        let t = Instant::now();
        let first = s.summarize(x.clone(), None).await.unwrap();
        firsts.push(t.elapsed().as_secs_f64());
        if std::env::var_os("EVICT").is_some() {
            s.summarize(palaver::eval::as_new_thread(input, &format!("evict-{i}")), None).await.unwrap();
        }
        let x = palaver::eval::grown(&x, &i.to_string());
        let t = Instant::now();
        let r = s.summarize(x.clone(), None).await.unwrap();
        lat.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let hit = s.summarize(x.clone(), None).await.unwrap();
        stored.push(t.elapsed().as_secs_f64() * 1e3);
        assert!(hit.cached && hit.note == r.note, "an unchanged thread gets its stored note");
        let t = Instant::now();
        let again = model_only.summarize(x, None).await.unwrap();
        rerun.push(t.elapsed().as_secs_f64());
        rerun_drafts = (again.timings.drafted_tokens, again.timings.generated_tokens);
        if i == 0 && std::env::var_os("SHOW").is_some() {
            eprintln!("before the new message: {}\nafter it: {}", first.raw.replace('\n', " // "), r.raw.replace('\n', " // "));
        }
        prompt_ms.push(r.timings.prompt_ms);
        gen_ms.push(r.timings.generation_ms);
        (reused, total) = (r.timings.reused_prompt_tokens, r.timings.prompt_tokens);
        (generated, drafted) = (r.timings.generated_tokens, r.timings.drafted_tokens);
    }
    let l = median(lat);
    let cold_latency = cold_latency.unwrap_or_else(|| median(firsts));
    println!(
        "| ~1000 tokens + one new message, same thread id | {total} ({reused} reused) | {generated} ({drafted} drafted) | {l:.1} ({:.1}x faster than cold) | prompt {:.0} ms | generation {:.0} ms |",
        cold_latency / l,
        median(prompt_ms),
        median(gen_ms)
    );
    println!(
        "| the grown thread asked again, unchanged | stored note: {:.2} ms | the model again (`--note-cache-mb 0`): {:.2} s, {} of {} tokens drafted | | | |",
        median(stored),
        median(rerun),
        rerun_drafts.0,
        rerun_drafts.1
    );
}

/// The default policy, with `PALAVER_MAX_DRAFT`, `PALAVER_DECODE_ROWS`,
/// `PALAVER_PREFILL_DRAFT` and `PALAVER_PROMPT_CHUNK` if set.
fn batch_policy() -> palaver::llm::batching::BatchPolicy {
    let mut p = palaver::llm::batching::BatchPolicy::default();
    p.prompt_chunk = env_or("PALAVER_PROMPT_CHUNK", p.prompt_chunk);
    p.max_draft = env_or("PALAVER_MAX_DRAFT", p.max_draft);
    p.decode_rows = env_or("PALAVER_DECODE_ROWS", p.decode_rows);
    p.prefill_draft = env_or("PALAVER_PREFILL_DRAFT", p.prefill_draft);
    p
}

/// Work that no kernel can skip, for one summary: `rows` positions through
/// the model (the new prompt tokens, then every generated token but the last)
/// in `passes` passes (the prompt's chunks, then one per token not confirmed
/// as a draft). The summaries are the same greedy notes whatever the
/// schedule, so both counts are fixed by the notes themselves.
struct Work {
    rows: usize,
    passes: usize,
}

impl Work {
    fn of(r: &palaver::summarize::Summary, chunk: usize) -> Self {
        let t = &r.timings;
        let read = t.prompt_tokens_processed;
        Self { rows: read + t.generated_tokens.saturating_sub(1), passes: read.div_ceil(chunk) + t.generated_tokens.saturating_sub(t.drafted_tokens + 1) }
    }

    /// Time at `pass_ms` a pass of one row plus `row_ms` each further row.
    fn ms(&self, pass_ms: f64, row_ms: f64) -> f64 {
        self.passes as f64 * pass_ms + self.rows.saturating_sub(self.passes) as f64 * row_ms
    }
}

/// Threads other than the usual bench thread, each first summarised without
/// its last customer message and then re-summarised with it, as a helpdesk
/// does when that message arrives. Prints each one's latencies, and the
/// re-summary's floor: its passes at `PASS_MS` each (a pass of one row) and
/// its further rows at `ROW_MS` each. The defaults are the least a pass and
/// an extra row of the 1.5B cost on this machine after ~1,100 tokens
/// (`PASS_ROWS=1,2,5,81,145,256 CONTEXT=1100 cargo bench --bench llm`: 33.7
/// ms for one row, 3.3 ms more for the second and more for every further
/// one), so the first summary's time over that floor is the most that any
/// schedule could make of the ratio with passes and rows that cost what they
/// cost here.
async fn grown_threads(s: &Summarizer, dialogs: &[TweetSummDialog], n: usize) {
    let tok = s.llm().tokenizer().clone();
    let chunk = batch_policy().prompt_chunk;
    let (pass_ms, row_ms) = (env_or("PASS_MS", 33.7), env_or("ROW_MS", 3.3));
    let single = std::env::var_os("SINGLE").is_some();
    println!("\nre-summarised after each thread's own last customer message; floor at {pass_ms} ms a pass + {row_ms} ms each further row");
    println!("| thread | new message (tokens) | first: s, rows, passes | re-summarised: s, rows (drafted tokens), passes | x faster | floor of the re-summary (s) | x faster at most |");
    println!("|---|---|---|---|---|---|---|");
    let mut ratios = vec![];
    for k in 0..n {
        // Threads apart from the usual one (start 0): ~1,000 tokens of
        // consecutive dialogs each, or with SINGLE one whole dialog (one
        // conversation, a few hundred tokens).
        let start = 11 * k + 5;
        let whole = if single {
            dialogs[start % dialogs.len()].to_input()
        } else {
            palaver::eval::long_thread(dialogs, start, 1000, counter(&tok))
        };
        let Some(last) = whole.thread.messages.iter().rposition(|m| m.role == palaver::summarize::thread::Role::Customer) else { continue };
        let mut grown = palaver::eval::as_new_thread(&whole, &format!("grown-{k}"));
        grown.thread.messages.truncate(last + 1);
        let mut before = grown.clone();
        let message = before.thread.messages.pop().expect("the last customer message");
        let t = Instant::now();
        let first = s.summarize(before, None).await.unwrap();
        let cold = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let again = s.summarize(grown, None).await.unwrap();
        let warm = t.elapsed().as_secs_f64();
        if std::env::var_os("SHOW").is_some() {
            eprintln!("{k} before: {}\n{k} after: {}", first.raw.replace('\n', " // "), again.raw.replace('\n', " // "));
        }
        let (a, b) = (Work::of(&first, chunk), Work::of(&again, chunk));
        ratios.push(cold / warm);
        println!(
            "| {k} | {} | {cold:.1}, {}, {} | {warm:.2}, {} ({}), {} | {:.1}x | {:.2} | {:.1}x |",
            counter(&tok)(&message.text),
            a.rows,
            a.passes,
            b.rows,
            again.timings.drafted_tokens,
            b.passes,
            cold / warm,
            b.ms(pass_ms, row_ms) / 1e3,
            cold * 1e3 / b.ms(pass_ms, row_ms),
        );
    }
    println!("median: {:.1}x faster", median(ratios));
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// Counts a text's tokens, for `eval::long_thread`.
fn counter(tok: &tokenizers::Tokenizer) -> impl Fn(&str) -> usize + '_ {
    |t| tok.encode(t, false).map(|e| e.len()).unwrap_or(0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    palaver::cpu::keep_freed_memory();
    let name = std::env::var("PALAVER_SUMMARIZER").unwrap_or_else(|_| models::DEFAULT_SUMMARIZER.into());
    let runs = env_or("RUNS", 3);
    let dir = std::env::var_os("PALAVER_MODELS_DIR").map(Into::into).unwrap_or_else(models::default_models_dir);
    models::fetch_models(&[name.as_str()], &FetchOptions::new(dir.clone())).expect("fetch");
    let files = models::resolve_llm(&name, &dir, &HubOptions::default()).expect("resolve");
    let data = std::fs::read_to_string("../shared/data/summaries/tweetsumm_train.jsonl").expect("TweetSumm data beside the repo");
    let dialogs: Vec<TweetSummDialog> = data
        .lines()
        .take(200)
        .map(|l| serde_json::from_str::<TweetSummDialog>(l).unwrap())
        .filter(TweetSummDialog::usable)
        .collect();

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let llm = LlmHandle::spawn(files, candle_core::Device::Cpu, palaver::llm::LlmOptions { prefix_cache_bytes: Some(env_or("PREFIX_CACHE_MB", 256usize) << 20), batch: batch_policy() }).unwrap();
        llm.wait_loaded().await;
        let cfg = SummarizeConfig { faithfulness_retries: 0, ..SummarizeConfig::default() };
        let s = Summarizer::new(llm.clone(), cfg);
        if let Some(n) = std::env::var("GROWN").ok().and_then(|v| v.parse().ok()) {
            println!("model {name}, threads {}", rayon::current_num_threads());
            // A warm-up, so that the instructions are cached as for any thread after the first.
            let tok = llm.tokenizer().clone();
            let warm = palaver::eval::long_thread(&dialogs, 0, 200, counter(&tok));
            let _ = s.summarize(palaver::eval::as_new_thread(&warm, "warm-up"), None).await.unwrap();
            grown_threads(&s, &dialogs, n).await;
            return;
        }
        println!("model {name}, {runs} runs after a warm-up, threads {}", rayon::current_num_threads());
        println!("| thread | prompt tokens (reused) | generated | latency median (s) | prompt tok/s (tokens read) | generated tok/s |");
        println!("|---|---|---|---|---|---|");
        for target in [200usize, 1000] {
            let tok = llm.tokenizer().clone();
            let input = palaver::eval::long_thread(&dialogs, 0, target, counter(&tok));
            // A thread never seen: its own id and a first message of its own,
            // so that only the instructions before the transcript are cached
            // (from the warm-up) and the whole transcript is read.
            let cold = |i: usize| palaver::eval::as_new_thread(&input, &format!("cold-{target}-{i}"));
            let t = Instant::now();
            let _ = s.summarize(cold(runs), None).await.unwrap();
            println!("| ~{target} tokens, first request after start (nothing cached) | | | {:.1} | | |", t.elapsed().as_secs_f64());
            if std::env::var_os("RESUMMARISE_ONLY").is_some() {
                if target == 1000 {
                    resummarise(&s, &input, runs, None).await;
                }
                continue;
            }
            let (mut lat, mut pps, mut gps) = (vec![], vec![], vec![]);
            let (mut pt, mut ru, mut gt, mut dt) = (0, 0, 0, 0);
            for i in 0..runs {
                let t = Instant::now();
                let r = s.summarize(cold(i), None).await.unwrap();
                lat.push(t.elapsed().as_secs_f64());
                if i == 0 && std::env::var_os("SHOW").is_some() {
                    eprintln!("{target}: {}", r.raw.replace('\n', " // "));
                }
                let read = r.timings.prompt_tokens - r.timings.reused_prompt_tokens;
                pps.push(read as f64 * 1e3 / r.timings.prompt_ms);
                gps.push(r.timings.generated_tokens as f64 * 1e3 / r.timings.generation_ms.max(1.0));
                (pt, ru, gt, dt) = (r.timings.prompt_tokens, r.timings.reused_prompt_tokens, r.timings.generated_tokens, r.timings.drafted_tokens);
            }
            let cold_latency = median(lat.clone());
            println!("| ~{target} tokens, new thread | {pt} ({ru}) | {gt} ({dt} drafted) | {cold_latency:.1} | {:.1} | {:.1} |", median(pps), median(gps));
            if target == 1000 {
                resummarise(&s, &input, runs, Some(cold_latency)).await;
            }
        }
    });
}
