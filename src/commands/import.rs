//! `guardblk import`: PI metadata for an existing raw image, every tuple generated from its data.

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::integrity::metadata::{DataIdentity, Header};
use crate::integrity::store;
use crate::integrity::{scan, PiFormat, PiMetadata};

use super::{human, io_error, open_exclusive, open_store, rate_mb_s, Progress, ToolError};

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
