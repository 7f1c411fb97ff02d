//! Guard checksums: CRC-16/T10-DIF and CRC-64/NVME, computed with SIMD (the `crc-fast` crate
//! picks PCLMULQDQ/VPCLMULQDQ or the ARM equivalents at run time).
//!
//! `benches/crc.rs` measures these against ISA-L and the `crc` crate; tests cross-check them
//! against the `crc` crate's table implementation, the reference.

use crc_fast::CrcAlgorithm;

/// CRC-16/T10-DIF: the guard of T10 Type 1/2/3 protection information.
pub fn crc16_t10dif(data: &[u8]) -> u16 {
    crc_fast::checksum(CrcAlgorithm::Crc16T10Dif, data) as u16
}

/// CRC-64/NVME: the guard of the NVMe 64-bit-guard protection format.
pub fn crc64_nvme(data: &[u8]) -> u64 {
    crc_fast::checksum(CrcAlgorithm::Crc64Nvme, data)
}

/// Copy one protection interval from `src` to `dst` and return its CRC-16/T10-DIF guard,
/// computed over the bytes as written to `dst` (the bytes that will reach the disk).
pub fn copy_crc16_t10dif(dst: &mut [u8], src: &[u8]) -> u16 {
    dst.copy_from_slice(src);
    crc16_t10dif(dst)
}

/// As [`copy_crc16_t10dif`], with the CRC-64/NVME guard.
pub fn copy_crc64_nvme(dst: &mut [u8], src: &[u8]) -> u64 {
    dst.copy_from_slice(src);
    crc64_nvme(dst)
}

/// Copy `src` into `dst` interval by interval, computing each interval's guard right after
/// copying it, while it is still in L1 cache: one pass over memory instead of two.
/// `guards` receives one guard per interval. Lengths must be whole intervals.
pub fn copy_with_guards<G>(
    dst: &mut [u8],
    src: &[u8],
    interval: usize,
    guard: impl Fn(&[u8]) -> G,
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
        d.copy_from_slice(s);
        guards.push(guard(d));
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
    fn fused_copy_gives_the_same_bytes_and_guards() {
        let src = noise(8 * 512, 42);
        let mut dst = vec![0u8; src.len()];
        let mut guards = Vec::new();
        copy_with_guards(&mut dst, &src, 512, crc16_t10dif, &mut guards);
        assert_eq!(dst, src);
        let expected: Vec<u16> = src.chunks(512).map(|c| CRC16_REF.checksum(c)).collect();
        assert_eq!(guards, expected);
    }
}
