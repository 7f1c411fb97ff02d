//! `guardblk create`: a new sparse image, with PI metadata unless asked not to.

use std::path::{Path, PathBuf};

use crate::integrity::metadata::{DataIdentity, Header};
use crate::integrity::store;
use crate::integrity::{PiFormat, PiMetadata};
use crate::storage::Image;

use super::{human, io_error, ToolError};

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
) -> Result<Created, ToolError> {
    if format.is_some() && !size.is_multiple_of(u64::from(interval)) {
        return Err(ToolError::Refused(format!(
            "--size {size} is not a multiple of the {interval}-byte protection interval"
        )));
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
