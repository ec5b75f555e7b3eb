//! Prompt and generation speed of palaver's own forward against candle's stock
//! quantized models, same GGUF file, same process, same threads:
//! prompt of 512 and 1,024 tokens, and 64 generated tokens after a short
//! context and after 1,024 tokens. Not criterion: one stock 1,024-token prompt
//! takes over a minute on 2 cores.
//!
//!   cargo bench --bench llm                       # both Qwen2.5 models
//!   PALAVER_LLMS=qwen2.5-coder-0.5b-instruct RUNS=3 cargo bench --bench llm
//!   STOCK=0 cargo bench --bench llm               # palaver only
//!   CHUNK=1024 cargo bench --bench llm            # prompt chunk (default: the service's)
//!   DECODE_ONLY=200 [CONTEXT=1024] cargo bench --bench llm   # decode steps only (profiling)
//!   PASS_ROWS=all [CONTEXT=512] cargo bench --bench llm   # cost of a pass by its rows (drafts)
//!   PASS_ROWS=8 REPS=200 cargo bench --bench llm  # one row count, many passes (profiling)
//!   DECODE_RATIO=8 cargo bench --bench llm        # after-1,024 / short generation, alternated
//!   BATCH=1,2,4,8 [CONTEXT=1024] cargo bench --bench llm   # sequences decoded together: aggregate tok/s
//!   PAIRED=1 cargo bench --bench llm              # generations asked on stdin (benches/llm_peers.py --paired)

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::{quantized_llama, quantized_qwen2};
use palaver::llm::transformer::argmax;
use palaver::llm::Llm;
use palaver::models::{self, FetchOptions, HubOptions};
use std::time::Instant;

/// A model behind one interface: feed tokens at a position, get last logits.
trait Engine {
    fn reset(&mut self);
    fn feed(&mut self, tokens: &[u32], pos: usize) -> Tensor;
}

struct Own<'a> {
    llm: &'a Llm,
    cache: palaver::llm::kv::SeqCache,
}

impl Engine for Own<'_> {
    fn reset(&mut self) {
        self.cache.truncate(0);
    }
    fn feed(&mut self, tokens: &[u32], _pos: usize) -> Tensor {
        // Long prompts go in chunks of CHUNK tokens (the service's default
        // `--prompt-chunk`).
        let chunk = std::env::var("CHUNK")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(palaver::llm::batching::BatchPolicy::default().prompt_chunk);
        let mut out = None;
        for c in tokens.chunks(chunk) {
            out = Some(self.llm.transformer().forward(c, &mut self.cache).unwrap());
        }
        out.unwrap()
    }
}

enum Stock {
    Qwen2(quantized_qwen2::ModelWeights),
    Llama(quantized_llama::ModelWeights),
}

impl Engine for Stock {
    fn reset(&mut self) {}
    fn feed(&mut self, tokens: &[u32], pos: usize) -> Tensor {
        let x = Tensor::new(tokens, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let l = match self {
            Stock::Qwen2(m) => m.forward(&x, pos),
            Stock::Llama(m) => m.forward(&x, pos),
        };
        l.unwrap().squeeze(0).unwrap()
    }
}

fn stock(gguf: &std::path::Path) -> Stock {
    let mut r = std::io::BufReader::new(std::fs::File::open(gguf).unwrap());
    let ct = gguf_file::Content::read(&mut r).unwrap();
    if ct.metadata["general.architecture"].to_string().unwrap() == "qwen2" {
        Stock::Qwen2(quantized_qwen2::ModelWeights::from_gguf(ct, &mut r, &Device::Cpu).unwrap())
    } else {
        Stock::Llama(quantized_llama::ModelWeights::from_gguf(ct, &mut r, &Device::Cpu).unwrap())
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

struct Speeds {
    prompt512: f64,
    prompt1024: f64,
    gen_short: f64,
    gen_1024: f64,
}

/// Tokens/s of 64 greedy tokens after the first `context` tokens, from an empty cache.
fn generation_rate(e: &mut dyn Engine, tokens: &[u32], context: usize) -> f64 {
    e.reset();
    let mut logits = e.feed(&tokens[..context], 0);
    let t = Instant::now();
    for i in 0..64 {
        let next = argmax(&logits).unwrap();
        logits = e.feed(&[next], context + i);
    }
    64.0 / t.elapsed().as_secs_f64()
}

fn measure(e: &mut dyn Engine, tokens: &[u32], runs: usize) -> Speeds {
    let prompt = |e: &mut dyn Engine, n: usize| {
        let v: Vec<f64> = (0..runs)
            .map(|_| {
                e.reset();
                let t = Instant::now();
                e.feed(&tokens[..n], 0);
                n as f64 / t.elapsed().as_secs_f64()
            })
            .collect();
        median(v)
    };
    let generate = |e: &mut dyn Engine, context: usize| median((0..runs).map(|_| generation_rate(e, tokens, context)).collect());
    Speeds { prompt512: prompt(e, 512), prompt1024: prompt(e, 1024), gen_short: generate(e, 16), gen_1024: generate(e, 1024) }
}

fn main() {
    let names = std::env::var("PALAVER_LLMS").unwrap_or_else(|_| "qwen2.5-coder-0.5b-instruct,qwen2.5-coder-1.5b-instruct".into());
    let runs: usize = std::env::var("RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let with_stock = std::env::var("STOCK").map(|v| v != "0").unwrap_or(true);
    // As the service does (`KEEP_FREED=0`: glibc's defaults).
    if std::env::var("KEEP_FREED").map(|v| v != "0").unwrap_or(true) {
        palaver::cpu::keep_freed_memory();
    }
    let dir = std::env::var_os("PALAVER_MODELS_DIR").map(Into::into).unwrap_or_else(models::default_models_dir);
    // Real text, so that attention sees a realistic spread of tokens.
    let text = std::fs::read_to_string("../shared/data/summaries/tweetsumm_train.jsonl").expect("TweetSumm data beside the repo");
    println!("threads {}, median of {runs} runs", rayon::current_num_threads());
    println!("| model | engine | prompt 512 tok/s | prompt 1,024 tok/s | generation short tok/s | generation after 1,024 tok/s |");
    println!("|---|---|---|---|---|---|");
    for name in names.split(',') {
        models::fetch_models(&[name], &FetchOptions::new(dir.clone())).expect("fetch");
        let files = models::resolve_llm(name, &dir, &HubOptions::default()).expect("resolve");
        let llm = Llm::load(&files, &Device::Cpu, 0).unwrap();
        let tokens = llm.tokenizer().encode(text.as_str(), false).unwrap().get_ids()[..2048].to_vec();
        if let Ok(list) = std::env::var("BATCH") {
            // Continuous batching's decode gain: b sequences, each after its
            // own CONTEXT-token cache (copies of one prompt's, each then fed
            // its own tokens), stepped together for 64 greedy tokens.
            let ctx: usize = std::env::var("CONTEXT").ok().and_then(|s| s.parse().ok()).unwrap_or(1024);
            let m = llm.transformer();
            let mut cache = m.new_cache();
            for c in tokens[..ctx].chunks(palaver::llm::batching::BatchPolicy::default().prompt_chunk) {
                m.forward(c, &mut cache).unwrap();
            }
            let snap = cache.snapshot(ctx).unwrap();
            let mut single = None;
            for b in list.split(',').map(|s| s.trim().parse::<usize>().expect("BATCH: sequence counts")) {
                let mut caches: Vec<_> = (0..b)
                    .map(|_| {
                        let mut c = m.new_cache();
                        c.restore(&snap, ctx).unwrap();
                        c
                    })
                    .collect();
                let mut next: Vec<u32> = (0..b).map(|i| tokens[ctx + i]).collect();
                let t = Instant::now();
                for _ in 0..64 {
                    let mut steps: Vec<palaver::llm::transformer::Step> =
                        caches.iter_mut().zip(&next).map(|(c, t)| palaver::llm::transformer::Step { tokens: std::slice::from_ref(t), cache: c }).collect();
                    let logits = m.forward_many(&mut steps, false).unwrap();
                    next = (0..b).map(|i| argmax(&logits.get(i).unwrap()).unwrap()).collect();
                }
                let rate = (64 * b) as f64 / t.elapsed().as_secs_f64();
                let one = *single.get_or_insert(rate);
                println!("| {name} | {b} sequences after {ctx} tokens | {rate:.1} tok/s aggregate | {:.2}x the first row |", rate / one);
            }
            continue;
        }
        if let Ok(list) = std::env::var("PASS_ROWS") {
            // Cost of a decode pass that checks drafted tokens (or steps
            // several sequences): r rows at once after a CONTEXT-token
            // (default 512) context, against one row.
            let list = if list == "all" { "1,2,3,4,5,7,9,13,17".to_string() } else { list };
            let reps: usize = std::env::var("REPS").ok().and_then(|s| s.parse().ok()).unwrap_or(16);
            let ctx: usize = std::env::var("CONTEXT").ok().and_then(|s| s.parse().ok()).unwrap_or(512);
            let m = llm.transformer();
            let mut cache = m.new_cache();
            m.forward(&tokens[..ctx], &mut cache).unwrap();
            let mut one = None;
            for r in list.split(',').map(|r| r.trim().parse::<usize>().expect("PASS_ROWS: row counts or all")) {
                let t = Instant::now();
                for i in 0..reps {
                    m.forward(&tokens[ctx + i % 64..ctx + i % 64 + r], &mut cache).unwrap();
                    cache.truncate(ctx);
                }
                let ms = t.elapsed().as_secs_f64() * 1e3 / reps as f64;
                if r == 1 {
                    one = Some(ms);
                }
                let ratio = one.map(|o| format!("{:.2}x one row", ms / o)).unwrap_or_default();
                println!("| {name} | pass of {r} rows | {ms:.1} ms | {ratio} |");
            }
            continue;
        }
        if let Some(n) = std::env::var("DECODE_ONLY").ok().and_then(|s| s.parse::<usize>().ok()) {
            // For profilers: n decode steps after a CONTEXT-token (16) context, nothing else.
            let ctx: usize = std::env::var("CONTEXT").ok().and_then(|s| s.parse().ok()).unwrap_or(16);
            let mut e = Own { llm: &llm, cache: llm.transformer().new_cache() };
            let mut logits = e.feed(&tokens[..ctx], 0);
            let t = Instant::now();
            for i in 0..n {
                logits = e.feed(&[argmax(&logits).unwrap()], ctx + i);
            }
            println!("| {name} | palaver decode only | | | {:.1} | |", n as f64 / t.elapsed().as_secs_f64());
            continue;
        }
        if std::env::var("PAIRED").is_ok_and(|v| v == "1") {
            // Driven by benches/llm_peers.py --paired, which takes turns with
            // llama.cpp generation by generation: each stdin line, a context
            // length, answers the tokens/s of 64 tokens generated after that
            // many, the model staying loaded.
            let mut e = Own { llm: &llm, cache: llm.transformer().new_cache() };
            generation_rate(&mut e, &tokens, 16); // warm-up, as the peer's
            println!("ready");
            for line in std::io::stdin().lines() {
                let line = line.expect("stdin");
                let context: usize = match line.trim().parse() {
                    Ok(c) if (1..=tokens.len() - 64).contains(&c) => c,
                    _ => panic!("PAIRED: a context of 1 to {} tokens a line, got {line:?}", tokens.len() - 64),
                };
                println!("{:.3}", generation_rate(&mut e, &tokens, context));
            }
            continue;
        }
        if let Some(pairs) = std::env::var("DECODE_RATIO").ok().and_then(|s| s.parse::<usize>().ok()) {
            // 64 tokens after a 16-token and after a 1,024-token context,
            // alternated in one process, so that the VM's drift hits both alike.
            let mut e = Own { llm: &llm, cache: llm.transformer().new_cache() };
            let (mut short, mut long, mut ratio) = (vec![], vec![], vec![]);
            for _ in 0..pairs {
                short.push(generation_rate(&mut e, &tokens, 16));
                long.push(generation_rate(&mut e, &tokens, 1024));
                ratio.push(long[long.len() - 1] / short[short.len() - 1]);
            }
            println!(
                "| {name} | palaver, {pairs} alternated pairs | short {:.1} tok/s | after 1,024 {:.1} tok/s | ratio median {:.1}% (pairs: {}) |",
                median(short),
                median(long),
                100.0 * median(ratio.clone()),
                ratio.iter().map(|r| format!("{:.0}%", 100.0 * r)).collect::<Vec<_>>().join(" ")
            );
            continue;
        }
        let own = measure(&mut Own { llm: &llm, cache: llm.transformer().new_cache() }, &tokens, runs);
        let row = |engine: &str, s: &Speeds| {
            println!(
                "| {name} | {engine} | {:.1} | {:.1} | {:.1} | {:.1} |",
                s.prompt512, s.prompt1024, s.gen_short, s.gen_1024
            )
        };
        row("palaver", &own);
        if with_stock {
            drop(llm);
            let st = measure(&mut stock(&files.gguf), &tokens, runs.min(2));
            row("candle stock", &st);
            println!(
                "| {name} | ratio | {:.2}x | {:.2}x | {:.2}x | {:.2}x |",
                own.prompt512 / st.prompt512,
                own.prompt1024 / st.prompt1024,
                own.gen_short / st.gen_short,
                own.gen_1024 / st.gen_1024
            );
        }
        println!(
            "| {name} | palaver: generation after 1,024 / short | | | | {:.0}% |",
            100.0 * own.gen_1024 / own.gen_short
        );
    }
}
