//! Where the PI metadata's bytes live, and how a range of them is made durable. The metadata
//! (`super::metadata`) keeps its header, bitmap and tuples as 64-bit words at [`Medium::base`]
//! and asks for ranges to be made durable; nothing above it knows which medium it has.
//!
//! - **File** (or block device): mapped shared. The kernel writes dirty pages back when it
//!   likes; `msync` makes a range durable. A page the file can no longer back is caught
//!   (`storage::sigbus`) and reported by [`Medium::faults`].
//! - **RBD image** (`IMAGE.pi` beside an `rbd:` image): read into memory when opened, and
//!   written through at each sync. Nothing is written between syncs. The crash argument of
//!   docs/CRASH-CONSISTENCY.md holds unchanged: it already allows any dirty page to reach the
//!   disk at any time or not before its sync, and this medium is the second case.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::storage::files::{self, SharedMapping};
use crate::storage::rbd::RbdImage;

const PAGE: usize = 4096;

pub enum Medium {
    File(FileMedium),
    Rbd(RbdMedium),
}

impl Medium {
    /// The first byte of the metadata (8-byte aligned; page aligned for files).
    pub fn base(&self) -> *mut u8 {
        match self {
            Medium::File(f) => f.map.as_ptr(),
            // Interior mutability: the words are atomics, written through shared references.
            Medium::Rbd(r) => r.words.as_ptr() as *mut u8,
        }
    }

    /// Pages the medium lost under the daemon (see `PiMetadata::intact`).
    pub fn faults(&self) -> usize {
        match self {
            Medium::File(f) => f.map.faults(),
            Medium::Rbd(_) => 0,
        }
    }

    /// Tuples in `range` were stored: an RBD medium writes them at the next sync.
    pub fn stored(&self, range: Range<usize>) {
        if let Medium::Rbd(r) = self {
            r.mark_dirty(range);
        }
    }

    /// Make `range` durable.
    pub fn persist(&self, range: Range<usize>) -> io::Result<()> {
        match self {
            Medium::File(f) => f.persist(range),
            Medium::Rbd(r) => r.write_out(range),
        }
    }

    /// Make everything stored so far durable; `always` (the intent bitmap, whose bits are
    /// changed without [`Medium::stored`]) is written whole by an RBD medium.
    pub fn persist_all(&self, always: Range<usize>) -> io::Result<()> {
        match self {
            Medium::File(f) => f.persist(0..f.map.len()),
            Medium::Rbd(r) => r.write_out_dirty(always),
        }
    }

    /// Write the header page (at offset 0) and make it durable. It goes to the medium
    /// directly: the metadata keeps its decoded header and never reads the page again.
    pub fn write_header(&self, page: &[u8]) -> io::Result<()> {
        match self {
            Medium::File(f) => {
                std::os::unix::fs::FileExt::write_all_at(&f.file, page, 0)?;
                f.file.sync_data()
            }
            Medium::Rbd(r) => {
                r.image.write_at(page, 0)?;
                r.image.flush()
            }
        }
    }

    /// Release the file's lock now (not at drop, which can be delayed by async teardown).
    pub fn release_lock(&self) {
        if let Medium::File(f) = self {
            files::unlock(&f.file);
        }
    }
}

/// A metadata file mapped shared, holding the lock that says "in use".
pub struct FileMedium {
    pub path: PathBuf,
    pub file: File,
    pub map: SharedMapping,
    /// Syncs that failed so far, and how many of them a rewrite has made good (see
    /// [`FileMedium::rewrite_after_failed_sync`]). A sync is only as good as the last failure
    /// it covers.
    failed_syncs: AtomicU64,
    failed_syncs_rewritten: AtomicU64,
}

impl FileMedium {
    pub fn new(path: PathBuf, file: File, map: SharedMapping) -> FileMedium {
        FileMedium {
            path,
            file,
            map,
            failed_syncs: AtomicU64::new(0),
            failed_syncs_rewritten: AtomicU64::new(0),
        }
    }

    fn persist(&self, range: Range<usize>) -> io::Result<()> {
        let result = self
            .rewrite_after_failed_sync()
            .and_then(|()| self.msync(range));
        if result.is_err() {
            self.failed_syncs.fetch_add(1, Ordering::SeqCst);
        }
        result
    }

    fn msync(&self, range: Range<usize>) -> io::Result<()> {
        let start = range.start & !(PAGE - 1);
        let end = range.end.min(self.map.len());
        if end <= start {
            return Ok(());
        }
        // SAFETY: [start, end) lies within the mapping (page-aligned start, end clamped).
        let rc = unsafe {
            libc::msync(
                self.map.as_ptr().add(start).cast(),
                end - start,
                libc::MS_SYNC,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// After a failed sync, write the whole mapping out again before trusting any later
    /// sync. A page whose write-back failed is marked clean by the kernel with its new
    /// content only in memory: a later msync finds nothing dirty and succeeds, and a flush
    /// would report OK over a tuple the disk never got (fsyncgate).
    fn rewrite_after_failed_sync(&self) -> io::Result<()> {
        let failed = self.failed_syncs.load(Ordering::SeqCst);
        if failed == self.failed_syncs_rewritten.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.redirty_every_page();
        self.msync(0..self.map.len())?;
        // A sync that fails while this runs is counted after `failed` was read, and so
        // still asks the next sync to write everything out again.
        self.failed_syncs_rewritten
            .fetch_max(failed, Ordering::SeqCst);
        tracing::info!(
            metadata = %self.path.display(),
            "the PI metadata was written out again after a failed sync"
        );
        Ok(())
    }

    /// Mark every page of the mapping dirty without changing a byte: a write access to a
    /// clean page makes the kernel dirty it again. The write is a compare-exchange of a word
    /// with itself: an idempotent read-modify-write may be compiled to a plain load, and a
    /// copy written back (through the file or the mapping) could undo a concurrent store.
    fn redirty_every_page(&self) {
        let words = self.map.as_ptr().cast::<AtomicU64>();
        for page in 0..self.map.len() / PAGE {
            // SAFETY: the mapping is page-aligned and a whole number of pages long
            // (Header::file_len), so the page's first word is aligned and inside it; other
            // threads store into it through atomics only.
            let word = unsafe { &*words.add(page * PAGE / 8) };
            let value = word.load(Ordering::Relaxed);
            // A failed exchange means another thread just stored there: dirty as well.
            let _ = word.compare_exchange(value, value, Ordering::Relaxed, Ordering::Relaxed);
        }
    }
}

/// PI metadata in an RBD image, held in memory and written through at each sync.
pub struct RbdMedium {
    image: RbdImage,
    /// The whole metadata as read from the image and changed since.
    words: Box<[AtomicU64]>,
    /// One bit per page stored into since it was last written out.
    dirty: Box<[AtomicU64]>,
}

impl RbdMedium {
    /// Read the first `len` bytes of `image` (a multiple of 4096: the header's file_len).
    pub fn load(image: RbdImage, len: usize) -> io::Result<RbdMedium> {
        let mut bytes = vec![0u8; len];
        // Large reads in pieces: librbd splits them per object anyway.
        for (i, chunk) in bytes.chunks_mut(4 << 20).enumerate() {
            image.read_at(chunk, (i * (4 << 20)) as u64)?;
        }
        let words = bytes
            .chunks_exact(8)
            .map(|w| AtomicU64::new(u64::from_ne_bytes(w.try_into().expect("8 bytes"))))
            .collect();
        let pages = len.div_ceil(PAGE);
        Ok(RbdMedium {
            image,
            words,
            dirty: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    fn mark_dirty(&self, range: Range<usize>) {
        if range.is_empty() {
            return;
        }
        for page in range.start / PAGE..=(range.end - 1) / PAGE {
            // Release: whoever takes the bit (Acquire, in write_out_dirty) sees the stores
            // made before it was set.
            self.dirty[page / 64].fetch_or(1 << (page % 64), Ordering::Release);
        }
    }

    /// The bytes of `range` as they are now, word by word (each word read atomically).
    fn snapshot(&self, range: Range<usize>) -> Vec<u8> {
        let (first, last) = (range.start / 8, range.end.div_ceil(8));
        let mut bytes: Vec<u8> = self.words[first..last]
            .iter()
            .flat_map(|w| w.load(Ordering::Acquire).to_ne_bytes())
            .collect();
        let skip = range.start - first * 8;
        bytes.drain(..skip);
        bytes.truncate(range.len());
        bytes
    }

    /// Write `range` as it is now. Its pages stay marked if they were: a store made after
    /// the copy still reaches the image at the next full sync.
    fn write_out(&self, range: Range<usize>) -> io::Result<()> {
        let range = range.start..range.end.min(self.words.len() * 8);
        if range.is_empty() {
            return Ok(());
        }
        self.image
            .write_at(&self.snapshot(range.clone()), range.start as u64)
    }

    /// Write `always` and every page marked dirty, then flush. A page's bit is cleared
    /// before its copy is taken, so a store racing with the copy marks it again; a page
    /// whose write fails is marked again, so the next sync retries it.
    fn write_out_dirty(&self, always: Range<usize>) -> io::Result<()> {
        self.write_out(always)?;
        let mut taken: Vec<usize> = Vec::new();
        for (i, word) in self.dirty.iter().enumerate() {
            let mut bits = word.swap(0, Ordering::Acquire);
            while bits != 0 {
                taken.push(i * 64 + bits.trailing_zeros() as usize);
                bits &= bits - 1;
            }
        }
        let mut result = Ok(());
        let mut at = 0;
        while at < taken.len() {
            // One write per run of consecutive pages.
            let mut end = at + 1;
            while end < taken.len() && taken[end] == taken[end - 1] + 1 {
                end += 1;
            }
            let pages = taken[at] * PAGE..(taken[end - 1] + 1) * PAGE;
            if let Err(e) = self.write_out(pages.clone()) {
                self.mark_dirty(pages);
                result = result.and(Err(e));
            }
            at = end;
        }
        result?;
        self.image.flush()
    }
}
