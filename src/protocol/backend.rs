//! The vhost-user-blk device: implements `VhostUserBackend` on top of the request layer.
//!
//! Owns the vrings' side of the protocol: one worker thread per queue (vhost-user-backend
//! runs them), each with its own [`Executor`] and io_uring behind a per-queue mutex that only
//! that queue's worker and the frontend thread (GET_VRING_BASE) ever take. Queues share the
//! image and nothing mutable. Validation and I/O live in `requests`; this module turns kicks
//! into started requests and finished requests into used-ring entries.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserInflight, VhostUserLog, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringRwLock, VringT};
use virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR;
use virtio_queue::QueueT;
use vm_memory::{
    GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::config_space::{parse_wce_write, BlkConfig};
use super::dirty_log::{DirtyLog, DirtyMarker};
use super::features;
use super::handover::{Claim, DeviceLedger};
use super::inflight::{ChainWalk, InflightRegion};
use super::memory_table;
use super::polling::PollGovernor;
use crate::integrity::PiStore;
use crate::requests::bounce::CHUNK;
use crate::requests::mutation::MutationTracker;
use crate::requests::parse::parse_request;
use crate::requests::policy::{self, AutoPath, CostBasis, WriteCosts};
use crate::requests::{Executor, Limits, Protection, QueueCounters, UsedEntry, WritePolicy};
use crate::storage::{EngineChoice, Image, SECTOR_SIZE};

pub type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap>;
pub type Vring = VringRwLock<GuestMemory>;

/// Largest single data segment the guest may send (virtio size_max): a bounce-pool chunk, so
/// that any request the device accepts (at most queue size − 2 segments) fits the queue's
/// pool, which has a chunk per queue slot.
pub const SEGMENT_SIZE_MAX: u32 = CHUNK as u32;
const MAX_RANGE_SEGMENTS: u32 = 32;
/// Data a queue moves before returning completions mid-batch (about 25 µs of copying).
const COMPLETION_BATCH_BYTES: u64 = 256 << 10;
const MAX_RANGE_SECTORS: u32 = 1 << 22;
/// Requests a queue starts before handing them to the kernel mid-batch. Submitting only at
/// the end of a batch kept the device idle while the rest of the batch was parsed: on XFS
/// over a loop device, submitting every 8 took 4 KiB random reads at QD 32 from 116-131K to
/// 155-167K IOPS and writes from 114-119K to 134-156K; every 1 or 2 cost a system call per
/// request or two and ran slower than not at all.
const SUBMIT_BATCH: usize = 8;
/// How often a teardown that waits for the disk says so.
const QUIESCE_REPORT: Duration = Duration::from_secs(5);

/// What the operator chose for the device.
#[derive(Debug, Clone)]
pub struct DeviceSettings {
    pub num_queues: u16,
    pub queue_size: u16,
    pub serial: String,
    /// Initial write-cache mode; the guest may toggle it through CONFIG_WCE.
    pub writeback: bool,
    /// `--io-engine`, resolved against the image when the device is built.
    pub engine: EngineChoice,
    /// How long a queue thread keeps polling for work before sleeping.
    pub poll_window: Duration,
    /// How PI writes treat guest buffers (`--bounce`, `--no-mutation-check`).
    pub write_policy: WritePolicy,
    /// With `--bounce auto`: how the path of writes without expected mutation is chosen.
    pub auto_path: AutoPath,
}

struct QueueWorker {
    index: u16,
    executor: Executor,
    /// Captured on the first event so GET_VRING_BASE can complete requests without one.
    vring: Option<Vring>,
    done: Vec<UsedEntry>,
    polling: PollGovernor,
    /// The frontend's in-flight region (SET_INFLIGHT_FD), once it sent one.
    inflight: Option<Arc<InflightRegion>>,
    /// The region came with this session and has not been recovered for this queue yet.
    recover_pending: bool,
    /// Pop order of the next request, recorded in the region.
    pop_counter: u64,
    /// The in-flight cap was hit (logged once per session).
    in_flight_capped: bool,
}

struct Device {
    /// This connection's number (the daemon counts them), as the ledger knows it.
    session: u64,
    /// Which session's device may do I/O (protocol/handover.rs).
    ledger: Arc<DeviceLedger>,
    /// This device holds the image in the ledger (fast path for every event).
    holds_image: AtomicBool,
    /// Queues started and not stopped since (bit per queue).
    started_queues: AtomicU64,
    /// Requests answered IOERR because another guest held the image.
    refused: AtomicU64,
    /// "Waiting for the migration source" was logged.
    wait_logged: AtomicBool,
    dirty_log: DirtyLog,
    config: BlkConfig,
    queue_size: u16,
    queues: Vec<Mutex<QueueWorker>>,
    mem: GuestMemory,
    event_idx: AtomicBool,
    writeback: AtomicBool,
    acked_features: AtomicU64,
    read_only: bool,
    /// The frontend sent a message the device answers (features, config, memory). A
    /// connection that closes without one is a liveness probe, such as another guardblk's
    /// check whether the socket is in use, not a session.
    heard_from_frontend: AtomicBool,
    /// The connection ended: queue threads finish what they accepted and pop nothing new
    /// (a guest that keeps its ring full would otherwise keep the old session's threads
    /// serving forever, and the teardown waiting for them).
    ending: AtomicBool,
}

/// One frontend session's device. Cheap to clone (vhost-user-backend hands clones to its
/// worker threads); a new one is built per connection around the shared image.
#[derive(Clone)]
pub struct BlkBackend {
    device: Arc<Device>,
}

impl BlkBackend {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        session: u64,
        ledger: Arc<DeviceLedger>,
        image: Arc<Image>,
        pi: Option<Arc<PiStore>>,
        tracker: &Arc<MutationTracker>,
        settings: &DeviceSettings,
        cost_basis: &CostBasis,
        counters: &[Arc<QueueCounters>],
    ) -> io::Result<BlkBackend> {
        let block_size = pi.as_ref().map_or(SECTOR_SIZE as u32, |p| p.interval());
        let config = blk_config(&image, settings, block_size);
        let queues = (0..settings.num_queues as usize)
            .map(|q| {
                let executor = Executor::new(
                    Arc::clone(&image),
                    config.limits.clone(),
                    &settings.serial,
                    settings.queue_size,
                    Arc::clone(&counters[q]),
                    image.engine_for(settings.engine),
                    Protection {
                        pi: pi.clone(),
                        policy: settings.write_policy,
                        tracker: Arc::clone(tracker),
                        costs: WriteCosts::resume(
                            cost_basis,
                            counters[q]
                                .write_path
                                .each_ref()
                                .map(|slot| policy::unpack(slot.load(Ordering::Relaxed))),
                        ),
                    },
                )?;
                Ok(Mutex::new(QueueWorker {
                    index: q as u16,
                    executor,
                    vring: None,
                    done: Vec::new(),
                    polling: PollGovernor::new(settings.poll_window),
                    inflight: None,
                    recover_pending: false,
                    pop_counter: 0,
                    in_flight_capped: false,
                }))
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(BlkBackend {
            device: Arc::new(Device {
                session,
                ledger,
                holds_image: AtomicBool::new(false),
                started_queues: AtomicU64::new(0),
                refused: AtomicU64::new(0),
                wait_logged: AtomicBool::new(false),
                dirty_log: DirtyLog::default(),
                config,
                queue_size: settings.queue_size,
                queues,
                mem: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
                event_idx: AtomicBool::new(false),
                writeback: AtomicBool::new(settings.writeback),
                acked_features: AtomicU64::new(0),
                read_only: image.read_only(),
                heard_from_frontend: AtomicBool::new(false),
                ending: AtomicBool::new(false),
            }),
        })
    }

    /// The guest-memory handle to give the vhost-user daemon (shared with this backend).
    pub fn memory(&self) -> GuestMemory {
        self.device.mem.clone()
    }

    pub fn acked_features(&self) -> u64 {
        self.device.acked_features.load(Ordering::Relaxed)
    }

    /// Did the frontend ever talk to the device? (See `Device::heard_from_frontend`.)
    pub fn heard_from_frontend(&self) -> bool {
        self.device.heard_from_frontend.load(Ordering::Relaxed)
    }

    /// The frontend spoke: from here on the connection is a session (logged once).
    fn heard(&self) {
        if !self
            .device
            .heard_from_frontend
            .swap(true, Ordering::Relaxed)
        {
            tracing::info!(session = self.device.session, "frontend connected");
        }
    }

    /// epoll token of a queue's io_uring completion eventfd (above the vring tokens).
    fn completion_token(&self) -> u16 {
        self.device.queues.len() as u16 + 1
    }

    /// Let each queue's worker thread wake up on its io_uring completions.
    pub fn register_completion_events(
        &self,
        handlers: &[Arc<VringEpollHandler<BlkBackend>>],
    ) -> io::Result<()> {
        for (queue, handler) in self.device.queues.iter().zip(handlers) {
            if let Some(fd) = lock(queue).executor.completion_fd() {
                handler.register_listener(fd, EventSet::IN, u64::from(self.completion_token()))?;
            }
        }
        Ok(())
    }

    /// The connection ended (the frontend left, or the daemon is stopping): from now on the
    /// queue threads pop no new requests, and [`BlkBackend::quiesce`] waits for the accepted
    /// ones. Call before the vhost-user daemon (and with it the queue threads) is dropped.
    pub fn begin_teardown(&self) {
        self.device.ending.store(true, Ordering::Release);
    }

    /// Wait until every queue has finished what it accepted, while the queue threads still
    /// run. They must: a re-read on one queue may wait for a range lock that a write on
    /// another queue holds, and only that queue's thread (woken by its completions) finishes
    /// the write. Draining the queues one after another once their threads were gone
    /// waited forever there. A queue whose thread is not busy is reaped here as well.
    pub fn quiesce(&self) {
        let started = Instant::now();
        let mut next_report = started + QUIESCE_REPORT;
        loop {
            let mut busy = 0usize;
            for queue in &self.device.queues {
                let Ok(mut worker) = queue.try_lock() else {
                    busy += 1; // its thread is working on it
                    continue;
                };
                let worker = &mut *worker;
                if worker.executor.idle() {
                    continue;
                }
                worker.executor.reap(&mut worker.done);
                if let Some(vring) = worker.vring.clone() {
                    self.push_used(worker, &vring);
                }
                if !worker.executor.idle() {
                    busy += 1;
                }
            }
            if busy == 0 {
                return;
            }
            let now = Instant::now();
            if now >= next_report {
                tracing::warn!(
                    session = self.device.session,
                    waited_s = now.duration_since(started).as_secs(),
                    queues_busy = busy,
                    "the frontend left; still waiting for requests the disk has not finished (their buffers stay until it does)"
                );
                next_report = now + QUIESCE_REPORT;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Session teardown, after the queue threads are gone: finish anything left (normally
    /// nothing: [`BlkBackend::quiesce`] ran), then give the image back to the ledger.
    /// Returns how many requests were refused because another session held the image.
    pub fn end_session(&self) -> u64 {
        self.device.ending.store(true, Ordering::Release);
        for queue in &self.device.queues {
            let mut worker = lock(queue);
            let worker = &mut *worker;
            worker.executor.drain(&mut worker.done);
            if let Some(vring) = worker.vring.clone() {
                self.push_used(worker, &vring);
            }
        }
        self.device.holds_image.store(false, Ordering::SeqCst);
        self.device.ledger.release(self.device.session);
        self.device.refused.load(Ordering::Relaxed)
    }

    /// May this session's device do I/O now? Claims the image on first use.
    fn claim_image(&self) -> Claim {
        let device = &self.device;
        if device.holds_image.load(Ordering::Acquire) {
            return Claim::Granted;
        }
        let weak = Arc::downgrade(&self.device);
        let claim = device.ledger.claim(device.session, move || {
            if let Some(device) = weak.upgrade() {
                device.kick_started_queues();
            }
        });
        match claim {
            Claim::Granted => {
                device.holds_image.store(true, Ordering::Release);
                device
                    .ledger
                    .set_migrating(device.session, device.dirty_log.enabled());
                if device.wait_logged.load(Ordering::Relaxed) {
                    tracing::info!(
                        session = device.session,
                        "the migration source stopped its device: this session serves the image now"
                    );
                }
            }
            Claim::Wait => {
                if !device.wait_logged.swap(true, Ordering::Relaxed) {
                    tracing::info!(
                        session = device.session,
                        holder = ?device.ledger.holder(),
                        "device started while the session it migrates from still runs: its requests wait for the hand-over"
                    );
                }
            }
            Claim::Refused { holder } => {
                if device.refused.load(Ordering::Relaxed) == 0 {
                    tracing::error!(
                        session = device.session,
                        holder,
                        "a second guest started its device while session {holder}'s guest uses this image (and is not migrating): its requests fail with IOERR until that guest stops"
                    );
                }
            }
        }
        claim
    }

    /// Answer every queued request with IOERR, touching nothing but each status byte: another
    /// guest holds the image.
    fn refuse_queued(&self, worker: &mut QueueWorker, vring: &Vring) {
        let limits = &self.device.config.limits;
        let mut rearmed_with_more = false;
        loop {
            let table = self.device.mem.memory().into_inner();
            let popped = vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(&*table);
            let Some(chain) = popped else {
                self.push_used(worker, vring);
                // With EVENT_IDX the guest kicks only past the avail event we publish: re-arm
                // it, and look again if more came meanwhile, or later requests would go
                // unanswered. Once: see `rearmed_with_more` in process_queue.
                if !rearmed_with_more && vring.enable_notification().unwrap_or(false) {
                    rearmed_with_more = true;
                    continue;
                }
                return;
            };
            rearmed_with_more = false;
            let head = chain.head_index();
            let status = match parse_request(head, chain, &table, limits) {
                Ok(request) => Some(request.status),
                Err(rejected) => rejected.status,
            };
            let len = match status {
                Some(at) => {
                    use vm_memory::Bytes;
                    u32::from(table.write_obj(VIRTIO_BLK_S_IOERR, at).is_ok())
                }
                None => 0,
            };
            worker.done.push(UsedEntry { head, len });
            self.device.refused.fetch_add(1, Ordering::Relaxed);
            if worker.done.len() >= usize::from(self.device.queue_size) {
                self.push_used(worker, vring);
            }
        }
    }

    /// Serve the queue until it has nothing to do: start new requests, collect completions,
    /// return used entries. While idle with nothing in flight the thread polls the ring for
    /// a while (with guest notifications off), which saves the guest a kick and us a wakeup;
    /// [`PollGovernor`] decides how long. Then notifications are re-enabled and the thread
    /// sleeps in epoll until a kick or a completion.
    fn process_queue(&self, worker: &mut QueueWorker, vring: &Vring) {
        if self.device.ending.load(Ordering::Acquire) {
            // The connection ended: only finish what was accepted (see begin_teardown).
            worker.executor.reap(&mut worker.done);
            return self.push_used(worker, vring);
        }
        // A kick can beat the queue-started hook to the worker lock: recover before popping
        // anything, or requests still in flight would be taken again as new ones.
        // A kick that raced with GET_VRING_BASE finds the queue stopped: nothing to do.
        if !vring.get_ref().get_queue().ready() {
            return;
        }
        match self.claim_image() {
            Claim::Granted => {}
            Claim::Wait => return,
            Claim::Refused { .. } => return self.refuse_queued(worker, vring),
        }
        if worker.recover_pending {
            self.recover_in_flight(worker, vring);
        }
        let event_idx = self.device.event_idx.load(Ordering::Relaxed);
        let write_through = !self.device.writeback.load(Ordering::Relaxed);
        let mut last_work = Instant::now();
        let mut last_spin = last_work;
        let mut pass_started = last_work;
        if event_idx {
            let _ = vring.disable_notification();
        }
        // A driver can never have more requests outstanding than its ring has descriptors;
        // one that reuses heads still in flight could otherwise grow the executor's table
        // without bound. Past this, requests wait in the ring for completions.
        let max_in_flight = usize::from(vring.get_ref().get_queue().size());
        // A re-arm saw more queued, and nothing has been popped since. virtio-queue pops
        // nothing from a queue stopped under us (GET_VRING_BASE) or whose avail index is
        // more than a ring ahead (a broken or hostile guest), while the re-arm still sees
        // entries: a second such re-arm means sleeping until the next kick, not spinning
        // on it forever with the queue locked.
        let mut rearmed_with_more = false;
        loop {
            if self.device.ending.load(Ordering::Acquire) {
                return;
            }
            worker.executor.set_clock(pass_started);
            let mut started = 0usize;
            let mut unreported_bytes = 0u64;
            loop {
                // A guest that refills as fast as we answer never empties the ring: look for
                // the end of the connection before every pop, not only between passes.
                if self.device.ending.load(Ordering::Relaxed) {
                    break;
                }
                if worker.executor.in_flight() >= max_in_flight {
                    if !worker.in_flight_capped {
                        worker.in_flight_capped = true;
                        tracing::warn!(
                            queue = worker.index,
                            max_in_flight,
                            "the guest keeps more requests in flight than its ring has descriptors (reused heads?): the rest wait in the ring"
                        );
                    }
                    break;
                }
                // The memory table may change at any time (the frontend adds a region, waits
                // for our acknowledgement, then posts requests that use it). Load it afresh
                // for every chain, and again once the chain is seen: a table loaded before the
                // chain appeared may predate the region the chain's buffers live in.
                let table = self.device.mem.memory().into_inner();
                // Its own statement: the vring lock must be released before the body, which
                // may take it again (push_used).
                let popped = vring
                    .get_mut()
                    .get_queue_mut()
                    .pop_descriptor_chain(&*table);
                let Some(chain) = popped else { break };
                let mem = self.device.mem.memory().into_inner();
                let head = chain.head_index();
                if let Some(region) = &worker.inflight {
                    if let Some(q) = region.queue(worker.index) {
                        q.mark_popped(head, worker.pop_counter);
                        worker.pop_counter = worker.pop_counter.wrapping_add(1);
                    }
                }
                unreported_bytes +=
                    worker
                        .executor
                        .start(head, chain, &mem, write_through, &mut worker.done);
                started += 1;
                if started.is_multiple_of(SUBMIT_BATCH) {
                    worker.executor.submit();
                }
                // Hand back completions every so often within a long batch, so the guest can
                // refill its queue while we keep working instead of after the whole batch.
                if unreported_bytes >= COMPLETION_BATCH_BYTES {
                    worker.executor.reap(&mut worker.done);
                    self.push_used(worker, vring);
                    unreported_bytes = 0;
                }
            }
            // Submits, then collects whatever already completed (fast targets complete
            // during submission), saving an epoll round trip for those.
            worker.executor.reap(&mut worker.done);
            let completed = worker.done.len();
            self.push_used(worker, vring);
            if worker.executor.in_flight() >= max_in_flight {
                // Capped: the next completion's event brings the thread back to pop more.
                return;
            }
            let now = Instant::now();
            pass_started = now;
            if started > 0 || completed > 0 {
                last_work = now;
                last_spin = now;
                rearmed_with_more = false;
                continue;
            }
            let in_flight = worker.executor.in_flight();
            if worker.polling.keep_spinning(now, last_work, in_flight) {
                if worker.polling.spun(last_spin, now) && worker.polling.pauses() == 1 {
                    tracing::info!(
                        "a queue thread was preempted while polling: its CPU is shared with \
                         another busy task, so it sleeps between requests for a while (polling \
                         resumes once the CPU is free again)"
                    );
                }
                last_spin = now;
                std::hint::spin_loop();
                continue;
            }
            // Going to sleep. With EVENT_IDX, re-enable kicks and re-check: the guest may
            // have queued more between our last pop and the re-enable.
            if !event_idx {
                break;
            }
            let rearmed = vring.enable_notification();
            // The avail event it wrote is in the used ring: the migration must see it, or
            // the destination's guest may hold back its next kick.
            if let Some(marker) = self.device.dirty_log.marker() {
                mark_used_ring(&marker, vring);
            }
            match rearmed {
                Ok(true) if !rearmed_with_more => {
                    rearmed_with_more = true;
                    let _ = vring.disable_notification();
                }
                _ => break,
            }
        }
    }

    /// A queue started with an in-flight region from the frontend: finish what a crashed
    /// predecessor left half done, and resubmit the requests it never answered, oldest
    /// first, before the queue takes new ones (protocol/inflight.rs, docs/RESTART.md).
    fn recover_in_flight(&self, worker: &mut QueueWorker, vring: &Vring) {
        if !std::mem::take(&mut worker.recover_pending) {
            return;
        }
        let Some(region) = worker.inflight.clone() else {
            return;
        };
        let Some(q) = region.queue(worker.index) else {
            return;
        };
        worker.vring.get_or_insert_with(|| vring.clone());
        let used = match vring.queue_used_idx() {
            Ok(used) => used,
            Err(e) => {
                tracing::warn!(queue = worker.index, error = ?e, "cannot read the used index; in-flight requests not recovered");
                return;
            }
        };
        let ring_size = vring.get_ref().get_queue().size();
        let recovery = match q.recover(used, ring_size) {
            Ok(r) => r,
            Err(e) => {
                // Never trust a region that makes no sense: stop recording in it.
                tracing::warn!(queue = worker.index, error = %e, "in-flight region unusable; the queue runs without it");
                worker.inflight = None;
                return;
            }
        };
        worker.pop_counter = recovery.next_counter;
        // The region, not SET_VRING_BASE, says where the queue is: QEMU sets the base to the
        // used index it read when the connection dropped, but a daemon stopping with SIGTERM
        // completes what it still holds after that, so the used index (and the avail
        // position after every request ever popped) may be further on. Starting at QEMU's
        // base would run those requests, already answered, a second time.
        vring.set_queue_next_avail(recovery.next_avail);
        if recovery.resubmit.is_empty() && !recovery.finished_interrupted_completion {
            tracing::debug!(
                queue = worker.index,
                next_avail = recovery.next_avail,
                "in-flight region: nothing was left in flight"
            );
            return;
        }
        let (desc_table, size) = {
            let state = vring.get_ref();
            let queue = state.get_queue();
            (queue.desc_table(), queue.size())
        };
        let mem = self.device.mem.memory().into_inner();
        let write_through = !self.device.writeback.load(Ordering::Relaxed);
        let mut resubmitted = 0u64;
        // `recover` checked every head against the ring's size.
        for &head in &recovery.resubmit {
            let chain = ChainWalk::new(&mem, desc_table, size, head);
            worker
                .executor
                .start(head, chain, &mem, write_through, &mut worker.done);
            resubmitted += 1;
        }
        worker
            .executor
            .counters()
            .requests_resubmitted
            .add(resubmitted);
        worker.executor.reap(&mut worker.done);
        self.push_used(worker, vring);
        tracing::info!(
            queue = worker.index,
            resubmitted,
            finished_interrupted_completion = recovery.finished_interrupted_completion,
            next_avail = recovery.next_avail,
            "recovered the requests a previous daemon left in flight"
        );
    }

    fn push_used(&self, worker: &mut QueueWorker, vring: &Vring) {
        if worker.done.is_empty() {
            return;
        }
        let region = worker.inflight.as_ref().and_then(|r| r.queue(worker.index));
        // With an in-flight region, each entry is retired there around its used-ring update,
        // in the order a restarted daemon's recovery expects (protocol/inflight.rs).
        let mut used_idx = region
            .as_ref()
            .map(|_| vring.get_ref().get_queue().next_used());
        let marker = self.device.dirty_log.marker();
        if let Some(marker) = &marker {
            self.mark_written(marker, vring, &worker.done);
        }
        for entry in worker.done.drain(..) {
            if let Some(q) = &region {
                q.before_used(entry.head);
            }
            match vring.add_used(entry.head, entry.len) {
                Ok(()) => {
                    if let (Some(q), Some(idx)) = (&region, used_idx.as_mut()) {
                        *idx = idx.wrapping_add(1);
                        q.after_used(entry.head, *idx);
                    }
                }
                Err(e) => {
                    tracing::error!(head = entry.head, error = ?e, "cannot add used-ring entry")
                }
            }
        }
        if let Some(marker) = &marker {
            mark_used_ring(marker, vring);
        }
        if vring.needs_notification().unwrap_or(true) {
            if let Err(e) = vring.signal_used_queue() {
                tracing::debug!(error = %e, "cannot signal the guest (frontend gone?)");
            }
        }
    }
}

impl BlkBackend {
    /// Mark in the dirty log everything the device may have written for these requests:
    /// every device-writable buffer of each chain (data, GET_ID string, status byte), walked
    /// again from the descriptor table. Runs only while a migration logs, before the used
    /// entries are published, so QEMU copies each page again after our write.
    fn mark_written(&self, marker: &DirtyMarker, vring: &Vring, done: &[UsedEntry]) {
        let (desc_table, size) = {
            let state = vring.get_ref();
            let queue = state.get_queue();
            (queue.desc_table(), queue.size())
        };
        let mem = self.device.mem.memory().into_inner();
        for entry in done {
            for desc in ChainWalk::new(&mem, desc_table, size, entry.head) {
                if desc.is_write_only() {
                    marker.mark(desc.addr().0, u64::from(desc.len()));
                }
            }
        }
    }
}

/// Mark the whole used ring (flags, index, entries, avail event): small, and every part of
/// it may have changed.
fn mark_used_ring(marker: &DirtyMarker, vring: &Vring) {
    let state = vring.get_ref();
    let queue = state.get_queue();
    marker.mark(queue.used_ring(), 6 + 8 * u64::from(queue.size()));
}

impl Device {
    /// Kick every started queue of this device (its claim on the image was granted after a
    /// wait: requests the guest queued meanwhile need a thread to look at them).
    fn kick_started_queues(&self) {
        for queue in &self.queues {
            if let Some(vring) = lock(queue).vring.clone() {
                kick(&vring);
            }
        }
    }
}

/// Wake a queue's thread as the guest's kick would.
fn kick(vring: &Vring) {
    if let Some(kick) = vring.get_ref().get_kick() {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writing 8 bytes from a live buffer to the kick eventfd the vring owns (an
        // eventfd takes exactly one u64); the result is ignored, a full counter already
        // means "kicked".
        let _ = unsafe {
            libc::write(
                std::os::fd::AsRawFd::as_raw_fd(kick),
                one.as_ptr().cast(),
                one.len(),
            )
        };
    }
}

fn lock(queue: &Mutex<QueueWorker>) -> MutexGuard<'_, QueueWorker> {
    // A panic while holding a queue lock is a bug; keep serving the other queues regardless.
    queue
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Geometry and limits for this image and these settings. With PI the logical block size
/// is the protection interval, so every request covers whole intervals.
fn blk_config(image: &Image, settings: &DeviceSettings, block_size: u32) -> BlkConfig {
    let max_segments = u32::from(settings.queue_size).saturating_sub(2).max(1);
    // Tell the guest the alignment O_DIRECT wants so its I/O stays zero-copy.
    let physical = image
        .direct_io()
        .map_or(SECTOR_SIZE, |a| a.offset.max(SECTOR_SIZE))
        .min(1 << 16);
    let physical_blocks = (physical / u64::from(block_size)).max(1);
    BlkConfig {
        limits: Limits {
            capacity_sectors: image.sectors(),
            block_size,
            max_segments,
            max_transfer_bytes: u64::from(max_segments) * u64::from(SEGMENT_SIZE_MAX),
            max_discard_segments: MAX_RANGE_SEGMENTS,
            max_discard_sectors: MAX_RANGE_SECTORS,
            max_write_zeroes_segments: MAX_RANGE_SEGMENTS,
            max_write_zeroes_sectors: MAX_RANGE_SECTORS,
            read_only: image.read_only(),
        },
        size_max: SEGMENT_SIZE_MAX,
        num_queues: settings.num_queues,
        physical_block_exp: physical_blocks.trailing_zeros() as u8,
        min_io_blocks: physical_blocks as u16,
        opt_io_blocks: 0,
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.device.queues.len()
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.device.queue_size)
    }

    fn features(&self) -> u64 {
        self.heard();
        features::device_features(self.device.read_only)
    }

    fn acked_features(&self, features: u64) {
        self.heard();
        self.device
            .acked_features
            .store(features, Ordering::Relaxed);
        let logging = features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0;
        if self.device.dirty_log.set_enabled(logging) {
            self.device
                .ledger
                .set_migrating(self.device.session, logging);
            if logging {
                tracing::info!(
                    session = self.device.session,
                    "live migration started: every write into guest memory is logged"
                );
            } else {
                tracing::info!(session = self.device.session, "dirty logging stopped");
            }
            return;
        }
        tracing::info!(features = %features::describe(features), "frontend negotiated virtio features");
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.heard();
        features::protocol_features()
    }

    fn set_event_idx(&self, enabled: bool) {
        self.device.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.heard();
        self.device
            .config
            .read(self.device.writeback.load(Ordering::Relaxed), offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        self.heard();
        let Some(writeback) = parse_wce_write(offset, buf) else {
            tracing::warn!(
                offset,
                len = buf.len(),
                "frontend wrote a read-only config field"
            );
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "only the wce config byte is writable",
            ));
        };
        let previous = self.device.writeback.swap(writeback, Ordering::Relaxed);
        if previous != writeback {
            tracing::info!(
                mode = if writeback {
                    "writeback"
                } else {
                    "writethrough"
                },
                "guest changed the write-cache mode"
            );
        }
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemory) -> io::Result<()> {
        self.heard();
        let snapshot = mem.memory();
        // A region past the end of its file would SIGBUS at its first touch
        // (memory_table.rs). The handler has already installed the table: take it away so
        // nothing touches it before the refusal ends the session.
        if let Err(e) = memory_table::check_backing(&snapshot) {
            tracing::error!(error = %e, "refused the frontend's memory table");
            mem.lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .replace(GuestMemoryMmap::new());
            return Err(e);
        }
        for region in snapshot.iter() {
            tracing::debug!(
                gpa = format_args!("{:#x}", region.start_addr().0),
                size = region.len(),
                "guest memory region"
            );
        }
        Ok(())
    }

    fn get_inflight_fd(
        &self,
        request: &VhostUserInflight,
    ) -> io::Result<(VhostUserInflight, std::fs::File)> {
        let (queues, size) = (request.num_queues, request.queue_size);
        if usize::from(queues) > self.device.queues.len() || size > self.device.queue_size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "in-flight region for {queues} queues of {size}: more than this device offers"
                ),
            ));
        }
        let (region, file) = InflightRegion::create(queues, size).map_err(io::Error::other)?;
        let mmap_size = region.len() as u64;
        tracing::debug!(
            queues,
            queue_size = size,
            bytes = mmap_size,
            "allocated the in-flight region"
        );
        Ok((
            VhostUserInflight {
                mmap_size,
                mmap_offset: 0,
                num_queues: queues,
                queue_size: size,
            },
            file,
        ))
    }

    fn set_inflight_fd(&self, inflight: &VhostUserInflight, file: std::fs::File) -> io::Result<()> {
        let region = InflightRegion::map(
            &file,
            inflight.mmap_offset,
            inflight.mmap_size,
            inflight.num_queues,
            inflight.queue_size,
        )
        .map_err(io::Error::other)?;
        let region = Arc::new(region);
        for queue in &self.device.queues {
            let mut worker = lock(queue);
            worker.inflight = Some(Arc::clone(&region));
            worker.recover_pending = true;
        }
        tracing::debug!(
            queues = inflight.num_queues,
            queue_size = inflight.queue_size,
            "frontend handed over the in-flight region"
        );
        Ok(())
    }

    fn set_log_base(&self, log: &VhostUserLog, file: &std::fs::File) -> io::Result<bool> {
        self.device
            .dirty_log
            .set_base(file, log.mmap_offset, log.mmap_size)
            .map_err(io::Error::other)?;
        tracing::debug!(bytes = log.mmap_size, "frontend handed over its dirty log");
        Ok(true)
    }

    fn queue_started(&self, index: u16, vring: &Vring) {
        if let Some(queue) = self.device.queues.get(usize::from(index)) {
            self.device
                .started_queues
                .fetch_or(1 << index, Ordering::SeqCst);
            let mut worker = lock(queue);
            worker.vring.get_or_insert_with(|| vring.clone());
            // Resubmitting is I/O: only once this session holds the image (otherwise the
            // queue's first event after the hand-over recovers).
            if self.claim_image() == Claim::Granted {
                self.recover_in_flight(&mut worker, vring);
            }
        }
        // Interrupt the guest once: completions a predecessor pushed while QEMU was
        // disconnected (a SIGTERM'd daemon finishes what it holds after the socket closed)
        // were signalled to no one, and the guest waits for them. A spurious interrupt is
        // harmless. (If the call fd comes after this, the vendor patch signals then.)
        let _ = vring.signal_used_queue();
        // Kick ourselves once: requests the guest queued while no daemon was connected were
        // announced to QEMU, not to us, and the guest will not kick again for them.
        kick(vring);
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.device.queues.len()).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let Some(queue) = self.device.queues.get(queue_index as usize) else {
            return Ok(());
        };
        {
            let mut worker = lock(queue);
            let worker = &mut *worker;
            let in_flight = worker.executor.in_flight();
            worker.executor.drain(&mut worker.done);
            if let Some(vring) = worker.vring.clone() {
                self.push_used(worker, &vring);
            }
            tracing::debug!(queue = queue_index, drained = in_flight, "queue stopped");
        }
        // The frontend stopped every queue (a VM stop, a reboot, the end of a migration): its
        // requests are drained and answered, so the image may pass to another session.
        let left = self
            .device
            .started_queues
            .fetch_and(!(1u64 << queue_index), Ordering::SeqCst)
            & !(1u64 << queue_index);
        if left == 0 && self.device.holds_image.swap(false, Ordering::SeqCst) {
            self.device.ledger.release(self.device.session);
            if self.device.dirty_log.enabled() {
                tracing::info!(
                    session = self.device.session,
                    "the migrating guest stopped: its requests are answered and logged, and the image passes to the destination"
                );
            } else {
                tracing::debug!(
                    session = self.device.session,
                    "device stopped: image released"
                );
            }
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        // One queue per thread: the thread's only vring is its queue.
        let (Some(queue), Some(vring)) = (self.device.queues.get(thread_id), vrings.first()) else {
            return Ok(());
        };
        let mut worker = lock(queue);
        let worker = &mut *worker;
        if worker.vring.is_none() {
            worker.vring = Some(vring.clone());
            tracing::debug!(
                queue = thread_id,
                size = vring.get_ref().get_queue().size(),
                "queue started"
            );
        }
        if device_event == self.completion_token() || device_event == 0 {
            self.process_queue(worker, vring);
        } else {
            tracing::warn!(device_event, "unexpected event on queue thread");
        }
        // Never return an error: it would end this queue's worker thread.
        Ok(())
    }
}

#[cfg(test)]
#[path = "backend_tests.rs"]
mod tests;
