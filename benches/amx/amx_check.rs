//! The kernels of `src/llm/amx.rs` against scalar references on an emulated CPU with AMX,
//! for machines without it (run.sh). Freestanding: prints on port 0xE9,
//! which Bochs copies to its output. Compiled for baseline x86-64, so that
//! only the kernel itself uses AVX-512 and AMX.
#![no_std]
use core::arch::asm;
use core::fmt::Write;

#[path = "../../src/llm/amx.rs"]
mod amx;

struct E9;
impl Write for E9 {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for b in s.bytes() { unsafe { asm!("out dx, al", in("dx") 0xe9u16, in("al") b) } }
        Ok(())
    }
}
#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! { let _ = writeln!(E9, "PANIC {info}"); loop { unsafe { asm!("cli; hlt") } } }

struct Rng(u64);
impl Rng { fn next(&mut self) -> u64 { self.0 ^= self.0 << 13; self.0 ^= self.0 >> 7; self.0 ^= self.0 << 17; self.0 } fn below(&mut self, n: u64) -> u64 { self.next() % n } }

/// IEEE half to single precision, exactly (subnormals included).
fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31; let e = ((h >> 10) & 0x1f) as u32; let m = (h & 0x3ff) as u32;
    let bits = if e == 0 { if m == 0 { sign } else { let mut e2 = 127 - 15 + 1; let mut m2 = m; while m2 & 0x400 == 0 { m2 <<= 1; e2 -= 1; } sign | ((e2 as u32) << 23) | ((m2 & 0x3ff) << 13) } }
        else if e == 31 { sign | 0x7f80_0000 | (m << 13) } else { sign | ((e + 127 - 15) << 23) | (m << 13) };
    f32::from_bits(bits)
}
#[target_feature(enable = "fma")]
unsafe fn fma(a: f32, b: f32, c: f32) -> f32 {
    use core::arch::x86_64::*;
    _mm_cvtss_f32(_mm_fmadd_ss(_mm_set_ss(a), _mm_set_ss(b), _mm_set_ss(c)))
}

/// How many of the first `rows` rows of `OUT` (row stride `ldo`, 40 columns
/// written as NaN beforehand) differ from `reference` in their first `cols`
/// columns, bit for bit, or were written past them.
unsafe fn differing(rows: usize, cols: usize, ldo: usize, reference: impl Fn(usize, usize) -> f32) -> usize {
    let mut bad = 0;
    for r in 0..rows { for c in 0..40 {
        let got = (*(&raw const OUT))[r * ldo + c];
        let ok = if c < cols { reference(r, c).to_bits() == got.to_bits() } else { got.is_nan() };
        if !ok { bad += 1; }
    } }
    bad
}

static mut X: [i8; 16 * 512] = [0; 16 * 512];
static mut XS: [f32; 16 * 16] = [0.0; 256];
static mut XO: [i32; 16 * 16] = [0; 256];
static mut W: [u8; 512 * 32] = [0; 512 * 32];
static mut S: [u16; 16 * 32] = [0; 512];
static mut OUT: [f32; 16 * 40] = [0.0; 640];
static mut QS: [u8; 4 * 4096] = [0; 4 * 4096];
static mut SC: [u8; 4 * 256] = [0; 4 * 256];
static mut MN: [u8; 4 * 256] = [0; 4 * 256];
static mut D: [u16; 4 * 32] = [0; 128];
static mut DMIN: [u16; 4 * 32] = [0; 128];
static mut XS4: [i32; 16 * 16] = [0; 256];
static mut QH: [u8; 2 * 2048] = [0; 4096];
static mut S16: [i32; 16 * 2 * 16] = [0; 512];

#[no_mangle]
pub extern "C" fn kmain() {
    let mut rng = Rng(0x9e3779b97f4a7c15);
    let (mut cases, mut bad_cases) = (0, 0);
    unsafe {
        let (x, xs, xo, w, s, out) = (&raw mut X, &raw mut XS, &raw mut XO, &raw mut W, &raw mut S, &raw mut OUT);
        for _ in 0..40 {
            let rows = 1 + rng.below(16) as usize;
            let k = 32 * (1 + rng.below(16) as usize);
            let cols = 1 + rng.below(32) as usize;
            let ldo = 40;
            let blocks = k / 32;
            for r in 0..rows { for b in 0..blocks {
                let mut sum = 0i32;
                for i in 0..32 { let v = rng.below(255) as i32 - 127; (*x)[r * k + b * 32 + i] = v as i8; sum += v; }
                (*xo)[r * blocks + b] = -128 * sum;
                (*xs)[r * blocks + b] = (rng.below(1 << 20) as f32 + 1.0) * 1e-7;
            } }
            for i in 0..k * 32 { (*w)[i] = rng.below(256) as u8; }
            for i in 0..blocks * 32 { (*s)[i] = 0x1000 + rng.below(0x3000) as u16; } // finite, normal f16
            for v in (*out).iter_mut() { *v = f32::NAN; }
            amx::q8_0_tile((*x).as_ptr(), k, rows, (*xs).as_ptr(), (*xo).as_ptr(), (*w).as_ptr(), (*s).as_ptr(), (*out).as_mut_ptr(), ldo, cols);
            let bad = differing(rows, cols, ldo, |r, c| {
                let mut f = 0f32;
                for b in 0..blocks {
                    let mut acc = (*xo)[r * blocks + b];
                    for i in 0..32 { acc += (*x)[r * k + b * 32 + i] as i32 * (*w)[(b * 8 + i / 4) * 128 + c * 4 + i % 4] as i32; }
                    f = fma(acc as f32, f16_to_f32((*s)[b * 32 + c]) * (*xs)[r * blocks + b], f);
                }
                f
            });
            cases += 1;
            if bad > 0 { bad_cases += 1; let _ = writeln!(E9, "rows {rows} k {k} cols {cols}: {bad} values differ"); }
        }
    }
    let _ = writeln!(E9, "AMX q8_0_tile against the scalar reference: {cases} random shapes, {bad_cases} with differences");
    let (cases4, bad4) = unsafe { q4_k(&mut rng) };
    let _ = writeln!(E9, "AMX q4_k_tile against the scalar reference: {cases4} random shapes, {bad4} with differences");
    let (cases6, bad6) = unsafe { q6_k(&mut rng) };
    let _ = writeln!(E9, "AMX q6_k_tile against the scalar reference: {cases6} random shapes, {bad6} with differences");
}

/// A random shape for the k-quant kernels (rows, super-blocks, inputs,
/// columns), its activations in `X`.
unsafe fn super_block_case(rng: &mut Rng) -> (usize, usize, usize, usize) {
    let rows = 1 + rng.below(16) as usize;
    let blocks = 1 + rng.below(2) as usize;
    let cols = 1 + rng.below(32) as usize;
    let x = &raw mut X;
    for i in 0..rows * blocks * 256 { (*x)[i] = (rng.below(255) as i32 - 127) as i8; }
    (rows, blocks, 256 * blocks, cols)
}

/// `q6_k_tile` against the arithmetic of `PackedQ6K::scalar_row`, on random
/// packed arrays: up to 2 super-blocks.
unsafe fn q6_k(rng: &mut Rng) -> (usize, usize) {
    let (x, xd, sums16, ql, qh, sc, d, out) = (&raw mut X, &raw mut XS, &raw mut S16, &raw mut QS, &raw mut QH, &raw mut SC, &raw mut D, &raw mut OUT);
    let (mut cases, mut bad_cases) = (0, 0);
    for _ in 0..24 {
        let (rows, blocks, k, cols) = super_block_case(rng);
        let ldo = 40;
        for r in 0..rows { for b in 0..blocks {
            for j in 0..16 { (*sums16)[(r * blocks + b) * 16 + j] = (0..16).map(|i| (*x)[r * k + b * 256 + j * 16 + i] as i32).sum(); }
            (*xd)[r * blocks + b] = (rng.below(1 << 20) as f32 + 1.0) * 1e-7;
        } }
        for i in 0..blocks * 4096 { (*ql)[i] = rng.below(256) as u8; }
        for i in 0..blocks * 2048 { (*qh)[i] = rng.below(256) as u8; }
        for i in 0..blocks * 512 { (*sc)[i] = rng.below(256) as u8; }
        for i in 0..blocks * 32 { (*d)[i] = 0x1000 + rng.below(0x3000) as u16; }
        for v in (*out).iter_mut() { *v = f32::NAN; }
        amx::q6_k_tile((*x).as_ptr(), k, rows, (*xd).as_ptr(), (*sums16).as_ptr(), (*ql).as_ptr(), (*qh).as_ptr(), (*sc).as_ptr() as *const i8, (*d).as_ptr(), (*out).as_mut_ptr(), ldo, cols);
        let bad = differing(rows, cols, ldo, |r, c| {
            let mut f = 0f32;
            for b in 0..blocks {
                let mut isum = 0i32;
                for j in 0..16 {
                    let mut acc = -32 * (*sums16)[(r * blocks + b) * 16 + j];
                    for i in j * 16..j * 16 + 16 {
                        let (g, o) = (i / 8, i % 8);
                        let byte = (*ql)[b * 4096 + (g * 32 + c) * 4 + o % 4];
                        let low = if o < 4 { byte & 0xF } else { byte >> 4 };
                        let high = ((*qh)[b * 2048 + (j * 32 + c) * 4 + o % 4] >> (2 * ((i % 16) / 4))) & 3;
                        acc += (low | (high << 4)) as i32 * (*x)[r * k + b * 256 + i] as i32;
                    }
                    isum += acc * (*sc)[b * 512 + j * 32 + c] as i8 as i32;
                }
                f = fma(isum as f32, f16_to_f32((*d)[b * 32 + c]) * (*xd)[r * blocks + b], f);
            }
            f
        });
        cases += 1;
        if bad > 0 { bad_cases += 1; let _ = writeln!(E9, "q6_k rows {rows} k {k} cols {cols}: {bad} values differ"); }
    }
    (cases, bad_cases)
}

/// `q4_k_tile` against the arithmetic of `PackedQ4K::scalar_row`, on random
/// packed arrays: up to 4 super-blocks.
unsafe fn q4_k(rng: &mut Rng) -> (usize, usize) {
    let (x, xd, xsums, qs, sc, mn, d, dmin, out) = (&raw mut X, &raw mut XS, &raw mut XS4, &raw mut QS, &raw mut SC, &raw mut MN, &raw mut D, &raw mut DMIN, &raw mut OUT);
    let (mut cases, mut bad_cases) = (0, 0);
    for _ in 0..24 {
        let (rows, blocks, k, cols) = super_block_case(rng);
        let ldo = 40;
        for r in 0..rows { for b in 0..blocks {
            for p in 0..4 {
                let sum = |h: usize| (0..32).map(|i| (*x)[r * k + b * 256 + p * 64 + h * 32 + i] as i32).sum::<i32>();
                (*xsums)[(r * blocks + b) * 4 + p] = (sum(0) as i16 as u16 as i32) | ((sum(1) as i16 as u16 as i32) << 16);
            }
            (*xd)[r * blocks + b] = (rng.below(1 << 20) as f32 + 1.0) * 1e-7;
        } }
        for i in 0..blocks * 4096 { (*qs)[i] = rng.below(256) as u8; }
        for i in 0..blocks * 256 { (*sc)[i] = rng.below(64) as u8; (*mn)[i] = rng.below(64) as u8; }
        for i in 0..blocks * 32 { (*d)[i] = 0x1000 + rng.below(0x3000) as u16; (*dmin)[i] = 0x1000 + rng.below(0x3000) as u16; }
        for v in (*out).iter_mut() { *v = f32::NAN; }
        amx::q4_k_tile((*x).as_ptr(), k, rows, (*xd).as_ptr(), (*xsums).as_ptr(), (*qs).as_ptr(), (*sc).as_ptr(), (*mn).as_ptr(), (*d).as_ptr(), (*dmin).as_ptr(), (*out).as_mut_ptr(), ldo, cols);
        let bad = differing(rows, cols, ldo, |r, c| {
            let mut f = 0f32;
            for b in 0..blocks {
                let (mut isum, mut msum) = (0i32, 0i32);
                for j in 0..8 {
                    let mut acc = 0i32;
                    for i in 0..32 {
                        let (g, o) = ((j * 32 + i) / 8, i % 8);
                        let byte = (*qs)[b * 4096 + (g * 32 + c) * 4 + o % 4];
                        let q = if o < 4 { byte & 0xF } else { byte >> 4 };
                        acc += q as i32 * (*x)[r * k + b * 256 + j * 32 + i] as i32;
                    }
                    isum += acc * (*sc)[b * 256 + j * 32 + c] as i32;
                    let pair = (*xsums)[(r * blocks + b) * 4 + j / 2];
                    let s = if j % 2 == 0 { pair as i16 } else { (pair >> 16) as i16 };
                    msum += s as i32 * (*mn)[b * 256 + (j / 2) * 64 + c * 2 + j % 2] as i32;
                }
                let dx = (*xd)[r * blocks + b];
                f = fma(isum as f32, f16_to_f32((*d)[b * 32 + c]) * dx, f);
                f = fma(-(msum as f32), f16_to_f32((*dmin)[b * 32 + c]) * dx, f);
            }
            f
        });
        cases += 1;
        if bad > 0 { bad_cases += 1; let _ = writeln!(E9, "q4_k rows {rows} k {k} cols {cols}: {bad} values differ"); }
    }
    (cases, bad_cases)
}
