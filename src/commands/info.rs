//! `guardblk info`: what an image's PI metadata and journal say, without changing them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use crate::integrity::journal::{self, Event, Journal, Record};
use crate::integrity::metadata::{Header, VolumeState};
use crate::integrity::store;
use crate::integrity::{MetadataError, PiMetadata};
use crate::storage::rbd::{CephOptions, RbdError, RbdImage, RbdSpec};
use crate::storage::ImageError;
use crate::telemetry::DaemonStats;

use super::{event_name, human, io_error, target_size, unix_time, ToolError};

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
    pub daemon: Option<DaemonStats>,
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
            let c = &d.counters;
            let _ = writeln!(
                out,
                "daemon:    counters as of {} (pid {}, running since {}, {} sessions)",
                d.updated, d.pid, d.daemon_started, d.sessions
            );
            let _ = writeln!(
                out,
                "  writes {}: {} zero-copy, {} bounced up front, {} rewritten after the guest changed them in flight ({} blocks)",
                c.writes, c.writes_zero_copy, c.writes_bounced, c.writes_rewritten, c.intervals_rewritten
            );
            let _ = writeln!(
                out,
                "  reads {}: {} re-read after a failed check and healed, {} guard errors; {} bytes bounced",
                c.reads, c.read_retries_healed, c.guard_errors, c.bytes_bounced
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
    let meta = file_meta_info(&meta_path)?;
    report(image_path, image_size, meta_path, meta, image_path)
}

/// The metadata file or device at `meta_path`, if there is one.
fn file_meta_info(meta_path: &Path) -> Result<Option<MetaInfo>, ToolError> {
    if !meta_path.exists() {
        return Ok(None);
    }
    let header = read_header_settled(meta_path)?;
    let examine = || format!("cannot examine {}", meta_path.display());
    let stat = std::fs::metadata(meta_path).map_err(io_error(examine()))?;
    let size = target_size(meta_path).map_err(io_error(examine()))?;
    let allocated = if stat.file_type().is_block_device() {
        size
    } else {
        stat.blocks() * 512
    };
    Ok(Some(MetaInfo {
        header,
        size,
        allocated,
    }))
}

/// The report, with the journal and the daemon's last statistics read from beside
/// `state_base` (the image path, or an RBD image's place under --rbd-state-dir).
fn report(
    image: &Path,
    image_size: u64,
    meta_path: PathBuf,
    meta: Option<MetaInfo>,
    state_base: &Path,
) -> Result<InfoReport, ToolError> {
    let journal_path = journal::default_path(state_base);
    let (records, skipped) = Journal::read(&journal_path)
        .map_err(io_error(format!("cannot read {}", journal_path.display())))?;
    // Published by a serving daemon when sessions start and end; absent if none ever served
    // it (or one too old to be read).
    let daemon = std::fs::read_to_string(journal::stats_path(state_base))
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok());
    Ok(InfoReport {
        image: image.into(),
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

/// `guardblk info rbd:POOL/IMAGE`: the image as Ceph reports it, and its PI as for a file.
#[derive(Debug)]
pub struct RbdInfoReport {
    pub spec: RbdSpec,
    pub conf: Option<PathBuf>,
    pub id: String,
    pub report: InfoReport,
}

impl RbdInfoReport {
    pub fn text(&self) -> String {
        let conf = self.conf.as_ref().map_or_else(
            || "librados's default configuration".to_string(),
            |p| p.display().to_string(),
        );
        format!(
            "ceph:      pool {}, image {} ({conf}, client.{})\n{}",
            self.spec.pool,
            self.spec.image,
            self.id,
            self.report.text()
        )
    }

    pub fn json(&self) -> Value {
        let mut doc = self.report.json();
        doc["kind"] = json!("rbd");
        doc["ceph"] = json!({
            "pool": self.spec.pool,
            "image": self.spec.image,
            "conf": self.conf.as_ref().map(|p| p.display().to_string()),
            "id": self.id,
        });
        doc
    }
}

/// Whether a command-line target names an RBD image (`rbd:...`) rather than a path.
pub fn is_rbd_target(target: &Path) -> bool {
    target.to_str().is_some_and(|t| t.starts_with("rbd:"))
}

/// Describe an RBD image: connect, open it and its PI metadata (the RBD image IMAGE.pi, or
/// `pi_meta`) read-only, and read the journal and statistics this host keeps for it.
pub fn info_rbd(
    target: &Path,
    pi_meta: Option<&Path>,
    options: &CephOptions,
) -> Result<RbdInfoReport, ToolError> {
    let text = target.to_str().unwrap_or_default();
    let spec = RbdSpec::parse(text).unwrap_or_else(|| Err(RbdError::BadSpec(text.to_string())))?;
    let image = RbdImage::open(&spec, options, true)?;
    let meta_path = store::meta_path(target, pi_meta);
    let meta = match meta_path.to_str().and_then(RbdSpec::parse) {
        None => file_meta_info(&meta_path)?,
        Some(meta_spec) => match PiMetadata::read_header_rbd(&meta_spec?, options) {
            Ok((header, size)) => Some(MetaInfo {
                header,
                size,
                allocated: size,
            }),
            Err(MetadataError::Missing { .. }) => None,
            Err(e) => return Err(e.into()),
        },
    };
    let state_base = options.state_dir.join(&spec.pool).join(&spec.image);
    let report = report(target, image.size(), meta_path, meta, &state_base)?;
    Ok(RbdInfoReport {
        spec,
        conf: options.conf.clone(),
        id: options.id.clone(),
        report,
    })
}
