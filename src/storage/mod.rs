//! Storage: the image file and the per-queue engine that moves bytes to and from it.
//!
//! The bottom layer. It must not know about virtio, descriptor chains or guests: it takes
//! byte offsets and iovecs and reports completions.

pub mod aligned;
pub mod engine;
pub mod files;
pub mod image;
pub mod inline;
pub mod op;
pub mod rbd;
pub mod sigbus;
pub mod uring;

pub use aligned::AlignedBuf;
pub use engine::{Engine, EngineChoice, EngineKind};
pub use image::{Image, ImageError, SECTOR_SIZE};
pub use op::{Completion, Op, OpKind};
