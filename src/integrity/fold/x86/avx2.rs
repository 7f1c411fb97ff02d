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
fn last_lane(lanes: &'static LaneTable, reflected: bool, v: __m128i, f: __m128i) -> __m128i {
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
unsafe fn dual_kernel<A: Spec, B: Spec>(src: *const u8, m: usize, sa: u64, sb: u64) -> (u64, u64) {
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
