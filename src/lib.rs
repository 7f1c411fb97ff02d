//! guardblk: a vhost-user-blk daemon serving a disk image zero-copy with io_uring.
//!
//! Layers, each depending only on the ones below it:
//! - [`daemon`]: socket lifecycle, one frontend at a time, reconnects, signals.
//! - [`protocol`]: the vhost-user-blk device: features, config space, vring handling.
//! - [`requests`]: descriptor-chain validation and per-queue request execution.
//! - [`storage`]: the image file and the per-queue io_uring engine.

pub mod cli;
pub mod daemon;
pub mod integrity;
pub mod protocol;
pub mod requests;
pub mod storage;
pub mod tools;
