//! The commands behind the command line: `create`, `import`, `scrub`, `info`, `inject` and the
//! set-up of `serve`. Each returns a report (text and, where asked for, JSON rendering) or a
//! [`ToolError`] whose message is one sentence; `main.rs` prints them.
//!
//! LBAs are in protection-interval units everywhere; reports give the byte offset too.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::{self, IsTerminal, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use serde_json::{json, Value};
use thiserror::Error;

use crate::cli::{self, CliError, InjectKind, DEFAULT_IMAGE_SIZE};
use crate::daemon::DaemonError;
use crate::integrity::journal::{self, Event, Journal, Record};
use crate::integrity::metadata::{DataIdentity, Header, VolumeState};
use crate::integrity::store::{self, PiStore};
use crate::integrity::{reader, recovery, scan, MetadataError, PiError, PiFormat, PiMetadata};
use crate::storage::{AlignedBuf, Image, ImageError};

/// Why a command could not do its job; the message is one sentence.
#[derive(Debug, Error)]
pub enum ToolError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    #[error(transparent)]
    Cli(#[from] CliError),
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    /// The command refuses to do this (the message says why and what to do instead).
    #[error("{0}")]
    Refused(String),
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
}

fn io_error(what: impl Into<String>) -> impl FnOnce(io::Error) -> ToolError {
    let what = what.into();
    move |source| ToolError::Io { what, source }
}

/// Open `path` for exclusive use by a tool; a daemon serving it is reported in one sentence.
fn open_exclusive(path: &Path, doing: &str) -> Result<Image, ToolError> {
    Image::open(path, false).map_err(|e| match e {
        ImageError::Locked { path } => ToolError::Refused(format!(
            "{} is being served by a running guardblk (it holds the image lock); stop the daemon before {doing}",
            path.display()
        )),
        e => e.into(),
    })
}

/// Open the PI store of an exclusively opened image, writable; missing metadata is explained.
fn open_store(
    image: &Image,
    pi_meta: Option<&Path>,
) -> Result<(PiStore, recovery::OpenReport), ToolError> {
    PiStore::open_beside(image, pi_meta, true).map_err(|e| match e {
        MetadataError::Missing { path } => ToolError::Refused(format!(
            "{} has no PI metadata ({} does not exist); add it with `guardblk import {}`",
            image.path().display(),
            path.display(),
            image.path().display()
        )),
        e => e.into(),
    })
}

/// Progress on stderr, drawn only when stderr is a terminal.
struct Progress {
    label: &'static str,
    enabled: bool,
    start: Instant,
    last_draw: Option<Instant>,
}

impl Progress {
    fn new(label: &'static str) -> Progress {
        Progress {
            label,
            enabled: io::stderr().is_terminal(),
            start: Instant::now(),
            last_draw: None,
        }
    }

    fn update(&mut self, done: u64, total: u64) {
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        if self
            .last_draw
            .is_some_and(|t| now - t < Duration::from_millis(200))
            && done < total
        {
            return;
        }
        self.last_draw = Some(now);
        let pct = (done * 100).checked_div(total).unwrap_or(100);
        eprint!(
            "\r{} {pct:3}%  {} of {}  {:.0} MB/s\x1b[K",
            self.label,
            human(done),
            human(total),
            rate_mb_s(done, self.start.elapsed())
        );
    }

    fn finish(&self) {
        if self.enabled && self.last_draw.is_some() {
            eprint!("\r\x1b[K");
        }
    }
}

fn rate_mb_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / elapsed.as_secs_f64().max(1e-6) / 1e6
}

/// 68719476736 → "64 GiB"; 1536 → "1.5 KiB".
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else if value.fract() == 0.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn unix_time(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

fn event_name(event: Event) -> String {
    serde_json::to_value(event)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{event:?}"))
}

/// Size of a file or block device, without locking or O_DIRECT.
fn target_size(path: &Path) -> io::Result<u64> {
    let mut file = std::fs::File::open(path)?;
    file.seek(SeekFrom::End(0))
}

// ---------------------------------------------------------------------------------------------
// create

/// What `create` made.
#[derive(Debug)]
pub struct Created {
    pub image: PathBuf,
    pub size: u64,
    /// Format, interval and metadata path; `None` for a plain raw image.
    pub pi: Option<(PiFormat, u32, PathBuf)>,
}

impl std::fmt::Display for Created {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.pi {
            None => write!(
                f,
                "created {} ({} bytes, {}, sparse, no PI)",
                self.image.display(),
                self.size,
                human(self.size)
            ),
            Some((format, interval, meta)) => write!(
                f,
                "created {} ({} bytes, {}, sparse) with {format} PI, {interval}-byte intervals; metadata in {}",
                self.image.display(),
                self.size,
                human(self.size),
                meta.display()
            ),
        }
    }
}

/// `guardblk create`: a sparse raw image and, unless `format` is `None`, its PI metadata with
/// every interval unwritten (reads as zeros) — seconds for any size.
pub fn create(
    image: &Path,
    size: u64,
    format: Option<PiFormat>,
    interval: u32,
    pi_meta: Option<&Path>,
) -> Result<Created, ToolError> {
    if format.is_some() && !size.is_multiple_of(u64::from(interval)) {
        return Err(ToolError::Refused(format!(
            "--size {size} is not a multiple of the {interval}-byte protection interval"
        )));
    }
    let meta_path = store::meta_path(image, pi_meta);
    if format.is_some() && pi_meta.is_none() && meta_path.exists() {
        return Err(ToolError::Refused(format!(
            "{} already exists; refusing to overwrite it",
            meta_path.display()
        )));
    }
    Image::create(image, size)?;
    let Some(format) = format else {
        return Ok(Created {
            image: image.into(),
            size,
            pi: None,
        });
    };
    let created = DataIdentity::of(image, size)
        .map_err(io_error(format!("cannot examine {}", image.display())))
        .and_then(|data| {
            let header = Header::new(format, interval, data);
            PiMetadata::create(&meta_path, &header).map_err(ToolError::from)
        });
    if let Err(e) = created {
        let _ = std::fs::remove_file(image);
        return Err(e);
    }
    Ok(Created {
        image: image.into(),
        size,
        pi: Some((format, interval, meta_path)),
    })
}

// ---------------------------------------------------------------------------------------------
// import

/// What `import` did.
#[derive(Debug)]
pub struct Imported {
    pub image: PathBuf,
    pub meta: PathBuf,
    pub format: PiFormat,
    pub interval: u32,
    pub blocks: u64,
    pub size: u64,
    pub elapsed: Duration,
}

impl std::fmt::Display for Imported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "imported {} ({}): {} blocks protected with {} PI, {}-byte intervals, in {:.2} s ({:.0} MB/s); metadata in {}",
            self.image.display(),
            human(self.size),
            self.blocks,
            self.format,
            self.interval,
            self.elapsed.as_secs_f64(),
            rate_mb_s(self.size, self.elapsed),
            self.meta.display()
        )
    }
}

/// Whether PI metadata is already at `meta_path` (a block device counts only if it holds a
/// valid header: a fresh device is a legitimate target).
fn metadata_present(meta_path: &Path) -> bool {
    match std::fs::metadata(meta_path) {
        Ok(m) if m.file_type().is_block_device() => PiMetadata::read_header(meta_path).is_ok(),
        Ok(_) => true,
        Err(_) => false,
    }
}

/// `guardblk import`: create PI metadata for an existing raw image and generate a tuple for
/// every interval of it. On failure the half-made metadata is removed.
pub fn import(
    image_path: &Path,
    format: Option<PiFormat>,
    interval: u32,
    pi_meta: Option<&Path>,
) -> Result<Imported, ToolError> {
    let Some(format) = format else {
        return Err(ToolError::Refused(
            "--pi none cannot be imported: import adds protection information, so choose type1, type3 or nvme64".into(),
        ));
    };
    let meta_path = store::meta_path(image_path, pi_meta);
    if metadata_present(&meta_path) {
        return Err(ToolError::Refused(format!(
            "{} already has PI metadata ({}); verify it with `guardblk scrub {}` instead, or delete the metadata to import again",
            image_path.display(),
            meta_path.display(),
            image_path.display()
        )));
    }
    let image = open_exclusive(image_path, "importing it")?;
    let size = image.size();
    if size % u64::from(interval) != 0 {
        return Err(ToolError::Refused(format!(
            "{} is {size} bytes, which is not a multiple of the {interval}-byte protection interval; use --interval 512 or resize the image",
            image_path.display()
        )));
    }
    let data = DataIdentity::of(image.path(), size)
        .map_err(io_error(format!("cannot examine {}", image_path.display())))?;
    let header = Header::new(format, interval, data);
    let is_device = std::fs::metadata(&meta_path)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false);
    PiMetadata::create(&meta_path, &header)?;
    let start = Instant::now();
    let result = (|| {
        let (store, _report) = open_store(&image, pi_meta)?;
        let mut progress = Progress::new("import");
        let step = u64::from(interval);
        let scanned = scan::import(&image, &store, |done, total| {
            progress.update(done * step, total * step)
        });
        progress.finish();
        scanned.map_err(io_error(format!("cannot import {}", image_path.display())))?;
        store
            .close_clean()
            .map_err(io_error(format!("cannot close {}", meta_path.display())))?;
        Ok(store.meta.blocks())
    })();
    match result {
        Ok(blocks) => Ok(Imported {
            image: image_path.into(),
            meta: meta_path,
            format,
            interval,
            blocks,
            size,
            elapsed: start.elapsed(),
        }),
        Err(e) => {
            if is_device {
                // Make the device unrecognisable as metadata again.
                if let Ok(f) = OpenOptions::new().write(true).open(&meta_path) {
                    let _ = f.write_all_at(&[0u8; 8], 0);
                    let _ = f.sync_data();
                }
            } else {
                let _ = std::fs::remove_file(&meta_path);
            }
            Err(e)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// scrub

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
pub fn scrub(image_path: &Path, pi_meta: Option<&Path>) -> Result<ScrubReport, ToolError> {
    let start = Instant::now();
    let image = open_exclusive(image_path, "scrubbing it")?;
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

// ---------------------------------------------------------------------------------------------
// info

/// The metadata as `info` found it.
#[derive(Debug)]
pub struct MetaInfo {
    pub header: Header,
    /// Bytes of the file or device.
    pub size: u64,
    /// Bytes actually allocated (files; equal to `size` for devices).
    pub allocated: u64,
}

/// A summary of the error journal.
#[derive(Debug)]
pub struct JournalSummary {
    pub path: PathBuf,
    pub records: Vec<Record>,
    /// Lines that did not parse (a torn last line after a crash).
    pub skipped: usize,
}

/// How many guard-error LBAs and recent records `info` lists.
const INFO_LBAS: usize = 20;
const INFO_RECENT: usize = 10;

impl JournalSummary {
    fn by_event(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for event in [Event::GuardError, Event::Recovered, Event::Injected] {
            counts.insert(event_name(event), 0);
        }
        for r in &self.records {
            *counts.entry(event_name(r.event)).or_insert(0) += 1;
        }
        counts
    }

    /// Distinct LBAs with guard errors: LBA → (kind → count).
    fn error_lbas(&self) -> BTreeMap<u64, BTreeMap<String, usize>> {
        let mut lbas: BTreeMap<u64, BTreeMap<String, usize>> = BTreeMap::new();
        for r in self.records.iter().filter(|r| r.event == Event::GuardError) {
            *lbas
                .entry(r.lba)
                .or_default()
                .entry(r.kind.clone().unwrap_or_else(|| "guard".into()))
                .or_insert(0) += 1;
        }
        lbas
    }

    /// The byte offset recorded for `lba`.
    fn byte_offset(&self, lba: u64) -> u64 {
        self.records
            .iter()
            .find(|r| r.lba == lba)
            .map_or(0, |r| r.byte_offset)
    }

    fn recent(&self) -> &[Record] {
        &self.records[self.records.len().saturating_sub(INFO_RECENT)..]
    }
}

/// What `info` shows.
#[derive(Debug)]
pub struct InfoReport {
    pub image: PathBuf,
    pub image_size: u64,
    pub meta_path: PathBuf,
    /// `None`: the image has no PI metadata.
    pub meta: Option<MetaInfo>,
    pub journal: JournalSummary,
    /// What the serving daemon last published (`IMAGE.pi-stats.json`), if any.
    pub daemon: Option<Value>,
}

fn record_line(r: &Record) -> String {
    let mut line = format!(
        "{} {} LBA {} (byte offset {})",
        r.time,
        event_name(r.event),
        r.lba,
        r.byte_offset
    );
    if let Some(kind) = &r.kind {
        let _ = write!(line, " {kind}");
    }
    match (&r.expected, &r.actual, r.event) {
        (Some(e), Some(a), Event::Injected) => {
            let _ = write!(line, " (was {e}, now {a})");
        }
        (Some(e), Some(a), _) => {
            let _ = write!(line, " expected {e} found {a}");
        }
        _ => {}
    }
    let _ = write!(line, " [{}]", r.source);
    line
}

fn state_text(state: VolumeState) -> &'static str {
    match state {
        VolumeState::Clean => "clean",
        VolumeState::InUse => "in use or not closed cleanly (a daemon is serving it, or the last one stopped without closing it: the next serve or scrub re-checks blocks whose writes were in flight)",
    }
}

impl InfoReport {
    pub fn text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "image:     {} ({} bytes, {})",
            self.image.display(),
            self.image_size,
            human(self.image_size)
        );
        match &self.meta {
            None => {
                let _ = writeln!(
                    out,
                    "PI:        none ({} does not exist): the image is served without guard tags; add them with `guardblk import {}`",
                    self.meta_path.display(),
                    self.image.display()
                );
            }
            Some(m) => {
                let h = &m.header;
                let _ = writeln!(
                    out,
                    "PI:        {}, {}-byte intervals, {} blocks, {}-byte tuples",
                    h.format,
                    h.interval,
                    h.blocks,
                    h.format.tuple_size()
                );
                if h.capacity_bytes() != self.image_size {
                    let _ = writeln!(
                        out,
                        "warning:   the metadata describes a {}-byte disk but the image is {} bytes; guardblk will refuse this pair",
                        h.capacity_bytes(),
                        self.image_size
                    );
                }
                let _ = writeln!(
                    out,
                    "metadata:  {} ({} bytes, {}; {} allocated)",
                    self.meta_path.display(),
                    m.size,
                    human(m.size),
                    human(m.allocated)
                );
                let _ = writeln!(
                    out,
                    "regions:   {} write-intent regions of {}",
                    h.regions(),
                    human(1 << h.region_shift)
                );
                let _ = writeln!(out, "uuid:      {}", h.uuid_string());
                let _ = writeln!(out, "state:     {}", state_text(h.state));
                let _ = writeln!(out, "created:   {}", unix_time(h.created_unix));
                let _ = writeln!(
                    out,
                    "data:      {} (device {}, inode {})",
                    h.data.path.display(),
                    h.data.device,
                    h.data.inode
                );
            }
        }
        let j = &self.journal;
        let counts = j
            .by_event()
            .iter()
            .map(|(e, n)| format!("{e} {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = write!(
            out,
            "journal:   {}: {} records ({counts})",
            j.path.display(),
            j.records.len()
        );
        if j.skipped > 0 {
            let _ = write!(out, ", {} unreadable lines skipped", j.skipped);
        }
        out.push('\n');
        let lbas = j.error_lbas();
        if !lbas.is_empty() {
            let _ = writeln!(out, "blocks with guard errors: {}", lbas.len());
            for (lba, kinds) in lbas.iter().take(INFO_LBAS) {
                let kinds = kinds
                    .iter()
                    .map(|(k, n)| format!("{k} x{n}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                let _ = writeln!(
                    out,
                    "  LBA {lba} (byte offset {}): {kinds}",
                    j.byte_offset(*lba)
                );
            }
            if lbas.len() > INFO_LBAS {
                let _ = writeln!(out, "  ... and {} more", lbas.len() - INFO_LBAS);
            }
        }
        if let Some(d) = &self.daemon {
            let c = &d["counters"];
            let n = |k: &str| c[k].as_u64().unwrap_or(0);
            let _ = writeln!(
                out,
                "daemon:    counters as of {} (pid {}, running since {}, {} sessions)",
                d["updated"].as_str().unwrap_or("?"),
                d["pid"],
                d["daemon_started"].as_str().unwrap_or("?"),
                d["sessions"]
            );
            let _ = writeln!(
                out,
                "  writes {}: {} zero-copy, {} bounced up front, {} rewritten after the guest changed them in flight ({} blocks)",
                n("writes"),
                n("writes_zero_copy"),
                n("writes_bounced"),
                n("writes_rewritten"),
                n("intervals_rewritten")
            );
            let _ = writeln!(
                out,
                "  reads {}: {} re-read after a failed check and healed, {} guard errors; {} bytes bounced",
                n("reads"),
                n("read_retries_healed"),
                n("guard_errors"),
                n("bytes_bounced")
            );
        }
        if !j.records.is_empty() {
            let _ = writeln!(out, "last {} records:", j.recent().len());
            for r in j.recent() {
                let _ = writeln!(out, "  {}", record_line(r));
            }
        }
        out.trim_end().to_string()
    }

    pub fn json(&self) -> Value {
        let pi = self.meta.as_ref().map(|m| {
            let h = &m.header;
            json!({
                "format": h.format.to_string(),
                "interval": h.interval,
                "blocks": h.blocks,
                "tuple_size": h.format.tuple_size(),
                "capacity": h.capacity_bytes(),
                "size_matches_image": h.capacity_bytes() == self.image_size,
                "metadata": {
                    "path": self.meta_path,
                    "size": m.size,
                    "allocated": m.allocated,
                },
                "region_size": 1u64 << h.region_shift,
                "regions": h.regions(),
                "uuid": h.uuid_string(),
                "state": match h.state {
                    VolumeState::Clean => "clean",
                    VolumeState::InUse => "in_use",
                },
                "created": unix_time(h.created_unix),
                "created_unix": h.created_unix,
                "data": {
                    "path": h.data.path,
                    "device": h.data.device,
                    "inode": h.data.inode,
                },
            })
        });
        let j = &self.journal;
        let lbas = j.error_lbas();
        let error_lbas: Vec<Value> = lbas
            .iter()
            .take(INFO_LBAS)
            .map(|(lba, kinds)| {
                json!({
                    "lba": lba,
                    "byte_offset": j.byte_offset(*lba),
                    "kinds": kinds,
                    "count": kinds.values().sum::<usize>(),
                })
            })
            .collect();
        json!({
            "image": { "path": self.image, "size": self.image_size },
            "metadata_path": self.meta_path,
            "pi": pi,
            "journal": {
                "path": j.path,
                "records": j.records.len(),
                "skipped": j.skipped,
                "by_event": j.by_event(),
                "guard_error_blocks": lbas.len(),
                "guard_error_lbas": error_lbas,
                "last": j.recent(),
            },
            "daemon": self.daemon,
        })
    }
}

/// The header, read without a lock; a checksum mismatch is re-read a few times, since a daemon
/// opening or closing the metadata may be rewriting the page at that moment.
fn read_header_settled(path: &Path) -> Result<Header, MetadataError> {
    let mut attempts = 0;
    loop {
        match PiMetadata::read_header(path) {
            Err(MetadataError::Corrupt { .. }) if attempts < 3 => {
                attempts += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            result => return result,
        }
    }
}

/// `guardblk info`: read-only and lock-free, so it works while a daemon serves the image.
pub fn info(image_path: &Path, pi_meta: Option<&Path>) -> Result<InfoReport, ToolError> {
    if !image_path.exists() {
        return Err(ImageError::Missing {
            path: image_path.into(),
        }
        .into());
    }
    let image_size = target_size(image_path)
        .map_err(io_error(format!("cannot examine {}", image_path.display())))?;
    let meta_path = store::meta_path(image_path, pi_meta);
    let meta = if meta_path.exists() {
        let header = read_header_settled(&meta_path)?;
        let examine = || format!("cannot examine {}", meta_path.display());
        let stat = std::fs::metadata(&meta_path).map_err(io_error(examine()))?;
        let size = target_size(&meta_path).map_err(io_error(examine()))?;
        let allocated = if stat.file_type().is_block_device() {
            size
        } else {
            stat.blocks() * 512
        };
        Some(MetaInfo {
            header,
            size,
            allocated,
        })
    } else {
        None
    };
    let journal_path = journal::default_path(image_path);
    let (records, skipped) = Journal::read(&journal_path)
        .map_err(io_error(format!("cannot read {}", journal_path.display())))?;
    // Published by a serving daemon after each session; absent if none ever served it.
    let daemon = std::fs::read_to_string(journal::stats_path(image_path))
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok());
    Ok(InfoReport {
        image: image_path.into(),
        image_size,
        meta_path,
        meta,
        daemon,
        journal: JournalSummary {
            path: journal_path,
            records,
            skipped,
        },
    })
}

// ---------------------------------------------------------------------------------------------
// inject

/// What `inject` did.
#[derive(Debug)]
pub struct Injected {
    pub image: PathBuf,
    pub lba: u64,
    pub byte_offset: u64,
    pub kind: InjectKind,
    /// The value before and after (a data byte, or the tuple field), in hex.
    pub before: String,
    pub after: String,
    /// For tuple kinds: the interval was unwritten and got its correct tuple first.
    pub generated: bool,
    /// For `data`: the byte offset (in the image) of the byte changed.
    pub data_byte: u64,
}

impl std::fmt::Display for Injected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            InjectKind::Data => write!(
                f,
                "corrupted the data of LBA {} (byte offset {}) of {}: the byte at offset {} changed from {} to {}",
                self.lba,
                self.byte_offset,
                self.image.display(),
                self.data_byte,
                self.before,
                self.after
            ),
            kind => write!(
                f,
                "corrupted the {kind} tag of LBA {} (byte offset {}) of {}: {} -> {}{}",
                self.lba,
                self.byte_offset,
                self.image.display(),
                self.before,
                self.after,
                if self.generated {
                    " (the block was unwritten, so its correct tuple was stored first)"
                } else {
                    ""
                }
            ),
        }
    }
}

/// Read one interval at `lba` (aligned for O_DIRECT).
fn read_interval(image: &Image, lba: u64, interval: u64) -> io::Result<AlignedBuf> {
    let mut buf = AlignedBuf::zeroed(interval as usize);
    reader::read_upto(
        image,
        &mut buf.as_mut_slice()[..interval as usize],
        lba * interval,
    )?;
    Ok(buf)
}

/// Flip every bit of the byte in the middle of interval `lba`; returns (before, after).
fn corrupt_data(image: &Image, lba: u64, interval: u64) -> io::Result<(u8, u8)> {
    let offset = lba * interval;
    let target = offset + interval / 2;
    let align = image
        .direct_io()
        .map_or(1, |a| a.offset.max(a.memory))
        .max(1);
    let start = offset - offset % align;
    let end = (offset + interval).div_ceil(align) * align;
    let before;
    if end <= image.size() {
        let len = (end - start) as usize;
        let mut window = AlignedBuf::zeroed(len);
        reader::read_upto(image, &mut window.as_mut_slice()[..len], start)?;
        let pos = (target - start) as usize;
        before = window.as_slice()[pos];
        window.as_mut_slice()[pos] = !before;
        image.write_at(&window.as_slice()[..len], start)?;
    } else {
        // The image's last bytes are not a whole O_DIRECT unit: write the byte buffered.
        let data = read_interval(image, lba, interval)?;
        before = data.as_slice()[(interval / 2) as usize];
        let file = OpenOptions::new().write(true).open(image.path())?;
        file.write_all_at(&[!before], target)?;
        file.sync_data()?;
    }
    image.sync()?;
    Ok((before, !before))
}

/// `guardblk inject`: corrupt one block on purpose and journal it.
pub fn inject(
    image_path: &Path,
    lba: u64,
    kind: InjectKind,
    pi_meta: Option<&Path>,
) -> Result<Injected, ToolError> {
    let image = open_exclusive(image_path, "injecting corruption")?;
    let (store, _report) = open_store(&image, pi_meta)?;
    let blocks = store.meta.blocks();
    let interval = u64::from(store.interval());
    if lba >= blocks {
        let _ = store.close_clean();
        return Err(ToolError::Refused(format!(
            "LBA {lba} is past the end of {}, which has {blocks} blocks of {interval} bytes (LBAs 0 to {})",
            image_path.display(),
            blocks - 1
        )));
    }
    let format = store.format();
    let what = format!("cannot corrupt LBA {lba} of {}", image_path.display());
    let mut generated = false;
    let (before, after) = match kind {
        InjectKind::Data => {
            let (b, a) = corrupt_data(&image, lba, interval).map_err(io_error(what.clone()))?;
            (format!("{b:#04x}"), format!("{a:#04x}"))
        }
        InjectKind::Guard | InjectKind::Ref | InjectKind::App => {
            let size = format.tuple_size();
            let mut raw = store.meta.raw_tuple(lba);
            if raw.iter().all(|&b| b == 0) {
                // Unwritten: corrupt the tuple the block would have, not "no tuple".
                let data = read_interval(&image, lba, interval).map_err(io_error(what.clone()))?;
                let guard = format.guard(&data.as_slice()[..interval as usize]);
                format.encode(&store.tuple_for(lba, guard), &mut raw[..size]);
                generated = true;
            }
            let mut tuple = format.decode(&raw);
            let (b, a) = match kind {
                InjectKind::Guard => {
                    let b = tuple.guard;
                    tuple.guard ^= 0x0001;
                    (b, tuple.guard)
                }
                InjectKind::Ref => {
                    let b = tuple.reference;
                    tuple.reference ^= 1;
                    (b, tuple.reference)
                }
                _ => {
                    let b = tuple.app;
                    // Never the 0xFFFF escape, which would switch checking off.
                    let flip = if b ^ 0x0101 == 0xFFFF { 0x0202 } else { 0x0101 };
                    tuple.app ^= flip;
                    (u64::from(b), u64::from(tuple.app))
                }
            };
            format.encode(&tuple, &mut raw[..size]);
            store.meta.set_raw_tuple(lba, &raw);
            store.meta.sync().map_err(io_error(what.clone()))?;
            (format!("{b:#x}"), format!("{a:#x}"))
        }
    };
    let mut record = Record::now(Event::Injected, lba, store.interval(), "inject");
    record.kind = Some(kind.to_string());
    record.expected = Some(before.clone());
    record.actual = Some(after.clone());
    store.journal.append(&record);
    store.close_clean().map_err(io_error(format!(
        "cannot close {}",
        store.meta.path().display()
    )))?;
    Ok(Injected {
        image: image_path.into(),
        lba,
        byte_offset: lba * interval,
        kind,
        before,
        after,
        generated,
        data_byte: lba * interval + interval / 2,
    })
}

// ---------------------------------------------------------------------------------------------
// serve

/// `guardblk serve`: create the default image if needed (with PI, like `create`), open image
/// and PI metadata, print how to attach, and serve until SIGINT/SIGTERM.
pub fn serve(args: &cli::ServeArgs) -> Result<(), ToolError> {
    let image_path = args.image_path();
    if args.image.is_none() && !image_path.exists() {
        let size = cli::parse_size(DEFAULT_IMAGE_SIZE).expect("default size parses");
        let created = create(
            &image_path,
            size,
            Some(PiFormat::Type1),
            4096,
            args.pi_meta.as_deref(),
        )?;
        println!("default image: {created}");
    }
    let image = Image::open(&image_path, args.read_only)?;
    let pi = open_pi(&image, args.pi_meta.as_deref())?;
    let config = args.to_config(image.preferred_engine())?;
    println!(
        "serving {} on {}\nattach a guest with:\n{}",
        image_path.display(),
        config.socket.display(),
        cli::qemu_command_line(&config)
    );
    crate::daemon::serve(image, pi, &config)?;
    Ok(())
}

/// The image's PI metadata, if it has any: opened, checked against the image, and recovered
/// after an unclean shutdown. An explicit `--pi-meta` that does not exist is an error.
pub fn open_pi(image: &Image, pi_meta: Option<&Path>) -> Result<Option<Arc<PiStore>>, ToolError> {
    let meta_path = store::meta_path(image.path(), pi_meta);
    if pi_meta.is_none() && !meta_path.exists() {
        tracing::warn!(
            image = %image.path().display(),
            "no PI metadata ({} missing): serving without guard tags; `guardblk import` adds them",
            meta_path.display()
        );
        return Ok(None);
    }
    let (store, report) = PiStore::open_beside(image, pi_meta, !image.read_only())?;
    if report.rebound {
        tracing::info!(
            meta = %meta_path.display(),
            "the image was moved or copied since its PI metadata last saw it; a sample of blocks verified, so the pair is accepted"
        );
    }
    if report.dirty_regions > 0 {
        tracing::warn!(
            regions = report.dirty_regions,
            recovered = report.recovered,
            "PI metadata was not closed cleanly; regions with writes in flight were re-checked"
        );
    }
    Ok(Some(Arc::new(store)))
}
