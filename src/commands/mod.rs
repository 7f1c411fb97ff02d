//! The commands behind the command line: `create`, `import`, `scrub`, `info`, `inject`, `stats`
//! and the set-up of `serve`, one module each. Each returns a report (text and, where asked for, JSON
//! rendering) or a [`ToolError`] whose message is one sentence; `main.rs` prints them.
//!
//! LBAs are in protection-interval units everywhere; reports give the byte offset too.

use std::io::{self, IsTerminal};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::time::{Duration, Instant, UNIX_EPOCH};

use thiserror::Error;

use crate::cli::CliError;
use crate::daemon::DaemonError;
use crate::integrity::journal::Event;
use crate::integrity::metadata::Header;
use crate::integrity::store::PiStore;
use crate::integrity::{recovery, MetadataError, PiMetadata};
use crate::storage::rbd::{CephOptions, RbdError, RbdImage, RbdSpec};
use crate::storage::{files, Image, ImageError};

mod create;
mod import;
mod info;
mod inject;
mod scrub;
mod serve;
mod stats;

pub use create::{create, Created};
pub use import::{import, Imported};
pub use info::{info, info_rbd, is_rbd_target, InfoReport, RbdInfoReport};
pub use inject::{inject, Injected};
pub use scrub::{scrub, ScrubReport};
pub use serve::{open_pi, serve, ServeRequest};
pub use stats::{fetch as fetch_stats, render as render_stats, watch as watch_stats, StatsSource};

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
    #[error(transparent)]
    Rbd(#[from] crate::storage::rbd::RbdError),
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

/// The RBD image a command-line target names (`rbd:POOL/IMAGE`), checked; `None` for a path.
fn rbd_target(target: &Path) -> Option<Result<RbdSpec, ToolError>> {
    let spec = RbdSpec::parse(target.to_str()?)?;
    Some(spec.map_err(ToolError::from))
}

/// Open `path` (or an `rbd:` image) for exclusive use by a tool; a daemon serving a file
/// or an `rbd:` image (its exclusive lock) is reported in one sentence.
fn open_exclusive(path: &Path, ceph: &CephOptions, doing: &str) -> Result<Image, ToolError> {
    if let Some(spec) = rbd_target(path) {
        return Image::open_rbd(&spec?, ceph, false).map_err(|e| match e {
            ImageError::Rbd(RbdError::Locked { spec }) => ToolError::Refused(format!(
                "{spec} is in use by another Ceph client, such as a guardblk serving it (it holds the image's exclusive lock); stop it before {doing}"
            )),
            e => e.into(),
        });
    }
    Image::open(path, false).map_err(|e| match e {
        ImageError::Locked { path } => ToolError::Refused(format!(
            "{} is being served by a running guardblk (it holds the image lock); stop the daemon before {doing}",
            path.display()
        )),
        e => e.into(),
    })
}

/// Create fresh PI metadata at `meta_path`: a file or device, or an RBD image when it is named
/// `rbd:POOL/IMAGE` (beside an `rbd:` data image).
fn create_metadata(meta_path: &Path, header: &Header, ceph: &CephOptions) -> Result<(), ToolError> {
    match rbd_target(meta_path) {
        Some(spec) => Ok(PiMetadata::create_rbd(&spec?, ceph, header)?),
        None => Ok(PiMetadata::create(meta_path, header)?),
    }
}

/// Whether PI metadata is already at `meta_path` (a block device counts only if it holds a
/// valid header: a fresh device is a legitimate target; an RBD image counts if it exists).
fn metadata_present(meta_path: &Path, ceph: &CephOptions) -> bool {
    if let Some(spec) = rbd_target(meta_path) {
        return spec.is_ok_and(|spec| RbdImage::open(&spec, ceph, true).is_ok());
    }
    match std::fs::metadata(meta_path) {
        Ok(m) if m.file_type().is_block_device() => PiMetadata::read_header(meta_path).is_ok(),
        Ok(_) => true,
        Err(_) => false,
    }
}

/// Undo [`create_metadata`] after a later step failed: remove the file or RBD image, or make
/// a block device unrecognisable as metadata again.
fn remove_metadata(meta_path: &Path, ceph: &CephOptions) {
    if let Some(spec) = rbd_target(meta_path) {
        if let Ok(spec) = spec {
            let _ = RbdImage::remove(&spec, ceph);
        }
        return;
    }
    let is_device = std::fs::metadata(meta_path).is_ok_and(|m| m.file_type().is_block_device());
    if is_device {
        if let Ok(f) = std::fs::OpenOptions::new().write(true).open(meta_path) {
            let _ = std::os::unix::fs::FileExt::write_all_at(&f, &[0u8; 8], 0);
            let _ = f.sync_data();
        }
    } else {
        let _ = std::fs::remove_file(meta_path);
    }
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
    files::size(&std::fs::File::open(path)?)
}
