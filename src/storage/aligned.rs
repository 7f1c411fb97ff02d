//! Heap buffers aligned for O_DIRECT.
//!
//! Owns nothing but its allocation. Used where guest memory cannot be handed to the kernel
//! as is (misaligned guest buffers, the zero source for write-zeroes fallbacks).

use std::alloc::{self, Layout};
use std::ptr::NonNull;

/// Alignment every bounce buffer gets: a page, which satisfies any O_DIRECT target.
pub const BUFFER_ALIGN: usize = 4096;

/// A zero-initialised heap buffer whose start and length are multiples of [`BUFFER_ALIGN`].
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: AlignedBuf exclusively owns its allocation, like Vec<u8>.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// Allocate at least `len` bytes (rounded up to the alignment). Aborts on OOM like Vec.
    pub fn zeroed(len: usize) -> Self {
        let rounded = len.max(1).div_ceil(BUFFER_ALIGN) * BUFFER_ALIGN;
        let layout = Layout::from_size_align(rounded, BUFFER_ALIGN).expect("bounce buffer layout");
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, layout }
    }

    pub fn len(&self) -> usize {
        self.layout.size()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The raw start of the allocation, for owners that hand out disjoint parts of it (the
    /// bounce pool) and keep track of who may write where themselves.
    pub fn raw_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for layout.size() initialised bytes (allocated zeroed).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was allocated with exactly this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_rounded_and_zeroed() {
        let mut b = AlignedBuf::zeroed(5000);
        assert_eq!(b.as_mut_ptr() as usize % BUFFER_ALIGN, 0);
        assert_eq!(b.len(), 8192);
        assert!(b.as_slice().iter().all(|&x| x == 0));
    }
}
