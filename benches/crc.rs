//! Guard-checksum throughput, one core, per protection interval: guardblk's SIMD CRCs against
//! ISA-L (the speed anchor, linked here only — never in the daemon) and the `crc` crate's table
//! implementation; and memcpy against guardblk's fused copy + guard.
//!
//!     cargo bench --bench crc [-- --seconds S]
//!
//! Bookworm's ISA-L (2.30) has no CRC-64/NVME (crc64_rocksoft came later), so the 64-bit row
//! is anchored on ISA-L's crc64_ecma_refl: the same reflected 64-bit folding, another polynomial.
//!
//! Rows, each at 512 B and 4 KiB intervals over a 64 KiB (L2-resident) buffer:
//! - generate: compute each interval's guard;
//! - verify: compute it and compare with a stored guard (as a read would);
//! - copy: memcpy of each interval to a destination buffer (the anchor for target 2), the
//!   same copy as one 64 KiB memcpy (reference), guardblk's fused copy+guard per interval,
//!   and copy-then-guard in two passes (reference);
//! - guard + change digest (zero-copy PI writes): the one-pass CRC-16 + CRC-64 kernel against
//!   the two CRCs back to back, and two cheaper non-CRC 64-bit digests tried here only (NH
//!   with vpmuludq, and a CLHASH-style carry-less NH), never used by the daemon.
//!
//! Rows marked "crc-fast" are the portable path (what CPUs without AVX-512 used before the
//! AVX2 kernels). `--issue-rates` instead measures this CPU's clock and the issue rate and
//! latency of the instructions the kernels are made of (docs/ROOFLINE.md uses them).

use std::hint::black_box;
use std::time::{Duration, Instant};

use guardblk::integrity::guard::{
    copy_crc16_t10dif, copy_crc16_t10dif_x2, copy_crc64_nvme, copy_crc64_nvme_x2, copy_with_guards,
    crc16_t10dif, crc16_t10dif_and_crc64_nvme, crc64_nvme, implementation, portable,
};

#[link(name = "isal")]
extern "C" {
    #[link_name = "crc16_t10dif"]
    fn isal_crc16_t10dif(init: u16, buf: *const u8, len: u64) -> u16;
    #[link_name = "crc64_ecma_refl"]
    fn isal_crc64_ecma_refl(init: u64, buf: *const u8, len: u64) -> u64;
}

fn isal16(b: &[u8]) -> u16 {
    // SAFETY: ISA-L reads exactly `len` bytes from `buf`, which the slice provides.
    unsafe { isal_crc16_t10dif(0, b.as_ptr(), b.len() as u64) }
}

fn isal64(b: &[u8]) -> u64 {
    // SAFETY: as above.
    unsafe { isal_crc64_ecma_refl(0, b.as_ptr(), b.len() as u64) }
}

const CRC16_TABLE: crc::Crc<u16, crc::Table<16>> =
    crc::Crc::<u16, crc::Table<16>>::new(&crc::CRC_16_T10_DIF);
const CRC64_TABLE: crc::Crc<u64, crc::Table<16>> =
    crc::Crc::<u64, crc::Table<16>>::new(&crc::CRC_64_NVME);

/// GB/s of `f` applied to every interval of a 64 KiB (L2-resident) buffer, best of 5 slices.
fn rate(seconds: f64, buf: &[u8], interval: usize, mut f: impl FnMut(&[u8])) -> f64 {
    let slice = Duration::from_secs_f64(seconds / 5.0);
    let mut best = 0.0f64;
    for _ in 0..5 {
        let start = Instant::now();
        let mut bytes = 0u64;
        while start.elapsed() < slice {
            for chunk in buf.chunks_exact(interval) {
                f(black_box(chunk));
            }
            bytes += buf.len() as u64;
        }
        best = best.max(bytes as f64 / start.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// Offset of `chunk` inside `buf`.
fn offset(buf: &[u8], chunk: &[u8]) -> usize {
    chunk.as_ptr() as usize - buf.as_ptr() as usize
}

/// GB/s of verifying every interval: compute its guard with `g`, compare with the stored one.
fn verify<G: PartialEq>(seconds: f64, buf: &[u8], n: usize, g: impl Fn(&[u8]) -> G) -> f64 {
    let want: Vec<G> = buf.chunks_exact(n).map(&g).collect();
    let mut bad = 0u64;
    let r = rate(seconds, buf, n, |c| {
        bad += (g(c) != want[offset(buf, c) / n]) as u64;
    });
    assert_eq!(black_box(bad), 0, "verify found a mismatch");
    r
}

/// Cheaper 64-bit change digests than CRC-64, measured here only (not in the product). Both
/// are keyed universal hashes: the guest never sees the key, so it cannot aim a change at a
/// collision. `data.len()` must be a multiple of 128 and `key` at least `data.len() + 32`
/// bytes long.
#[cfg(target_arch = "x86_64")]
mod digest {
    use std::arch::x86_64::*;

    /// NH (UMAC's inner hash) with two keys offset by 16 bytes (Toeplitz), 4 × 2 lanes of
    /// `sum (m_2i + k_2i)·(m_2i+1 + k_2i+1) mod 2^64`: one vpmuludq per 32 bytes per key.
    ///
    /// # Safety
    /// AVX2 must be available.
    #[target_feature(enable = "avx2")]
    pub unsafe fn nh2(key: &[u8], data: &[u8]) -> u64 {
        assert!(data.len().is_multiple_of(128) && key.len() >= data.len() + 32);
        let ld = |p: &[u8], off: usize| -> __m256i {
            // SAFETY: off + 32 <= p.len() by the asserts above.
            unsafe { _mm256_loadu_si256(p.as_ptr().add(off) as *const _) }
        };
        let z = _mm256_setzero_si256();
        let mut acc = [z; 4];
        for off in (0..data.len()).step_by(64) {
            for j in 0..2 {
                let m = ld(data, off + 32 * j);
                let t1 = _mm256_add_epi32(m, ld(key, off + 32 * j));
                let t2 = _mm256_add_epi32(m, ld(key, off + 32 * j + 16));
                let p1 = _mm256_mul_epu32(t1, _mm256_srli_epi64(t1, 32));
                let p2 = _mm256_mul_epu32(t2, _mm256_srli_epi64(t2, 32));
                acc[j] = _mm256_add_epi64(acc[j], p1);
                acc[2 + j] = _mm256_add_epi64(acc[2 + j], p2);
            }
        }
        let sum = |v: __m256i| -> u64 {
            let mut l = [0u64; 4];
            // SAFETY: l is 32 bytes.
            unsafe { _mm256_storeu_si256(l.as_mut_ptr() as *mut _, v) };
            l.iter().fold(0u64, |a, &x| a.wrapping_add(x))
        };
        let (h1, h2) = (
            sum(_mm256_add_epi64(acc[0], acc[1])),
            sum(_mm256_add_epi64(acc[2], acc[3])),
        );
        h1 ^ h2.rotate_left(32)
    }

    /// CLHASH-style carry-less NH: per 16-byte lane, `(m_lo ^ k_lo) ⊗ (m_hi ^ k_hi)`, xored
    /// into four ymm accumulators: one ymm clmul per 32 bytes (CRC folding needs two). The
    /// final reduction to 64 bits (one Barrett, as in the CRCs) is left out: a constant.
    ///
    /// # Safety
    /// AVX2 and VPCLMULQDQ must be available.
    #[target_feature(enable = "avx2,vpclmulqdq")]
    pub unsafe fn clnh(key: &[u8], data: &[u8]) -> u64 {
        assert!(data.len().is_multiple_of(128) && key.len() >= data.len() + 32);
        let ld = |p: &[u8], off: usize| -> __m256i {
            // SAFETY: off + 32 <= p.len() by the asserts above.
            unsafe { _mm256_loadu_si256(p.as_ptr().add(off) as *const _) }
        };
        let z = _mm256_setzero_si256();
        let mut acc = [z; 4];
        for off in (0..data.len()).step_by(128) {
            for (j, a) in acc.iter_mut().enumerate() {
                let x = _mm256_xor_si256(ld(data, off + 32 * j), ld(key, off + 32 * j));
                *a = _mm256_xor_si256(*a, _mm256_clmulepi64_epi128(x, x, 0x01));
            }
        }
        let v = _mm256_xor_si256(
            _mm256_xor_si256(acc[0], acc[1]),
            _mm256_xor_si256(acc[2], acc[3]),
        );
        let mut l = [0u64; 4];
        // SAFETY: l is 32 bytes.
        unsafe { _mm256_storeu_si256(l.as_mut_ptr() as *mut _, v) };
        l[0] ^ l[1] ^ l[2] ^ l[3]
    }
}

/// `--issue-rates`: this core's clock (a chain of dependent adds, one per cycle) and the
/// throughput (12 independent chains) and latency (one chain) of the kernels' instructions.
#[cfg(target_arch = "x86_64")]
mod issue {
    use std::time::Instant;

    const N: u64 = 20_000_000;

    /// `n` × 120 instances of `$op ymmR, ymmR, ymm15[, imm]` over 12 registers R: with
    /// `indep` 12 independent chains (throughput), else all on ymm0 (latency). Inline asm,
    /// so the compiler can neither fold nor schedule them away.
    macro_rules! asm_loop {
        ($name:ident, $op:literal, $imm:literal, indep) => {
            asm_loop!(@ $name, $op, $imm, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
        };
        ($name:ident, $op:literal, $imm:literal, chain) => {
            asm_loop!(@ $name, $op, $imm, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        };
        (@ $name:ident, $op:literal, $imm:literal, [$($r:literal),*]) => {
            #[target_feature(enable = "avx2,vpclmulqdq")]
            fn $name(n: u64) {
                // SAFETY: register-only arithmetic on clobbered vector registers; the
                // features are enabled on this function and checked by the caller.
                unsafe {
                    std::arch::asm!(
                        "vpxor xmm15, xmm15, xmm15",
                        "2:",
                        ".rept 10",
                        $(concat!($op, " ymm", $r, ", ymm", $r, ", ymm15", $imm),)*
                        ".endr",
                        "sub {n}, 1",
                        "jnz 2b",
                        n = inout(reg) n => _,
                        out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _,
                        out("ymm4") _, out("ymm5") _, out("ymm6") _, out("ymm7") _,
                        out("ymm8") _, out("ymm9") _, out("ymm10") _, out("ymm11") _,
                        out("ymm15") _,
                        options(nomem, nostack),
                    );
                }
            }
        };
    }
    /// As `asm_loop`, on zmm registers (AVX-512), for the zmm kernels' instructions and the
    /// candidates for other mixes (GFNI affine transforms, ternary logic).
    macro_rules! asm_loop_zmm {
        ($name:ident, $op:literal, $imm:literal, $features:literal, indep) => {
            asm_loop_zmm!(@ $name, $op, $imm, $features, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
        };
        ($name:ident, $op:literal, $imm:literal, $features:literal, chain) => {
            asm_loop_zmm!(@ $name, $op, $imm, $features, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        };
        (@ $name:ident, $op:literal, $imm:literal, $features:literal, [$($r:literal),*]) => {
            #[target_feature(enable = $features)]
            fn $name(n: u64) {
                // SAFETY: register-only arithmetic on clobbered vector registers; the
                // features are enabled on this function and checked by the caller.
                unsafe {
                    std::arch::asm!(
                        "vpxorq zmm15, zmm15, zmm15",
                        "2:",
                        ".rept 10",
                        $(concat!($op, " zmm", $r, ", zmm", $r, ", zmm15", $imm),)*
                        ".endr",
                        "sub {n}, 1",
                        "jnz 2b",
                        n = inout(reg) n => _,
                        out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _,
                        out("zmm4") _, out("zmm5") _, out("zmm6") _, out("zmm7") _,
                        out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _,
                        out("zmm15") _,
                        options(nomem, nostack),
                    );
                }
            }
        };
    }
    /// Two instructions alternated over 12 independent registers: whether they issue on
    /// different ports (the pair's rate is the sum of each one's alone) or share one.
    macro_rules! asm_pair_zmm {
        ($name:ident, $a:literal, $ai:literal, $b:literal, $bi:literal) => {
            #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,vpclmulqdq,gfni")]
            fn $name(n: u64) {
                // SAFETY: as in `asm_loop_zmm`.
                unsafe {
                    std::arch::asm!(
                        "vpxorq zmm15, zmm15, zmm15",
                        "2:",
                        ".rept 10",
                        concat!($a, " zmm0, zmm0, zmm15", $ai), concat!($b, " zmm1, zmm1, zmm15", $bi),
                        concat!($a, " zmm2, zmm2, zmm15", $ai), concat!($b, " zmm3, zmm3, zmm15", $bi),
                        concat!($a, " zmm4, zmm4, zmm15", $ai), concat!($b, " zmm5, zmm5, zmm15", $bi),
                        concat!($a, " zmm6, zmm6, zmm15", $ai), concat!($b, " zmm7, zmm7, zmm15", $bi),
                        concat!($a, " zmm8, zmm8, zmm15", $ai), concat!($b, " zmm9, zmm9, zmm15", $bi),
                        concat!($a, " zmm10, zmm10, zmm15", $ai), concat!($b, " zmm11, zmm11, zmm15", $bi),
                        ".endr",
                        "sub {n}, 1",
                        "jnz 2b",
                        n = inout(reg) n => _,
                        out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _,
                        out("zmm4") _, out("zmm5") _, out("zmm6") _, out("zmm7") _,
                        out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _,
                        out("zmm15") _,
                        options(nomem, nostack),
                    );
                }
            }
        };
    }
    asm_pair_zmm!(
        clmul_affine_zmm,
        "vpclmulqdq",
        ", 0",
        "vgf2p8affineqb",
        ", 0"
    );
    asm_pair_zmm!(clmul_permb_zmm, "vpclmulqdq", ", 0", "vpermi2b", "");
    asm_pair_zmm!(affine_permb_zmm, "vgf2p8affineqb", ", 0", "vpermi2b", "");
    asm_pair_zmm!(
        clmul_ternlog_zmm,
        "vpclmulqdq",
        ", 0",
        "vpternlogq",
        ", 0x96"
    );
    asm_pair_zmm!(affine_shufb_zmm, "vgf2p8affineqb", ", 0", "vpshufb", "");

    const ZMM: &str = "avx512f,avx512bw,vpclmulqdq,gfni";
    asm_loop_zmm!(
        clmul_zmm,
        "vpclmulqdq",
        ", 0",
        "avx512f,avx512bw,vpclmulqdq,gfni",
        indep
    );
    asm_loop_zmm!(
        clmul_zmm_chain,
        "vpclmulqdq",
        ", 0",
        "avx512f,avx512bw,vpclmulqdq,gfni",
        chain
    );
    asm_loop_zmm!(
        ternlog_zmm,
        "vpternlogq",
        ", 0x96",
        "avx512f,avx512bw,vpclmulqdq,gfni",
        indep
    );
    asm_loop_zmm!(
        xor_zmm,
        "vpxorq",
        "",
        "avx512f,avx512bw,vpclmulqdq,gfni",
        indep
    );
    asm_loop_zmm!(
        shufb_zmm,
        "vpshufb",
        "",
        "avx512f,avx512bw,vpclmulqdq,gfni",
        indep
    );
    asm_loop_zmm!(
        permb_zmm,
        "vpermi2b",
        "",
        "avx512f,avx512bw,avx512vbmi,vpclmulqdq,gfni",
        indep
    );
    asm_loop_zmm!(
        affine_zmm,
        "vgf2p8affineqb",
        ", 0",
        "avx512f,avx512bw,vpclmulqdq,gfni",
        indep
    );
    asm_loop_zmm!(
        affine_zmm_chain,
        "vgf2p8affineqb",
        ", 0",
        "avx512f,avx512bw,vpclmulqdq,gfni",
        chain
    );
    asm_loop_zmm!(
        gfmul_zmm,
        "vgf2p8mulb",
        "",
        "avx512f,avx512bw,vpclmulqdq,gfni",
        indep
    );

    asm_loop!(clmul_ymm, "vpclmulqdq", ", 0", indep);
    asm_loop!(clmul_ymm_chain, "vpclmulqdq", ", 0", chain);
    asm_loop!(muludq_ymm, "vpmuludq", "", indep);
    asm_loop!(shufb_ymm, "vpshufb", "", indep);
    asm_loop!(xor_ymm, "vpxor", "", indep);

    #[target_feature(enable = "pclmulqdq")]
    fn clmul_xmm(n: u64) {
        // SAFETY: as in `asm_loop`.
        unsafe {
            std::arch::asm!(
                "2:",
                ".rept 10",
                "vpclmulqdq xmm0, xmm0, xmm15, 0", "vpclmulqdq xmm1, xmm1, xmm15, 0",
                "vpclmulqdq xmm2, xmm2, xmm15, 0", "vpclmulqdq xmm3, xmm3, xmm15, 0",
                "vpclmulqdq xmm4, xmm4, xmm15, 0", "vpclmulqdq xmm5, xmm5, xmm15, 0",
                "vpclmulqdq xmm6, xmm6, xmm15, 0", "vpclmulqdq xmm7, xmm7, xmm15, 0",
                "vpclmulqdq xmm8, xmm8, xmm15, 0", "vpclmulqdq xmm9, xmm9, xmm15, 0",
                "vpclmulqdq xmm10, xmm10, xmm15, 0", "vpclmulqdq xmm11, xmm11, xmm15, 0",
                ".endr",
                "sub {n}, 1",
                "jnz 2b",
                n = inout(reg) n => _,
                out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _,
                out("xmm4") _, out("xmm5") _, out("xmm6") _, out("xmm7") _,
                out("xmm8") _, out("xmm9") _, out("xmm10") _, out("xmm11") _,
                out("xmm15") _,
                options(nomem, nostack),
            );
        }
    }

    fn per_ns(ops: u64, f: impl FnOnce()) -> f64 {
        let t = Instant::now();
        f();
        ops as f64 / t.elapsed().as_secs_f64() / 1e9
    }

    /// Core clock in GHz right now: a chain of dependent adds retires one per cycle (on a
    /// shared machine this drops when another thread runs on the same core).
    pub fn clock_ghz() -> f64 {
        per_ns(N * 100, || {
            // SAFETY: plain register arithmetic; no memory is touched.
            unsafe {
                std::arch::asm!("2:", ".rept 100", "add {x}, 1", ".endr", "sub {n}, 1", "jnz 2b",
                    x = inout(reg) 0u64 => _, n = inout(reg) N => _, options(nomem, nostack));
            }
        })
    }

    pub fn run() {
        let ghz = clock_ghz();
        println!("clock (dependent add chain)           {ghz:>6.2} GHz");
        let row = |name: &str, r: f64| {
            println!("{name:<38} {:>6.2} /ns  {:>5.2} /cycle", r, r / ghz);
        };
        if !std::is_x86_feature_detected!("avx2") || !std::is_x86_feature_detected!("vpclmulqdq") {
            println!("no AVX2 + VPCLMULQDQ here");
            return;
        }
        // pclmulqdq is implied by vpclmulqdq on every CPU that has it.
        let ops = N * 120;
        row(
            "vpclmulqdq ymm, independent",
            // SAFETY: the features this kernel enables (AVX2, VPCLMULQDQ) were detected above.
            per_ns(ops, || unsafe { clmul_ymm(N) }),
        );
        // SAFETY: the features this kernel enables (AVX2, VPCLMULQDQ) were detected above.
        let lat = per_ns(ops, || unsafe { clmul_ymm_chain(N) });
        println!(
            "{:<38} {:>6.2} ns   {:>5.2} cycles",
            "vpclmulqdq ymm, latency",
            1.0 / lat,
            ghz / lat
        );
        row(
            "pclmulqdq xmm, independent",
            // SAFETY: the features this kernel enables (AVX2, VPCLMULQDQ) were detected above.
            per_ns(ops, || unsafe { clmul_xmm(N) }),
        );
        row(
            "vpmuludq ymm, independent",
            // SAFETY: the features this kernel enables (AVX2, VPCLMULQDQ) were detected above.
            per_ns(ops, || unsafe { muludq_ymm(N) }),
        );
        row(
            "vpshufb ymm, independent",
            // SAFETY: the features this kernel enables (AVX2, VPCLMULQDQ) were detected above.
            per_ns(ops, || unsafe { shufb_ymm(N) }),
        );
        row(
            "vpxor ymm, independent",
            // SAFETY: the features this kernel enables (AVX2, VPCLMULQDQ) were detected above.
            per_ns(ops, || unsafe { xor_ymm(N) }),
        );
        let zmm = ZMM.split(',').all(|f| match f {
            "avx512f" => std::is_x86_feature_detected!("avx512f"),
            "avx512bw" => std::is_x86_feature_detected!("avx512bw"),
            "vpclmulqdq" => std::is_x86_feature_detected!("vpclmulqdq"),
            "gfni" => std::is_x86_feature_detected!("gfni"),
            _ => false,
        });
        if !zmm {
            println!("no AVX-512 + VPCLMULQDQ + GFNI here: zmm rates skipped");
            return;
        }
        type Loop = unsafe fn(u64);
        let zmm_rows: [(&str, Loop); 7] = [
            ("vpclmulqdq zmm, independent", clmul_zmm),
            ("vpternlogq zmm, independent", ternlog_zmm),
            ("vpxorq zmm, independent", xor_zmm),
            ("vpshufb zmm, independent", shufb_zmm),
            ("vgf2p8affineqb zmm, independent", affine_zmm),
            ("vgf2p8mulb zmm, independent", gfmul_zmm),
            ("vpclmulqdq zmm, latency", clmul_zmm_chain),
        ];
        for (name, f) in zmm_rows {
            // SAFETY: AVX-512F/BW, VPCLMULQDQ and GFNI were detected above.
            let r = per_ns(ops, || unsafe { f(N) });
            if name.ends_with("latency") {
                println!("{name:<38} {:>6.2} ns   {:>5.2} cycles", 1.0 / r, ghz / r);
            } else {
                row(name, r);
            }
        }
        // SAFETY: as above.
        let lat = per_ns(ops, || unsafe { affine_zmm_chain(N) });
        println!(
            "{:<38} {:>6.2} ns   {:>5.2} cycles",
            "vgf2p8affineqb zmm, latency",
            1.0 / lat,
            ghz / lat
        );
        if std::is_x86_feature_detected!("avx512vbmi") {
            // SAFETY: AVX-512 VBMI was just detected, the rest above.
            row(
                "vpermi2b zmm, independent",
                per_ns(ops, || unsafe { permb_zmm(N) }),
            );
            let pairs: [(&str, Loop); 5] = [
                ("vpclmulqdq + vgf2p8affineqb zmm", clmul_affine_zmm),
                ("vpclmulqdq + vpermi2b zmm", clmul_permb_zmm),
                ("vgf2p8affineqb + vpermi2b zmm", affine_permb_zmm),
                ("vpclmulqdq + vpternlogq zmm", clmul_ternlog_zmm),
                ("vgf2p8affineqb + vpshufb zmm", affine_shufb_zmm),
            ];
            for (name, f) in pairs {
                // SAFETY: AVX-512 VBMI was just detected, the rest above.
                row(name, per_ns(ops, || unsafe { f(N) }));
            }
        }
    }
}

fn main() {
    let mut seconds = 1.0;
    let args: Vec<String> = std::env::args().collect();
    #[cfg(target_arch = "x86_64")]
    if args.iter().any(|a| a == "--issue-rates") {
        issue::run();
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--seconds") {
        seconds = args[i + 1].parse().expect("--seconds takes a number");
    }
    // Source and destination page-aligned, as guest pages and bounce buffers are (a
    // destination 16 bytes past a 4 KiB multiple from the source would add 4K-aliasing
    // stalls to every copy loop; `--dst-skew N` offsets the destination by N bytes to see it).
    let mut src_mem = vec![0u8; 65536 + 4096];
    let at = src_mem.as_ptr().align_offset(4096);
    let buf = &mut src_mem[at..at + 65536];
    for (i, b) in buf.iter_mut().enumerate() {
        *b = ((i as u32).wrapping_mul(2654435761) >> 13) as u8;
    }
    let buf: &[u8] = buf;
    assert_eq!(
        isal16(&buf[..4096]),
        crc16_t10dif(&buf[..4096]),
        "ISA-L and guardblk disagree on CRC-16/T10-DIF"
    );
    assert_eq!(
        CRC64_TABLE.checksum(&buf[..4096]),
        crc64_nvme(&buf[..4096]),
        "crc crate and guardblk disagree on CRC-64/NVME"
    );

    println!(
        "one core, 64 KiB buffer, best of 5 slices, {seconds} s per cell; GB/s; guardblk uses {}",
        implementation()
    );
    #[cfg(target_arch = "x86_64")]
    println!("clock now (dependent adds): {:.2} GHz", issue::clock_ghz());
    println!("{:<38} {:>9} {:>9}", "", "512 B", "4 KiB");
    let row = |name: &str, f: &mut dyn FnMut(usize) -> f64| {
        let (a, b) = (f(512), f(4096));
        println!("{name:<38} {a:>9.2} {b:>9.2}");
        (a, b)
    };
    println!("-- generate");
    let g16 = row("guardblk crc16 t10dif", &mut |n| {
        rate(seconds, buf, n, |c| {
            black_box(crc16_t10dif(c));
        })
    });
    let p16 = row("crc-fast crc16 (portable path)", &mut |n| {
        rate(seconds, buf, n, |c| {
            black_box(portable::crc16_t10dif(c));
        })
    });
    let i16 = row("ISA-L crc16_t10dif", &mut |n| {
        rate(seconds, buf, n, |c| {
            black_box(isal16(c));
        })
    });
    row("crc crate crc16, slice-16 (reference)", &mut |n| {
        rate(seconds, buf, n, |c| {
            black_box(CRC16_TABLE.checksum(c));
        })
    });
    let g64 = row("guardblk crc64 nvme", &mut |n| {
        rate(seconds, buf, n, |c| {
            black_box(crc64_nvme(c));
        })
    });
    let p64 = row("crc-fast crc64 (portable path)", &mut |n| {
        rate(seconds, buf, n, |c| {
            black_box(portable::crc64_nvme(c));
        })
    });
    let i64_ = row("ISA-L crc64_ecma_refl (anchor)", &mut |n| {
        rate(seconds, buf, n, |c| {
            black_box(isal64(c));
        })
    });
    row("crc crate crc64 nvme, slice-16", &mut |n| {
        rate(seconds, buf, n, |c| {
            black_box(CRC64_TABLE.checksum(c));
        })
    });

    println!("-- verify (compute + compare with stored guard)");
    let v16 = row("guardblk crc16 verify", &mut |n| {
        verify(seconds, buf, n, crc16_t10dif)
    });
    let vi16 = row("ISA-L crc16 verify", &mut |n| {
        verify(seconds, buf, n, isal16)
    });
    let v64 = row("guardblk crc64 verify", &mut |n| {
        verify(seconds, buf, n, crc64_nvme)
    });
    let vi64 = row("ISA-L crc64_ecma_refl verify", &mut |n| {
        verify(seconds, buf, n, isal64)
    });

    println!("-- copy (src -> dst, per interval unless noted)");
    let skew: usize = args.iter().position(|a| a == "--dst-skew").map_or(0, |i| {
        args[i + 1].parse().expect("--dst-skew takes a number")
    });
    let mut dst_mem = vec![0u8; 65536 + 8192];
    let at = dst_mem.as_ptr().align_offset(4096) + skew % 4096;
    let dst = &mut dst_mem[at..at + 65536];
    let memcpy = row("memcpy per interval (anchor)", &mut |n| {
        rate(seconds, buf, n, |c| {
            let o = offset(buf, c);
            dst[o..o + n].copy_from_slice(c);
            black_box(&mut *dst);
        })
    });
    row("memcpy, whole 64 KiB (reference)", &mut |_| {
        rate(seconds, buf, buf.len(), |c| {
            dst.copy_from_slice(c);
            black_box(&mut *dst);
        })
    });
    let fused16 = row("guardblk fused copy + crc16", &mut |n| {
        rate(seconds, buf, n, |c| {
            let o = offset(buf, c);
            black_box(copy_crc16_t10dif(&mut dst[o..o + n], c));
        })
    });
    let fused64 = row("guardblk fused copy + crc64", &mut |n| {
        rate(seconds, buf, n, |c| {
            let o = offset(buf, c);
            black_box(copy_crc64_nvme(&mut dst[o..o + n], c));
        })
    });
    // Two intervals per call, interleaved in one kernel: `rate` hands out pairs.
    let fused16x2 = row("fused copy + crc16, 2 intervals at once", &mut |n| {
        rate(seconds, buf, 2 * n, |c| {
            let o = offset(buf, c);
            let (d0, d1) = dst[o..o + 2 * n].split_at_mut(n);
            black_box(copy_crc16_t10dif_x2([d0, d1], [&c[..n], &c[n..]]));
        })
    });
    let fused64x2 = row("fused copy + crc64, 2 intervals at once", &mut |n| {
        rate(seconds, buf, 2 * n, |c| {
            let o = offset(buf, c);
            let (d0, d1) = dst[o..o + 2 * n].split_at_mut(n);
            black_box(copy_crc64_nvme_x2([d0, d1], [&c[..n], &c[n..]]));
        })
    });
    let mut guards16 = Vec::with_capacity(buf.len() / 512);
    row("copy, then crc16 (two passes, ref.)", &mut |n| {
        rate(seconds, buf, buf.len(), |src| {
            guards16.clear();
            copy_with_guards(dst, src, n, crc16_t10dif, &mut guards16);
        })
    });

    row("crc-fast: copy, then crc16 (before)", &mut |n| {
        rate(seconds, buf, buf.len(), |src| {
            guards16.clear();
            copy_with_guards(dst, src, n, portable::crc16_t10dif, &mut guards16);
        })
    });

    println!("-- guard + 64-bit change digest (zero-copy write, no copy)");
    let dual = row("one pass: crc16 + crc64 (same loads)", &mut |n| {
        rate(seconds, buf, n, |c| {
            black_box(crc16_t10dif_and_crc64_nvme(c));
        })
    });
    let two = row("crc16, then crc64 (two passes)", &mut |n| {
        rate(seconds, buf, n, |c| {
            black_box((crc16_t10dif(c), crc64_nvme(c)));
        })
    });
    row("crc-fast crc16, then crc64 (before)", &mut |n| {
        rate(seconds, buf, n, |c| {
            black_box((portable::crc16_t10dif(c), portable::crc64_nvme(c)));
        })
    });
    #[cfg(target_arch = "x86_64")]
    let cheap =
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("vpclmulqdq") {
            let key: Vec<u8> = (0..4096 + 64u32)
                .map(|i| (i.wrapping_mul(0x9E37_79B9) >> 11) as u8)
                .collect();
            // The digests notice a one-bit change (sanity, not a proof).
            let mut probe = buf[..4096].to_vec();
            // SAFETY: AVX2 and VPCLMULQDQ were detected above.
            let (n0, c0) = unsafe { (digest::nh2(&key, &probe), digest::clnh(&key, &probe)) };
            probe[1000] ^= 4;
            // SAFETY: AVX2 and VPCLMULQDQ were detected above.
            let (n1, c1) = unsafe { (digest::nh2(&key, &probe), digest::clnh(&key, &probe)) };
            assert!(n0 != n1 && c0 != c1, "a digest missed a change");
            let nh = row("NH, 2 keys, vpmuludq (bench only)", &mut |n| {
                rate(seconds, buf, n, |c| {
                    // SAFETY: AVX2 and VPCLMULQDQ were detected above.
                    black_box(unsafe { digest::nh2(&key, c) });
                })
            });
            let cl = row("carry-less NH, vpclmulqdq (bench only)", &mut |n| {
                rate(seconds, buf, n, |c| {
                    // SAFETY: AVX2 and VPCLMULQDQ were detected above.
                    black_box(unsafe { digest::clnh(&key, c) });
                })
            });
            let g_nh = row("crc16, then NH (two passes)", &mut |n| {
                rate(seconds, buf, n, |c| {
                    // SAFETY: AVX2 and VPCLMULQDQ were detected above.
                    black_box((crc16_t10dif(c), unsafe { digest::nh2(&key, c) }));
                })
            });
            Some((nh, cl, g_nh))
        } else {
            None
        };

    println!();
    println!("ratios                                   512 B     4 KiB");
    let ratio = |name: &str, a: (f64, f64), b: (f64, f64)| {
        let r = (a.0 / b.0, a.1 / b.1);
        println!("{name:<38} {:>9.2} {:>9.2}", r.0, r.1);
        r
    };
    ratio("crc16 guardblk / crc-fast", g16, p16);
    ratio("crc64 guardblk / crc-fast", g64, p64);
    ratio("one-pass crc16+crc64 / two passes", dual, two);
    ratio("one-pass crc16+crc64 / crc16 alone", dual, g16);
    #[cfg(target_arch = "x86_64")]
    if let Some((nh, cl, g_nh)) = cheap {
        ratio("NH digest / crc64", nh, g64);
        ratio("carry-less NH digest / crc64", cl, g64);
        ratio("crc16 + NH / one-pass crc16+crc64", g_nh, dual);
    }

    println!();
    println!("ratios (target: >= 0.90)                512 B     4 KiB");
    let r = [
        (
            "crc16 generate vs ISA-L",
            ratio("crc16 generate / ISA-L", g16, i16),
        ),
        (
            "crc64 generate vs ISA-L anchor",
            ratio("crc64 generate / ISA-L anchor", g64, i64_),
        ),
        (
            "crc16 verify vs ISA-L",
            ratio("crc16 verify / ISA-L verify", v16, vi16),
        ),
        (
            "crc64 verify vs ISA-L anchor",
            ratio("crc64 verify / ISA-L anchor verify", v64, vi64),
        ),
        (
            "fused copy+crc16 vs memcpy",
            ratio("copy+crc16 / memcpy", fused16, memcpy),
        ),
        (
            "fused copy+crc64 vs memcpy",
            ratio("copy+crc64 / memcpy", fused64, memcpy),
        ),
        (
            "fused copy+crc16 x2 vs memcpy",
            ratio("copy+crc16, 2 at once / memcpy", fused16x2, memcpy),
        ),
        (
            "fused copy+crc64 x2 vs memcpy",
            ratio("copy+crc64, 2 at once / memcpy", fused64x2, memcpy),
        ),
    ];
    println!();
    for (name, (a, b)) in r {
        let verdict = |x: f64| if x >= 0.9 { "met" } else { "NOT met" };
        println!(
            "target {name:<32} 512 B: {} ({a:.2})   4 KiB: {} ({b:.2})",
            verdict(a),
            verdict(b)
        );
    }
}
