//! Shared harness for the end-to-end tests: starts the real `guardblk` binary on a temporary
//! image and drives it with libblkio's virtio-blk-vhost-user driver.
// Each test binary uses a different part of the harness.
#![allow(dead_code, unused_imports)]

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, MemoryRegion, ReqFlags};

mod client;
mod daemon;
mod data;
pub mod frontend;
pub mod fusefs;
mod pi;

pub use client::*;
pub use daemon::*;
pub use data::*;
pub use pi::*;

pub const BIN: &str = env!("CARGO_BIN_EXE_guardblk");

/// The command failed with exactly one line on stderr, containing `needle`, and no panic.
#[allow(dead_code)] // not every test binary uses it
pub fn assert_one_sentence(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "command succeeded; stderr: {stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "expected one line, got:\n{stderr}"
    );
    assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Run the binary with `args` to completion (errors-only logging), as an operator would.
pub fn guardblk(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .unwrap()
}
