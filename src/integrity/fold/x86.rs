//! x86-64 carry-less-multiply folding kernels (AVX-512 on zmm here; AVX2 + VPCLMULQDQ on
//! ymm in `avx2`), and the CPU feature detection that picks between them.

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
/// As [`kernel_n`], for one stream.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,vpclmulqdq,pclmulqdq,sse4.1")]
unsafe fn kernel<S: Spec, const COPY: bool>(
    src: *const u8,
    dst: *mut u8,
    m: usize,
    state: u64,
) -> u64 {
    // SAFETY: the caller's contract, for one stream.
    unsafe { kernel_n::<S, COPY, 1>([src], [dst], m, [state])[0] }
}

/// [`kernel`] over `N` independent streams of `m` bytes each (`N` intervals of one
/// request), their instructions interleaved: a short interval's fixed cost — the dependent
/// chain from the last fold through the lane sum and the Barrett reduction, about 40 cycles
/// — overlaps the other streams' folding instead of waiting for the next call.
///
/// # Safety
/// The CPU must support the enabled features ([`available`]); every `src[j]` must be valid
/// for reads of `m` bytes and, with `COPY`, every `dst[j]` valid for writes of `m` bytes,
/// not overlapping any source. No alignment is required (unaligned and masked loads/stores
/// only).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,vpclmulqdq,pclmulqdq,sse4.1")]
unsafe fn kernel_n<S: Spec, const COPY: bool, const N: usize>(
    src: [*const u8; N],
    dst: [*mut u8; N],
    m: usize,
    state: [u64; N],
) -> [u64; N] {
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
    // With COPY: store stream j's four raw 64-byte blocks at `off`.
    let store4 = |j: usize, off: usize, v: [__m512i; 4]| {
        if COPY {
            for (i, x) in v.iter().enumerate() {
                // SAFETY: callers pass off + 256 <= m; dst[j] is valid for m bytes.
                unsafe { _mm512_storeu_si512(dst[j].add(off + 64 * i) as *mut _, *x) };
            }
        }
    };
    // Stream j's four raw 64-byte loads at `off`. With COPY, the kernel stores each group
    // only after loading the next one (`pending`), so no load waits behind a store that may
    // alias it in the low 12 address bits (4K aliasing); measured +12% at 512 B.
    let load4 = |j: usize, off: usize| -> [__m512i; 4] {
        // SAFETY: callers pass off + 256 <= m; src[j] is valid for m bytes.
        unsafe {
            [
                _mm512_loadu_si512(src[j].add(off) as *const _),
                _mm512_loadu_si512(src[j].add(off + 64) as *const _),
                _mm512_loadu_si512(src[j].add(off + 128) as *const _),
                _mm512_loadu_si512(src[j].add(off + 192) as *const _),
            ]
        }
    };
    // Byte reversal if needed.
    let prep = |x: __m512i| -> __m512i {
        if S::REFLECTED {
            x
        } else {
            _mm512_shuffle_epi8(x, bswap)
        }
    };
    // Stream j's 64-byte load (+ store) at `off`, byte-reversed if needed.
    let load = |j: usize, off: usize| -> __m512i {
        // SAFETY: callers pass off + 64 <= m; src[j]/dst[j] are valid for m bytes.
        let v = unsafe { _mm512_loadu_si512(src[j].add(off) as *const _) };
        if COPY {
            // SAFETY: as above, for dst[j].
            unsafe { _mm512_storeu_si512(dst[j].add(off) as *mut _, v) };
        }
        prep(v)
    };
    // The carried-in register goes into the top bits of the first block: qword 0 of the
    // first lane (reflected), or its top 16 bits after byte reversal (not reflected).
    let mut first = state.map(|st| {
        if S::REFLECTED {
            _mm512_zextsi128_si512(_mm_cvtsi64_si128(st as i64))
        } else {
            _mm512_zextsi128_si512(_mm_set_epi64x((st << 48) as i64, 0))
        }
    });

    let zero = _mm512_setzero_si512();
    let mut off = 0usize;
    let mut sum = [zero; N];
    if m >= 256 {
        let mut pending = [[zero; 4]; N];
        let mut acc = [[zero; 4]; N];
        for j in 0..N {
            pending[j] = load4(j, 0);
            acc[j] = pending[j].map(prep);
            acc[j][0] = _mm512_xor_si512(acc[j][0], first[j]);
            first[j] = zero;
        }
        off = 256;
        let k = _mm512_broadcast_i32x4(_mm_set_epi64x(S::FOLD256[1] as i64, S::FOLD256[0] as i64));
        while m - off >= 256 {
            for j in 0..N {
                let raw = load4(j, off);
                store4(j, off - 256, pending[j]);
                pending[j] = raw;
                for i in 0..4 {
                    acc[j][i] = mul_add(acc[j][i], k, prep(raw[i]));
                }
            }
            off += 256;
        }
        // The accumulators hold bytes [off-256, off): carry each lane to the end.
        let t = m - off;
        for j in 0..N {
            store4(j, off - 256, pending[j]);
            for (i, a) in acc[j].iter().enumerate() {
                sum[j] = mul_add(*a, lane_k(t + 240 - 64 * i), sum[j]);
            }
        }
    }
    while m - off >= 64 {
        let k = lane_k(m - off - 16);
        for j in 0..N {
            let v = _mm512_xor_si512(load(j, off), first[j]);
            first[j] = zero;
            sum[j] = mul_add(v, k, sum[j]);
        }
        off += 64;
    }
    if off < m {
        // 1 to 3 lanes left: masked load (+ store); the zeroed lanes contribute nothing.
        let mask: __mmask8 = (1u8 << ((m - off) / 8)) - 1;
        let k = lane_k(m - off - 16);
        for j in 0..N {
            // SAFETY: the mask enables exactly the qwords of [off, m), inside src[j] and
            // dst[j]; masked-off elements are neither read nor written.
            let v = unsafe { _mm512_maskz_loadu_epi64(mask, src[j].add(off) as *const _) };
            if COPY {
                // SAFETY: as above.
                unsafe { _mm512_mask_storeu_epi64(dst[j].add(off) as *mut _, mask, v) };
            }
            let v = _mm512_xor_si512(prep(v), first[j]);
            sum[j] = mul_add(v, k, sum[j]);
        }
    }

    // Sum the four lanes: w ≡ M·x^k (mod P).
    sum.map(|s| reduce::<S>(sum_lanes(s)))
}

/// The xor of a zmm register's four 128-bit lanes.
#[inline]
#[target_feature(enable = "avx512f,avx512vl")]
fn sum_lanes(s: __m512i) -> __m128i {
    _mm_ternarylogic_epi64(
        _mm512_castsi512_si128(s),
        _mm512_extracti32x4_epi32(s, 1),
        _mm_xor_si128(
            _mm512_extracti32x4_epi32(s, 2),
            _mm512_extracti32x4_epi32(s, 3),
        ),
        0x96,
    )
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
unsafe fn dual_kernel<A: Spec, B: Spec>(src: *const u8, m: usize, sa: u64, sb: u64) -> (u64, u64) {
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
        let ka = _mm512_broadcast_i32x4(_mm_set_epi64x(A::FOLD256[1] as i64, A::FOLD256[0] as i64));
        let kb = _mm512_broadcast_i32x4(_mm_set_epi64x(B::FOLD256[1] as i64, B::FOLD256[0] as i64));
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
    (reduce::<A>(sum_lanes(suma)), reduce::<B>(sum_lanes(sumb)))
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
                let no_copy = std::ptr::null_mut();
                // SAFETY: features enabled (caller contract); data is valid for
                // m <= len bytes.
                crc = unsafe { $kernel::<Nvme, false>(data.as_ptr(), no_copy, m, crc) };
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

/// Copy `N` intervals of equal length (a multiple of 16) and return the CRC register of
/// each, `init` to start, from one interleaved pass ([`kernel_n`]): CRC-16/T10-DIF for `S` =
/// [`T10Dif`], CRC-64/NVME for [`Nvme`] (registers as the single-interval entry points use
/// them).
///
/// # Safety
/// [`available`] must have returned true. Panics unless every length is the same non-zero
/// multiple of 16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,vpclmulqdq,pclmulqdq,sse4.1")]
pub(crate) unsafe fn copy_update_n<S: Spec, const N: usize>(
    init: u64,
    dst: [&mut [u8]; N],
    src: [&[u8]; N],
) -> [u64; N] {
    let m = src[0].len();
    assert!(
        m != 0
            && m.is_multiple_of(16)
            && src.iter().all(|s| s.len() == m)
            && dst.iter().all(|d| d.len() == m),
        "copy+crc x{N}: lengths must be equal multiples of 16"
    );
    let d = dst.map(|d| d.as_mut_ptr());
    // SAFETY: features enabled (caller contract); each source is readable and each
    // destination writable for m bytes, and `&mut` guarantees no destination overlaps
    // another buffer.
    unsafe { kernel_n::<S, true, N>(src.map(|s| s.as_ptr()), d, m, [init; N]) }
}

/// The same kernels on 256-bit vectors: AVX2 + VPCLMULQDQ on ymm (PCLMULQDQ/SSE4.1 for
/// the reduction), for CPUs without AVX-512 such as AMD Zen 3. Same lane tables, same
/// carried-register contract. On Zen 3 a ymm clmul has 4-cycle latency and issues every 2
/// cycles, so two accumulators would hide the latency; the single-CRC kernel uses eight
/// (256-byte steps, x^2048), the dual kernel four per CRC (128-byte steps, x^1024).
pub(crate) mod avx2;
