//! The PI metadata file: a versioned header, the write-intent bitmap and one tuple per
//! protection interval of the data image, kept beside the raw image (`IMAGE.pi` by default).
//! The header page and the errors of opening a file are in `header`, re-exported here.
//!
//! Layout and meaning are documented in docs/FORMAT.md; keep the two in step. Tuples are
//! loaded and stored as aligned 64-bit atomics in memory (no system call per request), and
//! [`PiMetadata::sync`] makes them durable. Where that memory comes from is the medium
//! (`super::medium`): a file mapped shared, or an RBD image held in memory and written
//! through at each sync. Everything here works the same on both.
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
use super::medium::{FileMedium, Medium, RbdMedium};
use super::pi::{PiFormat, Tuple};
use crate::storage::files::{self, SharedMapping};
use crate::storage::rbd::{CephOptions, RbdImage, RbdSpec};

pub use super::header::{
    default_path, DataIdentity, Header, MetadataError, VolumeState, APP_TAG, HEADER_SIZE,
};

/// Open metadata: header, intent bitmap and tuples.
pub struct PiMetadata {
    /// The file, or `rbd:POOL/IMAGE.pi`, as the operator would name it.
    path: PathBuf,
    header: Header,
    medium: Medium,
    writable: bool,
    intent: IntentLog,
    /// The loss of mapped pages has been logged (once is enough: every request says it).
    loss_logged: AtomicBool,
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
        check_size(path, &header, data)?;

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
        let medium = Medium::File(FileMedium::new(path.into(), file, map));
        PiMetadata::with_medium(path, header, medium, data, writable)
    }

    /// The metadata in the RBD image `spec` (beside an `rbd:` data image), checked against
    /// `data` like a file. Read into memory whole (8 bytes per interval: 2 MiB per GiB of
    /// 4 KiB intervals) and written through at each sync.
    pub fn open_rbd(
        spec: &RbdSpec,
        options: &CephOptions,
        data: &DataIdentity,
        writable: bool,
    ) -> Result<PiMetadata, MetadataError> {
        let path = PathBuf::from(spec.to_string());
        let image =
            RbdImage::open(spec, options, !writable).map_err(|e| rbd_open_error(&path, e))?;
        if writable {
            image
                .lock_exclusive()
                .map_err(|e| rbd_open_error(&path, e))?;
        }
        let io_err = |source| MetadataError::Io {
            path: path.clone(),
            source,
        };
        let header = read_rbd_header(&image, &path)?;
        check_size(&path, &header, data)?;
        let medium =
            Medium::Rbd(RbdMedium::load(image, header.file_len() as usize).map_err(io_err)?);
        PiMetadata::with_medium(&path, header, medium, data, writable)
    }

    /// Read and check the header of the metadata in the RBD image `spec`, without holding
    /// the image open (`guardblk info`); also its size in bytes.
    pub fn read_header_rbd(
        spec: &RbdSpec,
        options: &CephOptions,
    ) -> Result<(Header, u64), MetadataError> {
        let path = PathBuf::from(spec.to_string());
        let image = RbdImage::open(spec, options, true).map_err(|e| rbd_open_error(&path, e))?;
        let header = read_rbd_header(&image, &path)?;
        Ok((header, image.size()))
    }

    /// Create the RBD image `spec` as fresh metadata described by `header` (all intervals
    /// unwritten: an RBD image reads as zeros where nothing was written, so only the header
    /// is written).
    pub fn create_rbd(
        spec: &RbdSpec,
        options: &CephOptions,
        header: &Header,
    ) -> Result<(), MetadataError> {
        let path = PathBuf::from(spec.to_string());
        RbdImage::create(spec, options, header.file_len()).map_err(|e| rbd_open_error(&path, e))?;
        let written = RbdImage::open(spec, options, false)
            .map_err(|e| rbd_open_error(&path, e))
            .and_then(|image| {
                image
                    .write_at(&header.encode(), 0)
                    .and_then(|()| image.flush())
                    .map_err(|source| MetadataError::Create {
                        path: path.clone(),
                        source,
                    })
            });
        if written.is_err() {
            let _ = RbdImage::remove(spec, options);
        }
        written
    }

    /// The part of opening shared by every medium: the intent log loaded, and a writable
    /// open marked in use.
    fn with_medium(
        path: &Path,
        header: Header,
        medium: Medium,
        data: &DataIdentity,
        writable: bool,
    ) -> Result<PiMetadata, MetadataError> {
        let intent = IntentLog::new(
            header.regions(),
            header.region_shift,
            header.interval.trailing_zeros(),
        );
        let mut meta = PiMetadata {
            path: path.into(),
            header,
            medium,
            writable,
            intent,
            loss_logged: AtomicBool::new(false),
        };
        meta.intent.load(meta.bitmap_words());
        if writable {
            meta.header.state = VolumeState::InUse;
            meta.header.data = DataIdentity {
                path: data.path.clone(),
                ..meta.header.data.clone()
            };
            meta.write_header().map_err(|source| MetadataError::Io {
                path: path.into(),
                source,
            })?;
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
        self.medium.write_header(&self.header.encode())
    }

    fn bitmap_words(&self) -> &[AtomicU64] {
        let offset = self.header.bitmap_offset() as usize;
        let words = self.header.bitmap_len() as usize / 8;
        // SAFETY: the bitmap lies inside the mapping (file_len covers it), is 8-byte aligned
        // (page-aligned offset) and lives as long as `self`; AtomicU64 has u64's layout.
        unsafe {
            std::slice::from_raw_parts(self.medium.base().add(offset).cast::<AtomicU64>(), words)
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
            std::slice::from_raw_parts(self.medium.base().add(offset).cast::<AtomicU64>(), size / 8)
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
                    self.medium.base().add(offset as usize).cast::<i8>(),
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
        self.medium.stored(self.tuple_range(lba, 1));
    }

    /// Where the tuples of `count` intervals from `lba` are, in bytes from the start.
    fn tuple_range(&self, lba: u64, count: u64) -> std::ops::Range<usize> {
        let size = self.header.format.tuple_size() as u64;
        let start = self.header.tuples_offset() + lba * size;
        start as usize..(start + count * size) as usize
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
        self.medium.stored(self.tuple_range(lba, count));
    }

    /// Whether the file still backs every page of the mapping. A page the kernel could not
    /// back (the file truncated under the daemon, or its file system full on a first write
    /// to a page that was never allocated) is replaced by a stand-in (see
    /// `storage::sigbus`): what was stored there is not in the file, so every tuple, intent
    /// and sync is suspect from then on and the caller fails its request.
    pub fn intact(&self) -> io::Result<()> {
        if self.medium.faults() == 0 {
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
        let bitmap = self.header.bitmap_offset() as usize;
        self.persist(|m| m.persist_all(bitmap..bitmap + self.header.bitmap_len() as usize))
    }

    /// Make the tuples of `count` intervals from `lba` durable.
    pub fn sync_tuples(&self, lba: u64, count: u64) -> io::Result<()> {
        let range = self.tuple_range(lba, count);
        self.persist(|m| m.persist(range))
    }

    /// Make the bitmap word holding `region` durable.
    pub(crate) fn sync_bitmap_word(&self, region: u64) -> io::Result<()> {
        let offset = (self.header.bitmap_offset() + region / 64 * 8) as usize;
        self.persist(|m| m.persist(offset..offset + 8))
    }

    /// Run `write` on the medium if anything may be written, between checks that the medium
    /// still holds what was stored.
    fn persist(&self, write: impl FnOnce(&Medium) -> io::Result<()>) -> io::Result<()> {
        self.intact()?;
        if !self.writable {
            return Ok(());
        }
        write(&self.medium).and_then(|()| self.intact())
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
        self.medium.write_header(&clean.encode())
    }

    /// Release the metadata lock now (not at drop, which can be delayed by async teardown).
    pub fn release_lock(&self) {
        self.medium.release_lock();
    }
}

/// The header of metadata in an RBD image, checked as [`read_valid_header`] checks a file's.
fn read_rbd_header(image: &RbdImage, path: &Path) -> Result<Header, MetadataError> {
    if image.size() < HEADER_SIZE {
        return Err(MetadataError::NotMetadata { path: path.into() });
    }
    let mut page = vec![0u8; HEADER_SIZE as usize];
    image
        .read_at(&mut page, 0)
        .map_err(|source| MetadataError::Io {
            path: path.into(),
            source,
        })?;
    let header = Header::decode(&page, path)?;
    if image.size() < header.file_len() {
        return Err(MetadataError::Truncated {
            path: path.into(),
            len: image.size(),
            needed: header.file_len(),
        });
    }
    Ok(header)
}

/// The metadata must describe a disk of the data target's size.
fn check_size(path: &Path, header: &Header, data: &DataIdentity) -> Result<(), MetadataError> {
    if header.capacity_bytes() != data.size {
        return Err(MetadataError::SizeMismatch {
            meta: path.into(),
            data: data.path.clone(),
            expected: header.capacity_bytes(),
            actual: data.size,
        });
    }
    Ok(())
}

/// A Ceph failure opening or creating metadata in an RBD image: a missing image is missing
/// metadata; anything else keeps Ceph's own sentence.
fn rbd_open_error(path: &Path, e: crate::storage::rbd::RbdError) -> MetadataError {
    match e {
        crate::storage::rbd::RbdError::NoImage { .. } => {
            MetadataError::Missing { path: path.into() }
        }
        crate::storage::rbd::RbdError::Exists { .. } => {
            MetadataError::AlreadyExists { path: path.into() }
        }
        e => MetadataError::Rbd(Box::new(e)),
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
