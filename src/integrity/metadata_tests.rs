//! Unit tests of the PI metadata file (`metadata.rs`): layout, tuples, intents, checks.

use super::*;
use crate::integrity::guard::crc64_nvme;
use crate::integrity::header::{MAGIC, VERSION};

const FORMATS: [PiFormat; 3] = [PiFormat::Type1, PiFormat::Type3, PiFormat::Nvme64];

fn identity(size: u64) -> DataIdentity {
    DataIdentity {
        path: PathBuf::from("/srv/disk.img"),
        size,
        device: 0x0803,
        inode: 4242,
    }
}

fn header(format: PiFormat, interval: u32, size: u64) -> Header {
    Header::new(format, interval, identity(size))
}

/// Recompute the checksum after editing a field, so only the edited field is wrong.
fn reseal(page: &mut [u8]) {
    let end = HEADER_SIZE as usize - 8;
    let checksum = crc64_nvme(&page[..end]);
    page[end..].copy_from_slice(&checksum.to_le_bytes());
}

fn corrupt_what(result: Result<Header, MetadataError>) -> &'static str {
    match result {
        Err(MetadataError::Corrupt { what, .. }) => what,
        other => panic!("expected a Corrupt error, got {other:?}"),
    }
}

/// A created metadata file for a `size`-byte data target, in a temporary directory.
fn created(format: PiFormat, interval: u32, size: u64) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img.pi");
    PiMetadata::create(&path, &header(format, interval, size)).unwrap();
    (dir, path)
}

#[test]
fn header_round_trips_for_every_format_and_interval() {
    let p = Path::new("x.pi");
    for format in FORMATS {
        for interval in [512u32, 4096] {
            for state in [VolumeState::Clean, VolumeState::InUse] {
                let h = Header {
                    state,
                    ..header(format, interval, 64 << 20)
                };
                let page = h.encode();
                assert_eq!(page.len(), HEADER_SIZE as usize);
                assert_eq!(&page[..8], &MAGIC);
                let back = Header::decode(&page, p).unwrap();
                assert_eq!(back, h, "{format} {interval}");
                assert_eq!(back.blocks, (64 << 20) / u64::from(interval));
                assert_eq!(usize::from(page[33]), format.tuple_size());
            }
        }
    }
}

#[test]
fn header_fields_sit_at_their_documented_offsets() {
    let h = header(PiFormat::Nvme64, 512, 1 << 30);
    let page = h.encode();
    let u32_at = |o: usize| u32::from_le_bytes(page[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(page[o..o + 8].try_into().unwrap());
    assert_eq!(u32_at(8), VERSION);
    assert_eq!(u64::from(u32_at(12)), HEADER_SIZE);
    assert_eq!(&page[16..32], &h.uuid);
    assert_eq!(page[32], 64);
    assert_eq!(page[33], 16);
    assert_eq!(u32_at(36), 512);
    assert_eq!(u64_at(40), (1 << 30) / 512);
    assert_eq!(u64_at(48), 1 << 30);
    assert_eq!(u64_at(56), HEADER_SIZE);
    assert_eq!(u64_at(64), h.bitmap_len());
    assert_eq!(u32_at(72), h.region_shift);
    assert_eq!(u32_at(76), 0);
    assert_eq!(u64_at(80), h.tuples_offset());
    assert_eq!(u64_at(88), h.tuples_len());
    assert_eq!(u64_at(96), h.created_unix);
    assert_eq!(u64_at(104), 0x0803);
    assert_eq!(u64_at(112), 4242);
    assert_eq!(&page[120..133], b"/srv/disk.img");
    assert_eq!(page[133], 0);
    assert_eq!(u64_at(4088), crc64_nvme(&page[..4088]));
    // Version 4 UUID, RFC 4122 variant.
    assert_eq!(h.uuid[6] >> 4, 4);
    assert_eq!(h.uuid[8] >> 6, 0b10);
    assert_eq!(h.uuid_string().len(), 36);
}

#[test]
fn decode_rejects_damaged_headers() {
    let p = Path::new("x.pi");
    let good = header(PiFormat::Type1, 4096, 16 << 20).encode();

    let mut page = good.clone();
    page[0] = b'X';
    assert!(matches!(
        Header::decode(&page, p),
        Err(MetadataError::NotMetadata { .. })
    ));
    assert!(matches!(
        Header::decode(&good[..100], p),
        Err(MetadataError::NotMetadata { .. })
    ));

    let mut page = good.clone();
    page[8..12].copy_from_slice(&2u32.to_le_bytes());
    reseal(&mut page);
    assert!(matches!(
        Header::decode(&page, p),
        Err(MetadataError::UnsupportedVersion { version: 2, .. })
    ));

    for offset in [16, 40, 130, 2000, 4090] {
        let mut page = good.clone();
        page[offset] ^= 0x10;
        assert_eq!(
            corrupt_what(Header::decode(&page, p)),
            "header checksum mismatch",
            "byte {offset}"
        );
    }

    let mut page = good.clone();
    page[32] = 2;
    reseal(&mut page);
    assert_eq!(corrupt_what(Header::decode(&page, p)), "unknown PI format");

    let mut page = good.clone();
    page[33] = 16;
    reseal(&mut page);
    assert_eq!(
        corrupt_what(Header::decode(&page, p)),
        "tuple size does not match the PI format"
    );

    for interval in [0u32, 1024, 8192] {
        let mut page = good.clone();
        page[36..40].copy_from_slice(&interval.to_le_bytes());
        reseal(&mut page);
        assert_eq!(
            corrupt_what(Header::decode(&page, p)),
            "protection interval is neither 512 nor 4096"
        );
    }

    let mut page = good.clone();
    page[76..80].copy_from_slice(&7u32.to_le_bytes());
    reseal(&mut page);
    assert_eq!(corrupt_what(Header::decode(&page, p)), "unknown state");

    // Geometry: blocks, capacity, region shift, bitmap and tuple extents must agree.
    for (offset, value) in [
        (40usize, 4097u64),      // blocks
        (48, (16 << 20) + 4096), // capacity
        (56, 8192),              // bitmap offset
        (64, 0),                 // bitmap length
        (80, 4096),              // tuples offset
        (88, 4096),              // tuples length
    ] {
        let mut page = good.clone();
        page[offset..offset + 8].copy_from_slice(&value.to_le_bytes());
        reseal(&mut page);
        assert_eq!(
            corrupt_what(Header::decode(&page, p)),
            "inconsistent geometry",
            "field at {offset}"
        );
    }
    for shift in [0u32, 12, 19, 64] {
        let mut page = good.clone();
        page[72..76].copy_from_slice(&shift.to_le_bytes());
        reseal(&mut page);
        assert_eq!(
            corrupt_what(Header::decode(&page, p)),
            "inconsistent geometry",
            "region shift {shift}"
        );
    }

    let mut page = good.clone();
    page[12..16].copy_from_slice(&8192u32.to_le_bytes());
    reseal(&mut page);
    assert_eq!(
        corrupt_what(Header::decode(&page, p)),
        "unexpected header size"
    );
}

#[test]
fn open_rejects_truncated_files_and_size_mismatches() {
    let size = 8 << 20;
    let (_dir, path) = created(PiFormat::Type1, 4096, size);
    let full = std::fs::metadata(&path).unwrap().len();
    assert_eq!(full, header(PiFormat::Type1, 4096, size).file_len());

    // Another data size: refused, and the message names both sizes.
    let err = PiMetadata::open(&path, &identity(size * 2), false).unwrap_err();
    match &err {
        MetadataError::SizeMismatch {
            expected, actual, ..
        } => {
            assert_eq!(*expected, size);
            assert_eq!(*actual, size * 2);
        }
        other => panic!("expected SizeMismatch, got {other:?}"),
    }
    assert!(err.to_string().contains("resized"), "{err}");

    let file = OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(full - 4096).unwrap();
    assert!(matches!(
        PiMetadata::open(&path, &identity(size), false),
        Err(MetadataError::Truncated { len, needed, .. }) if len == full - 4096 && needed == full
    ));
    assert!(matches!(
        PiMetadata::read_header(&path),
        Err(MetadataError::Truncated { .. })
    ));
    file.set_len(100).unwrap();
    assert!(matches!(
        PiMetadata::open(&path, &identity(size), false),
        Err(MetadataError::Truncated {
            len: 100,
            needed: HEADER_SIZE,
            ..
        })
    ));
    file.set_len(4).unwrap();
    assert!(matches!(
        PiMetadata::open(&path, &identity(size), false),
        Err(MetadataError::NotMetadata { .. })
    ));
    assert!(matches!(
        PiMetadata::open(&path.with_extension("nope"), &identity(size), false),
        Err(MetadataError::Missing { .. })
    ));
}

#[test]
fn create_refuses_existing_files_and_non_multiples() {
    let (_dir, path) = created(PiFormat::Type3, 512, 1 << 20);
    assert!(matches!(
        PiMetadata::create(&path, &header(PiFormat::Type3, 512, 1 << 20)),
        Err(MetadataError::AlreadyExists { .. })
    ));
    let other = path.with_extension("other");
    assert!(matches!(
        PiMetadata::create(&other, &header(PiFormat::Type1, 4096, (1 << 20) + 512)),
        Err(MetadataError::NotIntervalMultiple { .. })
    ));
    assert!(!other.exists());
}

#[test]
fn tuples_start_unwritten_and_round_trip() {
    for format in FORMATS {
        let size = 4 << 20;
        let (_dir, path) = created(format, 4096, size);
        let meta = PiMetadata::open(&path, &identity(size), true).unwrap();
        assert_eq!(meta.blocks(), 1024);
        for lba in [0, 1, 511, 1023] {
            assert_eq!(meta.tuple(lba), None, "{format} lba {lba}");
            assert!(meta.raw_tuple(lba).iter().all(|&b| b == 0));
            assert_eq!(meta.raw_tuple(lba).len(), format.tuple_size());
        }
        let tuple = format.generate(&[7u8; 4096], 5, APP_TAG);
        meta.set_tuple(5, &tuple);
        assert_eq!(meta.tuple(5), Some(tuple));
        assert_eq!(meta.tuple(4), None);
        assert_eq!(meta.tuple(6), None);
        // On-disk bytes are the big-endian tuple layout.
        let mut expected = vec![0u8; format.tuple_size()];
        format.encode(&tuple, &mut expected);
        assert_eq!(meta.raw_tuple(5), expected);
        // Raw bytes copied elsewhere decode the same.
        meta.set_raw_tuple(1000, &meta.raw_tuple(5));
        assert_eq!(meta.tuple(1000), Some(tuple));

        // Durable across a reopen, and set_unwritten clears.
        meta.sync().unwrap();
        meta.close_clean().unwrap();
        drop(meta);
        let meta = PiMetadata::open(&path, &identity(size), true).unwrap();
        assert_eq!(meta.header().state, VolumeState::InUse);
        assert_eq!(meta.tuple(5), Some(tuple));
        meta.set_unwritten(5, 1);
        assert_eq!(meta.tuple(5), None);
        assert_eq!(meta.tuple(1000), Some(tuple));
        meta.set_unwritten(999, 25);
        assert_eq!(meta.tuple(1000), None);
    }
}

#[test]
fn open_is_exclusive_but_read_header_is_not() {
    let size = 1 << 20;
    let (_dir, path) = created(PiFormat::Type1, 512, size);
    assert_eq!(
        PiMetadata::read_header(&path).unwrap().state,
        VolumeState::Clean
    );
    let held = PiMetadata::open(&path, &identity(size), true).unwrap();
    assert!(matches!(
        PiMetadata::open(&path, &identity(size), false),
        Err(MetadataError::Locked { .. })
    ));
    let h = PiMetadata::read_header(&path).unwrap();
    assert_eq!(h.state, VolumeState::InUse);
    assert_eq!(h.format, PiFormat::Type1);
    assert_eq!(h.interval, 512);
    assert_eq!(h.blocks, 2048);
    held.close_clean().unwrap();
    assert_eq!(
        PiMetadata::read_header(&path).unwrap().state,
        VolumeState::Clean
    );
}

#[test]
fn region_geometry_keeps_at_most_a_million_regions() {
    // (disk size, region shift, regions, bitmap bytes)
    let cases: [(u64, u32, u64, u64); 7] = [
        (4096, 20, 1, 4096),
        (1 << 20, 20, 1, 4096),
        ((1 << 20) + 4096, 20, 2, 4096),
        (1 << 30, 20, 1024, 4096),
        (64 << 30, 20, 64 << 10, 8192),
        (1 << 40, 20, 1 << 20, 128 << 10),
        ((1 << 40) + 4096, 21, (1 << 19) + 1, 69632),
    ];
    for (size, shift, regions, bitmap) in cases {
        let h = header(PiFormat::Type1, 4096, size);
        assert_eq!(h.region_shift, shift, "size {size}");
        assert_eq!(h.regions(), regions, "size {size}");
        assert_eq!(h.bitmap_len(), bitmap, "size {size}");
        assert!(h.regions() <= 1 << 20);
        assert_eq!(h.tuples_offset(), HEADER_SIZE + bitmap);
        assert_eq!(h.tuples_offset() % 4096, 0);
    }
    let big = header(PiFormat::Nvme64, 4096, 4 << 40);
    assert_eq!(big.region_shift, 22);
    assert_eq!(big.regions(), 1 << 20);
    let tib = header(PiFormat::Type1, 512, 1 << 40);
    assert_eq!(tib.tuples_len(), (1u64 << 31) * 8);
    assert_eq!(tib.file_len(), HEADER_SIZE + (128 << 10) + (16 << 30));
}

#[test]
fn rbd_images_get_regions_of_at_least_one_object_and_decode_like_any_other() {
    let rbd = |size: u64| {
        Header::new(
            PiFormat::Type1,
            4096,
            DataIdentity {
                path: "rbd:pool/image".into(),
                size,
                device: crate::integrity::header::RBD_DEVICE,
                inode: 7,
            },
        )
    };
    for (size, shift) in [(1 << 20, 22), (1 << 30, 22), (1 << 42, 22), (1 << 43, 23)] {
        let h = rbd(size);
        assert_eq!(h.region_shift, shift, "size {size}");
        assert!(h.regions() <= 1 << 20);
        let path = std::path::Path::new("x.pi");
        assert_eq!(Header::decode(&h.encode(), path).unwrap(), h);
    }
    // A file of the same size keeps 1 MiB regions.
    assert_eq!(header(PiFormat::Type1, 4096, 1 << 30).region_shift, 20);
}

#[test]
fn region_blocks_cover_the_disk_exactly() {
    let size = (3 << 20) + 8192;
    let (_dir, path) = created(PiFormat::Type1, 4096, size);
    let meta = PiMetadata::open(&path, &identity(size), false).unwrap();
    assert_eq!(meta.header().regions(), 4);
    assert_eq!(meta.region_blocks(0), (0, 256));
    assert_eq!(meta.region_blocks(2), (512, 256));
    assert_eq!(meta.region_blocks(3), (768, 2));
    assert!(meta.dirty_regions().is_empty());
}
