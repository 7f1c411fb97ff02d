//! The trust boundary: turns a guest's descriptor chain into a validated [`Request`].
//!
//! Everything a guest controls is checked here, once, before any I/O is planned: chain
//! shape, data direction, lengths, sector arithmetic, disk bounds, guest-memory bounds and
//! request-specific fields. Headers and discard segments are copied out of guest memory once
//! and only the copies are examined (the guest may rewrite its memory while we look).
//! The parser only reads guest memory; it never writes it and never touches the disk.

use thiserror::Error;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::storage::SECTOR_SIZE;

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Length of the serial number GET_ID returns (virtio spec VIRTIO_BLK_ID_BYTES).
pub const VIRTIO_BLK_ID_BYTES: u32 = 20;
pub const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

const HEADER_LEN: u64 = 16;
const SEGMENT_LEN: u64 = 16;

/// What the device advertised; requests are held to it.
#[derive(Debug, Clone)]
pub struct Limits {
    pub capacity_sectors: u64,
    /// Logical block size in bytes (a multiple of 512). Data lengths and sectors align to it.
    pub block_size: u32,
    /// Most data descriptors in one request (virtio seg_max).
    pub max_segments: u32,
    /// Most bytes one read or write may move.
    pub max_transfer_bytes: u64,
    pub max_discard_segments: u32,
    pub max_discard_sectors: u32,
    pub max_write_zeroes_segments: u32,
    pub max_write_zeroes_sectors: u32,
    pub read_only: bool,
}

/// A piece of guest memory the parser checked lies entirely inside guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestRange {
    pub addr: GuestAddress,
    pub len: u32,
}

/// One discard or write-zeroes range, copied out of guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub sector: u64,
    pub sectors: u32,
    pub unmap: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKind {
    Read {
        sector: u64,
        data: Vec<GuestRange>,
        len: u64,
    },
    Write {
        sector: u64,
        data: Vec<GuestRange>,
        len: u64,
    },
    Flush,
    GetId {
        buffer: Vec<GuestRange>,
        len: u64,
    },
    Discard {
        segments: Vec<Segment>,
    },
    WriteZeroes {
        segments: Vec<Segment>,
    },
}

/// A request that passed every check. Its ranges are valid in the memory it was parsed against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub head: u16,
    pub kind: RequestKind,
    /// The status byte: the last device-writable byte of the chain.
    pub status: GuestAddress,
}

/// Why a chain was refused. Each variant maps to exactly one status in [`RequestError::status`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RequestError {
    #[error("descriptor chain is empty")]
    EmptyChain,
    #[error(
        "descriptor chain loops, is longer than the queue, or names an invalid indirect table"
    )]
    MalformedChain,
    #[error("descriptor chain has more than {max} descriptors")]
    TooManyDescriptors { max: u32 },
    #[error("descriptor {addr:#x}+{len} lies outside guest memory")]
    OutsideGuestMemory { addr: u64, len: u32 },
    #[error("device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    #[error("request header is {len} bytes; it needs 16")]
    ShortHeader { len: u64 },
    #[error("chain has no device-writable byte for the status")]
    MissingStatus,
    #[error("{request} request carries {len} device-readable bytes after its header")]
    UnexpectedReadableData { request: &'static str, len: u64 },
    #[error("{request} request carries {len} device-writable bytes before its status byte")]
    UnexpectedWritableData { request: &'static str, len: u64 },
    #[error("{request} request has no data")]
    NoData { request: &'static str },
    #[error("data length {len} is not a multiple of the {block_size}-byte block size")]
    UnalignedLength { len: u64, block_size: u32 },
    #[error("sector {sector} is not aligned to the {block_size}-byte block size")]
    UnalignedSector { sector: u64, block_size: u32 },
    #[error("sector {sector} + {sectors} sectors overflows")]
    SectorOverflow { sector: u64, sectors: u64 },
    #[error("sectors {sector}..{end} end past the disk's {capacity} sectors")]
    OutOfRange {
        sector: u64,
        end: u64,
        capacity: u64,
    },
    #[error("transfer of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: u64, max: u64 },
    #[error("{request} request on a read-only disk")]
    ReadOnly { request: &'static str },
    #[error("unsupported request type {0}")]
    UnsupportedType(u32),
    #[error("GET_ID buffer is {len} bytes; it needs {VIRTIO_BLK_ID_BYTES}")]
    IdBufferTooSmall { len: u64 },
    #[error("{request} payload of {len} bytes is not a whole number of 16-byte segments")]
    BadSegmentPayload { request: &'static str, len: u64 },
    #[error("{request} request has {count} segments; at most {max} are allowed")]
    TooManySegments {
        request: &'static str,
        count: u64,
        max: u32,
    },
    #[error("{request} segment has flags {flags:#x}, which are not allowed")]
    BadSegmentFlags { request: &'static str, flags: u32 },
    #[error("{request} segment of {sectors} sectors exceeds the {max}-sector limit")]
    SegmentTooLarge {
        request: &'static str,
        sectors: u32,
        max: u32,
    },
    #[error("{request} segment covers no sectors")]
    EmptySegment { request: &'static str },
}

impl RequestError {
    /// The one place that decides what status a refused request completes with.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::UnsupportedType(_) | RequestError::BadSegmentFlags { .. } => {
                VIRTIO_BLK_S_UNSUPP
            }
            _ => VIRTIO_BLK_S_IOERR,
        }
    }
}

/// A refused chain: where (if anywhere) its status byte is, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub head: u16,
    /// `None` when the chain has no usable status byte; it then completes with length 0.
    pub status: Option<GuestAddress>,
    pub error: RequestError,
}

/// A descriptor that passed the memory check.
#[derive(Debug, Clone, Copy)]
struct Piece {
    addr: GuestAddress,
    len: u32,
}

/// Parse the chain whose head is `head` and whose descriptors `descriptors` yields.
pub fn parse_request(
    head: u16,
    descriptors: impl Iterator<Item = Descriptor>,
    mem: &GuestMemoryMmap,
    limits: &Limits,
) -> Result<Request, Rejected> {
    let (readable, writable) =
        collect_pieces(descriptors, mem, limits).map_err(|(error, status)| Rejected {
            head,
            status,
            error,
        })?;

    let status = last_byte(&writable);
    let reject = |error| Rejected {
        head,
        status,
        error,
    };
    let readable_len = total_len(&readable);
    if readable_len < HEADER_LEN {
        return Err(reject(RequestError::ShortHeader { len: readable_len }));
    }
    let Some(status_addr) = status else {
        return Err(reject(RequestError::MissingStatus));
    };

    // Copy the header out of guest memory once; only the copy is examined.
    let mut header = [0u8; HEADER_LEN as usize];
    copy_out(&readable, 0, &mut header, mem).map_err(reject)?;
    let request_type = u32::from_le_bytes(header[0..4].try_into().unwrap());
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap());

    let payload_len = readable_len - HEADER_LEN;
    let writable_data_len = total_len(&writable) - 1;

    let kind = match request_type {
        VIRTIO_BLK_T_IN => {
            expect_no_readable("read", payload_len).map_err(reject)?;
            check_transfer("read", sector, writable_data_len, limits).map_err(reject)?;
            RequestKind::Read {
                sector,
                data: carve(&writable, 0, writable_data_len),
                len: writable_data_len,
            }
        }
        VIRTIO_BLK_T_OUT => {
            expect_no_writable("write", writable_data_len).map_err(reject)?;
            if limits.read_only {
                return Err(reject(RequestError::ReadOnly { request: "write" }));
            }
            check_transfer("write", sector, payload_len, limits).map_err(reject)?;
            RequestKind::Write {
                sector,
                data: carve(&readable, HEADER_LEN, payload_len),
                len: payload_len,
            }
        }
        VIRTIO_BLK_T_FLUSH => {
            expect_no_readable("flush", payload_len).map_err(reject)?;
            expect_no_writable("flush", writable_data_len).map_err(reject)?;
            RequestKind::Flush
        }
        VIRTIO_BLK_T_GET_ID => {
            expect_no_readable("get-id", payload_len).map_err(reject)?;
            if writable_data_len < u64::from(VIRTIO_BLK_ID_BYTES) {
                return Err(reject(RequestError::IdBufferTooSmall {
                    len: writable_data_len,
                }));
            }
            RequestKind::GetId {
                buffer: carve(&writable, 0, writable_data_len),
                len: writable_data_len,
            }
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let discard = request_type == VIRTIO_BLK_T_DISCARD;
            let request = if discard { "discard" } else { "write-zeroes" };
            expect_no_writable(request, writable_data_len).map_err(reject)?;
            if limits.read_only {
                return Err(reject(RequestError::ReadOnly { request }));
            }
            let segments = parse_segments(request, &readable, payload_len, mem, limits, discard)
                .map_err(reject)?;
            if discard {
                RequestKind::Discard { segments }
            } else {
                RequestKind::WriteZeroes { segments }
            }
        }
        other => return Err(reject(RequestError::UnsupportedType(other))),
    };
    Ok(Request {
        head,
        kind,
        status: status_addr,
    })
}

/// Walk the chain once: bound its length, check every descriptor lies in guest memory, and
/// split it into the device-readable part followed by the device-writable part.
/// Why a chain could not be walked, and where its status byte is if it has a usable one.
type ChainError = (RequestError, Option<GuestAddress>);

/// Walk the chain: readable descriptors, then writable ones, each inside guest memory. On an
/// error, also returns where the status byte is if the chain still has a usable one (its last
/// descriptor is writable and in memory), so the guest learns of the failure instead of
/// reading an untouched status byte.
fn collect_pieces(
    descriptors: impl Iterator<Item = Descriptor>,
    mem: &GuestMemoryMmap,
    limits: &Limits,
) -> Result<(Vec<Piece>, Vec<Piece>), ChainError> {
    // Header + status may share descriptors with data or sit in their own: allow two extra.
    let max = limits.max_segments.saturating_add(2);
    let mut readable = Vec::new();
    let mut writable: Vec<Piece> = Vec::new();
    let mut count: u32 = 0;
    let mut last_had_next = false;
    let mut first_error = None;
    // The last descriptor seen, if it is writable and inside guest memory.
    let mut status_candidate = None;
    for desc in descriptors {
        count += 1;
        if count > max {
            return Err((RequestError::TooManyDescriptors { max }, None));
        }
        last_had_next = desc.has_next();
        let piece = Piece {
            addr: desc.addr(),
            len: desc.len(),
        };
        status_candidate = None;
        if !mem.check_range(piece.addr, piece.len as usize) {
            first_error.get_or_insert(RequestError::OutsideGuestMemory {
                addr: piece.addr.0,
                len: piece.len,
            });
            continue;
        }
        if desc.is_write_only() {
            writable.push(piece);
            status_candidate = last_byte(&[piece]);
        } else if !writable.is_empty() {
            first_error.get_or_insert(RequestError::ReadableAfterWritable);
        } else {
            readable.push(piece);
        }
    }
    if count == 0 {
        return Err((RequestError::EmptyChain, None));
    }
    // The iterator stops silently on a loop (ttl exhausted), an out-of-table `next` or a
    // bad indirect table; in each case the last descriptor it gave us still says "next".
    // Then where the chain ends, and so where its status byte is, is unknown.
    if last_had_next {
        return Err((RequestError::MalformedChain, None));
    }
    if let Some(error) = first_error {
        return Err((error, status_candidate));
    }
    Ok((readable, writable))
}

fn total_len(pieces: &[Piece]) -> u64 {
    pieces.iter().map(|p| u64::from(p.len)).sum()
}

fn last_byte(pieces: &[Piece]) -> Option<GuestAddress> {
    pieces
        .iter()
        .rev()
        .find(|p| p.len > 0)
        .map(|p| GuestAddress(p.addr.0 + u64::from(p.len) - 1))
}

/// The guest ranges covering `len` bytes starting `skip` bytes into `pieces`.
fn carve(pieces: &[Piece], mut skip: u64, mut len: u64) -> Vec<GuestRange> {
    let mut out = Vec::new();
    for p in pieces {
        if len == 0 {
            break;
        }
        let plen = u64::from(p.len);
        if skip >= plen {
            skip -= plen;
            continue;
        }
        let take = (plen - skip).min(len);
        out.push(GuestRange {
            addr: GuestAddress(p.addr.0 + skip),
            len: take as u32,
        });
        len -= take;
        skip = 0;
    }
    out
}

/// Copy `out.len()` bytes starting `skip` bytes into `pieces` out of guest memory.
fn copy_out(
    pieces: &[Piece],
    skip: u64,
    out: &mut [u8],
    mem: &GuestMemoryMmap,
) -> Result<(), RequestError> {
    let mut filled = 0usize;
    for range in carve(pieces, skip, out.len() as u64) {
        let end = filled + range.len as usize;
        mem.read_slice(&mut out[filled..end], range.addr)
            .map_err(|_| RequestError::OutsideGuestMemory {
                addr: range.addr.0,
                len: range.len,
            })?;
        filled = end;
    }
    Ok(())
}

fn expect_no_readable(request: &'static str, len: u64) -> Result<(), RequestError> {
    match len {
        0 => Ok(()),
        len => Err(RequestError::UnexpectedReadableData { request, len }),
    }
}

fn expect_no_writable(request: &'static str, len: u64) -> Result<(), RequestError> {
    match len {
        0 => Ok(()),
        len => Err(RequestError::UnexpectedWritableData { request, len }),
    }
}

/// Check `sectors` sectors starting at `sector` are block-aligned and inside the disk.
fn check_range(sector: u64, sectors: u64, limits: &Limits) -> Result<(), RequestError> {
    let block_sectors = u64::from(limits.block_size) / SECTOR_SIZE;
    if !sector.is_multiple_of(block_sectors) {
        return Err(RequestError::UnalignedSector {
            sector,
            block_size: limits.block_size,
        });
    }
    let end = sector
        .checked_add(sectors)
        .ok_or(RequestError::SectorOverflow { sector, sectors })?;
    if end > limits.capacity_sectors {
        return Err(RequestError::OutOfRange {
            sector,
            end,
            capacity: limits.capacity_sectors,
        });
    }
    Ok(())
}

fn check_transfer(
    request: &'static str,
    sector: u64,
    len: u64,
    limits: &Limits,
) -> Result<(), RequestError> {
    if len == 0 {
        return Err(RequestError::NoData { request });
    }
    if !len.is_multiple_of(u64::from(limits.block_size)) {
        return Err(RequestError::UnalignedLength {
            len,
            block_size: limits.block_size,
        });
    }
    if len > limits.max_transfer_bytes {
        return Err(RequestError::TooLarge {
            len,
            max: limits.max_transfer_bytes,
        });
    }
    check_range(sector, len / SECTOR_SIZE, limits)
}

fn parse_segments(
    request: &'static str,
    readable: &[Piece],
    payload_len: u64,
    mem: &GuestMemoryMmap,
    limits: &Limits,
    discard: bool,
) -> Result<Vec<Segment>, RequestError> {
    let (max_segments, max_sectors) = if discard {
        (limits.max_discard_segments, limits.max_discard_sectors)
    } else {
        (
            limits.max_write_zeroes_segments,
            limits.max_write_zeroes_sectors,
        )
    };
    if payload_len == 0 || !payload_len.is_multiple_of(SEGMENT_LEN) {
        return Err(RequestError::BadSegmentPayload {
            request,
            len: payload_len,
        });
    }
    let count = payload_len / SEGMENT_LEN;
    if count > u64::from(max_segments) {
        return Err(RequestError::TooManySegments {
            request,
            count,
            max: max_segments,
        });
    }
    // Copy the whole segment table out once, then validate the copy.
    let mut raw = vec![0u8; payload_len as usize];
    copy_out(readable, HEADER_LEN, &mut raw, mem)?;
    let allowed_flags = if discard {
        0
    } else {
        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
    };
    raw.chunks_exact(SEGMENT_LEN as usize)
        .map(|s| {
            let sector = u64::from_le_bytes(s[0..8].try_into().unwrap());
            let sectors = u32::from_le_bytes(s[8..12].try_into().unwrap());
            let flags = u32::from_le_bytes(s[12..16].try_into().unwrap());
            if flags & !allowed_flags != 0 {
                return Err(RequestError::BadSegmentFlags { request, flags });
            }
            if sectors == 0 {
                return Err(RequestError::EmptySegment { request });
            }
            if sectors > max_sectors {
                return Err(RequestError::SegmentTooLarge {
                    request,
                    sectors,
                    max: max_sectors,
                });
            }
            if !(u64::from(sectors) * SECTOR_SIZE).is_multiple_of(u64::from(limits.block_size)) {
                return Err(RequestError::UnalignedLength {
                    len: u64::from(sectors) * SECTOR_SIZE,
                    block_size: limits.block_size,
                });
            }
            check_range(sector, u64::from(sectors), limits)?;
            Ok(Segment {
                sector,
                sectors,
                unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
            })
        })
        .collect()
}

#[cfg(test)]
#[path = "parse_tests.rs"]
mod tests;
