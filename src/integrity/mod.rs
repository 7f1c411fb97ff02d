//! Integrity: T10 protection information (PI) — formats and guard checksums, the metadata
//! file that keeps one tuple per protection interval beside the raw image, the write-intent
//! log that makes the pair crash-consistent, the error journal, and whole-disk passes (scrub,
//! import, recovery).
//!
//! Sits between requests (which call it to generate and verify) and storage (whose image it
//! reads for scans). Knows nothing of virtio.

pub mod fold;
pub mod guard;
pub mod intent;
pub mod journal;
pub mod metadata;
pub mod pi;
pub mod reader;
pub mod recovery;
pub mod scan;
pub mod store;

pub use metadata::{MetadataError, PiMetadata, APP_TAG};
pub use pi::{PiError, PiErrorKind, PiFormat, Tuple};
pub use store::{PiCounters, PiStore};
