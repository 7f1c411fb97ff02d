//! Integrity: T10 protection information (PI) formats and the guard checksums behind them.
//!
//! Pure computation over byte slices: no I/O, no virtio. The request layer will call it to
//! generate tuples for written intervals and verify read ones; storage will keep the tuples.
//! (This is the first part of the PI work: formats, guards and their tests. The on-disk
//! metadata file and the data path come next.)

pub mod guard;
pub mod pi;

pub use pi::{PiError, PiErrorKind, PiFormat, Tuple};
