//! The decoder's matmul kernels on the shapes of Qwen2.5-0.5B and 1.5B layers:
//! palaver's block int8 GEMM (AVX-512 VNNI) against the f32 GEMM candle runs on
//! dequantized weights and against candle's own quantized matmul (Q8_0 and
//! Q4_K, the 1.5B model's type) and palaver's exact Q4_K kernel against
//! candle's, for a
//! 512-row prompt chunk and for 1 and 8 decode rows. Criterion reports
//! elements as multiply-adds x 2, so its "Gelem/s" reads as GFLOP/s (GOP/s
//! for int8).
//!
//! Also the decoder's causal attention over its KV cache (`attention/`), one
//! decoded token after 1,024 and a 512-token prompt chunk after 512, on both
//! models' head shapes.
//!
//! And the machine's own peaks (`peak/`), which the kernels' figures are read
//! against: independent chains of 512-bit f32 FMAs and of VNNI `vpdpbusd`
//! (64 int8 multiply-adds each) kept in registers, on one thread and on every
//! core, so no memory traffic limits them.
//!
//!   cargo bench --bench kernels
//!   cargo bench --bench kernels -- peak
//!   SHAPES=8960x256,256x8960 ROWS=64 cargo bench --bench kernels -- q4_k/
//!   ROWS=1,8 cargo bench --bench kernels -- int8
//!   cargo bench --bench kernels -- attention

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

/// `SHAPES=NxK,...` (outputs x inputs) replaces the models' shapes, to see
/// how a kernel's rate depends on the size of its weight tiles.
fn shapes() -> Vec<(String, usize, usize)> {
    match std::env::var("SHAPES") {
        Ok(list) => list
            .split(',')
            .map(|s| {
                let (n, k) = s.trim().split_once('x').expect("SHAPES: NxK,...");
                (s.trim().to_string(), n.parse().expect("SHAPES: N"), k.parse().expect("SHAPES: K"))
            })
            .collect(),
        Err(_) => SHAPES.iter().map(|&(name, n, k)| (name.to_string(), n, k)).collect(),
    }
}

fn bench(c: &mut Criterion) {
    let rows: Vec<usize> = std::env::var("ROWS")
        .unwrap_or_else(|_| "1,8,512".into())
        .split(',')
        .map(|r| r.trim().parse().expect("ROWS: comma-separated row counts"))
        .collect();
    eprintln!("AVX-512 VNNI: {}", palaver::cpu::avx512_vnni());
    let dev = Device::Cpu;
    for (name, n, k) in shapes() {
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

/// Causal attention: (name, heads, kv_heads, head_dim) x (new tokens, past).
fn attention(c: &mut Criterion) {
    use palaver::llm::kv::{LayerKv, SeqCache};
    let dev = Device::Cpu;
    for (name, heads, kv_heads, hd) in [("0.5b", 14, 2, 64), ("1.5b", 12, 2, 128)] {
        let mut g = c.benchmark_group(format!("attention/{name}"));
        g.sample_size(10);
        for (t, past) in [(1, 1024), (512, 512)] {
            let len = past + t;
            let mut cache = SeqCache::new(1, kv_heads, hd, &dev);
            let k = Tensor::randn(0f32, 1.0, (kv_heads, len, hd), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (kv_heads, len, hd), &dev).unwrap();
            let q = Tensor::randn(0f32, 1.0, (1, heads, t, hd), &dev).unwrap();
            let LayerKv::Host(kv) = cache.append(0, &k, &v).unwrap() else { unreachable!("a CPU cache") };
            // Scores and weighted values: 2 x heads x head_dim multiply-adds per visible key.
            let visible: usize = (0..t).map(|r| past + r + 1).sum();
            g.throughput(Throughput::Elements((2 * 2 * heads * hd * visible) as u64));
            g.bench_function(format!("new{t}-past{past}"), |b| {
                b.iter(|| black_box(palaver::llm::attention::causal(&q, &kv).unwrap()))
            });
        }
        g.finish();
    }
}

/// Instructions each thread issues per measured iteration: ~10 ms of work,
/// so spawning the threads is noise.
const PEAK_STEPS: usize = 1 << 22;

/// The arithmetic ceilings: f32 FMA and int8 VNNI throughput, in GFLOP/s and
/// GOP/s (multiply-adds x 2), on 1 thread and on all cores.
fn peak(c: &mut Criterion) {
    if !palaver::cpu::avx512_vnni() {
        eprintln!("peak/: needs AVX-512 VNNI, skipped");
        return;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut g = c.benchmark_group("peak");
    g.sample_size(10);
    for threads in [1, cores] {
        let run = |f: fn(usize) -> u32| {
            std::thread::scope(|s| {
                let hs: Vec<_> = (0..threads).map(|_| s.spawn(move || f(black_box(PEAK_STEPS)))).collect();
                hs.into_iter().map(|h| h.join().unwrap()).fold(0u32, u32::wrapping_add)
            })
        };
        // 12 chains of 16 lanes x 2 flops.
        g.throughput(Throughput::Elements((threads * PEAK_STEPS * 12 * 16 * 2) as u64));
        g.bench_function(format!("f32-fma/threads{threads}"), |b| b.iter(|| black_box(run(peak_loops::fma))));
        // 12 chains of 64 multiply-adds x 2 ops.
        g.throughput(Throughput::Elements((threads * PEAK_STEPS * 12 * 64 * 2) as u64));
        g.bench_function(format!("int8-vnni/threads{threads}"), |b| b.iter(|| black_box(run(peak_loops::vnni))));
        // The Q4_K kernel's loop on 4 rows x 32 columns, weights and inputs
        // in L1: 64 `vpdpbusd` per sub-block of 32 inputs, then its scale
        // applied to 8 sums, by `vpmulld` as the kernel does or by an add
        // (wrong, only to time it).
        let q4k = (PEAK_STEPS / 8) * 64 * 64 * 2;
        g.throughput(Throughput::Elements((threads * q4k) as u64));
        g.bench_function(format!("q4_k-loop-scale-mul/threads{threads}"), |b| b.iter(|| black_box(run(peak_loops::q4k_mul))));
        g.bench_function(format!("q4_k-loop-scale-add/threads{threads}"), |b| b.iter(|| black_box(run(peak_loops::q4k_add))));
    }
    g.finish();
}

/// Register-resident loops: 12 independent accumulators hide the
/// instructions' latency (4-5 cycles) behind one or two issues a cycle.
#[cfg(target_arch = "x86_64")]
mod peak_loops {
    use std::arch::x86_64::*;

    pub fn fma(steps: usize) -> u32 {
        // SAFETY: `peak` runs this only where AVX-512 was detected.
        unsafe { fma_avx512(steps) }
    }

    pub fn vnni(steps: usize) -> u32 {
        // SAFETY: as above, VNNI included.
        unsafe { vnni_avx512(steps) }
    }

    pub fn q4k_mul(steps: usize) -> u32 {
        // SAFETY: as above.
        unsafe { q4k_loop::<true>(steps / 8) }
    }

    pub fn q4k_add(steps: usize) -> u32 {
        // SAFETY: as above.
        unsafe { q4k_loop::<false>(steps / 8) }
    }

    /// `subs` sub-blocks through the Q4_K kernel's instructions, cycling
    /// over 8 sub-blocks of weights (8 KB) and 4 rows of inputs (1 KB).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn q4k_loop<const MUL: bool>(subs: usize) -> u32 {
        let w = std::hint::black_box([0x35u8; 8 * 4 * 128]);
        let x = std::hint::black_box([3u8; 4 * 8 * 32]);
        let sc = std::hint::black_box([5u8; 8 * 32]);
        let low = _mm512_set1_epi8(0xF);
        let mut isum = [[_mm512_setzero_si512(); 2]; 4];
        for s in 0..subs {
            let j = s % 8;
            let mut acc = [[_mm512_setzero_si512(); 2]; 4];
            for g in 0..4 {
                let p = w.as_ptr().add((j * 4 + g) * 128);
                let (w0, w1) = (_mm512_loadu_si512(p as *const __m512i), _mm512_loadu_si512(p.add(64) as *const __m512i));
                let (l0, l1) = (_mm512_and_si512(w0, low), _mm512_and_si512(w1, low));
                let (h0, h1) = (_mm512_and_si512(_mm512_srli_epi16(w0, 4), low), _mm512_and_si512(_mm512_srli_epi16(w1, 4), low));
                for (i, a) in acc.iter_mut().enumerate() {
                    let xp = x.as_ptr().add(i * 256 + j * 32 + g * 8);
                    let xl = _mm512_set1_epi32((xp as *const i32).read_unaligned());
                    let xh = _mm512_set1_epi32((xp.add(4) as *const i32).read_unaligned());
                    a[0] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(a[0], l0, xl), h0, xh);
                    a[1] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(a[1], l1, xl), h1, xh);
                }
            }
            let s0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(sc.as_ptr().add(j * 32) as *const __m128i));
            let s1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(sc.as_ptr().add(j * 32 + 16) as *const __m128i));
            for (sum, a) in isum.iter_mut().zip(&acc) {
                let (a0, a1) = if MUL {
                    (_mm512_mullo_epi32(a[0], s0), _mm512_mullo_epi32(a[1], s1))
                } else {
                    (_mm512_add_epi32(a[0], s0), _mm512_add_epi32(a[1], s1))
                };
                sum[0] = _mm512_add_epi32(sum[0], a0);
                sum[1] = _mm512_add_epi32(sum[1], a1);
            }
        }
        let sum = isum.iter().flatten().fold(_mm512_setzero_si512(), |s, &x| _mm512_add_epi32(s, x));
        _mm512_reduce_add_epi32(sum) as u32
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn fma_avx512(steps: usize) -> u32 {
        let (a, b) = (_mm512_set1_ps(std::hint::black_box(0.999_9)), _mm512_set1_ps(std::hint::black_box(1e-4)));
        let mut acc = [_mm512_set1_ps(1.0); 12];
        for _ in 0..steps {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(*x, a, b);
            }
        }
        let sum = acc.iter().fold(_mm512_setzero_ps(), |s, &x| _mm512_add_ps(s, x));
        _mm512_reduce_add_ps(sum).to_bits()
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn vnni_avx512(steps: usize) -> u32 {
        let (a, b) = (_mm512_set1_epi8(std::hint::black_box(3)), _mm512_set1_epi8(std::hint::black_box(-2)));
        let mut acc = [_mm512_setzero_si512(); 12];
        for _ in 0..steps {
            for x in acc.iter_mut() {
                *x = _mm512_dpbusd_epi32(*x, a, b);
            }
        }
        let sum = acc.iter().fold(_mm512_setzero_si512(), |s, &x| _mm512_add_epi32(s, x));
        _mm512_reduce_add_epi32(sum) as u32
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod peak_loops {
    pub fn fma(_: usize) -> u32 {
        unreachable!("peak/ runs only on x86-64 with AVX-512")
    }
    pub fn vnni(_: usize) -> u32 {
        unreachable!("peak/ runs only on x86-64 with AVX-512")
    }
    pub fn q4k_mul(_: usize) -> u32 {
        unreachable!("peak/ runs only on x86-64 with AVX-512")
    }
    pub fn q4k_add(_: usize) -> u32 {
        unreachable!("peak/ runs only on x86-64 with AVX-512")
    }
}

criterion_group!(benches, peak, bench, attention);
criterion_main!(benches);
