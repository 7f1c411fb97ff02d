//! `guardblk import`: PI metadata for an existing raw image, every tuple generated from its data.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::integrity::metadata::{DataIdentity, Header};
use crate::integrity::store;
use crate::integrity::{scan, PiFormat};

use super::{
    create_metadata, human, io_error, metadata_present, open_exclusive, open_store, rate_mb_s,
    remove_metadata, Progress, ToolError,
};
use crate::storage::rbd::CephOptions;

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

/// `guardblk import`: create PI metadata for an existing raw image and generate a tuple for
/// every interval of it. On failure the half-made metadata is removed.
pub fn import(
    image_path: &Path,
    format: Option<PiFormat>,
    interval: u32,
    pi_meta: Option<&Path>,
    ceph: &CephOptions,
) -> Result<Imported, ToolError> {
    let Some(format) = format else {
        return Err(ToolError::Refused(
            "--pi none cannot be imported: import adds protection information, so choose type1, type3 or nvme64".into(),
        ));
    };
    let meta_path = store::meta_path(image_path, pi_meta);
    if metadata_present(&meta_path, ceph) {
        return Err(ToolError::Refused(format!(
            "{} already has PI metadata ({}); verify it with `guardblk scrub {}` instead, or delete the metadata to import again",
            image_path.display(),
            meta_path.display(),
            image_path.display()
        )));
    }
    let image = open_exclusive(image_path, ceph, "importing it")?;
    let size = image.size();
    if size % u64::from(interval) != 0 {
        return Err(ToolError::Refused(format!(
            "{} is {size} bytes, which is not a multiple of the {interval}-byte protection interval; use --interval 512 or resize the image",
            image_path.display()
        )));
    }
    let data = DataIdentity::of_image(&image)
        .map_err(io_error(format!("cannot examine {}", image_path.display())))?;
    let header = Header::new(format, interval, data);
    create_metadata(&meta_path, &header, ceph)?;
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
            remove_metadata(&meta_path, ceph);
            Err(e)
        }
    }
}
