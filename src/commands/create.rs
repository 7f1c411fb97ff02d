//! `guardblk create`: a new sparse image, with PI metadata unless asked not to.

use std::path::{Path, PathBuf};

use crate::integrity::metadata::{DataIdentity, Header};
use crate::integrity::store;
use crate::integrity::{PiFormat, PiMetadata};
use crate::storage::rbd::{CephOptions, RbdImage, RbdSpec};
use crate::storage::{Image, ImageError, SECTOR_SIZE};

use super::{create_metadata, human, io_error, metadata_present, rbd_target, ToolError};

/// What `create` made.
#[derive(Debug)]
pub struct Created {
    pub image: PathBuf,
    pub size: u64,
    /// Format, interval and metadata path; `None` for a plain raw image.
    pub pi: Option<(PiFormat, u32, PathBuf)>,
}

impl std::fmt::Display for Created {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.pi {
            None => write!(
                f,
                "created {} ({} bytes, {}, sparse, no PI)",
                self.image.display(),
                self.size,
                human(self.size)
            ),
            Some((format, interval, meta)) => write!(
                f,
                "created {} ({} bytes, {}, sparse) with {format} PI, {interval}-byte intervals; metadata in {}",
                self.image.display(),
                self.size,
                human(self.size),
                meta.display()
            ),
        }
    }
}

/// `guardblk create`: a sparse raw image and, unless `format` is `None`, its PI metadata with
/// every interval unwritten (reads as zeros) — seconds for any size.
pub fn create(
    image: &Path,
    size: u64,
    format: Option<PiFormat>,
    interval: u32,
    pi_meta: Option<&Path>,
    ceph: &CephOptions,
) -> Result<Created, ToolError> {
    if format.is_some() && !size.is_multiple_of(u64::from(interval)) {
        return Err(ToolError::Refused(format!(
            "--size {size} is not a multiple of the {interval}-byte protection interval"
        )));
    }
    if let Some(spec) = rbd_target(image) {
        return create_rbd(&spec?, size, format, interval, pi_meta, ceph);
    }
    let meta_path = store::meta_path(image, pi_meta);
    if format.is_some() && pi_meta.is_none() && meta_path.exists() {
        return Err(ToolError::Refused(format!(
            "{} already exists; refusing to overwrite it",
            meta_path.display()
        )));
    }
    Image::create(image, size)?;
    let Some(format) = format else {
        return Ok(Created {
            image: image.into(),
            size,
            pi: None,
        });
    };
    let created = DataIdentity::of(image, size)
        .map_err(io_error(format!("cannot examine {}", image.display())))
        .and_then(|data| {
            let header = Header::new(format, interval, data);
            PiMetadata::create(&meta_path, &header).map_err(ToolError::from)
        });
    if let Err(e) = created {
        let _ = std::fs::remove_file(image);
        return Err(e);
    }
    Ok(Created {
        image: image.into(),
        size,
        pi: Some((format, interval, meta_path)),
    })
}

/// `create` for an RBD image: the image (librbd's defaults: thin, 4 MiB objects) and, with
/// PI, its metadata as the RBD image `IMAGE.pi` beside it (or `--pi-meta`); the new image is
/// removed again if the metadata cannot be made.
fn create_rbd(
    spec: &RbdSpec,
    size: u64,
    format: Option<PiFormat>,
    interval: u32,
    pi_meta: Option<&Path>,
    ceph: &CephOptions,
) -> Result<Created, ToolError> {
    if size == 0 || !size.is_multiple_of(SECTOR_SIZE) {
        return Err(ImageError::BadSize { size }.into());
    }
    let name = PathBuf::from(spec.to_string());
    let meta_path = store::meta_path(&name, pi_meta);
    if format.is_some() && metadata_present(&meta_path, ceph) {
        return Err(ToolError::Refused(format!(
            "{} already exists; refusing to overwrite it",
            meta_path.display()
        )));
    }
    RbdImage::create(spec, ceph, size)?;
    let Some(format) = format else {
        return Ok(Created {
            image: name,
            size,
            pi: None,
        });
    };
    let created = Image::open_rbd(spec, ceph, false)
        .map_err(ToolError::from)
        .and_then(|image| {
            DataIdentity::of_image(&image).map_err(io_error(format!("cannot examine {name:?}")))
        })
        .and_then(|data| create_metadata(&meta_path, &Header::new(format, interval, data), ceph));
    if let Err(e) = created {
        let _ = RbdImage::remove(spec, ceph);
        return Err(e);
    }
    Ok(Created {
        image: name,
        size,
        pi: Some((format, interval, meta_path)),
    })
}
