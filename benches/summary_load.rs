//! Load generator for Summarize over gRPC: N clients at once, each with a
//! different TweetSumm thread of ~TOKENS tokens (default 1,000), against the same server; reports
//! the aggregate generated tokens/s, p50/p95/p99 latency, and the solo latency
//! of the same threads for the ratio. The loaded requests are streamed, so it
//! also times the preview chunk and the first words. Faithfulness retries are off so every
//! request does one generation.
//!
//!   cargo bench --bench summary_load
//!   PALAVER_SUMMARIZER=qwen2.5-coder-0.5b-instruct CLIENTS=8 TOKENS=200 cargo bench --bench summary_load
//!   DECODE_SHARE=0 cargo bench --bench summary_load   # `--decode-share` (default 0.5)
//!   CLIENTS=4 RESUMMARISE=2 cargo bench --bench summary_load
//!       # also 2 threads re-summarised after a new message, sent DELAY_S (default 3) s into the
//!       # burst; PROMPT_OVERTAKES=0 reads prompts in arrival order (`--prompt-overtakes`, default 4)
//!   CLIENTS=4 BURST_PRIORITY=background LATE_NEW=1 cargo bench --bench summary_load
//!       # the burst sent as background work (`priority`), and 1 new thread DELAY_S into it as an
//!       # agent's request; BURST_PRIORITY=interactive (the default) for the same load without priorities;
//!       # BACKGROUND_RIDERS=n (`--background-riders`, default 0)
//!   CLIENTS=1 GROWING=3 EVERY_S=2 cargo bench --bench summary_load
//!       # instead of the burst: one thread growing by a customer message every EVERY_S s, a
//!       # background note asked after each (NOTE_CACHE_MB=0: every note written in full)
//!   CLIENTS=4 BURST_PRIORITY=background OPENED=1 DELAY_S=10 cargo bench --bench summary_load
//!       # 1 of the burst's threads asked for again, unchanged, by an agent DELAY_S into the burst:
//!       # it waits for the note being written, raised to interactive; NOTE_CACHE_MB=0
//!       # (`--note-cache-mb`) for a second generation of its own instead

mod common;

use palaver::eval::TweetSummDialog;
use palaver::llm::LlmOptions;
use palaver::models;
use palaver::proto::v1::{self as pb, assist_client::AssistClient, summarize_chunk::Chunk};
use palaver::summarize::SummarizeConfig;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// Thread `t` as one the service has never seen, under `id`: the warm-up,
/// solo and loaded runs of a thread share only the cached instructions.
fn request(t: &palaver::summarize::thread::SummarizeInput, id: &str) -> pb::SummarizeRequest {
    let t = palaver::eval::as_new_thread(t, id);
    let messages = t
        .thread
        .messages
        .iter()
        .map(|m| pb::Message {
            id: m.id.clone(),
            role: if m.role == palaver::summarize::thread::Role::Customer { pb::Role::Customer } else { pb::Role::Agent } as i32,
            text: m.text.clone(),
            ..Default::default()
        })
        .collect();
    pb::SummarizeRequest { thread: Some(pb::Thread { thread_id: t.thread.id, messages }), ..Default::default() }
}

/// Sends `req` after `delay`; resolves to its latency, and prints the
/// response's own timings under `label`.
fn send_later(ch: &Channel, req: pb::SummarizeRequest, delay: Duration, label: &'static str) -> tokio::task::JoinHandle<f64> {
    let mut c = AssistClient::new(ch.clone());
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let t = Instant::now();
        let r = c.summarize(req).await.expect(label).into_inner();
        let (tm, tk) = (r.timings.unwrap_or_default(), r.tokens.unwrap_or_default());
        println!(
            "  {label}: queue {:.1} s, prompt {:.1} s ({} tokens, {} reused), generation {:.1} s ({} tokens)",
            tm.queue_ms / 1e3,
            tm.prompt_ms / 1e3,
            tk.prompt_tokens,
            tk.reused_prompt_tokens,
            tm.generation_ms / 1e3,
            tk.generated_tokens
        );
        t.elapsed().as_secs_f64()
    })
}

/// A customer who writes `n` messages `every` apart, each answered by a
/// background note of the thread so far: when each note came, or that it was
/// abandoned for a longer thread's.
async fn growing_thread(ch: &Channel, base: &palaver::summarize::thread::SummarizeInput, n: usize, every: Duration) {
    let mut versions = vec![base.clone()];
    for i in 1..n {
        versions.push(palaver::eval::grown(&versions[i - 1], &i.to_string()));
    }
    let started = Instant::now();
    let tasks: Vec<_> = versions
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let mut c = AssistClient::new(ch.clone());
            let req = pb::SummarizeRequest { priority: pb::Priority::Background as i32, ..request(v, "growing") };
            tokio::spawn(async move {
                tokio::time::sleep(every * i as u32).await;
                let r = c.summarize(req).await;
                (started.elapsed().as_secs_f64(), r.map(|r| r.into_inner().tokens.unwrap_or_default().generated_tokens).map_err(|e| e.code()))
            })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let (at, r) = t.await.unwrap();
        match r {
            Ok(generated) => println!("message {}: background note at {at:.1} s ({generated} tokens generated)", i + 1),
            Err(code) => println!("message {}: {code:?} at {at:.1} s", i + 1),
        }
    }
    println!("all {n} notes answered after {:.1} s", started.elapsed().as_secs_f64());
}

/// The latencies `send_later` tasks resolve to, in their order.
async fn latencies(tasks: Vec<tokio::task::JoinHandle<f64>>) -> Vec<f64> {
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

fn shown(latencies: &[f64]) -> String {
    latencies.iter().map(|l| format!("{l:.1} s")).collect::<Vec<_>>().join(", ")
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    palaver::cpu::keep_freed_memory();
    let summarizer = std::env::var("PALAVER_SUMMARIZER").unwrap_or_else(|_| models::DEFAULT_SUMMARIZER.into());
    let clients: usize = std::env::var("CLIENTS").ok().and_then(|s| s.parse().ok()).unwrap_or(8);
    let tokens: usize = std::env::var("TOKENS").ok().and_then(|s| s.parse().ok()).unwrap_or(1000);
    let resummarise: usize = std::env::var("RESUMMARISE").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    let late_new: usize = std::env::var("LATE_NEW").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    let opened: usize = std::env::var("OPENED").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    let growing: usize = std::env::var("GROWING").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    let every = Duration::from_secs_f64(std::env::var("EVERY_S").ok().and_then(|s| s.parse().ok()).unwrap_or(2.0));
    let burst_priority = match std::env::var("BURST_PRIORITY").as_deref() {
        Ok("background") => pb::Priority::Background,
        Ok("interactive") | Err(_) => pb::Priority::Interactive,
        Ok(other) => panic!("BURST_PRIORITY={other}: expected background or interactive"),
    };
    let delay = Duration::from_secs_f64(std::env::var("DELAY_S").ok().and_then(|s| s.parse().ok()).unwrap_or(3.0));
    let mut llm = LlmOptions::default();
    llm.batch.max_sequences = (clients + resummarise + late_new + opened).max(1);
    llm.batch.max_background = llm.batch.max_background.max(clients);
    if let Some(n) = std::env::var("BACKGROUND_RIDERS").ok().and_then(|s| s.parse().ok()) {
        llm.batch.background_riders = n;
    }
    if let Some(share) = std::env::var("DECODE_SHARE").ok().and_then(|s| s.parse().ok()) {
        llm.batch.decode_share = share;
    }
    if let Some(n) = std::env::var("PROMPT_OVERTAKES").ok().and_then(|s| s.parse().ok()) {
        llm.batch.prompt_overtakes = n;
    }
    let overtakes = llm.batch.prompt_overtakes;
    let share = llm.batch.decode_share;
    let mut cfg = SummarizeConfig { faithfulness_retries: 0, ..SummarizeConfig::default() };
    if let Some(mb) = std::env::var("NOTE_CACHE_MB").ok().and_then(|s| s.parse::<usize>().ok()) {
        cfg.note_cache_bytes = mb << 20;
    }
    let (addr, tok) = common::start_server(&summarizer, llm, cfg);
    let data = std::fs::read_to_string("../shared/data/summaries/tweetsumm_train.jsonl").expect("TweetSumm data beside the repo");
    let dialogs: Vec<TweetSummDialog> =
        data.lines().take(400).map(|l| serde_json::from_str(l).unwrap()).filter(TweetSummDialog::usable).collect();
    let count = |t: &str| tok.encode(t, false).map(|e| e.len()).unwrap_or(0);
    let threads: Vec<_> = (0..clients).map(|i| palaver::eval::long_thread(&dialogs, i * 37, tokens, count)).collect();
    let ch = Channel::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
    let mut c = AssistClient::new(ch.clone());
    // Wait for the model, then warm up.
    loop {
        match c.summarize(request(&threads[0], "warm-up")).await {
            Ok(_) => break,
            Err(e) if e.code() == tonic::Code::Unavailable => tokio::time::sleep(Duration::from_millis(500)).await,
            Err(e) => panic!("{e}"),
        }
    }
    println!(
        "Summarize on {addr}, model {summarizer}, {clients} clients ({burst_priority:?}), ~{tokens}-token threads, decode share {share}, prompt overtakes {overtakes}"
    );
    // Solo: each thread alone, for the latency ratio.
    let mut solo = Vec::new();
    for (i, t) in threads.iter().enumerate().take(2) {
        let started = Instant::now();
        let r = c.summarize(request(t, &format!("solo-{i}"))).await.unwrap().into_inner();
        solo.push(started.elapsed().as_secs_f64());
        let tk = r.tokens.unwrap_or_default();
        println!("solo {i}: {:.1} s, prompt {} tokens, generated {}", solo[i], tk.prompt_tokens, tk.generated_tokens);
    }
    let solo_mean = solo.iter().sum::<f64>() / solo.len() as f64;
    if growing > 0 {
        return growing_thread(&ch, &palaver::eval::long_thread(&dialogs, 999, tokens, count), growing, every).await;
    }
    // Threads to re-summarise during the burst, summarised once beforehand;
    // the first is also grown and re-summarised alone, for the ratio.
    let mut grown = Vec::new();
    for i in 0..resummarise {
        let t = palaver::eval::long_thread(&dialogs, (clients + i) * 37, tokens, count);
        c.summarize(request(&t, &format!("re-{i}"))).await.unwrap();
        grown.push((format!("re-{i}"), palaver::eval::grown(&t, &i.to_string())));
    }
    let mut solo_re = None;
    if resummarise > 0 {
        let t = palaver::eval::long_thread(&dialogs, clients * 37, tokens, count);
        c.summarize(request(&t, "re-solo")).await.unwrap();
        let g = palaver::eval::grown(&t, "solo");
        let started = Instant::now();
        let r = c.summarize(request(&g, "re-solo")).await.unwrap().into_inner();
        let tk = r.tokens.unwrap_or_default();
        solo_re = Some(started.elapsed().as_secs_f64());
        println!("re-summarised alone: {:.1} s, {} of {} prompt tokens reused", solo_re.unwrap(), tk.reused_prompt_tokens, tk.prompt_tokens);
    }
    // Agents' requests that come DELAY_S into the burst: new threads never
    // seen, grown threads to re-summarise.
    let late_tasks: Vec<_> = (0..late_new)
        .map(|i| {
            let t = palaver::eval::long_thread(&dialogs, (clients + resummarise + 1 + i) * 37, tokens, count);
            send_later(&ch, request(&t, &format!("late-{i}")), delay, "late")
        })
        .collect();
    // Agents opening chats whose notes the burst is writing.
    let opened_tasks: Vec<_> = threads.iter().take(opened).enumerate().map(|(i, t)| send_later(&ch, request(t, &format!("load-{i}")), delay, "opened")).collect();
    let re_tasks: Vec<_> = grown.into_iter().map(|(id, g)| send_later(&ch, request(&g, &id), delay, "re-summarised")).collect();
    let started = Instant::now();
    let tasks: Vec<_> = threads
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let mut c = AssistClient::new(ch.clone());
            let req = pb::SummarizeRequest { priority: burst_priority as i32, ..request(t, &format!("load-{i}")) };
            // Streamed, to time what an agent sees first: the preview (the
            // thread's references, before the model), the first words, the note.
            tokio::spawn(async move {
                let t = Instant::now();
                let mut stream = c.summarize_stream(req).await.expect("summarize").into_inner();
                let (mut preview, mut first_text, mut ahead, mut deltas) = (None, None, 0, 0);
                loop {
                    let chunk = stream.message().await.expect("chunk").expect("a response chunk").chunk.expect("chunk body");
                    match chunk {
                        Chunk::Preview(p) => {
                            preview = Some(t.elapsed().as_secs_f64());
                            ahead = p.summaries_ahead;
                        }
                        // The first delta is the note's forced opening, sent at once.
                        Chunk::TextDelta(_) => {
                            deltas += 1;
                            if deltas == 2 {
                                first_text = Some(t.elapsed().as_secs_f64());
                            }
                        }
                        Chunk::Restart(_) => {}
                        Chunk::Response(r) => {
                            let at = |x: Option<f64>| x.expect("a preview and text before the response");
                            let done = t.elapsed().as_secs_f64();
                            break (at(preview), at(first_text), done, r.tokens.unwrap_or_default().generated_tokens, ahead);
                        }
                    }
                }
            })
        })
        .collect();
    let (mut lat, mut previews, mut firsts, mut aheads) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut generated = 0u64;
    for t in tasks {
        let (p, f, l, g, a) = t.await.unwrap();
        previews.push(p);
        firsts.push(f);
        lat.push(l);
        aheads.push(a);
        generated += g as u64;
    }
    let wall = started.elapsed().as_secs_f64();
    for v in [&mut lat, &mut previews, &mut firsts] {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    }
    println!(
        "{clients} at once: {:.1} generated tokens/s aggregate, wall {wall:.1} s, latency p50 {:.1} s p95 {:.1} s p99 {:.1} s; p95 / solo {:.2}x",
        generated as f64 / wall,
        pct(&lat, 0.5),
        pct(&lat, 0.95),
        pct(&lat, 0.99),
        pct(&lat, 0.95) / solo_mean
    );
    println!(
        "  preview (references, language, coverage) p50 {:.0} ms p95 {:.0} ms, summaries ahead {aheads:?}; first generated words p50 {:.1} s p95 {:.1} s",
        pct(&previews, 0.5) * 1e3,
        pct(&previews, 0.95) * 1e3,
        pct(&firsts, 0.5),
        pct(&firsts, 0.95)
    );
    if late_new > 0 {
        println!(
            "{late_new} new thread(s) sent {:.0} s into the {burst_priority:?} burst: {} (alone: {solo_mean:.1} s)",
            delay.as_secs_f64(),
            shown(&latencies(late_tasks).await)
        );
    }
    if opened > 0 {
        println!(
            "{opened} of the {burst_priority:?} burst's threads asked for again by an agent {:.0} s into it: {} (alone: {solo_mean:.1} s)",
            delay.as_secs_f64(),
            shown(&latencies(opened_tasks).await)
        );
    }
    if let Some(solo_re) = solo_re {
        let re = latencies(re_tasks).await;
        let worst = re.iter().cloned().fold(0.0, f64::max);
        println!(
            "{resummarise} re-summarised {:.0} s into the burst: {} ({:.1}x alone at worst)",
            delay.as_secs_f64(),
            shown(&re),
            worst / solo_re
        );
    }
}
