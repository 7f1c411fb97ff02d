//! The io_uring engine: one ring per queue, operations complete out of order as the kernel
//! finishes them. Used for targets that support non-blocking I/O (block devices, XFS/ext4
//! with O_DIRECT), where the kernel really runs many requests at once.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{opcode, squeue, types, IoUring};

use super::op::{advance_iovecs, Completion, Op, OpKind};

struct InFlightOp {
    op: Op,
    /// Bytes still to transfer (Read/Write).
    remaining: u64,
}

pub struct UringEngine {
    ring: IoUring,
    slots: Vec<Option<InFlightOp>>,
    free_slots: Vec<u32>,
    /// Send every operation to the kernel's worker threads (IOSQE_ASYNC): for filesystems
    /// that would block the submitting thread ([`Image::submission_may_block`](super::Image::submission_may_block)).
    force_async: bool,
    /// Completions taken off the ring but not yet reported: a kernel that refuses
    /// submissions until completions are reaped gets its ring emptied into this (see
    /// `submit`), and [`UringEngine::reap`] reports them first.
    reaped: Vec<(u64, i32)>,
    /// Tests: refuse submissions with EBUSY as older kernels do (see `enter`).
    #[cfg(test)]
    refuse_like_old_kernels: bool,
}

// SAFETY: the raw iovec pointers inside queued ops point into memory whose lifetime the
// caller manages (guest memory snapshots, bounce buffers); the engine itself is moved
// between threads only under the owning queue's mutex.
unsafe impl Send for UringEngine {}

const IMAGE_FILE: types::Fixed = types::Fixed(0);

impl UringEngine {
    /// A ring with room for `depth` operations in flight against `image_fd`.
    pub fn new(image_fd: RawFd, depth: u32, force_async: bool) -> io::Result<UringEngine> {
        let entries = depth.next_power_of_two().clamp(8, 4096);
        // One thread submits to and reaps this ring, and it enters the kernel at least once
        // per batch (submission, epoll): completions need not interrupt it with an IPI to
        // run their task work the moment they arrive (IORING_SETUP_COOP_TASKRUN, Linux
        // 5.19). Older kernels refuse the flag: then the default.
        let ring = match IoUring::builder().setup_coop_taskrun().build(entries) {
            Ok(ring) => ring,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                IoUring::builder().build(entries)?
            }
            Err(e) => return Err(e),
        };
        ring.submitter().register_files(&[image_fd])?;
        Ok(UringEngine {
            ring,
            slots: Vec::new(),
            free_slots: Vec::new(),
            force_async,
            reaped: Vec::new(),
            #[cfg(test)]
            refuse_like_old_kernels: false,
        })
    }

    /// Readable (level-triggered) while completions wait in the ring; register it with the
    /// queue's epoll. Polling the ring itself avoids an eventfd write per completion and a
    /// read per wakeup.
    pub fn completion_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }

    #[cfg(test)]
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free_slots.len()
    }

    /// Queue `op`; it reaches the kernel at the next [`Engine::submit`] (or sooner if the
    /// submission queue is full).
    pub fn queue(&mut self, op: Op) -> io::Result<()> {
        let remaining = op.iovecs.iter().map(|v| v.iov_len as u64).sum();
        let slot = match self.free_slots.pop() {
            Some(i) => i,
            None => {
                self.slots.push(None);
                (self.slots.len() - 1) as u32
            }
        };
        self.slots[slot as usize] = Some(InFlightOp { op, remaining });
        let pushed = self.push_slot(slot);
        if pushed.is_err() {
            // Never reached the ring: the caller gets the error, and the slot is free again.
            self.slots[slot as usize] = None;
            self.free_slots.push(slot);
        }
        pushed
    }

    fn push_slot(&mut self, slot: u32) -> io::Result<()> {
        let inflight = self.slots[slot as usize]
            .as_ref()
            .expect("pushing an empty slot");
        let op = &inflight.op;
        let entry = match op.kind {
            OpKind::Read => {
                opcode::Readv::new(IMAGE_FILE, op.iovecs.as_ptr(), op.iovecs.len() as u32)
                    .offset(op.offset)
                    .build()
            }
            OpKind::Write => {
                opcode::Writev::new(IMAGE_FILE, op.iovecs.as_ptr(), op.iovecs.len() as u32)
                    .offset(op.offset)
                    .build()
            }
            OpKind::Sync => opcode::Fsync::new(IMAGE_FILE)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            OpKind::PunchHole | OpKind::ZeroRange => opcode::Fallocate::new(IMAGE_FILE, op.len)
                .offset(op.offset)
                .mode(op.kind.fallocate_mode())
                .build(),
        }
        .user_data(u64::from(slot));
        let entry = if self.force_async {
            entry.flags(squeue::Flags::ASYNC)
        } else {
            entry
        };
        self.push_entry(&entry)
    }

    fn push_entry(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: the entry's buffers (the slot's iovec array and what it points to) stay
            // valid until the completion for this slot is reaped: the iovec Vec lives in the
            // slot and the caller guarantees the memory behind it.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return Ok(());
            }
            // Submission queue full: hand what we have to the kernel and retry.
            self.submit()?;
        }
    }

    /// Hand queued operations to the kernel.
    ///
    /// A kernel may refuse them with EBUSY until completions are reaped (io_uring_enter(2):
    /// with IORING_FEAT_NODROP, while overflowed completions cannot be flushed back into
    /// the ring; older kernels do this readily, current ones rarely): then the ring's completions
    /// are moved into `reaped`, for the next [`UringEngine::reap`] to report, and the
    /// submission is tried again. So this returns once the kernel took the entries (or
    /// failed for real), and a caller that pushes into a full submission queue always makes
    /// progress without reaping itself.
    pub fn submit(&mut self) -> io::Result<()> {
        // Skip the syscall when there is nothing to hand over (and no overflowed
        // completions the kernel needs a nudge to flush).
        let mut sq = self.ring.submission();
        sq.sync();
        if sq.is_empty() && !sq.cq_overflow() {
            return Ok(());
        }
        drop(sq);
        loop {
            match self.enter() {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    if self.take_completions() == 0 {
                        // Nothing to take yet: operations in flight must finish first. Each
                        // attempt enters the kernel, which runs their completion work.
                        std::thread::yield_now();
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Move the completion ring's entries into `reaped`, making room in the ring; returns
    /// how many there were.
    fn take_completions(&mut self) -> usize {
        let before = self.reaped.len();
        self.reaped
            .extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        self.reaped.len() - before
    }

    /// One io_uring_enter handing the submission queue to the kernel.
    fn enter(&mut self) -> io::Result<usize> {
        // Older kernels refuse submissions with EBUSY while completions have overflowed and
        // the completion ring has no room to take them back (current ones keep accepting):
        // the tests reproduce that on any kernel, from the ring's real state.
        #[cfg(test)]
        if self.refuse_like_old_kernels
            && self.ring.submission().cq_overflow()
            && self.ring.completion().is_full()
        {
            return Err(io::Error::from_raw_os_error(libc::EBUSY));
        }
        self.ring.submit()
    }

    /// Block until at least one operation completes (used when draining a queue).
    pub fn wait_for_completion(&mut self) -> io::Result<()> {
        if !self.reaped.is_empty() {
            return Ok(()); // taken off the ring already, waiting for reap
        }
        match self.ring.submit_and_wait(1) {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Collect finished operations into `out`. Short transfers and EAGAIN are resubmitted
    /// here and reported only when whole.
    pub fn reap(&mut self, out: &mut Vec<Completion>) -> io::Result<()> {
        self.take_completions();
        // Resubmitting may take more completions off the ring (see `submit`): report those
        // too before returning, so none waits unseen while the ring looks empty.
        while !self.reaped.is_empty() {
            for (user_data, res) in std::mem::take(&mut self.reaped) {
                self.finish(user_data, res, out);
            }
        }
        Ok(())
    }

    /// One completion: report it, or continue the operation (short transfer, EAGAIN).
    fn finish(&mut self, user_data: u64, res: i32, out: &mut Vec<Completion>) {
        let slot = user_data as u32;
        let Some(Some(inflight)) = self.slots.get_mut(slot as usize) else {
            tracing::error!(user_data, "io_uring completion for an unknown operation");
            return;
        };
        let outcome = match res {
            r if r == -libc::EAGAIN || r == -libc::EINTR => self.resubmit(slot),
            r if r < 0 => Outcome::Done(Err(-r)),
            r => match inflight.op.kind {
                OpKind::Read | OpKind::Write => {
                    let done = r as u64;
                    if done == 0 && inflight.remaining > 0 {
                        // End of file inside the image: truncated underneath us.
                        Outcome::Done(Err(libc::EIO))
                    } else if done < inflight.remaining {
                        inflight.remaining -= done;
                        inflight.op.offset += done;
                        advance_iovecs(&mut inflight.op.iovecs, done);
                        self.resubmit(slot)
                    } else {
                        Outcome::Done(Ok(()))
                    }
                }
                _ => Outcome::Done(Ok(())),
            },
        };
        let Outcome::Done(result) = outcome else {
            return; // reported when whole
        };
        let tag = self.slots[slot as usize]
            .take()
            .expect("slot checked above")
            .op
            .tag;
        self.free_slots.push(slot);
        out.push(Completion { tag, result });
    }

    /// Push a continued operation again; if the ring cannot take it, it fails with that
    /// error (reported, never dropped).
    fn resubmit(&mut self, slot: u32) -> Outcome {
        match self.push_slot(slot) {
            Ok(()) => Outcome::Continued,
            Err(e) => Outcome::Done(Err(e.raw_os_error().unwrap_or(libc::EIO))),
        }
    }
}

/// What one completion means for its operation.
enum Outcome {
    /// Pushed again for the rest (short transfer, EAGAIN).
    Continued,
    /// Finished: report it.
    Done(Result<(), i32>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Duration;

    /// More operations than the completion ring holds, queued without reaping in between,
    /// on a kernel that answers EBUSY until completions are reaped: every one is queued and
    /// completes once, with its data. (Before the fix a full submission queue retried the
    /// refused submission forever.) Run in a thread so a regression fails instead of hanging.
    #[test]
    fn a_full_completion_ring_does_not_stall_queueing() {
        const OPS: usize = 64;
        const LEN: usize = 512;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut file = tempfile::tempfile().unwrap();
            let content: Vec<u8> = (0..OPS * LEN).map(|i| (i % 251) as u8).collect();
            file.write_all(&content).unwrap();
            // 8 submission entries (the smallest ring), 16 completion entries.
            let mut engine = UringEngine::new(file.as_raw_fd(), 4, false).unwrap();
            engine.refuse_like_old_kernels = true;
            let mut buf = vec![0u8; OPS * LEN];
            for i in 0..OPS {
                let iov = vec![libc::iovec {
                    // SAFETY: i * LEN + LEN <= buf.len(); buf outlives the engine's use of it
                    // (every operation is reaped below before buf is read or dropped).
                    iov_base: unsafe { buf.as_mut_ptr().add(i * LEN) }.cast(),
                    iov_len: LEN,
                }];
                engine
                    .queue(Op::transfer(OpKind::Read, (i * LEN) as u64, iov, i as u64))
                    .unwrap();
            }
            engine.submit().unwrap();
            let mut done = Vec::new();
            while engine.in_flight() > 0 {
                engine.wait_for_completion().unwrap();
                engine.reap(&mut done).unwrap();
            }
            let _ = tx.send((done, buf == content));
        });
        let (mut done, same) = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("queueing past a full completion ring hung");
        done.sort_by_key(|c| c.tag);
        let want: Vec<Completion> = (0..OPS as u64)
            .map(|tag| Completion {
                tag,
                result: Ok(()),
            })
            .collect();
        assert_eq!(done, want, "each operation completed once, successfully");
        assert!(same, "every read brought its data");
    }
}
