//! Per-queue request execution: plans storage operations for validated requests, tracks them
//! while the kernel holds them, and finishes each request with a status byte.
//!
//! Owns the queue's [`Engine`] and its in-flight table. Data moves straight between guest
//! memory and the image when the kernel's O_DIRECT alignment allows it; otherwise through a
//! bounce buffer. Every in-flight request holds a reference to the guest-memory snapshot its
//! iovecs point into, so a memory-table change or a disconnect cannot unmap memory under
//! the kernel. Knows nothing of vrings: the caller turns [`UsedEntry`]s into used-ring
//! entries.
//!
//! By stage: this module holds the types, the in-flight table, `start` and submit/reap;
//! [`plan`] turns a request into storage operations; [`complete`] finishes them.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::bounce::{Bounce, BouncePool, CHUNK};
use super::counters::{Operation, QueueCounters};
use super::guest_mem;
use super::mutation::MutationTracker;
use super::parse::{
    parse_request, GuestRange, Limits, Rejected, Request, RequestKind, Segment,
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
};
use super::policy::{self, WriteCosts, WritePath};
use super::protected;
use crate::integrity::intent::FlushTicket;
use crate::integrity::PiStore;
use crate::requests::log_limit::LogLimit;
use crate::storage::{AlignedBuf, Completion, Engine, EngineKind, Image, Op, OpKind, SECTOR_SIZE};

/// Largest iovec array one readv/writev takes (Linux UIO_MAXIOV).
const MAX_IOVECS: usize = 1024;
/// Write-zeroes falls back to writing from this shared zero buffer, in chunks of its size.
const ZERO_CHUNK: usize = 1 << 20;

/// A finished request, ready for the used ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsedEntry {
    pub head: u16,
    /// Bytes written into device-writable descriptors, status byte included.
    pub len: u32,
}

/// What a queue needs for PI: the store (none for a raw image), the write policy, the
/// daemon-wide record of where guests mutate buffers in flight, and `auto`'s cost model.
pub struct Protection {
    pub pi: Option<Arc<PiStore>>,
    pub policy: WritePolicy,
    pub tracker: Arc<MutationTracker>,
    pub costs: WriteCosts,
}

/// How PI writes treat guest buffers (`--bounce`, `--no-mutation-check`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WritePolicy {
    /// The cheaper of zero-copy and bouncing for this target and request size (see
    /// `policy`), and bounce where mutation was recently seen (learned per guest page and
    /// disk region); zero-copy writes always detect and repair.
    Auto,
    /// Copy every write into a bounce buffer, guards computed over the copy.
    Always,
    /// Zero-copy every write; detect mutation after completion and repair it.
    Never,
    /// UNSAFE, for demonstrations: zero-copy with guards computed over guest memory before
    /// submission and never re-checked. A guest that changes a buffer in flight leaves a
    /// block whose guard does not match its data.
    Unchecked,
}

/// How a request's data reaches the kernel.
enum DataPath {
    /// No data (flush, discard, write-zeroes).
    None,
    /// iovecs point straight into guest memory.
    ZeroCopy,
    /// A bounce buffer from the queue's pool stands in for guest memory; reads scatter it
    /// back on completion.
    Bounce {
        bounce: Bounce,
        guest: Vec<GuestRange>,
    },
}

/// How a PI write's data reached the disk.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum WriteMode {
    /// From a bounce buffer; guards computed over the copy.
    Bounced,
    /// From guest memory; guards re-checked after completion.
    ZeroCopyChecked,
    /// From guest memory, never re-checked (`--no-mutation-check`).
    ZeroCopyUnchecked,
}

/// The protection-information work a request carries (only when the disk has PI).
enum PiWork {
    None,
    /// Verify `count` intervals from `lba` on completion; `guest` is where they landed
    /// (zero-copy) — bounced reads verify their buffer.
    Read {
        lba: u64,
        count: u64,
        guest: Vec<GuestRange>,
    },
    /// Store these guards' tuples once the data is on disk. Zero-copy writes keep their
    /// guest ranges to re-check, and the indices of intervals being rewritten.
    Write {
        lba: u64,
        guards: Vec<u64>,
        mode: WriteMode,
        guest: Vec<GuestRange>,
        /// Zero-copy: 64-bit digests of the intervals as submitted (see `guest_digests`).
        digests: Vec<u64>,
        rewriting: Vec<usize>,
        /// A zero-copy write the cost model samples: nanoseconds its passes took so far.
        sampled_ns: Option<u64>,
    },
    /// Discard / write-zeroes: segments that completed now read as zeros (unwritten), unless
    /// one of their operations failed (a segment written as zeroes takes several).
    Ranges {
        zeroed: Vec<bool>,
        failed: Vec<bool>,
    },
    /// Flush: after the data sync, make tuples durable and clear idle intents.
    Flush {
        ticket: FlushTicket,
    },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Data (or range) operations outstanding.
    Transfer,
    /// Zero-copy write done, but the guest changed some intervals in flight: rewriting them
    /// from a snapshot.
    Rewrite,
    /// Write done; waiting for the fdatasync a write-through cache demands.
    SyncAfterWrite,
}

/// Work the completion loop sets aside, because it may have to wait (for a range lock or
/// for bounce buffers), which the loop itself must not.
enum Deferred {
    /// A read that failed verification: re-read under the range lock.
    Retry(Box<InFlight>),
    /// A zero-copy write (by slot) with intervals to rewrite from a snapshot.
    Rewrite(u32),
}

struct InFlight {
    head: u16,
    status: GuestAddress,
    used_len: u32,
    /// Keeps the guest memory the iovecs point into mapped until the last op completes.
    mem: Arc<GuestMemoryMmap>,
    data: DataPath,
    pending_ops: u32,
    errno: Option<i32>,
    stage: Stage,
    sync_after_write: bool,
    /// Write-zeroes segments, for the fallbacks when the filesystem cannot zero a range.
    segments: Vec<Segment>,
    class: Class,
    pi: PiWork,
    /// LBA range [start, end) this request holds in the PI range locks (writes, zeroing).
    locked: Option<(u64, u64)>,
    /// Snapshot of the intervals a rewrite after detected mutation writes from.
    rewrite: Option<Bounce>,
    /// When the request was parsed, for its latency.
    started: std::time::Instant,
    /// Data bytes it moves (reads and writes).
    bytes: u64,
}

/// What kind of request an in-flight entry is; decides error handling and fallbacks.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Class {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
}

impl Class {
    fn operation(self) -> Operation {
        match self {
            Class::Read => Operation::Read,
            Class::Write => Operation::Write,
            Class::Flush => Operation::Flush,
            Class::Discard => Operation::Discard,
            Class::WriteZeroes => Operation::WriteZeroes,
        }
    }
}

pub struct Executor {
    engine: Engine,
    image: Arc<Image>,
    limits: Limits,
    serial: [u8; VIRTIO_BLK_ID_BYTES as usize],
    requests: Vec<Option<InFlight>>,
    free_requests: Vec<u32>,
    completions: Vec<Completion>,
    zeroes: Option<AlignedBuf>,
    counters: Arc<QueueCounters>,
    pi: Option<Arc<PiStore>>,
    policy: WritePolicy,
    tracker: Arc<MutationTracker>,
    costs: WriteCosts,
    deferred: VecDeque<Deferred>,
    pool: BouncePool,
    /// The time of the current pass over the queue (set by the queue thread) or of the last
    /// reap that found completions: request latencies are measured with it, so a request
    /// costs no clock read of its own.
    clock: std::time::Instant,
    /// Rejected chains and failed I/O are counted always, logged a few times a second.
    reject_log: LogLimit,
    io_error_log: LogLimit,
}

fn tag(slot: u32, aux: u32) -> u64 {
    (u64::from(slot) << 32) | u64::from(aux)
}

fn untag(tag: u64) -> (u32, u32) {
    ((tag >> 32) as u32, tag as u32)
}

impl Executor {
    pub fn new(
        image: Arc<Image>,
        limits: Limits,
        serial: &str,
        queue_size: u16,
        counters: Arc<QueueCounters>,
        engine: EngineKind,
        protection: Protection,
    ) -> io::Result<Executor> {
        let Protection {
            pi,
            policy,
            tracker,
            costs,
        } = protection;
        // Two ops per request covers write + sync; range requests with more segments wait for
        // submission-queue room inside the engine.
        let engine = Engine::for_image(engine, &image, u32::from(queue_size) * 2)?;
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let n = serial.len().min(id.len());
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        Ok(Executor {
            engine,
            image,
            limits,
            serial: id,
            requests: Vec::new(),
            free_requests: Vec::new(),
            completions: Vec::new(),
            zeroes: None,
            counters,
            pi,
            policy,
            tracker,
            costs,
            deferred: VecDeque::new(),
            // A chunk per queue slot: any request the device accepts fits (see bounce.rs).
            pool: BouncePool::new(u32::from(queue_size).max(16)),
            clock: std::time::Instant::now(),
            reject_log: LogLimit::new(),
            io_error_log: LogLimit::new(),
        })
    }

    /// A bounce buffer of `len` bytes from the queue's pool. When the pool is dry, complete
    /// this queue's own requests until enough comes back (back-pressure): chunks are held only
    /// by requests with operations in flight (deferred work gives its chunks back first, and
    /// nobody holding chunks waits for a lock), so this always ends, and a request never fails
    /// for want of a buffer.
    fn take_bounce(&mut self, len: usize, done: &mut Vec<UsedEntry>) -> Bounce {
        self.counters.bytes_bounced.add(len as u64);
        loop {
            if let Some(bounce) = self.pool.try_take(len) {
                return bounce;
            }
            self.reap_completions(done);
            std::thread::yield_now();
        }
    }

    /// Take [start, end) in the PI range locks, completing this queue's own requests while
    /// another write holds part of it (the holder may be one of them).
    ///
    /// Waiting order, which keeps this free of deadlock: a range lock is always taken before
    /// bounce chunks, never after. A lock holder is an operation in flight (reaping completes
    /// it), a deferred rewrite (run here: it only waits for chunks, and chunks are held only by
    /// operations in flight) or a locked re-read (a bounded synchronous read).
    fn lock_range(&mut self, pi: &PiStore, start: u64, end: u64, done: &mut Vec<UsedEntry>) {
        let mut spins = 0u32;
        while !pi.ranges.try_lock(start, end) {
            self.reap_completions(done);
            self.run_deferred_rewrites(done);
            spins += 1;
            if spins > 64 {
                std::thread::sleep(std::time::Duration::from_micros(20));
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// Run the rewrites waiting in `deferred` (re-reads stay queued: they wait for locks).
    fn run_deferred_rewrites(&mut self, done: &mut Vec<UsedEntry>) {
        let mut i = 0;
        while i < self.deferred.len() {
            if let Deferred::Rewrite(slot) = self.deferred[i] {
                self.deferred.remove(i);
                self.rewrite(slot, done);
            } else {
                i += 1;
            }
        }
    }

    /// See [`Engine::completion_fd`].
    pub fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
        self.engine.completion_fd()
    }

    /// The queue thread starts a pass over its queue at `now`: requests started in it count
    /// their latency from then.
    pub fn set_clock(&mut self, now: std::time::Instant) {
        self.clock = now;
    }

    /// This queue's counters (for the few the queue thread keeps itself).
    pub fn counters(&self) -> &QueueCounters {
        &self.counters
    }

    pub fn in_flight(&self) -> usize {
        self.requests.len() - self.free_requests.len()
    }

    /// Nothing accepted is unfinished: no request in flight and no deferred work (a re-read
    /// waiting for a range lock has left the request table).
    pub fn idle(&self) -> bool {
        self.in_flight() == 0 && self.deferred.is_empty()
    }

    /// Parse and start one descriptor chain. Requests that finish at once (rejections, GET_ID)
    /// are appended to `done`; the rest complete through [`Executor::reap`]. Returns the data
    /// bytes the request moves (0 for rejected and data-less requests).
    pub fn start(
        &mut self,
        head: u16,
        descriptors: impl Iterator<Item = Descriptor>,
        mem: &Arc<GuestMemoryMmap>,
        write_through: bool,
        done: &mut Vec<UsedEntry>,
    ) -> u64 {
        match parse_request(head, descriptors, mem, &self.limits) {
            Ok(request) => {
                let bytes = match &request.kind {
                    RequestKind::Read { len, .. } | RequestKind::Write { len, .. } => *len,
                    _ => 0,
                };
                if let Err(e) = self.plan(request, mem, write_through, done) {
                    tracing::error!(head, error = %e, "cannot queue I/O; failing the request");
                }
                bytes
            }
            Err(rejected) => {
                done.push(self.reject(rejected, mem));
                0
            }
        }
    }

    fn reject(&mut self, rejected: Rejected, mem: &GuestMemoryMmap) -> UsedEntry {
        self.counters.reject(&rejected.error);
        if let Some(left_out) = self.reject_log.allow(self.clock) {
            tracing::warn!(
                head = rejected.head,
                error = %rejected.error,
                left_out,
                "rejected guest request (left_out: rejections not logged since the last line; all are counted in the stats)"
            );
        }
        match rejected.status {
            Some(addr) if mem.write_obj(rejected.error.status(), addr).is_ok() => UsedEntry {
                head: rejected.head,
                len: 1,
            },
            _ => UsedEntry {
                head: rejected.head,
                len: 0,
            },
        }
    }

    fn insert(&mut self, inflight: InFlight) -> u32 {
        match self.free_requests.pop() {
            Some(slot) => {
                self.requests[slot as usize] = Some(inflight);
                slot
            }
            None => {
                self.requests.push(Some(inflight));
                (self.requests.len() - 1) as u32
            }
        }
    }

    fn queue_op(&mut self, slot: u32, mut op: Op) -> io::Result<()> {
        let inflight = self.requests[slot as usize]
            .as_mut()
            .expect("queueing for a live request");
        inflight.pending_ops += 1;
        op.tag = tag(slot, op.tag as u32);
        if let Err(e) = self.engine.queue(op) {
            inflight.pending_ops -= 1;
            inflight.errno.get_or_insert(libc::EIO);
            return Err(e);
        }
        Ok(())
    }

    /// Hand queued operations to the kernel.
    pub fn submit(&mut self) {
        if let Err(e) = self.engine.submit() {
            tracing::error!(error = %e, "io_uring submit failed");
        }
    }

    /// Submit what is queued, collect completed operations and finish the requests they
    /// complete, then submit any follow-up operations (continuations, syncs, fallbacks).
    pub fn reap(&mut self, done: &mut Vec<UsedEntry>) {
        self.reap_completions(done);
        while let Some(work) = self.deferred.pop_front() {
            match work {
                Deferred::Retry(inflight) => self.retry_read(*inflight, done),
                Deferred::Rewrite(slot) => self.rewrite(slot, done),
            }
        }
    }

    fn reap_completions(&mut self, done: &mut Vec<UsedEntry>) {
        let mut completions = std::mem::take(&mut self.completions);
        loop {
            self.submit();
            if let Err(e) = self.engine.reap(&mut completions) {
                tracing::error!(error = %e, "io_uring resubmission failed");
            }
            if completions.is_empty() {
                break;
            }
            self.clock = std::time::Instant::now();
            for completion in completions.drain(..) {
                self.on_completion(completion, done);
            }
        }
        self.completions = completions;
    }

    /// Wait until every request this queue accepted has completed.
    ///
    /// Never gives up while the kernel holds operations: their buffers (bounce chunks,
    /// guest memory) stay referenced until they complete, and freeing them earlier would let
    /// a late completion write into memory reused for something else. A failing wait is
    /// logged (once a second at most) and tried again.
    pub fn drain(&mut self, done: &mut Vec<UsedEntry>) {
        self.reap(done);
        let mut last_logged: Option<std::time::Instant> = None;
        while !self.idle() {
            self.submit();
            if self.in_flight() > 0 {
                if let Err(e) = self.engine.wait_for_completion() {
                    let now = std::time::Instant::now();
                    if last_logged.is_none_or(|at| now.duration_since(at).as_secs() >= 1) {
                        tracing::error!(error = %e, in_flight = self.in_flight(), "waiting for in-flight I/O failed; waiting again (its buffers stay until the kernel is done with them)");
                        last_logged = Some(now);
                    }
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
            self.reap(done);
        }
    }
}

/// The PI metadata could not record a write intent: fail the request before any I/O.
fn metadata_failed(inflight: &mut InFlight, error: io::Error) -> Vec<Op> {
    tracing::error!(head = inflight.head, error = %error, "cannot record a write intent in the PI metadata; failing the request");
    inflight.errno = Some(libc::EIO);
    Vec::new()
}

/// Range-op tags: the segment index, with this bit set once punch-hole was already tried.
const TRIED_PUNCH: u32 = 1 << 31;

/// One fallocate-style op per segment, tagged with the segment's index.
fn range_ops(segments: &[Segment], kind_of: impl Fn(&Segment) -> OpKind) -> Vec<Op> {
    segments
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let (offset, len) = (s.sector * SECTOR_SIZE, u64::from(s.sectors) * SECTOR_SIZE);
            Op::range(kind_of(s), offset, len, i as u64)
        })
        .collect()
}

mod complete;
mod plan;
#[cfg(test)]
mod tests;
