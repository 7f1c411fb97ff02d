//! Per-queue request execution: plans storage operations for validated requests, tracks them
//! while the kernel holds them, and finishes each request with a status byte.
//!
//! Owns the queue's [`Engine`] and its in-flight table. Data moves straight between guest
//! memory and the image when the kernel's O_DIRECT alignment allows it; otherwise through a
//! bounce buffer. Every in-flight request holds a reference to the guest-memory snapshot its
//! iovecs point into, so a memory-table change or a disconnect cannot unmap memory under
//! the kernel. Knows nothing of vrings: the caller turns [`UsedEntry`]s into used-ring
//! entries.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::bounce::{Bounce, BouncePool, CHUNK};
use super::mutation::MutationTracker;
use super::parse::{
    parse_request, GuestRange, Limits, Rejected, Request, RequestKind, Segment,
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
};
use super::policy::{self, WriteCosts, WritePath};
use super::protected;
use crate::integrity::intent::FlushTicket;
use crate::integrity::PiStore;
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

/// Per-queue counters; read by the daemon for its disconnect summary.
#[derive(Debug, Default)]
pub struct QueueStats {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub discards: AtomicU64,
    pub write_zeroes: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub bounced: AtomicU64,
    pub rejected: AtomicU64,
    pub io_errors: AtomicU64,
    /// Reads completed with IOERR because data and tuple disagree.
    pub guard_errors: AtomicU64,
    /// Reads whose first verification failed and whose locked re-read verified (the guest
    /// changed its buffer, or the read raced a write).
    pub read_retries_healed: AtomicU64,
    /// PI writes sent to disk straight from guest memory.
    pub writes_zero_copy: AtomicU64,
    /// PI writes copied into a bounce buffer up front (policy, or known mutation).
    pub writes_bounced: AtomicU64,
    /// Zero-copy writes the guest changed in flight, rewritten from a snapshot.
    pub writes_rewritten: AtomicU64,
    /// Intervals those rewrites covered.
    pub intervals_rewritten: AtomicU64,
    /// Bytes copied through bounce buffers, for any reason.
    pub bytes_bounced: AtomicU64,
    /// Of `writes_bounced`: those `auto` bounced because bouncing is the cheaper path here
    /// (the rest: the guest was recently seen changing buffers there, or `--bounce always`).
    pub writes_bounced_by_cost: AtomicU64,
    /// `auto`'s current write path and cost estimates per size class
    /// ([`policy::SIZE_CLASSES`]), packed by [`policy::pack`]; updated when a sample lands.
    pub write_path: [AtomicU64; 4],
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

impl QueueStats {
    fn bump(counter: &AtomicU64, by: u64) {
        counter.fetch_add(by, Ordering::Relaxed);
    }
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
    /// Discard / write-zeroes: segments that completed now read as zeros (unwritten).
    Ranges {
        zeroed: Vec<bool>,
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

pub struct Executor {
    engine: Engine,
    image: Arc<Image>,
    limits: Limits,
    serial: [u8; VIRTIO_BLK_ID_BYTES as usize],
    requests: Vec<Option<InFlight>>,
    free_requests: Vec<u32>,
    completions: Vec<Completion>,
    zeroes: Option<AlignedBuf>,
    stats: Arc<QueueStats>,
    pi: Option<Arc<PiStore>>,
    policy: WritePolicy,
    tracker: Arc<MutationTracker>,
    costs: WriteCosts,
    deferred: VecDeque<Deferred>,
    pool: BouncePool,
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
        stats: Arc<QueueStats>,
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
        let engine = Engine::new(engine, image.fd(), u32::from(queue_size) * 2)?;
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
            stats,
            pi,
            policy,
            tracker,
            costs,
            deferred: VecDeque::new(),
            // A chunk per queue slot: any request the device accepts fits (see bounce.rs).
            pool: BouncePool::new(u32::from(queue_size).max(16)),
        })
    }

    /// A bounce buffer of `len` bytes from the queue's pool. When the pool is dry, complete
    /// this queue's own requests until enough comes back (back-pressure): chunks are held only
    /// by requests with operations in flight (deferred work gives its chunks back first, and
    /// nobody holding chunks waits for a lock), so this always ends, and a request never fails
    /// for want of a buffer.
    fn take_bounce(&mut self, len: usize, done: &mut Vec<UsedEntry>) -> Bounce {
        QueueStats::bump(&self.stats.bytes_bounced, len as u64);
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

    pub fn in_flight(&self) -> usize {
        self.requests.len() - self.free_requests.len()
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

    fn reject(&self, rejected: Rejected, mem: &GuestMemoryMmap) -> UsedEntry {
        QueueStats::bump(&self.stats.rejected, 1);
        tracing::warn!(head = rejected.head, error = %rejected.error, "rejected guest request");
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

    fn plan(
        &mut self,
        request: Request,
        mem: &Arc<GuestMemoryMmap>,
        write_through: bool,
        done: &mut Vec<UsedEntry>,
    ) -> io::Result<()> {
        let Request { head, kind, status } = request;
        let mut inflight = InFlight {
            head,
            status,
            used_len: 1,
            mem: Arc::clone(mem),
            data: DataPath::None,
            pending_ops: 0,
            errno: None,
            stage: Stage::Transfer,
            sync_after_write: false,
            segments: Vec::new(),
            class: Class::Flush,
            pi: PiWork::None,
            locked: None,
            rewrite: None,
        };
        let pi = self.pi.clone();
        // Each op's `tag` holds its index within the request until queue_op adds the slot.
        let ops: Vec<Op> = match kind {
            RequestKind::GetId { buffer, len } => {
                let wrote = write_guest(mem, &buffer, &[&self.serial[..]]).is_ok();
                let status_byte = if wrote {
                    VIRTIO_BLK_S_OK
                } else {
                    VIRTIO_BLK_S_IOERR
                };
                let _ = mem.write_obj(status_byte, status);
                let id_len = u64::from(VIRTIO_BLK_ID_BYTES).min(len) as u32;
                done.push(UsedEntry {
                    head,
                    len: id_len + 1,
                });
                return Ok(());
            }
            RequestKind::Read { sector, data, len } => {
                inflight.class = Class::Read;
                QueueStats::bump(&self.stats.reads, 1);
                QueueStats::bump(&self.stats.bytes_read, len);
                inflight.used_len = (len + 1) as u32;
                let offset = sector * SECTOR_SIZE;
                if let Some(pi) = &pi {
                    let interval = u64::from(pi.interval());
                    let (lba, count) = (offset / interval, len / interval);
                    pi.meta.prefetch_tuples(lba, count);
                    inflight.pi = PiWork::Read {
                        lba,
                        count,
                        guest: data.clone(),
                    };
                }
                let iovecs = self.data_path(&mut inflight, data, len, offset, false, done);
                if let (DataPath::Bounce { .. }, PiWork::Read { guest, .. }) =
                    (&inflight.data, &mut inflight.pi)
                {
                    guest.clear(); // verified in the buffer instead
                }
                vec![Op::transfer(OpKind::Read, offset, iovecs, 0)]
            }
            RequestKind::Write { sector, data, len } => {
                inflight.class = Class::Write;
                QueueStats::bump(&self.stats.writes, 1);
                QueueStats::bump(&self.stats.bytes_written, len);
                inflight.sync_after_write = write_through;
                let offset = sector * SECTOR_SIZE;
                match &pi {
                    Some(pi) => {
                        match self.protected_write(pi, &mut inflight, data, len, offset, done) {
                            Ok(iovecs) => vec![Op::transfer(OpKind::Write, offset, iovecs, 0)],
                            Err(e) => metadata_failed(&mut inflight, e),
                        }
                    }
                    None => {
                        let iovecs = self.data_path(&mut inflight, data, len, offset, true, done);
                        vec![Op::transfer(OpKind::Write, offset, iovecs, 0)]
                    }
                }
            }
            RequestKind::Flush => {
                QueueStats::bump(&self.stats.flushes, 1);
                if let Some(pi) = &pi {
                    inflight.pi = PiWork::Flush {
                        ticket: pi.meta.flush_ticket(),
                    };
                }
                vec![Op::sync(0)]
            }
            RequestKind::Discard { segments } => {
                inflight.class = Class::Discard;
                QueueStats::bump(&self.stats.discards, 1);
                let mut ops = range_ops(&segments, |_| OpKind::PunchHole);
                if let Some(pi) = &pi {
                    if let Err(e) = self.protect_ranges(pi, &mut inflight, &segments, done) {
                        ops = metadata_failed(&mut inflight, e);
                    }
                }
                inflight.segments = segments;
                ops
            }
            RequestKind::WriteZeroes { segments } => {
                QueueStats::bump(&self.stats.write_zeroes, 1);
                inflight.sync_after_write = write_through;
                inflight.class = Class::WriteZeroes;
                let mut ops = range_ops(&segments, |s| {
                    if s.unmap {
                        OpKind::PunchHole
                    } else {
                        OpKind::ZeroRange
                    }
                });
                if let Some(pi) = &pi {
                    if let Err(e) = self.protect_ranges(pi, &mut inflight, &segments, done) {
                        ops = metadata_failed(&mut inflight, e);
                    }
                }
                inflight.segments = segments;
                ops
            }
        };

        if inflight.errno.is_some() {
            // Failed before any I/O (the PI metadata could not record the write intent).
            self.complete(inflight, done);
            return Ok(());
        }
        let slot = self.insert(inflight);
        for op in ops {
            if let Err(e) = self.queue_op(slot, op) {
                // Whatever was queued completes normally; if nothing was, finish now (IOERR:
                // queue_op recorded the failure) so the guest is not left waiting.
                if self.requests[slot as usize]
                    .as_ref()
                    .is_some_and(|r| r.pending_ops == 0)
                {
                    let inflight = self.requests[slot as usize].take().expect("checked above");
                    self.free_requests.push(slot);
                    self.complete(inflight, done);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Decide zero-copy or bounce for a read/write and return the iovecs to hand the kernel.
    fn data_path(
        &mut self,
        inflight: &mut InFlight,
        data: Vec<GuestRange>,
        len: u64,
        offset: u64,
        is_write: bool,
        done: &mut Vec<UsedEntry>,
    ) -> Vec<libc::iovec> {
        let iovecs = guest_iovecs(&inflight.mem, &data);
        if self.direct_ok(offset, &iovecs) {
            inflight.data = DataPath::ZeroCopy;
            return iovecs;
        }
        // Misaligned for O_DIRECT (or too fragmented): go through an aligned buffer.
        QueueStats::bump(&self.stats.bounced, 1);
        let bounce = self.take_bounce(len as usize, done);
        if is_write {
            let mut dst = self.pool.slices_mut(&bounce);
            read_guest(&inflight.mem, &data, &mut dst)
                .expect("range validated against this memory snapshot");
        }
        let iov = self.pool.iovecs(&bounce);
        inflight.data = DataPath::Bounce {
            bounce,
            guest: data,
        };
        iov
    }

    fn direct_ok(&self, offset: u64, iovecs: &[libc::iovec]) -> bool {
        iovecs.len() <= MAX_IOVECS && self.image.accepts_direct(offset, iovecs)
    }

    /// Whether this write touches guest pages or a disk region where a guest recently changed
    /// a buffer in flight (the `auto` policy bounces those up front).
    fn mutation_expected(&self, data: &[GuestRange], offset: u64, len: u64) -> bool {
        let pages = data.iter().map(|r| (r.addr.0, u64::from(r.len)));
        self.tracker.write_expects_mutation(pages, offset, len)
    }

    /// A write to a PI disk. Zero-copy (the default for well-behaved guests): guards are
    /// computed over guest memory, the data goes to disk straight from it, and after it
    /// completes the guards are computed again — intervals the guest changed meanwhile are
    /// rewritten from a snapshot before the guest is told (see `rewrite`). Bounced (policy,
    /// recent mutation there, or misalignment): the data is copied into a pool buffer with each
    /// interval's guard computed in the same pass. Either way the range is locked and the write
    /// intent recorded first, and the tuples are stored when the data is on disk: they describe
    /// exactly the bytes that reached it.
    fn protected_write(
        &mut self,
        pi: &Arc<PiStore>,
        inflight: &mut InFlight,
        data: Vec<GuestRange>,
        len: u64,
        offset: u64,
        done: &mut Vec<UsedEntry>,
    ) -> io::Result<Vec<libc::iovec>> {
        let interval = u64::from(pi.interval());
        let (lba, count) = (offset / interval, len / interval);
        pi.meta.prefetch_tuples(lba, count);
        let iovecs = guest_iovecs(&inflight.mem, &data);
        let direct = self.direct_ok(offset, &iovecs);
        let mut by_cost = false;
        let mut sample = false;
        let mode = match self.policy {
            _ if !direct => WriteMode::Bounced,
            WritePolicy::Always => WriteMode::Bounced,
            WritePolicy::Never => WriteMode::ZeroCopyChecked,
            WritePolicy::Unchecked => WriteMode::ZeroCopyUnchecked,
            WritePolicy::Auto if self.mutation_expected(&data, offset, len) => WriteMode::Bounced,
            WritePolicy::Auto => {
                let choice = self.costs.choose(len);
                sample = choice.sample;
                match choice.path {
                    WritePath::ZeroCopy => WriteMode::ZeroCopyChecked,
                    WritePath::Bounce => {
                        by_cost = true;
                        WriteMode::Bounced
                    }
                }
            }
        };
        // Lock before buffer (see lock_range): whoever holds chunks never waits for a lock.
        self.lock_range(pi, lba, lba + count, done);
        inflight.locked = Some((lba, lba + count));
        let bounce = (mode == WriteMode::Bounced).then(|| self.take_bounce(len as usize, done));
        if let Err(e) = pi.meta.begin_write(lba, count) {
            pi.meta.end_write(lba, count);
            if let Some(bounce) = bounce {
                self.pool.give_back(bounce);
            }
            return Err(e);
        }
        // Timed from here: the path's own work, not waiting for the pool or for a write
        // intent to become durable (the same for both paths, and occasionally long).
        let started = sample.then(policy::stopwatch);
        let mut guards = Vec::with_capacity(count as usize);
        let mut digests = Vec::new();
        let mut sampled_ns = None;
        let (iov, guest) = match bounce {
            Some(bounce) => {
                if direct {
                    QueueStats::bump(&self.stats.writes_bounced, 1);
                    if by_cost {
                        QueueStats::bump(&self.stats.writes_bounced_by_cost, 1);
                    }
                } else {
                    QueueStats::bump(&self.stats.bounced, 1);
                }
                let mut dst = self.pool.slices_mut(&bounce);
                protected::gather_with_guards(
                    &inflight.mem,
                    &data,
                    &mut dst,
                    pi.format(),
                    interval as usize,
                    &mut guards,
                );
                let iov = self.pool.iovecs(&bounce);
                inflight.data = DataPath::Bounce {
                    bounce,
                    guest: Vec::new(),
                };
                if let Some(started) = started {
                    self.record_cost(len, WritePath::Bounce, policy::elapsed_ns(started));
                }
                (iov, Vec::new())
            }
            None => {
                QueueStats::bump(&self.stats.writes_zero_copy, 1);
                protected::guest_digests(
                    &inflight.mem,
                    &data,
                    pi.format(),
                    interval as usize,
                    Some(&mut guards),
                    &mut digests,
                );
                sampled_ns = started.map(policy::elapsed_ns);
                inflight.data = DataPath::ZeroCopy;
                (iovecs, data)
            }
        };
        inflight.pi = PiWork::Write {
            lba,
            guards,
            mode,
            guest,
            digests,
            rewriting: Vec::new(),
            sampled_ns,
        };
        Ok(iov)
    }

    /// A sampled write's path work cost `nanos`: feed the cost model and publish its state.
    fn record_cost(&mut self, len: u64, path: WritePath, nanos: u64) {
        self.costs.record(len, path, nanos);
        for (slot, state) in self.stats.write_path.iter().zip(self.costs.snapshot()) {
            slot.store(policy::pack(state), Ordering::Relaxed);
        }
    }

    /// Discard or write-zeroes on a PI disk: lock the span the segments cover (one lock, so
    /// two requests cannot each hold part of the other's) and record the write intents.
    fn protect_ranges(
        &mut self,
        pi: &Arc<PiStore>,
        inflight: &mut InFlight,
        segments: &[Segment],
        done: &mut Vec<UsedEntry>,
    ) -> io::Result<()> {
        let per = u64::from(pi.interval()) / SECTOR_SIZE;
        let start = segments.iter().map(|s| s.sector / per).min().unwrap_or(0);
        let end = segments
            .iter()
            .map(|s| (s.sector + u64::from(s.sectors)) / per)
            .max()
            .unwrap_or(0);
        self.lock_range(pi, start, end, done);
        inflight.locked = Some((start, end));
        let mut result = Ok(());
        for s in segments {
            let began = pi
                .meta
                .begin_write(s.sector / per, u64::from(s.sectors) / per);
            result = result.and(began);
        }
        if result.is_err() {
            for s in segments {
                pi.meta
                    .end_write(s.sector / per, u64::from(s.sectors) / per);
            }
            return result;
        }
        inflight.pi = PiWork::Ranges {
            zeroed: vec![false; segments.len()],
        };
        Ok(())
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
            for completion in completions.drain(..) {
                self.on_completion(completion, done);
            }
        }
        self.completions = completions;
    }

    /// Wait until every request this queue accepted has completed.
    pub fn drain(&mut self, done: &mut Vec<UsedEntry>) {
        self.reap(done);
        while self.in_flight() > 0 {
            self.submit();
            if let Err(e) = self.engine.wait_for_completion() {
                tracing::error!(error = %e, "waiting for in-flight I/O failed");
                break;
            }
            self.reap(done);
        }
    }

    fn on_completion(&mut self, completion: Completion, done: &mut Vec<UsedEntry>) {
        let (slot, aux) = untag(completion.tag);
        let Some(inflight) = self
            .requests
            .get_mut(slot as usize)
            .and_then(Option::as_mut)
        else {
            tracing::error!(tag = completion.tag, "completion for an unknown request");
            return;
        };
        inflight.pending_ops -= 1;
        if completion.result.is_ok() && inflight.stage == Stage::Transfer {
            if let PiWork::Ranges { zeroed } = &mut inflight.pi {
                if let Some(z) = zeroed.get_mut((aux & !TRIED_PUNCH) as usize) {
                    *z = true;
                }
            }
        }
        if let Err(errno) = completion.result {
            if let Some(next) = self.fallback(slot, aux, errno) {
                if self.queue_op(slot, next).is_ok() {
                    return;
                }
            } else {
                let inflight = self.requests[slot as usize].as_mut().expect("live request");
                // Discards are hints: a target that cannot punch holes still completes OK.
                if !(errno == libc::EOPNOTSUPP && inflight.class == Class::Discard) {
                    inflight.errno.get_or_insert(errno);
                }
            }
        }
        let inflight = self.requests[slot as usize].as_mut().expect("live request");
        if inflight.pending_ops > 0 {
            return;
        }
        if inflight.stage == Stage::Transfer
            && inflight.errno.is_none()
            && self.detect_mutation(slot)
        {
            self.deferred.push_back(Deferred::Rewrite(slot));
            return;
        }
        let inflight = self.requests[slot as usize].as_mut().expect("live request");
        if matches!(inflight.stage, Stage::Transfer | Stage::Rewrite)
            && inflight.sync_after_write
            && inflight.errno.is_none()
        {
            inflight.stage = Stage::SyncAfterWrite;
            if self.queue_op(slot, Op::sync(0)).is_ok() {
                return;
            }
        }
        let inflight = self.requests[slot as usize].take().expect("live request");
        self.free_requests.push(slot);
        self.complete(inflight, done);
    }

    /// Write-zeroes degrades gracefully: zero-range → punch-hole → writing zeroes.
    fn fallback(&mut self, slot: u32, aux: u32, errno: i32) -> Option<Op> {
        if errno != libc::EOPNOTSUPP {
            return None;
        }
        let inflight = self.requests[slot as usize].as_ref()?;
        if inflight.class != Class::WriteZeroes {
            return None;
        }
        let segment = *inflight.segments.get((aux & !TRIED_PUNCH) as usize)?;
        let offset = segment.sector * SECTOR_SIZE;
        let len = u64::from(segment.sectors) * SECTOR_SIZE;
        if aux & TRIED_PUNCH == 0 {
            return Some(Op::range(
                OpKind::PunchHole,
                offset,
                len,
                u64::from(aux | TRIED_PUNCH),
            ));
        }
        // Neither fallocate mode works here (e.g. a block device without zeroing support):
        // write real zeroes, one shared read-only buffer repeated.
        let zeroes = self
            .zeroes
            .get_or_insert_with(|| AlignedBuf::zeroed(ZERO_CHUNK));
        let base = zeroes.as_mut_ptr() as *mut libc::c_void;
        let iovecs = (0..len.div_ceil(ZERO_CHUNK as u64))
            .map(|i| libc::iovec {
                iov_base: base,
                iov_len: (len - i * ZERO_CHUNK as u64).min(ZERO_CHUNK as u64) as usize,
            })
            .collect::<Vec<_>>();
        if iovecs.len() > MAX_IOVECS {
            return None;
        }
        Some(Op::transfer(OpKind::Write, offset, iovecs, u64::from(aux)))
    }

    /// A request's last operation finished: do its PI work, release what it holds, and
    /// write its status. Reads that fail verification are set aside for a locked re-read.
    fn complete(&mut self, mut inflight: InFlight, done: &mut Vec<UsedEntry>) {
        let mut status = VIRTIO_BLK_S_OK;
        if let Some(pi) = self.pi.clone() {
            if inflight.errno.is_none() && inflight.class == Class::Read {
                let verified = match (&inflight.pi, &inflight.data) {
                    (PiWork::Read { lba, .. }, DataPath::Bounce { bounce, .. }) => {
                        let per_chunk = (CHUNK / pi.interval() as usize) as u64;
                        self.pool
                            .pieces(bounce)
                            .iter()
                            .enumerate()
                            .all(|(i, piece)| {
                                protected::verify_buffer(&pi, piece, lba + i as u64 * per_chunk)
                                    .is_empty()
                            })
                    }
                    (PiWork::Read { lba, guest, .. }, _) => {
                        protected::verify_guest(&pi, &inflight.mem, guest, *lba).is_ok()
                    }
                    _ => true,
                };
                if !verified {
                    // The re-read brings its own buffer: give the pool chunks back now, so
                    // deferred work never holds any (see take_bounce).
                    if let DataPath::Bounce { bounce, guest } =
                        std::mem::replace(&mut inflight.data, DataPath::None)
                    {
                        self.pool.give_back(bounce);
                        if let PiWork::Read { guest: g, .. } = &mut inflight.pi {
                            *g = guest;
                        }
                    }
                    self.deferred.push_back(Deferred::Retry(Box::new(inflight)));
                    return;
                }
            }
            if let Err(e) = self.finish_protected(&pi, &mut inflight) {
                inflight
                    .errno
                    .get_or_insert(e.raw_os_error().unwrap_or(libc::EIO));
            }
        }
        if let Some(errno) = inflight.errno {
            QueueStats::bump(&self.stats.io_errors, 1);
            tracing::warn!(
                head = inflight.head,
                error = %io::Error::from_raw_os_error(errno),
                "I/O failed; completing the request with IOERR"
            );
            status = VIRTIO_BLK_S_IOERR;
        } else if let DataPath::Bounce { bounce, guest } = &inflight.data {
            // Reads through a bounce buffer land in guest memory only now. (For writes the
            // guest ranges were gathered before submission and this copies nothing back.)
            if inflight.class == Class::Read
                && write_guest(&inflight.mem, guest, &self.pool.pieces(bounce)).is_err()
            {
                status = VIRTIO_BLK_S_IOERR;
            }
        }
        done.push(self.write_status(&mut inflight, status));
    }

    /// Write the status byte and recycle the request's buffer.
    fn write_status(&mut self, inflight: &mut InFlight, status: u8) -> UsedEntry {
        let written = inflight.mem.write_obj(status, inflight.status).is_ok();
        if let DataPath::Bounce { bounce, .. } =
            std::mem::replace(&mut inflight.data, DataPath::None)
        {
            self.pool.give_back(bounce);
        }
        if let Some(bounce) = inflight.rewrite.take() {
            self.pool.give_back(bounce);
        }
        UsedEntry {
            head: inflight.head,
            len: if written { inflight.used_len } else { 0 },
        }
    }

    /// PI bookkeeping when a write, zeroing or flush finishes: store (or re-derive) tuples,
    /// make them durable where the cache mode or the flush demands, end write intents and
    /// release the range lock.
    fn finish_protected(&mut self, pi: &PiStore, inflight: &mut InFlight) -> io::Result<()> {
        let interval = u64::from(pi.interval());
        let per = interval / SECTOR_SIZE;
        let mut result = Ok(());
        match std::mem::replace(&mut inflight.pi, PiWork::None) {
            PiWork::None | PiWork::Read { .. } => {}
            PiWork::Write { lba, guards, .. } => {
                let count = guards.len() as u64;
                if inflight.errno.is_none() {
                    for (i, &guard) in guards.iter().enumerate() {
                        let l = lba + i as u64;
                        pi.meta.set_tuple(l, &pi.tuple_for(l, guard));
                    }
                    pi.counters
                        .tuples_written
                        .fetch_add(count, std::sync::atomic::Ordering::Relaxed);
                    if inflight.sync_after_write {
                        result = pi.meta.sync_tuples(lba, count);
                    }
                } else {
                    protected::rederive_from_disk(&self.image, pi, lba, count);
                }
                pi.meta.end_write(lba, count);
            }
            PiWork::Ranges { zeroed } => {
                for (segment, zeroed) in inflight.segments.iter().zip(zeroed) {
                    let (lba, count) = (segment.sector / per, u64::from(segment.sectors) / per);
                    if zeroed {
                        pi.meta.set_unwritten(lba, count);
                        if inflight.sync_after_write {
                            result = result.and(pi.meta.sync_tuples(lba, count));
                        }
                    } else if inflight.class == Class::WriteZeroes || inflight.errno.is_some() {
                        // Not known to be zero, not known to be untouched.
                        protected::rederive_from_disk(&self.image, pi, lba, count);
                    }
                    pi.meta.end_write(lba, count);
                }
            }
            PiWork::Flush { ticket } => {
                if inflight.errno.is_none() {
                    // The data is durable (the sync op); now the tuples, then intents of
                    // regions that are durable and idle can go.
                    result = pi.meta.sync();
                    if result.is_ok() {
                        pi.meta.clear_intents(ticket);
                    }
                }
            }
        }
        if let Some((start, end)) = inflight.locked.take() {
            pi.ranges.unlock(start, end);
        }
        result
    }

    /// After a zero-copy write's data is on disk: compute its guards over guest memory again.
    /// Intervals whose guard changed were modified by the guest while the disk was reading
    /// them, so the disk may hold any mix: mark them for a rewrite from a snapshot (returns
    /// true), and remember the guest pages and disk region so later writes there bounce up
    /// front. A buffer changed and changed back during the write (A→B→A) passes this check;
    /// see docs/MUTATION.md and `--bounce always`.
    fn detect_mutation(&mut self, slot: u32) -> bool {
        let inflight = self.requests[slot as usize].as_mut().expect("live request");
        if !matches!(
            inflight.pi,
            PiWork::Write {
                mode: WriteMode::ZeroCopyChecked,
                ..
            }
        ) {
            return false;
        }
        let (format, interval) = match &self.pi {
            Some(pi) => (pi.format(), pi.interval() as usize),
            None => return false,
        };
        let PiWork::Write {
            mode: WriteMode::ZeroCopyChecked,
            guest,
            digests,
            rewriting,
            sampled_ns,
            ..
        } = &mut inflight.pi
        else {
            return false;
        };
        let started = sampled_ns.map(|_| policy::stopwatch());
        let mut now = Vec::with_capacity(digests.len());
        protected::guest_digests(&inflight.mem, guest, format, interval, None, &mut now);
        rewriting.extend((0..digests.len()).filter(|&i| now.get(i) != Some(&digests[i])));
        if let (Some(before), Some(started)) = (sampled_ns.take(), started) {
            let spent = before + policy::elapsed_ns(started);
            let len = (digests.len() * interval) as u64;
            let mutated = !rewriting.is_empty();
            // A write the guest changed costs a rewrite, but that is the guest's doing, not
            // the path's: only clean samples teach the model.
            if !mutated {
                self.record_cost(len, WritePath::ZeroCopy, spent);
                return false;
            }
        }
        let inflight = self.requests[slot as usize].as_mut().expect("live request");
        let PiWork::Write {
            lba,
            guest,
            rewriting,
            ..
        } = &mut inflight.pi
        else {
            return false;
        };
        if rewriting.is_empty() {
            return false;
        }
        inflight.stage = Stage::Rewrite;
        QueueStats::bump(&self.stats.writes_rewritten, 1);
        QueueStats::bump(&self.stats.intervals_rewritten, rewriting.len() as u64);
        for &i in rewriting.iter() {
            let start = (i * interval) as u64;
            for byte in [start, start + interval as u64 - 1] {
                if let Some(gpa) = protected::guest_address(guest, byte) {
                    self.tracker.mark_page(gpa);
                }
            }
            self.tracker
                .mark_region((*lba + i as u64) * interval as u64);
        }
        tracing::debug!(
            lba = *lba,
            intervals = rewriting.len(),
            "guest changed a zero-copy write in flight; rewriting from a snapshot"
        );
        true
    }

    /// Rewrite the intervals `detect_mutation` found from a snapshot: copy them out of guest
    /// memory into a pool buffer with their guards computed in the same pass, write them, and
    /// only then (with the other intervals' original guards) store the tuples and complete.
    /// Whatever the guest does next, disk and tuples agree.
    fn rewrite(&mut self, slot: u32, done: &mut Vec<UsedEntry>) {
        let pi = self.pi.clone().expect("only PI writes are rewritten");
        let interval = pi.interval() as usize;
        let count = match self.requests[slot as usize].as_ref().map(|r| &r.pi) {
            Some(PiWork::Write { rewriting, .. }) => rewriting.len(),
            _ => return,
        };
        let bounce = self.take_bounce(count * interval, done);
        let inflight = self.requests[slot as usize].as_mut().expect("live request");
        let PiWork::Write {
            lba,
            guards,
            guest,
            rewriting,
            ..
        } = &mut inflight.pi
        else {
            unreachable!("checked above")
        };
        let mut dst = self.pool.slices_mut(&bounce);
        let fresh = protected::snapshot_intervals(
            &inflight.mem,
            guest,
            rewriting,
            &mut dst,
            pi.format(),
            interval,
        );
        let mut ops = Vec::with_capacity(count);
        for (j, (&i, guard)) in rewriting.iter().zip(fresh).enumerate() {
            guards[i] = guard;
            let offset = (*lba + i as u64) * interval as u64;
            let iov = self.pool.iovec_at(&bounce, j * interval, interval);
            ops.push(Op::transfer(OpKind::Write, offset, vec![iov], 0));
        }
        inflight.rewrite = Some(bounce);
        for op in ops {
            if self.queue_op(slot, op).is_err() {
                break;
            }
        }
        let inflight = self.requests[slot as usize].as_ref().expect("live request");
        if inflight.pending_ops == 0 {
            // Nothing could be queued (queue_op recorded the error): finish now with IOERR.
            let inflight = self.requests[slot as usize].take().expect("live request");
            self.free_requests.push(slot);
            self.complete(inflight, done);
        } else {
            self.submit();
        }
    }

    /// A read whose data did not verify: re-read it with the range locked (no write can be
    /// in flight there) into a buffer and verify again. If that verifies, the first read
    /// raced a write or the guest changed its buffer: hand over the verified data. If not,
    /// it is a real guard error: report every failing interval and complete with IOERR.
    fn retry_read(&mut self, mut inflight: InFlight, done: &mut Vec<UsedEntry>) {
        let pi = self.pi.clone().expect("only PI reads are retried");
        let PiWork::Read { lba, count, .. } = inflight.pi else {
            unreachable!("only reads are retried")
        };
        self.lock_range(&pi, lba, lba + count, done);
        let status = match protected::read_intervals(&self.image, &pi, lba, count) {
            Err(e) => {
                tracing::warn!(lba, count, error = %e, "re-reading a block that failed verification failed");
                QueueStats::bump(&self.stats.io_errors, 1);
                VIRTIO_BLK_S_IOERR
            }
            Ok(buffer) => {
                let failures = protected::verify_buffer(&pi, buffer.as_slice(), lba);
                if failures.is_empty() {
                    QueueStats::bump(&self.stats.read_retries_healed, 1);
                    pi.counters
                        .read_retries_healed
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let PiWork::Read { guest, .. } = &inflight.pi else {
                        unreachable!("checked above")
                    };
                    if write_guest(&inflight.mem, guest, &[buffer.as_slice()]).is_ok() {
                        VIRTIO_BLK_S_OK
                    } else {
                        VIRTIO_BLK_S_IOERR
                    }
                } else {
                    for (l, e) in &failures {
                        pi.report(*l, e, "read");
                    }
                    QueueStats::bump(&self.stats.guard_errors, 1);
                    QueueStats::bump(&self.stats.io_errors, 1);
                    VIRTIO_BLK_S_IOERR
                }
            }
        };
        pi.ranges.unlock(lba, lba + count);
        done.push(self.write_status(&mut inflight, status));
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

/// Fill `out` (a buffer's pieces, in order) from the guest ranges, in order.
fn read_guest(
    mem: &GuestMemoryMmap,
    ranges: &[GuestRange],
    out: &mut [&mut [u8]],
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut pieces = out.iter_mut();
    let mut piece: &mut [u8] = pieces.next().map_or(&mut [], |p| &mut **p);
    for r in ranges {
        let (mut addr, mut left) = (r.addr, r.len as usize);
        while left > 0 {
            while piece.is_empty() {
                match pieces.next() {
                    Some(p) => piece = &mut **p,
                    None => return Ok(()),
                }
            }
            let n = left.min(piece.len());
            let (head, tail) = std::mem::take(&mut piece).split_at_mut(n);
            mem.read_slice(head, addr)?;
            piece = tail;
            addr = GuestAddress(addr.0 + n as u64);
            left -= n;
        }
    }
    Ok(())
}

/// Host iovecs for the guest ranges (validated against this memory by the parser).
fn guest_iovecs(mem: &GuestMemoryMmap, data: &[GuestRange]) -> Vec<libc::iovec> {
    let mut iovecs = Vec::with_capacity(data.len());
    for range in data {
        for slice in mem.get_slices(range.addr, range.len as usize) {
            let slice = slice.expect("range validated against this memory snapshot");
            iovecs.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr() as *mut libc::c_void,
                iov_len: slice.len(),
            });
        }
    }
    iovecs
}

/// Copy `pieces` (a buffer's bytes, in order) into the guest ranges, in order, stopping
/// when either runs out.
fn write_guest(
    mem: &GuestMemoryMmap,
    ranges: &[GuestRange],
    pieces: &[&[u8]],
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut pieces = pieces.iter();
    let mut piece: &[u8] = pieces.next().copied().unwrap_or(&[]);
    for r in ranges {
        let (mut addr, mut left) = (r.addr, r.len as usize);
        while left > 0 {
            while piece.is_empty() {
                match pieces.next() {
                    Some(p) => piece = p,
                    None => return Ok(()),
                }
            }
            let n = left.min(piece.len());
            mem.write_slice(&piece[..n], addr)?;
            piece = &piece[n..];
            addr = GuestAddress(addr.0 + n as u64);
            left -= n;
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "executor_tests.rs"]
mod tests;
