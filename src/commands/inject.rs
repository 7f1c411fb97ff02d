//! `guardblk inject`: corrupt one interval on purpose (data or tuple), to test detection.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::cli::InjectKind;
use crate::integrity::journal::{Event, Record};
use crate::integrity::reader;
use crate::storage::{AlignedBuf, Image};

use super::{io_error, open_exclusive, open_store, ToolError};

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
