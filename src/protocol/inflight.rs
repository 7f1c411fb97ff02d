//! The shared in-flight region of `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`, split rings (the
//! layout of QEMU's vhost-user spec, "Inflight I/O tracking"; design in docs/RESTART.md).
//!
//! The backend allocates the region (a sealed memfd) when QEMU asks with GET_INFLIGHT_FD; QEMU
//! keeps the fd across backend restarts and hands it back with SET_INFLIGHT_FD. Per queue it
//! records which descriptor heads were popped and not yet completed, in pop order, so a
//! restarted backend can answer exactly those — not "everything after the used index", which
//! is wrong for a backend that completes out of order, as guardblk does.
//!
//! Per queue, in this order (each store reaches the shared mapping in program order, which is
//! what a crash at any point leaves behind):
//! - pop: [`QueueRegion::mark_popped`] (counter, then in-flight flag) before the request's I/O;
//! - complete: [`QueueRegion::before_used`] (last batch head), the used-ring update, then
//!   [`QueueRegion::after_used`] (clear the flag, then record the used index);
//! - reconnect: [`QueueRegion::recover`] finishes a completion the crash interrupted between
//!   the used-ring update and `after_used`, and lists the heads still in flight, oldest first,
//!   for resubmission before any new request.
//!
//! `protocol/backend.rs` drives it: GET/SET_INFLIGHT_FD (through the patched
//! vhost-user-backend in vendor/), marks on pop and around `add_used`, recovery when a queue
//! starts.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};

use thiserror::Error;

use crate::storage::files::SharedMapping;

/// Bytes of one descriptor's state (DescStateSplit: inflight u8, padding, next u16, counter u64).
pub const DESC_STATE_BYTES: usize = 16;
/// Bytes of a queue region's header (QueueRegionSplit: features, version, desc_num,
/// last_batch_head, used_idx).
pub const QUEUE_HEADER_BYTES: usize = 16;
/// Queue regions start at multiples of this.
pub const QUEUE_ALIGNMENT: usize = 64;
/// The layout version this module writes; 0 marks a region never initialised.
pub const VERSION: u16 = 1;

const VERSION_AT: usize = 8;
const DESC_NUM_AT: usize = 10;
const LAST_BATCH_HEAD_AT: usize = 12;
const USED_IDX_AT: usize = 14;
const DESC_INFLIGHT_AT: usize = 0;
const DESC_NEXT_AT: usize = 6;
const DESC_COUNTER_AT: usize = 8;

#[derive(Debug, Error)]
pub enum InflightError {
    #[error("in-flight region of {size} bytes is too small for {queues} queues of {queue_size} descriptors ({needed} bytes)")]
    TooSmall {
        size: u64,
        queues: u16,
        queue_size: u16,
        needed: usize,
    },
    #[error("in-flight region asks for {queues} queues of {queue_size} descriptors, which guardblk does not serve")]
    BadGeometry { queues: u16, queue_size: u16 },
    #[error("in-flight region of queue {queue} has version {version}; this guardblk understands version {VERSION}")]
    UnknownVersion { queue: u16, version: u16 },
    #[error(
        "in-flight region of queue {queue} describes {found} descriptors, the queue has {expected}"
    )]
    DescNumMismatch {
        queue: u16,
        found: u16,
        expected: u16,
    },
    #[error("in-flight region of queue {queue} marks head {head} in flight, beyond the ring's {ring_size} descriptors")]
    HeadBeyondRing {
        queue: u16,
        head: u16,
        ring_size: u16,
    },
    #[error("in-flight region of queue {queue}: last batch of {count} from head {head} is not a valid chain of its descriptors")]
    BadLastBatch { queue: u16, head: u16, count: u16 },
    #[error("cannot allocate or map the in-flight region: {0}")]
    Io(#[from] io::Error),
}

/// Bytes one queue's region takes: header and descriptor states, rounded up to 64 bytes. Fixed
/// for good: a restarted guardblk reads regions an older one allocated.
pub fn queue_region_bytes(queue_size: u16) -> usize {
    (QUEUE_HEADER_BYTES + DESC_STATE_BYTES * usize::from(queue_size))
        .next_multiple_of(QUEUE_ALIGNMENT)
}

/// A whole in-flight region, mapped shared: one [`QueueRegion`] per queue.
pub struct InflightRegion {
    map: SharedMapping,
    queues: u16,
    queue_size: u16,
}

impl InflightRegion {
    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// A new, zeroed region for `queues` queues of `queue_size` descriptors (GET_INFLIGHT_FD),
    /// and the sealed memfd holding it, to hand to the frontend.
    pub fn create(queues: u16, queue_size: u16) -> Result<(InflightRegion, File), InflightError> {
        if queues == 0 || queue_size == 0 || queue_size > 32768 {
            return Err(InflightError::BadGeometry { queues, queue_size });
        }
        let len = queue_region_bytes(queue_size) * usize::from(queues);
        // SAFETY: a NUL-terminated name and valid flags; the returned fd (or -1) is checked.
        let fd = unsafe {
            libc::memfd_create(
                c"guardblk-inflight".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error().into());
        }
        // SAFETY: fd is a fresh descriptor nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64)?;
        // SAFETY: fcntl on our own memfd with valid seal flags.
        let sealed = unsafe {
            libc::fcntl(
                file.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL,
            )
        };
        if sealed < 0 {
            return Err(io::Error::last_os_error().into());
        }
        let region = InflightRegion::map(&file, 0, len as u64, queues, queue_size)?;
        Ok((region, file))
    }

    /// Map a region the frontend handed over (SET_INFLIGHT_FD). Its contents are checked by
    /// [`QueueRegion::recover`], queue by queue.
    pub fn map(
        file: &File,
        offset: u64,
        size: u64,
        queues: u16,
        queue_size: u16,
    ) -> Result<InflightRegion, InflightError> {
        if queues == 0 || queue_size == 0 || queue_size > 32768 {
            return Err(InflightError::BadGeometry { queues, queue_size });
        }
        let needed = queue_region_bytes(queue_size) * usize::from(queues);
        if size < needed as u64 {
            return Err(InflightError::TooSmall {
                size,
                queues,
                queue_size,
                needed,
            });
        }
        Ok(InflightRegion {
            map: SharedMapping::new(file, offset, needed, true)?,
            queues,
            queue_size,
        })
    }

    /// Queue `index`'s part of the region.
    pub fn queue(&self, index: u16) -> Option<QueueRegion<'_>> {
        (index < self.queues).then(|| QueueRegion {
            // SAFETY: index < queues, so the queue's region lies inside the mapping.
            base: unsafe {
                self.map
                    .as_ptr()
                    .add(usize::from(index) * queue_region_bytes(self.queue_size))
            },
            index,
            queue_size: self.queue_size,
            _region: std::marker::PhantomData,
        })
    }
}

/// One queue's state in the region.
pub struct QueueRegion<'a> {
    base: *mut u8,
    index: u16,
    queue_size: u16,
    _region: std::marker::PhantomData<&'a InflightRegion>,
}

/// What a reconnected queue must do before taking new requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Heads popped and never completed, oldest first: resubmit them in this order.
    pub resubmit: Vec<u16>,
    /// Where the queue's next pop is: the ring's used index plus the requests in flight.
    pub next_avail: u16,
    /// The counter value to give the next popped request.
    pub next_counter: u64,
    /// A completion the crash interrupted (used ring updated, region not) was finished.
    pub finished_interrupted_completion: bool,
}

impl QueueRegion<'_> {
    fn u8_at(&self, at: usize) -> &AtomicU8 {
        // SAFETY: `at` is inside this queue's region (callers pass header offsets or a
        // descriptor's offset below queue_size); the mapping lives as long as 'a.
        unsafe { AtomicU8::from_ptr(self.base.add(at)) }
    }

    fn u16_at(&self, at: usize) -> &AtomicU16 {
        // SAFETY: as above; every u16 field is at an even offset of a 64-byte-aligned region.
        unsafe { AtomicU16::from_ptr(self.base.add(at).cast()) }
    }

    fn u64_at(&self, at: usize) -> &AtomicU64 {
        // SAFETY: as above; u64 fields are at offsets that are multiples of 8.
        unsafe { AtomicU64::from_ptr(self.base.add(at).cast()) }
    }

    fn desc(head: u16) -> usize {
        QUEUE_HEADER_BYTES + usize::from(head) * DESC_STATE_BYTES
    }

    fn check_head(&self, head: u16) -> bool {
        head < self.queue_size
    }

    pub fn version(&self) -> u16 {
        self.u16_at(VERSION_AT).load(Ordering::Acquire)
    }

    pub fn used_idx(&self) -> u16 {
        self.u16_at(USED_IDX_AT).load(Ordering::Acquire)
    }

    pub fn is_in_flight(&self, head: u16) -> bool {
        self.check_head(head)
            && self
                .u8_at(Self::desc(head) + DESC_INFLIGHT_AT)
                .load(Ordering::Acquire)
                == 1
    }

    /// `head` was popped as request number `counter`: record it before its I/O starts.
    pub fn mark_popped(&self, head: u16, counter: u64) {
        if !self.check_head(head) {
            return;
        }
        self.u64_at(Self::desc(head) + DESC_COUNTER_AT)
            .store(counter, Ordering::Release);
        self.u8_at(Self::desc(head) + DESC_INFLIGHT_AT)
            .store(1, Ordering::Release);
    }

    /// `head` is about to be published in the used ring (a batch of one).
    pub fn before_used(&self, head: u16) {
        if self.check_head(head) {
            self.u16_at(LAST_BATCH_HEAD_AT)
                .store(head, Ordering::Release);
        }
    }

    /// `head` was published and the ring's used index is now `used_idx`.
    pub fn after_used(&self, head: u16, used_idx: u16) {
        if self.check_head(head) {
            self.u8_at(Self::desc(head) + DESC_INFLIGHT_AT)
                .store(0, Ordering::Release);
        }
        self.u16_at(USED_IDX_AT).store(used_idx, Ordering::Release);
    }

    /// At (re)connection, with the ring's used index as the guest sees it and the ring's size
    /// (at most the region's): initialise a fresh region, or finish an interrupted completion
    /// and list what is still in flight. Safe to run twice. A region whose contents make no
    /// sense is refused, never trusted.
    pub fn recover(&self, ring_used_idx: u16, ring_size: u16) -> Result<Recovery, InflightError> {
        let queue = self.index;
        match self.version() {
            0 => {
                self.u16_at(DESC_NUM_AT)
                    .store(self.queue_size, Ordering::Release);
                self.u16_at(USED_IDX_AT)
                    .store(ring_used_idx, Ordering::Release);
                self.u16_at(VERSION_AT).store(VERSION, Ordering::Release);
                return Ok(Recovery {
                    resubmit: Vec::new(),
                    next_avail: ring_used_idx,
                    next_counter: 0,
                    finished_interrupted_completion: false,
                });
            }
            VERSION => {}
            version => return Err(InflightError::UnknownVersion { queue, version }),
        }
        let desc_num = self.u16_at(DESC_NUM_AT).load(Ordering::Acquire);
        if desc_num != self.queue_size {
            return Err(InflightError::DescNumMismatch {
                queue,
                found: desc_num,
                expected: self.queue_size,
            });
        }
        // Published in the used ring but not yet retired here: the last batch completed.
        let behind = ring_used_idx.wrapping_sub(self.used_idx());
        let finished = behind != 0;
        if finished {
            let head = self.u16_at(LAST_BATCH_HEAD_AT).load(Ordering::Acquire);
            if behind > self.queue_size || !self.check_head(head) {
                return Err(InflightError::BadLastBatch {
                    queue,
                    head,
                    count: behind,
                });
            }
            // A batch of n is chained through `next` from its last head (guardblk writes
            // batches of one; a region from another backend may hold longer ones).
            let mut at = head;
            for i in 0..behind {
                if !self.check_head(at) {
                    return Err(InflightError::BadLastBatch {
                        queue,
                        head,
                        count: behind,
                    });
                }
                self.u8_at(Self::desc(at) + DESC_INFLIGHT_AT)
                    .store(0, Ordering::Release);
                if i + 1 < behind {
                    at = self
                        .u16_at(Self::desc(at) + DESC_NEXT_AT)
                        .load(Ordering::Acquire);
                }
            }
            self.u16_at(USED_IDX_AT)
                .store(ring_used_idx, Ordering::Release);
        }
        let mut in_flight: Vec<(u64, u16)> = (0..self.queue_size)
            .filter(|&h| self.is_in_flight(h))
            .map(|h| {
                let counter = self
                    .u64_at(Self::desc(h) + DESC_COUNTER_AT)
                    .load(Ordering::Acquire);
                (counter, h)
            })
            .collect();
        if let Some(&(_, head)) = in_flight.iter().find(|&&(_, h)| h >= ring_size) {
            return Err(InflightError::HeadBeyondRing {
                queue,
                head,
                ring_size,
            });
        }
        in_flight.sort_unstable();
        let next_counter = in_flight.last().map_or(0, |&(c, _)| c.wrapping_add(1));
        Ok(Recovery {
            next_avail: ring_used_idx.wrapping_add(in_flight.len() as u16),
            resubmit: in_flight.into_iter().map(|(_, h)| h).collect(),
            next_counter,
            finished_interrupted_completion: finished,
        })
    }
}

/// The descriptors of the chain whose head is `head`, read again from the descriptor table,
/// for resubmitting a request after a restart (the queue's own iterator only starts from the
/// avail ring). Follows `next` links and one indirect table the way a device must; stops
/// early (the last descriptor yielded still says "next", which the parser rejects as a
/// malformed chain) at a loop, a link out of the table, a nested or misaligned indirect table,
/// unreadable memory, or more than 4 GiB of buffers.
pub struct ChainWalk<'m> {
    mem: &'m vm_memory::GuestMemoryMmap,
    table: u64,
    table_len: u16,
    next: Option<u16>,
    /// Descriptors this table may still yield (bounds a loop).
    budget: u16,
    in_indirect: bool,
    bytes: u64,
}

impl<'m> ChainWalk<'m> {
    pub fn new(
        mem: &'m vm_memory::GuestMemoryMmap,
        desc_table: u64,
        queue_size: u16,
        head: u16,
    ) -> ChainWalk<'m> {
        ChainWalk {
            mem,
            table: desc_table,
            table_len: queue_size,
            next: (head < queue_size).then_some(head),
            budget: queue_size,
            in_indirect: false,
            bytes: 0,
        }
    }

    fn read(&self, index: u16) -> Option<virtio_queue::desc::split::Descriptor> {
        use vm_memory::Bytes;
        let at = self.table.checked_add(u64::from(index) * 16)?;
        self.mem.read_obj(vm_memory::GuestAddress(at)).ok()
    }
}

impl Iterator for ChainWalk<'_> {
    type Item = virtio_queue::desc::split::Descriptor;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let index = self.next.take()?;
            if index >= self.table_len || self.budget == 0 {
                return None;
            }
            self.budget -= 1;
            let desc = self.read(index)?;
            if desc.refers_to_indirect_table() {
                // One level only, 16-byte entries, at most 65535 of them.
                let entries = desc.len() / 16;
                if self.in_indirect || desc.len() % 16 != 0 || entries == 0 || entries > 0xffff {
                    return None;
                }
                self.in_indirect = true;
                self.table = desc.addr().0;
                self.table_len = entries as u16;
                self.budget = entries as u16;
                self.next = Some(0);
                continue;
            }
            self.bytes = self.bytes.checked_add(u64::from(desc.len()))?;
            if self.bytes > u64::from(u32::MAX) {
                return None;
            }
            if desc.has_next() {
                self.next = Some(desc.next());
            }
            return Some(desc);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT, QueueT};
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    const QUEUE_SIZE: u16 = 16;

    #[test]
    fn layout_matches_the_spec() {
        // 16-byte header + 16 bytes per descriptor, rounded up to 64.
        assert_eq!(queue_region_bytes(256), 4160);
        assert_eq!(queue_region_bytes(16), 320);
        assert_eq!(queue_region_bytes(1), 64);
        let (region, file) = InflightRegion::create(4, 256).unwrap();
        assert_eq!(file.metadata().unwrap().len(), 4 * 4160);
        assert!(
            file.set_len(1).is_err(),
            "the memfd is sealed against resizing"
        );
        let q = region.queue(3).unwrap();
        q.mark_popped(255, 7);
        // SAFETY: the test reads the mapping directly to check the byte layout.
        let raw = unsafe { std::slice::from_raw_parts(region.map.as_ptr(), region.map.len()) };
        let d = 3 * 4160 + QUEUE_HEADER_BYTES + 255 * DESC_STATE_BYTES;
        assert_eq!(
            raw[d], 1,
            "inflight flag at offset 0 of the descriptor state"
        );
        assert_eq!(
            u64::from_le_bytes(raw[d + 8..d + 16].try_into().unwrap()),
            7,
            "counter at 8"
        );
        assert!(region.queue(4).is_none());
    }

    #[test]
    fn a_region_that_does_not_fit_is_refused() {
        let (_, file) = InflightRegion::create(1, 64).unwrap();
        let e = InflightRegion::map(&file, 0, 64, 2, 64).err().unwrap();
        assert!(matches!(e, InflightError::TooSmall { .. }), "{e}");
        assert!(InflightRegion::map(&file, 0, 4096, 0, 64).is_err());
    }

    /// A mock split queue with `n` one-descriptor chains (heads 0..n) in its avail ring.
    fn queue_with_chains(
        mem: &GuestMemoryMmap,
        n: u16,
    ) -> (MockSplitQueue<'_, GuestMemoryMmap>, Queue) {
        let vq = MockSplitQueue::new(mem, QUEUE_SIZE);
        let descs: Vec<RawDescriptor> = (0..n)
            .map(|i| {
                RawDescriptor::from(SplitDescriptor::new(
                    0x10_0000 + u64::from(i) * 0x1000,
                    0x1000,
                    0,
                    0,
                ))
            })
            .collect();
        vq.add_desc_chains(&descs, 0).unwrap();
        let queue: Queue = vq.create_queue().unwrap();
        (vq, queue)
    }

    /// Complete `head` the way the queue thread does: before_used, add_used, after_used.
    fn complete(region: &QueueRegion<'_>, queue: &mut Queue, mem: &GuestMemoryMmap, head: u16) {
        region.before_used(head);
        queue.add_used(mem, head, 1).unwrap();
        region.after_used(head, queue.next_used());
    }

    fn ring_used_idx(queue: &Queue, mem: &GuestMemoryMmap) -> u16 {
        queue.used_idx(mem, Ordering::Acquire).unwrap().0
    }

    #[test]
    fn out_of_order_completion_then_crash_resubmits_exactly_the_unanswered_in_pop_order() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
        let (_vq, mut queue) = queue_with_chains(&mem, 6);
        let (region, _file) = InflightRegion::create(1, QUEUE_SIZE).unwrap();
        let q = region.queue(0).unwrap();
        assert_eq!(
            q.recover(0, QUEUE_SIZE).unwrap().resubmit,
            Vec::<u16>::new(),
            "fresh region"
        );
        assert_eq!(q.version(), VERSION);
        let mut popped = Vec::new();
        for (counter, chain) in queue.iter(&mem).unwrap().enumerate() {
            q.mark_popped(chain.head_index(), counter as u64);
            popped.push(chain.head_index());
        }
        assert_eq!(popped, [0, 1, 2, 3, 4, 5]);
        // Later requests finish first (io_uring): 4, 1, 5 complete; 0, 2, 3 are still running.
        for head in [4, 1, 5] {
            complete(&q, &mut queue, &mem, head);
        }
        // The daemon dies here. QEMU's fallback would restart at used index 3 and re-pop
        // avail slots 3, 4, 5 (heads 3, 4, 5): 4 and 5 completed twice, 0 and 2 never.
        let used = ring_used_idx(&queue, &mem);
        assert_eq!(used, 3);
        let r = q.recover(used, QUEUE_SIZE).unwrap();
        assert_eq!(r.resubmit, [0, 2, 3], "the unanswered heads, oldest first");
        assert_eq!(
            r.next_avail, 6,
            "new requests start after everything popped"
        );
        assert_eq!(r.next_counter, 4);
        assert!(!r.finished_interrupted_completion);
        assert_eq!(
            q.recover(used, QUEUE_SIZE).unwrap(),
            r,
            "recovery is idempotent"
        );
    }

    #[test]
    fn a_completion_cut_between_the_used_ring_and_the_region_is_finished_not_replayed() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
        let (_vq, mut queue) = queue_with_chains(&mem, 3);
        let (region, _file) = InflightRegion::create(1, QUEUE_SIZE).unwrap();
        let q = region.queue(0).unwrap();
        q.recover(0, QUEUE_SIZE).unwrap();
        for (counter, chain) in queue.iter(&mem).unwrap().enumerate() {
            q.mark_popped(chain.head_index(), counter as u64);
        }
        complete(&q, &mut queue, &mem, 2);
        // Head 0: published in the used ring, then the daemon died before after_used.
        q.before_used(0);
        queue.add_used(&mem, 0, 1).unwrap();
        assert!(q.is_in_flight(0));
        let used = ring_used_idx(&queue, &mem);
        let r = q.recover(used, QUEUE_SIZE).unwrap();
        assert!(r.finished_interrupted_completion);
        assert_eq!(r.resubmit, [1], "0 was answered; only 1 is outstanding");
        assert!(!q.is_in_flight(0));
        assert_eq!(q.used_idx(), used);
        assert_eq!(r.next_avail, used + 1);
    }

    #[test]
    fn nonsense_in_the_region_is_refused() {
        let (region, _file) = InflightRegion::create(1, QUEUE_SIZE).unwrap();
        let q = region.queue(0).unwrap();
        q.recover(0, QUEUE_SIZE).unwrap();
        // The ring claims 40 completions the region never saw: more than the queue holds.
        assert!(matches!(
            q.recover(40, QUEUE_SIZE),
            Err(InflightError::BadLastBatch { .. })
        ));
        q.u16_at(DESC_NUM_AT).store(8, Ordering::Release);
        assert!(matches!(
            q.recover(0, QUEUE_SIZE),
            Err(InflightError::DescNumMismatch { .. })
        ));
        q.u16_at(VERSION_AT).store(9, Ordering::Release);
        assert!(matches!(
            q.recover(0, QUEUE_SIZE),
            Err(InflightError::UnknownVersion { version: 9, .. })
        ));
        q.mark_popped(QUEUE_SIZE, 1); // out of range: ignored, never written
        assert!(!q.is_in_flight(QUEUE_SIZE));
        // A ring smaller than the region (the guest chose a smaller queue): a head beyond it
        // cannot have been popped from it.
        q.u16_at(VERSION_AT).store(VERSION, Ordering::Release);
        q.u16_at(DESC_NUM_AT).store(QUEUE_SIZE, Ordering::Release);
        q.mark_popped(12, 1);
        assert!(matches!(
            q.recover(0, 8),
            Err(InflightError::HeadBeyondRing { head: 12, .. })
        ));
        assert_eq!(q.recover(0, QUEUE_SIZE).unwrap().resubmit, [12]);
    }

    #[test]
    fn a_chain_read_again_by_head_is_the_chain_the_queue_popped() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        let d = |addr: u64, len: u32, flags: u16, next: u16| {
            RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
        };
        use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
        let (next, write) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_WRITE as u16);
        // Two chains: header + data + status, and header + status.
        vq.add_desc_chains(
            &[
                d(0x10_0000, 16, next, 1),
                d(0x11_0000, 4096, next | write, 2),
                d(0x12_0000, 1, write, 0),
                d(0x13_0000, 16, next, 4),
                d(0x14_0000, 1, write, 0),
            ],
            0,
        )
        .unwrap();
        let mut queue: Queue = vq.create_queue().unwrap();
        let table = queue.desc_table();
        for chain in queue.iter(&mem).unwrap() {
            let head = chain.head_index();
            let fields = |d: SplitDescriptor| (d.addr(), d.len(), d.flags(), d.next());
            let popped: Vec<_> = chain.map(fields).collect();
            let walked: Vec<_> = ChainWalk::new(&mem, table, QUEUE_SIZE, head)
                .map(fields)
                .collect();
            assert_eq!(walked, popped, "head {head}");
            assert_eq!(walked.last().unwrap().2 & VRING_DESC_F_NEXT as u16, 0);
        }
    }

    #[test]
    fn indirect_tables_are_followed_once_and_loops_end_the_walk() {
        use virtio_bindings::virtio_ring::{
            VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
        };
        use vm_memory::Bytes;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
        let table = 0x1000u64;
        let put = |at: u64, desc: SplitDescriptor| {
            mem.write_obj(RawDescriptor::from(desc), GuestAddress(at))
                .unwrap()
        };
        let (next, write, indirect) = (
            VRING_DESC_F_NEXT as u16,
            VRING_DESC_F_WRITE as u16,
            VRING_DESC_F_INDIRECT as u16,
        );
        // Head 0 points at an indirect table of two descriptors.
        put(table, SplitDescriptor::new(0x8000, 32, indirect, 0));
        put(0x8000, SplitDescriptor::new(0x20_0000, 16, next, 1));
        put(0x8010, SplitDescriptor::new(0x21_0000, 1, write, 0));
        let walked: Vec<_> = ChainWalk::new(&mem, table, QUEUE_SIZE, 0).collect();
        assert_eq!(walked.len(), 2);
        assert_eq!(walked[1].addr(), GuestAddress(0x21_0000));
        // Head 1 loops onto itself: the walk stops with a descriptor that still says "next".
        put(table + 16, SplitDescriptor::new(0x30_0000, 16, next, 1));
        let walked: Vec<_> = ChainWalk::new(&mem, table, QUEUE_SIZE, 1).collect();
        assert_eq!(walked.len(), usize::from(QUEUE_SIZE));
        assert!(walked.last().unwrap().has_next());
        // Head 2 links out of the table; head 3 nests an indirect table in an indirect one.
        put(
            table + 32,
            SplitDescriptor::new(0x30_0000, 16, next, QUEUE_SIZE + 5),
        );
        let walked: Vec<_> = ChainWalk::new(&mem, table, QUEUE_SIZE, 2).collect();
        assert!(walked.len() == 1 && walked[0].has_next());
        put(table + 48, SplitDescriptor::new(0x9000, 16, indirect, 0));
        put(0x9000, SplitDescriptor::new(0x8000, 32, indirect, 0));
        assert_eq!(ChainWalk::new(&mem, table, QUEUE_SIZE, 3).count(), 0);
        // A head beyond the queue yields nothing.
        assert_eq!(
            ChainWalk::new(&mem, table, QUEUE_SIZE, QUEUE_SIZE).count(),
            0
        );
    }
}
