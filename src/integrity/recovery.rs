//! Opening a PI store and making it trustworthy: the pairing check (does this metadata
//! describe this data?) and crash recovery (re-derive the tuples of regions with write
//! intents). Depends on the store; the store does not depend on it.

use std::io;
use std::path::{Path, PathBuf};

use super::journal::{self, Event, Journal, Record};
use super::metadata::{DataIdentity, MetadataError, PiMetadata};
use super::reader::{extents, for_each_interval, is_zero, read_upto, Extent, CHUNK};
use super::store::{meta_path, PiStore};
use crate::storage::image::Backing;
use crate::storage::rbd::RbdSpec;
use crate::storage::{AlignedBuf, Image};

/// How many written blocks the pairing check verifies.
const PAIRING_SAMPLES: usize = 16;
/// How many tuples the pairing check looks at, at most, to find them.
const PAIRING_PROBES: u64 = 1 << 20;

/// What opening found and did, for the caller to log.
#[derive(Debug, Default)]
pub struct OpenReport {
    /// Regions with write intents found (the previous run did not close cleanly).
    pub dirty_regions: usize,
    /// Tuples re-derived from data in those regions.
    pub recovered: u64,
    /// The image was moved or copied since the metadata last saw it (pairing re-checked).
    pub rebound: bool,
}

impl PiStore {
    /// Open the metadata for `image` and check the pair: size, identity (a moved or copied
    /// image must still verify on a sample of written blocks) and, for a writable open after
    /// an unclean shutdown, recovery of every region with a write intent.
    pub fn open(
        image: &Image,
        meta_path: &Path,
        journal_path: PathBuf,
        writable: bool,
    ) -> Result<(PiStore, OpenReport), MetadataError> {
        let io_err = |source| MetadataError::Io {
            path: meta_path.into(),
            source,
        };
        let data = DataIdentity::of_image(image).map_err(io_err)?;
        let mut meta = open_metadata(image, meta_path, &data, writable)?;
        let mut writable = writable;
        if !writable && !meta.dirty_regions().is_empty() {
            // Not closed cleanly: a read-only user would see false guard errors where writes
            // were in flight. Recovery only writes metadata, so do it if we may.
            drop(meta);
            meta = open_metadata(image, meta_path, &data, true).map_err(|e| match e {
                MetadataError::Open { source, .. } => MetadataError::NeedsRecovery {
                    path: meta_path.into(),
                    source,
                },
                other => other,
            })?;
            writable = true;
        }
        let mut report = OpenReport::default();
        let zero_guard = meta.format().guard(&vec![0u8; meta.interval() as usize]);
        if meta.identity_differs(&data) {
            let (sampled, failed) = pairing_sample(image, &meta, zero_guard);
            if sampled > 0 && failed == sampled {
                return Err(MetadataError::NotPaired {
                    meta: meta_path.into(),
                    data: image.path().into(),
                    sampled,
                });
            }
            if writable {
                meta.rebind(&data).map_err(io_err)?;
            }
            report.rebound = true;
        }
        let store = PiStore::new(meta, Journal::new(journal_path), zero_guard);
        if writable {
            let dirty = store.meta.dirty_regions();
            report.dirty_regions = dirty.len();
            if !dirty.is_empty() {
                report.recovered = recover(image, &store, &dirty).map_err(io_err)?;
            }
        }
        Ok((store, report))
    }

    /// Open with the default journal path beside the image.
    pub fn open_beside(
        image: &Image,
        pi_meta: Option<&Path>,
        writable: bool,
    ) -> Result<(PiStore, OpenReport), MetadataError> {
        let meta = meta_path(image.path(), pi_meta);
        let journal = journal::default_path(&image.state_base());
        if matches!(image.backing(), Backing::Rbd(_)) {
            // This host's files about an RBD image live under --rbd-state-dir, which may
            // not exist yet.
            if let Some(dir) = journal.parent() {
                std::fs::create_dir_all(dir).map_err(|source| MetadataError::StateDir {
                    path: dir.into(),
                    source,
                })?;
            }
        }
        PiStore::open(image, &meta, journal, writable)
    }
}

/// The metadata at `meta_path`: an RBD image when it is named `rbd:POOL/IMAGE` (beside an
/// `rbd:` data image, and reached the same way), else a file or block device.
fn open_metadata(
    image: &Image,
    meta_path: &Path,
    data: &DataIdentity,
    writable: bool,
) -> Result<PiMetadata, MetadataError> {
    let Some(spec) = meta_path.to_str().and_then(RbdSpec::parse) else {
        return PiMetadata::open(meta_path, data, writable);
    };
    let spec = spec.map_err(|e| MetadataError::Rbd(Box::new(e)))?;
    match image.backing() {
        Backing::Rbd(rbd) => PiMetadata::open_rbd(&spec, rbd.options(), data, writable),
        Backing::File(_) => Err(MetadataError::Open {
            path: meta_path.into(),
            source: io::Error::other("PI metadata in an RBD image belongs beside an rbd: image"),
        }),
    }
}

/// Crash recovery: in each region with a write intent, re-derive the tuple of every interval
/// whose data does not verify, and journal it. Then clear all intents. Returns how many
/// tuples were re-derived.
pub fn recover(image: &Image, store: &PiStore, dirty: &[u64]) -> io::Result<u64> {
    let interval = u64::from(store.interval());
    let mut buf = AlignedBuf::zeroed(CHUNK);
    let mut recovered = 0u64;
    for &region in dirty {
        let (first, count) = store.meta.region_blocks(region);
        let extent = Extent {
            first,
            count,
            hole: false,
        };
        let mut fixed = Vec::new();
        for_each_interval(image, interval, extent, &mut buf, |lba, data| {
            if let Err(e) = store.check(lba, data) {
                store.store_generated(lba, data);
                fixed.push((lba, e));
            }
        })?;
        for (lba, e) in fixed {
            recovered += 1;
            tracing::info!(lba, kind = %e.kind, "re-derived the tuple of a block written when the daemon stopped");
            store.journal.append(
                &Record::now(Event::Recovered, lba, store.interval(), "recovery")
                    .with_mismatch(e.kind, e.expected, e.actual),
            );
        }
    }
    store.meta.sync()?;
    image.sync()?;
    store.meta.clear_all_intents()?;
    Ok(recovered)
}

/// Verify up to [`PAIRING_SAMPLES`] written blocks; returns (sampled, failed).
pub fn pairing_sample(image: &Image, meta: &PiMetadata, zero_guard: u64) -> (usize, usize) {
    let interval = u64::from(meta.interval());
    let mut sampled = 0;
    let mut failed = 0;
    let mut probes = 0u64;
    let align = image
        .direct_io()
        .map_or(interval, |a| a.offset.max(a.memory).max(interval));
    let mut window = AlignedBuf::zeroed(align as usize);
    'extents: for extent in extents(image, interval, 0, meta.blocks()) {
        if extent.hole {
            continue;
        }
        for lba in extent.first..extent.first + extent.count {
            probes += 1;
            if probes > PAIRING_PROBES || sampled == PAIRING_SAMPLES {
                break 'extents;
            }
            let Some(tuple) = meta.tuple(lba) else {
                continue;
            };
            let offset = lba * interval;
            let start = offset - offset % align;
            if read_upto(image, window.as_mut_slice(), start).is_err() {
                continue;
            }
            let skip = (offset - start) as usize;
            let data = &window.as_slice()[skip..skip + interval as usize];
            sampled += 1;
            let ok = if is_zero(data) && tuple.guard == zero_guard {
                true
            } else {
                meta.format()
                    .verify(data, &tuple, lba, Some(super::metadata::APP_TAG))
                    .is_ok()
            };
            if !ok {
                failed += 1;
            }
        }
    }
    (sampled, failed)
}
