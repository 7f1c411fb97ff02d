//! Carry-less-multiply folding kernels for the two guard CRCs (CRC-16/T10-DIF and
//! CRC-64/NVME), after Intel's "Fast CRC Computation for Generic Polynomials Using PCLMULQDQ":
//! fold 512-bit lanes (VPCLMULQDQ, AVX-512) in parallel, multiply every remaining 128-bit lane
//! by the power of x that carries it to the end of the message, then one Barrett reduction.
//! `x86::avx2` does the same on 256-bit lanes (AVX2 + VPCLMULQDQ, for CPUs without AVX-512);
//! the `dual_kernel`s fold both polynomials from the same loads (guard + change digest).
//! docs/ROOFLINE.md gives the throughput ceilings.
//!
//! All constants are derived here from the polynomials by `const fn`s (x^n mod P, floor(x^d/P)),
//! evaluated at compile time; nothing is pasted in.
//!
//! The kernels carry a CRC *register* in and out (`state`), so they serve one-shot, incremental
//! and fused copy+CRC use alike:
//! - CRC-16/T10-DIF is not reflected, init 0, xorout 0: the register is the CRC so far.
//! - CRC-64/NVME is reflected, init and xorout all ones: the register is the running reflected
//!   remainder; the CRC is `register ^ !0`.
//!
//! Lengths: whole 16-byte blocks go through the SIMD kernel, the last `len % 16` bytes through a
//! byte-wise table (also the portable path for short inputs).

// ---------------------------------------------------------------------------------------------
// Polynomial arithmetic over GF(2), at compile time.

/// x^n mod P, P = x^k + `low` (k <= 64), as a normal (not reflected) integer of k bits.
const fn xpow_mod(n: u32, low: u64, k: u32) -> u64 {
    let top = 1u128 << k;
    let p = top | low as u128;
    let mut r = 1u128;
    let mut i = 0;
    while i < n {
        r <<= 1;
        if r & top != 0 {
            r ^= p;
        }
        i += 1;
    }
    r as u64
}

/// floor(x^d / P), P = x^k + `low`, for d - k < 128.
const fn xpow_div(d: u32, low: u64, k: u32) -> u128 {
    let top = 1u128 << k;
    let p = top | low as u128;
    let (mut r, mut q) = (1u128, 0u128);
    let mut i = 0;
    while i < d {
        r <<= 1;
        q <<= 1;
        if r & top != 0 {
            r ^= p;
            q |= 1;
        }
        i += 1;
    }
    q
}

const fn rev64(mut v: u64) -> u64 {
    let mut r = 0u64;
    let mut i = 0;
    while i < 64 {
        r = (r << 1) | (v & 1);
        v >>= 1;
        i += 1;
    }
    r
}

/// Largest lane-to-end distance, in bytes, that the per-lane constant table covers: the
/// 256-byte accumulator block plus a tail of up to 240 bytes.
const MAX_DIST: usize = 480;
/// Entries: distances MAX_DIST, MAX_DIST-16, ..., 0, then 3 zero entries so that a 4-lane load
/// starting near distance 0 stays inside the table (those lanes only ever meet zeroed data).
const LANE_ENTRIES: usize = MAX_DIST / 16 + 1 + 3;

/// One 128-bit lane's constant pair `[q0, q1]`: the kernel computes
/// `clmul(lane.q0, q0) ^ clmul(lane.q1, q1)`, which is congruent mod P to the lane times x^`bits`.
///
/// Not reflected: lane = H·x^64 + L with L in qword 0, H in qword 1 (after byte reversal), so
/// q0 = x^bits mod P, q1 = x^(bits+64) mod P; products have at most 63+k bits.
/// Reflected: bit i of a qword is the coefficient of x^(63-i), and a carry-less product of two
/// reflected qwords is x·a·b; qword 0 holds H, qword 1 holds L, so
/// q0 = rev(x^(bits+63) mod P), q1 = rev(x^(bits-1) mod P).
const fn lane_pair(bits: u32, low: u64, k: u32, reflected: bool) -> [u64; 2] {
    if reflected {
        [
            rev64(xpow_mod(bits + 63, low, k)),
            rev64(xpow_mod(bits - 1, low, k)),
        ]
    } else {
        [xpow_mod(bits, low, k), xpow_mod(bits + 64, low, k)]
    }
}

#[repr(C, align(64))]
pub(crate) struct LaneTable(pub(crate) [[u64; 2]; LANE_ENTRIES]);

/// Per-lane constants, descending distance: entry i multiplies a lane whose last byte lies
/// `MAX_DIST - 16 i` bytes before the end of the message by x^(8·distance + k), so that the sum
/// of all products is congruent to M·x^k: the CRC after one reduction mod P.
const fn lane_table(low: u64, k: u32, reflected: bool) -> LaneTable {
    let mut t = [[0u64; 2]; LANE_ENTRIES];
    let mut i = 0;
    while i <= MAX_DIST / 16 {
        let dist = (MAX_DIST - 16 * i) as u32;
        t[i] = lane_pair(8 * dist + k, low, k, reflected);
        i += 1;
    }
    LaneTable(t)
}

/// Byte-at-a-time table. Not reflected: crc = (crc << 8) ^ T[(crc >> (k-8)) ^ b];
/// reflected: crc = (crc >> 8) ^ T[(crc ^ b) & 0xff].
const fn byte_table(low: u64, k: u32, reflected: bool) -> [u64; 256] {
    let mut t = [0u64; 256];
    let mut i = 0;
    while i < 256 {
        let mut r: u64;
        let mut j = 0;
        if reflected {
            let rp = rev64(low) >> (64 - k);
            r = i as u64;
            while j < 8 {
                r = if r & 1 != 0 { (r >> 1) ^ rp } else { r >> 1 };
                j += 1;
            }
        } else {
            let top = 1u64 << (k - 1);
            let mask = if k == 64 { !0 } else { (1u64 << k) - 1 };
            r = (i as u64) << (k - 8);
            while j < 8 {
                r = if r & top != 0 {
                    ((r << 1) ^ low) & mask
                } else {
                    (r << 1) & mask
                };
                j += 1;
            }
        }
        t[i] = r;
        i += 1;
    }
    t
}

// ---------------------------------------------------------------------------------------------
// The two CRCs.

/// CRC-16/T10-DIF: P = x^16 + 0x8BB7, not reflected.
pub(crate) mod t10dif {
    use super::*;
    pub(crate) const LOW: u64 = 0x8BB7;
    pub(crate) const K: u32 = 16;
    pub(crate) static LANES: LaneTable = lane_table(LOW, K, false);
    /// Fold 256 bytes forward: four 512-bit accumulators, each advanced by x^2048.
    pub(crate) const FOLD256: [u64; 2] = lane_pair(2048, LOW, K, false);
    /// Fold 128 bytes forward: four 256-bit accumulators per CRC (AVX2 dual kernel), advanced
    /// by x^1024.
    pub(crate) const FOLD128: [u64; 2] = lane_pair(1024, LOW, K, false);
    /// Barrett: [floor(x^78 / P) << 1, P]. The reduced value has degree <= 78.
    pub(crate) const BARRETT: [u64; 2] = [(xpow_div(78, LOW, K) as u64) << 1, (1 << 16) | LOW];
    static TABLE: [u64; 256] = byte_table(LOW, K, false);

    /// Byte-wise update of the CRC register (portable; also the SIMD path's tail).
    pub(crate) fn update_table(mut crc: u16, data: &[u8]) -> u16 {
        for &b in data {
            crc = (crc << 8) ^ TABLE[((crc >> 8) as u8 ^ b) as usize] as u16;
        }
        crc
    }
}

/// CRC-64/NVME: P = x^64 + 0xAD93D23594C93659, reflected.
pub(crate) mod nvme {
    use super::*;
    pub(crate) const LOW: u64 = 0xAD93_D235_94C9_3659;
    pub(crate) const K: u32 = 64;
    pub(crate) static LANES: LaneTable = lane_table(LOW, K, true);
    pub(crate) const FOLD256: [u64; 2] = lane_pair(2048, LOW, K, true);
    pub(crate) const FOLD128: [u64; 2] = lane_pair(1024, LOW, K, true);
    /// Barrett, reflected: floor(x^128/P) = x^64 + mu0 + x·mu1 and P = x^64 + 1 + x·p1;
    /// the constants are [rev(mu1), rev(p1)] (see `reduce_reflected`).
    pub(crate) const BARRETT: [u64; 2] = [
        rev64(((xpow_div(128, LOW, K) as u64) >> 1) & (u64::MAX >> 1)),
        rev64(LOW >> 1),
    ];
    static TABLE: [u64; 256] = byte_table(LOW, K, true);

    pub(crate) fn update_table(mut crc: u64, data: &[u8]) -> u64 {
        for &b in data {
            crc = (crc >> 8) ^ TABLE[((crc as u8) ^ b) as usize];
        }
        crc
    }
}

// ---------------------------------------------------------------------------------------------
// x86-64 SIMD kernels.

// AVX-512 intrinsics are stable since Rust 1.89 (and safe `#[target_feature]` functions since
// 1.86): this module needs 1.89 whatever the crate's declared `rust-version` says.
#[cfg(target_arch = "x86_64")]
#[clippy::msrv = "1.89"]
pub(crate) mod x86;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_follow_from_the_polynomials() {
        // x^k mod P = the low part of P.
        assert_eq!(xpow_mod(16, t10dif::LOW, 16), t10dif::LOW);
        assert_eq!(xpow_mod(64, nvme::LOW, 64), nvme::LOW);
        // floor(x^k / P) = 1; floor(x^(k+1)/P) = x, + 1 if P has an x^(k-1) term.
        assert_eq!(xpow_div(16, t10dif::LOW, 16), 1);
        assert_eq!(xpow_div(17, t10dif::LOW, 16), 3);
        assert_eq!(xpow_div(65, nvme::LOW, 64), 3);
        // The quotient times P plus the remainder gives back x^d.
        let (d, q) = (78, xpow_div(78, t10dif::LOW, 16));
        let mut prod = 0u128;
        for i in 0..64 {
            if q >> i & 1 != 0 {
                prod ^= ((1u128 << 16) | t10dif::LOW as u128) << i;
            }
        }
        assert_eq!(prod ^ xpow_mod(d, t10dif::LOW, 16) as u128, 1u128 << d);
        // Reflected byte table: entry 128 is the reflected polynomial.
        assert_eq!(rev64(rev64(0x1234_5678_9abc_def0)), 0x1234_5678_9abc_def0);
        assert_eq!(
            t10dif::update_table(0, b"123456789"),
            0xD0DB,
            "table CRC-16"
        );
        assert_eq!(
            nvme::update_table(!0, b"123456789") ^ !0,
            0xAE8B_1486_0A79_9888,
            "table CRC-64"
        );
    }

    /// a·b mod P over GF(2), bit by bit (test oracle for the derived constants).
    fn mulmod(a: u64, b: u64, low: u64, k: u32) -> u64 {
        let (top, p) = (1u128 << k, (1u128 << k) | low as u128);
        let mut r = 0u128;
        for i in (0..64).rev() {
            r <<= 1;
            if r & top != 0 {
                r ^= p;
            }
            if b >> i & 1 != 0 {
                r ^= a as u128;
            }
        }
        r as u64
    }

    #[test]
    fn the_128_byte_fold_composes_into_the_256_byte_fold() {
        for (low, k) in [(t10dif::LOW, 16), (nvme::LOW, 64)] {
            let h = xpow_mod(1024, low, k);
            assert_eq!(mulmod(h, h, low, k), xpow_mod(2048, low, k));
            assert_eq!(
                mulmod(h, xpow_mod(64, low, k), low, k),
                xpow_mod(1088, low, k)
            );
        }
        assert_eq!(t10dif::FOLD128[0], xpow_mod(1024, t10dif::LOW, 16));
        // Reflected pairs: q1 = rev(x^(bits-1) mod P).
        assert_eq!(rev64(nvme::FOLD128[1]), xpow_mod(1023, nvme::LOW, 64));
    }

    /// The AVX2 entry points, forced even on AVX-512 machines, against the byte tables.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_kernels_match_the_tables() {
        if !x86::available_avx2() {
            eprintln!("skipped: no AVX2 + VPCLMULQDQ on this CPU");
            return;
        }
        let data: Vec<u8> = (0..5000u32)
            .map(|i| (i.wrapping_mul(40503) >> 7) as u8)
            .collect();
        for len in [16usize, 32, 48, 128, 144, 496, 512, 4096, 4112] {
            let d = &data[3..3 + len];
            let (t16, t64) = (t10dif::update_table(0x1D0F, d), nvme::update_table(!7, d));
            let mut out = vec![0u8; len];
            // SAFETY: available_avx2() returned true above.
            unsafe {
                assert_eq!(x86::avx2::t10dif_update(0x1D0F, d), t16, "len {len}");
                assert_eq!(x86::avx2::nvme_update(!7, d), t64, "len {len}");
                assert_eq!(x86::avx2::t10dif_copy_update(0x1D0F, &mut out, d), t16);
                assert_eq!(x86::avx2::nvme_copy_update(!7, &mut out, d), t64);
                assert_eq!(x86::avx2::t10dif_nvme_update(0x1D0F, !7, d), (t16, t64));
            }
            assert_eq!(out, d);
        }
    }
}
