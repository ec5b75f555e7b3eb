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

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
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
        let llm = LlmHandle::spawn(files, candle_core::Device::Cpu, palaver::llm::LlmOptions { prefix_cache_bytes: Some(env_or("PREFIX_CACHE_MB", 256) << 20), batch: batch_policy() }).unwrap();
        llm.wait_loaded().await;
        let cfg = SummarizeConfig { faithfulness_retries: 0, ..SummarizeConfig::default() };
        let s = Summarizer::new(llm.clone(), cfg);
        println!("model {name}, {runs} runs after a warm-up, threads {}", rayon::current_num_threads());
        println!("| thread | prompt tokens (reused) | generated | latency median (s) | prompt tok/s (tokens read) | generated tok/s |");
        println!("|---|---|---|---|---|---|");
        for target in [200usize, 1000] {
            let tok = llm.tokenizer().clone();
            let input = palaver::eval::long_thread(&dialogs, 0, target, |t| tok.encode(t, false).map(|e| e.len()).unwrap_or(0));
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
