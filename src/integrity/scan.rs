//! Whole-disk passes over data and tuples, outside the data path: scrub (verify everything)
//! and import (generate tuples for an existing raw image).
//!
//! Data is read synchronously in aligned chunks (see `reader`). Holes in a sparse image read as
//! zeros, so they are checked against the tuples without reading them.

use std::io;

use super::pi::PiError;
use super::reader::{extents, for_each_interval, Extent, CHUNK};
use super::store::PiStore;
use crate::storage::{AlignedBuf, Image};

/// Verify every interval; report and return each failure (LBA order).
pub fn scrub(
    image: &Image,
    store: &PiStore,
    mut progress: impl FnMut(u64, u64),
) -> io::Result<Vec<(u64, PiError)>> {
    let interval = u64::from(store.interval());
    let blocks = store.meta.blocks();
    let mut failures = Vec::new();
    let mut buf = AlignedBuf::zeroed(CHUNK);
    let mut done = 0;
    for extent in extents(image, interval, 0, blocks) {
        if extent.hole {
            for lba in extent.first..extent.first + extent.count {
                if store.meta.tuple(lba).is_some() {
                    if let Err(e) = store.check(lba, &vec![0u8; interval as usize]) {
                        failures.push((lba, e));
                    }
                }
            }
        } else {
            for_each_interval(image, interval, extent, &mut buf, |lba, data| {
                if let Err(e) = store.check(lba, data) {
                    failures.push((lba, e));
                }
            })?;
        }
        done += extent.count;
        progress(done, blocks);
    }
    failures.sort_by_key(|&(lba, _)| lba);
    for (lba, e) in &failures {
        store.report(*lba, e, "scrub");
    }
    Ok(failures)
}

/// Generate a tuple for every interval of the image (all tuples must be unwritten before).
pub fn import(
    image: &Image,
    store: &PiStore,
    mut progress: impl FnMut(u64, u64),
) -> io::Result<()> {
    let interval = u64::from(store.interval());
    let blocks = store.meta.blocks();
    let mut buf = AlignedBuf::zeroed(CHUNK);
    let mut done = 0;
    for extent in extents(image, interval, 0, blocks) {
        if !extent.hole {
            let per_chunk = CHUNK as u64 / interval;
            let mut first = extent.first;
            while first < extent.first + extent.count {
                let n = per_chunk.min(extent.first + extent.count - first);
                let piece = Extent {
                    first,
                    count: n,
                    hole: false,
                };
                for_each_interval(image, interval, piece, &mut buf, |lba, data| {
                    store.store_generated(lba, data)
                })?;
                first += n;
                progress(done + (first - extent.first), blocks);
            }
        }
        done += extent.count;
        progress(done, blocks);
    }
    store.meta.sync()
}
