//! One test per way a guest can get a request wrong, on chains built in a mock split queue.

use super::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

const MEM_SIZE: u64 = 0x10_0000;
const HDR: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const STATUS: u64 = 0x3_0000;
const TABLE: u64 = 0x4_0000;
const W: u16 = VRING_DESC_F_WRITE as u16;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

fn limits() -> Limits {
    Limits {
        capacity_sectors: 2048,
        block_size: 512,
        max_segments: 8,
        max_transfer_bytes: 1 << 20,
        max_discard_segments: 4,
        max_discard_sectors: 1024,
        max_write_zeroes_segments: 4,
        max_write_zeroes_sectors: 1024,
        read_only: false,
    }
}

fn header(mem: &GuestMemoryMmap, request_type: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&request_type.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
}

fn segments(mem: &GuestMemoryMmap, segs: &[(u64, u32, u32)]) {
    let mut raw = Vec::new();
    for (sector, n, flags) in segs {
        raw.extend_from_slice(&sector.to_le_bytes());
        raw.extend_from_slice(&n.to_le_bytes());
        raw.extend_from_slice(&flags.to_le_bytes());
    }
    mem.write_slice(&raw, GuestAddress(DATA)).unwrap();
}

fn d(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(virtio_queue::desc::split::Descriptor::new(
        addr, len, flags, 0,
    ))
}

/// Parse a well-linked chain made of `descs`.
fn parse(
    mem: &GuestMemoryMmap,
    descs: &[RawDescriptor],
    limits: &Limits,
) -> Result<Request, Rejected> {
    let q = MockSplitQueue::new(mem, 64);
    let chain = q.build_desc_chain(descs).unwrap();
    parse_request(chain.head_index(), chain, mem, limits)
}

/// Parse descriptors exactly as given (flags and next untouched), e.g. to build loops.
fn parse_raw(
    mem: &GuestMemoryMmap,
    descs: &[RawDescriptor],
    limits: &Limits,
) -> Result<Request, Rejected> {
    let q = MockSplitQueue::new(mem, 64);
    q.add_desc_chains(descs, 0).unwrap();
    let mut queue: Queue = q.create_queue().unwrap();
    let chain = queue.pop_descriptor_chain(mem).unwrap();
    parse_request(chain.head_index(), chain, mem, limits)
}

fn rejected(r: Result<Request, Rejected>) -> (RequestError, Option<GuestAddress>) {
    let e = r.expect_err("request should be rejected");
    (e.error, e.status)
}

fn read_chain(len: u32) -> Vec<RawDescriptor> {
    vec![d(HDR, 16, 0), d(DATA, len, W), d(STATUS, 1, W)]
}

fn write_chain(len: u32) -> Vec<RawDescriptor> {
    vec![d(HDR, 16, 0), d(DATA, len, 0), d(STATUS, 1, W)]
}

// ---- well-formed requests ----

#[test]
fn read_request_parses_with_data_and_status() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 8);
    let r = parse(&m, &read_chain(4096), &limits()).unwrap();
    assert_eq!(r.status, GuestAddress(STATUS));
    assert_eq!(
        r.kind,
        RequestKind::Read {
            sector: 8,
            data: vec![GuestRange {
                addr: GuestAddress(DATA),
                len: 4096
            }],
            len: 4096
        }
    );
}

#[test]
fn header_data_and_status_may_share_descriptors() {
    // VIRTIO_F_ANY_LAYOUT: header and data in one readable descriptor; status alone.
    let m = mem();
    header(&m, VIRTIO_BLK_T_OUT, 0);
    let r = parse(&m, &[d(HDR, 16 + 1024, 0), d(STATUS, 1, W)], &limits()).unwrap();
    assert_eq!(
        r.kind,
        RequestKind::Write {
            sector: 0,
            data: vec![GuestRange {
                addr: GuestAddress(HDR + 16),
                len: 1024
            }],
            len: 1024
        }
    );
    // A read whose status byte is the last byte of its only data descriptor.
    header(&m, VIRTIO_BLK_T_IN, 0);
    let r = parse(&m, &[d(HDR, 16, 0), d(DATA, 513, W)], &limits()).unwrap();
    assert_eq!(r.status, GuestAddress(DATA + 512));
    assert!(matches!(r.kind, RequestKind::Read { len: 512, .. }));
}

#[test]
fn header_split_across_descriptors_is_reassembled() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 4);
    let r = parse(
        &m,
        &[
            d(HDR, 4, 0),
            d(HDR + 4, 12, 0),
            d(DATA, 512, W),
            d(STATUS, 1, W),
        ],
        &limits(),
    )
    .unwrap();
    assert!(matches!(
        r.kind,
        RequestKind::Read {
            sector: 4,
            len: 512,
            ..
        }
    ));
}

#[test]
fn flush_get_id_discard_and_write_zeroes_parse() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(
        parse(&m, &[d(HDR, 16, 0), d(STATUS, 1, W)], &limits())
            .unwrap()
            .kind,
        RequestKind::Flush
    );
    header(&m, VIRTIO_BLK_T_GET_ID, 0);
    assert!(matches!(
        parse(&m, &read_chain(20), &limits()).unwrap().kind,
        RequestKind::GetId { len: 20, .. }
    ));
    header(&m, VIRTIO_BLK_T_DISCARD, 0);
    segments(&m, &[(0, 8, 0), (64, 16, 0)]);
    assert_eq!(
        parse(&m, &write_chain(32), &limits()).unwrap().kind,
        RequestKind::Discard {
            segments: vec![
                Segment {
                    sector: 0,
                    sectors: 8,
                    unmap: false
                },
                Segment {
                    sector: 64,
                    sectors: 16,
                    unmap: false
                }
            ]
        }
    );
    header(&m, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    segments(&m, &[(8, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)]);
    assert_eq!(
        parse(&m, &write_chain(16), &limits()).unwrap().kind,
        RequestKind::WriteZeroes {
            segments: vec![Segment {
                sector: 8,
                sectors: 8,
                unmap: true
            }]
        }
    );
}

#[test]
fn indirect_tables_are_followed() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 0);
    let table = [
        d(HDR, 16, VRING_DESC_F_NEXT as u16),
        d(DATA, 512, W | VRING_DESC_F_NEXT as u16),
        d(STATUS, 1, W),
    ];
    for (i, mut desc) in table.into_iter().enumerate() {
        if i < 2 {
            desc = RawDescriptor::from(virtio_queue::desc::split::Descriptor::new(
                virtio_queue::desc::split::Descriptor::from(desc).addr().0,
                virtio_queue::desc::split::Descriptor::from(desc).len(),
                virtio_queue::desc::split::Descriptor::from(desc).flags(),
                i as u16 + 1,
            ));
        }
        m.write_obj(desc, GuestAddress(TABLE + 16 * i as u64))
            .unwrap();
    }
    let r = parse_raw(&m, &[d(TABLE, 48, VRING_DESC_F_INDIRECT as u16)], &limits()).unwrap();
    assert!(matches!(r.kind, RequestKind::Read { len: 512, .. }));
}

// ---- chain shape ----

#[test]
fn rejects_empty_chain() {
    // An indirect head whose table length is not a multiple of 16 yields no descriptors.
    let m = mem();
    let (e, status) = rejected(parse_raw(
        &m,
        &[d(TABLE, 17, VRING_DESC_F_INDIRECT as u16)],
        &limits(),
    ));
    assert_eq!(e, RequestError::EmptyChain);
    assert_eq!(status, None);
}

#[test]
fn rejects_descriptor_loop() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 0);
    let next = VRING_DESC_F_NEXT as u16;
    let descs = [
        RawDescriptor::from(virtio_queue::desc::split::Descriptor::new(HDR, 16, next, 1)),
        RawDescriptor::from(virtio_queue::desc::split::Descriptor::new(
            DATA, 512, next, 0,
        )),
    ];
    let mut l = limits();
    l.max_segments = 1000; // the loop, not the count limit, must be what stops it
    let (e, status) = rejected(parse_raw(&m, &descs, &l));
    assert_eq!(e, RequestError::MalformedChain);
    assert_eq!(status, None);
}

#[test]
fn rejects_absurd_segment_counts() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 0);
    let mut descs = vec![d(HDR, 16, 0)];
    descs.extend((0..9).map(|i| d(DATA + i * 512, 512, W)));
    descs.push(d(STATUS, 1, W));
    assert_eq!(
        rejected(parse(&m, &descs, &limits())).0,
        RequestError::TooManyDescriptors { max: 10 }
    );
}

#[test]
fn rejects_buffers_outside_guest_memory() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 0);
    let chain = [d(HDR, 16, 0), d(MEM_SIZE - 256, 512, W), d(STATUS, 1, W)];
    let (e, status) = rejected(parse(&m, &chain, &limits()));
    assert_eq!(
        e,
        RequestError::OutsideGuestMemory {
            addr: MEM_SIZE - 256,
            len: 512
        }
    );
    assert_eq!(
        status,
        Some(GuestAddress(STATUS)),
        "the chain's own status byte is valid: the guest must learn of the failure"
    );
    // With the status descriptor itself outside memory there is nowhere to report.
    let chain = [d(HDR, 16, 0), d(DATA, 512, W), d(MEM_SIZE - 1, 2, W)];
    let (_, status) = rejected(parse(&m, &chain, &limits()));
    assert_eq!(status, None, "never write outside guest memory");
    // Address arithmetic that would wrap around is outside memory too.
    let chain = [d(HDR, 16, 0), d(u64::MAX - 10, 512, W), d(STATUS, 1, W)];
    assert!(matches!(
        rejected(parse(&m, &chain, &limits())).0,
        RequestError::OutsideGuestMemory { .. }
    ));
}

#[test]
fn rejects_readable_after_writable() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_OUT, 0);
    let chain = [d(HDR, 16, 0), d(STATUS, 1, W), d(DATA, 512, 0)];
    assert_eq!(
        rejected(parse(&m, &chain, &limits())).0,
        RequestError::ReadableAfterWritable
    );
}

#[test]
fn rejects_short_header() {
    let m = mem();
    let (e, status) = rejected(parse(&m, &[d(HDR, 8, 0), d(STATUS, 1, W)], &limits()));
    assert_eq!(e, RequestError::ShortHeader { len: 8 });
    assert_eq!(status, Some(GuestAddress(STATUS)));
    assert_eq!(e.status(), VIRTIO_BLK_S_IOERR);
}

#[test]
fn rejects_missing_status() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_OUT, 0);
    let (e, status) = rejected(parse(&m, &[d(HDR, 16, 0), d(DATA, 512, 0)], &limits()));
    assert_eq!(e, RequestError::MissingStatus);
    assert_eq!(status, None);
    // A zero-length writable descriptor is no status byte either.
    let (e, _) = rejected(parse(
        &m,
        &[d(HDR, 16, 0), d(DATA, 512, 0), d(STATUS, 0, W)],
        &limits(),
    ));
    assert_eq!(e, RequestError::MissingStatus);
}

// ---- data direction and length ----

#[test]
fn rejects_read_with_device_readable_data() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 0);
    let e = rejected(parse(&m, &write_chain(512), &limits())).0;
    assert_eq!(
        e,
        RequestError::UnexpectedReadableData {
            request: "read",
            len: 512
        }
    );
}

#[test]
fn rejects_write_with_device_writable_data() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_OUT, 0);
    let e = rejected(parse(&m, &read_chain(512), &limits())).0;
    assert_eq!(
        e,
        RequestError::UnexpectedWritableData {
            request: "write",
            len: 512
        }
    );
}

#[test]
fn rejects_read_without_data() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 0);
    let e = rejected(parse(&m, &[d(HDR, 16, 0), d(STATUS, 1, W)], &limits())).0;
    assert_eq!(e, RequestError::NoData { request: "read" });
}

#[test]
fn rejects_length_not_a_multiple_of_512() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_OUT, 0);
    let e = rejected(parse(&m, &write_chain(1000), &limits())).0;
    assert_eq!(
        e,
        RequestError::UnalignedLength {
            len: 1000,
            block_size: 512
        }
    );
}

#[test]
fn rejects_sector_not_aligned_to_the_logical_block() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 1);
    let mut l = limits();
    l.block_size = 4096;
    let e = rejected(parse(&m, &read_chain(4096), &l)).0;
    assert_eq!(
        e,
        RequestError::UnalignedSector {
            sector: 1,
            block_size: 4096
        }
    );
}

#[test]
fn rejects_sector_arithmetic_overflow() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, u64::MAX - 1);
    let e = rejected(parse(&m, &read_chain(1024), &limits())).0;
    assert_eq!(
        e,
        RequestError::SectorOverflow {
            sector: u64::MAX - 1,
            sectors: 2
        }
    );
}

#[test]
fn rejects_ranges_past_the_end_of_the_disk() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 2047);
    let e = rejected(parse(&m, &read_chain(1024), &limits())).0;
    assert_eq!(
        e,
        RequestError::OutOfRange {
            sector: 2047,
            end: 2049,
            capacity: 2048
        }
    );
    // The last sector itself is fine.
    assert!(parse(&m, &read_chain(512), &limits()).is_ok());
}

#[test]
fn rejects_transfers_over_the_size_limit() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_IN, 0);
    let mut l = limits();
    l.max_transfer_bytes = 4096;
    let e = rejected(parse(&m, &read_chain(8192), &l)).0;
    assert_eq!(
        e,
        RequestError::TooLarge {
            len: 8192,
            max: 4096
        }
    );
}

// ---- request types and fields ----

#[test]
fn rejects_writes_and_discards_on_a_read_only_disk() {
    let m = mem();
    let mut l = limits();
    l.read_only = true;
    header(&m, VIRTIO_BLK_T_OUT, 0);
    let (e, status) = rejected(parse(&m, &write_chain(512), &l));
    assert_eq!(e, RequestError::ReadOnly { request: "write" });
    assert_eq!(
        (status, e.status()),
        (Some(GuestAddress(STATUS)), VIRTIO_BLK_S_IOERR)
    );
    header(&m, VIRTIO_BLK_T_DISCARD, 0);
    segments(&m, &[(0, 8, 0)]);
    assert_eq!(
        rejected(parse(&m, &write_chain(16), &l)).0,
        RequestError::ReadOnly { request: "discard" }
    );
    header(&m, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    assert_eq!(
        rejected(parse(&m, &write_chain(16), &l)).0,
        RequestError::ReadOnly {
            request: "write-zeroes"
        }
    );
    // Reads still work.
    header(&m, VIRTIO_BLK_T_IN, 0);
    assert!(parse(&m, &read_chain(512), &l).is_ok());
}

#[test]
fn unknown_request_types_get_unsupp() {
    let m = mem();
    for t in [2u32, 10, 14, 99, u32::MAX] {
        header(&m, t, 0);
        let (e, status) = rejected(parse(&m, &read_chain(512), &limits()));
        assert_eq!(e, RequestError::UnsupportedType(t));
        assert_eq!(
            (status, e.status()),
            (Some(GuestAddress(STATUS)), VIRTIO_BLK_S_UNSUPP)
        );
    }
}

#[test]
fn rejects_get_id_buffers_that_are_too_small() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_GET_ID, 0);
    let e = rejected(parse(&m, &read_chain(19), &limits())).0;
    assert_eq!(e, RequestError::IdBufferTooSmall { len: 19 });
}

#[test]
fn rejects_flush_carrying_data() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_FLUSH, 0);
    let e = rejected(parse(&m, &write_chain(512), &limits())).0;
    assert_eq!(
        e,
        RequestError::UnexpectedReadableData {
            request: "flush",
            len: 512
        }
    );
}

#[test]
fn rejects_partial_discard_segments() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_DISCARD, 0);
    let e = rejected(parse(&m, &write_chain(24), &limits())).0;
    assert_eq!(
        e,
        RequestError::BadSegmentPayload {
            request: "discard",
            len: 24
        }
    );
    let e = rejected(parse(&m, &[d(HDR, 16, 0), d(STATUS, 1, W)], &limits())).0;
    assert_eq!(
        e,
        RequestError::BadSegmentPayload {
            request: "discard",
            len: 0
        }
    );
}

#[test]
fn rejects_too_many_discard_segments() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    segments(&m, &[(0, 8, 0); 5]);
    let e = rejected(parse(&m, &write_chain(80), &limits())).0;
    assert_eq!(
        e,
        RequestError::TooManySegments {
            request: "write-zeroes",
            count: 5,
            max: 4
        }
    );
}

#[test]
fn discard_with_unmap_and_unknown_write_zeroes_flags_get_unsupp() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_DISCARD, 0);
    segments(&m, &[(0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)]);
    let e = rejected(parse(&m, &write_chain(16), &limits())).0;
    assert_eq!(
        e,
        RequestError::BadSegmentFlags {
            request: "discard",
            flags: 1
        }
    );
    assert_eq!(e.status(), VIRTIO_BLK_S_UNSUPP);
    header(&m, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    segments(&m, &[(0, 8, 2)]);
    let e = rejected(parse(&m, &write_chain(16), &limits())).0;
    assert_eq!(
        e,
        RequestError::BadSegmentFlags {
            request: "write-zeroes",
            flags: 2
        }
    );
}

#[test]
fn rejects_oversized_empty_misaligned_and_out_of_range_segments() {
    let m = mem();
    header(&m, VIRTIO_BLK_T_DISCARD, 0);
    segments(&m, &[(0, 2048, 0)]);
    let e = rejected(parse(&m, &write_chain(16), &limits())).0;
    assert_eq!(
        e,
        RequestError::SegmentTooLarge {
            request: "discard",
            sectors: 2048,
            max: 1024
        }
    );
    segments(&m, &[(0, 0, 0)]);
    assert_eq!(
        rejected(parse(&m, &write_chain(16), &limits())).0,
        RequestError::EmptySegment { request: "discard" }
    );
    segments(&m, &[(2040, 16, 0)]);
    assert_eq!(
        rejected(parse(&m, &write_chain(16), &limits())).0,
        RequestError::OutOfRange {
            sector: 2040,
            end: 2056,
            capacity: 2048
        }
    );
    segments(&m, &[(u64::MAX, 1, 0)]);
    assert!(matches!(
        rejected(parse(&m, &write_chain(16), &limits())).0,
        RequestError::SectorOverflow { .. }
    ));
    let mut l = limits();
    l.block_size = 4096;
    segments(&m, &[(8, 4, 0)]);
    assert_eq!(
        rejected(parse(&m, &write_chain(16), &l)).0,
        RequestError::UnalignedLength {
            len: 2048,
            block_size: 4096
        }
    );
}
