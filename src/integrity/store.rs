//! A PI-protected disk as the data path and the tools see it: metadata (tuples, intents), the
//! error journal, write-range locks and counters, opened and checked as a pair with its image.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::journal::{Event, Journal, Record};
use super::metadata::{PiMetadata, APP_TAG};
use super::pi::{PiError, PiErrorKind, PiFormat, Tuple};
use super::reader::is_zero;

/// Writes in flight, by LBA range: at most one write per interval at a time, so the tuple
/// stored when a write completes describes what the disk holds. Readers that fail
/// verification take the same lock to re-read without a racing write.
#[derive(Debug, Default)]
pub struct RangeLocks {
    held: Mutex<Vec<(u64, u64)>>,
}

impl RangeLocks {
    /// Take [start, end) if no held range overlaps it.
    pub fn try_lock(&self, start: u64, end: u64) -> bool {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.iter().any(|&(s, e)| s < end && start < e) {
            return false;
        }
        held.push((start, end));
        true
    }

    pub fn unlock(&self, start: u64, end: u64) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = held.iter().position(|&r| r == (start, end)) {
            held.swap_remove(i);
        }
    }
}

/// Where a PI metadata file and journal are, given the image and an optional override.
pub fn meta_path(image: &Path, pi_meta: Option<&Path>) -> PathBuf {
    pi_meta.map_or_else(|| super::metadata::default_path(image), Path::to_path_buf)
}

pub struct PiStore {
    pub meta: PiMetadata,
    pub journal: Journal,
    pub ranges: RangeLocks,
    /// Guard of an all-zero interval: what an unwritten interval's data must hash to.
    zero_guard: u64,
}

impl std::fmt::Debug for PiStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PiStore").field("meta", &self.meta).finish()
    }
}

impl PiStore {
    /// A store over opened, checked metadata (see [`PiStore::open`] in `recovery`).
    pub(super) fn new(meta: PiMetadata, journal: Journal, zero_guard: u64) -> PiStore {
        PiStore {
            meta,
            journal,
            ranges: RangeLocks::default(),
            zero_guard,
        }
    }

    pub fn format(&self) -> PiFormat {
        self.meta.format()
    }

    pub fn interval(&self) -> u32 {
        self.meta.interval()
    }

    /// The tuple to store for an interval at `lba` whose data hashes to `guard`.
    pub fn tuple_for(&self, lba: u64, guard: u64) -> Tuple {
        self.format().tuple_from_guard(guard, lba, APP_TAG)
    }

    /// Store the tuple for `data` (one interval) at `lba`; all-zero data is stored as
    /// unwritten, which reads and verifies the same and keeps the metadata sparse.
    pub fn store_generated(&self, lba: u64, data: &[u8]) {
        if is_zero(data) {
            self.meta.set_unwritten(lba, 1);
        } else {
            let tuple = self.tuple_for(lba, self.format().guard(data));
            self.meta.set_tuple(lba, &tuple);
        }
    }

    /// Verify one interval of data read from `lba` against its stored tuple.
    pub fn check(&self, lba: u64, data: &[u8]) -> Result<(), PiError> {
        match self.meta.tuple(lba) {
            None if is_zero(data) => Ok(()),
            None => Err(PiError {
                kind: PiErrorKind::Guard,
                expected: self.zero_guard,
                actual: self.format().guard(data),
            }),
            Some(tuple) => self
                .format()
                .verify(data, &tuple, lba, Some(APP_TAG))
                .map(|_| ()),
        }
    }

    /// Report a real guard error: one structured log line and a journal record (the caller
    /// counts it).
    pub fn report(&self, lba: u64, error: &PiError, source: &str) {
        let interval = self.interval();
        tracing::error!(
            lba,
            byte_offset = lba * u64::from(interval),
            kind = %error.kind,
            expected = format_args!("{:#x}", error.expected),
            actual = format_args!("{:#x}", error.actual),
            request = source,
            "PI guard error"
        );
        self.journal.append(
            &Record::now(Event::GuardError, lba, interval, source).with_mismatch(
                error.kind,
                error.expected,
                error.actual,
            ),
        );
    }

    /// Flush the tuples and close cleanly (no write intents left).
    pub fn close_clean(&self) -> io::Result<()> {
        self.meta.close_clean()
    }
}
