//! A BERT encoder forward pass laid out for CPU batches of short messages.
//!
//! candle's `BertModel` pads every sequence to the longest and runs its GELU
//! through scalar `libm::erff` on one thread. Here the tokens of all sequences
//! are packed into one `(tokens, hidden)` matrix, so the dense layers (about
//! 90% of the work) never compute padding; attention, which needs each
//! sequence on its own, reads each message's rows from the packed matrix on
//! the CPU and runs on groups of equal-length sequences elsewhere.
//! Bias and GELU are one parallel pass with a rational erf that vectorises.
//! Weights and results are those of `BertModel` (tested to cosine > 0.9999).

use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Module, Result, Shape, Tensor};
use candle_nn::{layer_norm, LayerNorm, VarBuilder};
use candle_transformers::models::bert::Config;
use rayon::prelude::*;
use super::int8::QuantLinear;

/// A dense layer with its weight stored transposed (in x out, contiguous):
/// candle's GEMM runs 20-30% faster on it than on a transposed view for the
/// narrow 384-wide inputs of this model. The bias (and GELU) are applied in
/// one parallel pass instead of candle's single-threaded broadcast add.
struct Dense {
    w: Tensor,
    b: Tensor,
    /// The same layer in int8 (with its bias and activation), where the CPU has VNNI.
    int8: Option<QuantLinear>,
}

impl Dense {
    fn new(w: Tensor, b: Tensor, int8: bool, gelu: bool) -> Result<Self> {
        let int8 = if int8 {
            let (n, k) = w.dims2()?;
            Some(QuantLinear::new(&w.flatten_all()?.to_vec1::<f32>()?, b.to_vec1::<f32>()?, n, k, gelu))
        } else {
            None
        };
        Ok(Self { w: w.t()?.contiguous()?, b, int8 })
    }

    fn load(vb: VarBuilder, inp: usize, out: usize, int8: bool, gelu: bool) -> Result<Self> {
        Self::new(vb.get((out, inp), "weight")?, vb.get(out, "bias")?, int8, gelu)
    }

    fn forward(&self, x: &Tensor, gelu: bool) -> Result<Tensor> {
        if let Some(q) = &self.int8 {
            return x.contiguous()?.apply_op1_no_bwd(q);
        }
        let y = x.matmul(&self.w)?;
        if y.device().is_cpu() && y.dtype() == DType::F32 {
            y.apply_op2_no_bwd(&self.b, &BiasAct { gelu })
        } else {
            let y = y.broadcast_add(&self.b)?;
            if gelu { y.gelu_erf() } else { Ok(y) }
        }
    }
}

struct Layer {
    qkv: Dense,
    out: Dense,
    ln_attn: AddNorm,
    up: Dense,
    down: Dense,
    ln_out: AddNorm,
}

pub struct PackedBert {
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    ln_emb: LayerNorm,
    layers: Vec<Layer>,
    heads: usize,
    head_dim: usize,
    hidden: usize,
    device: Device,
}

impl PackedBert {
    /// `int8`: run the dense layers in int8 (only where `crate::cpu::avx512_vnni()`).
    pub fn load(vb: VarBuilder, cfg: &Config, int8: bool) -> Result<Self> {
        let int8 = int8 && vb.device().is_cpu() && crate::cpu::avx512_vnni();
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") { vb.pp("bert") } else { vb };
        let h = cfg.hidden_size;
        let e = vb.pp("embeddings");
        let ln = |vb: VarBuilder| layer_norm(h, cfg.layer_norm_eps, vb);
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = vb.pp(format!("encoder.layer.{i}"));
                let a = l.pp("attention");
                // One matmul for query, key and value instead of three.
                let part = |n: &str| -> Result<(Tensor, Tensor)> {
                    Ok((a.pp("self").pp(n).get((h, h), "weight")?, a.pp("self").pp(n).get(h, "bias")?))
                };
                let (q, k, v) = (part("query")?, part("key")?, part("value")?);
                let qkv = Dense::new(Tensor::cat(&[&q.0, &k.0, &v.0], 0)?, Tensor::cat(&[&q.1, &k.1, &v.1], 0)?, int8, false)?;
                Ok(Layer {
                    qkv,
                    out: Dense::load(a.pp("output").pp("dense"), h, h, int8, false)?,
                    ln_attn: AddNorm::new(ln(a.pp("output").pp("LayerNorm"))?)?,
                    up: Dense::load(l.pp("intermediate").pp("dense"), h, cfg.intermediate_size, int8, true)?,
                    down: Dense::load(l.pp("output").pp("dense"), cfg.intermediate_size, h, int8, false)?,
                    ln_out: AddNorm::new(ln(l.pp("output").pp("LayerNorm"))?)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            word: e.pp("word_embeddings").get((cfg.vocab_size, h), "weight")?,
            position: e.pp("position_embeddings").get((cfg.max_position_embeddings, h), "weight")?,
            token_type: e.pp("token_type_embeddings").get((cfg.type_vocab_size, h), "weight")?,
            ln_emb: ln(e.pp("LayerNorm"))?,
            layers,
            heads: cfg.num_attention_heads,
            head_dim: h / cfg.num_attention_heads,
            hidden: h,
            device: vb.device().clone(),
        })
    }

    /// Mean-pooled, L2-normalised embeddings of `seqs` (token ids with their
    /// special tokens), one row per sequence.
    pub fn embed(&self, seqs: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        let n = seqs.len();
        let lens: Vec<usize> = seqs.iter().map(|s| s.len().max(1)).collect();
        let total: usize = lens.iter().sum();
        let dev = &self.device;

        let ids: Vec<u32> = seqs.iter().flat_map(|s| if s.is_empty() { vec![0] } else { s.to_vec() }).collect();
        let pos: Vec<u32> = lens.iter().flat_map(|&l| 0..l as u32).collect();
        let ids = Tensor::from_vec(ids, total, dev)?;
        let pos = Tensor::from_vec(pos, total, dev)?;
        let x = self.word.index_select(&ids, 0)?.add(&self.position.index_select(&pos, 0)?)?.broadcast_add(&self.token_type.get(0)?)?;
        let mut x = self.ln_emb.forward(&x)?;

        // On the CPU, attention reads each message's rows straight from the
        // packed QKV matrix (`packed_attention`); elsewhere it runs on groups
        // of equal-length sequences, unpadded. Either way a sequence meets the
        // same kernels and shapes alone or in any batch, so its embedding is
        // bitwise independent of the batch (int8 rounding would otherwise
        // amplify last-bit noise).
        let grouped = if dev.is_cpu() && x.dtype() == DType::F32 { None } else { Some(Groups::new(&lens, dev)?) };

        for layer in &self.layers {
            let qkv = layer.qkv.forward(&x, false)?; // (total, 3h), packed
            let ctx = match &grouped {
                None => packed_attention(&qkv, &lens, self.heads, self.head_dim)?,
                Some(g) => g.attention(&qkv, self.heads, self.head_dim)?,
            };
            x = layer.ln_attn.forward(&layer.out.forward(&ctx, false)?, &x)?;
            let up = layer.up.forward(&x, true)?;
            x = layer.ln_out.forward(&layer.down.forward(&up, false)?, &x)?;
        }

        // Mean over each sequence's own rows, then unit length.
        let rows = x.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
        let h = self.hidden;
        let mut out = Vec::with_capacity(n);
        let mut start = 0;
        for &l in &lens {
            let mut m = vec![0f32; h];
            for r in rows[start * h..(start + l) * h].chunks_exact(h) {
                m.iter_mut().zip(r).for_each(|(a, b)| *a += b);
            }
            let norm = m.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
            m.iter_mut().for_each(|v| *v /= norm);
            out.push(m);
            start += l;
        }
        Ok(out)
    }
}

/// `LayerNorm(x + residual)`. On the CPU in f32 this is one parallel pass
/// over the rows; candle's add and layer norm took two, the add on one thread,
/// and were an eighth of the forward pass.
struct AddNorm {
    ln: LayerNorm,
    /// Weight and bias on the host, for the fused pass.
    host: Option<(Vec<f32>, Vec<f32>)>,
}

impl AddNorm {
    fn new(ln: LayerNorm) -> Result<Self> {
        let w = ln.weight();
        let host = match ln.bias() {
            Some(b) if w.device().is_cpu() && w.dtype() == DType::F32 && ln.remove_mean() => {
                Some((w.to_vec1::<f32>()?, b.to_vec1::<f32>()?))
            }
            _ => None,
        };
        Ok(Self { ln, host })
    }

    fn forward(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let Some((w, b)) = &self.host else { return self.ln.forward(&x.add(residual)?) };
        let h = w.len();
        let (x, residual) = (x.contiguous()?, residual.contiguous()?);
        let (xs, xl) = x.storage_and_layout();
        let (rs, rl) = residual.storage_and_layout();
        let (candle_core::Storage::Cpu(xc), candle_core::Storage::Cpu(rc)) = (&*xs, &*rs) else {
            candle_core::bail!("add-norm: host weights with a non-CPU input")
        };
        let n = x.elem_count();
        if residual.elem_count() != n || n % h != 0 {
            candle_core::bail!("add-norm: {n} and {} values for rows of {h}", residual.elem_count());
        }
        let xd = &xc.as_slice::<f32>()?[xl.start_offset()..][..n];
        let rd = &rc.as_slice::<f32>()?[rl.start_offset()..][..n];
        let eps = self.ln.eps() as f32;
        let mut out = vec![0f32; n];
        out.par_chunks_mut(h).zip(xd.par_chunks(h).zip(rd.par_chunks(h))).with_min_len(8).for_each(|(o, (a, r))| {
            o.iter_mut().zip(a.iter().zip(r)).for_each(|(o, (a, r))| *o = a + r);
            let mean = crate::cpu::sum(o) / h as f32;
            o.iter_mut().for_each(|v| *v -= mean);
            let inv = 1.0 / (crate::cpu::dot(o, o) / h as f32 + eps).sqrt();
            o.iter_mut().zip(w.iter().zip(b)).for_each(|(o, (w, b))| *o = *o * inv * w + b);
        });
        drop((xs, rs));
        Tensor::from_vec(out, x.shape(), x.device())
    }
}

/// Self-attention of every message over its own tokens, on the CPU: `qkv` is
/// (tokens, 3 * hidden) with the messages' rows one after another. One task
/// per (message, head), reading straight from the packed rows: no padding, no
/// per-message tensors, no score matrix.
fn packed_attention(qkv: &Tensor, lens: &[usize], heads: usize, hd: usize) -> Result<Tensor> {
    let hidden = heads * hd;
    let (total, width) = qkv.dims2()?;
    if width != 3 * hidden || total != lens.iter().sum::<usize>() {
        candle_core::bail!("packed attention: qkv {total}x{width} for {heads} heads of {hd} over {} tokens", lens.iter().sum::<usize>());
    }
    let qkv = qkv.contiguous()?;
    let (storage, layout) = qkv.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else { candle_core::bail!("packed attention on a non-CPU tensor") };
    let data = &cpu.as_slice::<f32>()?[layout.start_offset()..][..total * width];
    let starts = first_rows(lens);
    let scale = 1.0 / (hd as f32).sqrt();
    let blocks: Vec<Vec<f32>> = (0..lens.len() * heads)
        .into_par_iter()
        .map(|t| {
            let (m, h) = (t / heads, t % heads);
            let rows = &data[starts[m] * width..][..lens[m] * width];
            crate::attend::message_head(rows, width, lens[m], h * hd, hidden + h * hd, 2 * hidden + h * hd, hd, scale)
        })
        .collect();
    drop(storage);
    let mut out = vec![0f32; total * hidden];
    for (t, block) in blocks.iter().enumerate() {
        let (m, h) = (t / heads, t % heads);
        for (i, r) in block.chunks_exact(hd).enumerate() {
            out[(starts[m] + i) * hidden + h * hd..][..hd].copy_from_slice(r);
        }
    }
    Tensor::from_vec(out, (total, hidden), qkv.device())
}

/// The packed row where each message starts.
fn first_rows(lens: &[usize]) -> Vec<usize> {
    lens.iter().scan(0usize, |acc, &l| Some(std::mem::replace(acc, *acc + l))).collect()
}

/// Sequences grouped by length, for attention as batched tensor ops (GPU).
struct Groups {
    /// (sequences, length) of each group, in grouped order.
    sizes: Vec<(usize, usize)>,
    /// Grouped order -> packed row, and back.
    gather: Tensor,
    scatter: Tensor,
}

impl Groups {
    fn new(lens: &[usize], dev: &Device) -> Result<Self> {
        let total: usize = lens.iter().sum();
        let starts = first_rows(lens);
        let mut by_len: std::collections::BTreeMap<usize, Vec<usize>> = std::collections::BTreeMap::new();
        for (s, &l) in lens.iter().enumerate() {
            by_len.entry(l).or_default().push(s);
        }
        let mut gather = Vec::with_capacity(total);
        let sizes = by_len
            .iter()
            .map(|(&l, seqs)| {
                for &s in seqs {
                    gather.extend((starts[s]..starts[s] + l).map(|r| r as u32));
                }
                (seqs.len(), l)
            })
            .collect();
        let mut scatter = vec![0u32; total];
        for (g, &r) in gather.iter().enumerate() {
            scatter[r as usize] = g as u32;
        }
        Ok(Self { sizes, gather: Tensor::from_vec(gather, total, dev)?, scatter: Tensor::from_vec(scatter, total, dev)? })
    }

    fn attention(&self, qkv: &Tensor, heads: usize, hd: usize) -> Result<Tensor> {
        let qkv = qkv.index_select(&self.gather, 0)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut parts = Vec::with_capacity(self.sizes.len());
        let mut row = 0usize;
        for &(count, len) in &self.sizes {
            let g = qkv.narrow(0, row, count * len)?.reshape((count, len, 3, heads, hd))?;
            let g = g.permute((2, 0, 3, 1, 4))?; // (3, count, heads, len, dim)
            let (q, k, v) = (g.get(0)?.contiguous()?, g.get(1)?.contiguous()?, g.get(2)?.contiguous()?);
            let probs = candle_nn::ops::softmax_last_dim(&(q.matmul(&k.t()?)? * scale)?)?;
            parts.push(probs.matmul(&v)?.transpose(1, 2)?.reshape((count * len, heads * hd))?);
            row += count * len;
        }
        Tensor::cat(&parts, 0)?.index_select(&self.scatter, 0)
    }
}

/// `act(x + bias)` over the rows of `x`, in parallel; act is GELU (erf form,
/// vectorisable) or the identity.
struct BiasAct {
    gelu: bool,
}

impl CustomOp2 for BiasAct {
    fn name(&self) -> &'static str {
        "palaver-bias-act"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout, b: &CpuStorage, bl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), CpuStorage::F32(b)) = (x, b) else { candle_core::bail!("bias-act: f32 only") };
        let (Some((x0, x1)), Some((b0, b1))) = (xl.contiguous_offsets(), bl.contiguous_offsets()) else {
            candle_core::bail!("bias-act: contiguous inputs only")
        };
        let (src, bias) = (&x[x0..x1], &b[b0..b1]);
        let width = bias.len();
        if width == 0 || src.len() % width != 0 {
            candle_core::bail!("bias-act: {} values are not rows of {width}", src.len());
        }
        let mut dst = vec![0f32; src.len()];
        let rows_per_task = (16_384 / width).max(1) * width;
        dst.par_chunks_mut(rows_per_task).zip(src.par_chunks(rows_per_task)).for_each(|(d, s)| {
            for (drow, srow) in d.chunks_exact_mut(width).zip(s.chunks_exact(width)) {
                if self.gelu {
                    for ((o, &v), &bb) in drow.iter_mut().zip(srow).zip(bias) {
                        *o = gelu_scalar(v + bb);
                    }
                } else {
                    for ((o, &v), &bb) in drow.iter_mut().zip(srow).zip(bias) {
                        *o = v + bb;
                    }
                }
            }
        });
        Ok((CpuStorage::F32(dst), xl.shape().clone()))
    }
}

/// GELU, erf form.
#[inline(always)]
pub fn gelu_scalar(y: f32) -> f32 {
    0.5 * y * (1.0 + erf(y * std::f32::consts::FRAC_1_SQRT_2))
}

/// erf as a rational function of x^2 on [-4, 4] (a minimax fit of the kind
/// Eigen uses for `erf`): no branches, no exp, so the loop vectorises.
/// Absolute error under 1e-6 against libm (tested).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let p = ((((((-2.726_142_3e-10f32 * x2 + 2.770_681_4e-8) * x2 - 2.101_024e-6) * x2 - 5.692_506_4e-5) * x2
        - 7.349_906_3e-4)
        * x2
        - 2.954_600_1e-3)
        * x2
        - 1.609_603_3e-2)
        * x;
    let q = (((-1.456_607_2e-5f32 * x2 - 2.133_740_6e-4) * x2 - 1.682_827e-3) * x2 - 7.373_329_2e-3) * x2 - 1.426_474e-2;
    p / q
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_erf_matches_libm() {
        let mut worst = 0f32;
        for i in -60_000..=60_000 {
            let x = i as f32 / 10_000.0;
            worst = worst.max((erf(x) - libm_erf(x)).abs());
        }
        assert!(worst < 1e-6, "max error {worst}");
    }

    fn libm_erf(x: f32) -> f32 {
        libm::erff(x)
    }

    /// The CPU path (rows read from the packed matrix) against the tensor
    /// path (groups of equal lengths), on messages of odd and repeated lengths.
    #[test]
    fn packed_attention_equals_grouped_tensor_attention() {
        let dev = Device::Cpu;
        let (heads, hd) = (4, 8);
        let lens = [3usize, 7, 1, 7, 12];
        let total: usize = lens.iter().sum();
        let qkv = Tensor::randn(0f32, 1.0, (total, 3 * heads * hd), &dev).unwrap();
        let ours: Vec<f32> = packed_attention(&qkv, &lens, heads, hd).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let want: Vec<f32> =
            Groups::new(&lens, &dev).unwrap().attention(&qkv, heads, hd).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let worst = ours.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-5, "max difference {worst}");
        assert!(packed_attention(&qkv, &lens[1..], heads, hd).is_err(), "rows and lengths disagree");
    }

    #[test]
    fn fused_add_norm_matches_candle() {
        let dev = Device::Cpu;
        let h = 40; // not a multiple of 16: the tails count too
        let w = Tensor::randn(1f32, 0.2, h, &dev).unwrap();
        let b = Tensor::randn(0f32, 0.2, h, &dev).unwrap();
        let ln = LayerNorm::new(w, b, 1e-12);
        let fused = AddNorm::new(ln.clone()).unwrap();
        assert!(fused.host.is_some());
        let x = Tensor::randn(0.5f32, 2.0, (37, h), &dev).unwrap();
        let r = Tensor::randn(0f32, 1.0, (37, h), &dev).unwrap();
        let ours: Vec<f32> = fused.forward(&x, &r).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let want: Vec<f32> = ln.forward(&x.add(&r).unwrap()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let worst = ours.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-5, "max difference {worst}");
    }

    #[test]
    fn bias_and_gelu_match_candle() {
        let xs: Vec<f32> = (-2000..2000).map(|i| i as f32 / 300.0).collect();
        let t = Tensor::from_vec(xs, (40, 100), &Device::Cpu).unwrap();
        let bias = Tensor::arange(0f32, 100.0, &Device::Cpu).unwrap().affine(0.01, -0.5).unwrap();
        let a = t.apply_op2_no_bwd(&bias, &BiasAct { gelu: true }).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = t.broadcast_add(&bias).unwrap().gelu_erf().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-5, "max difference {worst}");
    }
}
