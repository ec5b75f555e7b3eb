//! The MLP's gate, `silu(g) * u = g / (1 + e^-g) * u`, in one pass on the
//! pool's cores.
//!
//! It must give candle's numbers: its `silu` runs libm's `expf` and f32
//! arithmetic, and a vectorised f32 polynomial for `e^x`, as accurate on
//! average, moved the greedy choices of the small SmolLM2 model against
//! candle's stock model (`engine::llama_forward_matches_candles_stock_model`).
//! libm's scalar `expf` cost about 4 ns a value, 7% of a prompt pass. So the
//! AVX-512 path computes `e^x` in f64, 8 lanes at a time, about 10^-14
//! relative: rounded to f32 that is the correctly rounded `e^x`, which libm's
//! `expf` also is for all but 1 in 13,000 inputs (where it is a unit off,
//! within its documented 0.502 units), and the rest is the same f32
//! division and product. Unit tests hold both to that.

use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Values per task: a decode row of 8,960 is split in two, a prompt chunk's
/// millions spread over the whole pool.
const PAR: usize = 4096;

/// `silu(g) * u`, element by element.
pub fn swiglu(g: &[f32], u: &[f32]) -> candle_core::Result<Vec<f32>> {
    if g.len() != u.len() {
        candle_core::bail!("swiglu of {} gates and {} inputs", g.len(), u.len());
    }
    // Every value is written below, so the output is not zeroed first (a
    // prompt chunk's is 9 MB a layer).
    let mut out = Vec::with_capacity(g.len());
    let vector = crate::cpu::avx512f();
    let body = |o: &mut [MaybeUninit<f32>], g: &[f32], u: &[f32]| {
        #[cfg(target_arch = "x86_64")]
        if vector {
            // SAFETY: AVX-512 F checked at run time.
            return unsafe { avx512::swiglu(g, u, o) };
        }
        let _ = vector;
        scalar(g, u, o)
    };
    let spare = &mut out.spare_capacity_mut()[..g.len()];
    if spare.len() <= PAR {
        body(spare, g, u);
    } else {
        spare.par_chunks_mut(PAR).zip(g.par_chunks(PAR).zip(u.par_chunks(PAR))).for_each(|(o, (g, u))| body(o, g, u));
    }
    // SAFETY: the chunks cover the first `g.len()` values, and `body` writes
    // each value of its chunk.
    unsafe { out.set_len(g.len()) };
    Ok(out)
}

/// The reference: candle's `silu` formula with libm's `expf`.
fn scalar(g: &[f32], u: &[f32], out: &mut [MaybeUninit<f32>]) {
    for ((o, &x), &y) in out.iter_mut().zip(g).zip(u) {
        o.write(x / (1.0 + (-x).exp()) * y);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// 1/n! for n = 11 down to 2: Taylor's series of `e^r` for |r| <= ln 2 / 2
    /// (truncation below 10^-14 relative).
    const INV_FACT: [f64; 10] = {
        let mut c = [0f64; 10];
        let mut i = 0;
        while i < 10 {
            let n = 11 - i;
            let mut f = 1f64;
            let mut k = 2;
            while k <= n {
                f *= k as f64;
                k += 1;
            }
            c[i] = 1.0 / f;
            i += 1;
        }
        c
    };
    /// ln 2 in two parts, the first with its low 32 bits zero, so that
    /// `k * LN2_HI` is exact for the |k| <= 231 used here.
    const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
    const LN2_LO: f64 = std::f64::consts::LN_2 - LN2_HI;

    /// `e^z` of 8 lanes. `z` is clamped to [-160, 160], past the range where
    /// an f32 result is 0 or infinite, so 2^k stays a normal f64; a NaN
    /// stays NaN (`vmaxpd`/`vminpd` return their second operand when one is
    /// NaN, so `z` goes second).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn exp_pd(z: __m512d) -> __m512d {
        let z = _mm512_min_pd(_mm512_set1_pd(160.0), _mm512_max_pd(_mm512_set1_pd(-160.0), z));
        let k = _mm512_roundscale_pd::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_pd(z, _mm512_set1_pd(std::f64::consts::LOG2_E)));
        let r = _mm512_fnmadd_pd(k, _mm512_set1_pd(LN2_HI), z);
        let r = _mm512_fnmadd_pd(k, _mm512_set1_pd(LN2_LO), r);
        let mut p = _mm512_set1_pd(INV_FACT[0]);
        for &c in &INV_FACT[1..] {
            p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(c));
        }
        p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(1.0));
        p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(1.0));
        // 2^k from its exponent bits.
        let ki = _mm512_cvtepi32_epi64(_mm512_cvtpd_epi32(k));
        let two_k = _mm512_castsi512_pd(_mm512_slli_epi64::<52>(_mm512_add_epi64(ki, _mm512_set1_epi64(1023))));
        _mm512_mul_pd(p, two_k)
    }

    /// `e^x` of 16 f32 lanes, each the f64 result rounded to f32.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exp_ps(x: __m512) -> __m512 {
        let lo = _mm512_cvtpd_ps(exp_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(x))));
        let hi = _mm512_cvtpd_ps(exp_pd(_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(x))))));
        _mm512_castpd_ps(_mm512_insertf64x4::<1>(_mm512_castps_pd(_mm512_castps256_ps512(lo)), _mm256_castps_pd(hi)))
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn swiglu(g: &[f32], u: &[f32], out: &mut [std::mem::MaybeUninit<f32>]) {
        let n = out.len().min(g.len()).min(u.len());
        let one = _mm512_set1_ps(1.0);
        let mut i = 0;
        while i < n {
            let m: __mmask16 = if n - i >= 16 { 0xFFFF } else { (1u16 << (n - i)) - 1 };
            let x = _mm512_maskz_loadu_ps(m, g.as_ptr().add(i));
            let y = _mm512_maskz_loadu_ps(m, u.as_ptr().add(i));
            let e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), x));
            let o = _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(one, e)), y);
            _mm512_mask_storeu_ps(out.as_mut_ptr().add(i) as *mut f32, m, o);
            i += 16;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// f32 units in the last place between two finite values of one sign.
    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_exp_is_libms_expf_but_for_rare_last_bit_roundings() {
        if !crate::cpu::avx512f() {
            return;
        }
        // Every 61st f32 from -104 (below it e^x is 0 in f32) to 89 (above,
        // infinite), both signs: about 35 million inputs.
        let mut xs: Vec<f32> = (0u32..0x42b2_0000).step_by(61).map(f32::from_bits).collect();
        xs.extend((0u32..0x42d0_0000).step_by(61).map(|b| -f32::from_bits(b)));
        xs.extend([0.0, -0.0, 88.72, 88.73, -103.9, -104.0, 1e-30, -1e-30]);
        let mut diff = 0usize;
        for c in xs.chunks(16) {
            let mut lane = [0f32; 16];
            lane[..c.len()].copy_from_slice(c);
            let mut got = [0f32; 16];
            // SAFETY: AVX-512 F checked above.
            unsafe {
                use std::arch::x86_64::*;
                _mm512_storeu_ps(got.as_mut_ptr(), avx512::exp_ps(_mm512_loadu_ps(lane.as_ptr())));
            }
            for (&x, &e) in c.iter().zip(&got) {
                let want = x.exp();
                if e.to_bits() != want.to_bits() {
                    // Where the two differ, this one is e^x correctly
                    // rounded (from f64's exp) and libm's is a unit off.
                    let exact = (x as f64).exp() as f32;
                    assert!(e.to_bits() == exact.to_bits() && ulps(e, want) == 1, "e^{x}: {e} against libm's {want}, {exact} rounded from f64");
                    diff += 1;
                }
            }
        }
        // Seen: 2,805 of 36.7 million (libm's `expf` promises 0.502 units).
        assert!(diff * 5_000 < xs.len(), "{diff} of {} differ from libm", xs.len());
        // Beyond the range: libm's infinity and zero, and NaN through.
        for (x, want) in [(89.0f32, f32::INFINITY), (1e30, f32::INFINITY), (-105.0, 0.0), (-1e30, 0.0), (f32::NAN, f32::NAN)] {
            // SAFETY: as above.
            let got = unsafe {
                use std::arch::x86_64::*;
                let mut o = [0f32; 16];
                _mm512_storeu_ps(o.as_mut_ptr(), avx512::exp_ps(_mm512_set1_ps(x)));
                o[0]
            };
            assert!(got == want || (got.is_nan() && want.is_nan()), "e^{x}: {got}");
        }
    }

    #[test]
    fn swiglu_equals_candles_silu_times_input() {
        // Gates across the sigmoid's range, both tails and the infinities
        // included; long enough for the parallel path, short enough for the
        // serial one, and lengths that leave a partial vector.
        let n = (1 << 16) + 1003;
        let mut g: Vec<f32> = (0..n).map(|i| (i as f32 / n as f32 - 0.5) * 240.0).collect();
        g[..4].copy_from_slice(&[f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0]);
        let u: Vec<f32> = (0..n).map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0).collect();
        let dev = candle_core::Device::Cpu;
        for len in [n, 8960, 1000, 13] {
            let ours = swiglu(&g[..len], &u[..len]).unwrap();
            let gt = candle_core::Tensor::from_slice(&g[..len], len, &dev).unwrap();
            let ut = candle_core::Tensor::from_slice(&u[..len], len, &dev).unwrap();
            let want: Vec<f32> = (candle_nn::ops::silu(&gt).unwrap() * &ut).unwrap().to_vec1().unwrap();
            let mut differ = 0;
            for (i, (&a, &b)) in ours.iter().zip(&want).enumerate() {
                if a.to_bits() != b.to_bits() && !(a.is_nan() && b.is_nan()) {
                    assert!(a.is_finite() && ulps(a, b) <= 2, "{len} gates, {i}: {a} against {b}");
                    differ += 1;
                }
            }
            // Seen: 13 of 66,539, where libm's e^-g is a unit off.
            assert!(differ * 1_000 <= len, "{len} gates: {differ} differ");
        }
        assert!(swiglu(&g[..3], &u[..2]).is_err());
    }
}
