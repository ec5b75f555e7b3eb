//! Encoder throughput: messages/s at batch 1, 8, 32 and 128 on short support
//! messages (about 24 tokens), straight on the model (no queue, no gRPC).
//!
//!   cargo bench --bench encoder                   # multilingual-e5-small
//!   PALAVER_BENCH_ENCODER=all-minilm-l6-v2 cargo bench --bench encoder
//!
//! benches/torch_encoder.py measures PyTorch on the same safetensors.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use palaver::encoder::{Encoder, Precision, TextEncoder};
use palaver::models::{self, FetchOptions};
use std::hint::black_box;

/// Team-written support messages of 20-30 tokens, in several languages;
/// benches/torch_encoder.py reads the same file.
const MESSAGES: &str = include_str!("messages.txt");

fn bench(c: &mut Criterion) {
    let name = std::env::var("PALAVER_BENCH_ENCODER").unwrap_or_else(|_| models::DEFAULT_ENCODER.into());
    let dir = std::env::var_os("PALAVER_MODELS_DIR").map(Into::into).unwrap_or_else(models::default_models_dir);
    models::fetch_models(&[name.as_str()], &FetchOptions::new(dir.clone())).expect("fetch");
    let files = models::resolve_encoder(&name, &dir).expect("resolve");
    let text = TextEncoder::new(&files, 512).expect("tokenizer");
    let ids: Vec<Vec<u32>> = MESSAGES.lines().filter(|l| !l.is_empty()).map(|m| text.tokenize(m).unwrap()).collect();
    let mean = ids.iter().map(|i| i.len()).sum::<usize>() as f64 / ids.len() as f64;
    eprintln!("{name}: mean {mean:.1} tokens per message");
    for precision in [Precision::F32, Precision::Int8] {
        if precision == Precision::Int8 && !palaver::cpu::avx512_vnni() {
            eprintln!("no AVX-512 VNNI: int8 not measured");
            continue;
        }
        let enc = Encoder::load(&files, &candle_core::Device::Cpu, precision).expect("load");
        let mut g = c.benchmark_group(format!("encode/{name}/{precision:?}"));
        g.sample_size(10);
        for batch in [1usize, 8, 32, 128] {
            let seqs: Vec<&[u32]> = (0..batch).map(|i| ids[i % ids.len()].as_slice()).collect();
            g.throughput(Throughput::Elements(batch as u64));
            g.bench_function(format!("batch{batch}"), |b| b.iter(|| black_box(enc.embed(&seqs).unwrap())));
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
