//! guardblk command-line entry point: parse, validate, run, and turn errors into one sentence.

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use guardblk::cli::{self, Cli, Command, DEFAULT_IMAGE_SIZE};
use guardblk::integrity::metadata::{DataIdentity, Header};
use guardblk::integrity::store::{self, PiStore};
use guardblk::integrity::PiMetadata;
use guardblk::storage::{Image, ImageError};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cli.log_level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("guardblk: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<(), String> {
    match command {
        Command::Create(args) => create(&args),
        Command::Serve(args) => {
            let image_path = args.image_path();
            if args.image.is_none() {
                let size = cli::parse_size(DEFAULT_IMAGE_SIZE).expect("default size parses");
                match Image::create(&image_path, size) {
                    Ok(()) => println!(
                        "created default image {} ({DEFAULT_IMAGE_SIZE}, sparse)",
                        image_path.display()
                    ),
                    Err(ImageError::AlreadyExists { .. }) => {}
                    Err(e) => return Err(e.to_string()),
                }
            }
            let image = Image::open(&image_path, args.read_only).map_err(|e| e.to_string())?;
            let pi = open_pi(&image, args.pi_meta.as_deref())?;
            let config = args
                .to_config(image.preferred_engine())
                .map_err(|e| e.to_string())?;
            println!(
                "serving {} on {}\nattach a guest with:\n{}",
                image_path.display(),
                config.socket.display(),
                cli::qemu_command_line(&config)
            );
            guardblk::daemon::serve(image, pi, &config).map_err(|e| e.to_string())
        }
    }
}

/// `guardblk create`: a sparse raw image and, unless `--pi none`, its PI metadata with every
/// interval unwritten (reads as zeros) — seconds for any size.
fn create(args: &cli::CreateArgs) -> Result<(), String> {
    let format = args.pi.format();
    if let Some(interval) = format.map(|_| args.interval) {
        if args.size % u64::from(interval) != 0 {
            return Err(format!(
                "--size {} is not a multiple of the {interval}-byte protection interval",
                args.size
            ));
        }
    }
    let meta_path = store::meta_path(&args.image, args.pi_meta.as_deref());
    if format.is_some() && args.pi_meta.is_none() && meta_path.exists() {
        return Err(format!(
            "{} already exists; refusing to overwrite it",
            meta_path.display()
        ));
    }
    Image::create(&args.image, args.size).map_err(|e| e.to_string())?;
    let Some(format) = format else {
        println!(
            "created {} ({} bytes, sparse, no PI)",
            args.image.display(),
            args.size
        );
        return Ok(());
    };
    let created = DataIdentity::of(&args.image, args.size)
        .map_err(|e| e.to_string())
        .and_then(|data| {
            let header = Header::new(format, args.interval, data);
            PiMetadata::create(&meta_path, &header).map_err(|e| e.to_string())
        });
    if let Err(e) = created {
        let _ = std::fs::remove_file(&args.image);
        return Err(e);
    }
    println!(
        "created {} ({} bytes, sparse) with {format} PI, {}-byte intervals; metadata in {}",
        args.image.display(),
        args.size,
        args.interval,
        meta_path.display()
    );
    Ok(())
}

/// The image's PI metadata, if it has any: opened, checked against the image, and recovered
/// after an unclean shutdown. An explicit `--pi-meta` that does not exist is an error.
fn open_pi(image: &Image, pi_meta: Option<&Path>) -> Result<Option<Arc<PiStore>>, String> {
    let meta_path = store::meta_path(image.path(), pi_meta);
    if pi_meta.is_none() && !meta_path.exists() {
        tracing::warn!(
            image = %image.path().display(),
            "no PI metadata ({} missing): serving without guard tags; `guardblk import` adds them",
            meta_path.display()
        );
        return Ok(None);
    }
    let (store, report) =
        PiStore::open_beside(image, pi_meta, !image.read_only()).map_err(|e| e.to_string())?;
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
    Ok(Some(Arc::new(store)))
}
