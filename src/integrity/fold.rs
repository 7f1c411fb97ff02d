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
pub(crate) mod x86 {
    use super::{nvme, t10dif, LaneTable, MAX_DIST};
    use std::arch::x86_64::*;
    use std::sync::atomic::{AtomicU8, Ordering};

    /// Detected CPU support, once: bit 0 = AVX-512 kernels, bit 1 = AVX2 kernels, bit 7 = done.
    #[inline]
    fn features() -> u8 {
        static FEATURES: AtomicU8 = AtomicU8::new(0);
        let f = FEATURES.load(Ordering::Relaxed);
        if f != 0 {
            return f;
        }
        let base = std::is_x86_feature_detected!("vpclmulqdq")
            && std::is_x86_feature_detected!("pclmulqdq")
            && std::is_x86_feature_detected!("sse4.1");
        let avx512 = base
            && std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vl");
        let avx2 = base && std::is_x86_feature_detected!("avx2");
        let f = 0x80 | avx512 as u8 | (avx2 as u8) << 1;
        FEATURES.store(f, Ordering::Relaxed);
        f
    }

    /// Whether the VPCLMULQDQ/AVX-512 kernels (zmm) can run here. Detected once, then one
    /// relaxed load per call.
    #[inline]
    pub(crate) fn available() -> bool {
        features() & 1 != 0
    }

    /// Whether the AVX2 + VPCLMULQDQ kernels (ymm, module [`avx2`]) can run here; true on
    /// AVX-512 machines too (so tests can force this level), detected with [`available`].
    #[inline]
    pub(crate) fn available_avx2() -> bool {
        features() & 2 != 0
    }

    /// What differs between the two CRCs inside the kernel.
    pub(crate) trait Spec {
        const REFLECTED: bool;
        fn lanes() -> &'static LaneTable;
        const FOLD256: [u64; 2];
        const FOLD128: [u64; 2];
        const BARRETT: [u64; 2];
    }

    pub(crate) struct T10Dif;
    impl Spec for T10Dif {
        const REFLECTED: bool = false;
        fn lanes() -> &'static LaneTable {
            &t10dif::LANES
        }
        const FOLD256: [u64; 2] = t10dif::FOLD256;
        const FOLD128: [u64; 2] = t10dif::FOLD128;
        const BARRETT: [u64; 2] = t10dif::BARRETT;
    }

    pub(crate) struct Nvme;
    impl Spec for Nvme {
        const REFLECTED: bool = true;
        fn lanes() -> &'static LaneTable {
            &nvme::LANES
        }
        const FOLD256: [u64; 2] = nvme::FOLD256;
        const FOLD128: [u64; 2] = nvme::FOLD128;
        const BARRETT: [u64; 2] = nvme::BARRETT;
    }

    /// `a·K ^ x`: both qword products of every 128-bit lane, summed with `x` (one ternlog).
    #[inline]
    #[target_feature(enable = "avx512f,vpclmulqdq")]
    fn mul_add(a: __m512i, k: __m512i, x: __m512i) -> __m512i {
        let lo = _mm512_clmulepi64_epi128(a, k, 0x00);
        let hi = _mm512_clmulepi64_epi128(a, k, 0x11);
        _mm512_ternarylogic_epi64(lo, hi, x, 0x96)
    }

    /// Fold `m` bytes (a multiple of 16, at least 16) at `src` into the CRC register `state`;
    /// with `COPY`, also store every loaded byte to `dst`, from the same registers.
    ///
    /// # Safety
    /// The CPU must support the enabled features ([`available`]); `src` must be valid for
    /// reads of `m` bytes and, with `COPY`, `dst` valid for writes of `m` bytes. No alignment
    /// is required (unaligned and masked loads/stores only).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,vpclmulqdq,pclmulqdq,sse4.1")]
    unsafe fn kernel<S: Spec, const COPY: bool>(
        src: *const u8,
        dst: *mut u8,
        m: usize,
        state: u64,
    ) -> u64 {
        debug_assert!(m >= 16 && m & 15 == 0);
        // Byte reversal within each 128-bit lane, for the non-reflected CRC.
        let bswap = _mm512_broadcast_i32x4(_mm_set_epi8(
            0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
        ));
        let lanes = S::lanes().0.as_ptr();
        let lane_k = |dist: usize| -> __m512i {
            debug_assert!(dist <= MAX_DIST);
            // SAFETY: index (MAX_DIST - dist)/16 + 3 < LANE_ENTRIES, so the 64-byte load
            // stays inside the table.
            unsafe { _mm512_loadu_si512(lanes.add((MAX_DIST - dist) / 16) as *const _) }
        };
        // With COPY: store four raw 64-byte blocks at `off`.
        let store4 = |off: usize, v: [__m512i; 4]| {
            if COPY {
                for (i, x) in v.iter().enumerate() {
                    // SAFETY: callers pass off + 256 <= m; dst is valid for m bytes.
                    unsafe { _mm512_storeu_si512(dst.add(off + 64 * i) as *mut _, *x) };
                }
            }
        };
        // Four raw 64-byte loads at `off`. With COPY, the kernel stores each group only after
        // loading the next one (`pending`), so no load waits behind a store that may alias it
        // in the low 12 address bits (4K aliasing); measured +12% at 512 B.
        let load4 = |off: usize| -> [__m512i; 4] {
            // SAFETY: callers pass off + 256 <= m; src is valid for m bytes.
            unsafe {
                [
                    _mm512_loadu_si512(src.add(off) as *const _),
                    _mm512_loadu_si512(src.add(off + 64) as *const _),
                    _mm512_loadu_si512(src.add(off + 128) as *const _),
                    _mm512_loadu_si512(src.add(off + 192) as *const _),
                ]
            }
        };
        // Byte reversal if needed.
        let prep4 = |v: [__m512i; 4]| -> [__m512i; 4] {
            if S::REFLECTED {
                v
            } else {
                v.map(|x| _mm512_shuffle_epi8(x, bswap))
            }
        };
        // One 64-byte load (+ store) at `off`, byte-reversed if needed.
        let load = |off: usize| -> __m512i {
            // SAFETY: callers pass off + 64 <= m; src/dst are valid for m bytes.
            let v = unsafe { _mm512_loadu_si512(src.add(off) as *const _) };
            if COPY {
                // SAFETY: as above, for dst.
                unsafe { _mm512_storeu_si512(dst.add(off) as *mut _, v) };
            }
            if S::REFLECTED {
                v
            } else {
                _mm512_shuffle_epi8(v, bswap)
            }
        };
        // The carried-in register goes into the top bits of the first block: qword 0 of the
        // first lane (reflected), or its top 16 bits after byte reversal (not reflected).
        let inject = if S::REFLECTED {
            _mm512_zextsi128_si512(_mm_cvtsi64_si128(state as i64))
        } else {
            _mm512_zextsi128_si512(_mm_set_epi64x((state << 48) as i64, 0))
        };

        let mut off = 0usize;
        let mut sum = _mm512_setzero_si512();
        let mut first = inject;
        if m >= 256 {
            let raw = load4(0);
            let [mut a0, mut a1, mut a2, mut a3] = prep4(raw);
            a0 = _mm512_xor_si512(a0, first);
            let mut pending = raw;
            first = _mm512_setzero_si512();
            off = 256;
            let k =
                _mm512_broadcast_i32x4(_mm_set_epi64x(S::FOLD256[1] as i64, S::FOLD256[0] as i64));
            while m - off >= 256 {
                let raw = load4(off);
                store4(off - 256, pending);
                pending = raw;
                let b = prep4(raw);
                a0 = mul_add(a0, k, b[0]);
                a1 = mul_add(a1, k, b[1]);
                a2 = mul_add(a2, k, b[2]);
                a3 = mul_add(a3, k, b[3]);
                off += 256;
            }
            store4(off - 256, pending);
            // The accumulators hold bytes [off-256, off): carry each lane to the end.
            let t = m - off;
            sum = mul_add(a0, lane_k(t + 240), sum);
            sum = mul_add(a1, lane_k(t + 176), sum);
            sum = mul_add(a2, lane_k(t + 112), sum);
            sum = mul_add(a3, lane_k(t + 48), sum);
        }
        while m - off >= 64 {
            let v = _mm512_xor_si512(load(off), first);
            first = _mm512_setzero_si512();
            sum = mul_add(v, lane_k(m - off - 16), sum);
            off += 64;
        }
        if off < m {
            // 1 to 3 lanes left: masked load (+ store); the zeroed lanes contribute nothing.
            let mask: __mmask8 = (1u8 << ((m - off) / 8)) - 1;
            // SAFETY: the mask enables exactly the qwords of [off, m), inside src/dst;
            // masked-off elements are neither read nor written.
            let mut v = unsafe { _mm512_maskz_loadu_epi64(mask, src.add(off) as *const _) };
            if COPY {
                // SAFETY: as above.
                unsafe { _mm512_mask_storeu_epi64(dst.add(off) as *mut _, mask, v) };
            }
            if !S::REFLECTED {
                v = _mm512_shuffle_epi8(v, bswap);
            }
            v = _mm512_xor_si512(v, first);
            sum = mul_add(v, lane_k(m - off - 16), sum);
        }

        // Sum the four lanes: w ≡ M·x^k (mod P).
        let w = _mm_ternarylogic_epi64(
            _mm512_castsi512_si128(sum),
            _mm512_extracti32x4_epi32(sum, 1),
            _mm_xor_si128(
                _mm512_extracti32x4_epi32(sum, 2),
                _mm512_extracti32x4_epi32(sum, 3),
            ),
            0x96,
        );
        reduce::<S>(w)
    }

    /// w (degree <= 78) mod P for CRC-16. With T = floor(w/x^16) and mu = floor(x^78/P),
    /// q = floor(T·mu / x^62) is the exact quotient (Barrett, exact over GF(2) since
    /// deg w <= 78); computed as the high qword of (T·x)·(mu·x). Then w ^ q·P, low 16 bits.
    #[inline]
    #[target_feature(enable = "pclmulqdq,sse4.1")]
    fn reduce_t10dif(w: __m128i, kb: __m128i) -> u64 {
        let t = _mm_slli_epi64(_mm_srli_si128(w, 2), 1);
        let q = _mm_clmulepi64_si128(t, kb, 0x00);
        let qp = _mm_clmulepi64_si128(q, kb, 0x11);
        (_mm_cvtsi128_si64(_mm_xor_si128(w, qp)) as u64) & 0xFFFF
    }

    /// w (any 128-bit reflected value) mod P for CRC-64/NVME. T = qword 0 = floor(w/x^64);
    /// q = T ^ floor(x·T·mu1 / x^64), which is qword 0 of clmul(T, rev(mu1)) (the high part
    /// of a reflected product lands in qword 0). The remainder is
    /// (w ^ q·P) mod x^64 = w.qword1 ^ q ^ (x·q·p1).qword1.
    #[inline]
    #[target_feature(enable = "pclmulqdq,sse4.1")]
    fn reduce_reflected(w: __m128i, kb: __m128i) -> u64 {
        let q = _mm_xor_si128(w, _mm_clmulepi64_si128(w, kb, 0x00));
        let s = _mm_clmulepi64_si128(q, kb, 0x10);
        let hi = _mm_extract_epi64(_mm_xor_si128(w, s), 1) as u64;
        hi ^ _mm_cvtsi128_si64(q) as u64
    }

    /// w ≡ M·x^k (mod P) reduced to the CRC register, for either CRC.
    #[inline]
    #[target_feature(enable = "pclmulqdq,sse4.1")]
    fn reduce<S: Spec>(w: __m128i) -> u64 {
        let kb = _mm_set_epi64x(S::BARRETT[1] as i64, S::BARRETT[0] as i64);
        if S::REFLECTED {
            reduce_reflected(w, kb)
        } else {
            reduce_t10dif(w, kb)
        }
    }

    /// Fold `m` bytes (a multiple of 16, at least 16) at `src` into two CRC registers at
    /// once, `sa` for CRC `A` and `sb` for CRC `B`, from the same loads: each 64-byte block is
    /// loaded once and folded into both accumulator sets (four zmm each). The clmul count is
    /// the sum of the two CRCs'; what this saves over two passes is the second pass's loads.
    ///
    /// # Safety
    /// The CPU must support the enabled features ([`available`]); `src` must be valid for
    /// reads of `m` bytes. No alignment is required.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,vpclmulqdq,pclmulqdq,sse4.1")]
    unsafe fn dual_kernel<A: Spec, B: Spec>(
        src: *const u8,
        m: usize,
        sa: u64,
        sb: u64,
    ) -> (u64, u64) {
        debug_assert!(m >= 16 && m & 15 == 0);
        let bswap = _mm512_broadcast_i32x4(_mm_set_epi8(
            0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
        ));
        let prep = |v: __m512i, reflected: bool| -> __m512i {
            if reflected {
                v
            } else {
                _mm512_shuffle_epi8(v, bswap)
            }
        };
        let lane_k = |lanes: &'static LaneTable, dist: usize| -> __m512i {
            debug_assert!(dist <= MAX_DIST);
            // SAFETY: index (MAX_DIST - dist)/16 + 3 < LANE_ENTRIES, so the 64-byte load
            // stays inside the table.
            unsafe { _mm512_loadu_si512(lanes.0.as_ptr().add((MAX_DIST - dist) / 16) as *const _) }
        };
        let load = |off: usize| -> __m512i {
            // SAFETY: callers pass off + 64 <= m; src is valid for m bytes.
            unsafe { _mm512_loadu_si512(src.add(off) as *const _) }
        };
        let inject = |reflected: bool, state: u64| -> __m512i {
            if reflected {
                _mm512_zextsi128_si512(_mm_cvtsi64_si128(state as i64))
            } else {
                _mm512_zextsi128_si512(_mm_set_epi64x((state << 48) as i64, 0))
            }
        };
        let zero = _mm512_setzero_si512();
        let (ta, tb) = (A::lanes(), B::lanes());
        let mut off = 0usize;
        let (mut suma, mut sumb) = (zero, zero);
        let (mut fa, mut fb) = (inject(A::REFLECTED, sa), inject(B::REFLECTED, sb));
        if m >= 256 {
            let raw = [load(0), load(64), load(128), load(192)];
            let mut a = raw.map(|v| prep(v, A::REFLECTED));
            let mut b = raw.map(|v| prep(v, B::REFLECTED));
            a[0] = _mm512_xor_si512(a[0], fa);
            b[0] = _mm512_xor_si512(b[0], fb);
            (fa, fb) = (zero, zero);
            off = 256;
            let ka =
                _mm512_broadcast_i32x4(_mm_set_epi64x(A::FOLD256[1] as i64, A::FOLD256[0] as i64));
            let kb =
                _mm512_broadcast_i32x4(_mm_set_epi64x(B::FOLD256[1] as i64, B::FOLD256[0] as i64));
            while m - off >= 256 {
                let raw = [load(off), load(off + 64), load(off + 128), load(off + 192)];
                for i in 0..4 {
                    a[i] = mul_add(a[i], ka, prep(raw[i], A::REFLECTED));
                    b[i] = mul_add(b[i], kb, prep(raw[i], B::REFLECTED));
                }
                off += 256;
            }
            let t = m - off;
            for i in 0..4 {
                suma = mul_add(a[i], lane_k(ta, t + 240 - 64 * i), suma);
                sumb = mul_add(b[i], lane_k(tb, t + 240 - 64 * i), sumb);
            }
        }
        while m - off >= 64 {
            let raw = load(off);
            let va = _mm512_xor_si512(prep(raw, A::REFLECTED), fa);
            let vb = _mm512_xor_si512(prep(raw, B::REFLECTED), fb);
            (fa, fb) = (zero, zero);
            suma = mul_add(va, lane_k(ta, m - off - 16), suma);
            sumb = mul_add(vb, lane_k(tb, m - off - 16), sumb);
            off += 64;
        }
        if off < m {
            let mask: __mmask8 = (1u8 << ((m - off) / 8)) - 1;
            // SAFETY: the mask enables exactly the qwords of [off, m), inside src;
            // masked-off elements are not read.
            let raw = unsafe { _mm512_maskz_loadu_epi64(mask, src.add(off) as *const _) };
            let va = _mm512_xor_si512(prep(raw, A::REFLECTED), fa);
            let vb = _mm512_xor_si512(prep(raw, B::REFLECTED), fb);
            suma = mul_add(va, lane_k(ta, m - off - 16), suma);
            sumb = mul_add(vb, lane_k(tb, m - off - 16), sumb);
        }
        let lanes4 = |s: __m512i| -> __m128i {
            _mm_ternarylogic_epi64(
                _mm512_castsi512_si128(s),
                _mm512_extracti32x4_epi32(s, 1),
                _mm_xor_si128(
                    _mm512_extracti32x4_epi32(s, 2),
                    _mm512_extracti32x4_epi32(s, 3),
                ),
                0x96,
            )
        };
        (reduce::<A>(lanes4(suma)), reduce::<B>(lanes4(sumb)))
    }

    /// The register-level entry points, the same for both vector widths: whole 16-byte blocks
    /// through `$kernel`/`$dual`, the last `len % 16` bytes through the byte tables.
    macro_rules! entry_points {
        ($features:literal, $avail:literal, $kernel:ident, $dual:ident) => {
            /// CRC-16/T10-DIF register update over `data`.
            ///
            /// # Safety
            #[doc = concat!("[`", $avail, "`] must have returned true.")]
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn t10dif_update(state: u16, data: &[u8]) -> u16 {
                let m = data.len() & !15;
                let mut crc = state;
                if m != 0 {
                    // SAFETY: features enabled (caller contract); data is valid for
                    // m <= len bytes.
                    crc = unsafe {
                        $kernel::<T10Dif, false>(data.as_ptr(), std::ptr::null_mut(), m, crc as u64)
                    } as u16;
                }
                t10dif::update_table(crc, &data[m..])
            }

            /// Copy `src` to `dst` and update the CRC-16/T10-DIF register over the bytes,
            /// one pass.
            ///
            /// # Safety
            #[doc = concat!("[`", $avail, "`] must have returned true. Panics if the lengths differ.")]
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn t10dif_copy_update(state: u16, dst: &mut [u8], src: &[u8]) -> u16 {
                assert_eq!(dst.len(), src.len(), "copy+crc: length mismatch");
                let m = src.len() & !15;
                let mut crc = state;
                if m != 0 {
                    // SAFETY: features enabled; src readable and dst writable for m <= len
                    // bytes; `&mut` guarantees they do not overlap.
                    crc = unsafe {
                        $kernel::<T10Dif, true>(src.as_ptr(), dst.as_mut_ptr(), m, crc as u64)
                    } as u16;
                }
                if m == src.len() {
                    return crc; // Skip a zero-length memcpy call: it costs ~5 ns per interval.
                }
                dst[m..].copy_from_slice(&src[m..]);
                t10dif::update_table(crc, &src[m..])
            }

            /// CRC-64/NVME (reflected) register update over `data`.
            ///
            /// # Safety
            #[doc = concat!("[`", $avail, "`] must have returned true.")]
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn nvme_update(state: u64, data: &[u8]) -> u64 {
                let m = data.len() & !15;
                let mut crc = state;
                if m != 0 {
                    // SAFETY: features enabled (caller contract); data is valid for
                    // m <= len bytes.
                    crc = unsafe {
                        $kernel::<Nvme, false>(data.as_ptr(), std::ptr::null_mut(), m, crc)
                    };
                }
                nvme::update_table(crc, &data[m..])
            }

            /// Copy `src` to `dst` and update the CRC-64/NVME register over the bytes, one pass.
            ///
            /// # Safety
            #[doc = concat!("[`", $avail, "`] must have returned true. Panics if the lengths differ.")]
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn nvme_copy_update(state: u64, dst: &mut [u8], src: &[u8]) -> u64 {
                assert_eq!(dst.len(), src.len(), "copy+crc: length mismatch");
                let m = src.len() & !15;
                let mut crc = state;
                if m != 0 {
                    // SAFETY: features enabled; src readable and dst writable for m <= len
                    // bytes; `&mut` guarantees they do not overlap.
                    crc = unsafe { $kernel::<Nvme, true>(src.as_ptr(), dst.as_mut_ptr(), m, crc) };
                }
                if m == src.len() {
                    return crc; // Skip a zero-length memcpy call: it costs ~5 ns per interval.
                }
                dst[m..].copy_from_slice(&src[m..]);
                nvme::update_table(crc, &src[m..])
            }

            /// Update a CRC-16/T10-DIF register and a CRC-64/NVME register over `data`, both
            /// from the same loads (one pass).
            ///
            /// # Safety
            #[doc = concat!("[`", $avail, "`] must have returned true.")]
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn t10dif_nvme_update(s16: u16, s64: u64, data: &[u8]) -> (u16, u64) {
                let m = data.len() & !15;
                let (mut a, mut b) = (s16, s64);
                if m != 0 {
                    // SAFETY: features enabled (caller contract); data is valid for
                    // m <= len bytes.
                    let (x, y) = unsafe { $dual::<T10Dif, Nvme>(data.as_ptr(), m, a as u64, b) };
                    (a, b) = (x as u16, y);
                }
                (
                    t10dif::update_table(a, &data[m..]),
                    nvme::update_table(b, &data[m..]),
                )
            }
        };
    }

    entry_points!(
        "avx512f,avx512bw,avx512vl,vpclmulqdq,pclmulqdq,sse4.1",
        "available",
        kernel,
        dual_kernel
    );

    /// The same kernels on 256-bit vectors: AVX2 + VPCLMULQDQ on ymm (PCLMULQDQ/SSE4.1 for
    /// the reduction), for CPUs without AVX-512 such as AMD Zen 3. Same lane tables, same
    /// carried-register contract. On Zen 3 a ymm clmul has 4-cycle latency and issues every 2
    /// cycles, so two accumulators would hide the latency; the single-CRC kernel uses eight
    /// (256-byte steps, x^2048), the dual kernel four per CRC (128-byte steps, x^1024).
    pub(crate) mod avx2 {
        use super::super::{nvme, t10dif, LaneTable, MAX_DIST};
        use super::{reduce, Nvme, Spec, T10Dif};
        use std::arch::x86_64::*;

        /// `a·K ^ x` on two 128-bit lanes.
        #[inline]
        #[target_feature(enable = "avx2,vpclmulqdq")]
        fn mul_add(a: __m256i, k: __m256i, x: __m256i) -> __m256i {
            let lo = _mm256_clmulepi64_epi128(a, k, 0x00);
            let hi = _mm256_clmulepi64_epi128(a, k, 0x11);
            _mm256_xor_si256(lo, _mm256_xor_si256(hi, x))
        }

        /// The 32-byte constant pair for two lanes, the first ending `dist` bytes before the
        /// end of the message.
        #[inline]
        #[target_feature(enable = "avx2")]
        fn lane_k(lanes: &'static LaneTable, dist: usize) -> __m256i {
            assert!(dist <= MAX_DIST);
            // SAFETY: index (MAX_DIST - dist)/16 + 1 < LANE_ENTRIES (the table has 3 entries
            // past distance 0), so the 32-byte load stays inside the table.
            unsafe { _mm256_loadu_si256(lanes.0.as_ptr().add((MAX_DIST - dist) / 16) as *const _) }
        }

        /// The carried-in register placed in the top bits of the first 32-byte block.
        #[inline]
        #[target_feature(enable = "avx2")]
        fn inject(reflected: bool, state: u64) -> __m256i {
            if reflected {
                _mm256_zextsi128_si256(_mm_cvtsi64_si128(state as i64))
            } else {
                _mm256_zextsi128_si256(_mm_set_epi64x((state << 48) as i64, 0))
            }
        }

        /// Byte reversal within each 128-bit lane, for the non-reflected CRC.
        #[inline]
        #[target_feature(enable = "avx2")]
        fn bswap128() -> __m128i {
            _mm_set_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
        }

        #[inline]
        #[target_feature(enable = "avx2")]
        fn prep(v: __m256i, reflected: bool) -> __m256i {
            if reflected {
                v
            } else {
                _mm256_shuffle_epi8(v, _mm256_broadcastsi128_si256(bswap128()))
            }
        }

        #[inline]
        #[target_feature(enable = "avx2")]
        fn broadcast(k: [u64; 2]) -> __m256i {
            _mm256_broadcastsi128_si256(_mm_set_epi64x(k[1] as i64, k[0] as i64))
        }

        /// The last 16-byte lane (distance 0), byte-reversed if needed and xored with `f` (the
        /// carried-in register when this lane is the first one), times its constants.
        #[inline]
        #[target_feature(enable = "avx2,pclmulqdq")]
        fn last_lane(
            lanes: &'static LaneTable,
            reflected: bool,
            v: __m128i,
            f: __m128i,
        ) -> __m128i {
            let v = if reflected {
                v
            } else {
                _mm_shuffle_epi8(v, bswap128())
            };
            let v = _mm_xor_si128(v, f);
            // SAFETY: entry MAX_DIST/16 (distance 0) is inside the table.
            let k = unsafe { _mm_loadu_si128(lanes.0.as_ptr().add(MAX_DIST / 16) as *const _) };
            _mm_xor_si128(
                _mm_clmulepi64_si128(v, k, 0x00),
                _mm_clmulepi64_si128(v, k, 0x11),
            )
        }

        #[inline]
        #[target_feature(enable = "avx2")]
        fn halves(s: __m256i) -> __m128i {
            _mm_xor_si128(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1))
        }

        /// Fold `m` bytes (a multiple of 16, at least 16) at `src` into the CRC register
        /// `state`; with `COPY`, also store every loaded byte to `dst`, from the same
        /// registers.
        ///
        /// # Safety
        /// The CPU must support the enabled features ([`super::available_avx2`]); `src` must
        /// be valid for reads of `m` bytes and, with `COPY`, `dst` valid for writes of `m`
        /// bytes. No alignment is required (unaligned loads/stores only).
        #[inline]
        #[target_feature(enable = "avx2,vpclmulqdq,pclmulqdq,sse4.1")]
        unsafe fn kernel<S: Spec, const COPY: bool>(
            src: *const u8,
            dst: *mut u8,
            m: usize,
            state: u64,
        ) -> u64 {
            debug_assert!(m >= 16 && m & 15 == 0);
            let table = S::lanes();
            let load = |off: usize| -> __m256i {
                // SAFETY: callers pass off + 32 <= m; src is valid for m bytes.
                unsafe { _mm256_loadu_si256(src.add(off) as *const _) }
            };
            let store = |off: usize, v: __m256i| {
                if COPY {
                    // SAFETY: callers pass off + 32 <= m; dst is valid for m bytes.
                    unsafe { _mm256_storeu_si256(dst.add(off) as *mut _, v) };
                }
            };
            let zero = _mm256_setzero_si256();
            let mut off = 0usize;
            let mut sum = zero;
            let mut first = inject(S::REFLECTED, state);
            if m >= 256 {
                // Eight accumulators (256 bytes), each advanced by x^2048 per step. Four would
                // hide the clmul latency, but measured on Zen 3 eight are 3–6 % faster for
                // CRC-16 (more independent work around the byte shuffles), equal for CRC-64.
                // Stores go right after each load: eight pending registers would not fit.
                let mut a: [__m256i; 8] = std::array::from_fn(|i| {
                    let raw = load(32 * i);
                    store(32 * i, raw);
                    prep(raw, S::REFLECTED)
                });
                a[0] = _mm256_xor_si256(a[0], first);
                first = zero;
                off = 256;
                let k = broadcast(S::FOLD256);
                while m - off >= 256 {
                    for (i, x) in a.iter_mut().enumerate() {
                        let raw = load(off + 32 * i);
                        store(off + 32 * i, raw);
                        *x = mul_add(*x, k, prep(raw, S::REFLECTED));
                    }
                    off += 256;
                }
                // The accumulators hold bytes [off-256, off): carry each lane to the end.
                let t = m - off;
                for (i, x) in a.into_iter().enumerate() {
                    sum = mul_add(x, lane_k(table, t + 240 - 32 * i), sum);
                }
            }
            while m - off >= 32 {
                let raw = load(off);
                store(off, raw);
                let v = _mm256_xor_si256(prep(raw, S::REFLECTED), first);
                first = zero;
                sum = mul_add(v, lane_k(table, m - off - 16), sum);
                off += 32;
            }
            let mut w = halves(sum);
            if off < m {
                // Exactly one 16-byte lane left.
                // SAFETY: off + 16 == m; src is valid for m bytes.
                let raw = unsafe { _mm_loadu_si128(src.add(off) as *const _) };
                if COPY {
                    // SAFETY: as above, for dst.
                    unsafe { _mm_storeu_si128(dst.add(off) as *mut _, raw) };
                }
                // `first` is still set only when m == 16: the register goes into this lane.
                let f = _mm256_castsi256_si128(first);
                w = _mm_xor_si128(w, last_lane(table, S::REFLECTED, raw, f));
            }
            reduce::<S>(w)
        }

        /// Two CRC registers from the same loads, as the zmm `dual_kernel`: four ymm
        /// accumulators per CRC over 128-byte blocks.
        ///
        /// # Safety
        /// The CPU must support the enabled features ([`super::available_avx2`]); `src` must
        /// be valid for reads of `m` bytes. No alignment is required.
        #[inline]
        #[target_feature(enable = "avx2,vpclmulqdq,pclmulqdq,sse4.1")]
        unsafe fn dual_kernel<A: Spec, B: Spec>(
            src: *const u8,
            m: usize,
            sa: u64,
            sb: u64,
        ) -> (u64, u64) {
            debug_assert!(m >= 16 && m & 15 == 0);
            let (ta, tb) = (A::lanes(), B::lanes());
            let load = |off: usize| -> __m256i {
                // SAFETY: callers pass off + 32 <= m; src is valid for m bytes.
                unsafe { _mm256_loadu_si256(src.add(off) as *const _) }
            };
            let zero = _mm256_setzero_si256();
            let mut off = 0usize;
            let (mut suma, mut sumb) = (zero, zero);
            let (mut fa, mut fb) = (inject(A::REFLECTED, sa), inject(B::REFLECTED, sb));
            if m >= 128 {
                let raw = [load(0), load(32), load(64), load(96)];
                let mut a = raw.map(|v| prep(v, A::REFLECTED));
                let mut b = raw.map(|v| prep(v, B::REFLECTED));
                a[0] = _mm256_xor_si256(a[0], fa);
                b[0] = _mm256_xor_si256(b[0], fb);
                (fa, fb) = (zero, zero);
                off = 128;
                let (ka, kb) = (broadcast(A::FOLD128), broadcast(B::FOLD128));
                while m - off >= 128 {
                    for i in 0..4 {
                        let raw = load(off + 32 * i);
                        a[i] = mul_add(a[i], ka, prep(raw, A::REFLECTED));
                        b[i] = mul_add(b[i], kb, prep(raw, B::REFLECTED));
                    }
                    off += 128;
                }
                let t = m - off;
                for i in 0..4 {
                    suma = mul_add(a[i], lane_k(ta, t + 112 - 32 * i), suma);
                    sumb = mul_add(b[i], lane_k(tb, t + 112 - 32 * i), sumb);
                }
            }
            while m - off >= 32 {
                let raw = load(off);
                let va = _mm256_xor_si256(prep(raw, A::REFLECTED), fa);
                let vb = _mm256_xor_si256(prep(raw, B::REFLECTED), fb);
                (fa, fb) = (zero, zero);
                suma = mul_add(va, lane_k(ta, m - off - 16), suma);
                sumb = mul_add(vb, lane_k(tb, m - off - 16), sumb);
                off += 32;
            }
            let (mut wa, mut wb) = (halves(suma), halves(sumb));
            if off < m {
                // SAFETY: off + 16 == m; src is valid for m bytes.
                let raw = unsafe { _mm_loadu_si128(src.add(off) as *const _) };
                let (f1, f2) = (_mm256_castsi256_si128(fa), _mm256_castsi256_si128(fb));
                wa = _mm_xor_si128(wa, last_lane(ta, A::REFLECTED, raw, f1));
                wb = _mm_xor_si128(wb, last_lane(tb, B::REFLECTED, raw, f2));
            }
            (reduce::<A>(wa), reduce::<B>(wb))
        }

        entry_points!(
            "avx2,vpclmulqdq,pclmulqdq,sse4.1",
            "super::available_avx2",
            kernel,
            dual_kernel
        );
    }
}

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
