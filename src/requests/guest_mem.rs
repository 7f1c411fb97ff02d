//! A request's guest memory: the host pieces its guest ranges map to (as iovecs for the
//! kernel, as pointers for the CRC kernels), copies between those ranges and buffers, and
//! byte offsets back to guest addresses. The one place that walks guest ranges; the ranges
//! themselves were validated against the same memory snapshot by the parser.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

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
        mem.get_slices(range.addr, range.len as usize).map(|slice| {
            // The parser checked every range against this same memory snapshot.
            let slice = slice.expect("range validated against this memory snapshot");
            (slice.ptr_guard_mut().as_ptr(), slice.len())
        })
    })
}

/// Host pieces of the guest ranges, for the CRC kernels.
pub(crate) fn host_pieces(mem: &GuestMemoryMmap, ranges: &[GuestRange]) -> Vec<(*mut u8, usize)> {
    pieces(mem, ranges).collect()
}

/// Host iovecs for the guest ranges, for the kernel.
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
