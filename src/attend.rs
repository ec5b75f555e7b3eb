//! Softmax attention on the CPU: the query heads that share a KV head over
//! their keys (the decoder's causal attention, streamed from its KV cache)
//! and all the queries of one short message and head (the encoder's).

use half::f16;

/// `out_g = softmax(scale * q_g . K) V` for the query heads `qs` that share
/// one KV head, over its first `n` positions: `keys` in blocks of 16
/// positions stored dimension-major (`[block][dim][16]`, at least `n` rounded
/// up to 32 positions: the cache's layout, [`crate::llm::kv::SeqCache`]),
/// `vals` one row of `d` per position, both f16 (widened to f32 as they are
/// read; all arithmetic is f32). `out` holds the heads' results one
/// after another (`d` each, overwritten); `p` is scratch.
///
/// Heads go in blocks of up to 8 (Qwen2.5's 6 or 7 per KV head in one), so
/// every key and value row is read once per block, not once per head. Scores
/// of 16 keys at a time are built up in vectors over the dimensions, with no
/// horizontal sum per key; every sum runs in one fixed order per key and per
/// output, so a token's result never depends on how many tokens were read
/// with it.
#[allow(clippy::too_many_arguments)]
pub fn query_group(qs: &[&[f32]], keys: &[f16], vals: &[f16], n: usize, scale: f32, p: &mut Vec<f32>, out: &mut [f32]) {
    let (g, d) = (qs.len(), out.len() / qs.len().max(1));
    assert!(qs.iter().all(|q| q.len() == d) && out.len() == g * d, "{g} queries of {d}");
    assert!(keys.len() >= n.next_multiple_of(2 * LANES) * d && vals.len() >= n * d, "keys and values of {n} positions");
    p.clear();
    p.resize(g * n, 0.0);
    let blocks = g.div_ceil(MAX_HEADS);
    for b in 0..blocks {
        let (h0, h1) = (b * g / blocks, (b + 1) * g / blocks);
        let (q, w, o) = (&qs[h0..h1], &mut p[h0 * n..h1 * n], &mut out[h0 * d..h1 * d]);
        macro_rules! heads {
            ($($h:literal)*) => {
                match h1 - h0 {
                    $($h => group::<$h>(q.try_into().expect("block size"), keys, vals, n, scale, w, o),)*
                    _ => unreachable!("blocks of 1 to {MAX_HEADS} heads"),
                }
            };
        }
        heads!(1 2 3 4 5 6 7 8);
    }
}

/// Query heads attended together (one block's accumulators for 2 x 16 keys
/// stay within the 32 vector registers).
const MAX_HEADS: usize = 8;

/// [`query_group`] for one block of `H` heads; `w` is its `H x n` scratch.
#[allow(clippy::too_many_arguments)]
fn group<const H: usize>(q: &[&[f32]; H], keys: &[f16], vals: &[f16], n: usize, scale: f32, w: &mut [f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::avx512f() {
        // SAFETY: AVX-512 F is present; the lengths were checked by `query_group`.
        unsafe { avx512::group(q, keys, vals, n, scale, w, out) };
        return;
    }
    portable_group(q, keys, vals, n, scale, w, out)
}

/// [`group`] without target features (the compiler vectorises what it can).
#[allow(clippy::too_many_arguments)]
fn portable_group<const H: usize>(q: &[&[f32]; H], keys: &[f16], vals: &[f16], n: usize, scale: f32, w: &mut [f32], out: &mut [f32]) {
    let d = out.len() / H;
    // Scores, 32 keys at a time: two blocks of 16 key lanes per head.
    for pair in 0..n.div_ceil(2 * LANES) {
        let kb = &keys[pair * 2 * LANES * d..][..2 * LANES * d];
        let (mut a, mut b) = ([[0f32; LANES]; H], [[0f32; LANES]; H]);
        for c in 0..d {
            let k0: [f32; LANES] = std::array::from_fn(|l| kb[c * LANES + l].to_f32());
            let k1: [f32; LANES] = std::array::from_fn(|l| kb[(d + c) * LANES + l].to_f32());
            for h in 0..H {
                let x = q[h][c];
                for l in 0..LANES {
                    a[h][l] = x.mul_add(k0[l], a[h][l]);
                    b[h][l] = x.mul_add(k1[l], b[h][l]);
                }
            }
        }
        let j0 = pair * 2 * LANES;
        let here = (n - j0).min(2 * LANES);
        for h in 0..H {
            let row = &mut w[h * n + j0..][..here];
            for (l, s) in row.iter_mut().enumerate() {
                *s = if l < LANES { a[h][l] } else { b[h][l - LANES] } * scale;
            }
        }
    }
    let inv = softmax_rows::<H>(w, n);
    // Weighted sum of values, 2 x 16 columns of every head at a time.
    let full = d - d % LANES;
    let mut cb = 0;
    while cb + 2 * LANES <= full {
        value_columns::<H, 2>(w, &inv, vals, d, n, cb, out);
        cb += 2 * LANES;
    }
    if cb < full {
        value_columns::<H, 1>(w, &inv, vals, d, n, cb, out);
    }
    value_tail(w, &inv, vals, n, full, out);
}

/// Each head's scores in `w` (`H` rows of `n`) turned into unnormalised
/// weights; returns 1 / each row's sum.
fn softmax_rows<const H: usize>(w: &mut [f32], n: usize) -> [f32; H] {
    let mut inv = [0f32; H];
    for (h, wh) in w.chunks_exact_mut(n).enumerate() {
        inv[h] = 1.0 / exp_shifted(wh, lane_max(wh));
    }
    inv
}

/// The columns past the last whole 16 (none for head widths of 64 or 128).
fn value_tail<const H: usize>(w: &[f32], inv: &[f32; H], vals: &[f16], n: usize, full: usize, out: &mut [f32]) {
    let d = out.len() / H;
    for h in 0..H {
        for col in full..d {
            let s = (0..n).fold(0f32, |s, j| w[h * n + j].mul_add(vals[j * d + col].to_f32(), s));
            out[h * d + col] = s * inv[h];
        }
    }
}

/// [`group`] in AVX-512 registers, with the same operations in the same order
/// (so the same results). Written out because the compiler's version of the
/// loops above kept the broadcast query in a register and loaded each key
/// vector again for every head: 18 loads per 12 FMAs made them load-bound at
/// about a third of the FMA rate. Here each key or value vector is loaded
/// once and used by every head, and a head block works on 3 or 4 vectors of
/// keys (or value columns) at once: at most 24 accumulators, the loaded
/// vectors and one broadcast stay within the 32 registers.
#[cfg(target_arch = "x86_64")]
// Accumulators indexed [head][vector] read as the loops they unroll into.
#[allow(clippy::needless_range_loop)]
mod avx512 {
    use super::LANES;
    use half::f16;
    use std::arch::x86_64::*;

    /// 16 f16 values from `p` as f32 (exact: every f16 is an f32).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn widen(p: *const f16) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
    }

    /// Vectors handled together for a block of `h` heads.
    const fn width(h: usize) -> usize {
        if h <= 6 {
            4
        } else {
            3
        }
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn group<const H: usize>(q: &[&[f32]; H], keys: &[f16], vals: &[f16], n: usize, scale: f32, w: &mut [f32], out: &mut [f32]) {
        let d = out.len() / H;
        let mut qp = [std::ptr::null::<f32>(); H];
        for h in 0..H {
            qp[h] = q[h].as_ptr();
        }
        // `keys` holds whole blocks of 16 positions past `n` (see `query_group`).
        let blocks = n.div_ceil(LANES);
        let mut b0 = 0;
        while b0 + width(H) <= blocks {
            if H <= 6 {
                scores::<H, 4>(&qp, keys, d, n, b0, scale, w);
            } else {
                scores::<H, 3>(&qp, keys, d, n, b0, scale, w);
            }
            b0 += width(H);
        }
        for b in b0..blocks {
            scores::<H, 1>(&qp, keys, d, n, b, scale, w);
        }
        let inv = super::softmax_rows::<H>(w, n);
        let full = d - d % LANES;
        let mut cb = 0;
        while cb + width(H) * LANES <= full {
            if H <= 6 {
                values::<H, 4>(w, &inv, vals, d, n, cb, out);
            } else {
                values::<H, 3>(w, &inv, vals, d, n, cb, out);
            }
            cb += width(H) * LANES;
        }
        while cb < full {
            values::<H, 1>(w, &inv, vals, d, n, cb, out);
            cb += LANES;
        }
        super::value_tail(w, &inv, vals, n, full, out);
    }

    /// Scaled scores of key blocks `b0 .. b0 + B` (16 positions each, stored
    /// `[block][dim][16]`) for `H` heads, into `w[h * n + position]`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn scores<const H: usize, const B: usize>(q: &[*const f32; H], keys: &[f16], d: usize, n: usize, b0: usize, scale: f32, w: &mut [f32]) {
        debug_assert!(keys.len() >= (b0 + B) * LANES * d);
        let base = keys.as_ptr().add(b0 * LANES * d);
        let mut acc = [[_mm512_setzero_ps(); B]; H];
        for c in 0..d {
            let mut k = [_mm512_setzero_ps(); B];
            for b in 0..B {
                k[b] = widen(base.add((b * d + c) * LANES));
            }
            for h in 0..H {
                let x = _mm512_set1_ps(*q[h].add(c));
                for b in 0..B {
                    acc[h][b] = _mm512_fmadd_ps(x, k[b], acc[h][b]);
                }
            }
        }
        let s = _mm512_set1_ps(scale);
        for b in 0..B {
            let j = (b0 + b) * LANES;
            if j >= n {
                break;
            }
            let mask: __mmask16 = if n - j >= LANES { 0xffff } else { (1u16 << (n - j)) - 1 };
            for h in 0..H {
                _mm512_mask_storeu_ps(w.as_mut_ptr().add(h * n + j), mask, _mm512_mul_ps(acc[h][b], s));
            }
        }
    }

    /// Columns `cb .. cb + 16 C` of `out_h = inv[h] * sum_j w[h][j] * V_j`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn values<const H: usize, const C: usize>(w: &[f32], inv: &[f32; H], vals: &[f16], d: usize, n: usize, cb: usize, out: &mut [f32]) {
        debug_assert!(vals.len() >= n * d && cb + C * LANES <= d && w.len() >= H * n);
        let mut acc = [[_mm512_setzero_ps(); C]; H];
        let (vp, wp) = (vals.as_ptr().add(cb), w.as_ptr());
        for j in 0..n {
            let mut v = [_mm512_setzero_ps(); C];
            for c in 0..C {
                v[c] = widen(vp.add(j * d + c * LANES));
            }
            for h in 0..H {
                let x = _mm512_set1_ps(*wp.add(h * n + j));
                for c in 0..C {
                    acc[h][c] = _mm512_fmadd_ps(x, v[c], acc[h][c]);
                }
            }
        }
        for h in 0..H {
            for c in 0..C {
                _mm512_storeu_ps(out.as_mut_ptr().add(h * d + cb + c * LANES), _mm512_mul_ps(acc[h][c], _mm512_set1_ps(inv[h])));
            }
        }
    }
}

/// Columns `cb .. cb + 16 C` of `out_h = inv[h] * sum_j w[h][j] * V_j`.
#[inline(always)]
fn value_columns<const H: usize, const C: usize>(w: &[f32], inv: &[f32; H], vals: &[f16], d: usize, n: usize, cb: usize, out: &mut [f32]) {
    let mut acc = [[[0f32; LANES]; C]; H];
    for j in 0..n {
        let v = &vals[j * d + cb..][..C * LANES];
        for h in 0..H {
            let x = w[h * n + j];
            for (k, a) in acc[h].iter_mut().enumerate() {
                for l in 0..LANES {
                    a[l] = x.mul_add(v[k * LANES + l].to_f32(), a[l]);
                }
            }
        }
    }
    for h in 0..H {
        for (k, a) in acc[h].iter().enumerate() {
            for (o, x) in out[h * d + cb + k * LANES..][..LANES].iter_mut().zip(a) {
                *o = x * inv[h];
            }
        }
    }
}

/// Self-attention of one message and one head: `rows` holds the message's
/// `len` packed QKV rows of `width` floats, the head's query, key and value at
/// column offsets `q`, `k` and `v`, `d` wide. Returns the `len x d` context.
///
/// With the encoder's 32-wide heads a dot product per key is mostly its
/// reduction, so the keys are transposed once and the scores of 4 queries x
/// 16 keys are built up column by column in registers; the weighted sum of
/// values likewise holds 4 queries x 16 columns. Four independent
/// accumulators hide the add latency a single chain would wait on.
#[allow(clippy::too_many_arguments)]
pub fn message_head(rows: &[f32], width: usize, len: usize, q: usize, k: usize, v: usize, d: usize, scale: f32) -> Vec<f32> {
    // Keys padded to whole vectors; padded scores are -inf, so weigh 0.
    let lp = len.next_multiple_of(LANES);
    let mut kt = vec![0f32; d * lp];
    for j in 0..len {
        for (c, &x) in rows[j * width + k..][..d].iter().enumerate() {
            kt[c * lp + j] = x;
        }
    }
    let mut out = vec![0f32; len * d];
    let mut s = vec![0f32; QUERIES * lp];
    for i0 in (0..len).step_by(QUERIES) {
        let here = (len - i0).min(QUERIES);
        // Past the last query the first is repeated, and its result dropped.
        let qs: [&[f32]; QUERIES] = std::array::from_fn(|r| &rows[(i0 + if r < here { r } else { 0 }) * width + q..][..d]);
        for jb in 0..lp / LANES {
            let (mut a0, mut a1, mut a2, mut a3) = ([0f32; LANES], [0f32; LANES], [0f32; LANES], [0f32; LANES]);
            for c in 0..d {
                let kc: &[f32; LANES] = kt[c * lp + jb * LANES..][..LANES].try_into().expect("16 lanes");
                let (q0, q1, q2, q3) = (qs[0][c], qs[1][c], qs[2][c], qs[3][c]);
                for l in 0..LANES {
                    a0[l] += q0 * kc[l];
                    a1[l] += q1 * kc[l];
                    a2[l] += q2 * kc[l];
                    a3[l] += q3 * kc[l];
                }
            }
            for (r, a) in [a0, a1, a2, a3].iter().enumerate() {
                for (o, x) in s[r * lp + jb * LANES..][..LANES].iter_mut().zip(a) {
                    *o = x * scale;
                }
            }
        }
        let mut inv = [0f32; QUERIES];
        for (r, sr) in s.chunks_exact_mut(lp).enumerate() {
            sr[len..].fill(f32::NEG_INFINITY);
            inv[r] = 1.0 / exp_shifted(sr, lane_max(sr));
        }
        let w: [&[f32]; QUERIES] = std::array::from_fn(|r| &s[r * lp..r * lp + len]);
        weighted_values(w, &inv, here, &rows[v..], width, d, &mut out[i0 * d..]);
    }
    out
}

/// `out_r = inv[r] * sum_j w[r][j] * V_j` for the first `here` of 4 rows of
/// weights, value row `j` at `vals[j * stride..]`, result `r` at
/// `out[r * d..]` (`d` = its width, overwritten). 4 rows x 16 columns are held
/// in registers across the keys: four independent chains rather than one
/// through memory.
fn weighted_values(w: [&[f32]; QUERIES], inv: &[f32], here: usize, vals: &[f32], stride: usize, d: usize, out: &mut [f32]) {
    let n = w[0].len();
    let full = d - d % LANES;
    for cb in (0..full).step_by(LANES) {
        let (mut a0, mut a1, mut a2, mut a3) = ([0f32; LANES], [0f32; LANES], [0f32; LANES], [0f32; LANES]);
        for j in 0..n {
            let vj: &[f32; LANES] = vals[j * stride + cb..][..LANES].try_into().expect("16 lanes");
            let (w0, w1, w2, w3) = (w[0][j], w[1][j], w[2][j], w[3][j]);
            for l in 0..LANES {
                a0[l] += w0 * vj[l];
                a1[l] += w1 * vj[l];
                a2[l] += w2 * vj[l];
                a3[l] += w3 * vj[l];
            }
        }
        for (r, a) in [a0, a1, a2, a3].iter().enumerate().take(here) {
            for (o, x) in out[r * d + cb..][..LANES].iter_mut().zip(a) {
                *o = x * inv[r];
            }
        }
    }
    for r in 0..here {
        let o = &mut out[r * d + full..(r + 1) * d];
        o.fill(0.0);
        for (j, &wj) in w[r].iter().enumerate() {
            let wj = wj * inv[r];
            o.iter_mut().zip(&vals[j * stride + full..j * stride + d]).for_each(|(a, &b)| *a += wj * b);
        }
    }
}

/// Queries attended together in `message_head`.
const QUERIES: usize = 4;

/// Lanes of the blocked loops: one 512-bit vector of f32.
const LANES: usize = 16;

/// The largest of `x`, 16 lanes at a time (a running `f32::max` stays scalar).
fn lane_max(x: &[f32]) -> f32 {
    let mut top = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder().iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for c in chunks {
        for l in 0..LANES {
            top[l] = if c[l] > top[l] { c[l] } else { top[l] };
        }
    }
    top.iter().copied().fold(tail, f32::max)
}

/// `x[i] = exp(x[i] - max)` in place; returns the sum (in 16 lanes, then a
/// tree). libm's scalar `expf` was a third of the cost of attending over
/// 1,024 tokens; this polynomial form vectorises. Relative error below 5e-7
/// for the arguments softmax gives it (at most 0).
fn exp_shifted(x: &mut [f32], max: f32) -> f32 {
    let mut acc = [0f32; 16];
    let mut chunks = x.chunks_exact_mut(16);
    for c in &mut chunks {
        for i in 0..16 {
            c[i] = exp(c[i] - max);
            acc[i] += c[i];
        }
    }
    let mut tail = 0f32;
    for v in chunks.into_remainder() {
        *v = exp(*v - max);
        tail += *v;
    }
    crate::cpu::lane_tree_sum(&acc) + tail
}

/// e^x for x <= 0 as 2^n * e^r, n = round(x log2 e), r = x - n ln 2 (ln 2
/// split in two so that r keeps its precision), e^r by its Taylor series to
/// degree 6; below -87 (under f32's normal range, nothing a softmax weight
/// can use) it gives 0.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let xc = x.max(-87.0);
    let n = (xc * std::f32::consts::LOG2_E).round_ties_even();
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, xc));
    let p = (1.0f32 / 720.0).mul_add(r, 1.0 / 120.0);
    let p = p.mul_add(r, 1.0 / 24.0);
    let p = p.mul_add(r, 1.0 / 6.0);
    let p = p.mul_add(r, 0.5);
    let p = p.mul_add(r, 1.0);
    let p = p.mul_add(r, 1.0);
    // 2^n from n's bits: adding 1.5 * 2^23 leaves n as the low bits of the
    // sum (n is in [-126, 126]); a saturating `as i32` would not vectorise.
    let n_bits = (n + 12_582_912.0).to_bits().wrapping_sub(0x4B40_0000);
    let y = p * f32::from_bits(n_bits.wrapping_add(127) << 23);
    // Zero below -87 (and for -inf) by a mask rather than a branch, which
    // kept the loop from vectorising.
    let keep = u32::from(x >= -87.0).wrapping_neg();
    f32::from_bits(y.to_bits() & keep)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX-512 kernel against the portable one, bit for bit: head blocks
    /// of every size, positions that end inside a block of 16 or fill it, head
    /// widths with and without a tail of columns.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_attention_equals_the_portable_loops_exactly() {
        if !crate::cpu::avx512f() {
            eprintln!("no AVX-512 F here: nothing to compare");
            return;
        }
        let mut seed = 0x2545_f491_u32;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed as f32 / u32::MAX as f32 - 0.5
        };
        fn both<const H: usize>(q: &[&[f32]], keys: &[f16], vals: &[f16], n: usize, d: usize) -> (Vec<f32>, Vec<f32>) {
            let q: &[&[f32]; H] = q.try_into().unwrap();
            let (mut w, mut a, mut b) = (vec![0f32; H * n], vec![0f32; H * d], vec![0f32; H * d]);
            portable_group(q, keys, vals, n, 0.125, &mut w, &mut a);
            // SAFETY: checked above that the CPU has AVX-512 F.
            unsafe { avx512::group(q, keys, vals, n, 0.125, &mut w, &mut b) };
            (a, b)
        }
        for d in [64, 128, 72] {
            for n in [1usize, 15, 16, 17, 33, 64, 100, 129] {
                let keys: Vec<f16> = (0..n.next_multiple_of(2 * LANES) * d).map(|_| f16::from_f32(rnd())).collect();
                let vals: Vec<f16> = (0..n * d).map(|_| f16::from_f32(rnd())).collect();
                let qs: Vec<Vec<f32>> = (0..MAX_HEADS).map(|_| (0..d).map(|_| rnd()).collect()).collect();
                let q: Vec<&[f32]> = qs.iter().map(|v| v.as_slice()).collect();
                macro_rules! heads {
                    ($($h:literal)*) => {$(
                        let (a, b) = both::<$h>(&q[..$h], &keys, &vals, n, d);
                        assert!(a.iter().all(|x| x.is_finite()), "{} heads, {n} keys, width {d}", $h);
                        assert_eq!(a, b, "{} heads, {n} keys, width {d}", $h);
                    )*};
                }
                heads!(1 2 3 4 5 6 7 8);
            }
        }
    }

    #[test]
    fn polynomial_exp_is_within_a_few_ulp_of_libm() {
        let mut worst = 0f32;
        for i in 0..=200_000 {
            let x = -100.0 * i as f32 / 200_000.0;
            let (ours, want) = (exp(x), x.exp());
            if x >= -87.0 {
                worst = worst.max(((ours - want) / want).abs());
            } else {
                assert_eq!(ours, 0.0, "e^{x}");
            }
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
    }
}
