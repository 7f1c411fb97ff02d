//! Whole-disk passes over data and tuples, outside the data path: scrub (verify everything),
//! import (generate tuples for an existing raw image), crash recovery (re-derive tuples in
//! regions with write intents) and the pairing sample (does this metadata describe this data?).
//!
//! Data is read synchronously in aligned chunks. Holes in a sparse image read as zeros, so they
//! are checked against the tuples without reading them.

use std::io;

use super::journal::{Event, Record};
use super::metadata::PiMetadata;
use super::pi::PiError;
use super::store::{is_zero, PiStore};
use crate::storage::{AlignedBuf, Image};

/// Bytes read per synchronous request.
const CHUNK: usize = 1 << 20;
/// How many written blocks the pairing check verifies.
const PAIRING_SAMPLES: usize = 16;
/// How many tuples the pairing check looks at, at most, to find them.
const PAIRING_PROBES: u64 = 1 << 20;

/// A region of the disk in intervals: [first, first + count).
#[derive(Debug, Clone, Copy)]
struct Extent {
    first: u64,
    count: u64,
    /// Known to be a hole: reads as zeros without reading.
    hole: bool,
}

/// Split [first, first+count) into allocated and hole extents of the image.
fn extents(image: &Image, interval: u64, first: u64, count: u64) -> Vec<Extent> {
    let end = first + count;
    let mut out = Vec::new();
    let mut lba = first;
    while lba < end {
        let data = image
            .next_data(lba * interval)
            .map_or(end, |d| (d / interval).clamp(lba, end));
        if data > lba {
            out.push(Extent {
                first: lba,
                count: data - lba,
                hole: true,
            });
        }
        if data >= end {
            break;
        }
        let hole = image.next_hole(data * interval).div_ceil(interval).min(end);
        let hole = hole.max(data + 1);
        out.push(Extent {
            first: data,
            count: hole - data,
            hole: false,
        });
        lba = hole;
    }
    out
}

/// Read `count` intervals from `first` in chunks, calling `each(lba, data)` per interval.
fn for_each_interval(
    image: &Image,
    interval: u64,
    extent: Extent,
    buf: &mut AlignedBuf,
    mut each: impl FnMut(u64, &[u8]),
) -> io::Result<()> {
    let per_chunk = CHUNK as u64 / interval;
    let mut lba = extent.first;
    let end = extent.first + extent.count;
    while lba < end {
        let n = per_chunk.min(end - lba);
        let len = (n * interval) as usize;
        if extent.hole {
            buf.as_mut_slice()[..interval as usize].fill(0);
            for i in 0..n {
                each(lba + i, &buf.as_slice()[..interval as usize]);
            }
        } else {
            read_upto(image, &mut buf.as_mut_slice()[..len], lba * interval)?;
            for (i, data) in buf.as_slice()[..len]
                .chunks_exact(interval as usize)
                .enumerate()
            {
                each(lba + i as u64, data);
            }
        }
        lba += n;
    }
    Ok(())
}

/// Read into `buf` at `offset`; a length that is not a multiple of the O_DIRECT alignment
/// (the image's last bytes) is read through a rounded-up window.
pub fn read_upto(image: &Image, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let align = image.direct_io().map_or(1, |a| a.offset.max(a.memory)) as usize;
    if buf.len().is_multiple_of(align) && offset.is_multiple_of(align as u64) {
        return image.read_at(buf, offset);
    }
    let start = offset - offset % align as u64;
    let end = (offset + buf.len() as u64).div_ceil(align as u64) * align as u64;
    let mut window = AlignedBuf::zeroed((end - start) as usize);
    let valid = (image.size().min(end) - start) as usize;
    let mut done = 0;
    while done < valid {
        // Read aligned pieces; the final one may be short at the end of the image.
        let piece = &mut window.as_mut_slice()[done..];
        match std::os::unix::fs::FileExt::read_at(image_file(image), piece, start + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let skip = (offset - start) as usize;
    buf.copy_from_slice(&window.as_slice()[skip..skip + buf.len()]);
    Ok(())
}

fn image_file(image: &Image) -> &std::fs::File {
    image.file()
}

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
