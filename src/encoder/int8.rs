//! Int8 dense layers for x86 CPUs with AVX-512 VNNI.
//!
//! Weights are quantised once, symmetrically per output column; activations
//! are quantised per row on the fly (so a row's result never depends on the
//! other rows of the batch). `vpdpbusd` multiplies 64 unsigned-by-signed byte
//! pairs per instruction, four times the multiply-adds of an f32 FMA, which
//! is what lets 2 cores outrun an f32 GEMM. Activations are stored as
//! `q + 128` (unsigned); the `128 * column sum` this adds is subtracted in the
//! epilogue, together with the scales, the bias and the optional GELU.

use super::bert::gelu_scalar;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape};
use rayon::prelude::*;

/// Columns per SIMD block (16 lanes of i32).
const LANES: usize = 16;
/// Column blocks per micro-kernel (4 x 16 = 64 columns, 16 accumulators with 4 rows).
const BLOCKS: usize = 4;
/// Rows per micro-kernel.
const ROWS: usize = 4;

pub struct QuantLinear {
    /// Inputs, and inputs rounded up to a multiple of 4.
    k: usize,
    kp: usize,
    /// Outputs, and outputs rounded up to a multiple of 64.
    n: usize,
    np: usize,
    /// `[np / 16][kp / 4][16][4]`: one 64-byte load feeds 16 columns x 4 inputs.
    packed: Vec<i8>,
    scale: Vec<f32>,
    col_sum: Vec<i32>,
    bias: Vec<f32>,
    gelu: bool,
}

impl QuantLinear {
    /// `w` is `n x k` row-major (one row per output), as stored by BERT.
    pub fn new(w: &[f32], bias: Vec<f32>, n: usize, k: usize, gelu: bool) -> Self {
        let kp = k.div_ceil(4) * 4;
        let np = n.div_ceil(LANES * BLOCKS) * LANES * BLOCKS;
        let mut packed = vec![0i8; np * kp];
        let mut scale = vec![0f32; np];
        let mut col_sum = vec![0i32; np];
        for c in 0..n {
            let row = &w[c * k..(c + 1) * k];
            let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            let s = if max > 0.0 { max / 127.0 } else { 1.0 };
            scale[c] = s;
            let (blk, lane) = (c / LANES, c % LANES);
            for (i, &v) in row.iter().enumerate() {
                let q = (v / s).round_ties_even().clamp(-127.0, 127.0) as i8;
                col_sum[c] += q as i32;
                packed[blk * kp * LANES + (i / 4) * LANES * 4 + lane * 4 + i % 4] = q;
            }
        }
        let mut b = bias;
        b.resize(np, 0.0);
        Self { k, kp, n, np, packed, scale, col_sum, bias: b, gelu }
    }

    /// `x` is `m x k` row-major; returns `m x n`.
    pub fn forward(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (k, kp) = (self.k, self.kp);
        let mp = m.div_ceil(ROWS) * ROWS;
        // Per-row quantisation; padding reads as zero (128 - 128).
        let mut qa = vec![128u8; mp * kp];
        let mut row_scale = vec![0f32; mp];
        qa.par_chunks_mut(kp).zip(row_scale.par_iter_mut()).take(m).enumerate().for_each(|(r, (q, s))| {
            let row = &x[r * k..(r + 1) * k];
            let max = row.iter().fold(0f32, |a, v| a.max(v.abs()));
            *s = if max > 0.0 { max / 127.0 } else { 1.0 };
            let inv = 1.0 / *s;
            // Ties to even maps to one vector instruction; |v * inv| <= 127 by construction.
            for (o, &v) in q.iter_mut().zip(row) {
                *o = ((v * inv).round_ties_even() + 128.0) as u8;
            }
        });
        let mut out = vec![0f32; m * self.n];
        // Each task: ROWS rows, all columns.
        out.par_chunks_mut(ROWS * self.n).enumerate().for_each(|(t, dst)| {
            let r0 = t * ROWS;
            let rows = dst.len() / self.n;
            let mut acc = vec![0i32; ROWS * self.np];
            // SAFETY: `supported()` was checked when the layer was built; the
            // slices hold ROWS rows of kp bytes and np columns of kp bytes.
            unsafe { kernel(&qa[r0 * kp..(r0 + ROWS) * kp], &self.packed, kp, self.np, &mut acc) };
            for r in 0..rows {
                let s = row_scale[r0 + r];
                let out_row = &mut dst[r * self.n..(r + 1) * self.n];
                let acc_row = &acc[r * self.np..r * self.np + self.n];
                // Two straight loops, so each vectorises.
                let cols = out_row.iter_mut().zip(acc_row).zip(&self.col_sum[..self.n]).zip(&self.scale[..self.n]).zip(&self.bias[..self.n]);
                for ((((o, &a), &cs), &sc), &b) in cols {
                    *o = (a - 128 * cs) as f32 * (s * sc) + b;
                }
                if self.gelu {
                    out_row.iter_mut().for_each(|v| *v = gelu_scalar(*v));
                }
            }
        });
        out
    }
}

/// `acc[r][c] = sum_i a[r][i] * w[i][c]` for ROWS rows and all np columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn kernel(a: &[u8], packed: &[i8], kp: usize, np: usize, acc: &mut [i32]) {
    use std::arch::x86_64::*;
    let k4 = kp / 4;
    for g in 0..np / (LANES * BLOCKS) {
        let mut c = [[_mm512_setzero_si512(); BLOCKS]; ROWS];
        let base = packed.as_ptr().add(g * BLOCKS * kp * LANES);
        for step in 0..k4 {
            let mut w = [_mm512_setzero_si512(); BLOCKS];
            for (b, wb) in w.iter_mut().enumerate() {
                *wb = _mm512_loadu_si512(base.add(b * kp * LANES + step * LANES * 4) as *const __m512i);
            }
            for (r, cr) in c.iter_mut().enumerate() {
                let four = (a.as_ptr().add(r * kp + step * 4) as *const i32).read_unaligned();
                let av = _mm512_set1_epi32(four);
                for (b, cb) in cr.iter_mut().enumerate() {
                    *cb = _mm512_dpbusd_epi32(*cb, av, w[b]);
                }
            }
        }
        for (r, cr) in c.iter().enumerate() {
            for (b, cb) in cr.iter().enumerate() {
                _mm512_storeu_si512(acc.as_mut_ptr().add(r * np + (g * BLOCKS + b) * LANES) as *mut __m512i, *cb);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel(_: &[u8], _: &[i8], _: usize, _: usize, _: &mut [i32]) {
    unreachable!("int8 layers are only built where supported() is true")
}

impl CustomOp1 for QuantLinear {
    fn name(&self) -> &'static str {
        "palaver-int8-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(v) = storage else { candle_core::bail!("int8 linear: f32 input only") };
        let Some((a, b)) = layout.contiguous_offsets() else { candle_core::bail!("int8 linear: contiguous input only") };
        let dims = layout.shape().dims();
        let k = *dims.last().unwrap_or(&0);
        if k != self.k {
            candle_core::bail!("int8 linear: input width {k}, expected {}", self.k);
        }
        let m = (b - a) / k;
        let out = self.forward(&v[a..b], m);
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("rank >= 1") = self.n;
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rnd(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
            })
            .collect()
    }

    #[test]
    fn int8_matches_f32_within_quantisation_error() {
        if !crate::cpu::avx512_vnni() {
            eprintln!("no AVX-512 VNNI here; int8 layers are not used on this CPU");
            return;
        }
        // Odd sizes exercise the padding of rows, inputs and columns.
        let (m, k, n) = (7usize, 70usize, 100usize);
        let (x, w, bias) = (rnd(m * k, 1), rnd(n * k, 2), rnd(n, 3));
        let q = QuantLinear::new(&w, bias.clone(), n, k, false);
        let got = q.forward(&x, m);
        let mut worst = 0f32;
        for r in 0..m {
            for c in 0..n {
                let want: f32 = (0..k).map(|i| x[r * k + i] * w[c * k + i]).sum::<f32>() + bias[c];
                worst = worst.max((got[r * n + c] - want).abs());
            }
        }
        // Inputs in [-0.5, 0.5]: each product carries ~0.5/127 relative error at most.
        assert!(worst < 0.02, "max abs error {worst}");
        // A row's result does not depend on the other rows.
        let alone = q.forward(&x[3 * k..4 * k], 1);
        assert_eq!(alone, got[3 * n..4 * n].to_vec());
    }
}
