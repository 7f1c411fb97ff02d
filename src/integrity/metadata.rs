//! The PI metadata file: a versioned header, the write-intent bitmap and one tuple per
//! protection interval of the data image, kept beside the raw image (`IMAGE.pi` by default).
//! The header page and the errors of opening a file are in `header`, re-exported here.
//!
//! Layout and meaning are documented in docs/FORMAT.md; keep the two in step. The file is
//! mapped shared: tuples are loaded and stored as aligned 64-bit atomics straight in the
//! mapping (no system call per request), the kernel writes dirty pages back, and
//! [`PiMetadata::sync`] makes them durable.
//!
//! An all-zero tuple means "unwritten": the interval reads as zeros and verifies as such.
//! A fresh file is all zeros, so creating metadata for a 1 TiB image writes only the header.
//! Generated tuples always carry [`APP_TAG`], so they are never all zeros.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::intent::IntentLog;
use super::pi::{PiFormat, Tuple};
use crate::storage::files::{self, SharedMapping};

pub use super::header::{
    default_path, DataIdentity, Header, MetadataError, VolumeState, APP_TAG, HEADER_SIZE,
};

/// An open metadata file: header, intent bitmap and tuples.
pub struct PiMetadata {
    path: PathBuf,
    file: File,
    header: Header,
    map: SharedMapping,
    writable: bool,
    intent: IntentLog,
    /// The loss of mapped pages has been logged (once is enough: every request says it).
    loss_logged: AtomicBool,
    /// Syncs that failed so far, and how many of them a rewrite through the file has made
    /// good (see [`PiMetadata::rewrite_through_file`]). A sync is only as good as the last
    /// failure it covers.
    failed_syncs: AtomicU64,
    failed_syncs_rewritten: AtomicU64,
}

impl std::fmt::Debug for PiMetadata {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PiMetadata")
            .field("path", &self.path)
            .field("header", &self.header)
            .finish()
    }
}

impl PiMetadata {
    /// Write a fresh metadata file (or block device) for `data`: header, clear bitmap, all
    /// tuples unwritten. Allocated (fallocate: no data written), so quick for any disk size.
    pub fn create(path: &Path, header: &Header) -> Result<(), MetadataError> {
        let size = header.data.size;
        if !size.is_multiple_of(u64::from(header.interval)) {
            return Err(MetadataError::NotIntervalMultiple {
                size,
                interval: header.interval,
            });
        }
        let is_device = std::fs::metadata(path)
            .map(|m| m.file_type().is_block_device())
            .unwrap_or(false);
        let create_err = |source| MetadataError::Create {
            path: path.into(),
            source,
        };
        let file = if is_device {
            OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(create_err)?
        } else {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|source| match source.kind() {
                    io::ErrorKind::AlreadyExists => {
                        MetadataError::AlreadyExists { path: path.into() }
                    }
                    _ => create_err(source),
                })?
        };
        let result = (|| {
            let need = header.file_len();
            if is_device {
                let have = files::size(&file)?;
                if have < need {
                    return Err(io::Error::other(format!(
                        "the device holds {have} bytes but the metadata needs {need}"
                    )));
                }
                files::zero_range(&file, HEADER_SIZE, need - HEADER_SIZE)?;
            } else {
                file.set_len(need)?;
                allocate(&file, path, need)?;
            }
            std::os::unix::fs::FileExt::write_all_at(&file, &header.encode(), 0)?;
            file.sync_all()
        })();
        if let Err(source) = result {
            if !is_device {
                let _ = std::fs::remove_file(path);
            }
            return Err(match source.raw_os_error() {
                Some(libc::ENOSPC) | Some(libc::EDQUOT) => MetadataError::NoSpace {
                    path: path.into(),
                    needed: header.file_len(),
                },
                _ => create_err(source),
            });
        }
        Ok(())
    }

    /// Open `path` as the metadata of the data target `data`, checking that they belong
    /// together. A writable open marks the header in use until [`PiMetadata::close_clean`].
    pub fn open(
        path: &Path,
        data: &DataIdentity,
        writable: bool,
    ) -> Result<PiMetadata, MetadataError> {
        let file = open_metadata_file(path, writable)?;
        if !files::try_lock_exclusive(&file) {
            return Err(MetadataError::Locked { path: path.into() });
        }
        let io_err = |source| MetadataError::Io {
            path: path.into(),
            source,
        };
        let header = read_valid_header(&file, path)?;
        if header.capacity_bytes() != data.size {
            return Err(MetadataError::SizeMismatch {
                meta: path.into(),
                data: data.path.clone(),
                expected: header.capacity_bytes(),
                actual: data.size,
            });
        }

        // A file copied sparse, or made by an older guardblk: allocate it now (see `allocate`).
        if writable
            && !file
                .metadata()
                .map_err(io_err)?
                .file_type()
                .is_block_device()
        {
            allocate(&file, path, header.file_len()).map_err(|source| {
                match source.raw_os_error() {
                    Some(libc::ENOSPC) | Some(libc::EDQUOT) => MetadataError::NoSpace {
                        path: path.into(),
                        needed: header.file_len(),
                    },
                    _ => io_err(source),
                }
            })?;
        }

        // The whole file, shared (writable or not).
        let map = SharedMapping::new(&file, 0, header.file_len() as usize, writable).map_err(
            |source| MetadataError::Map {
                path: path.into(),
                source,
            },
        )?;
        let intent = IntentLog::new(
            header.regions(),
            header.region_shift,
            header.interval.trailing_zeros(),
        );
        let mut meta = PiMetadata {
            path: path.into(),
            file,
            header,
            map,
            writable,
            intent,
            loss_logged: AtomicBool::new(false),
            failed_syncs: AtomicU64::new(0),
            failed_syncs_rewritten: AtomicU64::new(0),
        };
        meta.intent.load(meta.bitmap_words());
        if writable {
            meta.header.state = VolumeState::InUse;
            meta.header.data = DataIdentity {
                path: data.path.clone(),
                ..meta.header.data.clone()
            };
            meta.write_header().map_err(io_err)?;
        }
        Ok(meta)
    }

    /// Read and check the header of the metadata at `path` without taking its lock and
    /// without mapping it, for tools that only look (`guardblk info`, also while a daemon
    /// serves the image). Applies the same magic, version, checksum, geometry and truncation
    /// checks as [`PiMetadata::open`], but does not check the pairing with a data target.
    pub fn read_header(path: &Path) -> Result<Header, MetadataError> {
        read_valid_header(&open_metadata_file(path, false)?, path)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn format(&self) -> PiFormat {
        self.header.format
    }

    pub fn interval(&self) -> u32 {
        self.header.interval
    }

    pub fn blocks(&self) -> u64 {
        self.header.blocks
    }

    pub fn intent(&self) -> &IntentLog {
        &self.intent
    }

    /// Whether the data target's identity differs from the one recorded (moved or copied
    /// image, or another image of the same size).
    pub fn identity_differs(&self, data: &DataIdentity) -> bool {
        self.header.data.device != data.device || self.header.data.inode != data.inode
    }

    /// Record `data` as the target this metadata belongs to (after a pairing check).
    pub fn rebind(&mut self, data: &DataIdentity) -> io::Result<()> {
        self.header.data = data.clone();
        self.write_header()
    }

    fn write_header(&self) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(&self.file, &self.header.encode(), 0)?;
        self.file.sync_data()
    }

    fn bitmap_words(&self) -> &[AtomicU64] {
        let offset = self.header.bitmap_offset() as usize;
        let words = self.header.bitmap_len() as usize / 8;
        // SAFETY: the bitmap lies inside the mapping (file_len covers it), is 8-byte aligned
        // (page-aligned offset) and lives as long as `self`; AtomicU64 has u64's layout.
        unsafe {
            std::slice::from_raw_parts(self.map.as_ptr().add(offset).cast::<AtomicU64>(), words)
        }
    }

    /// The 64-bit words holding `lba`'s tuple (one for 8-byte tuples, two for 16-byte).
    fn tuple_words(&self, lba: u64) -> &[AtomicU64] {
        assert!(lba < self.header.blocks, "LBA {lba} past the end");
        let size = self.header.format.tuple_size();
        let offset = self.header.tuples_offset() as usize + lba as usize * size;
        // SAFETY: lba < blocks, so the tuple lies inside the tuple area of the mapping; the
        // area is page-aligned and tuples are 8 or 16 bytes, so the words are 8-aligned.
        unsafe {
            std::slice::from_raw_parts(self.map.as_ptr().add(offset).cast::<AtomicU64>(), size / 8)
        }
    }

    /// Start loading the tuples of [lba, lba + count) into the cache, so that the verification
    /// or store at completion does not wait for them: with random I/O the tuple area is much
    /// larger than the caches and the TLB, and the miss overlaps the data transfer instead.
    pub fn prefetch_tuples(&self, lba: u64, count: u64) {
        if lba >= self.header.blocks || count == 0 {
            return;
        }
        let size = self.header.format.tuple_size() as u64;
        let last = (lba + count).min(self.header.blocks) - 1;
        let start = self.header.tuples_offset() + lba * size;
        let end = self.header.tuples_offset() + last * size + size;
        // A hint per cache line, at most 8 (a 256 KiB request of 4 KiB blocks); the rest come
        // in behind the first ones anyway.
        for offset in (start & !63..end).step_by(64).take(8) {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: offset lies inside the tuple area of our mapping (lba..=last < blocks);
            // a prefetch never faults and has no architectural effect.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    self.map.as_ptr().add(offset as usize).cast::<i8>(),
                )
            };
            #[cfg(not(target_arch = "x86_64"))]
            let _ = offset;
        }
    }

    /// The tuple stored for `lba`, or `None` when the interval is unwritten.
    pub fn tuple(&self, lba: u64) -> Option<Tuple> {
        let mut raw = [0u8; 16];
        let words = self.tuple_words(lba);
        for (i, w) in words.iter().enumerate() {
            raw[i * 8..i * 8 + 8].copy_from_slice(&w.load(Ordering::Acquire).to_ne_bytes());
        }
        let raw = &raw[..words.len() * 8];
        if raw.iter().all(|&b| b == 0) {
            return None;
        }
        Some(self.header.format.decode(raw))
    }

    /// The tuple's raw on-disk bytes (for tools that corrupt or copy them on purpose).
    pub fn raw_tuple(&self, lba: u64) -> Vec<u8> {
        self.tuple_words(lba)
            .iter()
            .flat_map(|w| w.load(Ordering::Acquire).to_ne_bytes())
            .collect()
    }

    pub fn set_raw_tuple(&self, lba: u64, raw: &[u8]) {
        assert!(self.writable, "storing a tuple in read-only metadata");
        for (w, bytes) in self.tuple_words(lba).iter().zip(raw.chunks_exact(8)) {
            w.store(
                u64::from_ne_bytes(bytes.try_into().expect("8 bytes")),
                Ordering::Release,
            );
        }
    }

    pub fn set_tuple(&self, lba: u64, tuple: &Tuple) {
        let mut raw = [0u8; 16];
        let size = self.header.format.tuple_size();
        self.header.format.encode(tuple, &mut raw[..size]);
        self.set_raw_tuple(lba, &raw[..size]);
    }

    /// Mark `count` intervals from `lba` unwritten (they now read as zeros).
    pub fn set_unwritten(&self, lba: u64, count: u64) {
        assert!(self.writable, "storing a tuple in read-only metadata");
        for l in lba..lba + count {
            for w in self.tuple_words(l) {
                w.store(0, Ordering::Release);
            }
        }
    }

    /// Whether the file still backs every page of the mapping. A page the kernel could not
    /// back (the file truncated under the daemon, or its file system full on a first write
    /// to a page that was never allocated) is replaced by a stand-in (see
    /// `storage::sigbus`): what was stored there is not in the file, so every tuple, intent
    /// and sync is suspect from then on and the caller fails its request.
    pub fn intact(&self) -> io::Result<()> {
        if self.map.faults() == 0 {
            return Ok(());
        }
        if !self.loss_logged.swap(true, Ordering::Relaxed) {
            tracing::error!(
                metadata = %self.path.display(),
                "the PI metadata lost pages under the daemon (the file was truncated, or its file system ran out of space): every request that needs PI now fails with an I/O error; stop the daemon, free space or restore the file, and start it again (recovery re-checks what was in flight)"
            );
        }
        Err(io::Error::other(format!(
            "the PI metadata {} lost pages under the daemon (truncated or out of space)",
            self.path.display()
        )))
    }

    /// Make every stored tuple and bitmap word durable.
    pub fn sync(&self) -> io::Result<()> {
        self.msync(0, self.map.len())
    }

    /// Make the tuples of `count` intervals from `lba` durable.
    pub fn sync_tuples(&self, lba: u64, count: u64) -> io::Result<()> {
        let size = self.header.format.tuple_size() as u64;
        let start = self.header.tuples_offset() + lba * size;
        self.msync(start as usize, (count * size) as usize)
    }

    /// Make the bitmap word holding `region` durable.
    pub(crate) fn sync_bitmap_word(&self, region: u64) -> io::Result<()> {
        let offset = self.header.bitmap_offset() + region / 64 * 8;
        self.msync(offset as usize, 8)
    }

    fn msync(&self, offset: usize, len: usize) -> io::Result<()> {
        self.intact()?;
        if !self.writable || len == 0 {
            return Ok(());
        }
        let result = self.rewrite_after_failed_sync().and_then(|()| {
            let start = offset & !4095;
            let end = (offset + len).min(self.map.len());
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
        });
        if result.is_err() {
            self.failed_syncs.fetch_add(1, Ordering::SeqCst);
        }
        result.and_then(|()| self.intact())
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
        // SAFETY: the whole mapping, from its page-aligned start.
        if unsafe { libc::msync(self.map.as_ptr().cast(), self.map.len(), libc::MS_SYNC) } != 0 {
            return Err(io::Error::last_os_error());
        }
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
        for page in 0..self.map.len() / 4096 {
            // SAFETY: the mapping is page-aligned and a whole number of pages long
            // (Header::file_len), so the page's first word is aligned and inside it; other
            // threads store into it through atomics only.
            let word = unsafe { &*words.add(page * 4096 / 8) };
            let value = word.load(Ordering::Relaxed);
            // A failed exchange means another thread just stored there: dirty as well.
            let _ = word.compare_exchange(value, value, Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    /// Write-intent: make sure the regions covering `count` intervals from `lba` are marked
    /// dirty on disk before data or tuples there change. See docs/CRASH-CONSISTENCY.md.
    pub fn begin_write(&self, lba: u64, count: u64) -> io::Result<()> {
        self.intact()?;
        self.intent
            .begin(lba, count, self.bitmap_words(), |region| {
                self.sync_bitmap_word(region)
            })
    }

    /// The write that [`PiMetadata::begin_write`] announced has finished (tuples stored).
    pub fn end_write(&self, lba: u64, count: u64) {
        self.intent.end(lba, count);
    }

    /// Regions whose intent bit is set on disk: to be checked after an unclean shutdown.
    pub fn dirty_regions(&self) -> Vec<u64> {
        self.intent.dirty_regions(self.bitmap_words())
    }

    /// Intervals covered by `region`, as (first LBA, count).
    pub fn region_blocks(&self, region: u64) -> (u64, u64) {
        let per = (1u64 << self.header.region_shift) / u64::from(self.header.interval);
        let first = region * per;
        (first, per.min(self.header.blocks - first))
    }

    /// Clear intent bits of regions that are now durable and idle (after a flush).
    pub fn clear_intents(&self, ticket: super::intent::FlushTicket) {
        self.intent.clear(ticket, self.bitmap_words());
    }

    /// Start of a flush: pick the regions the flush may clean.
    pub fn flush_ticket(&self) -> super::intent::FlushTicket {
        if !self.writable {
            // A read-only mapping has no intents to clear (and must not be written).
            return super::intent::FlushTicket::default();
        }
        self.intent.ticket(self.bitmap_words())
    }

    /// Clear every intent bit (recovery done, or nothing in flight at shutdown).
    pub fn clear_all_intents(&self) -> io::Result<()> {
        self.intent.clear_all(self.bitmap_words());
        self.sync()
    }

    /// Clean shutdown: tuples durable, no intents, header says clean.
    pub fn close_clean(&self) -> io::Result<()> {
        if !self.writable {
            return Ok(());
        }
        self.sync()?;
        self.clear_all_intents()?;
        let clean = Header {
            state: VolumeState::Clean,
            ..self.header.clone()
        };
        std::os::unix::fs::FileExt::write_all_at(&self.file, &clean.encode(), 0)?;
        self.file.sync_data()
    }

    /// Release the metadata lock now (not at drop, which can be delayed by async teardown).
    pub fn release_lock(&self) {
        files::unlock(&self.file);
    }
}

/// Allocate the whole metadata file: tuples and intent bits are stored through a shared
/// mapping, and a store into a page the file system cannot allocate (a full disk under a
/// sparse file) raises SIGBUS instead of returning ENOSPC. Allocated up front, a full disk
/// can only fail data writes, which report it. Where the file system cannot preallocate, the
/// SIGBUS guard (`storage::sigbus`) still keeps the daemon alive; PI requests then fail.
fn allocate(file: &File, path: &Path, len: u64) -> io::Result<()> {
    if !files::allocate(file, 0, len)? {
        tracing::warn!(
            metadata = %path.display(),
            "this file system cannot preallocate the PI metadata; if it fills up, PI requests fail with I/O errors until the daemon is restarted with space"
        );
    }
    Ok(())
}

/// Open a metadata file (or device), with "missing" told apart from other failures.
fn open_metadata_file(path: &Path, writable: bool) -> Result<File, MetadataError> {
    files::open_no_follow(path, OpenOptions::new().read(true).write(writable)).map_err(|source| {
        match source.kind() {
            io::ErrorKind::NotFound => MetadataError::Missing { path: path.into() },
            _ => MetadataError::Open {
                path: path.into(),
                source,
            },
        }
    })
}

/// The header of an open metadata file: magic, version, checksum and geometry checked, and
/// the file long enough for what the header describes.
fn read_valid_header(file: &File, path: &Path) -> Result<Header, MetadataError> {
    let io_err = |source| MetadataError::Io {
        path: path.into(),
        source,
    };
    let len = files::size(file).map_err(io_err)?;
    if len < HEADER_SIZE {
        return Err(if len < 8 {
            MetadataError::NotMetadata { path: path.into() }
        } else {
            MetadataError::Truncated {
                path: path.into(),
                len,
                needed: HEADER_SIZE,
            }
        });
    }
    let mut page = vec![0u8; HEADER_SIZE as usize];
    std::os::unix::fs::FileExt::read_exact_at(file, &mut page, 0).map_err(io_err)?;
    let header = Header::decode(&page, path)?;
    if len < header.file_len() {
        return Err(MetadataError::Truncated {
            path: path.into(),
            len,
            needed: header.file_len(),
        });
    }
    Ok(header)
}

#[cfg(test)]
#[path = "metadata_tests.rs"]
mod tests;
