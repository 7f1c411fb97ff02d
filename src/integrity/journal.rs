//! The error journal: one JSON object per line, appended and made durable for every guard
//! error the daemon or `scrub` finds, every tuple re-derived by crash recovery and every
//! corruption `inject` makes on purpose. It lives beside the image
//! (`IMAGE.pi-journal.jsonl`), survives restarts, and `guardblk info` summarises it.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::pi::PiErrorKind;

/// What a journal record reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// Data and tuple disagree: a real integrity failure.
    GuardError,
    /// After an unclean shutdown, a tuple in a region with writes in flight was re-derived
    /// from the data found there (an unfinished write, not corruption).
    Recovered,
    /// `guardblk inject` corrupted this block on purpose.
    Injected,
    /// The journal reached its size cap: the older records are in `JOURNAL.1` (`lba` 0).
    Rotated,
}

/// One line of the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// RFC 3339, UTC.
    pub time: String,
    pub event: Event,
    /// In protection-interval (logical-block) units.
    pub lba: u64,
    pub byte_offset: u64,
    /// guard, ref or app for errors; data, guard, ref or app for injections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual: Option<String>,
    /// What found it: read (a guest read), scrub, recovery, inject.
    pub source: String,
}

impl Record {
    pub fn now(event: Event, lba: u64, interval: u32, source: &str) -> Record {
        Record {
            time: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            event,
            lba,
            byte_offset: lba * u64::from(interval),
            kind: None,
            expected: None,
            actual: None,
            source: source.into(),
        }
    }

    pub fn with_mismatch(mut self, kind: PiErrorKind, expected: u64, actual: u64) -> Record {
        self.kind = Some(kind.to_string());
        self.expected = Some(format!("{expected:#x}"));
        self.actual = Some(format!("{actual:#x}"));
        self
    }
}

/// The journal path for an image: `IMAGE.pi-journal.jsonl`.
pub fn default_path(image: &Path) -> PathBuf {
    let mut name = image.as_os_str().to_owned();
    name.push(".pi-journal.jsonl");
    PathBuf::from(name)
}

/// Where a serving daemon leaves its counters for `guardblk info`: `IMAGE.pi-stats.json`.
pub fn stats_path(image: &Path) -> PathBuf {
    let mut name = image.as_os_str().to_owned();
    name.push(".pi-stats.json");
    PathBuf::from(name)
}

/// Where a serving daemon keeps the places its guest was seen changing buffers in flight, for
/// the next daemon: `IMAGE.pi-mutations.json`.
pub fn mutations_path(image: &Path) -> PathBuf {
    let mut name = image.as_os_str().to_owned();
    name.push(".pi-mutations.json");
    PathBuf::from(name)
}

/// Size at which the journal is rotated: a failing disk or a corrupted range read in a loop
/// must not fill the host's filesystem. One older generation (`JOURNAL.1`) is kept.
pub const MAX_JOURNAL_BYTES: u64 = 64 << 20;

/// Records kept in memory while the journal cannot be written (its disk fails); beyond
/// this the newest are dropped, counted and the count logged once writing works again.
pub const MAX_PENDING_RECORDS: usize = 4096;

/// An open journal, shared by every queue.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    state: Mutex<JournalState>,
    /// `state.pending.len()`, readable without the lock (the flush path asks every time).
    pending_len: AtomicUsize,
    max_bytes: u64,
}

#[derive(Debug, Default)]
struct JournalState {
    file: Option<File>,
    /// Records not yet durable because the last attempt failed, oldest first: written
    /// again, before anything newer, by the next append or [`Journal::retry_pending`].
    pending: Vec<Record>,
    /// Records dropped because `pending` was full.
    dropped: u64,
    /// A write failed part-way: the file may end in a torn line, which the next write
    /// must end first (the reader skips the empty or torn line, not the record after it).
    maybe_torn: bool,
    /// When a failure was last logged (a failing disk under a corrupted range must not
    /// flood the log).
    last_logged: Option<Instant>,
    /// Failures since then.
    unlogged_failures: u64,
}

impl Journal {
    /// The file is created on the first record, so a clean disk has no journal at all.
    pub fn new(path: PathBuf) -> Journal {
        Self::with_cap(path, MAX_JOURNAL_BYTES)
    }

    /// As [`Journal::new`], rotating at `max_bytes`.
    pub fn with_cap(path: PathBuf, max_bytes: u64) -> Journal {
        Journal {
            path,
            state: Mutex::new(JournalState::default()),
            pending_len: AtomicUsize::new(0),
            max_bytes,
        }
    }

    /// Where the previous generation goes when the journal rotates.
    pub fn rotated_path(&self) -> PathBuf {
        let mut p = self.path.as_os_str().to_owned();
        p.push(".1");
        PathBuf::from(p)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append `record` and make it durable. Failing to journal is logged, never fatal: the
    /// structured log line and the guest's I/O error still report the failure, and the
    /// record is kept to be written again (see [`Journal::retry_pending`]).
    pub fn append(&self, record: &Record) {
        self.append_all(std::slice::from_ref(record));
    }

    /// Append `records` and make them durable with one sync (a failing range of thousands of
    /// intervals is one request, not thousands of fdatasyncs in the queue thread).
    pub fn append_all(&self, records: &[Record]) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let room = MAX_PENDING_RECORDS.saturating_sub(state.pending.len());
        state.dropped += records.len().saturating_sub(room) as u64;
        state
            .pending
            .extend_from_slice(&records[..records.len().min(room)]);
        self.write_pending(&mut state);
    }

    /// Write the records an earlier failure left in memory, if any. Cheap when there are
    /// none; the daemon calls it on every flush and at shutdown.
    pub fn retry_pending(&self) {
        if self.pending_len.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.write_pending(&mut state);
    }

    /// Records not yet durable.
    pub fn pending(&self) -> usize {
        self.pending_len.load(Ordering::Relaxed)
    }

    fn write_pending(&self, state: &mut JournalState) {
        if state.pending.is_empty() {
            return;
        }
        match self.try_write(state) {
            Ok(()) => {
                if state.last_logged.is_some() {
                    tracing::info!(
                        journal = %self.path.display(),
                        records = state.pending.len(),
                        "the PI error journal can be written again: the records kept since it failed are in it now"
                    );
                    state.last_logged = None;
                }
                if state.dropped > 0 {
                    tracing::error!(
                        journal = %self.path.display(),
                        dropped = state.dropped,
                        "PI error journal records were dropped while it could not be written (the structured log above still has every guard error)"
                    );
                    state.dropped = 0;
                }
                state.pending.clear();
                state.unlogged_failures = 0;
            }
            Err(e) => {
                // A file whose write or sync failed is opened afresh next time.
                state.file = None;
                state.maybe_torn = true;
                state.unlogged_failures += 1;
                let now = Instant::now();
                if state
                    .last_logged
                    .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
                {
                    tracing::error!(
                        journal = %self.path.display(),
                        error = %e,
                        failures = state.unlogged_failures,
                        kept = state.pending.len(),
                        "cannot append to the PI error journal; its records are kept in memory and written again later"
                    );
                    state.last_logged = Some(now);
                    state.unlogged_failures = 0;
                }
            }
        }
        self.pending_len
            .store(state.pending.len(), Ordering::Relaxed);
    }

    #[cfg(test)]
    fn try_append(&self, record: &Record) -> io::Result<()> {
        let mut state = self.state.lock().unwrap();
        state.pending.push(record.clone());
        let result = self.try_write(&mut state);
        state.pending.clear();
        result
    }

    /// Write every pending record and sync. A record whose earlier write landed but whose
    /// sync failed is written again: a duplicate line is better than a lost one.
    fn try_write(&self, state: &mut JournalState) -> io::Result<()> {
        let mut text = String::new();
        if state.maybe_torn {
            text.push('\n');
        }
        for record in &state.pending {
            text.push_str(&serde_json::to_string(record).map_err(io::Error::other)?);
            text.push('\n');
        }
        if state
            .file
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .is_some_and(|m| m.len() + text.len() as u64 > self.max_bytes)
        {
            // Rotate: the full file becomes JOURNAL.1 (replacing an older one), and the new
            // file starts with a record saying so.
            state.file = None;
            std::fs::rename(&self.path, self.rotated_path())?;
            let mut rotated = serde_json::to_string(&Record::now(Event::Rotated, 0, 0, "journal"))
                .map_err(io::Error::other)?;
            rotated.push('\n');
            text.insert_str(0, &rotated);
            tracing::warn!(journal = %self.path.display(), rotated = %self.rotated_path().display(), "the PI error journal reached its size cap and was rotated");
        }
        if state.file.is_none() {
            state.file = Some(crate::storage::files::open_no_follow(
                &self.path,
                std::os::unix::fs::OpenOptionsExt::mode(
                    OpenOptions::new().create(true).append(true),
                    0o600,
                ),
            )?);
        }
        let f = state.file.as_mut().expect("opened above");
        f.write_all(text.as_bytes())?;
        f.sync_data()?;
        state.maybe_torn = false;
        Ok(())
    }

    /// Every record in the journal at `path`, oldest first; missing file = no records.
    /// Lines that do not parse (a torn last line after a crash) are skipped and counted.
    pub fn read(path: &Path) -> io::Result<(Vec<Record>, usize)> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
            Err(e) => return Err(e),
        };
        let mut records = Vec::new();
        let mut skipped = 0;
        for line in io::BufReader::new(file).lines() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str(&line) {
                Ok(r) => records.push(r),
                Err(_) => skipped += 1,
            }
        }
        Ok((records, skipped))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_journal_rotates_at_its_cap_keeping_one_older_generation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.jsonl");
        let journal = Journal::with_cap(path.clone(), 2000);
        let batch: Vec<Record> = (0..10)
            .map(|lba| Record::now(Event::GuardError, lba, 4096, "read"))
            .collect();
        for _ in 0..20 {
            journal.append_all(&batch);
        }
        assert!(std::fs::metadata(&path).unwrap().len() <= 2000 + 2000);
        let (current, skipped) = Journal::read(&path).unwrap();
        assert_eq!(skipped, 0);
        assert_eq!(current[0].event, Event::Rotated);
        let (older, _) = Journal::read(&journal.rotated_path()).unwrap();
        assert!(!older.is_empty());
        assert!(std::fs::metadata(journal.rotated_path()).unwrap().len() <= 2000);
    }

    #[test]
    fn the_journal_is_private_and_never_written_through_a_link() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.jsonl");
        Journal::new(path.clone()).append(&Record::now(Event::Recovered, 1, 512, "recovery"));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        let linked = dir.path().join("linked.jsonl");
        std::os::unix::fs::symlink(&victim, &linked).unwrap();
        let journal = Journal::new(linked);
        assert!(journal
            .try_append(&Record::now(Event::Recovered, 1, 512, "recovery"))
            .is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
    }

    #[test]
    fn records_that_could_not_be_written_are_kept_and_written_first_later() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("not-yet");
        let path = missing.join("j.jsonl");
        let journal = Journal::new(path.clone());
        journal.append(&Record::now(Event::GuardError, 1, 4096, "read"));
        journal.append_all(&[
            Record::now(Event::GuardError, 2, 4096, "read"),
            Record::now(Event::GuardError, 3, 4096, "read"),
        ]);
        assert_eq!(journal.pending(), 3);
        journal.retry_pending();
        assert_eq!(journal.pending(), 3, "still cannot be written");

        std::fs::create_dir(&missing).unwrap();
        journal.retry_pending();
        assert_eq!(journal.pending(), 0);
        journal.append(&Record::now(Event::GuardError, 4, 4096, "read"));
        let (records, skipped) = Journal::read(&path).unwrap();
        assert_eq!(skipped, 0);
        let lbas: Vec<u64> = records.iter().map(|r| r.lba).collect();
        assert_eq!(lbas, [1, 2, 3, 4], "kept records lost or out of order");
    }

    #[test]
    fn a_journal_that_cannot_be_written_keeps_a_bounded_number_of_records() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::new(dir.path().join("missing").join("j.jsonl"));
        let burst: Vec<Record> = (0..1000)
            .map(|lba| Record::now(Event::GuardError, lba, 4096, "read"))
            .collect();
        for _ in 0..10 {
            journal.append_all(&burst);
        }
        assert_eq!(journal.pending(), MAX_PENDING_RECORDS);
        assert_eq!(
            journal.state.lock().unwrap().dropped,
            10_000 - MAX_PENDING_RECORDS as u64
        );
    }

    #[test]
    fn a_torn_last_line_does_not_swallow_the_next_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.jsonl");
        std::fs::write(&path, b"{\"time\":\"2026").unwrap();
        let journal = Journal::new(path.clone());
        journal.state.lock().unwrap().maybe_torn = true;
        journal.append(&Record::now(Event::GuardError, 5, 4096, "read"));
        let (records, skipped) = Journal::read(&path).unwrap();
        assert_eq!((records.len(), skipped), (1, 1));
        assert_eq!(records[0].lba, 5);
    }

    #[test]
    fn records_survive_a_round_trip_and_torn_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.jsonl");
        let journal = Journal::new(path.clone());
        let error = Record::now(Event::GuardError, 7, 4096, "read").with_mismatch(
            PiErrorKind::Guard,
            0x1234,
            0xbeef,
        );
        journal.append(&error);
        journal.append(&Record::now(Event::Recovered, 9, 512, "recovery"));
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"time\":\"2026")
            .unwrap();
        let (records, skipped) = Journal::read(&path).unwrap();
        assert_eq!(skipped, 1);
        assert_eq!(records.len(), 2);
        assert_eq!(records[0], error);
        assert_eq!(records[0].byte_offset, 7 * 4096);
        assert_eq!(records[0].expected.as_deref(), Some("0x1234"));
        assert_eq!(records[1].event, Event::Recovered);
        assert_eq!(records[1].byte_offset, 9 * 512);
        let line = std::fs::read_to_string(&path).unwrap();
        assert!(line.starts_with("{\"time\":"), "{line}");
        assert!(line.contains("\"event\":\"guard_error\""), "{line}");
    }
}
