//! AMX tiles for the Q8_0 GEMM of [`super::qgemm`] and the Q4_K and Q6_K
//! weights of [`super::q4k`] and [`super::q6k`]: up to 16 input rows by a
//! tile of 32 output columns per call, block by block. The Q8_0 kernel is
//! described here; `q4_k_tile` and `q6_k_tile` say how theirs differ.
//!
//! One `tdpbsud` multiplies 16 rows by 16 columns over a whole block of 32
//! inputs (signed activations by the weights' unsigned `q + 128`), where
//! `vpdpbusd` does one row by 16 columns over 4 inputs. The weights need no
//! repacking: a block of a packed tile is `[8 groups of 4 inputs][32 columns][4]`,
//! which read with a stride of 128 bytes is the tile layout AMX wants (K/4
//! rows of 16 columns x 4 bytes), one half of the columns at a time.
//!
//! Scales differ per block, so each block's integer sums leave the tiles and
//! take the same steps as in the VNNI kernel and the scalar reference: add
//! the activation's `-128 * Σx`, convert, `f = fma(float(acc), d_w * d_x, f)`.
//! Integer sums are exact in any order, so the results are bit-identical to
//! theirs (tested where AMX runs, and under an emulator: BENCHMARKS.md).
//!
//! Only `core` is used, so that the same file can be built into a
//! freestanding test for an emulated CPU (`benches/amx/`).

use core::arch::asm;
use core::arch::x86_64::*;

/// Inputs per quantization block.
const BLOCK: usize = 32;
/// Output columns per packed tile.
const TILE: usize = 32;
/// Most rows per call: a tile register holds 16 rows.
pub const ROWS: usize = 16;
/// Fewest rows worth tiles: below this a pass is bound by reading the
/// weights, which tiles do not make faster.
pub const MIN_ROWS: usize = 8;

/// `rows` split into calls of at most [`ROWS`]: (first row, rows).
pub fn chunks(rows: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..rows).step_by(ROWS).map(move |r| (r, ROWS.min(rows - r)))
}

/// Tile register configuration (palette 1), 64 bytes as `ldtilecfg` reads it.
#[repr(C, align(64))]
struct Config([u8; 64]);

impl Config {
    /// tmm0, tmm1: sums (rows x 16 i32); tmm2: activations (rows x `depth`
    /// i8); tmm3, tmm4: weights of columns 0-15 and 16-31 (`depth / 4` x 64 u8).
    fn new(rows: usize, depth: usize) -> Self {
        let mut c = [0u8; 64];
        c[0] = 1;
        let shapes = [(rows, 64), (rows, 64), (rows, depth), (depth / 4, 64), (depth / 4, 64)];
        for (t, (r, bytes)) in shapes.into_iter().enumerate() {
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&(bytes as u16).to_le_bytes());
            c[48 + t] = r as u8;
        }
        Self(c)
    }
}

/// One block of inputs (32, or 16 for Q6_K: the `depth` of [`Config::new`]):
/// the activations at `x` (tmm2, row stride `k`)
/// times the weights of columns 0-15 at `w0` and 16-31 at `w1` (tmm3 and
/// tmm4, row stride `ws`), the sums stored as `sums[..16]` and `sums[16..]`.
///
/// # Safety
/// Tiles configured by [`Config::new`]; pointers valid for the tiles' rows.
#[inline(always)]
unsafe fn products(x: *const i8, k: usize, w0: *const u8, w1: *const u8, ws: usize, sums: &mut [[i32; 16]; 2 * ROWS]) {
    asm!(
        "tilezero tmm0",
        "tilezero tmm1",
        "tileloadd tmm2, [{x} + {k}*1]",
        "tileloadd tmm3, [{w0} + {ws}*1]",
        "tileloadd tmm4, [{w1} + {ws}*1]",
        "tdpbsud tmm0, tmm2, tmm3",
        "tdpbsud tmm1, tmm2, tmm4",
        "tilestored [{lo} + {ss}*1], tmm0",
        "tilestored [{hi} + {ss}*1], tmm1",
        x = in(reg) x,
        k = in(reg) k,
        w0 = in(reg) w0,
        w1 = in(reg) w1,
        ws = in(reg) ws,
        lo = in(reg) sums.as_mut_ptr(),
        hi = in(reg) sums.as_mut_ptr().add(ROWS),
        ss = in(reg) 64usize,
        options(nostack),
    );
}

/// `rows` (at most [`ROWS`]) input rows times one packed tile, written into
/// `out` (row stride `ldo`, first `cols` columns).
///
/// - `x`: the rows' int8 activations, row stride `k`;
/// - `xs`, `xo`: their per-block scales and `-128 * Σx`, row stride `k / 32`;
/// - `w`, `s`: the tile's packed weights and f16 scales (`[block][32]`).
///
/// # Safety
/// AMX-TILE and AMX-INT8 usable by this thread (see `crate::cpu::amx`) and
/// AVX-512 F present; every pointer valid for the sizes above.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
pub unsafe fn q8_0_tile(
    x: *const i8,
    k: usize,
    rows: usize,
    xs: *const f32,
    xo: *const i32,
    w: *const u8,
    s: *const u16,
    out: *mut f32,
    ldo: usize,
    cols: usize,
) {
    debug_assert!((1..=ROWS).contains(&rows) && k.is_multiple_of(BLOCK) && cols <= TILE);
    let blocks = k / BLOCK;
    let cfg = Config::new(rows, BLOCK);
    let mut sums = [[0i32; 16]; 2 * ROWS];
    let mut f = [[_mm512_setzero_ps(); 2]; ROWS];
    asm!("ldtilecfg [{0}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
    for b in 0..blocks {
        let wb = w.add(b * BLOCK * TILE);
        products(x.add(b * BLOCK), k, wb, wb.add(64), TILE * 4, &mut sums);
        let s0 = _mm512_cvtph_ps(_mm256_loadu_si256(s.add(b * TILE) as *const __m256i));
        let s1 = _mm512_cvtph_ps(_mm256_loadu_si256(s.add(b * TILE + 16) as *const __m256i));
        for (i, fi) in f.iter_mut().enumerate().take(rows) {
            let o = _mm512_set1_epi32(*xo.add(i * blocks + b));
            let a0 = _mm512_add_epi32(o, _mm512_loadu_si512(sums[i].as_ptr() as *const __m512i));
            let a1 = _mm512_add_epi32(o, _mm512_loadu_si512(sums[ROWS + i].as_ptr() as *const __m512i));
            let dx = _mm512_set1_ps(*xs.add(i * blocks + b));
            fi[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a0), _mm512_mul_ps(s0, dx), fi[0]);
            fi[1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a1), _mm512_mul_ps(s1, dx), fi[1]);
        }
    }
    asm!("tilerelease", options(nostack, nomem));
    store_rows(&f[..rows], out, ldo, cols);
}

/// Writes rows of a 32-column tile's results (row stride `ldo`), their first
/// `cols` columns only. The VNNI kernels use it too; it lives here because
/// this file must build without `std`.
///
/// # Safety
/// AVX-512 F present; `out` valid for `f.len()` rows of `cols` floats.
#[target_feature(enable = "avx512f")]
pub unsafe fn store_rows(f: &[[__m512; 2]], out: *mut f32, ldo: usize, cols: usize) {
    let m0: __mmask16 = if cols >= 16 { 0xffff } else { ((1u32 << cols) - 1) as u16 };
    let m1: __mmask16 = if cols >= 32 { 0xffff } else if cols > 16 { ((1u32 << (cols - 16)) - 1) as u16 } else { 0 };
    for (i, fi) in f.iter().enumerate() {
        _mm512_mask_storeu_ps(out.add(i * ldo), m0, fi[0]);
        _mm512_mask_storeu_ps(out.add(i * ldo + 16), m1, fi[1]);
    }
}

/// Q4_K: `rows` (at most [`ROWS`]) input rows times one packed tile of
/// `super::q4k::PackedQ4K`, through exactly the integer and float steps of
/// its VNNI kernel.
///
/// Per sub-block of 32 inputs the nibbles are unpacked to bytes in AMX's
/// layout (row `2g` the low nibbles of group `g`, row `2g+1` the high ones,
/// which are inputs `8g..8g+3` and `8g+4..8g+7`), one `tdpbsud` per half tile
/// gives the sub-block's dot products, and each is multiplied by its 6-bit
/// scale into the super-block's integer sum. The minimums' sum takes the
/// VNNI kernel's `vpdpwssd`.
///
/// - `x`: int8 activations, row stride `k`; `xd`: one scale per 256 inputs
///   and `xsums`: four i16 pairs of 32-input sums per 256, row stride `k / 256`
///   (and `4 k / 256`);
/// - `qs`, `sc`, `mn`, `d`, `dmin`: the tile's packed arrays from its first
///   super-block.
///
/// # Safety
/// AMX usable by this thread, AVX-512 F, BW and VNNI present; every pointer
/// valid for the sizes above.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub unsafe fn q4_k_tile(
    x: *const i8,
    k: usize,
    rows: usize,
    xd: *const f32,
    xsums: *const i32,
    qs: *const u8,
    sc: *const u8,
    mn: *const u8,
    d: *const u16,
    dmin: *const u16,
    out: *mut f32,
    ldo: usize,
    cols: usize,
) {
    const QK: usize = 256;
    debug_assert!((1..=ROWS).contains(&rows) && k.is_multiple_of(QK) && cols <= TILE);
    let blocks = k / QK;
    let cfg = Config::new(rows, BLOCK);
    let low = _mm512_set1_epi8(0xF);
    // [sub-block][half][8 rows][64 bytes] of unpacked nibbles.
    let mut unpacked = [[[[0u8; 64]; BLOCK / 4]; 2]; 8];
    let mut sums = [[0i32; 16]; 2 * ROWS];
    let mut f = [[_mm512_setzero_ps(); 2]; ROWS];
    asm!("ldtilecfg [{0}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
    for b in 0..blocks {
        let (qs, sc, mn) = (qs.add(b * TILE * QK / 2), sc.add(b * 8 * TILE), mn.add(b * 8 * TILE));
        for (j, sub) in unpacked.iter_mut().enumerate() {
            for g in 0..4 {
                for (h, half) in sub.iter_mut().enumerate() {
                    let v = _mm512_loadu_si512(qs.add((j * 4 + g) * TILE * 4 + h * 64) as *const __m512i);
                    _mm512_storeu_si512(half[2 * g].as_mut_ptr() as *mut __m512i, _mm512_and_si512(v, low));
                    _mm512_storeu_si512(half[2 * g + 1].as_mut_ptr() as *mut __m512i, _mm512_and_si512(_mm512_srli_epi16(v, 4), low));
                }
            }
        }
        let mut isum = [[_mm512_setzero_si512(); 2]; ROWS];
        for (j, sub) in unpacked.iter().enumerate() {
            products(x.add(b * QK + j * BLOCK), k, sub[0].as_ptr() as *const u8, sub[1].as_ptr() as *const u8, 64, &mut sums);
            let s0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(sc.add(j * TILE) as *const __m128i));
            let s1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(sc.add(j * TILE + 16) as *const __m128i));
            for (i, acc) in isum.iter_mut().enumerate().take(rows) {
                let a0 = _mm512_loadu_si512(sums[i].as_ptr() as *const __m512i);
                let a1 = _mm512_loadu_si512(sums[ROWS + i].as_ptr() as *const __m512i);
                acc[0] = _mm512_add_epi32(acc[0], _mm512_mullo_epi32(a0, s0));
                acc[1] = _mm512_add_epi32(acc[1], _mm512_mullo_epi32(a1, s1));
            }
        }
        let mut msum = [[_mm512_setzero_si512(); 2]; ROWS];
        for p in 0..4 {
            let m0 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(mn.add(p * TILE * 2) as *const __m256i));
            let m1 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(mn.add(p * TILE * 2 + 32) as *const __m256i));
            for (i, acc) in msum.iter_mut().enumerate().take(rows) {
                let s = _mm512_set1_epi32(*xsums.add((i * blocks + b) * 4 + p));
                acc[0] = _mm512_dpwssd_epi32(acc[0], m0, s);
                acc[1] = _mm512_dpwssd_epi32(acc[1], m1, s);
            }
        }
        let d0 = _mm512_cvtph_ps(_mm256_loadu_si256(d.add(b * TILE) as *const __m256i));
        let d1 = _mm512_cvtph_ps(_mm256_loadu_si256(d.add(b * TILE + 16) as *const __m256i));
        let e0 = _mm512_cvtph_ps(_mm256_loadu_si256(dmin.add(b * TILE) as *const __m256i));
        let e1 = _mm512_cvtph_ps(_mm256_loadu_si256(dmin.add(b * TILE + 16) as *const __m256i));
        for (i, fi) in f.iter_mut().enumerate().take(rows) {
            let dx = _mm512_set1_ps(*xd.add(i * blocks + b));
            fi[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[i][0]), _mm512_mul_ps(d0, dx), fi[0]);
            fi[1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[i][1]), _mm512_mul_ps(d1, dx), fi[1]);
            fi[0] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(msum[i][0]), _mm512_mul_ps(e0, dx), fi[0]);
            fi[1] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(msum[i][1]), _mm512_mul_ps(e1, dx), fi[1]);
        }
    }
    asm!("tilerelease", options(nostack, nomem));
    store_rows(&f[..rows], out, ldo, cols);
}

/// The 6-bit values of Q6_K sub-block `j`, columns `16v..16v+15`, of a
/// packed super-block (`ql`, `qh` at its start): vector `p` holds inputs
/// `16j+4p..16j+4p+3` of each column, as `vpdpbusd` and AMX's weight rows
/// both want them. Shared with the VNNI kernel of `super::q6k`.
///
/// # Safety
/// AVX-512 F present (inlined into callers that enable it); the pointers
/// valid for one packed super-block.
#[inline(always)]
pub unsafe fn q6_values(ql: *const u8, qh: *const u8, j: usize, v: usize) -> [__m512i; 4] {
    /// `(a & 0xF) | (h & 0x30)`: A | (B & C) in one `vpternlogd` after the mask.
    #[inline(always)]
    unsafe fn six(a: __m512i, h: __m512i) -> __m512i {
        _mm512_ternarylogic_epi32(_mm512_and_si512(a, _mm512_set1_epi8(0xF)), h, _mm512_set1_epi8(0x30), 0xF8)
    }
    let n0 = _mm512_loadu_si512(ql.add((2 * j * TILE + 16 * v) * 4) as *const __m512i);
    let n1 = _mm512_loadu_si512(ql.add(((2 * j + 1) * TILE + 16 * v) * 4) as *const __m512i);
    let h = _mm512_loadu_si512(qh.add((j * TILE + 16 * v) * 4) as *const __m512i);
    [
        six(n0, _mm512_slli_epi16(h, 4)),
        six(_mm512_srli_epi16(n0, 4), _mm512_slli_epi16(h, 2)),
        six(n1, h),
        six(_mm512_srli_epi16(n1, 4), _mm512_srli_epi16(h, 2)),
    ]
}

/// Q6_K: `rows` (at most [`ROWS`]) input rows times one packed tile of
/// `super::q6k::PackedQ6K`, through exactly the integer and float steps of
/// its VNNI kernel.
///
/// Q6_K's scales cover 16 inputs, so the tiles are configured 16 deep: per
/// sub-block the 6-bit values are assembled in AMX's layout (row `p` holds
/// inputs `4p..4p+3` of each column, the VNNI kernel's four vectors), one
/// `tdpbsud` per half tile gives the dot products, and each, offset by
/// `-32 * Σx`, is multiplied by its signed scale into the super-block's sum.
///
/// - `x`: int8 activations, row stride `k`; `xd`: one scale per 256 inputs,
///   row stride `k / 256`; `sums16`: the sums of each 16, row stride `k / 16`;
/// - `ql`, `qh`, `sc`, `d`: the tile's packed arrays from its first super-block.
///
/// # Safety
/// AMX usable by this thread, AVX-512 F and BW present; every pointer valid
/// for the sizes above.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn q6_k_tile(
    x: *const i8,
    k: usize,
    rows: usize,
    xd: *const f32,
    sums16: *const i32,
    ql: *const u8,
    qh: *const u8,
    sc: *const i8,
    d: *const u16,
    out: *mut f32,
    ldo: usize,
    cols: usize,
) {
    const QK: usize = 256;
    const SUB: usize = 16;
    debug_assert!((1..=ROWS).contains(&rows) && k.is_multiple_of(QK) && cols <= TILE);
    let blocks = k / QK;
    let cfg = Config::new(rows, SUB);
    // [sub-block][half][4 rows][64 bytes] of 6-bit values.
    let mut values = [[[[0u8; 64]; SUB / 4]; 2]; QK / SUB];
    let mut sums = [[0i32; 16]; 2 * ROWS];
    let mut f = [[_mm512_setzero_ps(); 2]; ROWS];
    asm!("ldtilecfg [{0}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
    for b in 0..blocks {
        let (ql, qh, sc) = (ql.add(b * TILE * QK / 2), qh.add(b * TILE * QK / 4), sc.add(b * SUB * TILE));
        for (j, sub) in values.iter_mut().enumerate() {
            for (v, half) in sub.iter_mut().enumerate() {
                let q = q6_values(ql, qh, j, v);
                for (row, qp) in half.iter_mut().zip(q) {
                    _mm512_storeu_si512(row.as_mut_ptr() as *mut __m512i, qp);
                }
            }
        }
        let mut isum = [[_mm512_setzero_si512(); 2]; ROWS];
        for (j, sub) in values.iter().enumerate() {
            products(x.add(b * QK + j * SUB), k, sub[0].as_ptr() as *const u8, sub[1].as_ptr() as *const u8, 64, &mut sums);
            let s0 = _mm512_cvtepi8_epi32(_mm_loadu_si128(sc.add(j * TILE) as *const __m128i));
            let s1 = _mm512_cvtepi8_epi32(_mm_loadu_si128(sc.add(j * TILE + 16) as *const __m128i));
            for (i, acc) in isum.iter_mut().enumerate().take(rows) {
                let o = _mm512_set1_epi32(-32 * *sums16.add((i * blocks + b) * SUB + j));
                let a0 = _mm512_add_epi32(o, _mm512_loadu_si512(sums[i].as_ptr() as *const __m512i));
                let a1 = _mm512_add_epi32(o, _mm512_loadu_si512(sums[ROWS + i].as_ptr() as *const __m512i));
                acc[0] = _mm512_add_epi32(acc[0], _mm512_mullo_epi32(a0, s0));
                acc[1] = _mm512_add_epi32(acc[1], _mm512_mullo_epi32(a1, s1));
            }
        }
        let d0 = _mm512_cvtph_ps(_mm256_loadu_si256(d.add(b * TILE) as *const __m256i));
        let d1 = _mm512_cvtph_ps(_mm256_loadu_si256(d.add(b * TILE + 16) as *const __m256i));
        for (i, fi) in f.iter_mut().enumerate().take(rows) {
            let dx = _mm512_set1_ps(*xd.add(i * blocks + b));
            fi[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[i][0]), _mm512_mul_ps(d0, dx), fi[0]);
            fi[1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[i][1]), _mm512_mul_ps(d1, dx), fi[1]);
        }
    }
    asm!("tilerelease", options(nostack, nomem));
    store_rows(&f[..rows], out, ldo, cols);
}
