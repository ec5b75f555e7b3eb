//! Block-quantized int8 GEMM for the decoder's weights: `y = x · Wᵀ` with `W`
//! held as int8 in blocks of 32 inputs, each block with its own scale (the
//! Q8_0 layout), and `x` quantized the same way on the fly.
//!
//! Why blocks and not one scale per row: Qwen's hidden states carry a few
//! channels hundreds of times larger than the rest; one scale per row would
//! flatten every other channel to zero. Blocks of 32 confine an outlier's
//! damage to its own block, as GGML's Q8_0 does.
//!
//! The AVX-512 VNNI kernel multiplies 64 unsigned-by-signed byte pairs per
//! `vpdpbusd`. Weights are stored as `q + 128` (unsigned) with an f16 scale per
//! block: 34 bytes per 32 weights, the bytes of Q8_0 itself, which is what a
//! decode step reads. Each activation block carries `-128 * Σx`, which starts
//! the block's integer accumulator, so the offset costs nothing in the loop
//! and nothing in the weight's bytes. Per block the integer sum is scaled by
//! `d_w · d_x` and added to an f32 accumulator with one FMA.
//!
//! Every output row depends only on its own input row, through the same
//! sequence of operations whatever the number of rows or their tile: a prompt
//! read whole, in chunks, or after a reused prefix gives bit-identical rows.
//! The scalar fallback performs the same operations in the same order and
//! gives bit-identical results too (tested).

use half::f16;
use rayon::prelude::*;

/// Inputs per quantization block.
pub const BLOCK: usize = 32;
/// Output columns per tile: two vectors of 16 i32 lanes.
pub(super) const TILE: usize = 32;
/// Input rows per micro-kernel call: 4 rows x 2 vectors = 8 integer and 8
/// float accumulators, leaving registers for the weights and broadcasts.
const ROWS: usize = 4;
/// Rows quantized and multiplied per parallel task: keeps a task's activations
/// (rows x k bytes) in L2 while the weight tiles stream past them.
const ROW_CHUNK: usize = 64;

/// A weight of `n` outputs by `k` inputs, repacked once at load.
pub struct PackedWeight {
    n: usize,
    k: usize,
    /// `[tile][block][group of 4 inputs][32 columns][4]` of `q + 128`: one
    /// 64-byte load feeds 16 columns with 4 inputs each. Columns past `n`
    /// have zero scales.
    q: Vec<u8>,
    /// `[tile][block][32]` weight scales, f16 bits.
    scale: Vec<u16>,
}

/// Activations quantized per row in blocks of 32, with each block's scale
/// and `-128 * Σq` (the weights' unsigned offset taken back out).
pub struct QuantRows {
    rows: usize,
    k: usize,
    q: Vec<i8>,
    scale: Vec<f32>,
    offset: Vec<i32>,
}

pub(super) fn amax(x: &[f32]) -> f32 {
    x.iter().fold(0f32, |m, v| m.max(v.abs()))
}

/// Symmetric int8 quantization of one block with scale `d` (the block's
/// largest magnitude over 127, as GGML's Q8_0), ties to even.
pub(super) fn quantize_with(x: &[f32], d: f32, out: &mut [i8]) {
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    for (o, v) in out.iter_mut().zip(x) {
        *o = (v * id).round_ties_even().clamp(-127.0, 127.0) as i8;
    }
}

/// Quantizes `x` in blocks of `block` values (a multiple of 16), each with
/// scale `amax / 127` (GGML's Q8_0 and Q8_K): the integers go to `q`, the
/// scales to `d`, the sum of each 16 integers to `sums16`. A decode row is
/// quantized once per matmul while the other cores wait, so it runs with
/// AVX-512 where there is one: the same operations lane by lane as
/// [`amax`] and [`quantize_with`] (a max is exact in any order, a product
/// and a round to even are one IEEE operation each), so the same integers
/// and scales (tested).
pub(super) fn quantize_blocks(x: &[f32], block: usize, q: &mut [i8], d: &mut [f32], sums16: &mut [i32]) {
    assert!(block.is_multiple_of(16) && x.len().is_multiple_of(block), "{} values in blocks of {block}", x.len());
    assert!(q.len() == x.len() && d.len() == x.len() / block && sums16.len() == x.len() / 16, "output sizes");
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::avx512f() {
        // SAFETY: AVX-512 F is present; the sizes were checked above.
        unsafe { avx512::quantize_blocks(x, block, q, d, sums16) };
        return;
    }
    quantize_blocks_scalar(x, block, q, d, sums16);
}

fn quantize_blocks_scalar(x: &[f32], block: usize, q: &mut [i8], d: &mut [f32], sums16: &mut [i32]) {
    for (i, (xb, qb)) in x.chunks_exact(block).zip(q.chunks_exact_mut(block)).enumerate() {
        d[i] = amax(xb) / 127.0;
        quantize_with(xb, d[i], qb);
    }
    for (s, c) in sums16.iter_mut().zip(q.chunks_exact(16)) {
        *s = c.iter().map(|&v| v as i32).sum();
    }
}

impl PackedWeight {
    /// `raw`: `n` rows of `k / 32` GGUF Q8_0 blocks (an f16 scale, then 32
    /// int8), regrouped without going through f32: the same bytes as
    /// [`from_f32`](Self::from_f32) of their dequantized values (tested), at
    /// a quarter of the memory while a model loads.
    pub fn from_q8_0(raw: &[u8], n: usize, k: usize) -> Self {
        const BYTES: usize = 2 + BLOCK;
        assert!(k.is_multiple_of(BLOCK) && raw.len() == n * k / BLOCK * BYTES, "Q8_0 data of {n}x{k}");
        let (tiles, blocks) = (n.div_ceil(TILE), k / BLOCK);
        let tile_bytes = blocks * BLOCK * TILE;
        let mut q = vec![128u8; tiles * tile_bytes];
        let mut scale = vec![0u16; tiles * blocks * TILE];
        q.par_chunks_mut(tile_bytes).zip(scale.par_chunks_mut(blocks * TILE)).enumerate().for_each(|(t, (qt, st))| {
            for c in 0..TILE.min(n - t * TILE) {
                for b in 0..blocks {
                    let blk = &raw[((t * TILE + c) * blocks + b) * BYTES..][..BYTES];
                    st[b * TILE + c] = u16::from_le_bytes([blk[0], blk[1]]);
                    for (i, &v) in blk[2..].iter().enumerate() {
                        qt[(b * BLOCK / 4 + i / 4) * TILE * 4 + c * 4 + i % 4] = v ^ 0x80; // int8 + 128 as a byte: the sign bit flipped
                    }
                }
            }
        });
        Self { n, k, q, scale }
    }

    /// `w`: `n` rows of `k` f32 (one per output). `k` must be a multiple of 32.
    /// A weight that was Q8_0 comes back exactly: its blocks requantize to the
    /// same integers and scales.
    pub fn from_f32(w: &[f32], n: usize, k: usize) -> Self {
        assert!(k.is_multiple_of(BLOCK) && w.len() == n * k, "weight of {n}x{k} needs k a multiple of {BLOCK}");
        let (tiles, blocks) = (n.div_ceil(TILE), k / BLOCK);
        let tile_bytes = blocks * BLOCK * TILE;
        let mut q = vec![128u8; tiles * tile_bytes];
        let mut scale = vec![0u16; tiles * blocks * TILE];
        q.par_chunks_mut(tile_bytes).zip(scale.par_chunks_mut(blocks * TILE)).enumerate().for_each(|(t, (qt, st))| {
            let mut block = [0i8; BLOCK];
            for c in 0..TILE.min(n - t * TILE) {
                let row = &w[(t * TILE + c) * k..][..k];
                for b in 0..blocks {
                    // The scale is rounded to f16 first and the block quantized
                    // with the rounded scale (exact for a Q8_0 source).
                    let d = f16::from_f32(amax(&row[b * BLOCK..][..BLOCK]) / 127.0);
                    quantize_with(&row[b * BLOCK..][..BLOCK], d.to_f32(), &mut block);
                    st[b * TILE + c] = d.to_bits();
                    for (i, &v) in block.iter().enumerate() {
                        // group i/4 of the block, column c, byte i%4
                        qt[(b * BLOCK / 4 + i / 4) * TILE * 4 + c * 4 + i % 4] = (v as i16 + 128) as u8;
                    }
                }
            }
        });
        Self { n, k, q, scale }
    }

    /// `x`: `m` rows of `k` f32; returns `m` rows of `n`.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        matmul_tiled(self, x, m)
    }

    /// One tile of 32 columns for all rows of `xq`, written into `out`
    /// (row stride `n`).
    unsafe fn tile(&self, xq: &QuantRows, t: usize, out: *mut f32, fast: bool) {
        let blocks = self.k / BLOCK;
        let w = &self.q[t * blocks * BLOCK * TILE..][..blocks * BLOCK * TILE];
        let s = &self.scale[t * blocks * TILE..][..blocks * TILE];
        let cols = TILE.min(self.n - t * TILE);
        let out = out.add(t * TILE);
        let mut r = 0;
        #[cfg(target_arch = "x86_64")]
        if fast && xq.rows >= super::amx::MIN_ROWS && crate::cpu::amx() {
            // The same numbers as the VNNI kernel below.
            for (r, rows) in super::amx::chunks(xq.rows) {
                let (x, xs, xo) = (xq.q.as_ptr().add(r * self.k), xq.scale.as_ptr().add(r * blocks), xq.offset.as_ptr().add(r * blocks));
                super::amx::q8_0_tile(x, self.k, rows, xs, xo, w.as_ptr(), s.as_ptr(), out.add(r * self.n), self.n, cols);
            }
            return;
        }
        while r < xq.rows {
            let rows = ROWS.min(xq.rows - r);
            let dst = out.add(r * self.n);
            #[cfg(target_arch = "x86_64")]
            if fast {
                match rows {
                    4 => avx512::tile::<4>(xq, r, w, s, dst, self.n, cols),
                    3 => avx512::tile::<3>(xq, r, w, s, dst, self.n, cols),
                    2 => avx512::tile::<2>(xq, r, w, s, dst, self.n, cols),
                    _ => avx512::tile::<1>(xq, r, w, s, dst, self.n, cols),
                }
                r += rows;
                continue;
            }
            let _ = fast;
            for i in 0..rows {
                scalar_row(xq, r + i, w, s, std::slice::from_raw_parts_mut(dst.add(i * self.n), cols));
            }
            r += rows;
        }
    }
}

/// A weight repacked in tiles of [`TILE`] output columns, multiplied by
/// input rows quantized its own way. [`matmul_tiled`] spreads the tiles and
/// row chunks over the cores the same way for every format.
pub(super) trait Tiled: Sync {
    type Rows: Send + Sync;
    fn n(&self) -> usize;
    fn k(&self) -> usize;
    /// The rows' quantization; it depends on `x` and `k` only, so weights
    /// of one kind read from the same activations can share it.
    fn quantize(&self, x: &[f32], rows: usize) -> Self::Rows;
    /// Tile `t` for every row of `xq`, written into `out` (row stride `n`):
    /// every row's every column of the tile is stored, never read, so with
    /// `fast` the output may start uninitialised.
    ///
    /// # Safety
    /// `out` points at `rows(xq) x n` writable floats (initialised unless
    /// `fast`); callers sharing it write disjoint tiles.
    unsafe fn tile(&self, xq: &Self::Rows, t: usize, out: *mut f32, fast: bool);
}

impl Tiled for PackedWeight {
    type Rows = QuantRows;
    fn n(&self) -> usize {
        self.n
    }
    fn k(&self) -> usize {
        self.k
    }
    fn quantize(&self, x: &[f32], rows: usize) -> QuantRows {
        QuantRows::new(x, rows, self.k)
    }
    unsafe fn tile(&self, xq: &QuantRows, t: usize, out: *mut f32, fast: bool) {
        PackedWeight::tile(self, xq, t, out, fast)
    }
}

/// `x`: `m` rows of `k` f32 times `p`; returns `m` rows of `n`.
pub(super) fn matmul_tiled<P: Tiled>(p: &P, x: &[f32], m: usize) -> Vec<f32> {
    matmul_tiled_many(&[p], x, m).pop().expect("one weight, one product")
}

/// `x` times each of `ps` (weights of the same input size read from the same
/// activations: a layer's q, k and v, or gate and up): `x` is quantized once
/// and all their tiles share one parallel loop, rather than a quantization
/// and a loop (two wake-ups of the pool) per weight.
pub(super) fn matmul_tiled_many<P: Tiled>(ps: &[&P], x: &[f32], m: usize) -> Vec<Vec<f32>> {
    let Some(first) = ps.first() else { return Vec::new() };
    let k = first.k();
    assert!(ps.iter().all(|p| p.k() == k), "weights of different input sizes");
    assert_eq!(x.len(), m * k, "input of {} values is not {m} rows of {k}", x.len());
    let fast = crate::cpu::avx512_vnni();
    // The vector and tile kernels store every element of their tiles through
    // raw pointers, so their outputs start uninitialised: zeroing them first
    // was about 0.8% of a prompt pass. The scalar kernels write through `&mut`
    // slices, which must not see uninitialised memory: theirs are zeroed.
    let mut ys: Vec<Vec<f32>> = ps.iter().map(|p| if fast { Vec::with_capacity(m * p.n()) } else { vec![0f32; m * p.n()] }).collect();
    if m == 0 {
        return ys;
    }
    // Tasks: chunks of rows x groups of tiles, enough of them to keep every
    // core busy for a single decode row as well as for a 512-row prompt.
    let chunks = m.div_ceil(ROW_CHUNK);
    let mut tasks = Vec::new(); // (weight, chunk, first tile, end tile)
    for (i, p) in ps.iter().enumerate() {
        let tiles = p.n().div_ceil(TILE);
        let split = (2 * rayon::current_num_threads()).div_ceil(chunks).clamp(1, tiles);
        let per = tiles.div_ceil(split);
        for chunk in 0..chunks {
            for part in 0..split {
                tasks.push((i, chunk, part * per, ((part + 1) * per).min(tiles)));
            }
        }
    }
    // Each chunk of rows is quantized once, whatever the weights and tasks sharing it.
    let quant: Vec<P::Rows> = x.par_chunks(ROW_CHUNK * k).map(|c| first.quantize(c, c.len() / k)).collect();
    let outs: Vec<SyncPtr> = ys.iter_mut().map(|y| SyncPtr(y.as_mut_ptr())).collect();
    tasks.into_par_iter().for_each(|(i, chunk, t0, t1)| {
        let r0 = chunk * ROW_CHUNK;
        for t in t0..t1 {
            // SAFETY: each task writes rows r0.. of columns of its own tiles of its own weight's output.
            unsafe { ps[i].tile(&quant[chunk], t, outs[i].get().add(r0 * ps[i].n()), fast) };
        }
    });
    for (y, p) in ys.iter_mut().zip(ps) {
        // SAFETY: the tasks covered every row chunk and every tile of every
        // weight, and each stored all its rows and columns (`Tiled::tile`).
        unsafe { y.set_len(m * p.n()) };
    }
    ys
}

struct SyncPtr(*mut f32);
impl SyncPtr {
    fn get(&self) -> *mut f32 {
        self.0
    }
}
// SAFETY: the tasks sharing it write disjoint elements (see `matmul`).
unsafe impl Sync for SyncPtr {}
unsafe impl Send for SyncPtr {}

impl QuantRows {
    pub fn new(x: &[f32], rows: usize, k: usize) -> Self {
        let mut q = vec![0i8; rows * k];
        let mut scale = vec![0f32; rows * k / BLOCK];
        let mut sums16 = vec![0i32; rows * k / 16];
        quantize_blocks(x, BLOCK, &mut q, &mut scale, &mut sums16);
        let offset = sums16.chunks_exact(2).map(|s| -128 * (s[0] + s[1])).collect();
        Self { rows, k, q, scale, offset }
    }
}

/// The reference: the kernel's arithmetic one column at a time.
fn scalar_row(xq: &QuantRows, r: usize, w: &[u8], s: &[u16], out: &mut [f32]) {
    let blocks = xq.k / BLOCK;
    let xr = &xq.q[r * xq.k..][..xq.k];
    for (c, y) in out.iter_mut().enumerate() {
        let mut f = 0f32;
        for b in 0..blocks {
            let mut acc = xq.offset[r * blocks + b];
            for i in 0..BLOCK {
                let wv = w[(b * BLOCK / 4 + i / 4) * TILE * 4 + c * 4 + i % 4] as i32;
                acc += xr[b * BLOCK + i] as i32 * wv;
            }
            f = (acc as f32).mul_add(f16::from_bits(s[b * TILE + c]).to_f32() * xq.scale[r * blocks + b], f);
        }
        *y = f;
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx512 {
    use super::{QuantRows, BLOCK, TILE};
    use std::arch::x86_64::*;

    /// `R` rows from `r` of `xq` times one tile. Each row's lanes go through
    /// exactly the operations of `scalar_row`: integer sums (exact), then per
    /// block `f = fma(float(acc), d_w * d_x, f)`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn tile<const R: usize>(
        xq: &QuantRows,
        r: usize,
        w: &[u8],
        s: &[u16],
        out: *mut f32,
        ldo: usize,
        cols: usize,
    ) {
        let (k, blocks) = (xq.k, xq.k / BLOCK);
        let x = xq.q.as_ptr().add(r * k);
        let xs = xq.scale.as_ptr().add(r * blocks);
        let xo = xq.offset.as_ptr().add(r * blocks);
        let mut f = [[_mm512_setzero_ps(); 2]; R];
        for b in 0..blocks {
            let mut acc = [[_mm512_setzero_si512(); 2]; R];
            for (i, a) in acc.iter_mut().enumerate() {
                let o = _mm512_set1_epi32(*xo.add(i * blocks + b));
                *a = [o, o];
            }
            let wb = w.as_ptr().add(b * BLOCK * TILE);
            // With one or two rows, odd groups sum into registers of their
            // own so that `vpdpbusd`'s latency does not serialise the block.
            let mut odd = [[_mm512_setzero_si512(); 2]; R];
            for g in 0..BLOCK / 4 {
                let w0 = _mm512_loadu_si512(wb.add(g * TILE * 4) as *const __m512i);
                let w1 = _mm512_loadu_si512(wb.add(g * TILE * 4 + 64) as *const __m512i);
                for i in 0..R {
                    let four = (x.add(i * k + b * BLOCK + g * 4) as *const i32).read_unaligned();
                    let xv = _mm512_set1_epi32(four);
                    let a = if R <= 2 && g % 2 == 1 { &mut odd[i] } else { &mut acc[i] };
                    a[0] = _mm512_dpbusd_epi32(a[0], w0, xv);
                    a[1] = _mm512_dpbusd_epi32(a[1], w1, xv);
                }
            }
            if R <= 2 {
                for (a, o) in acc.iter_mut().zip(&odd) {
                    a[0] = _mm512_add_epi32(a[0], o[0]);
                    a[1] = _mm512_add_epi32(a[1], o[1]);
                }
            }
            let s0 = _mm512_cvtph_ps(_mm256_loadu_si256(s.as_ptr().add(b * TILE) as *const __m256i));
            let s1 = _mm512_cvtph_ps(_mm256_loadu_si256(s.as_ptr().add(b * TILE + 16) as *const __m256i));
            for i in 0..R {
                let dx = _mm512_set1_ps(*xs.add(i * blocks + b));
                f[i][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][0]), _mm512_mul_ps(s0, dx), f[i][0]);
                f[i][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][1]), _mm512_mul_ps(s1, dx), f[i][1]);
            }
        }
        crate::llm::amx::store_rows(&f, out, ldo, cols);
    }

    /// [`super::quantize_blocks`] with 16 lanes: the same max, product,
    /// round to even and clamp per value as the scalar loop.
    ///
    /// # Safety
    /// AVX-512 F present; `x` and `q` of equal length, a multiple of
    /// `block` (itself a multiple of 16); `d` and `sums16` sized for them.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn quantize_blocks(x: &[f32], block: usize, q: &mut [i8], d: &mut [f32], sums16: &mut [i32]) {
        let (lo, hi) = (_mm512_set1_ps(-127.0), _mm512_set1_ps(127.0));
        for b in 0..x.len() / block {
            let xb = x.as_ptr().add(b * block);
            let mut m = _mm512_setzero_ps();
            for j in 0..block / 16 {
                m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(xb.add(16 * j))));
            }
            let scale = _mm512_reduce_max_ps(m) / 127.0;
            d[b] = scale;
            let id = _mm512_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
            for j in 0..block / 16 {
                let v = _mm512_mul_ps(_mm512_loadu_ps(xb.add(16 * j)), id);
                let r = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
                let i = _mm512_cvtps_epi32(_mm512_min_ps(hi, _mm512_max_ps(lo, r)));
                let bytes = _mm512_cvtepi32_epi8(i);
                _mm_storeu_si128(q.as_mut_ptr().add(b * block + 16 * j) as *mut __m128i, bytes);
                sums16[(b * block) / 16 + j] = _mm512_reduce_add_epi32(_mm512_cvtepi8_epi32(bytes));
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// The vector kernel against the scalar one on `m` rows of `x`: bit for bit.
    pub(crate) fn vector_equals_scalar<P: Tiled>(p: &P, x: &[f32], m: usize) {
        if !crate::cpu::avx512_vnni() {
            eprintln!("no AVX-512 VNNI on this CPU: only the scalar path is tested");
            return;
        }
        let (n, k) = (p.n(), p.k());
        let fast = matmul_tiled(p, x, m);
        let xq = p.quantize(x, m);
        let mut slow = vec![0f32; m * n];
        for t in 0..n.div_ceil(TILE) {
            unsafe { p.tile(&xq, t, slow.as_mut_ptr(), false) };
        }
        assert_eq!(fast, slow, "{m}x{n}x{k}");
    }

    /// Each row of `m` (at least 70) gives the same result alone, among a
    /// tile's rows or after other rows: what makes chunked prompts, reused
    /// prefixes and batched decoding exact.
    pub(crate) fn rows_are_independent<P: Tiled>(p: &P, x: &[f32], m: usize) {
        let (n, k) = (p.n(), p.k());
        let all = matmul_tiled(p, x, m);
        for r in [0, 3, 64, 69] {
            assert_eq!(matmul_tiled(p, &x[r * k..(r + 1) * k], 1), all[r * n..(r + 1) * n], "row {r}");
        }
        assert_eq!(matmul_tiled(p, &x[5 * k..], m - 5), all[5 * n..]);
    }

    pub(crate) fn rnd(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn reference(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k).map(|l| x[i * k + l] as f64 * w[j * k + l] as f64).sum::<f64>() as f32;
            }
        }
        y
    }

    /// Odd shapes: columns not a multiple of 16 or 32, rows not a multiple
    /// of the micro-kernel's 4 or the 64-row chunk, one block of inputs.
    const SHAPES: [(usize, usize, usize); 6] = [(1, 32, 32), (3, 17, 64), (5, 45, 96), (67, 100, 256), (130, 33, 160), (8, 896, 896)];

    #[test]
    fn matches_f32_within_int8_rounding() {
        for (m, n, k) in SHAPES {
            let (x, mut w) = (rnd(m * k, 1 + m as u64), rnd(n * k, 7 + n as u64));
            // An outlier channel, as in Qwen's hidden states.
            for v in w.iter_mut().step_by(k + 3) {
                *v *= 20.0;
            }
            let ours = PackedWeight::from_f32(&w, n, k).matmul(&x, m);
            let want = reference(&x, &w, m, n, k);
            let (mut dot, mut a, mut b) = (0f64, 0f64, 0f64);
            for (p, q) in ours.iter().zip(&want) {
                dot += (p * q) as f64;
                a += (p * p) as f64;
                b += (q * q) as f64;
            }
            let cos = dot / (a.sqrt() * b.sqrt());
            assert!(cos > 0.9999, "{m}x{n}x{k}: cosine {cos}");
        }
    }

    #[test]
    fn vector_kernel_equals_scalar_bit_for_bit() {
        for (m, n, k) in SHAPES {
            let (x, w) = (rnd(m * k, 3 + k as u64), rnd(n * k, 5 + m as u64));
            vector_equals_scalar(&PackedWeight::from_f32(&w, n, k), &x, m);
        }
    }

    /// Where AMX tiles run, the bit-for-bit tests above and below take them
    /// for 8 rows or more (and the VNNI kernel for fewer); elsewhere the tile
    /// kernel must never be chosen.
    #[test]
    fn amx_tiles_are_chosen_only_where_the_cpu_has_them() {
        if !crate::cpu::amx_in_cpu() {
            assert!(!crate::cpu::amx(), "AMX chosen on a CPU without it");
            return;
        }
        eprintln!("AMX tiles in use: {}", crate::cpu::amx());
        let (m, n, k) = (37, 70, 320);
        let (x, w) = (rnd(m * k, 23), rnd(n * k, 29));
        vector_equals_scalar(&PackedWeight::from_f32(&w, n, k), &x, m);
    }

    #[test]
    fn vector_quantization_equals_scalar_bit_for_bit() {
        if !crate::cpu::avx512f() {
            eprintln!("no AVX-512 here: only the scalar quantization runs");
            return;
        }
        for block in [16, BLOCK, 256] {
            let len = block * 7;
            let mut x: Vec<f32> = rnd(len, block as u64).iter().map(|v| v * 3.0).collect();
            x[..block].fill(0.0); // a block of zeros: scale 0, integers 0
            x[block + 5] = 900.0; // an outlier flattens its own block only
            x[2 * block + 1] = -1e-30; // tiny values next to ordinary ones
            // Values that land exactly half-way between two integers: ties go to even.
            x[3 * block..4 * block].iter_mut().enumerate().for_each(|(i, v)| *v = (i % 32) as f32 - 8.5);
            x[3 * block] = 127.0; // scale 1
            let (mut q1, mut d1, mut s1) = (vec![0i8; len], vec![0f32; len / block], vec![0i32; len / 16]);
            let (mut q2, mut d2, mut s2) = (q1.clone(), d1.clone(), s1.clone());
            quantize_blocks(&x, block, &mut q1, &mut d1, &mut s1);
            quantize_blocks_scalar(&x, block, &mut q2, &mut d2, &mut s2);
            assert_eq!(q1, q2, "integers, blocks of {block}");
            assert_eq!(d1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), d2.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
            assert_eq!(s1, s2, "sums of 16, blocks of {block}");
            assert_eq!(&q2[3 * block + 1..3 * block + 4], &[-8, -6, -6], "-7.5, -6.5, -5.5 round to even");
        }
    }

    #[test]
    fn weights_sharing_one_loop_give_their_own_products() {
        let k = 192;
        let ws: Vec<PackedWeight> = [96, 40, 33].iter().map(|&n| PackedWeight::from_f32(&rnd(n * k, n as u64), n, k)).collect();
        for m in [1, 3, 70] {
            let x = rnd(m * k, 17 + m as u64);
            let all = matmul_tiled_many(&ws.iter().collect::<Vec<_>>(), &x, m);
            for (w, y) in ws.iter().zip(&all) {
                assert_eq!(*y, matmul_tiled(w, &x, m), "{m} rows x {} outputs", w.n);
            }
        }
    }

    #[test]
    fn a_row_does_not_depend_on_the_rows_beside_it() {
        let (m, n, k) = (70, 96, 128);
        let (x, w) = (rnd(m * k, 11), rnd(n * k, 13));
        rows_are_independent(&PackedWeight::from_f32(&w, n, k), &x, m);
    }

    #[test]
    fn a_q8_0_weight_repacks_exactly() {
        use candle_core::quantized::{GgmlDType, QTensor};
        use candle_core::{Device, Tensor};
        let (n, k) = (48, 128);
        let w = Tensor::new(rnd(n * k, 17), &Device::Cpu).unwrap().reshape((n, k)).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let deq: Vec<f32> = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let p = PackedWeight::from_f32(&deq, n, k);
        // Dequantizing the packed blocks gives the Q8_0 values back.
        for c in 0..n {
            for i in 0..k {
                let (t, cc, b) = (c / TILE, c % TILE, i / BLOCK);
                let blocks = k / BLOCK;
                let qv = p.q[t * blocks * BLOCK * TILE + (i / 4) * TILE * 4 + cc * 4 + i % 4] as f32 - 128.0;
                let d = f16::from_bits(p.scale[(t * blocks + b) * TILE + cc]).to_f32();
                assert_eq!(qv * d, deq[c * k + i], "({c}, {i})");
            }
        }
        // Straight from the blocks: the same bytes.
        let direct = PackedWeight::from_q8_0(&q.data().unwrap(), n, k);
        assert!(direct.q == p.q && direct.scale == p.scale, "from_q8_0 equals from_f32 of the dequantized weight");
    }
}
