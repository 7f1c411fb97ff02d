//! Deliberate corruption of one protection interval, to test detection end to end
//! (`guardblk inject`): the data itself, or one field of its stored tuple. Beside the PI
//! formats because what "corrupt the guard / reference / application tag" means is theirs.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileExt;

use super::reader;
use super::store::PiStore;
use crate::storage::{AlignedBuf, Image};

/// What to corrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Corruption {
    /// Flip the bits of one byte in the middle of the block's data.
    Data,
    /// Flip low bits of the stored guard tag (the checksum).
    Guard,
    /// Flip the lowest bit of the stored reference tag (the block's address).
    Ref,
    /// Flip bits of the stored application tag (never into the 0xFFFF escape).
    App,
}

impl std::fmt::Display for Corruption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Corruption::Data => "data",
            Corruption::Guard => "guard",
            Corruption::Ref => "ref",
            Corruption::App => "app",
        })
    }
}

/// What [`corrupt`] changed.
#[derive(Debug)]
pub struct Corrupted {
    /// The value before and after (a data byte, or the tuple field), in hex.
    pub before: String,
    pub after: String,
    /// For tuple kinds: the interval was unwritten and got its correct tuple first.
    pub generated: bool,
}

/// Corrupt interval `lba` (which must exist) of `image` as `kind` says, durably: the data
/// through the image, a tuple through the metadata (synced). Journaling is the caller's.
pub fn corrupt(
    image: &Image,
    store: &PiStore,
    lba: u64,
    kind: Corruption,
) -> io::Result<Corrupted> {
    let interval = u64::from(store.interval());
    let format = store.format();
    let mut generated = false;
    let (before, after) = match kind {
        Corruption::Data => {
            let (b, a) = corrupt_data(image, lba, interval)?;
            (format!("{b:#04x}"), format!("{a:#04x}"))
        }
        Corruption::Guard | Corruption::Ref | Corruption::App => {
            let size = format.tuple_size();
            let mut raw = store.meta.raw_tuple(lba);
            if raw.iter().all(|&b| b == 0) {
                // Unwritten: corrupt the tuple the block would have, not "no tuple".
                let data = read_interval(image, lba, interval)?;
                let guard = format.guard(&data.as_slice()[..interval as usize]);
                format.encode(&store.tuple_for(lba, guard), &mut raw[..size]);
                generated = true;
            }
            let mut tuple = format.decode(&raw);
            let (b, a) = match kind {
                Corruption::Guard => {
                    let b = tuple.guard;
                    tuple.guard ^= 0x0001;
                    (b, tuple.guard)
                }
                Corruption::Ref => {
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
            store.meta.sync()?;
            (format!("{b:#x}"), format!("{a:#x}"))
        }
    };
    Ok(Corrupted {
        before,
        after,
        generated,
    })
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
