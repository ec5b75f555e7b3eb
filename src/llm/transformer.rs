//! palaver's own decoder forward for GGUF Qwen2 and Llama models.
//!
//! Why not candle's stock `quantized_qwen2` / `quantized_llama`: they keep one
//! KV cache inside the model and grow it by concatenation, so a cache cannot be
//! kept per conversation, truncated to a shared prefix or restored; and their
//! prompt path multiplies the quantized weights one input row at a time, which
//! re-reads every weight once per prompt token. Here the cache belongs to the
//! caller ([`SeqCache`]) and a prompt chunk is one GEMM per weight.

use super::attention;
use super::embed::Embedding;
use super::kv::{LayerKv, SeqCache};
use super::q4k::{self, PackedQ4K, Q8KRows, SuperBlocks};
use super::q6k::PackedQ6K;
use super::qgemm::{self, PackedWeight};
use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::rotary_emb::{rope, rope_i};
use rayon::prelude::*;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Qwen2,
    Llama,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub arch: Arch,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub hidden: usize,
    pub rms_eps: f32,
    pub rope_base: f32,
    pub context: usize,
}

impl Config {
    fn from_gguf(ct: &gguf_file::Content) -> Result<Self> {
        let arch_name = ct
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        let arch = match arch_name.as_str() {
            "qwen2" => Arch::Qwen2,
            "llama" => Arch::Llama,
            other => candle_core::bail!("unsupported architecture `{other}` (qwen2, llama)"),
        };
        let get = |k: &str| {
            ct.metadata
                .get(&format!("{arch_name}.{k}"))
                .ok_or_else(|| candle_core::Error::Msg(format!("GGUF metadata lacks {arch_name}.{k}")))
        };
        let heads = get("attention.head_count")?.to_u32()? as usize;
        let hidden = get("embedding_length")?.to_u32()? as usize;
        Ok(Self {
            arch,
            layers: get("block_count")?.to_u32()? as usize,
            heads,
            kv_heads: get("attention.head_count_kv").and_then(|v| v.to_u32()).map(|v| v as usize).unwrap_or(heads),
            head_dim: hidden / heads,
            hidden,
            rms_eps: get("attention.layer_norm_rms_epsilon")?.to_f32()?,
            rope_base: get("rope.freq_base").and_then(|v| v.to_f32()).unwrap_or(10_000.0),
            context: get("context_length").and_then(|v| v.to_u32()).map(|v| v as usize).unwrap_or(4096),
        })
    }
}

/// A quantized weight with an optional bias, and the kernel chosen per pass.
///
/// On a CPU with AVX-512 VNNI every pass runs on palaver's kernels: Q4_K and
/// Q6_K weights (the 1.5B model) on its exact kernels for them
/// ([`PackedQ4K`], [`PackedQ6K`]: the stored bytes regrouped), every other
/// type on its block int8 GEMM ([`PackedWeight`], repacked once here, the
/// bytes of Q8_0), for prompts and decoding alike. So the model's matmuls all
/// run on one pool, rayon's: candle's own repacked kernels bring a second
/// pool of spinning workers (BENCHMARKS.md, "Two thread pools"), and its
/// row-by-row fallback is 3-9x slower (`cargo bench --bench kernels`).
/// Without VNNI, prompts dequantize to one f32 GEMM and decoding stays on
/// candle's quantized matmul.
///
/// On palaver's kernels a row's result never depends on the rows read with
/// it, so a prompt read whole, in chunks or after a reused prefix gives the
/// same numbers, and so does a sequence decoded alone or in a batch.
struct Linear {
    /// candle's quantized matmul over the GGUF tensor, where none of
    /// palaver's kernels takes the weight.
    quant: Option<(QMatMul, Arc<QTensor>)>,
    int8: Option<PackedWeight>,
    kquant: Option<KQuant>,
    /// Whether a prompt pass without palaver's int8 kernel may dequantize
    /// the weight for one f32 GEMM on the CPU (`Kernels::Native` on the CPU;
    /// else candle's quantized matmul).
    host_gemm: bool,
    bias: Option<Tensor>,
}

impl Linear {
    /// `native`: palaver's CPU kernels may run it (`Kernels::Native` on the
    /// CPU, see [`Kernels`]).
    fn new(w: Arc<QTensor>, bias: Option<Tensor>, native: bool) -> Result<Self> {
        let (n, k) = w.shape().dims2()?;
        let vnni = native && w.device().is_cpu() && crate::cpu::avx512_vnni();
        if vnni && k.is_multiple_of(q4k::QK) {
            let kquant = match w.dtype() {
                GgmlDType::Q4K => Some(KQuant::Q4K(PackedQ4K::new(&w)?)),
                GgmlDType::Q6K => Some(KQuant::Q6K(PackedQ6K::new(&w)?)),
                _ => None,
            };
            if kquant.is_some() {
                return Ok(Self { quant: None, int8: None, kquant, host_gemm: native, bias });
            }
        }
        let int8 = if vnni && w.dtype() == GgmlDType::Q8_0 && k.is_multiple_of(qgemm::BLOCK) {
            Some(PackedWeight::from_q8_0(&w.data()?, n, k))
        } else if vnni && k.is_multiple_of(qgemm::BLOCK) {
            let f = dequantize(&w)?.flatten_all()?.to_vec1::<f32>()?;
            Some(PackedWeight::from_f32(&f, n, k))
        } else {
            None
        };
        let quant = if int8.is_none() {
            Some((QMatMul::from_arc(w.clone())?, w))
        } else {
            None
        };
        Ok(Self { quant, int8, kquant: None, host_gemm: native, bias })
    }

    /// `x`: (rows, in) -> (rows, out).
    fn forward(&self, x: &Tensor, prompt: bool) -> Result<Tensor> {
        let y = match (&self.kquant, &self.int8, &self.quant) {
            (Some(KQuant::Q4K(p)), _, _) => tiled_matmul(p, x)?,
            (Some(KQuant::Q6K(p)), _, _) => tiled_matmul(p, x)?,
            (_, Some(p), _) => tiled_matmul(p, x)?,
            (_, None, Some((_, raw))) if prompt && self.host_gemm => x.matmul(&dequantize(raw)?.t()?)?,
            (_, None, Some((q, _))) => q.forward(x)?,
            (_, _, None) => unreachable!("a Linear without candle's kernel has one of palaver's"),
        };
        self.add_bias(y)
    }
}

/// A k-quant weight on palaver's kernel for its format.
enum KQuant {
    Q4K(PackedQ4K),
    Q6K(PackedQ6K),
}

/// Both formats read the same quantized rows, so a layer's Q4_K and Q6_K
/// weights can share one [`qgemm::matmul_tiled_many`].
impl SuperBlocks for KQuant {
    fn shape(&self) -> (usize, usize) {
        match self {
            KQuant::Q4K(p) => p.shape(),
            KQuant::Q6K(p) => p.shape(),
        }
    }
    fn scalar_row(&self, xq: &Q8KRows, r: usize, t: usize, out: &mut [f32]) {
        match self {
            KQuant::Q4K(p) => p.scalar_row(xq, r, t, out),
            KQuant::Q6K(p) => p.scalar_row(xq, r, t, out),
        }
    }
    fn eight_rows(&self) -> bool {
        match self {
            KQuant::Q4K(p) => p.eight_rows(),
            KQuant::Q6K(p) => p.eight_rows(),
        }
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn vector<const R: usize>(&self, xq: &Q8KRows, r: usize, t: usize, out: *mut f32, cols: usize) {
        match self {
            KQuant::Q4K(p) => p.vector::<R>(xq, r, t, out, cols),
            KQuant::Q6K(p) => p.vector::<R>(xq, r, t, out, cols),
        }
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn tiles(&self, xq: &Q8KRows, r: usize, rows: usize, t: usize, out: *mut f32, cols: usize) {
        match self {
            KQuant::Q4K(p) => p.tiles(xq, r, rows, t, out, cols),
            KQuant::Q6K(p) => p.tiles(xq, r, rows, t, out, cols),
        }
    }
}

impl Linear {
    /// `x` times each of `ws` (the same input): one quantization of `x` and
    /// one parallel loop when all of them run on palaver's kernels of one
    /// kind in this pass, else one forward each. Same numbers either way.
    fn forward_group<const N: usize>(ws: [&Linear; N], x: &Tensor, prompt: bool) -> Result<[Tensor; N]> {
        let rows = x.dim(0)?;
        let run = |ys: Vec<Vec<f32>>| -> Result<[Tensor; N]> {
            let mut out = Vec::with_capacity(N);
            for (w, y) in ws.iter().zip(ys) {
                let n = y.len() / rows.max(1);
                out.push(w.add_bias(Tensor::from_vec(y, (rows, n), x.device())?)?);
            }
            Ok(out.try_into().unwrap_or_else(|_| unreachable!("one product per weight")))
        };
        let kquants: Option<Vec<&KQuant>> = ws.iter().map(|w| w.kquant.as_ref()).collect();
        if let Some(ps) = kquants {
            return run(with_values(x, |xs| Ok(qgemm::matmul_tiled_many(&ps, xs, rows)))?);
        }
        let int8: Option<Vec<&PackedWeight>> = ws.iter().map(|w| w.int8.as_ref()).collect();
        if let Some(ps) = int8 {
            return run(with_values(x, |xs| Ok(qgemm::matmul_tiled_many(&ps, xs, rows)))?);
        }
        let ys = ws.iter().map(|w| w.forward(x, prompt)).collect::<Result<Vec<_>>>()?;
        Ok(ys.try_into().unwrap_or_else(|_| unreachable!("one product per weight")))
    }

    fn add_bias(&self, y: Tensor) -> Result<Tensor> {
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// `silu(g) * u` in one pass (the MLP's gate) instead of candle's `silu`
/// then `mul`, two passes over rows of 9,000 and more, and on the cores of
/// the pool rather than as two candle ops; candle's numbers (see
/// [`swiglu`](super::swiglu)). Host tensors only: other passes take candle's
/// `silu` and `mul` (`Transformer::pass`).
fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    let out = with_values(g, |gv| with_values(u, |uv| super::swiglu::swiglu(gv, uv)))?;
    Tensor::from_vec(out, g.shape(), g.device())
}

/// `x` (rows, in) times one of palaver's repacked weights.
fn tiled_matmul<P: qgemm::Tiled>(p: &P, x: &Tensor) -> Result<Tensor> {
    let rows = x.dim(0)?;
    Tensor::from_vec(with_values(x, |xs| Ok(qgemm::matmul_tiled(p, xs, rows)))?, (rows, p.n()), x.device())
}

/// `f` of a host tensor's f32 values in row-major order: borrowed when the
/// tensor is contiguous (a prompt chunk's activations are up to 9 MB a
/// layer, and copying them was 3% of a prompt pass), copied otherwise.
pub(super) fn with_values<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    {
        let (storage, layout) = x.storage_and_layout();
        if let (candle_core::Storage::Cpu(s), Some((a, b))) = (&*storage, layout.contiguous_offsets()) {
            return f(&s.as_slice::<f32>()?[a..b]);
        }
    }
    f(&x.flatten_all()?.to_vec1::<f32>()?)
}

/// Dequantizes on all cores (candle's own `dequantize` runs on one).
pub fn dequantize(q: &QTensor) -> Result<Tensor> {
    let dev = q.device();
    if !dev.is_cpu() {
        return q.dequantize(&dev);
    }
    let mut out = vec![0f32; q.shape().elem_count()];
    if !dequantize_into(q.dtype(), &q.data()?, &mut out) {
        return q.dequantize(&dev);
    }
    Tensor::from_vec(out, q.shape(), &dev)
}

/// GGML blocks of `dtype` in `bytes` to f32 in `out`, with GGML's own
/// `to_float` (so candle's numbers), on all cores for a large tensor. False,
/// with nothing written, for a type not handled here or bytes that are not
/// whole, aligned blocks of `out.len()` values.
pub(super) fn dequantize_into(dtype: GgmlDType, bytes: &[u8], out: &mut [f32]) -> bool {
    use candle_core::quantized::k_quants::*;
    match dtype {
        GgmlDType::Q8_0 => par_to_float::<BlockQ8_0>(bytes, out),
        GgmlDType::Q4_0 => par_to_float::<BlockQ4_0>(bytes, out),
        GgmlDType::Q4K => par_to_float::<BlockQ4K>(bytes, out),
        GgmlDType::Q5K => par_to_float::<BlockQ5K>(bytes, out),
        GgmlDType::Q6K => par_to_float::<BlockQ6K>(bytes, out),
        _ => false,
    }
}

fn par_to_float<T: candle_core::quantized::k_quants::GgmlType>(bytes: &[u8], out: &mut [f32]) -> bool {
    let size = std::mem::size_of::<T>();
    let aligned = (bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>());
    if !aligned || !bytes.len().is_multiple_of(size) || bytes.len() / size * T::BLCK_SIZE != out.len() {
        return false;
    }
    // SAFETY: GGML blocks are #[repr(C)] structs of f16 scales and integer
    // arrays, valid for any bit pattern; length and alignment are checked above.
    let blocks = unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, bytes.len() / size) };
    const CHUNK: usize = 256;
    out.par_chunks_mut(CHUNK * T::BLCK_SIZE).zip(blocks.par_chunks(CHUNK)).for_each(|(o, b)| T::to_float(b, o));
    true
}

struct Layer {
    attn_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ffn_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// Which code runs a model's passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernels {
    /// On the CPU, palaver's kernels where it has them (int8 and K-quant
    /// GEMMs with AVX-512 VNNI, attention over its f16 cache, the fused
    /// gate); candle's ops everywhere else. On a GPU, the same as `Portable`.
    #[default]
    Native,
    /// candle's tensor ops only, with an f32 cache of tensors and attention
    /// as masked matmuls: the path a GPU runs. On the CPU it is that path's
    /// test bed, so that it is checked on machines without a GPU.
    Portable,
}

pub struct Transformer {
    cfg: Config,
    /// palaver's CPU kernels run (`Kernels::Native` on the CPU).
    native: bool,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: Tensor,
    output: Linear,
    cos: Tensor,
    sin: Tensor,
    device: Device,
}

impl Transformer {
    pub fn from_gguf<R: std::io::Read + std::io::Seek>(ct: &gguf_file::Content, r: &mut R, device: &Device) -> Result<Self> {
        Self::from_gguf_with(ct, r, device, Kernels::Native)
    }

    pub fn from_gguf_with<R: std::io::Read + std::io::Seek>(
        ct: &gguf_file::Content,
        r: &mut R,
        device: &Device,
        kernels: Kernels,
    ) -> Result<Self> {
        let native = kernels == Kernels::Native && device.is_cpu();
        let cfg = Config::from_gguf(ct)?;
        let mut qt = |name: &str| ct.tensor(r, name, device);
        let embed_q = Arc::new(qt("token_embd.weight")?);
        let norm = qt("output_norm.weight")?.dequantize(device)?;
        // Tied embeddings: the output layer reuses the embedding matrix.
        let output = match qt("output.weight") {
            Ok(w) => Linear::new(Arc::new(w), None, native)?,
            Err(_) => Linear::new(embed_q.clone(), None, native)?,
        };
        let embed = Embedding::new(embed_q, native)?;
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let p = format!("blk.{i}");
            let mut lin = |w: &str, bias: bool| -> Result<Linear> {
                let b = if bias { Some(qt(&format!("{p}.{w}.bias"))?.dequantize(device)?) } else { None };
                Linear::new(Arc::new(qt(&format!("{p}.{w}.weight"))?), b, native)
            };
            let bias = cfg.arch == Arch::Qwen2;
            let (q, k, v) = (lin("attn_q", bias)?, lin("attn_k", bias)?, lin("attn_v", bias)?);
            let (o, gate, up, down) =
                (lin("attn_output", false)?, lin("ffn_gate", false)?, lin("ffn_up", false)?, lin("ffn_down", false)?);
            layers.push(Layer {
                attn_norm: qt(&format!("{p}.attn_norm.weight"))?.dequantize(device)?,
                ffn_norm: qt(&format!("{p}.ffn_norm.weight"))?.dequantize(device)?,
                q,
                k,
                v,
                o,
                gate,
                up,
                down,
            });
        }
        let (cos, sin) = rope_tables(cfg.head_dim, cfg.rope_base, cfg.context, device)?;
        Ok(Self { cfg, native, embed, layers, norm, output, cos, sin, device: device.clone() })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn new_cache(&self) -> SeqCache {
        let (l, h, d) = (self.cfg.layers, self.cfg.kv_heads, self.cfg.head_dim);
        if self.native {
            SeqCache::new(l, h, d, &self.device)
        } else {
            SeqCache::of_tensors(l, h, d, &self.device)
        }
    }

    /// Runs `tokens` after the `cache.len()` tokens already in `cache`, appends
    /// their keys and values, and returns the logits of the last position.
    /// A single token is treated as a decode step, more as a prompt.
    pub fn forward(&self, tokens: &[u32], cache: &mut SeqCache) -> Result<Tensor> {
        self.forward_many(&mut [Step { tokens, cache }], tokens.len() > 1)?.squeeze(0)
    }

    /// One pass over the weights for several sequences at once: each step's
    /// tokens follow its own cache (one token for a sequence being decoded, a
    /// chunk of prompt for one being read). Rows of all steps share every
    /// matmul, so the weights are read once per pass, not once per sequence;
    /// attention runs per sequence against its own cache. Returns the logits of
    /// each step's last token, (steps, vocab).
    ///
    /// `prompt` marks a pass that reads prompt tokens: where palaver's
    /// kernels do not take a weight (a CPU without AVX-512 VNNI), it may
    /// dequantize the weight for one f32 GEMM, while a decode pass keeps
    /// candle's quantized matmul, whose result per row is the same whatever
    /// the batch. On either path batched and single generation give the same
    /// tokens.
    pub fn forward_many(&self, steps: &mut [Step<'_>], prompt: bool) -> Result<Tensor> {
        // The pass runs on a worker of the compute pool: its many parallel
        // loops (several per layer) then split work with the other workers
        // directly, instead of each waking the pool from outside and
        // sleeping until it is done (two context switches per loop).
        rayon::scope(|_| self.pass(steps, prompt, None))
    }

    /// As [`forward_many`](Self::forward_many), returning the logits of each
    /// step's last `tails[i]` positions, stacked in step order: a decode pass
    /// that checks drafted tokens needs the model's choice after each of them.
    pub fn forward_tails(&self, steps: &mut [Step<'_>], prompt: bool, tails: &[usize]) -> Result<Tensor> {
        if tails.len() != steps.len() || tails.iter().zip(steps.iter()).any(|(&n, s)| n == 0 || n > s.tokens.len()) {
            candle_core::bail!("forward_tails: a tail per step, each of 1 to its token count");
        }
        rayon::scope(|_| self.pass(steps, prompt, Some(tails)))
    }

    fn pass(&self, steps: &mut [Step<'_>], prompt: bool, tails: Option<&[usize]>) -> Result<Tensor> {
        let c = &self.cfg;
        let mut all: Vec<u32> = Vec::new();
        for s in steps.iter() {
            if s.tokens.is_empty() {
                candle_core::bail!("forward of zero tokens");
            }
            if s.cache.len() + s.tokens.len() > c.context {
                candle_core::bail!("{} tokens exceed the context of {}", s.cache.len() + s.tokens.len(), c.context);
            }
            all.extend_from_slice(s.tokens);
        }
        let group = c.heads / c.kv_heads;
        // Per step: rows in the stacked input, rotary tables and causal mask.
        let mut plans = Vec::with_capacity(steps.len());
        let mut row = 0;
        for s in steps.iter() {
            let (t, past) = (s.tokens.len(), s.cache.len());
            let mask = if t > 1 && !self.native { Some(causal_mask(t, past, group, &self.device)?) } else { None };
            plans.push(Plan { row, t, cos: self.cos.narrow(0, past, t)?, sin: self.sin.narrow(0, past, t)?, mask });
            row += t;
        }
        let mut x = self.embed.lookup(&all, &self.device)?; // (rows, hidden)
        for (i, l) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &l.attn_norm, c.rms_eps)?;
            let [q, k, v] = Linear::forward_group([&l.q, &l.k, &l.v], &h, prompt)?;
            let mut ys = Vec::with_capacity(steps.len());
            for (s, p) in steps.iter_mut().zip(&plans) {
                let part = |m: &Tensor| m.narrow(0, p.row, p.t);
                ys.push(self.attention(&part(&q)?, &part(&k)?, &part(&v)?, p, s.cache, i)?);
            }
            let y = if ys.len() == 1 { ys.pop().unwrap() } else { Tensor::cat(&ys, 0)? };
            x = (x + l.o.forward(&y, prompt)?)?;
            let h = candle_nn::ops::rms_norm(&x, &l.ffn_norm, c.rms_eps)?;
            let [g, u] = Linear::forward_group([&l.gate, &l.up], &h, prompt)?;
            let act = if self.native { swiglu(&g, &u)? } else { (candle_nn::ops::silu(&g)? * u)? };
            x = (x + l.down.forward(&act, prompt)?)?;
        }
        for s in steps.iter_mut() {
            s.cache.advance(s.tokens.len());
        }
        // Only each step's last positions need logits: the output layer is the
        // largest matrix and runs on as few rows as asked.
        let tail = |i: usize| tails.map_or(1, |t| t[i]);
        let last: Vec<Tensor> =
            plans.iter().enumerate().map(|(i, p)| x.narrow(0, p.row + p.t - tail(i), tail(i))).collect::<Result<_>>()?;
        let last = if last.len() == 1 { last[0].clone() } else { Tensor::cat(&last, 0)? };
        let last = candle_nn::ops::rms_norm(&last, &self.norm, c.rms_eps)?;
        self.output.forward(&last, false)
    }

    /// Attention of one sequence's `t` new rows ((t, heads*head_dim) for q,
    /// (t, kv_heads*head_dim) for k and v) over its cache; returns (t, hidden).
    ///
    /// On palaver's CPU cache, decode steps and prompt chunks alike run
    /// [`attention::causal`]; on a cache of tensors, the matmul form with a
    /// mask.
    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, p: &Plan, cache: &mut SeqCache, layer: usize) -> Result<Tensor> {
        let c = &self.cfg;
        let t = p.t;
        let heads = |x: &Tensor, n: usize| x.reshape((1, t, n, c.head_dim))?.transpose(1, 2)?.contiguous();
        let (q, k, v) = (heads(q, c.heads)?, heads(k, c.kv_heads)?, heads(v, c.kv_heads)?);
        let (q, k) = match c.arch {
            // GGUF llama weights are permuted for interleaved rotation; Qwen2's are not.
            Arch::Llama => (rope_i(&q, &p.cos, &p.sin)?, rope_i(&k, &p.cos, &p.sin)?),
            Arch::Qwen2 => (rope(&q, &p.cos, &p.sin)?, rope(&k, &p.cos, &p.sin)?),
        };
        let (k_all, v_all) = match cache.append(layer, &k.squeeze(0)?, &v.squeeze(0)?)? {
            LayerKv::Host(kv) => return attention::causal(&q, &kv),
            // (kv_heads, len, head_dim) views of the cache, written in place.
            LayerKv::Device(k, v) => (k, v),
        };
        let group = c.heads / c.kv_heads;
        // Grouped-query attention without copying K/V per head: the `group`
        // query heads sharing one KV head are stacked as rows of one matmul.
        let q = q.squeeze(0)?.reshape((c.kv_heads, group * t, c.head_dim))?;
        let mut scores = (q.matmul(&k_all.t()?)? / (c.head_dim as f64).sqrt())?; // (kv_heads, group*t, len)
        if let Some(m) = &p.mask {
            scores = scores.broadcast_add(m)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let y = probs.matmul(&v_all)?; // (kv_heads, group*t, head_dim)
        y.reshape((c.heads, t, c.head_dim))?.transpose(0, 1)?.reshape((t, c.hidden))
    }
}

/// One sequence's part of a [`Transformer::forward_many`] pass.
pub struct Step<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut SeqCache,
}

struct Plan {
    row: usize,
    t: usize,
    cos: Tensor,
    sin: Tensor,
    mask: Option<Tensor>,
}

/// Additive causal mask for `t` new tokens after `past` cached ones, repeated
/// for the `group` query heads stacked per KV head: (group*t, past+t).
fn causal_mask(t: usize, past: usize, group: usize, device: &Device) -> Result<Tensor> {
    let len = past + t;
    let mut m = Vec::with_capacity(group * t * len);
    for _ in 0..group {
        for i in 0..t {
            m.extend((0..len).map(|j| if j <= past + i { 0f32 } else { f32::NEG_INFINITY }));
        }
    }
    Tensor::from_vec(m, (group * t, len), device)
}

fn rope_tables(head_dim: usize, base: f32, context: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let inv: Vec<f32> = (0..head_dim).step_by(2).map(|i| 1.0 / base.powf(i as f32 / head_dim as f32)).collect();
    let inv = Tensor::new(inv.as_slice(), device)?.unsqueeze(0)?;
    let pos = Tensor::arange(0u32, context as u32, device)?.to_dtype(DType::F32)?.unsqueeze(1)?;
    let ang = pos.broadcast_mul(&inv)?;
    Ok((ang.cos()?, ang.sin()?))
}

/// Index of the largest logit (ties go to the lowest id).
pub fn argmax(logits: &Tensor) -> Result<u32> {
    logits.argmax(D::Minus1)?.to_scalar::<u32>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_dequantize_equals_candles_for_every_fast_type() {
        let n = 4 * 256 * 37; // not a multiple of the parallel chunk
        let x = Tensor::randn(0f32, 1.0, (4 * 37, 256), &Device::Cpu).unwrap();
        for dt in [GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K] {
            let q = QTensor::quantize(&x, dt).unwrap();
            let ours: Vec<f32> = dequantize(&q).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let theirs: Vec<f32> = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(ours.len(), n);
            assert_eq!(ours, theirs, "{dt:?}");
        }
    }

    #[test]
    fn causal_mask_lets_each_new_token_see_the_past_and_itself() {
        let m: Vec<Vec<f32>> = causal_mask(2, 3, 2, &Device::Cpu).unwrap().to_vec2().unwrap();
        assert_eq!(m.len(), 4);
        for (r, row) in m.iter().enumerate() {
            let i = r % 2;
            let visible = row.iter().filter(|v| v.is_finite()).count();
            assert_eq!(visible, 3 + i + 1, "row {r}");
        }
    }
}
