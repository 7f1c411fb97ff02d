//! Protection-information formats as data: tuple layout, generation and verification.
//!
//! Formats follow Linux `block/t10-pi.c`: T10 Type 1 (CRC-16 guard, 32-bit reference tag =
//! LBA), Type 3 (guard only) and the NVMe 64-bit-guard format (CRC-64/NVME guard, 48-bit
//! reference tag, 16-byte tuple). Tuples are big-endian on disk, as on the wire. Escape rules
//! are Linux's: an application tag of 0xFFFF disables checking (Type 3 also needs an all-ones
//! reference tag). LBAs are in protection-interval units.

use thiserror::Error;

use super::guard::{crc16_t10dif, crc64_nvme};

const APP_ESCAPE: u16 = 0xFFFF;
const REF32_ESCAPE: u64 = 0xFFFF_FFFF;
const REF48_MASK: u64 = 0xFFFF_FFFF_FFFF;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PiFormat {
    Type1,
    Type3,
    Nvme64,
}

impl std::fmt::Display for PiFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PiFormat::Type1 => "type1",
            PiFormat::Type3 => "type3",
            PiFormat::Nvme64 => "nvme64",
        })
    }
}

/// One protection-information tuple, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tuple {
    pub guard: u64,
    pub app: u16,
    pub reference: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PiErrorKind {
    Guard,
    Ref,
    App,
}

impl std::fmt::Display for PiErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PiErrorKind::Guard => "guard",
            PiErrorKind::Ref => "ref",
            PiErrorKind::App => "app",
        })
    }
}

/// A failed check: which field, what it should have been, what it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("{kind} tag mismatch: expected {expected:#x}, found {actual:#x}")]
pub struct PiError {
    pub kind: PiErrorKind,
    pub expected: u64,
    pub actual: u64,
}

/// How a tuple passed verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verified {
    Checked,
    /// The escape values said "do not check".
    Escaped,
}

impl PiFormat {
    /// Bytes one tuple occupies on disk.
    pub fn tuple_size(self) -> usize {
        match self {
            PiFormat::Type1 | PiFormat::Type3 => 8,
            PiFormat::Nvme64 => 16,
        }
    }

    pub fn guard(self, data: &[u8]) -> u64 {
        match self {
            PiFormat::Type1 | PiFormat::Type3 => u64::from(crc16_t10dif(data)),
            PiFormat::Nvme64 => crc64_nvme(data),
        }
    }

    /// The reference tag a block at `lba` carries (Type 3 has none: Linux writes 0).
    pub fn reference_for(self, lba: u64) -> u64 {
        match self {
            PiFormat::Type1 => lba & REF32_ESCAPE,
            PiFormat::Type3 => 0,
            PiFormat::Nvme64 => lba & REF48_MASK,
        }
    }

    /// The tuple for `data` (one protection interval) stored at `lba`.
    pub fn generate(self, data: &[u8], lba: u64, app: u16) -> Tuple {
        self.tuple_from_guard(self.guard(data), lba, app)
    }

    /// As [`PiFormat::generate`], for a guard already computed (e.g. during a fused copy).
    pub fn tuple_from_guard(self, guard: u64, lba: u64, app: u16) -> Tuple {
        Tuple {
            guard,
            app,
            reference: self.reference_for(lba),
        }
    }

    /// Check `tuple` against `data` read from `lba`. `expected_app`, when given, must match
    /// the application tag (Linux does not check it; guardblk stores a known value).
    pub fn verify(
        self,
        data: &[u8],
        tuple: &Tuple,
        lba: u64,
        expected_app: Option<u16>,
    ) -> Result<Verified, PiError> {
        self.verify_guard(self.guard(data), tuple, lba, expected_app)
    }

    /// As [`PiFormat::verify`], for data whose guard is already computed.
    pub fn verify_guard(
        self,
        guard: u64,
        tuple: &Tuple,
        lba: u64,
        expected_app: Option<u16>,
    ) -> Result<Verified, PiError> {
        let escaped = match self {
            PiFormat::Type1 | PiFormat::Nvme64 => tuple.app == APP_ESCAPE,
            PiFormat::Type3 => tuple.app == APP_ESCAPE && tuple.reference == REF32_ESCAPE,
        };
        if escaped {
            return Ok(Verified::Escaped);
        }
        if self != PiFormat::Type3 {
            let expected = self.reference_for(lba);
            if tuple.reference != expected {
                return Err(PiError {
                    kind: PiErrorKind::Ref,
                    expected,
                    actual: tuple.reference,
                });
            }
        }
        if let Some(expected) = expected_app {
            if tuple.app != expected {
                return Err(PiError {
                    kind: PiErrorKind::App,
                    expected: expected.into(),
                    actual: tuple.app.into(),
                });
            }
        }
        if tuple.guard != guard {
            return Err(PiError {
                kind: PiErrorKind::Guard,
                expected: tuple.guard,
                actual: guard,
            });
        }
        Ok(Verified::Checked)
    }

    /// Serialise `tuple` into `out` (exactly [`PiFormat::tuple_size`] bytes), big-endian.
    pub fn encode(self, tuple: &Tuple, out: &mut [u8]) {
        match self {
            PiFormat::Type1 | PiFormat::Type3 => {
                out[0..2].copy_from_slice(&(tuple.guard as u16).to_be_bytes());
                out[2..4].copy_from_slice(&tuple.app.to_be_bytes());
                out[4..8].copy_from_slice(&(tuple.reference as u32).to_be_bytes());
            }
            PiFormat::Nvme64 => {
                out[0..8].copy_from_slice(&tuple.guard.to_be_bytes());
                out[8..10].copy_from_slice(&tuple.app.to_be_bytes());
                out[10..16].copy_from_slice(&tuple.reference.to_be_bytes()[2..8]);
            }
        }
    }

    pub fn decode(self, bytes: &[u8]) -> Tuple {
        match self {
            PiFormat::Type1 | PiFormat::Type3 => Tuple {
                guard: u16::from_be_bytes([bytes[0], bytes[1]]).into(),
                app: u16::from_be_bytes([bytes[2], bytes[3]]),
                reference: u32::from_be_bytes(bytes[4..8].try_into().unwrap()).into(),
            },
            PiFormat::Nvme64 => {
                let mut reference = [0u8; 8];
                reference[2..8].copy_from_slice(&bytes[10..16]);
                Tuple {
                    guard: u64::from_be_bytes(bytes[0..8].try_into().unwrap()),
                    app: u16::from_be_bytes([bytes[8], bytes[9]]),
                    reference: u64::from_be_bytes(reference),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [PiFormat; 3] = [PiFormat::Type1, PiFormat::Type3, PiFormat::Nvme64];

    fn block(interval: usize, seed: u8) -> Vec<u8> {
        (0..interval)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn generated_tuples_verify_and_survive_encoding() {
        for format in ALL {
            for interval in [512, 4096] {
                let data = block(interval, 3);
                let tuple = format.generate(&data, 77, 0);
                assert_eq!(
                    format.verify(&data, &tuple, 77, Some(0)),
                    Ok(Verified::Checked)
                );
                let mut raw = vec![0u8; format.tuple_size()];
                format.encode(&tuple, &mut raw);
                assert_eq!(format.decode(&raw), tuple, "{format:?}");
            }
        }
    }

    #[test]
    fn tuple_layout_is_big_endian_as_linux_defines_it() {
        let t = Tuple {
            guard: 0xD0DB,
            app: 0x1234,
            reference: 0x0506_0708,
        };
        let mut raw = [0u8; 8];
        PiFormat::Type1.encode(&t, &mut raw);
        assert_eq!(raw, [0xD0, 0xDB, 0x12, 0x34, 0x05, 0x06, 0x07, 0x08]);
        let t = Tuple {
            guard: 0xAE8B_1486_0A79_9888,
            app: 0x1234,
            reference: 0x0102_0304_0506,
        };
        let mut raw = [0u8; 16];
        PiFormat::Nvme64.encode(&t, &mut raw);
        assert_eq!(
            raw,
            [0xAE, 0x8B, 0x14, 0x86, 0x0A, 0x79, 0x98, 0x88, 0x12, 0x34, 1, 2, 3, 4, 5, 6]
        );
    }

    #[test]
    fn a_changed_data_byte_is_a_guard_error_with_expected_and_actual() {
        for format in ALL {
            let mut data = block(4096, 9);
            let tuple = format.generate(&data, 5, 0);
            data[1000] ^= 0x01;
            let err = format.verify(&data, &tuple, 5, Some(0)).unwrap_err();
            assert_eq!(err.kind, PiErrorKind::Guard, "{format:?}");
            assert_eq!(err.expected, tuple.guard);
            assert_eq!(err.actual, format.guard(&data));
        }
    }

    #[test]
    fn reference_tags_catch_misdirected_blocks_except_in_type3() {
        let data = block(512, 1);
        let t1 = PiFormat::Type1.generate(&data, 10, 0);
        assert_eq!(
            PiFormat::Type1.verify(&data, &t1, 11, None),
            Err(PiError {
                kind: PiErrorKind::Ref,
                expected: 11,
                actual: 10
            })
        );
        let n = PiFormat::Nvme64.generate(&data, 10, 0);
        assert_eq!(
            PiFormat::Nvme64
                .verify(&data, &n, 11, None)
                .unwrap_err()
                .kind,
            PiErrorKind::Ref
        );
        let t3 = PiFormat::Type3.generate(&data, 10, 0);
        assert_eq!(t3.reference, 0);
        assert_eq!(
            PiFormat::Type3.verify(&data, &t3, 11, None),
            Ok(Verified::Checked)
        );
    }

    #[test]
    fn reference_tags_wrap_at_32_and_48_bits() {
        let data = block(512, 2);
        let lba = 0x1_0000_0005u64;
        let t1 = PiFormat::Type1.generate(&data, lba, 0);
        assert_eq!(t1.reference, 5);
        assert!(PiFormat::Type1.verify(&data, &t1, lba, None).is_ok());
        let big = 0x7_0000_0000_0009u64;
        let n = PiFormat::Nvme64.generate(&data, big, 0);
        assert_eq!(n.reference, 9, "bits above 48 are dropped");
        assert!(PiFormat::Nvme64.verify(&data, &n, big, None).is_ok());
    }

    #[test]
    fn app_tag_is_checked_when_a_value_is_expected() {
        let data = block(512, 4);
        let mut t = PiFormat::Type1.generate(&data, 1, 0);
        t.app = 0x00AA;
        assert_eq!(
            PiFormat::Type1.verify(&data, &t, 1, Some(0)),
            Err(PiError {
                kind: PiErrorKind::App,
                expected: 0,
                actual: 0xAA
            })
        );
        assert_eq!(
            PiFormat::Type1.verify(&data, &t, 1, None),
            Ok(Verified::Checked)
        );
    }

    #[test]
    fn escape_rules_follow_linux() {
        let data = block(512, 5);
        let garbage = |app, reference| Tuple {
            guard: 0xBAD,
            app,
            reference,
        };
        // Type 1 and the 64-bit format: app tag 0xFFFF alone skips every check.
        assert_eq!(
            PiFormat::Type1.verify(&data, &garbage(0xFFFF, 0), 9, Some(0)),
            Ok(Verified::Escaped)
        );
        assert_eq!(
            PiFormat::Nvme64.verify(&data, &garbage(0xFFFF, 0), 9, Some(0)),
            Ok(Verified::Escaped)
        );
        // Type 3 needs the reference tag all-ones too.
        assert_eq!(
            PiFormat::Type3.verify(&data, &garbage(0xFFFF, 0xFFFF_FFFF), 9, None),
            Ok(Verified::Escaped)
        );
        assert_eq!(
            PiFormat::Type3
                .verify(&data, &garbage(0xFFFF, 0), 9, None)
                .unwrap_err()
                .kind,
            PiErrorKind::Guard
        );
        // Anything else is checked.
        assert!(PiFormat::Type1
            .verify(&data, &garbage(0xFFFE, 9), 9, None)
            .is_err());
    }
}
