//! Virtio and vhost-user feature bits the device offers, and their names for logs.

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

const fn bit(n: u32) -> u64 {
    1 << n
}

/// Every virtio feature bit we may offer, with the name logs use for it.
const NAMED_FEATURES: &[(u32, &str)] = &[
    (VIRTIO_BLK_F_SIZE_MAX, "SIZE_MAX"),
    (VIRTIO_BLK_F_SEG_MAX, "SEG_MAX"),
    (VIRTIO_BLK_F_RO, "RO"),
    (VIRTIO_BLK_F_BLK_SIZE, "BLK_SIZE"),
    (VIRTIO_BLK_F_FLUSH, "FLUSH"),
    (VIRTIO_BLK_F_TOPOLOGY, "TOPOLOGY"),
    (VIRTIO_BLK_F_CONFIG_WCE, "CONFIG_WCE"),
    (VIRTIO_BLK_F_MQ, "MQ"),
    (VIRTIO_BLK_F_DISCARD, "DISCARD"),
    (VIRTIO_BLK_F_WRITE_ZEROES, "WRITE_ZEROES"),
    (VIRTIO_RING_F_INDIRECT_DESC, "INDIRECT_DESC"),
    (VIRTIO_RING_F_EVENT_IDX, "EVENT_IDX"),
    (26, "LOG_ALL"),
    (30, "PROTOCOL_FEATURES"),
    (VIRTIO_F_VERSION_1, "VERSION_1"),
];

/// The virtio features offered for a disk; a read-only disk offers RO and no discard/zeroing.
pub fn device_features(read_only: bool) -> u64 {
    let mut features = bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_RING_F_INDIRECT_DESC)
        | bit(VIRTIO_BLK_F_SIZE_MAX)
        | bit(VIRTIO_BLK_F_SEG_MAX)
        | bit(VIRTIO_BLK_F_BLK_SIZE)
        | bit(VIRTIO_BLK_F_TOPOLOGY)
        | bit(VIRTIO_BLK_F_FLUSH)
        | bit(VIRTIO_BLK_F_CONFIG_WCE)
        | bit(VIRTIO_BLK_F_MQ)
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        // Live migration: every device write into guest memory is logged (dirty_log.rs).
        | VhostUserVirtioFeatures::LOG_ALL.bits();
    if read_only {
        features |= bit(VIRTIO_BLK_F_RO);
    } else {
        features |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
    }
    features
}

pub fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::LOG_SHMFD
}

/// "VERSION_1 EVENT_IDX ..." for the bits in `features`; unknown bits as "bit N".
pub fn describe(features: u64) -> String {
    let mut names: Vec<String> = NAMED_FEATURES
        .iter()
        .filter(|(b, _)| features & bit(*b) != 0)
        .map(|(_, n)| n.to_string())
        .collect();
    let known = NAMED_FEATURES
        .iter()
        .fold(0u64, |acc, (b, _)| acc | bit(*b));
    names.extend(
        (0..64)
            .filter(|b| features & !known & bit(*b) != 0)
            .map(|b| format!("bit{b}")),
    );
    names.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offers_what_the_device_implements() {
        let rw = device_features(false);
        for required in [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_TOPOLOGY,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_CONFIG_WCE,
            VIRTIO_BLK_F_MQ,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
        ] {
            assert_ne!(rw & bit(required), 0, "feature bit {required} missing");
        }
        assert_eq!(rw & bit(VIRTIO_BLK_F_RO), 0);
        let ro = device_features(true);
        assert_ne!(ro & bit(VIRTIO_BLK_F_RO), 0);
        assert_eq!(
            ro & (bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES)),
            0
        );
    }

    #[test]
    fn protocol_features_are_the_ones_the_frontend_needs() {
        let p = protocol_features();
        assert!(p.contains(VhostUserProtocolFeatures::CONFIG));
        assert!(p.contains(VhostUserProtocolFeatures::MQ));
        assert!(p.contains(VhostUserProtocolFeatures::REPLY_ACK));
        assert!(p.contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS));
    }

    #[test]
    fn describe_names_known_and_unknown_bits() {
        assert_eq!(
            describe(bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_BLK_F_FLUSH)),
            "FLUSH VERSION_1"
        );
        assert_eq!(describe(bit(3)), "bit3");
    }
}
