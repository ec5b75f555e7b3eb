//! The decoder's matmul kernels on the shapes of Qwen2.5-0.5B and 1.5B layers:
//! palaver's block int8 GEMM (AVX-512 VNNI) against the f32 GEMM candle runs on
//! dequantized weights and against candle's own quantized matmul (Q8_0 and
//! Q4_K, the 1.5B model's type) and palaver's exact Q4_K kernel against
//! candle's, for a
//! 512-row prompt chunk and for 1 and 8 decode rows. Criterion reports
//! elements as multiply-adds x 2, so its "Gelem/s" reads as GFLOP/s (GOP/s
//! for int8).
//!
//!   cargo bench --bench kernels
//!   ROWS=1,8 cargo bench --bench kernels -- int8

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use palaver::llm::q4k::PackedQ4K;
use palaver::llm::q6k::PackedQ6K;
use palaver::llm::qgemm::PackedWeight;
use std::hint::black_box;

/// (name, outputs, inputs): attention and MLP weights of both models.
const SHAPES: [(&str, usize, usize); 6] = [
    ("0.5b-qo-896x896", 896, 896),
    ("0.5b-up-4864x896", 4864, 896),
    ("0.5b-down-896x4864", 896, 4864),
    ("1.5b-up-8960x1536", 8960, 1536),
    ("1.5b-down-1536x8960", 1536, 8960),
    ("1.5b-output-151936x1536", 151936, 1536),
];

fn bench(c: &mut Criterion) {
    let rows: Vec<usize> = std::env::var("ROWS")
        .unwrap_or_else(|_| "1,8,512".into())
        .split(',')
        .map(|r| r.trim().parse().expect("ROWS: comma-separated row counts"))
        .collect();
    eprintln!("AVX-512 VNNI: {}", palaver::cpu::avx512_vnni());
    let dev = Device::Cpu;
    for (name, n, k) in SHAPES {
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let q8 = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let wd = q8.dequantize(&dev).unwrap();
        let packed = PackedWeight::from_f32(&wd.flatten_all().unwrap().to_vec1::<f32>().unwrap(), n, k);
        let qmm = QMatMul::from_qtensor(q8).unwrap();
        // Q4_K needs inputs in multiples of 256.
        let q4k_raw = QTensor::quantize(&w, GgmlDType::Q4K).ok();
        let own_q4k = q4k_raw.as_ref().map(|q| PackedQ4K::new(q).unwrap());
        let q4k = q4k_raw.map(|q| QMatMul::from_qtensor(q).unwrap());
        let q6k_raw = QTensor::quantize(&w, GgmlDType::Q6K).ok();
        let own_q6k = q6k_raw.as_ref().map(|q| PackedQ6K::new(q).unwrap());
        let q6k = q6k_raw.map(|q| QMatMul::from_qtensor(q).unwrap());
        let wt = wd.t().unwrap();
        let mut g = c.benchmark_group(format!("matmul/{name}"));
        g.sample_size(10);
        for &m in &rows {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let xv: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            g.throughput(Throughput::Elements((2 * m * n * k) as u64));
            g.bench_function(format!("int8/rows{m}"), |b| b.iter(|| black_box(packed.matmul(&xv, m))));
            g.bench_function(format!("f32-gemm/rows{m}"), |b| b.iter(|| black_box(x.matmul(&wt).unwrap())));
            g.bench_function(format!("candle-q8_0/rows{m}"), |b| b.iter(|| black_box(qmm.forward(&x).unwrap())));
            if let Some(q4k) = &q4k {
                g.bench_function(format!("candle-q4_k/rows{m}"), |b| b.iter(|| black_box(q4k.forward(&x).unwrap())));
            }
            if let Some(own) = &own_q4k {
                g.bench_function(format!("q4_k/rows{m}"), |b| b.iter(|| black_box(own.matmul(&xv, m))));
            }
            if let (Some(own), Some(theirs)) = (&own_q6k, &q6k) {
                g.bench_function(format!("q6_k/rows{m}"), |b| b.iter(|| black_box(own.matmul(&xv, m))));
                g.bench_function(format!("candle-q6_k/rows{m}"), |b| b.iter(|| black_box(theirs.forward(&x).unwrap())));
            }
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
