//! GGUF Q6_K weights multiplied exactly as stored, with AVX-512 VNNI (and
//! AMX tiles for 8 rows or more where the CPU has them: `super::amx`).
//!
//! A Q6_K super-block holds 256 weights as 6-bit integers `v` (0..63) in 16
//! sub-blocks of 16, each with a signed 8-bit scale, and an f16 `d`:
//! `w = d·sc·(v − 32)`, 6.56 bits per weight. Q4_K_M files keep the output
//! layer and half the down projections in it. candle multiplies one row
//! with its row-by-row kernel and several with tiles whose scales it expands
//! to f32 (8.5 bits per weight); here both take one kernel over bytes
//! regrouped for `vpdpbusd` (6.625 bits per weight), and a row's result does
//! not depend on the rows beside it.
//!
//! Per sub-block the integer sum starts at `−32·Σx` (the offset of `v`, from
//! the inputs' sums of 16), takes the unsigned `v` against the signed
//! inputs, and is multiplied by the sub-block scale; the super-block's sum
//! is scaled once by `d·dx`. Integers are exact, so the tile, vector and
//! scalar kernels agree bit for bit.

use super::q4k::{Q8KRows, SuperBlocks, QK};
use super::qgemm::{matmul_tiled, TILE};
use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;
use rayon::prelude::*;

/// Bytes of one GGUF Q6_K super-block: 128 of low bits, 64 of high bits, 16
/// scales, d.
const BLOCK_BYTES: usize = 210;
/// Bytes per (tile, super-block) of low nibbles and of high bit pairs.
const TILE_QL: usize = TILE * QK / 2;
const TILE_QH: usize = TILE * QK / 4;

/// A Q6_K weight of `n` outputs by `k` inputs, repacked once at load.
pub struct PackedQ6K {
    n: usize,
    k: usize,
    /// `[tile][super-block][group 32][column 32][4]`: byte `i` holds the low
    /// 4 bits of input `8g+i` and, in its high nibble, of `8g+4+i`.
    ql: Vec<u8>,
    /// `[tile][super-block][sub 16][column 32][4]`: byte `i` holds the high
    /// 2 bits of inputs `16j+i`, `16j+4+i`, `16j+8+i`, `16j+12+i`, from bit 0 up.
    qh: Vec<u8>,
    /// `[tile][super-block][sub 16][column 32]` scales.
    sc: Vec<i8>,
    /// `[tile][super-block][column 32]` f16 bits of `d`.
    d: Vec<u16>,
}

/// Input `i` (0..256) of a GGUF Q6_K block: its 6-bit value and scale index.
fn value(blk: &[u8], i: usize) -> u8 {
    let (ql, qh) = (&blk[..128], &blk[128..192]);
    let (h, r) = (i / 128, i % 128);
    let (quarter, l) = (r / 32, r % 32);
    let low = ql[64 * h + 32 * (quarter % 2) + l];
    let low = if quarter < 2 { low & 0xF } else { low >> 4 };
    low | (((qh[32 * h + l] >> (2 * quarter)) & 3) << 4)
}

impl PackedQ6K {
    /// Repacks a 2-D Q6_K tensor whose input size is a multiple of 256.
    pub fn new(w: &QTensor) -> candle_core::Result<Self> {
        let (n, k) = w.shape().dims2()?;
        if w.dtype() != GgmlDType::Q6K || !k.is_multiple_of(QK) {
            candle_core::bail!("PackedQ6K takes Q6_K weights with inputs a multiple of {QK}, got {:?} {n}x{k}", w.dtype());
        }
        let raw = w.data()?;
        Ok(Self::from_blocks(&raw, n, k))
    }

    fn from_blocks(raw: &[u8], n: usize, k: usize) -> Self {
        let (tiles, blocks) = (n.div_ceil(TILE), k / QK);
        assert_eq!(raw.len(), n * blocks * BLOCK_BYTES, "Q6_K data of {n}x{k}");
        let per = tiles * blocks;
        let (mut ql, mut qh) = (vec![0u8; per * TILE_QL], vec![0u8; per * TILE_QH]);
        let (mut sc, mut d) = (vec![0i8; per * 16 * TILE], vec![0u16; per * TILE]);
        ql.par_chunks_mut(TILE_QL)
            .zip(qh.par_chunks_mut(TILE_QH))
            .zip(sc.par_chunks_mut(16 * TILE).zip(d.par_chunks_mut(TILE)))
            .enumerate()
            .for_each(|(tb, ((ql, qh), (sc, d)))| {
                let (t, b) = (tb / blocks, tb % blocks);
                // Columns past `n` keep zero scales and contribute nothing.
                for c in 0..TILE.min(n - t * TILE) {
                    let blk = &raw[((t * TILE + c) * blocks + b) * BLOCK_BYTES..][..BLOCK_BYTES];
                    d[c] = u16::from_le_bytes([blk[208], blk[209]]);
                    for j in 0..16 {
                        sc[j * TILE + c] = blk[192 + j] as i8;
                    }
                    let v = |i: usize| value(blk, i);
                    for g in 0..QK / 8 {
                        for i in 0..4 {
                            ql[(g * TILE + c) * 4 + i] = (v(8 * g + i) & 0xF) | ((v(8 * g + 4 + i) & 0xF) << 4);
                        }
                    }
                    for j in 0..16 {
                        for i in 0..4 {
                            let hi = |o: usize| (v(16 * j + o + i) >> 4) << (o / 2);
                            qh[(j * TILE + c) * 4 + i] = hi(0) | hi(4) | hi(8) | hi(12);
                        }
                    }
                }
            });
        Self { n, k, ql, qh, sc, d }
    }

    /// `x`: `m` rows of `k` f32; returns `m` rows of `n`.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        matmul_tiled(self, x, m)
    }

    /// The 6-bit value of input `i` of super-block `tb`, column `c`.
    fn packed_value(&self, tb: usize, c: usize, i: usize) -> i32 {
        let (g, o, j) = (i / 8, i % 8, i / 16);
        let byte = self.ql[tb * TILE_QL + (g * TILE + c) * 4 + o % 4];
        let low = if o < 4 { byte & 0xF } else { byte >> 4 };
        let high = (self.qh[tb * TILE_QH + (j * TILE + c) * 4 + o % 4] >> (2 * ((i % 16) / 4))) & 3;
        (low | (high << 4)) as i32
    }

    /// The reference: the kernel's arithmetic for one row, column by column.
    fn scalar_row(&self, xq: &Q8KRows, r: usize, t: usize, out: &mut [f32]) {
        let blocks = self.k / QK;
        for (c, y) in out.iter_mut().enumerate() {
            let mut f = 0f32;
            for b in 0..blocks {
                let tb = t * blocks + b;
                let x = &xq.q[r * self.k + b * QK..][..QK];
                let mut isum = 0i32;
                for j in 0..16 {
                    let mut acc = -32 * xq.sums16[(r * blocks + b) * 16 + j];
                    for (i, &xi) in x.iter().enumerate().skip(16 * j).take(16) {
                        acc += self.packed_value(tb, c, i) * xi as i32;
                    }
                    isum += acc * self.sc[tb * 16 * TILE + j * TILE + c] as i32;
                }
                let d = f16::from_bits(self.d[tb * TILE + c]).to_f32();
                f = (isum as f32).mul_add(d * xq.d[r * blocks + b], f);
            }
            *y = f;
        }
    }
}

impl SuperBlocks for PackedQ6K {
    fn shape(&self) -> (usize, usize) {
        (self.n, self.k)
    }
    fn scalar_row(&self, xq: &Q8KRows, r: usize, t: usize, out: &mut [f32]) {
        PackedQ6K::scalar_row(self, xq, r, t, out)
    }
    /// Assembling the 6-bit values costs more than the `vpdpbusd` of 4 rows
    /// (timed without it, the kernel ran at Q4_K's rate).
    fn eight_rows(&self) -> bool {
        true
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn vector<const R: usize>(&self, xq: &Q8KRows, r: usize, t: usize, out: *mut f32, cols: usize) {
        if R == 8 {
            avx512::eight_rows(self, xq, r, t, out, cols)
        } else {
            avx512::tile::<R>(self, xq, r, t, out, cols)
        }
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn tiles(&self, xq: &Q8KRows, r: usize, rows: usize, t: usize, out: *mut f32, cols: usize) {
        let blocks = self.k / QK;
        let tb = t * blocks;
        super::amx::q6_k_tile(
            xq.q.as_ptr().add(r * self.k),
            self.k,
            rows,
            xq.d.as_ptr().add(r * blocks),
            xq.sums16.as_ptr().add(r * blocks * 16),
            self.ql.as_ptr().add(tb * TILE_QL),
            self.qh.as_ptr().add(tb * TILE_QH),
            self.sc.as_ptr().add(tb * 16 * TILE),
            self.d.as_ptr().add(tb * TILE),
            out,
            self.n,
            cols,
        );
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{PackedQ6K, Q8KRows, QK, TILE, TILE_QH, TILE_QL};
    use crate::llm::amx::{q6_values, store_rows};
    use std::arch::x86_64::*;

    /// `R` rows from `r` of `xq` times tile `t`, through exactly the
    /// operations of `scalar_row`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn tile<const R: usize>(w: &PackedQ6K, xq: &Q8KRows, r: usize, t: usize, out: *mut f32, cols: usize) {
        let (k, blocks) = (w.k, w.k / QK);
        let mut f = [[_mm512_setzero_ps(); 2]; R];
        for b in 0..blocks {
            let tb = t * blocks + b;
            let (ql, qh) = (w.ql.as_ptr().add(tb * TILE_QL), w.qh.as_ptr().add(tb * TILE_QH));
            let sc = w.sc.as_ptr().add(tb * 16 * TILE);
            let mut isum = [[_mm512_setzero_si512(); 2]; R];
            for j in 0..16 {
                // Two independent sums per row and vector: inputs 0-7 and 8-15.
                let mut acc = [[[_mm512_setzero_si512(); 2]; 2]; R];
                for (i, a) in acc.iter_mut().enumerate() {
                    let o = _mm512_set1_epi32(-32 * *xq.sums16.get_unchecked(((r + i) * blocks + b) * 16 + j));
                    a[0] = [o, o];
                }
                for v in 0..2 {
                    let q = q6_values(ql, qh, j, v);
                    for (i, a) in acc.iter_mut().enumerate() {
                        let x = xq.q.as_ptr().add((r + i) * k + b * QK + j * 16);
                        for (p, qp) in q.iter().enumerate() {
                            let xv = _mm512_set1_epi32((x.add(4 * p) as *const i32).read_unaligned());
                            a[p / 2][v] = _mm512_dpbusd_epi32(a[p / 2][v], *qp, xv);
                        }
                    }
                }
                let s0 = _mm512_cvtepi8_epi32(_mm_loadu_si128(sc.add(j * TILE) as *const __m128i));
                let s1 = _mm512_cvtepi8_epi32(_mm_loadu_si128(sc.add(j * TILE + 16) as *const __m128i));
                for (i, a) in acc.iter().enumerate() {
                    isum[i][0] = _mm512_add_epi32(isum[i][0], _mm512_mullo_epi32(_mm512_add_epi32(a[0][0], a[1][0]), s0));
                    isum[i][1] = _mm512_add_epi32(isum[i][1], _mm512_mullo_epi32(_mm512_add_epi32(a[0][1], a[1][1]), s1));
                }
            }
            let d0 = _mm512_cvtph_ps(_mm256_loadu_si256(w.d.as_ptr().add(tb * TILE) as *const __m256i));
            let d1 = _mm512_cvtph_ps(_mm256_loadu_si256(w.d.as_ptr().add(tb * TILE + 16) as *const __m256i));
            for i in 0..R {
                let dx = _mm512_set1_ps(*xq.d.get_unchecked((r + i) * blocks + b));
                f[i][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[i][0]), _mm512_mul_ps(d0, dx), f[i][0]);
                f[i][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[i][1]), _mm512_mul_ps(d1, dx), f[i][1]);
            }
        }
        store_rows(&f, out, w.n, cols);
    }

    /// 8 rows from `r` of `xq` times tile `t`, one half of the tile (16
    /// columns) at a time: each assembled weight vector then serves 8 rows,
    /// and 8 rows' sums are independent chains enough to hide `vpdpbusd`'s
    /// latency without `tile`'s split sums, so the accumulators fit the
    /// registers. The same integers as `scalar_row`, summed in another
    /// order (exact), and the same float steps: bit for bit its results.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn eight_rows(w: &PackedQ6K, xq: &Q8KRows, r: usize, t: usize, out: *mut f32, cols: usize) {
        const R: usize = 8;
        let (k, blocks) = (w.k, w.k / QK);
        for v in 0..2 {
            let half = cols.saturating_sub(16 * v).min(16);
            if half == 0 {
                break;
            }
            let mut f = [_mm512_setzero_ps(); R];
            for b in 0..blocks {
                let tb = t * blocks + b;
                let (ql, qh) = (w.ql.as_ptr().add(tb * TILE_QL), w.qh.as_ptr().add(tb * TILE_QH));
                let sc = w.sc.as_ptr().add(tb * 16 * TILE + 16 * v);
                let mut isum = [_mm512_setzero_si512(); R];
                for j in 0..16 {
                    let q = q6_values(ql, qh, j, v);
                    let s = _mm512_cvtepi8_epi32(_mm_loadu_si128(sc.add(j * TILE) as *const __m128i));
                    for (i, sum) in isum.iter_mut().enumerate() {
                        let mut a = _mm512_set1_epi32(-32 * *xq.sums16.get_unchecked(((r + i) * blocks + b) * 16 + j));
                        let x = xq.q.as_ptr().add((r + i) * k + b * QK + j * 16);
                        for (p, qp) in q.iter().enumerate() {
                            a = _mm512_dpbusd_epi32(a, *qp, _mm512_set1_epi32((x.add(4 * p) as *const i32).read_unaligned()));
                        }
                        *sum = _mm512_add_epi32(*sum, _mm512_mullo_epi32(a, s));
                    }
                }
                let d = _mm512_cvtph_ps(_mm256_loadu_si256(w.d.as_ptr().add(tb * TILE + 16 * v) as *const __m256i));
                for (i, fi) in f.iter_mut().enumerate() {
                    let dx = _mm512_set1_ps(*xq.d.get_unchecked((r + i) * blocks + b));
                    *fi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[i]), _mm512_mul_ps(d, dx), *fi);
                }
            }
            let mask: __mmask16 = if half == 16 { 0xffff } else { ((1u32 << half) - 1) as u16 };
            for (i, fi) in f.iter().enumerate() {
                _mm512_mask_storeu_ps(out.add(i * w.n + 16 * v), mask, *fi);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::q4k::tests::{agrees_with_candle, cosine, rnd, SHAPES};
    use crate::llm::qgemm::tests::{rows_are_independent, vector_equals_scalar};
    use candle_core::{Device, Tensor};

    fn q6k(n: usize, k: usize, seed: u64) -> QTensor {
        let w = Tensor::new(rnd(n * k, seed), &Device::Cpu).unwrap().reshape((n, k)).unwrap();
        QTensor::quantize(&w, GgmlDType::Q6K).unwrap()
    }

    fn dense(q: &QTensor, x: &[f32], m: usize) -> Vec<f32> {
        let k = x.len() / m;
        let deq = q.dequantize(&Device::Cpu).unwrap();
        let x = Tensor::new(x, &Device::Cpu).unwrap().reshape((m, k)).unwrap();
        x.matmul(&deq.t().unwrap()).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn equals_the_dequantized_weight_within_int8_rounding() {
        for (m, n, k) in SHAPES {
            let w = q6k(n, k, 7 + n as u64);
            let x = rnd(m * k, 1 + m as u64);
            let cos = cosine(&PackedQ6K::new(&w).unwrap().matmul(&x, m), &dense(&w, &x, m));
            assert!(cos > 0.9999, "{m}x{n}x{k}: cosine {cos}");
        }
    }

    #[test]
    fn agrees_with_candles_q6k_matmul() {
        let w = q6k(64, 512, 3);
        agrees_with_candle(&PackedQ6K::new(&w).unwrap(), w, 3);
    }

    #[test]
    fn vector_kernel_equals_scalar_bit_for_bit() {
        for (m, n, k) in SHAPES {
            vector_equals_scalar(&PackedQ6K::new(&q6k(n, k, 5 + m as u64)).unwrap(), &rnd(m * k, 3 + k as u64), m);
        }
    }

    #[test]
    fn a_row_does_not_depend_on_the_rows_beside_it() {
        let (m, n, k) = (70, 96, 512);
        rows_are_independent(&PackedQ6K::new(&q6k(n, k, 13)).unwrap(), &rnd(m * k, 11), m);
    }

    #[test]
    fn repacking_keeps_every_weight() {
        let (n, k) = (40, 512);
        let w = q6k(n, k, 21);
        let p = PackedQ6K::new(&w).unwrap();
        let deq: Vec<f32> = w.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let blocks = k / QK;
        for c in 0..n {
            for i in 0..k {
                let tb = (c / TILE) * blocks + i / QK;
                let (cc, ii) = (c % TILE, i % QK);
                let v = p.packed_value(tb, cc, ii) - 32;
                let d = f16::from_bits(p.d[tb * TILE + cc]).to_f32();
                let sc = p.sc[tb * 16 * TILE + (ii / 16) * TILE + cc] as f32;
                let want = d * sc * v as f32;
                assert!((want - deq[c * k + i]).abs() <= 1e-6 * (1.0 + want.abs()), "({c}, {i}): {want} vs {}", deq[c * k + i]);
            }
        }
    }
}
