//! guardblk: a vhost-user-blk daemon serving a disk image zero-copy with io_uring, with T10
//! PI guard tags generated and verified against the disk.
//!
//! Layers, each depending only on the ones below it:
//! - `commands` (and `cli`): the subcommands behind the command line.
//! - `daemon`: socket lifecycle, one frontend at a time, reconnects, signals.
//! - `telemetry`: the counters as operators see them: stats document, `/metrics`, `/stats`.
//! - `protocol`: the vhost-user-blk device: features, config space, vring handling, polling.
//! - `requests`: descriptor-chain validation and per-queue request execution.
//! - `integrity`: PI formats and guard CRCs, the metadata file, write intents, scans.
//! - `storage`: the image file, its operations and the per-queue engines.

// Public only what the binary (cli, tools) and the benches (integrity::guard) use, so the
// compiler reports everything else that nothing calls.
pub mod cli;
pub mod commands;
pub(crate) mod daemon;
pub mod integrity;
pub(crate) mod protocol;
pub(crate) mod requests;
pub(crate) mod storage;
pub(crate) mod telemetry;

// The fuzz targets' way in (fuzz/): only with `--cfg fuzzing`, which cargo-fuzz sets (and in
// unit tests, which check the targets' seed inputs and can write them out for the fuzzer).
#[cfg(any(fuzzing, test))]
pub mod fuzzing;
