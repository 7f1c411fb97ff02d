//! Guard checksums: CRC-16/T10-DIF and CRC-64/NVME.
//!
//! Three levels, chosen once per process (`Level`; then one relaxed atomic load per call):
//! on x86-64 CPUs with AVX-512 and VPCLMULQDQ the carry-less-multiply folding kernels in
//! `super::fold` on zmm; else, with AVX2 and VPCLMULQDQ (AMD Zen 3, Intel client cores), the
//! same kernels on ymm; elsewhere the `crc-fast` crate ([`portable`]). The fused copy functions
//! load each block of the source into SIMD registers once, store it to the destination and
//! fold the same registers into the CRC: one pass over the data. [`crc16_t10dif_and_crc64_nvme`]
//! folds both polynomials from the same loads (the T10 guard plus a 64-bit change digest for
//! zero-copy writes).
//!
//! `benches/crc.rs` measures these against ISA-L and the `crc` crate (docs/ROOFLINE.md
//! explains the ceilings); tests cross-check every level against the `crc` crate's table
//! implementation, the reference.

#[cfg(target_arch = "x86_64")]
use super::fold::x86;

/// Which implementation computes the guards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Level {
    /// zmm kernels: `x86::available()` returned true.
    Avx512,
    /// ymm kernels: `x86::available_avx2()` returned true.
    Avx2,
    /// `crc-fast`.
    Portable,
}

/// The best level this CPU supports (detected once, in `fold::x86`).
#[inline]
fn level() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        if x86::available() {
            return Level::Avx512;
        }
        if x86::available_avx2() {
            return Level::Avx2;
        }
    }
    Level::Portable
}

/// Every level this CPU supports, best first (for tests that force each one).
#[cfg(test)]
fn levels() -> Vec<Level> {
    let mut v = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if x86::available() {
            v.push(Level::Avx512);
        }
        if x86::available_avx2() {
            v.push(Level::Avx2);
        }
    }
    v.push(Level::Portable);
    v
}

// The `*_at` functions run one level. Callers pass `level()` or, in tests, an entry of
// `levels()`: a SIMD level is only ever passed after its detection function returned true,
// which is the contract of every `x86` entry point called below.

/// CRC-16/T10-DIF register update (not reflected, so the register is the CRC itself).
#[inline]
fn t10dif_update_at(l: Level, state: u16, data: &[u8]) -> u16 {
    match l {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Level::Avx512 only comes from x86::available() returning true.
        Level::Avx512 => unsafe { x86::t10dif_update(state, data) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Level::Avx2 only comes from x86::available_avx2() returning true.
        Level::Avx2 => unsafe { x86::avx2::t10dif_update(state, data) },
        _ => portable::t10dif_update(state, data),
    }
}

/// CRC-64/NVME register update (reflected register; the CRC is `register ^ !0`).
#[inline]
fn nvme_update_at(l: Level, state: u64, data: &[u8]) -> u64 {
    match l {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Level::Avx512 only comes from x86::available() returning true.
        Level::Avx512 => unsafe { x86::nvme_update(state, data) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Level::Avx2 only comes from x86::available_avx2() returning true.
        Level::Avx2 => unsafe { x86::avx2::nvme_update(state, data) },
        _ => portable::nvme_update(state, data),
    }
}

/// Copy `src` to `dst` (same length, checked by the caller) and update the CRC-16 register.
#[inline]
fn t10dif_copy_update_at(l: Level, state: u16, dst: &mut [u8], src: &[u8]) -> u16 {
    match l {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Level::Avx512 only comes from x86::available() returning true.
        Level::Avx512 => unsafe { x86::t10dif_copy_update(state, dst, src) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Level::Avx2 only comes from x86::available_avx2() returning true.
        Level::Avx2 => unsafe { x86::avx2::t10dif_copy_update(state, dst, src) },
        _ => {
            dst.copy_from_slice(src);
            portable::t10dif_update(state, dst)
        }
    }
}

/// Copy `src` to `dst` (same length, checked by the caller) and update the CRC-64 register.
#[inline]
fn nvme_copy_update_at(l: Level, state: u64, dst: &mut [u8], src: &[u8]) -> u64 {
    match l {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Level::Avx512 only comes from x86::available() returning true.
        Level::Avx512 => unsafe { x86::nvme_copy_update(state, dst, src) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Level::Avx2 only comes from x86::available_avx2() returning true.
        Level::Avx2 => unsafe { x86::avx2::nvme_copy_update(state, dst, src) },
        _ => {
            dst.copy_from_slice(src);
            portable::nvme_update(state, dst)
        }
    }
}

/// Both registers over `data`, from one read of it. `data` may be guest memory the guest
/// changes meanwhile, and a guard and a digest from two looks could describe two different
/// buffers: a guard of A stored for data B that the after-completion digest check passes.
/// The SIMD kernels fold both from the same loads; the tail they leave (under 16 bytes) and
/// the portable level, which runs the two CRCs one after the other, work on a private copy.
#[inline]
fn t10dif_nvme_update_at(l: Level, s16: u16, s64: u64, data: &[u8]) -> (u16, u64) {
    let whole = data.len() & !15;
    let (body, tail) = data.split_at(whole);
    let (s16, s64) = match l {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Level::Avx512 only comes from x86::available() returning true.
        Level::Avx512 => unsafe { x86::t10dif_nvme_update(s16, s64, body) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Level::Avx2 only comes from x86::available_avx2() returning true.
        Level::Avx2 => unsafe { x86::avx2::t10dif_nvme_update(s16, s64, body) },
        _ => return portable::t10dif_nvme_update(s16, s64, data),
    };
    portable::t10dif_nvme_update(s16, s64, tail)
}

#[inline]
fn t10dif_update(state: u16, data: &[u8]) -> u16 {
    t10dif_update_at(level(), state, data)
}

#[inline]
fn nvme_update(state: u64, data: &[u8]) -> u64 {
    nvme_update_at(level(), state, data)
}

/// Which implementation this CPU uses: `"avx512"`, `"avx2"` or `"portable"` (for logs and
/// benches).
pub fn implementation() -> &'static str {
    match level() {
        Level::Avx512 => "avx512",
        Level::Avx2 => "avx2",
        Level::Portable => "portable",
    }
}

/// CRC-16/T10-DIF: the guard of T10 Type 1/2/3 protection information.
#[inline]
pub fn crc16_t10dif(data: &[u8]) -> u16 {
    t10dif_update(0, data)
}

/// CRC-64/NVME: the guard of the NVMe 64-bit-guard protection format.
#[inline]
pub fn crc64_nvme(data: &[u8]) -> u64 {
    nvme_update(!0, data) ^ !0
}

/// `(crc16_t10dif(data), crc64_nvme(data))` in one pass: every block is loaded once and
/// folded into both CRCs. For zero-copy PI writes: the T10 guard, plus a 64-bit digest that
/// later tells whether the guest changed the buffer. (Both CRCs' carry-less multiplies still
/// run, so on a CLMUL-bound CPU this is about as fast as the two CRCs back to back on data
/// already in cache; it saves the second pass over memory.)
#[inline]
pub fn crc16_t10dif_and_crc64_nvme(data: &[u8]) -> (u16, u64) {
    let (a, b) = t10dif_nvme_update_at(level(), 0, !0, data);
    (a, b ^ !0)
}

/// Copy one protection interval from `src` to `dst` and return its CRC-16/T10-DIF guard,
/// computed over the bytes as written to `dst` (the bytes that will reach the disk), in one
/// pass: every block is loaded once, stored, and folded from the same registers.
///
/// Panics if the lengths differ. Any length works; multiples of 16 (best: 256) are fastest.
#[inline]
pub fn copy_crc16_t10dif(dst: &mut [u8], src: &[u8]) -> u16 {
    assert_eq!(dst.len(), src.len(), "copy_crc16_t10dif: length mismatch");
    t10dif_copy_update_at(level(), 0, dst, src)
}

/// As [`copy_crc16_t10dif`], with the CRC-64/NVME guard.
#[inline]
pub fn copy_crc64_nvme(dst: &mut [u8], src: &[u8]) -> u64 {
    assert_eq!(dst.len(), src.len(), "copy_crc64_nvme: length mismatch");
    nvme_copy_update_at(level(), !0, dst, src) ^ !0
}

/// [`copy_crc16_t10dif`] of two intervals of equal length at once: on AVX-512 one
/// interleaved pass, so each short interval's fixed cost overlaps the other's work.
///
/// Panics if a destination's length differs from its source's.
#[inline]
pub fn copy_crc16_t10dif_x2(dst: [&mut [u8]; 2], src: [&[u8]; 2]) -> [u16; 2] {
    #[cfg(target_arch = "x86_64")]
    if level() == Level::Avx512 && pairable(&dst, &src) {
        // SAFETY: Level::Avx512 only comes from x86::available() returning true.
        let r = unsafe { x86::copy_update_n::<super::fold::x86::T10Dif, 2>(0, dst, src) };
        return r.map(|g| g as u16);
    }
    let [d0, d1] = dst;
    [copy_crc16_t10dif(d0, src[0]), copy_crc16_t10dif(d1, src[1])]
}

/// [`copy_crc64_nvme`] of two intervals of equal length at once (see
/// [`copy_crc16_t10dif_x2`]).
#[inline]
pub fn copy_crc64_nvme_x2(dst: [&mut [u8]; 2], src: [&[u8]; 2]) -> [u64; 2] {
    #[cfg(target_arch = "x86_64")]
    if level() == Level::Avx512 && pairable(&dst, &src) {
        // SAFETY: Level::Avx512 only comes from x86::available() returning true.
        let r = unsafe { x86::copy_update_n::<super::fold::x86::Nvme, 2>(!0, dst, src) };
        return r.map(|g| g ^ !0);
    }
    let [d0, d1] = dst;
    [copy_crc64_nvme(d0, src[0]), copy_crc64_nvme(d1, src[1])]
}

/// Whether two copies can share the interleaved kernel: four equal lengths, whole
/// 16-byte blocks.
#[cfg(target_arch = "x86_64")]
fn pairable(dst: &[&mut [u8]; 2], src: &[&[u8]; 2]) -> bool {
    let m = src[0].len();
    m != 0 && m.is_multiple_of(16) && src[1].len() == m && dst[0].len() == m && dst[1].len() == m
}

/// Incremental CRC-16/T10-DIF, for an interval split over several buffers:
/// `new()`, `update()` per piece in order, `finish()`. Equal to [`crc16_t10dif`] of the
/// concatenation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Crc16T10Dif {
    state: u16,
}

impl Crc16T10Dif {
    pub const fn new() -> Self {
        Self { state: 0 }
    }

    #[inline]
    pub fn update(&mut self, data: &[u8]) {
        self.state = t10dif_update(self.state, data);
    }

    /// Copy `src` to `dst` (same length) and add the bytes to the CRC, in one pass.
    #[inline]
    pub fn copy_update(&mut self, dst: &mut [u8], src: &[u8]) {
        assert_eq!(dst.len(), src.len(), "copy_update: length mismatch");
        self.state = t10dif_copy_update_at(level(), self.state, dst, src);
    }

    #[inline]
    pub fn finish(&self) -> u16 {
        self.state
    }
}

/// Incremental CRC-64/NVME; see [`Crc16T10Dif`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Crc64Nvme {
    state: u64,
}

impl Default for Crc64Nvme {
    fn default() -> Self {
        Self::new()
    }
}

impl Crc64Nvme {
    pub const fn new() -> Self {
        Self { state: !0 }
    }

    #[inline]
    pub fn update(&mut self, data: &[u8]) {
        self.state = nvme_update(self.state, data);
    }

    /// Copy `src` to `dst` (same length) and add the bytes to the CRC, in one pass.
    #[inline]
    pub fn copy_update(&mut self, dst: &mut [u8], src: &[u8]) {
        assert_eq!(dst.len(), src.len(), "copy_update: length mismatch");
        self.state = nvme_copy_update_at(level(), self.state, dst, src);
    }

    #[inline]
    pub fn finish(&self) -> u64 {
        self.state ^ !0
    }
}

/// The portable path (any CPU): the `crc-fast` crate, which carries the same CRC registers
/// as the SIMD kernels (verified by the tests). Public so tests and benches can compare.
pub mod portable {
    use crc_fast::{CrcAlgorithm, Digest};

    /// CRC-16/T10-DIF register update.
    pub fn t10dif_update(state: u16, data: &[u8]) -> u16 {
        if state == 0 {
            return crc_fast::checksum(CrcAlgorithm::Crc16T10Dif, data) as u16;
        }
        let mut d = Digest::new_with_init_state(CrcAlgorithm::Crc16T10Dif, state as u64);
        d.update(data);
        d.get_state() as u16
    }

    /// CRC-64/NVME reflected-register update.
    pub fn nvme_update(state: u64, data: &[u8]) -> u64 {
        if state == !0 {
            return crc_fast::checksum(CrcAlgorithm::Crc64Nvme, data) ^ !0;
        }
        let mut d = Digest::new_with_init_state(CrcAlgorithm::Crc64Nvme, state);
        d.update(data);
        d.get_state()
    }

    /// Both registers over `data`, read once: each block is copied to the stack and both
    /// CRCs run over the copy (see `t10dif_nvme_update_at` for why).
    pub fn t10dif_nvme_update(s16: u16, s64: u64, data: &[u8]) -> (u16, u64) {
        /// Big enough to amortise the per-update set-up, small enough to stay in L1.
        const STAGE: usize = 4096;
        if data.is_empty() {
            return (s16, s64);
        }
        let mut d16 = Digest::new_with_init_state(CrcAlgorithm::Crc16T10Dif, u64::from(s16));
        let mut d64 = Digest::new_with_init_state(CrcAlgorithm::Crc64Nvme, s64);
        let mut stage = [0u8; STAGE];
        for block in data.chunks(STAGE) {
            let copy = &mut stage[..block.len()];
            copy.copy_from_slice(block);
            d16.update(copy);
            d64.update(copy);
        }
        (d16.get_state() as u16, d64.get_state())
    }

    pub fn crc16_t10dif(data: &[u8]) -> u16 {
        t10dif_update(0, data)
    }

    pub fn crc64_nvme(data: &[u8]) -> u64 {
        nvme_update(!0, data) ^ !0
    }
}

/// Copy `src` into `dst` interval by interval, computing each interval's guard right after
/// copying it, while it is still in L1 cache: one pass over memory instead of two.
/// `guards` receives one guard per interval. Lengths must be whole intervals.
/// (For the guardblk CRCs, [`copy_with_guards_fused`] with [`copy_crc16_t10dif`] or
/// [`copy_crc64_nvme`] does copy and CRC from the same registers.)
pub fn copy_with_guards<G>(
    dst: &mut [u8],
    src: &[u8],
    interval: usize,
    guard: impl Fn(&[u8]) -> G,
    guards: &mut Vec<G>,
) {
    copy_with_guards_fused(
        dst,
        src,
        interval,
        |d, s| {
            d.copy_from_slice(s);
            guard(d)
        },
        guards,
    )
}

/// As [`copy_with_guards`], with a fused copy+guard function such as [`copy_crc16_t10dif`].
pub fn copy_with_guards_fused<G>(
    dst: &mut [u8],
    src: &[u8],
    interval: usize,
    copy_guard: impl Fn(&mut [u8], &[u8]) -> G,
    guards: &mut Vec<G>,
) {
    assert_eq!(dst.len(), src.len(), "copy_with_guards: length mismatch");
    assert_eq!(
        src.len() % interval,
        0,
        "copy_with_guards: partial interval"
    );
    for (d, s) in dst
        .chunks_exact_mut(interval)
        .zip(src.chunks_exact(interval))
    {
        guards.push(copy_guard(d, s));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CRC16_REF: crc::Crc<u16> = crc::Crc::<u16>::new(&crc::CRC_16_T10_DIF);
    const CRC64_REF: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_NVME);

    #[test]
    fn known_answers() {
        assert_eq!(crc16_t10dif(b"123456789"), 0xD0DB);
        assert_eq!(crc64_nvme(b"123456789"), 0xAE8B_1486_0A79_9888);
        assert_eq!(portable::crc16_t10dif(b"123456789"), 0xD0DB);
        assert_eq!(portable::crc64_nvme(b"123456789"), 0xAE8B_1486_0A79_9888);
    }

    /// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn check(data: &[u8], what: &str) {
        let (r16, r64) = (CRC16_REF.checksum(data), CRC64_REF.checksum(data));
        assert_eq!(crc16_t10dif(data), r16, "crc16, {what}");
        assert_eq!(crc64_nvme(data), r64, "crc64, {what}");
        assert_eq!(portable::crc16_t10dif(data), r16, "portable crc16, {what}");
        assert_eq!(portable::crc64_nvme(data), r64, "portable crc64, {what}");
        let mut dst = vec![0u8; data.len()];
        assert_eq!(copy_crc16_t10dif(&mut dst, data), r16, "copy crc16, {what}");
        assert_eq!(dst, data, "copy crc16 bytes, {what}");
        let mut dst = vec![0xA5u8; data.len()];
        assert_eq!(copy_crc64_nvme(&mut dst, data), r64, "copy crc64, {what}");
        assert_eq!(dst, data, "copy crc64 bytes, {what}");
        // Two at once: the second interval differs from the first (reversed bytes).
        let other: Vec<u8> = data.iter().rev().copied().collect();
        let (o16, o64) = (CRC16_REF.checksum(&other), CRC64_REF.checksum(&other));
        let (mut d0, mut d1) = (vec![0u8; data.len()], vec![0x5Au8; data.len()]);
        assert_eq!(
            copy_crc16_t10dif_x2([&mut d0, &mut d1], [data, &other]),
            [r16, o16],
            "copy crc16 x2, {what}"
        );
        assert!(d0 == data && d1 == other, "copy crc16 x2 bytes, {what}");
        let (mut d0, mut d1) = (vec![0u8; data.len()], vec![0x5Au8; data.len()]);
        assert_eq!(
            copy_crc64_nvme_x2([&mut d0, &mut d1], [data, &other]),
            [r64, o64],
            "copy crc64 x2, {what}"
        );
        assert!(d0 == data && d1 == other, "copy crc64 x2 bytes, {what}");
    }

    #[test]
    fn simd_path_is_used_where_supported() {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("vpclmulqdq")
        {
            assert_eq!(level(), Level::Avx512);
        }
        #[cfg(target_arch = "x86_64")]
        if !std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("vpclmulqdq")
        {
            assert_eq!(level(), Level::Avx2);
        }
        // Portable is always there; a SIMD level is listed iff its detection said so.
        assert_eq!(levels().last(), Some(&Level::Portable));
        assert_eq!(levels()[0], level());
    }

    /// Every computation of one level against the reference, for `data`.
    fn check_at(l: Level, data: &[u8], what: &str) {
        let (r16, r64) = (CRC16_REF.checksum(data), CRC64_REF.checksum(data));
        assert_eq!(t10dif_update_at(l, 0, data), r16, "{l:?} crc16, {what}");
        assert_eq!(nvme_update_at(l, !0, data) ^ !0, r64, "{l:?} crc64, {what}");
        let (d16, d64) = t10dif_nvme_update_at(l, 0, !0, data);
        assert_eq!((d16, d64 ^ !0), (r16, r64), "{l:?} dual, {what}");
        let mut dst = vec![0x5Au8; data.len()];
        assert_eq!(
            t10dif_copy_update_at(l, 0, &mut dst, data),
            r16,
            "{l:?} copy crc16, {what}"
        );
        assert_eq!(dst, data, "{l:?} copy crc16 bytes, {what}");
        let mut dst = vec![0xA5u8; data.len()];
        assert_eq!(
            nvme_copy_update_at(l, !0, &mut dst, data) ^ !0,
            r64,
            "{l:?} copy crc64, {what}"
        );
        assert_eq!(dst, data, "{l:?} copy crc64 bytes, {what}");
    }

    #[test]
    fn every_level_every_length_up_to_600_and_big_ones() {
        for l in levels() {
            for len in 0..=600usize {
                check_at(l, &noise(len, len as u64 + 11), &format!("len {len}"));
            }
            for len in [
                1008usize,
                1024,
                4080,
                4096,
                4104,
                4112,
                4128,
                8192 + 48,
                65536,
                65536 + 13,
                1 << 20,
            ] {
                check_at(l, &noise(len, len as u64 * 5), &format!("len {len}"));
            }
            for len in [16usize, 32, 128, 512, 4096] {
                check_at(l, &vec![0u8; len], &format!("zeros {len}"));
                check_at(l, &vec![0xFFu8; len], &format!("ones {len}"));
            }
        }
    }

    #[test]
    fn every_level_misaligned_source_and_destination() {
        let big = noise(4096 + 8 + 128, 77);
        for l in levels() {
            for offset in 0..64usize {
                for len in [
                    0usize, 5, 16, 32, 48, 100, 128, 144, 256, 512, 520, 4096, 4104,
                ] {
                    let s = &big[offset..offset + len];
                    check_at(l, s, &format!("offset {offset} len {len}"));
                    let mut out = vec![0u8; len + 64];
                    let d = &mut out[64 - offset..64 - offset + len];
                    assert_eq!(t10dif_copy_update_at(l, 0, d, s), CRC16_REF.checksum(s));
                    assert_eq!(d, s, "{l:?} offset {offset} len {len}");
                    let d = &mut out[(offset * 7) % 64..(offset * 7) % 64 + len];
                    assert_eq!(nvme_copy_update_at(l, !0, d, s) ^ !0, CRC64_REF.checksum(s));
                    assert_eq!(d, s, "{l:?} offset {offset} len {len}");
                }
            }
        }
    }

    #[test]
    fn every_level_carries_registers() {
        for l in levels() {
            // Arbitrary carried-in registers, against the byte tables.
            for len in [0usize, 3, 16, 32, 48, 112, 128, 144, 255, 256, 600, 4104] {
                let data = noise(len, 3 + len as u64);
                for state in [0u64, 1, 0xFFFF, 0x1234, !0, 0xDEAD_BEEF_0BAD_F00D] {
                    let t16 = super::super::fold::t10dif::update_table(state as u16, &data);
                    let t64 = super::super::fold::nvme::update_table(state, &data);
                    let what = format!("{l:?} len {len} state {state:x}");
                    assert_eq!(t10dif_update_at(l, state as u16, &data), t16, "{what}");
                    assert_eq!(nvme_update_at(l, state, &data), t64, "{what}");
                    let (d16, d64) = t10dif_nvme_update_at(l, state as u16, state, &data);
                    assert_eq!((d16, d64), (t16, t64), "dual, {what}");
                    let mut dst = vec![0u8; len];
                    assert_eq!(
                        t10dif_copy_update_at(l, state as u16, &mut dst, &data),
                        t16,
                        "{what}"
                    );
                    assert_eq!(
                        nvme_copy_update_at(l, state, &mut dst, &data),
                        t64,
                        "{what}"
                    );
                    assert_eq!(dst, data);
                }
            }
            // Split points: the register carried between pieces, against the reference.
            let data = noise(4104, 1234);
            let (r16, r64) = (CRC16_REF.checksum(&data), CRC64_REF.checksum(&data));
            for cut in (0..=data.len()).step_by(37).chain([16, 128, 512, 4096]) {
                let (a, b) = data.split_at(cut);
                let s16 = t10dif_update_at(l, t10dif_update_at(l, 0, a), b);
                let s64 = nvme_update_at(l, nvme_update_at(l, !0, a), b);
                assert_eq!((s16, s64 ^ !0), (r16, r64), "{l:?} cut {cut}");
                let (x, y) = t10dif_nvme_update_at(l, 0, !0, a);
                let (x, y) = t10dif_nvme_update_at(l, x, y, b);
                assert_eq!((x, y ^ !0), (r16, r64), "{l:?} dual cut {cut}");
                let mut dst = vec![0u8; data.len()];
                let (da, db) = dst.split_at_mut(cut);
                let c16 = t10dif_copy_update_at(l, t10dif_copy_update_at(l, 0, da, a), db, b);
                let c64 = nvme_copy_update_at(l, nvme_copy_update_at(l, !0, da, a), db, b);
                assert_eq!((c16, c64 ^ !0), (r16, r64), "{l:?} copy cut {cut}");
                assert_eq!(dst, data);
            }
        }
    }

    #[test]
    fn guard_and_digest_in_one_pass() {
        for len in (0..=600usize).chain([4096, 4104, 65536]) {
            let data = noise(len, 99 + len as u64);
            assert_eq!(
                crc16_t10dif_and_crc64_nvme(&data),
                (crc16_t10dif(&data), crc64_nvme(&data)),
                "len {len}"
            );
        }
        assert_eq!(
            crc16_t10dif_and_crc64_nvme(b"123456789"),
            (0xD0DB, 0xAE8B_1486_0A79_9888)
        );
    }

    #[test]
    fn simd_guards_match_the_reference_implementation() {
        for len in [
            0usize, 1, 7, 15, 16, 17, 63, 64, 255, 512, 520, 4096, 4104, 65536,
        ] {
            for seed in 1..4 {
                let data = noise(len, seed * 7919 + len as u64);
                assert_eq!(
                    crc16_t10dif(&data),
                    CRC16_REF.checksum(&data),
                    "crc16, len {len}"
                );
                assert_eq!(
                    crc64_nvme(&data),
                    CRC64_REF.checksum(&data),
                    "crc64, len {len}"
                );
            }
        }
    }

    #[test]
    fn every_length_up_to_600_and_big_ones() {
        for len in 0..=600usize {
            check(&noise(len, len as u64 + 1), &format!("len {len}"));
        }
        for len in [
            1023usize,
            1024,
            4095,
            4096,
            4104,
            4112,
            8192 + 48,
            65536,
            65536 + 13,
            1 << 20,
        ] {
            check(&noise(len, len as u64 * 3), &format!("len {len}"));
        }
    }

    #[test]
    fn special_patterns() {
        for len in [16usize, 64, 256, 512, 4096] {
            check(&vec![0u8; len], &format!("zeros {len}"));
            check(&vec![0xFFu8; len], &format!("ones {len}"));
        }
    }

    #[test]
    fn misaligned_sub_slices() {
        let big = noise(4096 + 8 + 128, 99);
        for offset in 1..64usize {
            for len in [0usize, 5, 16, 48, 64, 100, 255, 256, 512, 520, 4096, 4104] {
                let s = &big[offset..offset + len];
                check(s, &format!("offset {offset} len {len}"));
                // Misaligned destination too.
                let mut out = vec![0u8; len + 64];
                let d = &mut out[64 - offset..64 - offset + len];
                assert_eq!(copy_crc16_t10dif(d, s), CRC16_REF.checksum(s));
                assert_eq!(d, s);
            }
        }
    }

    #[test]
    fn incremental_equals_one_shot() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut rnd = |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n as u64) as usize
        };
        for len in [0usize, 1, 17, 100, 512, 520, 1000, 4096, 4104, 10000] {
            let data = noise(len, len as u64 + 5);
            for _ in 0..50 {
                let mut cuts: Vec<usize> = (0..rnd(6)).map(|_| rnd(len + 1)).collect();
                cuts.push(0);
                cuts.push(len);
                cuts.sort_unstable();
                let (mut a, mut b) = (Crc16T10Dif::new(), Crc64Nvme::new());
                let (mut c, mut d) = (Crc16T10Dif::new(), Crc64Nvme::new());
                let mut dst = vec![0u8; len];
                let mut dst2 = vec![0u8; len];
                for w in cuts.windows(2) {
                    let piece = &data[w[0]..w[1]];
                    a.update(piece);
                    b.update(piece);
                    c.copy_update(&mut dst[w[0]..w[1]], piece);
                    d.copy_update(&mut dst2[w[0]..w[1]], piece);
                }
                assert_eq!(a.finish(), CRC16_REF.checksum(&data), "cuts {cuts:?}");
                assert_eq!(b.finish(), CRC64_REF.checksum(&data), "cuts {cuts:?}");
                assert_eq!(c.finish(), a.finish());
                assert_eq!(d.finish(), b.finish());
                assert_eq!(dst, data);
                assert_eq!(dst2, data);
            }
        }
    }

    #[test]
    fn simd_and_portable_registers_agree() {
        // Carry-in registers other than init, both paths.
        for len in [0usize, 3, 16, 40, 255, 256, 600, 4104] {
            let data = noise(len, 7 + len as u64);
            for state in [0u64, 1, 0xFFFF, 0x1234, !0, 0xDEAD_BEEF_0BAD_F00D] {
                let s16 = state as u16;
                let p16 = portable::t10dif_update(s16, &data);
                let p64 = portable::nvme_update(state, &data);
                assert_eq!(t10dif_update(s16, &data), p16, "len {len} state {state:x}");
                assert_eq!(nvme_update(state, &data), p64, "len {len} state {state:x}");
                assert_eq!(
                    super::super::fold::t10dif::update_table(s16, &data),
                    p16,
                    "table, len {len}"
                );
                assert_eq!(
                    super::super::fold::nvme::update_table(state, &data),
                    p64,
                    "table, len {len}"
                );
            }
        }
    }

    #[test]
    fn fused_copy_gives_the_same_bytes_and_guards() {
        let src = noise(8 * 512, 42);
        let mut dst = vec![0u8; src.len()];
        let mut guards = Vec::new();
        copy_with_guards(&mut dst, &src, 512, crc16_t10dif, &mut guards);
        assert_eq!(dst, src);
        let expected: Vec<u16> = src.chunks(512).map(|c| CRC16_REF.checksum(c)).collect();
        assert_eq!(guards, expected);

        let mut dst = vec![0u8; src.len()];
        let mut guards = Vec::new();
        copy_with_guards_fused(&mut dst, &src, 512, copy_crc16_t10dif, &mut guards);
        assert_eq!(dst, src);
        assert_eq!(guards, expected);

        let mut dst = vec![0u8; src.len()];
        let mut guards = Vec::new();
        copy_with_guards_fused(&mut dst, &src, 4096, copy_crc64_nvme, &mut guards);
        assert_eq!(dst, src);
        let expected: Vec<u64> = src.chunks(4096).map(|c| CRC64_REF.checksum(c)).collect();
        assert_eq!(guards, expected);
    }

    /// The guard and the change digest of a zero-copy write must describe the same bytes,
    /// though the guest may change its buffer while they are computed: from one read of
    /// the data. A thread flips one byte between two values while each level computes
    /// both; every (guard, digest) pair must be that of one of the two buffers, never a
    /// guard of one and a digest of the other (the two passes of the portable level mixed
    /// them, and so did the SIMD levels' tail). Time-bounded per level and length.
    #[test]
    fn guard_and_digest_come_from_one_read_of_data_that_changes_meanwhile() {
        use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
        use std::time::{Duration, Instant};
        for l in levels() {
            // A whole interval (the flipped byte mid-way), and a length with a 9-byte tail
            // (the flipped byte in it).
            for (len, flipped) in [(4096usize, 2000usize), (4096 + 9, 4096 + 4)] {
                let mut versions = [noise(len, 99), noise(len, 99)];
                versions[1][flipped] ^= 0x5A;
                let want = versions
                    .each_ref()
                    .map(|v| (CRC16_REF.checksum(v), CRC64_REF.checksum(v)));
                let mut buffer = versions[0].clone();
                let base = buffer.as_mut_ptr() as usize;
                let (a, b) = (versions[0][flipped], versions[1][flipped]);
                let stop = AtomicBool::new(false);
                std::thread::scope(|scope| {
                    scope.spawn(|| {
                        // SAFETY: `flipped` < len, inside `buffer`, which outlives the scope.
                        // The byte is only ever accessed atomically here; the code under
                        // test reads it plainly, as the daemon reads guest memory that the
                        // guest (another process) may be writing: that race is the point.
                        let cell = unsafe { &*((base + flipped) as *const AtomicU8) };
                        while !stop.load(Ordering::Relaxed) {
                            cell.store(b, Ordering::Relaxed);
                            cell.store(a, Ordering::Relaxed);
                        }
                    });
                    let started = Instant::now();
                    let mut mixed = None;
                    while mixed.is_none() && started.elapsed() < Duration::from_millis(200) {
                        for _ in 0..64 {
                            // SAFETY: `buffer` is valid for `len` bytes for the whole
                            // scope; see above for the one byte written concurrently.
                            let data =
                                unsafe { std::slice::from_raw_parts(base as *const u8, len) };
                            let (g, d) = t10dif_nvme_update_at(l, 0, !0, data);
                            let got = (g, d ^ !0);
                            if !want.contains(&got) {
                                mixed = Some(got);
                            }
                        }
                    }
                    stop.store(true, Ordering::Relaxed);
                    assert_eq!(
                        mixed, None,
                        "{l:?} len {len}: guard and digest of different bytes (want one of {want:x?})"
                    );
                });
            }
        }
    }
}
