//! `guardblk serve`: set-up before the daemon takes over (default image, PI store, how to attach).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::cli::{self, DEFAULT_IMAGE_SIZE};
use crate::daemon::ServeConfig;
use crate::integrity::store::{self, PiStore};
use crate::integrity::MetadataError;
use crate::integrity::PiFormat;
use crate::storage::image::Backing;
use crate::storage::rbd::{CephOptions, RbdSpec};
use crate::storage::Image;
use crate::telemetry::RecoveryStats;

use super::create::create;
use super::ToolError;

/// What `guardblk serve` was asked to do, validated (cli.rs builds it from the command line).
#[derive(Debug, Clone)]
pub struct ServeRequest {
    /// The image as named: a path, or `rbd:POOL/IMAGE` for an RBD image.
    pub image_path: PathBuf,
    /// The image is this RBD image, reached with `ceph`.
    pub rbd: Option<RbdSpec>,
    pub ceph: CephOptions,
    /// No image was named: the default one is created (with PI) if it does not exist.
    pub default_image: bool,
    pub pi_meta: Option<PathBuf>,
    pub read_only: bool,
    pub config: ServeConfig,
}

/// `guardblk serve`: create the default image if needed (with PI, like `create`), open image
/// and PI metadata, print how to attach, and serve until SIGINT/SIGTERM.
pub fn serve(request: &ServeRequest) -> Result<(), ToolError> {
    crate::daemon::block_shutdown_signals()?;
    let image_path = &request.image_path;
    let pi_meta = request.pi_meta.as_deref();
    if request.default_image && !image_path.exists() {
        let size = cli::parse_size(DEFAULT_IMAGE_SIZE).expect("default size parses");
        let created = create(
            image_path,
            size,
            Some(PiFormat::Type1),
            4096,
            pi_meta,
            &request.ceph,
        )?;
        println!("default image: {created}");
    }
    let image = match &request.rbd {
        Some(spec) => Image::open_rbd(spec, &request.ceph, request.read_only)?,
        None => Image::open(image_path, request.read_only)?,
    };
    let (pi, recovery) = match open_pi(&image, pi_meta)? {
        Some((store, recovery)) => (Some(store), Some(recovery)),
        None => (None, None),
    };
    let config = &request.config;
    println!(
        "serving {} on {}\nattach a guest with:\n{}",
        image_path.display(),
        config.socket.display(),
        cli::qemu_command_line(config)
    );
    crate::daemon::serve(image, pi, recovery, config)?;
    Ok(())
}

/// The image's PI metadata, if it has any: opened, checked against the image, and recovered
/// after an unclean shutdown, with what that found. An explicit `--pi-meta` that does not
/// exist is an error.
pub fn open_pi(
    image: &Image,
    pi_meta: Option<&Path>,
) -> Result<Option<(Arc<PiStore>, RecoveryStats)>, ToolError> {
    let meta_path = store::meta_path(image.path(), pi_meta);
    let no_metadata = || {
        tracing::warn!(
            image = %image.path().display(),
            "no PI metadata ({} missing): serving without guard tags; `guardblk import` adds them",
            meta_path.display()
        );
        Ok(None)
    };
    let is_rbd = matches!(image.backing(), Backing::Rbd(_));
    if pi_meta.is_none() && !is_rbd && !meta_path.exists() {
        return no_metadata();
    }
    let (store, report) = match PiStore::open_beside(image, pi_meta, !image.read_only()) {
        // An RBD image's metadata is only found by opening it.
        Err(MetadataError::Missing { .. }) if pi_meta.is_none() => return no_metadata(),
        opened => opened?,
    };
    if report.rebound {
        tracing::info!(
            meta = %meta_path.display(),
            "the image was moved or copied since its PI metadata last saw it; a sample of blocks verified, so the pair is accepted"
        );
    }
    if report.dirty_regions > 0 {
        tracing::warn!(
            regions = report.dirty_regions,
            recovered = report.recovered,
            "PI metadata was not closed cleanly; regions with writes in flight were re-checked"
        );
    }
    let recovery = RecoveryStats {
        dirty_regions: report.dirty_regions as u64,
        recovered: report.recovered,
        rebound: report.rebound,
    };
    Ok(Some((Arc::new(store), recovery)))
}
