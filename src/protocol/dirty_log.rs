//! The frontend's dirty log for live migration (VHOST_F_LOG_ALL, SET_LOG_BASE).
//!
//! While QEMU migrates a guest it copies guest RAM page by page, again and again, and must
//! learn of every page that changed since it was copied. Pages the guest's CPUs write it sees
//! itself; pages this daemon writes (read data, by io_uring or by a bounce copy; status bytes;
//! GET_ID strings; used-ring entries and the avail event) it learns from a bitmap shared over
//! SET_LOG_BASE: one bit per 4 KiB page of guest-physical address space, which QEMU harvests
//! with atomic exchanges while we set bits with atomic ORs. A write the log misses leaves the
//! destination guest with the page as it was before the write — a read buffer with stale
//! data, the guest never told. vm-memory's bitmaps cannot help here: io_uring and the
//! executor's raw pointers write guest memory behind its back. So the device marks, per
//! completed request and before its used-ring entry, every device-writable buffer of the
//! chain, and after each used-ring update the used ring itself (docs/RESTART.md §5).

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, RwLock};

use thiserror::Error;

use crate::storage::files::SharedMapping;

/// The log's granularity, fixed by the vhost-user protocol.
pub const LOG_PAGE_SIZE: u64 = 4096;

#[derive(Debug, Error)]
pub enum DirtyLogError {
    #[error("dirty log of {size} bytes at offset {offset}: empty or not addressable")]
    BadGeometry { size: u64, offset: u64 },
    #[error("cannot map the {size}-byte dirty log: {source}")]
    Map { size: u64, source: io::Error },
}

/// The frontend's bitmap, mapped shared.
struct LogMap(SharedMapping);

impl LogMap {
    fn map(file: &File, offset: u64, size: u64) -> Result<LogMap, DirtyLogError> {
        let len = usize::try_from(size)
            .ok()
            .filter(|&len| len > 0)
            .ok_or(DirtyLogError::BadGeometry { size, offset })?;
        SharedMapping::new(file, offset, len, true)
            .map(LogMap)
            .map_err(|source| DirtyLogError::Map { size, source })
    }

    /// Set the bits of the pages `[gpa, gpa + len)` touches; pages past the log are ignored
    /// (the frontend sized it to cover all of guest memory, so those are no guest pages).
    fn mark(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa / LOG_PAGE_SIZE;
        let last = gpa.saturating_add(len - 1) / LOG_PAGE_SIZE;
        for page in first..=last {
            let Ok(byte) = usize::try_from(page / 8) else {
                return;
            };
            if byte >= self.0.len() {
                return;
            }
            // SAFETY: `byte < len`, inside the live mapping; AtomicU8 has the layout of u8.
            let cell = unsafe { AtomicU8::from_ptr(self.0.as_ptr().add(byte)) };
            cell.fetch_or(1 << (page % 8), Ordering::Relaxed);
        }
    }
}

/// Test control only: with this set in the environment the device offers dirty logging but
/// marks nothing, so that guest-tests/run.sh can show its migration check fails without the
/// log. Never set it in production: a migrated guest would read stale buffers.
pub const UNSAFE_SKIP_ENV: &str = "GUARDBLK_UNSAFE_SKIP_DIRTY_LOG";

/// One session's dirty log: the frontend's bitmap once it sent one, and whether logging is
/// on (VHOST_F_LOG_ALL in the last SET_FEATURES). Cheap when off: one relaxed load.
pub struct DirtyLog {
    enabled: AtomicBool,
    map: RwLock<Option<Arc<LogMap>>>,
    /// [`UNSAFE_SKIP_ENV`] was set when the session started.
    unsafe_skip: bool,
}

impl Default for DirtyLog {
    fn default() -> DirtyLog {
        DirtyLog {
            enabled: AtomicBool::new(false),
            map: RwLock::new(None),
            unsafe_skip: std::env::var_os(UNSAFE_SKIP_ENV).is_some_and(|v| v == "1"),
        }
    }
}

impl DirtyLog {
    /// SET_LOG_BASE: map the frontend's bitmap (replacing an earlier one; QEMU resizes the
    /// log when guest memory grows).
    pub fn set_base(&self, file: &File, offset: u64, size: u64) -> Result<(), DirtyLogError> {
        let map = Arc::new(LogMap::map(file, offset, size)?);
        if self.unsafe_skip {
            tracing::error!(
                "{UNSAFE_SKIP_ENV}=1: the dirty log is ignored, so this migration will leave the guest with stale memory (a test control; never set it in production)"
            );
        }
        *self.map.write().unwrap_or_else(|p| p.into_inner()) = Some(map);
        Ok(())
    }

    /// VHOST_F_LOG_ALL was acked (migration running) or cleared (finished or cancelled).
    /// Returns whether that changed anything.
    pub fn set_enabled(&self, enabled: bool) -> bool {
        self.enabled.swap(enabled, Ordering::SeqCst) != enabled
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// The marker to use for a batch of writes, if logging is on and a log was given.
    pub fn marker(&self) -> Option<DirtyMarker> {
        if !self.enabled() || self.unsafe_skip {
            return None;
        }
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        map.as_ref().map(|m| DirtyMarker(Arc::clone(m)))
    }
}

/// A handle on the log for one batch (no lock held while marking).
pub struct DirtyMarker(Arc<LogMap>);

impl DirtyMarker {
    /// Record that the device wrote guest-physical `[gpa, gpa + len)`.
    pub fn mark(&self, gpa: u64, len: u64) {
        self.0.mark(gpa, len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};

    fn log_file(bytes: usize) -> File {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&vec![0u8; bytes]).unwrap();
        file
    }

    fn contents(file: &mut File) -> Vec<u8> {
        let mut out = Vec::new();
        file.seek(SeekFrom::Start(0)).unwrap();
        file.read_to_end(&mut out).unwrap();
        out
    }

    #[test]
    fn marks_every_page_a_range_touches_and_nothing_else() {
        let mut file = log_file(8);
        let log = DirtyLog::default();
        log.set_base(&file, 0, 8).unwrap();
        assert!(log.marker().is_none(), "no marking before LOG_ALL");
        assert!(log.set_enabled(true));
        let m = log.marker().unwrap();
        // Page 1 (one byte at its end), pages 3..=4 (a range across a page boundary),
        // page 63 (last bit of the log), page 64 (past the log: ignored).
        m.mark(2 * 4096 - 1, 1);
        m.mark(3 * 4096 + 100, 4096);
        m.mark(63 * 4096, 1);
        m.mark(64 * 4096, 4096);
        m.mark(5 * 4096, 0);
        let bytes = contents(&mut file);
        assert_eq!(bytes, [0b0001_1010, 0, 0, 0, 0, 0, 0, 0b1000_0000]);
    }

    #[test]
    fn off_after_log_all_is_cleared() {
        let mut file = log_file(1);
        let log = DirtyLog::default();
        log.set_base(&file, 0, 1).unwrap();
        log.set_enabled(true);
        assert!(log.set_enabled(false));
        assert!(log.marker().is_none());
        assert_eq!(contents(&mut file), [0]);
    }

    #[test]
    fn rejects_an_empty_log() {
        let file = log_file(1);
        assert!(matches!(
            DirtyLog::default().set_base(&file, 0, 0),
            Err(DirtyLogError::BadGeometry { .. })
        ));
    }
}
