//! Requests: from a guest's descriptor chain to finished storage I/O.
//!
//! `parse` is the trust boundary (validates everything a guest controls); `executor` plans
//! and tracks the storage operations of validated requests; `protected` does their PI work
//! (guards on write, verification on read) against the integrity layer. This layer sits between the
//! vhost-user device (which owns vrings) and storage (which owns the image and io_uring).

pub mod bounce;
pub mod counters;
pub mod executor;
pub mod guest_mem;
pub mod log_limit;
pub mod mutation;
pub mod parse;
pub mod policy;
pub mod protected;

pub use counters::{Counters, QueueCounters};
pub use executor::{Executor, Protection, UsedEntry, WritePolicy};
pub use parse::Limits;
