//! Reading the image outside the data path, for whole-disk passes and recovery: its data
//! and hole extents, intervals in aligned chunks, and reads of any length at the end of the
//! image. Holes read as zeros without being read.

use std::io;

use crate::storage::{AlignedBuf, Image};

/// Bytes read per synchronous request.
pub(super) const CHUNK: usize = 1 << 20;

/// A region of the disk in intervals: [first, first + count).
#[derive(Debug, Clone, Copy)]
pub(super) struct Extent {
    pub(super) first: u64,
    pub(super) count: u64,
    /// Known to be a hole: reads as zeros without reading.
    pub(super) hole: bool,
}

/// Split [first, first+count) into allocated and hole extents of the image.
pub(super) fn extents(image: &Image, interval: u64, first: u64, count: u64) -> Vec<Extent> {
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
pub(super) fn for_each_interval(
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
        match image.read_some_at(piece, start + done as u64) {
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

/// Whether every byte is zero (word at a time; the compiler vectorises the loop).
pub fn is_zero(data: &[u8]) -> bool {
    // SAFETY: u64 has no invalid bit patterns; align_to yields only in-bounds, aligned words.
    let (head, words, tail) = unsafe { data.align_to::<u64>() };
    head.iter().all(|&b| b == 0)
        && tail.iter().all(|&b| b == 0)
        && words.iter().fold(0u64, |acc, &w| acc | w) == 0
}
