//! `guardblk scrub`: verify every interval of an image against its tuples.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::integrity::journal::{Event, Record};
use crate::integrity::{scan, PiError, PiFormat};

use super::{human, io_error, open_exclusive, open_store, Progress, ToolError};
use crate::storage::rbd::CephOptions;

/// What `scrub` found.
#[derive(Debug)]
pub struct ScrubReport {
    pub image: PathBuf,
    pub format: PiFormat,
    pub interval: u32,
    pub blocks: u64,
    /// Failures in LBA order (each also journaled and logged).
    pub errors: Vec<(u64, PiError)>,
    /// Tuples re-derived by crash recovery before the scrub (unclean previous shutdown).
    pub recovered: u64,
    pub elapsed: Duration,
}

impl ScrubReport {
    pub fn is_clean(&self) -> bool {
        self.errors.is_empty()
    }

    /// One line per error, then a summary line.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let interval = u64::from(self.interval);
        for (lba, e) in &self.errors {
            let _ = writeln!(
                out,
                "LBA {lba} (byte offset {}): {} mismatch, expected {:#x}, found {:#x}",
                lba * interval,
                e.kind,
                e.expected,
                e.actual
            );
        }
        let _ = write!(
            out,
            "scrub of {}: {} blocks checked ({} PI, {}-byte intervals, {}), {} guard error{}, {} recovered after an unclean shutdown, {:.2} s",
            self.image.display(),
            self.blocks,
            self.format,
            self.interval,
            human(self.blocks * interval),
            self.errors.len(),
            if self.errors.len() == 1 { "" } else { "s" },
            self.recovered,
            self.elapsed.as_secs_f64()
        );
        out
    }

    /// JSON lines: one journal record per error, then `{"summary":{...}}`.
    pub fn json_lines(&self) -> String {
        let mut out = String::new();
        for (lba, e) in &self.errors {
            let record = Record::now(Event::GuardError, *lba, self.interval, "scrub")
                .with_mismatch(e.kind, e.expected, e.actual);
            let _ = writeln!(
                out,
                "{}",
                serde_json::to_string(&record).unwrap_or_default()
            );
        }
        let summary = json!({
            "summary": {
                "blocks": self.blocks,
                "errors": self.errors.len(),
                "format": self.format.to_string(),
                "interval": self.interval,
                "recovered": self.recovered,
            }
        });
        out.push_str(&summary.to_string());
        out
    }
}

/// `guardblk scrub`: verify every interval of the image. Opens image and metadata exclusively
/// and writable, so an unclean previous shutdown is recovered first (torn writes that were in
/// flight are re-derived and journaled as `recovered`, not reported as errors).
pub fn scrub(
    image_path: &Path,
    pi_meta: Option<&Path>,
    ceph: &CephOptions,
) -> Result<ScrubReport, ToolError> {
    let start = Instant::now();
    let image = open_exclusive(image_path, ceph, "scrubbing it")?;
    let (store, report) = open_store(&image, pi_meta)?;
    let interval = u64::from(store.interval());
    let mut progress = Progress::new("scrub");
    let scrubbed = scan::scrub(&image, &store, |done, total| {
        progress.update(done * interval, total * interval)
    });
    progress.finish();
    let errors = scrubbed.map_err(io_error(format!("cannot scrub {}", image_path.display())))?;
    store.close_clean().map_err(io_error(format!(
        "cannot close {}",
        store.meta.path().display()
    )))?;
    Ok(ScrubReport {
        image: image_path.into(),
        format: store.format(),
        interval: store.interval(),
        blocks: store.meta.blocks(),
        errors,
        recovered: report.recovered,
        elapsed: start.elapsed(),
    })
}
