//! The executor on its own: chains built in virtio-queue's mock split queue, run against a
//! real image file in a temporary directory, with each engine. What the guest sees (status
//! byte, used length, the bytes in its buffers) and what the image holds afterwards.

use super::*;
use crate::integrity::metadata::{DataIdentity, Header};
use crate::integrity::pi::PiFormat;
use crate::integrity::PiMetadata;
use crate::requests::parse::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use crate::requests::policy::{AutoPath, Calibration, CostBasis, Target};
use crate::requests::WritePolicy;
use std::time::Duration;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;

const MEM_SIZE: u64 = 0x10_0000;
const HDR: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const STATUS: u64 = 0x3_0000;
const IMAGE_BYTES: u64 = 1 << 20;
const W: u16 = VRING_DESC_F_WRITE as u16;

fn guest() -> Arc<GuestMemoryMmap> {
    Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap())
}

fn limits(block_size: u32) -> Limits {
    Limits {
        capacity_sectors: IMAGE_BYTES / 512,
        block_size,
        max_segments: 8,
        max_transfer_bytes: 1 << 20,
        max_discard_segments: 4,
        max_discard_sectors: 1024,
        max_write_zeroes_segments: 4,
        max_write_zeroes_sectors: 1024,
        read_only: false,
    }
}

struct Rig {
    _dir: tempfile::TempDir,
    image: Arc<Image>,
    exec: Executor,
    stats: Arc<QueueCounters>,
    mem: Arc<GuestMemoryMmap>,
}

/// An executor over a fresh 1 MiB image; with `pi`, type1 PI on 4096-byte intervals.
fn rig(engine: EngineKind, pi: bool) -> Rig {
    rig_of(engine, pi, IMAGE_BYTES, limits(if pi { 4096 } else { 512 }))
}

/// As [`rig`], with an image of `image_bytes` (sparse) and the given limits.
fn rig_of(engine: EngineKind, pi: bool, image_bytes: u64, limits: Limits) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    Image::create(&path, image_bytes).unwrap();
    let image = Arc::new(Image::open(&path, false).unwrap());
    let store = pi.then(|| {
        let data = DataIdentity::of(&path, image.size()).unwrap();
        let meta = crate::integrity::metadata::default_path(&path);
        PiMetadata::create(&meta, &Header::new(PiFormat::Type1, 4096, data)).unwrap();
        Arc::new(PiStore::open_beside(&image, None, true).unwrap().0)
    });
    let stats = Arc::new(QueueCounters::default());
    let basis = CostBasis {
        target: Target::Dma,
        auto_path: AutoPath::Cost,
        calibration: Calibration::default(),
    };
    let exec = Executor::new(
        Arc::clone(&image),
        limits,
        "test",
        64,
        Arc::clone(&stats),
        engine,
        Protection {
            pi: store,
            policy: WritePolicy::Auto,
            tracker: Arc::new(MutationTracker::new(image_bytes, Duration::from_secs(10))),
            costs: WriteCosts::new(&basis),
        },
    )
    .unwrap();
    Rig {
        _dir: dir,
        image,
        exec,
        stats,
        mem: guest(),
    }
}

fn d(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(virtio_queue::desc::split::Descriptor::new(
        addr, len, flags, 0,
    ))
}

impl Rig {
    /// Run one request (header, an optional data buffer at DATA, the status byte) to
    /// completion; returns (status byte, used length).
    fn run(&mut self, request_type: u32, sector: u64, data: Option<(u32, bool)>) -> (u8, u32) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&request_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0xEEu8, GuestAddress(STATUS)).unwrap();
        let mut descs = vec![d(HDR, 16, VRING_DESC_F_NEXT as u16)];
        if let Some((len, device_writes)) = data {
            let flags = VRING_DESC_F_NEXT as u16 | if device_writes { W } else { 0 };
            descs.push(d(DATA, len, flags));
        }
        descs.push(d(STATUS, 1, W));
        let q = MockSplitQueue::new(&*self.mem, 64);
        let chain = q.build_desc_chain(&descs).unwrap();
        let head = chain.head_index();
        let mut done = Vec::new();
        self.exec.start(head, chain, &self.mem, true, &mut done);
        self.exec.drain(&mut done);
        assert_eq!(done.len(), 1, "exactly one completion per request");
        assert_eq!(done[0].head, head);
        let status: u8 = self.mem.read_obj(GuestAddress(STATUS)).unwrap();
        (status, done[0].len)
    }

    fn fill_guest(&self, len: usize, seed: u8) -> Vec<u8> {
        let bytes: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect();
        self.mem.write_slice(&bytes, GuestAddress(DATA)).unwrap();
        bytes
    }

    fn guest_data(&self, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        self.mem.read_slice(&mut out, GuestAddress(DATA)).unwrap();
        out
    }

    fn image_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = AlignedBuf::zeroed(len.next_multiple_of(4096));
        crate::integrity::reader::read_upto(&self.image, buf.as_mut_slice(), offset).unwrap();
        buf.as_slice()[..len].to_vec()
    }
}

#[test]
fn writes_land_in_the_image_and_read_back_with_each_engine() {
    for engine in [EngineKind::IoUring, EngineKind::Inline] {
        let mut r = rig(engine, false);
        let written = r.fill_guest(8192, 0x5A);
        assert_eq!(
            r.run(VIRTIO_BLK_T_OUT, 16, Some((8192, false))),
            (VIRTIO_BLK_S_OK, 1)
        );
        assert_eq!(
            r.image_bytes(16 * 512, 8192),
            written,
            "{engine}: image content"
        );
        assert_eq!(r.run(VIRTIO_BLK_T_FLUSH, 0, None), (VIRTIO_BLK_S_OK, 1));

        r.fill_guest(8192, 0); // overwrite the guest buffer before reading back
        assert_eq!(
            r.run(VIRTIO_BLK_T_IN, 16, Some((8192, true))),
            (VIRTIO_BLK_S_OK, 8192 + 1),
            "{engine}: a read reports its data bytes plus the status byte"
        );
        assert_eq!(r.guest_data(8192), written, "{engine}: read-back");
        let c = r.stats.snapshot();
        assert_eq!((c.reads, c.writes, c.flushes), (1, 1, 1));
        assert_eq!((c.bytes_read, c.bytes_written), (8192, 8192));
        assert_eq!(c.in_flight, 0, "{engine}: every request completed");
        for op in ["read", "write", "flush"] {
            assert_eq!(c.latency.0[op].count, 1, "{engine}: one {op} timed");
        }
    }
}

#[test]
fn bad_requests_complete_with_an_error_status_and_leave_the_image_alone() {
    let mut r = rig(EngineKind::Inline, false);
    r.fill_guest(4096, 0x11);
    // An unknown request type.
    assert_eq!(r.run(77, 0, Some((4096, false))).0, VIRTIO_BLK_S_UNSUPP);
    // A write that would run past the end of the disk.
    let last = IMAGE_BYTES / 512 - 4;
    assert_eq!(
        r.run(VIRTIO_BLK_T_OUT, last, Some((4096, false))).0,
        VIRTIO_BLK_S_IOERR
    );
    // A read whose data buffer the device may not write.
    assert_eq!(
        r.run(VIRTIO_BLK_T_IN, 0, Some((4096, false))).0,
        VIRTIO_BLK_S_IOERR
    );
    assert!(
        r.image_bytes(0, 4096).iter().all(|&b| b == 0),
        "nothing was written"
    );
    assert!(r
        .image_bytes(IMAGE_BYTES - 4096, 4096)
        .iter()
        .all(|&b| b == 0));
    let c = r.stats.snapshot();
    assert_eq!((c.writes, c.reads, c.rejected, c.in_flight), (0, 0, 3, 0));
    let reasons: Vec<(&str, u64)> = c
        .rejected_by_reason
        .0
        .iter()
        .map(|(r, n)| (r.as_str(), *n))
        .collect();
    assert_eq!(
        reasons,
        [
            ("malformed_request", 1),
            ("out_of_range", 1),
            ("unsupported", 1)
        ]
    );
}

#[test]
fn with_pi_a_corrupted_block_fails_its_read_and_its_neighbour_does_not() {
    for engine in [EngineKind::IoUring, EngineKind::Inline] {
        let mut r = rig(engine, true);
        r.fill_guest(8192, 0x3C);
        // Sector 16 is LBA 2 of the 4096-byte intervals; the write covers LBAs 2 and 3.
        assert_eq!(
            r.run(VIRTIO_BLK_T_OUT, 16, Some((8192, false))).0,
            VIRTIO_BLK_S_OK
        );
        assert_eq!(
            r.run(VIRTIO_BLK_T_IN, 16, Some((8192, true))).0,
            VIRTIO_BLK_S_OK
        );

        // Change one byte of LBA 3 behind the daemon's back.
        let offset = 3 * 4096 + 100;
        // Buffered, so a one-byte change is allowed; the daemon's O_DIRECT reads see it once
        // it is written back.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(r.image.path())
            .unwrap();
        let mut byte = [0u8; 1];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut byte, offset).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, &[!byte[0]], offset).unwrap();
        file.sync_all().unwrap();

        assert_eq!(
            r.run(VIRTIO_BLK_T_IN, 24, Some((4096, true))).0,
            VIRTIO_BLK_S_IOERR,
            "{engine}: the corrupted block"
        );
        assert_eq!(
            r.run(VIRTIO_BLK_T_IN, 16, Some((4096, true))).0,
            VIRTIO_BLK_S_OK,
            "{engine}: its neighbour"
        );
        assert!(r.stats.guard_errors.get() >= 1, "{engine}");
    }
}

#[test]
fn write_zeroes_of_the_largest_advertised_segment_succeeds_where_only_writing_zeroes_works() {
    // A target where neither fallocate mode works, so write-zeroes falls back to writing
    // real zeroes; the largest segment the device advertises (backend.rs: 2^22 sectors,
    // 2 GiB), which needs more iovecs of the zero buffer than one write takes.
    const SEGMENT_SECTORS: u32 = 1 << 22;
    const GIB: u64 = 1 << 30;
    let image_bytes = 4 * GIB;
    let limits = Limits {
        capacity_sectors: image_bytes / 512,
        max_write_zeroes_sectors: SEGMENT_SECTORS,
        ..limits(4096)
    };
    let mut r = rig_of(EngineKind::Inline, true, image_bytes, limits);
    r.exec.engine = Engine::Faulty(Engine::without_fallocate(r.image.fd().unwrap()));
    let sector = |byte: u64| byte / 512;
    // Data to zero: blocks early, past the first 1 GiB and at the very end of the segment,
    // and a second, small segment; and a neighbour right after the big one that must stay.
    let end = u64::from(SEGMENT_SECTORS) * 512;
    let doomed = [0, GIB + 8192, end - 4096, 3 * GIB];
    let neighbour = end;
    for (i, &at) in doomed.iter().chain([&neighbour]).enumerate() {
        r.fill_guest(4096, 0x40 + i as u8);
        let status = r.run(VIRTIO_BLK_T_OUT, sector(at), Some((4096, false))).0;
        assert_eq!(status, VIRTIO_BLK_S_OK);
    }
    let kept = r.fill_guest(4096, 0x40 + doomed.len() as u8);

    let mut table = Vec::new();
    for (start, sectors) in [(0, SEGMENT_SECTORS), (sector(3 * GIB), 16)] {
        table.extend_from_slice(&u64::to_le_bytes(start));
        table.extend_from_slice(&u32::to_le_bytes(sectors));
        table.extend_from_slice(&0u32.to_le_bytes()); // no unmap: zero-range first
    }
    r.mem.write_slice(&table, GuestAddress(DATA)).unwrap();
    assert_eq!(
        r.run(
            VIRTIO_BLK_T_WRITE_ZEROES,
            0,
            Some((table.len() as u32, false))
        ),
        (VIRTIO_BLK_S_OK, 1),
        "a segment the device advertises must not fail"
    );

    for &at in &doomed {
        assert!(
            r.image_bytes(at, 4096).iter().all(|&b| b == 0),
            "image at {at:#x} holds zeroes"
        );
        r.fill_guest(4096, 0xFF);
        let read = r.run(VIRTIO_BLK_T_IN, sector(at), Some((4096, true)));
        assert_eq!(read.0, VIRTIO_BLK_S_OK, "read at {at:#x} verifies");
        assert!(
            r.guest_data(4096).iter().all(|&b| b == 0),
            "read at {at:#x}"
        );
    }
    assert!(
        r.image_bytes(neighbour, 4096) == kept,
        "the neighbour is untouched"
    );
    let read = r.run(VIRTIO_BLK_T_IN, sector(neighbour), Some((4096, true)));
    assert_eq!(read.0, VIRTIO_BLK_S_OK);
    assert!(r.guest_data(4096) == kept, "the neighbour reads back");
    let c = r.stats.snapshot();
    assert_eq!((c.io_errors, c.guard_errors, c.in_flight), (0, 0, 0));
}

#[test]
fn a_zeroing_that_fails_part_way_leaves_no_false_guard_error() {
    // Written as zeroes in two writes (1 GiB, then 1 MiB); the second fails. The blocks
    // the first write zeroed and those the second left alone must all verify: the segment
    // must not be declared unwritten because one of its writes succeeded.
    const GIB: u64 = 1 << 30;
    let image_bytes = 2 * GIB;
    let segment_sectors = ((GIB + (1 << 20)) / 512) as u32;
    let limits = Limits {
        capacity_sectors: image_bytes / 512,
        max_write_zeroes_sectors: 1 << 22,
        ..limits(4096)
    };
    let mut r = rig_of(EngineKind::Inline, true, image_bytes, limits);
    let sector = |byte: u64| byte / 512;
    let (zeroed, kept) = (8192, GIB + 4096);
    for at in [zeroed, kept] {
        r.fill_guest(4096, 0x77);
        let status = r.run(VIRTIO_BLK_T_OUT, sector(at), Some((4096, false))).0;
        assert_eq!(status, VIRTIO_BLK_S_OK);
    }
    let old = r.fill_guest(4096, 0x77);
    let mut faulty = Engine::without_fallocate(r.image.fd().unwrap());
    faulty.fail_writes_from = GIB;
    r.exec.engine = Engine::Faulty(faulty);

    let mut table = Vec::new();
    table.extend_from_slice(&0u64.to_le_bytes());
    table.extend_from_slice(&segment_sectors.to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes());
    r.mem.write_slice(&table, GuestAddress(DATA)).unwrap();
    let status = r.run(VIRTIO_BLK_T_WRITE_ZEROES, 0, Some((16, false))).0;
    assert_eq!(status, VIRTIO_BLK_S_IOERR, "the zeroing failed");

    for (at, want) in [(zeroed, vec![0u8; 4096]), (kept, old)] {
        assert!(r.image_bytes(at, 4096) == want, "image at {at:#x}");
        r.fill_guest(4096, 0xFF);
        let read = r.run(VIRTIO_BLK_T_IN, sector(at), Some((4096, true)));
        assert_eq!(read.0, VIRTIO_BLK_S_OK, "read at {at:#x} verifies");
        assert!(r.guest_data(4096) == want, "read at {at:#x}");
    }
    assert_eq!(r.stats.guard_errors.get(), 0);
}
