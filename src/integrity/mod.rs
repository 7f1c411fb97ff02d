//! Integrity: T10 protection information (PI) — formats and guard checksums, the metadata
//! file that keeps one tuple per protection interval beside the raw image, the write-intent
//! log that makes the pair crash-consistent, the error journal, and whole-disk passes (scrub,
//! import, recovery).
//!
//! Sits between requests (which call it to generate and verify) and storage (whose image it
//! reads for scans). Knows nothing of virtio.

pub(crate) mod corruption;
pub(crate) mod fold;
pub mod guard;
pub(crate) mod header;
pub(crate) mod intent;
pub(crate) mod journal;
pub(crate) mod medium;
pub(crate) mod metadata;
pub(crate) mod pi;
pub(crate) mod reader;
pub(crate) mod recovery;
pub(crate) mod scan;
pub(crate) mod store;

pub(crate) use metadata::{MetadataError, PiMetadata};
pub(crate) use pi::{PiError, PiFormat};
pub(crate) use store::PiStore;
