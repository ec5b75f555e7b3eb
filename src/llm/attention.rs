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

use candle_core::{Result, Storage, Tensor};
use rayon::prelude::*;

/// `q`: (1, heads, t, head_dim), the `t` new tokens at positions
/// `len - t .. len`; `k`, `v`: (kv_heads, len, head_dim) views of the cache
/// with rows of `head_dim` contiguous. Returns (t, heads * head_dim).
pub fn causal(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (_, heads, t, hd) = q.dims4()?;
    let (kv_heads, len, _) = k.dims3()?;
    if heads % kv_heads != 0 || t > len {
        candle_core::bail!("attention of {heads} heads over {kv_heads} KV heads, {t} new of {len} tokens");
    }
    let qv: Vec<f32> = q.flatten_all()?.to_vec1()?;
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (Storage::Cpu(kc), Storage::Cpu(vc)) = (&*ks, &*vs) else { candle_core::bail!("CPU attention on a non-CPU cache") };
    let (kd, vd) = (kc.as_slice::<f32>()?, vc.as_slice::<f32>()?);
    if kl.stride()[1..] != [hd, 1] || vl.stride()[1..] != [hd, 1] {
        candle_core::bail!("attention needs rows of head_dim contiguous in the cache");
    }
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
        let keys = &kd[kl.start_offset() + kvh * kl.stride()[0]..][..visible * hd];
        let vals = &vd[vl.start_offset() + kvh * vl.stride()[0]..][..visible * hd];
        let qs: Vec<&[f32]> = (kvh * group..(kvh + 1) * group).map(|h| &qv[(h * t + r) * hd..][..hd]).collect();
        crate::attend::query_group(&qs, keys, vals, hd, visible, scale, p, o);
    });
    drop((ks, vs));
    Tensor::from_vec(out, (t, heads * hd), q.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Against plain tensor ops with an explicit causal mask, on views of a
    /// cache with spare capacity: odd lengths and head sizes, grouped and
    /// plain heads, one decoded token and prompt chunks after a past.
    #[test]
    fn equals_the_masked_tensor_formula() {
        let dev = Device::Cpu;
        let cases = [(9, 3, 64, 1, 1, 8), (14, 2, 64, 37, 1, 64), (12, 2, 128, 513, 1, 1024), (4, 4, 20, 5, 5, 7), (14, 2, 64, 70, 33, 80)];
        for (heads, kv_heads, hd, len, t, cap) in cases {
            let q = Tensor::randn(0f32, 1.0, (1, heads, t, hd), &dev).unwrap();
            let kc = Tensor::randn(0f32, 1.0, (kv_heads, cap, hd), &dev).unwrap();
            let vc = Tensor::randn(0f32, 1.0, (kv_heads, cap, hd), &dev).unwrap();
            let (k, v) = (kc.narrow(1, 0, len).unwrap(), vc.narrow(1, 0, len).unwrap());
            let ours: Vec<f32> = causal(&q, &k, &v).unwrap().flatten_all().unwrap().to_vec1().unwrap();
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
        let all: Vec<f32> = causal(&q, &k, &v).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        // The chunk's last 5 tokens on their own: the cache holds 35 + 5 then.
        let tail = q.narrow(2, t - 5, 5).unwrap().contiguous().unwrap();
        let part: Vec<f32> = causal(&tail, &k, &v).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(part, all[(t - 5) * heads * hd..]);
    }
}
