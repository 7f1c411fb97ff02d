//! Test data: per-offset patterns, versioned blocks, a seedable RNG.

/// A pattern that differs per byte offset on the disk and per `seed`.
pub fn pattern_byte(disk_offset: u64, seed: u64) -> u8 {
    let x = (disk_offset / 8).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ seed.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    (x >> ((disk_offset % 8) * 8)) as u8
}

pub fn fill_pattern(buf: &mut [u8], disk_offset: u64, seed: u64) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = pattern_byte(disk_offset + i as u64, seed);
    }
}

pub fn check_pattern(buf: &[u8], disk_offset: u64, seed: u64) -> Result<(), String> {
    match buf
        .iter()
        .enumerate()
        .find(|(i, b)| **b != pattern_byte(disk_offset + *i as u64, seed))
    {
        None => Ok(()),
        Some((i, b)) => Err(format!(
            "mismatch at disk offset {}: got {:#04x}, want {:#04x}",
            disk_offset + i as u64,
            b,
            pattern_byte(disk_offset + i as u64, seed)
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// PI helpers: the metadata file's layout, corrupting data and tuples behind the daemon's back,
// the error journal, the daemon's guard-error log lines and `guardblk scrub --json`.
// ---------------------------------------------------------------------------------------------

/// splitmix64: small, seedable, good enough for test workloads.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.0)
    }

    /// Uniform in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Uniform in [lo, hi].
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
}

pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A seed from `var` (decimal or 0x-hex) or, if unset, from the clock.
pub fn seed_from_env(var: &str) -> u64 {
    match std::env::var(var) {
        Ok(s) => {
            let s = s.trim();
            s.strip_prefix("0x")
                .map_or_else(|| s.parse(), |h| u64::from_str_radix(h, 16))
                .unwrap_or_else(|e| panic!("{var}={s:?}: {e}"))
        }
        Err(_) => mix64(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                ^ u64::from(std::process::id()),
        ),
    }
}

const VERSIONED_MAGIC: u64 = u64::from_le_bytes(*b"GBLKvers");

/// Fill one block (`buf`, a multiple of 512 bytes) with content that names `block` and
/// `version` in every 512-byte sector, so any read can be attributed to the write that put
/// it there, and a block mixing two writes (torn) is recognised. Version 0 is reserved for
/// "never written" (all zeros).
pub fn fill_versioned(buf: &mut [u8], block: u64, version: u64) {
    assert!(version != 0 && buf.len().is_multiple_of(512));
    for (s, sector) in buf.chunks_exact_mut(512).enumerate() {
        sector[0..8].copy_from_slice(&VERSIONED_MAGIC.to_le_bytes());
        sector[8..16].copy_from_slice(&block.to_le_bytes());
        sector[16..24].copy_from_slice(&version.to_le_bytes());
        sector[24..32].copy_from_slice(&(s as u64).to_le_bytes());
        let base = mix64(block ^ mix64(version ^ mix64(s as u64)));
        for (i, w) in sector[32..].chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&mix64(base.wrapping_add(i as u64)).to_le_bytes());
        }
    }
}

/// The version [`fill_versioned`] put in `buf` for `block`; `Ok(0)` for all zeros; `Err` if
/// the content is not one write's (wrong block, torn between versions, garbage).
pub fn decode_versioned(buf: &[u8], block: u64) -> Result<u64, String> {
    if buf.iter().all(|&b| b == 0) {
        return Ok(0);
    }
    let version = u64::from_le_bytes(buf[16..24].try_into().unwrap());
    let mut expect = vec![0u8; buf.len()];
    if version != 0 {
        fill_versioned(&mut expect, block, version);
    }
    if version == 0 || buf != expect.as_slice() {
        let describe = |s: &[u8]| {
            format!(
                "magic ok {}, block {}, version {}, sector {}",
                u64::from_le_bytes(s[0..8].try_into().unwrap()) == VERSIONED_MAGIC,
                u64::from_le_bytes(s[8..16].try_into().unwrap()),
                u64::from_le_bytes(s[16..24].try_into().unwrap()),
                u64::from_le_bytes(s[24..32].try_into().unwrap()),
            )
        };
        let sectors: Vec<String> = buf.chunks_exact(512).map(describe).collect();
        return Err(format!(
            "block {block} is not one write's content; sectors: [{}]",
            sectors.join("; ")
        ));
    }
    Ok(version)
}
