//! guardblk command-line entry point: parse, validate, run, and turn errors into one sentence.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use guardblk::cli::{self, Cli, Command, DEFAULT_IMAGE_SIZE};
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
        Command::Create(args) => {
            Image::create(&args.image, args.size).map_err(|e| e.to_string())?;
            println!(
                "created {} ({} bytes, sparse)",
                args.image.display(),
                args.size
            );
            Ok(())
        }
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
            let config = args
                .to_config(image.preferred_engine())
                .map_err(|e| e.to_string())?;
            println!(
                "serving {} on {}\nattach a guest with:\n{}",
                image_path.display(),
                config.socket.display(),
                cli::qemu_command_line(&config)
            );
            guardblk::daemon::serve(image, &config).map_err(|e| e.to_string())
        }
    }
}
