//! Causal attention on the CPU, streamed from the KV cache in place.
//!
//! One task per (new token, KV head): the query heads sharing that KV head
//! score every visible key, softmax, weighted sum of values. Nothing of size
//! tokens x keys is ever materialised (a 1,024-token prompt's masked score matrix is 59 MB per layer
//! for the 0.5B model, and writing, masking and re-reading it made a
//! 1,024-token prompt cost 4x a 512-token one), and masked keys are skipped
//! rather than zeroed.
//!
//! A row's result depends only on its query, its position and the cache, in
//! the same order of operations whether the token is decoded alone, read in a
//! prompt chunk of any size, or read after a reused prefix: the property that
//! makes chunked and reused prompts give the cold run's numbers exactly.

use super::kv::HostKv;
use super::transformer::with_values;
use candle_core::{Result, Tensor};
use rayon::prelude::*;

/// `q`: (1, heads, t, head_dim), the `t` new tokens at positions
/// `kv.len - t .. kv.len`, whose keys and values `kv` already holds.
/// Returns (t, heads * head_dim).
pub fn causal(q: &Tensor, kv: &HostKv<'_>) -> Result<Tensor> {
    let (_, heads, t, hd) = q.dims4()?;
    let (kv_heads, len, cap) = (kv.kv_heads, kv.len, kv.cap);
    if heads % kv_heads != 0 || t > len || hd != kv.head_dim {
        candle_core::bail!("attention of {heads} heads of {hd} over {kv_heads} KV heads of {}, {t} new of {len} tokens", kv.head_dim);
    }
    with_values(q, |qv| {
        let group = heads / kv_heads;
        let past = len - t;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut out = vec![0f32; t * heads * hd];
        // Chunk r*kv_heads + kvh: token r, the query heads of KV head kvh, which
        // read its keys and values once together. Later tokens see more keys;
        // rayon's work stealing evens that out.
        out.par_chunks_mut(group * hd).enumerate().for_each_init(Vec::new, |p: &mut Vec<f32>, (task, o)| {
            let (r, kvh) = (task / kv_heads, task % kv_heads);
            let visible = past + r + 1;
            let keys = &kv.keys[kvh * cap * hd..][..cap * hd];
            let vals = &kv.values[kvh * cap * hd..][..visible * hd];
            let qs: Vec<&[f32]> = (kvh * group..(kvh + 1) * group).map(|h| &qv[(h * t + r) * hd..][..hd]).collect();
            crate::attend::query_group(&qs, keys, vals, visible, scale, p, o);
        });
        Tensor::from_vec(out, (t, heads * hd), q.device())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::kv::{LayerKv, SeqCache};
    use candle_core::{DType, Device};

    /// Runs `f` on a CPU cache holding `k` and `v` ((kv_heads, len, head_dim)),
    /// with room for `cap` positions (more than `len`: stale positions past the
    /// end must not matter).
    fn in_cache(k: &Tensor, v: &Tensor, cap: usize, f: impl Fn(&HostKv<'_>) -> Result<Tensor>) -> Vec<f32> {
        let (kv_heads, len, hd) = k.dims3().unwrap();
        let mut cache = SeqCache::new(1, kv_heads, hd, &Device::Cpu);
        cache.reserve(cap).unwrap();
        // Garbage after the end: a longer sequence written, then truncated.
        let junk = Tensor::full(1e6f32, (kv_heads, cap, hd), &Device::Cpu).unwrap();
        cache.append(0, &junk, &junk).unwrap();
        cache.truncate(0);
        let LayerKv::Host(kv) = cache.append(0, k, v).unwrap() else { panic!("a CPU cache keeps host buffers") };
        assert_eq!(kv.len, len);
        f(&kv).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Against plain tensor ops with an explicit causal mask, on views of a
    /// cache with spare capacity: odd lengths and head sizes, grouped and
    /// plain heads, one decoded token and prompt chunks after a past.
    #[test]
    fn equals_the_masked_tensor_formula() {
        let dev = Device::Cpu;
        // (heads, kv_heads, head_dim, len, new tokens, capacity): blocks of 3, 7,
        // 6, 1 and 8 + 8 or 5 + 4 heads; whole, paired and odd column blocks.
        let cases = [
            (9, 3, 64, 1, 1, 8),
            (14, 2, 64, 37, 1, 64),
            (12, 2, 128, 513, 1, 1024),
            (4, 4, 20, 5, 5, 7),
            (14, 2, 64, 70, 33, 80),
            (16, 1, 48, 45, 3, 64),
            (9, 1, 32, 33, 33, 40),
        ];
        for (heads, kv_heads, hd, len, t, cap) in cases {
            let q = Tensor::randn(0f32, 1.0, (1, heads, t, hd), &dev).unwrap();
            let k = Tensor::randn(0f32, 1.0, (kv_heads, len, hd), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (kv_heads, len, hd), &dev).unwrap();
            let ours = in_cache(&k, &v, cap, |kv| causal(&q, kv));
            // The cache keeps f16: the formula gets the same rounded keys and values.
            let f16 = |x: &Tensor| x.to_dtype(DType::F16).unwrap().to_dtype(DType::F32).unwrap();
            let (k, v) = (f16(&k), f16(&v));
            let group = heads / kv_heads;
            let past = len - t;
            let mask: Vec<f32> = (0..t)
                .flat_map(|i| (0..len).map(move |j| if j <= past + i { 0.0 } else { f32::NEG_INFINITY }))
                .collect();
            let mask = Tensor::from_vec(mask, (t, len), &dev).unwrap();
            let mut per_head = Vec::new();
            for h in 0..heads {
                let qh = q.get(0).unwrap().get(h).unwrap(); // (t, hd)
                let kh = k.get(h / group).unwrap().contiguous().unwrap(); // (len, hd)
                let vh = v.get(h / group).unwrap().contiguous().unwrap();
                let s = (qh.matmul(&kh.t().unwrap()).unwrap() / (hd as f64).sqrt()).unwrap();
                let p = candle_nn::ops::softmax_last_dim(&s.broadcast_add(&mask).unwrap()).unwrap();
                per_head.push(p.matmul(&vh).unwrap()); // (t, hd)
            }
            let want: Vec<f32> = Tensor::cat(&per_head, 1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let err = ours.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err < 1e-4, "heads {heads}/{kv_heads} hd {hd} len {len} t {t}: max error {err}");
        }
    }

    /// A token's row is the same whether it is computed alone or among the
    /// other rows of its chunk.
    #[test]
    fn a_row_does_not_depend_on_its_chunk() {
        let dev = Device::Cpu;
        let (heads, kv_heads, hd, len, t) = (6, 2, 64, 40, 12);
        let q = Tensor::randn(0f32, 1.0, (1, heads, t, hd), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (kv_heads, len, hd), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (kv_heads, len, hd), &dev).unwrap();
        let all = in_cache(&k, &v, len, |kv| causal(&q, kv));
        // The chunk's last 5 tokens on their own: the cache holds 35 + 5 then.
        let tail = q.narrow(2, t - 5, 5).unwrap().contiguous().unwrap();
        let part = in_cache(&k, &v, len, |kv| causal(&tail, kv));
        assert_eq!(part, all[(t - 5) * heads * hd..]);
        // And decoded one at a time.
        for r in [0, 7, t - 1] {
            let one = q.narrow(2, r, 1).unwrap().contiguous().unwrap();
            let (kr, vr) = (k.narrow(1, 0, len - t + r + 1).unwrap(), v.narrow(1, 0, len - t + r + 1).unwrap());
            let single = in_cache(&kr, &vr, len, |kv| causal(&one, kv));
            assert_eq!(single, all[r * heads * hd..(r + 1) * heads * hd], "token {r}");
        }
    }
}
