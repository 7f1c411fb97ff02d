//! A PI-protected disk as the data path and the tools see it: metadata (tuples, intents), the
//! error journal, write-range locks and counters, opened and checked as a pair with its image.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::journal::{Event, Journal, Record};
use super::metadata::{PiMetadata, APP_TAG};
use super::pi::{PiError, PiErrorKind, PiFormat, Tuple};
use super::reader::is_zero;
use crate::storage::Image;

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
    /// Ranges (first LBA, count) a write failed on that could not be read back then: their
    /// tuples may not match the torn data, and their write intents are held (until the next
    /// start's recovery) so that a crash or a restart recovers them. The first read that finds
    /// a mismatch there re-derives them instead of reporting a guard error (the guest was told
    /// the write failed; any content is legal).
    suspect: Mutex<Vec<(u64, u64)>>,
}

/// Suspect ranges kept at most; past that, a failed write's range is still held for crash
/// recovery, but a read of it before a restart reports the mismatch.
const MAX_SUSPECT_RANGES: usize = 4096;

/// Guard errors of one request logged line by line; the rest are summed up (all journalled).
pub const LOGGED_PER_REQUEST: usize = 8;

fn log_guard_error(lba: u64, interval: u32, error: &PiError, source: &str) {
    tracing::error!(
        lba,
        byte_offset = lba * u64::from(interval),
        kind = %error.kind,
        expected = format_args!("{:#x}", error.expected),
        actual = format_args!("{:#x}", error.actual),
        request = source,
        "PI guard error"
    );
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
            suspect: Mutex::new(Vec::new()),
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
    /// unwritten, which reads and verifies the same.
    pub fn store_generated(&self, lba: u64, data: &[u8]) {
        if is_zero(data) {
            self.meta.set_unwritten(lba, 1);
        } else {
            let tuple = self.tuple_for(lba, self.format().guard(data));
            self.meta.set_tuple(lba, &tuple);
        }
    }

    /// A write to `count` intervals from `lba` failed and the range could not be read back:
    /// keep its write intent (the caller does not end the write) and remember the range.
    pub fn hold_for_recovery(&self, lba: u64, count: u64) {
        let mut suspect = self.suspect.lock().unwrap_or_else(|p| p.into_inner());
        if suspect.len() < MAX_SUSPECT_RANGES {
            suspect.push((lba, count));
        }
    }

    /// A read of `[lba, lba + count)` did not verify, and the caller holds the range lock on
    /// exactly that range. Re-derive, from what the disk holds now, the suspect intervals
    /// inside it (never outside: a write there could race the re-derivation), and forget
    /// them. Their write intents stay held until the next start's recovery (cheap: a region
    /// re-checked). Returns whether any interval was re-derived (the caller verifies again).
    pub fn heal_suspect(&self, image: &Image, lba: u64, count: u64) -> bool {
        let end = lba + count;
        let interval = self.interval() as usize;
        let mut suspect = self.suspect.lock().unwrap_or_else(|p| p.into_inner());
        let mut healed = false;
        let mut kept = Vec::with_capacity(suspect.len());
        for &(l, c) in suspect.iter() {
            let (from, to) = (l.max(lba), (l + c).min(end));
            if from >= to {
                kept.push((l, c));
                continue;
            }
            let mut data = vec![0u8; (to - from) as usize * interval];
            if super::reader::read_upto(image, &mut data, from * interval as u64).is_err() {
                kept.push((l, c)); // still unreadable: stays suspect
                continue;
            }
            for (i, chunk) in data.chunks_exact(interval).enumerate() {
                self.store_generated(from + i as u64, chunk);
            }
            self.journal.append(&Record::now(
                Event::Recovered,
                from,
                self.interval(),
                "failed-write",
            ));
            tracing::warn!(
                lba = from,
                count = to - from,
                "re-derived the tuples of a range whose write had failed unreadable, now that it reads"
            );
            healed = true;
            if l < from {
                kept.push((l, from - l));
            }
            if to < l + c {
                kept.push((to, l + c - to));
            }
        }
        *suspect = kept;
        healed
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
    /// Report the guard errors of one request: every one journalled (one sync), the first
    /// [`LOGGED_PER_REQUEST`] logged with their LBA, the rest summed up in one more line.
    pub fn report_all(&self, failures: &[(u64, PiError)], source: &str) {
        let interval = self.interval();
        for (lba, error) in failures.iter().take(LOGGED_PER_REQUEST) {
            log_guard_error(*lba, interval, error, source);
        }
        if failures.len() > LOGGED_PER_REQUEST {
            let (first, last) = (failures[0].0, failures[failures.len() - 1].0);
            tracing::error!(
                more = failures.len() - LOGGED_PER_REQUEST,
                first_lba = first,
                last_lba = last,
                request = source,
                journal = %self.journal.path().display(),
                "more PI guard errors in the same request (every LBA is in the journal)"
            );
        }
        let records: Vec<Record> = failures
            .iter()
            .map(|(lba, error)| {
                Record::now(Event::GuardError, *lba, interval, source).with_mismatch(
                    error.kind,
                    error.expected,
                    error.actual,
                )
            })
            .collect();
        self.journal.append_all(&records);
    }

    pub fn report(&self, lba: u64, error: &PiError, source: &str) {
        let interval = self.interval();
        log_guard_error(lba, interval, error, source);
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
        self.journal.retry_pending();
        self.meta.close_clean()
    }
}
