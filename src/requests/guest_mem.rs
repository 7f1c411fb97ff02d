//! A request's guest memory: the host pieces its guest ranges map to (as iovecs for the
//! kernel, as pointers for the CRC kernels), copies between those ranges and buffers, a view
//! of them one protection interval at a time ([`Intervals`], for the PI work), and byte
//! offsets back to guest addresses. The one place that walks guest ranges and the one that
//! turns them into host slices; the ranges themselves were validated against the same memory
//! snapshot by the parser.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::parse::GuestRange;

/// Fill `out` (a buffer's pieces, in order) from the guest ranges, in order.
pub(crate) fn copy_from_guest(
    mem: &GuestMemoryMmap,
    ranges: &[GuestRange],
    out: &mut [&mut [u8]],
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut pieces = out.iter_mut();
    let mut piece: &mut [u8] = pieces.next().map_or(&mut [], |p| &mut **p);
    for r in ranges {
        let (mut addr, mut left) = (r.addr, r.len as usize);
        while left > 0 {
            while piece.is_empty() {
                match pieces.next() {
                    Some(p) => piece = &mut **p,
                    None => return Ok(()),
                }
            }
            let n = left.min(piece.len());
            let (head, tail) = std::mem::take(&mut piece).split_at_mut(n);
            mem.read_slice(head, addr)?;
            piece = tail;
            addr = GuestAddress(addr.0 + n as u64);
            left -= n;
        }
    }
    Ok(())
}

/// The host pieces (pointer, length) the guest ranges map to, in order.
fn pieces<'a>(
    mem: &'a GuestMemoryMmap,
    ranges: &'a [GuestRange],
) -> impl Iterator<Item = (*mut u8, usize)> + 'a {
    ranges.iter().flat_map(move |range| {
        let len = range.len as usize;
        let whole = in_one_region(mem, range);
        // The general case: a range across regions, one piece per region.
        let split = (whole.is_none() && len > 0).then(|| {
            mem.get_slices(range.addr, len).map(|slice| {
                // The parser checked every range against this same memory snapshot.
                let slice = slice.expect("range validated against this memory snapshot");
                (slice.ptr_guard_mut().as_ptr(), slice.len())
            })
        });
        whole
            .map(|ptr| (ptr, len))
            .into_iter()
            .chain(split.into_iter().flatten())
    })
}

/// The host address of a non-empty range that lies inside one memory region, as nearly every
/// range does: one region lookup and one bounds check. (vm-memory's slice iterator, which
/// handles ranges across regions, cost 3-5 % of a queue thread's CPU in profiles of 4 KiB and
/// 128 KiB loads.)
#[inline]
fn in_one_region(mem: &GuestMemoryMmap, range: &GuestRange) -> Option<*mut u8> {
    if range.len == 0 {
        return None;
    }
    let (region, at) = mem.to_region_addr(range.addr)?;
    if at.0.checked_add(u64::from(range.len))? > region.len() {
        return None;
    }
    region.get_host_address(at).ok()
}

/// Host pieces of the guest ranges, for the CRC kernels.
#[inline]
fn host_pieces(mem: &GuestMemoryMmap, ranges: &[GuestRange]) -> Vec<(*mut u8, usize)> {
    pieces(mem, ranges).collect()
}

/// Host iovecs for the guest ranges, for the kernel.
#[inline]
pub(crate) fn host_iovecs(mem: &GuestMemoryMmap, ranges: &[GuestRange]) -> Vec<libc::iovec> {
    pieces(mem, ranges)
        .map(|(ptr, len)| libc::iovec {
            iov_base: ptr.cast(),
            iov_len: len,
        })
        .collect()
}

/// Copy `pieces` (a buffer's bytes, in order) into the guest ranges, in order, stopping
/// when either runs out.
pub(crate) fn copy_to_guest(
    mem: &GuestMemoryMmap,
    ranges: &[GuestRange],
    pieces: &[&[u8]],
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut pieces = pieces.iter();
    let mut piece: &[u8] = pieces.next().copied().unwrap_or(&[]);
    for r in ranges {
        let (mut addr, mut left) = (r.addr, r.len as usize);
        while left > 0 {
            while piece.is_empty() {
                match pieces.next() {
                    Some(p) => piece = p,
                    None => return Ok(()),
                }
            }
            let n = left.min(piece.len());
            mem.write_slice(&piece[..n], addr)?;
            piece = &piece[n..];
            addr = GuestAddress(addr.0 + n as u64);
            left -= n;
        }
    }
    Ok(())
}

/// Guest-physical address of byte `offset` of the request's data.
pub(crate) fn guest_address(ranges: &[GuestRange], mut offset: u64) -> Option<u64> {
    for r in ranges {
        if offset < u64::from(r.len) {
            return Some(r.addr.0 + offset);
        }
        offset -= u64::from(r.len);
    }
    None
}

/// Walks a request's guest memory one protection interval at a time. An interval that is
/// contiguous in host memory is handed out in place; one that straddles descriptors or
/// memory regions is assembled in a scratch copy first (allocated on first need: most
/// requests never straddle).
///
/// Used in the CRC loops of every PI request: its methods are `#[inline]` so they inline into
/// them from this module's codegen unit.
pub(crate) struct Intervals {
    pieces: Vec<(*mut u8, usize)>,
    piece: usize,
    within: usize,
    interval: usize,
    scratch: Vec<u8>,
}

impl Intervals {
    #[inline]
    pub(crate) fn new(mem: &GuestMemoryMmap, ranges: &[GuestRange], interval: usize) -> Intervals {
        Intervals {
            pieces: host_pieces(mem, ranges),
            piece: 0,
            within: 0,
            interval,
            scratch: Vec::new(),
        }
    }

    #[inline]
    pub(crate) fn count(&self) -> usize {
        self.pieces.iter().map(|p| p.1).sum::<usize>() / self.interval
    }

    /// The next two intervals, if both lie in place (each contiguous in host memory, not
    /// necessarily adjacent); else `None`, and nothing is consumed. Lets a copying caller
    /// hand both to one interleaved kernel.
    #[inline]
    pub(crate) fn next_two_in_place(&mut self) -> Option<[&[u8]; 2]> {
        let interval = self.interval;
        let (ptr0, len0) = *self.pieces.get(self.piece)?;
        if len0 - self.within < interval {
            return None;
        }
        let first = (ptr0, self.within);
        // Where the second starts: further in this piece, or at the start of the next.
        let (mut piece, mut within) = (self.piece, self.within + interval);
        if within == len0 {
            (piece, within) = (piece + 1, 0);
        }
        let (ptr1, len1) = *self.pieces.get(piece)?;
        if len1 - within < interval {
            return None;
        }
        let second = (ptr1, within);
        within += interval;
        if within == len1 {
            (piece, within) = (piece + 1, 0);
        }
        (self.piece, self.within) = (piece, within);
        // SAFETY: each range lies inside its piece, a host mapping of guest memory that the
        // request's memory snapshot keeps mapped (see `next` for what the bytes may do).
        Some([first, second].map(|(ptr, at)| unsafe {
            std::slice::from_raw_parts(ptr.add(at).cast_const(), interval)
        }))
    }

    /// The next interval: in place if contiguous, else assembled in the scratch buffer (the
    /// variant tells a copying caller whether it can copy straight from the source).
    #[inline]
    pub(crate) fn next(&mut self) -> Option<Interval<'_>> {
        let (ptr, len) = *self.pieces.get(self.piece)?;
        let interval = self.interval;
        let in_place = len - self.within >= interval;
        if in_place {
            // SAFETY: ptr+within..+interval lies inside a host mapping of guest memory that the
            // request's memory snapshot keeps mapped. The guest (another process) may change
            // these bytes meanwhile: callers compute guards over a copy they own (writes), or
            // treat a mismatch as "re-read under the lock" (reads), or compare digests computed
            // before and after (mutation detection) — never trust them as stable.
            let data = unsafe { std::slice::from_raw_parts(ptr.add(self.within), interval) };
            self.within += interval;
            if self.within == len {
                self.piece += 1;
                self.within = 0;
            }
            return Some(Interval::InPlace(data));
        }
        if self.scratch.len() < interval {
            self.scratch = vec![0u8; interval];
        }
        let mut filled = 0;
        while filled < interval {
            let Some(&(ptr, len)) = self.pieces.get(self.piece) else {
                return None; // a trailing partial interval: not whole, not handed out
            };
            let n = (len - self.within).min(interval - filled);
            // SAFETY: as above; n bytes from ptr+within stay inside this piece.
            let src = unsafe { std::slice::from_raw_parts(ptr.add(self.within), n) };
            self.scratch[filled..filled + n].copy_from_slice(src);
            filled += n;
            self.within += n;
            if self.within == len {
                self.piece += 1;
                self.within = 0;
            }
        }
        Some(Interval::Assembled(&self.scratch[..interval]))
    }
}

pub(crate) enum Interval<'a> {
    /// Straight in guest memory.
    InPlace(&'a [u8]),
    /// Copied from several pieces into the scratch buffer.
    Assembled(&'a [u8]),
}

impl Interval<'_> {
    #[inline]
    pub(crate) fn bytes(&self) -> &[u8] {
        match self {
            Interval::InPlace(b) | Interval::Assembled(b) => b,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pieces from the one-region shortcut are exactly vm-memory's slices, for ranges
    /// inside a region, up to its edges, across the boundary of two adjacent regions, and
    /// empty.
    #[test]
    fn host_pieces_match_vm_memory_slices() {
        const REGION: u64 = 0x4000;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), REGION as usize),
            (GuestAddress(REGION), REGION as usize),
        ])
        .unwrap();
        let cases = [
            (0, 4096),
            (100, 1),
            (REGION - 4096, 4096),
            (REGION - 1, 1),
            (REGION - 512, 1024),
            (REGION, 4096),
            (1, 2 * REGION - 1),
            (REGION * 2 - 4096, 4096),
            (200, 0),
        ];
        for (addr, len) in cases {
            let range = GuestRange {
                addr: GuestAddress(addr),
                len: len as u32,
            };
            let expected: Vec<(*mut u8, usize)> = mem
                .get_slices(range.addr, len as usize)
                .map(|s| {
                    let s = s.unwrap();
                    (s.ptr_guard_mut().as_ptr(), s.len())
                })
                .collect();
            let got = host_pieces(&mem, std::slice::from_ref(&range));
            assert_eq!(got, expected, "range {addr:#x}+{len:#x}");
            let crosses = addr < REGION && addr + len > REGION;
            assert_eq!(got.len(), usize::from(len > 0) + usize::from(crosses));
        }
    }
}
