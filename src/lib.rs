//! guardblk: a vhost-user-blk daemon serving a disk image zero-copy with io_uring.
//!
//! Layers, each depending only on the ones below it:
//! - [`daemon`]: socket lifecycle, one frontend at a time, reconnects, signals.
//! - [`protocol`]: the vhost-user-blk device: features, config space, vring handling.
//! - [`requests`]: descriptor-chain validation and per-queue request execution.
//! - [`storage`]: the image file and the per-queue io_uring engine.

// Public only what the binary (cli, tools) and the benches (integrity::guard) use, so the
// compiler reports everything else that nothing calls.
pub mod cli;
pub mod commands;
pub(crate) mod daemon;
pub mod integrity;
pub(crate) mod protocol;
pub(crate) mod requests;
pub(crate) mod storage;
