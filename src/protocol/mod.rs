//! The vhost-user-blk device: feature negotiation, config space and vring handling.
//!
//! Depends on `requests` for everything about request contents; must not touch the image
//! or io_uring directly.

pub mod backend;
pub mod config_space;
pub mod dirty_log;
pub mod features;
pub mod handover;
pub mod inflight;
pub mod memory_table;
pub mod polling;

pub use backend::{BlkBackend, DeviceSettings};
