//! GGUF Q4_K weights multiplied exactly as stored, with AVX-512 VNNI.
//!
//! A Q4_K super-block holds 256 weights as 4-bit integers in 8 sub-blocks of
//! 32, each sub-block with a 6-bit scale and a 6-bit minimum, and the
//! super-block with an f16 `d` and `dmin`: `w = d·sc·q − dmin·m`. That is 4.5
//! bits per weight, and a decode step is a pass over those bytes, so the
//! repacked form keeps them nearly as they are: the nibbles regrouped for
//! `vpdpbusd`, the 6-bit fields unpacked to bytes, 4.625 bits per weight
//! (candle's repacked tiles expand the sub-block scales to f32: 6 bits).
//!
//! Inputs are quantized per super-block of 256 to int8 with one f32 scale
//! (GGML's Q8_K), with the sum of each sub-block's 32 integers. Then per
//! column and super-block everything until the last step is integer:
//! `Σ_j sc_j·(q_j·x_j)` from `vpdpbusd` (nibbles are unsigned, the inputs
//! signed) and `Σ_j m_j·Σx_j` from `vpdpwssd` on pairs of sub-blocks; the
//! two sums are scaled by `d·dx` and `dmin·dx` into an f32 accumulator.
//! Integer sums are exact, so a row's result does not depend on the rows
//! multiplied with it nor on the kernel (vector or scalar): bit-identical.

use super::qgemm::{matmul_tiled, quantize_blocks, Tiled, TILE};
use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;
use rayon::prelude::*;

/// Weights per super-block.
pub const QK: usize = 256;
/// Bytes of one GGUF Q4_K super-block: d, dmin, 12 bytes of scales, 128 of nibbles.
const BLOCK_BYTES: usize = 144;
/// Bytes per (tile, super-block) of repacked nibbles: 32 columns x 256 / 2.
const TILE_QS: usize = TILE * QK / 2;

/// A Q4_K weight of `n` outputs by `k` inputs, repacked once at load.
pub struct PackedQ4K {
    n: usize,
    k: usize,
    /// `[tile][super-block][sub 8][group 4][column 32][4]`: byte `i` of a
    /// column's group holds input `8g+i` in its low nibble and `8g+4+i` in
    /// its high one, so a 64-byte load masked and shifted feeds two
    /// `vpdpbusd` of 16 columns x 4 inputs.
    qs: Vec<u8>,
    /// `[tile][super-block][sub 8][column 32]` 6-bit scales.
    sc: Vec<u8>,
    /// `[tile][super-block][pair 4][column 32][2]` 6-bit minimums, two
    /// sub-blocks per 32-bit lane for `vpdpwssd`.
    mn: Vec<u8>,
    /// `[tile][super-block][column 32]` f16 bits of `d` and of `dmin`.
    d: Vec<u16>,
    dmin: Vec<u16>,
}

/// Inputs quantized per super-block: int8 values, one scale per 256, the
/// sums of each 32 integers as i16 pairs (one `i32` per pair, for Q4_K's
/// minimums) and the sums of each 16 (for Q6_K's offset of 32).
pub struct Q8KRows {
    pub(super) rows: usize,
    pub(super) q: Vec<i8>,
    pub(super) d: Vec<f32>,
    sums: Vec<i32>,
    pub(super) sums16: Vec<i32>,
}

impl Q8KRows {
    pub fn new(x: &[f32], rows: usize, k: usize) -> Self {
        let blocks = k / QK;
        let mut q = vec![0i8; rows * k];
        let mut d = vec![0f32; rows * blocks];
        let mut sums16 = vec![0i32; rows * blocks * 16];
        quantize_blocks(x, QK, &mut q, &mut d, &mut sums16);
        let sums = sums16
            .chunks_exact(4)
            .map(|s| {
                // |sum of 32| <= 4064: fits an i16 half.
                let (a, b) = ((s[0] + s[1]) as i16 as u16 as i32, (s[2] + s[3]) as i16 as u16 as i32);
                a | (b << 16)
            })
            .collect();
        Self { rows, q, d, sums, sums16 }
    }
}

/// The 6-bit scale and minimum of sub-block `j` from Q4_K's 12 packed bytes.
fn scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

impl PackedQ4K {
    /// Repacks a 2-D Q4_K tensor whose input size is a multiple of 256.
    pub fn new(w: &QTensor) -> candle_core::Result<Self> {
        let (n, k) = w.shape().dims2()?;
        if w.dtype() != GgmlDType::Q4K || !k.is_multiple_of(QK) {
            candle_core::bail!("PackedQ4K takes Q4_K weights with inputs a multiple of {QK}, got {:?} {n}x{k}", w.dtype());
        }
        let raw = w.data()?;
        Ok(Self::from_blocks(&raw, n, k))
    }

    /// `raw`: `n` rows of `k / 256` GGUF Q4_K blocks.
    fn from_blocks(raw: &[u8], n: usize, k: usize) -> Self {
        let (tiles, blocks) = (n.div_ceil(TILE), k / QK);
        assert_eq!(raw.len(), n * blocks * BLOCK_BYTES, "Q4_K data of {n}x{k}");
        let per = tiles * blocks;
        let (mut qs, mut sc, mut mn) = (vec![0u8; per * TILE_QS], vec![0u8; per * 8 * TILE], vec![0u8; per * 8 * TILE]);
        let (mut d, mut dmin) = (vec![0u16; per * TILE], vec![0u16; per * TILE]);
        qs.par_chunks_mut(TILE_QS)
            .zip(sc.par_chunks_mut(8 * TILE))
            .zip(mn.par_chunks_mut(8 * TILE))
            .zip(d.par_chunks_mut(TILE).zip(dmin.par_chunks_mut(TILE)))
            .enumerate()
            .for_each(|(tb, (((qs, sc), mn), (d, dmin)))| {
                let (t, b) = (tb / blocks, tb % blocks);
                // Columns past `n` keep zero scales and contribute nothing.
                for c in 0..TILE.min(n - t * TILE) {
                    let blk = &raw[((t * TILE + c) * blocks + b) * BLOCK_BYTES..][..BLOCK_BYTES];
                    d[c] = u16::from_le_bytes([blk[0], blk[1]]);
                    dmin[c] = u16::from_le_bytes([blk[2], blk[3]]);
                    let (scales, nib) = (&blk[4..16], &blk[16..]);
                    for j in 0..8 {
                        let (s, m) = scale_min(j, scales);
                        sc[j * TILE + c] = s;
                        mn[(j / 2) * TILE * 2 + c * 2 + j % 2] = m;
                    }
                    // GGUF order: 32-byte chunk `h` holds inputs 64h.. in its
                    // low nibbles and 64h+32.. in its high ones.
                    let value = |i: usize| {
                        let byte = nib[(i / 64) * 32 + i % 32];
                        if i % 64 < 32 { byte & 0xF } else { byte >> 4 }
                    };
                    for g in 0..QK / 8 {
                        for i in 0..4 {
                            qs[(g * TILE + c) * 4 + i] = value(8 * g + i) | (value(8 * g + 4 + i) << 4);
                        }
                    }
                }
            });
        Self { n, k, qs, sc, mn, d, dmin }
    }

    /// `x`: `m` rows of `k` f32; returns `m` rows of `n`.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        matmul_tiled(self, x, m)
    }

    /// The reference: the kernel's arithmetic for one row, column by column.
    fn scalar_row(&self, xq: &Q8KRows, r: usize, t: usize, out: &mut [f32]) {
        let blocks = self.k / QK;
        for (c, y) in out.iter_mut().enumerate() {
            let mut f = 0f32;
            for b in 0..blocks {
                let tb = t * blocks + b;
                let x = &xq.q[r * self.k + b * QK..][..QK];
                let (mut isum, mut msum) = (0i32, 0i32);
                for j in 0..8 {
                    let mut acc = 0i32;
                    for i in 0..32 {
                        let (g, o) = ((j * 32 + i) / 8, i % 8);
                        let byte = self.qs[tb * TILE_QS + (g * TILE + c) * 4 + o % 4];
                        let q = if o < 4 { byte & 0xF } else { byte >> 4 };
                        acc += q as i32 * x[j * 32 + i] as i32;
                    }
                    isum += acc * self.sc[tb * 8 * TILE + j * TILE + c] as i32;
                    let pair = xq.sums[(r * blocks + b) * 4 + j / 2];
                    let s = if j % 2 == 0 { pair as i16 } else { (pair >> 16) as i16 };
                    msum += s as i32 * self.mn[tb * 8 * TILE + (j / 2) * TILE * 2 + c * 2 + j % 2] as i32;
                }
                let dx = xq.d[r * blocks + b];
                let d = f16::from_bits(self.d[tb * TILE + c]).to_f32();
                let dmin = f16::from_bits(self.dmin[tb * TILE + c]).to_f32();
                f = (isum as f32).mul_add(d * dx, f);
                f = (-(msum as f32)).mul_add(dmin * dx, f);
            }
            *y = f;
        }
    }
}

/// A weight in super-blocks of 256 multiplied by [`Q8KRows`]: its vector
/// micro-kernel for 1 to 4 rows and its scalar reference. Q4_K and Q6_K
/// share the rest ([`Tiled`]).
pub(super) trait SuperBlocks: Sync {
    fn shape(&self) -> (usize, usize);
    fn scalar_row(&self, xq: &Q8KRows, r: usize, t: usize, out: &mut [f32]);
    /// Whether `vector` takes 8 rows at once as well as 1 to 4: worth it
    /// where unpacking the weights, shared by the rows, is the kernel's cost.
    fn eight_rows(&self) -> bool {
        false
    }
    /// # Safety
    /// AVX-512 VNNI present; `out` holds `R` rows (stride `n`) of `cols` floats.
    #[cfg(target_arch = "x86_64")]
    unsafe fn vector<const R: usize>(&self, xq: &Q8KRows, r: usize, t: usize, out: *mut f32, cols: usize);
    /// Up to 16 rows from `r` on AMX tiles, bit-identical to `vector`.
    ///
    /// # Safety
    /// As `vector`, and AMX usable by this thread (`crate::cpu::amx`).
    #[cfg(target_arch = "x86_64")]
    unsafe fn tiles(&self, xq: &Q8KRows, r: usize, rows: usize, t: usize, out: *mut f32, cols: usize);
}

impl<W: SuperBlocks> Tiled for W {
    type Rows = Q8KRows;
    fn n(&self) -> usize {
        self.shape().0
    }
    fn k(&self) -> usize {
        self.shape().1
    }
    fn quantize(&self, x: &[f32], rows: usize) -> Q8KRows {
        Q8KRows::new(x, rows, self.k())
    }
    unsafe fn tile(&self, xq: &Q8KRows, t: usize, out: *mut f32, fast: bool) {
        let n = self.n();
        let cols = TILE.min(n - t * TILE);
        let out = out.add(t * TILE);
        let mut r = 0;
        #[cfg(target_arch = "x86_64")]
        if fast && xq.rows >= super::amx::MIN_ROWS && crate::cpu::amx() {
            for (r, rows) in super::amx::chunks(xq.rows) {
                self.tiles(xq, r, rows, t, out.add(r * n), cols);
            }
            return;
        }
        while r < xq.rows {
            let left = xq.rows - r;
            let rows = if left >= 8 && self.eight_rows() { 8 } else { left.min(4) };
            let dst = out.add(r * n);
            #[cfg(target_arch = "x86_64")]
            if fast {
                match rows {
                    8 => self.vector::<8>(xq, r, t, dst, cols),
                    4 => self.vector::<4>(xq, r, t, dst, cols),
                    3 => self.vector::<3>(xq, r, t, dst, cols),
                    2 => self.vector::<2>(xq, r, t, dst, cols),
                    _ => self.vector::<1>(xq, r, t, dst, cols),
                }
                r += rows;
                continue;
            }
            let _ = fast;
            for i in 0..rows {
                self.scalar_row(xq, r + i, t, std::slice::from_raw_parts_mut(dst.add(i * n), cols));
            }
            r += rows;
        }
    }
}

impl SuperBlocks for PackedQ4K {
    fn shape(&self) -> (usize, usize) {
        (self.n, self.k)
    }
    fn scalar_row(&self, xq: &Q8KRows, r: usize, t: usize, out: &mut [f32]) {
        PackedQ4K::scalar_row(self, xq, r, t, out)
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn vector<const R: usize>(&self, xq: &Q8KRows, r: usize, t: usize, out: *mut f32, cols: usize) {
        avx512::tile::<R>(self, xq, r, t, out, cols)
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn tiles(&self, xq: &Q8KRows, r: usize, rows: usize, t: usize, out: *mut f32, cols: usize) {
        let blocks = self.k / QK;
        let tb = t * blocks;
        super::amx::q4_k_tile(
            xq.q.as_ptr().add(r * self.k),
            self.k,
            rows,
            xq.d.as_ptr().add(r * blocks),
            xq.sums.as_ptr().add(r * blocks * 4),
            self.qs.as_ptr().add(tb * TILE_QS),
            self.sc.as_ptr().add(tb * 8 * TILE),
            self.mn.as_ptr().add(tb * 8 * TILE),
            self.d.as_ptr().add(tb * TILE),
            self.dmin.as_ptr().add(tb * TILE),
            out,
            self.n,
            cols,
        );
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{PackedQ4K, Q8KRows, QK, TILE, TILE_QS};
    use crate::llm::amx::store_rows;
    use std::arch::x86_64::*;

    /// `R` rows from `r` of `xq` times tile `t`, through exactly the
    /// operations of `scalar_row`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn tile<const R: usize>(w: &PackedQ4K, xq: &Q8KRows, r: usize, t: usize, out: *mut f32, cols: usize) {
        let (k, blocks) = (w.k, w.k / QK);
        let low = _mm512_set1_epi8(0xF);
        // With one or two rows, the low and high nibbles sum into separate
        // registers so that `vpdpbusd`'s latency does not serialise them.
        let split = R <= 2;
        let mut f = [[_mm512_setzero_ps(); 2]; R];
        for b in 0..blocks {
            let tb = t * blocks + b;
            let qs = w.qs.as_ptr().add(tb * TILE_QS);
            let sc = w.sc.as_ptr().add(tb * 8 * TILE);
            let mut isum = [[_mm512_setzero_si512(); 2]; R];
            for j in 0..8 {
                let mut lo = [[_mm512_setzero_si512(); 2]; R];
                let mut hi = [[_mm512_setzero_si512(); 2]; R];
                for g in 0..4 {
                    let p = qs.add((j * 4 + g) * TILE * 4);
                    let w0 = _mm512_loadu_si512(p as *const __m512i);
                    let w1 = _mm512_loadu_si512(p.add(64) as *const __m512i);
                    let (l0, l1) = (_mm512_and_si512(w0, low), _mm512_and_si512(w1, low));
                    let (h0, h1) = (_mm512_and_si512(_mm512_srli_epi16(w0, 4), low), _mm512_and_si512(_mm512_srli_epi16(w1, 4), low));
                    for i in 0..R {
                        let x = xq.q.as_ptr().add((r + i) * k + b * QK + j * 32 + g * 8);
                        let xl = _mm512_set1_epi32((x as *const i32).read_unaligned());
                        let xh = _mm512_set1_epi32((x.add(4) as *const i32).read_unaligned());
                        lo[i][0] = _mm512_dpbusd_epi32(lo[i][0], l0, xl);
                        lo[i][1] = _mm512_dpbusd_epi32(lo[i][1], l1, xl);
                        let a = if split { &mut hi[i] } else { &mut lo[i] };
                        a[0] = _mm512_dpbusd_epi32(a[0], h0, xh);
                        a[1] = _mm512_dpbusd_epi32(a[1], h1, xh);
                    }
                }
                let s0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(sc.add(j * TILE) as *const __m128i));
                let s1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(sc.add(j * TILE + 16) as *const __m128i));
                for i in 0..R {
                    let (a0, a1) = if split {
                        (_mm512_add_epi32(lo[i][0], hi[i][0]), _mm512_add_epi32(lo[i][1], hi[i][1]))
                    } else {
                        (lo[i][0], lo[i][1])
                    };
                    isum[i][0] = _mm512_add_epi32(isum[i][0], _mm512_mullo_epi32(a0, s0));
                    isum[i][1] = _mm512_add_epi32(isum[i][1], _mm512_mullo_epi32(a1, s1));
                }
            }
            let mut msum = [[_mm512_setzero_si512(); 2]; R];
            let mn = w.mn.as_ptr().add(tb * 8 * TILE);
            #[allow(clippy::needless_range_loop)] // rows index register arrays and the inputs alike
            for p in 0..4 {
                let m0 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(mn.add(p * TILE * 2) as *const __m256i));
                let m1 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(mn.add(p * TILE * 2 + 32) as *const __m256i));
                for i in 0..R {
                    let s = _mm512_set1_epi32(*xq.sums.get_unchecked(((r + i) * blocks + b) * 4 + p));
                    msum[i][0] = _mm512_dpwssd_epi32(msum[i][0], m0, s);
                    msum[i][1] = _mm512_dpwssd_epi32(msum[i][1], m1, s);
                }
            }
            let d0 = _mm512_cvtph_ps(_mm256_loadu_si256(w.d.as_ptr().add(tb * TILE) as *const __m256i));
            let d1 = _mm512_cvtph_ps(_mm256_loadu_si256(w.d.as_ptr().add(tb * TILE + 16) as *const __m256i));
            let e0 = _mm512_cvtph_ps(_mm256_loadu_si256(w.dmin.as_ptr().add(tb * TILE) as *const __m256i));
            let e1 = _mm512_cvtph_ps(_mm256_loadu_si256(w.dmin.as_ptr().add(tb * TILE + 16) as *const __m256i));
            for i in 0..R {
                let dx = _mm512_set1_ps(*xq.d.get_unchecked((r + i) * blocks + b));
                f[i][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[i][0]), _mm512_mul_ps(d0, dx), f[i][0]);
                f[i][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[i][1]), _mm512_mul_ps(d1, dx), f[i][1]);
                f[i][0] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(msum[i][0]), _mm512_mul_ps(e0, dx), f[i][0]);
                f[i][1] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(msum[i][1]), _mm512_mul_ps(e1, dx), f[i][1]);
            }
        }
        store_rows(&f, out, w.n, cols);
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::llm::qgemm::tests::{rows_are_independent, vector_equals_scalar};
    use candle_core::quantized::QMatMul;
    use candle_core::{Device, Module, Tensor};

    pub(crate) use crate::llm::qgemm::tests::rnd;

    pub(crate) fn cosine(a: &[f32], b: &[f32]) -> f64 {
        let (mut d, mut x, mut y) = (0f64, 0f64, 0f64);
        for (p, q) in a.iter().zip(b) {
            d += (p * q) as f64;
            x += (p * p) as f64;
            y += (q * q) as f64;
        }
        d / (x.sqrt() * y.sqrt())
    }

    fn q4k(n: usize, k: usize, seed: u64) -> QTensor {
        let w = Tensor::new(rnd(n * k, seed), &Device::Cpu).unwrap().reshape((n, k)).unwrap();
        QTensor::quantize(&w, GgmlDType::Q4K).unwrap()
    }

    /// Odd shapes: columns not a multiple of 16 or 32, rows not a multiple
    /// of the micro-kernel's 4 or the 64-row chunk, a single super-block.
    pub(crate) const SHAPES: [(usize, usize, usize); 5] = [(1, 32, 256), (3, 17, 512), (5, 45, 256), (67, 100, 768), (130, 33, 256)];

    #[test]
    fn equals_the_dequantized_weight_within_int8_rounding() {
        for (m, n, k) in SHAPES {
            let w = q4k(n, k, 7 + n as u64);
            let x = rnd(m * k, 1 + m as u64);
            let ours = PackedQ4K::new(&w).unwrap().matmul(&x, m);
            let deq = w.dequantize(&Device::Cpu).unwrap();
            let want: Vec<f32> = Tensor::new(x.as_slice(), &Device::Cpu)
                .unwrap()
                .reshape((m, k))
                .unwrap()
                .matmul(&deq.t().unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let cos = cosine(&ours, &want);
            assert!(cos > 0.9999, "{m}x{n}x{k}: cosine {cos}");
        }
    }

    /// `p` (repacked from `w`) against candle's own quantized matmul of `w`:
    /// same format, different activation rounding, so within it.
    pub(crate) fn agrees_with_candle<P: Tiled>(p: &P, w: QTensor, m: usize) {
        let x = rnd(m * p.k(), 9);
        let ours = crate::llm::qgemm::matmul_tiled(p, &x, m);
        let xt = Tensor::new(x.as_slice(), &Device::Cpu).unwrap().reshape((m, p.k())).unwrap();
        let theirs: Vec<f32> = QMatMul::from_qtensor(w).unwrap().forward(&xt).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let cos = cosine(&ours, &theirs);
        assert!(cos > 0.9999, "cosine {cos}");
    }

    #[test]
    fn agrees_with_candles_q4k_matmul() {
        let w = q4k(64, 512, 3);
        agrees_with_candle(&PackedQ4K::new(&w).unwrap(), w, 4);
    }

    #[test]
    fn vector_kernel_equals_scalar_bit_for_bit() {
        for (m, n, k) in SHAPES {
            vector_equals_scalar(&PackedQ4K::new(&q4k(n, k, 5 + m as u64)).unwrap(), &rnd(m * k, 3 + k as u64), m);
        }
    }

    #[test]
    fn a_row_does_not_depend_on_the_rows_beside_it() {
        let (m, n, k) = (70, 96, 512);
        rows_are_independent(&PackedQ4K::new(&q4k(n, k, 13)).unwrap(), &rnd(m * k, 11), m);
    }

    #[test]
    fn repacking_keeps_every_weight() {
        let (n, k) = (40, 512);
        let w = q4k(n, k, 21);
        let p = PackedQ4K::new(&w).unwrap();
        let deq: Vec<f32> = w.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let blocks = k / QK;
        for c in 0..n {
            for i in 0..k {
                let (t, cc, b, ii) = (c / TILE, c % TILE, i / QK, i % QK);
                let tb = t * blocks + b;
                let (j, g, o) = (ii / 32, ii / 8, ii % 8);
                let byte = p.qs[tb * TILE_QS + (g * TILE + cc) * 4 + o % 4];
                let q = if o < 4 { byte & 0xF } else { byte >> 4 } as f32;
                let d = f16::from_bits(p.d[tb * TILE + cc]).to_f32();
                let dmin = f16::from_bits(p.dmin[tb * TILE + cc]).to_f32();
                let sc = p.sc[tb * 8 * TILE + j * TILE + cc] as f32;
                let m = p.mn[tb * 8 * TILE + (j / 2) * TILE * 2 + cc * 2 + j % 2] as f32;
                let v = d * sc * q - dmin * m;
                assert!((v - deq[c * k + i]).abs() <= 1e-6 * (1.0 + v.abs()), "({c}, {i}): {v} vs {}", deq[c * k + i]);
            }
        }
    }
}
