//! The per-queue bounce pool: a fixed, preallocated, page-aligned area cut into 64 KiB chunks.
//!
//! Every bounce buffer a queue uses (writes copied before they go to disk, misaligned I/O,
//! rewrites after a guest changed its buffer in flight) comes from here: no allocation per
//! request, and a bounded amount of memory per queue. A buffer is a list of chunks, one iovec
//! each; protection intervals (512 or 4096 bytes) never straddle a chunk. The device's limits
//! (segment size × segment count) keep every request within the pool, so a request that finds
//! the pool dry waits for buffers to come back (back-pressure) and never fails for want of one.

use crate::storage::AlignedBuf;

/// Bytes per chunk; also the largest segment the device lets a guest send (virtio size_max),
/// and the pool has a chunk per virtqueue slot: any request the device accepts fits the pool.
pub const CHUNK: usize = 64 << 10;

/// A bounce buffer: `len` bytes spread over pool chunks, in order.
#[derive(Debug)]
pub struct Bounce {
    chunks: Vec<u32>,
    len: usize,
}

pub struct BouncePool {
    area: AlignedBuf,
    free: Vec<u32>,
    total: u32,
}

impl BouncePool {
    /// A pool of `chunks` chunks. The memory is reserved now and faulted in on first use.
    pub fn new(chunks: u32) -> BouncePool {
        BouncePool {
            area: AlignedBuf::zeroed(chunks as usize * CHUNK),
            // Hand out low chunks first, so a lightly loaded queue touches little memory.
            free: (0..chunks).rev().collect(),
            total: chunks,
        }
    }

    /// Largest buffer the pool can ever hand out.
    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.total as usize * CHUNK
    }

    #[cfg(test)]
    pub fn free_bytes(&self) -> usize {
        self.free.len() * CHUNK
    }

    /// A buffer of `len` bytes if enough chunks are free now.
    pub fn try_take(&mut self, len: usize) -> Option<Bounce> {
        let needed = len.div_ceil(CHUNK).max(1);
        if needed > self.free.len() {
            return None;
        }
        let chunks = self.free.split_off(self.free.len() - needed);
        Some(Bounce { chunks, len })
    }

    pub fn give_back(&mut self, bounce: Bounce) {
        self.free.extend(bounce.chunks);
    }

    fn chunk_ptr(&self, chunk: u32) -> *mut u8 {
        debug_assert!(chunk < self.total);
        // SAFETY: chunk < total, so the offset stays inside the area.
        unsafe { self.area.raw_ptr().add(chunk as usize * CHUNK) }
    }

    /// One iovec per chunk, covering exactly the buffer's length.
    pub fn iovecs(&self, bounce: &Bounce) -> Vec<libc::iovec> {
        let mut left = bounce.len;
        bounce
            .chunks
            .iter()
            .map(|&c| {
                let n = left.min(CHUNK);
                left -= n;
                libc::iovec {
                    iov_base: self.chunk_ptr(c).cast(),
                    iov_len: n,
                }
            })
            .collect()
    }

    /// The buffer's chunks as disjoint mutable slices, in order, together exactly its length.
    pub fn slices_mut(&mut self, bounce: &Bounce) -> Vec<&mut [u8]> {
        self.iovecs(bounce)
            .into_iter()
            .map(|iov| {
                // SAFETY: each iovec covers a distinct chunk of the area that this buffer owns
                // exclusively until it is given back; &mut self keeps the pool from handing
                // out anything else meanwhile, so the slices do not alias.
                unsafe { std::slice::from_raw_parts_mut(iov.iov_base as *mut u8, iov.iov_len) }
            })
            .collect()
    }

    /// An iovec for `len` bytes at `offset` within the buffer (inside one chunk).
    pub fn iovec_at(&self, bounce: &Bounce, offset: usize, len: usize) -> libc::iovec {
        let (chunk, within) = (offset / CHUNK, offset % CHUNK);
        assert!(
            within + len <= CHUNK && offset + len <= bounce.len,
            "bounce iovec out of range"
        );
        // SAFETY: within + len stays inside this chunk of the area.
        let ptr = unsafe { self.chunk_ptr(bounce.chunks[chunk]).add(within) };
        libc::iovec {
            iov_base: ptr.cast(),
            iov_len: len,
        }
    }

    /// The buffer's bytes, chunk by chunk, in order.
    pub fn pieces(&self, bounce: &Bounce) -> Vec<&[u8]> {
        self.iovecs(bounce)
            .into_iter()
            .map(|iov| {
                // SAFETY: each iovec covers bytes inside this buffer's chunks of the area.
                unsafe { std::slice::from_raw_parts(iov.iov_base as *const u8, iov.iov_len) }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_from_fixed_chunks_and_go_back() {
        let mut pool = BouncePool::new(4);
        assert_eq!(pool.capacity(), 4 * CHUNK);
        let a = pool.try_take(CHUNK + 1).unwrap();
        let b = pool.try_take(4096).unwrap();
        assert_eq!(pool.free_bytes(), CHUNK);
        assert!(
            pool.try_take(2 * CHUNK).is_none(),
            "dry pool must refuse, not grow"
        );
        let iov = pool.iovecs(&a);
        assert_eq!(iov.len(), 2);
        assert_eq!((iov[0].iov_len, iov[1].iov_len), (CHUNK, 1));
        assert_eq!(iov[0].iov_base as usize % 4096, 0);
        pool.slices_mut(&a)[0][CHUNK - 4096..].fill(7);
        assert!(pool.pieces(&a)[0][CHUNK - 4096..].iter().all(|&x| x == 7));
        pool.give_back(a);
        pool.give_back(b);
        assert_eq!(pool.free_bytes(), 4 * CHUNK);
        assert!(pool.try_take(4 * CHUNK).is_some());
    }
}
