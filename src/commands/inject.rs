//! `guardblk inject`: corrupt one interval on purpose (data or tuple), to test detection.

use std::path::{Path, PathBuf};

use crate::integrity::corruption::{self, Corrupted, Corruption};
use crate::integrity::journal::{Event, Record};

use super::{io_error, open_exclusive, open_store, ToolError};
use crate::storage::rbd::CephOptions;

/// What `inject` did.
#[derive(Debug)]
pub struct Injected {
    pub image: PathBuf,
    pub lba: u64,
    pub byte_offset: u64,
    pub kind: Corruption,
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
            Corruption::Data => write!(
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

/// `guardblk inject`: corrupt one block on purpose and journal it.
pub fn inject(
    image_path: &Path,
    lba: u64,
    kind: Corruption,
    pi_meta: Option<&Path>,
    ceph: &CephOptions,
) -> Result<Injected, ToolError> {
    let image = open_exclusive(image_path, ceph, "injecting corruption")?;
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
    let what = format!("cannot corrupt LBA {lba} of {}", image_path.display());
    let Corrupted {
        before,
        after,
        generated,
    } = corruption::corrupt(&image, &store, lba, kind).map_err(io_error(what))?;
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
