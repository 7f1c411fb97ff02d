//! The virtio-blk configuration space (struct virtio_blk_config), built byte by byte.
//!
//! Field offsets follow the virtio 1.2 specification (5.2.4), including the secure-erase and
//! zoned fields, so the frontend may read the full structure at any offset.

use crate::requests::Limits;

pub const CONFIG_SPACE_SIZE: usize = 96;
pub const WCE_OFFSET: usize = 32;

/// Geometry and limits advertised to the guest.
#[derive(Debug, Clone)]
pub struct BlkConfig {
    pub limits: Limits,
    pub size_max: u32,
    pub num_queues: u16,
    /// log2(physical block / logical block).
    pub physical_block_exp: u8,
    /// Minimum and optimal I/O sizes, in logical blocks.
    pub min_io_blocks: u16,
    pub opt_io_blocks: u32,
}

impl BlkConfig {
    /// Serialise with the given write-cache-enable state.
    pub fn to_bytes(&self, writeback: bool) -> [u8; CONFIG_SPACE_SIZE] {
        let l = &self.limits;
        let mut b = [0u8; CONFIG_SPACE_SIZE];
        let mut put = |off: usize, bytes: &[u8]| b[off..off + bytes.len()].copy_from_slice(bytes);
        put(0, &l.capacity_sectors.to_le_bytes());
        put(8, &self.size_max.to_le_bytes());
        put(12, &l.max_segments.to_le_bytes());
        // 16..20 geometry: left zero (legacy CHS; unused by modern drivers).
        put(20, &l.block_size.to_le_bytes());
        put(24, &[self.physical_block_exp]);
        put(25, &[0]); // alignment_offset
        put(26, &self.min_io_blocks.to_le_bytes());
        put(28, &self.opt_io_blocks.to_le_bytes());
        put(WCE_OFFSET, &[u8::from(writeback)]);
        put(34, &self.num_queues.to_le_bytes());
        put(36, &l.max_discard_sectors.to_le_bytes());
        put(40, &l.max_discard_segments.to_le_bytes());
        put(44, &(l.block_size / 512).to_le_bytes()); // discard_sector_alignment
        put(48, &l.max_write_zeroes_sectors.to_le_bytes());
        put(52, &l.max_write_zeroes_segments.to_le_bytes());
        put(56, &[1]); // write_zeroes_may_unmap
                       // 60..96: secure erase and zoned fields, zero: neither feature is offered.
        b
    }

    /// `size` bytes of config space at `offset`; bytes past the structure read as zero.
    pub fn read(&self, writeback: bool, offset: u32, size: u32) -> Vec<u8> {
        let full = self.to_bytes(writeback);
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(CONFIG_SPACE_SIZE);
        let end = (offset as usize)
            .saturating_add(size as usize)
            .min(CONFIG_SPACE_SIZE);
        out[..end - start].copy_from_slice(&full[start..end]);
        out
    }
}

/// Interpret a frontend write to config space: only the write-cache-enable byte is writable.
pub fn parse_wce_write(offset: u32, data: &[u8]) -> Option<bool> {
    match (offset as usize, data) {
        (WCE_OFFSET, [v]) if *v <= 1 => Some(*v == 1),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BlkConfig {
        BlkConfig {
            limits: Limits {
                capacity_sectors: 0x1122_3344_5566,
                block_size: 512,
                max_segments: 254,
                max_transfer_bytes: 1 << 20,
                max_discard_segments: 32,
                max_discard_sectors: 1 << 22,
                max_write_zeroes_segments: 32,
                max_write_zeroes_sectors: 1 << 22,
                read_only: false,
            },
            size_max: 1 << 20,
            num_queues: 4,
            physical_block_exp: 3,
            min_io_blocks: 1,
            opt_io_blocks: 0,
        }
    }

    fn le32(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    #[test]
    fn layout_matches_the_virtio_spec() {
        // The bindings' struct is the spec's layout; our serialisation must be as large.
        assert_eq!(
            std::mem::size_of::<virtio_bindings::virtio_blk::virtio_blk_config>(),
            CONFIG_SPACE_SIZE
        );
        let b = config().to_bytes(true);
        assert_eq!(
            u64::from_le_bytes(b[0..8].try_into().unwrap()),
            0x1122_3344_5566
        );
        assert_eq!(le32(&b, 8), 1 << 20);
        assert_eq!(le32(&b, 12), 254);
        assert_eq!(le32(&b, 20), 512);
        assert_eq!(b[24], 3);
        assert_eq!(b[32], 1);
        assert_eq!(u16::from_le_bytes([b[34], b[35]]), 4);
        assert_eq!(le32(&b, 36), 1 << 22);
        assert_eq!(le32(&b, 40), 32);
        assert_eq!(le32(&b, 44), 1);
        assert_eq!(le32(&b, 52), 32);
        assert_eq!(b[56], 1);
        assert_eq!(config().to_bytes(false)[WCE_OFFSET], 0);
    }

    #[test]
    fn reads_at_any_offset_are_clipped_and_zero_padded() {
        let c = config();
        assert_eq!(c.read(true, 32, 1), vec![1]);
        assert_eq!(c.read(true, 90, 16).len(), 16);
        assert!(c.read(true, 96, 8).iter().all(|&x| x == 0));
        assert!(c.read(true, u32::MAX, 4).iter().all(|&x| x == 0));
    }

    #[test]
    fn only_the_wce_byte_is_writable() {
        assert_eq!(parse_wce_write(32, &[0]), Some(false));
        assert_eq!(parse_wce_write(32, &[1]), Some(true));
        assert_eq!(parse_wce_write(32, &[2]), None);
        assert_eq!(parse_wce_write(0, &[1]), None);
        assert_eq!(parse_wce_write(32, &[1, 0]), None);
    }
}
