//! guardblk command-line entry point: parse, set up logging, run the command (src/commands/),
//! and turn its failure into one sentence and an exit status.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use guardblk::cli::{Cli, Command, DEFAULT_SOCKET};
use guardblk::commands::{self, ToolError};

/// `scrub` exit status when some block failed verification.
const SCRUB_FOUND_ERRORS: u8 = 1;
/// `scrub` exit status when it could not run at all.
const SCRUB_COULD_NOT_RUN: u8 = 2;

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

    let failure = match cli.command {
        Command::Scrub(_) => ExitCode::from(SCRUB_COULD_NOT_RUN),
        _ => ExitCode::FAILURE,
    };
    match run(cli.command) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("guardblk: {error}");
            failure
        }
    }
}

/// Print `text` and a newline on stdout; a closed pipe (`| head`) is not an error worth a panic.
fn out(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{text}");
}

fn run(command: Command) -> Result<ExitCode, ToolError> {
    match command {
        Command::Create(args) => {
            let created = commands::create(
                &args.image,
                args.size,
                args.layout.pi.format(),
                args.layout.interval,
                args.layout.pi_meta.as_deref(),
                &args.ceph.options(),
            )?;
            out(&created.to_string());
        }
        Command::Import(args) => {
            let imported = commands::import(
                &args.image,
                args.layout.pi.format(),
                args.layout.interval,
                args.layout.pi_meta.as_deref(),
                &args.ceph.options(),
            )?;
            out(&imported.to_string());
        }
        Command::Scrub(args) => {
            let report =
                commands::scrub(&args.image, args.pi_meta.as_deref(), &args.ceph.options())?;
            out(&if args.json {
                report.json_lines()
            } else {
                report.text()
            });
            if !report.is_clean() {
                return Ok(ExitCode::from(SCRUB_FOUND_ERRORS));
            }
        }
        Command::Info(args) if commands::is_rbd_target(&args.image) => {
            let report =
                commands::info_rbd(&args.image, args.pi_meta.as_deref(), &args.ceph.options())?;
            out(&if args.json {
                report.json().to_string()
            } else {
                report.text()
            });
        }
        Command::Info(args) => {
            let report = commands::info(&args.image, args.pi_meta.as_deref())?;
            out(&if args.json {
                report.json().to_string()
            } else {
                report.text()
            });
        }
        Command::Inject(args) => {
            let injected = commands::inject(
                &args.image,
                args.lba,
                args.kind.into(),
                args.pi_meta.as_deref(),
                &args.ceph.options(),
            )?;
            out(&injected.to_string());
        }
        Command::Serve(args) => commands::serve(&args.to_request()?)?,
        Command::Stats(args) => {
            let source = match (&args.socket, &args.metrics) {
                (_, Some(url)) => commands::StatsSource::from_url(url)?,
                (Some(socket), None) => commands::StatsSource::Socket(socket.clone()),
                (None, None) => commands::StatsSource::Socket(DEFAULT_SOCKET.into()),
            };
            match args.watch {
                Some(secs) => {
                    commands::watch_stats(&source, std::time::Duration::from_secs_f64(secs), out)?
                }
                None if args.json => out(&serde_json::to_string_pretty(&commands::fetch_stats(
                    &source,
                )?)
                .unwrap_or_default()),
                None => out(&commands::render_stats(
                    &commands::fetch_stats(&source)?,
                    None,
                )),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
