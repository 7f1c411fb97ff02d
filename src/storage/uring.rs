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
        let ring = IoUring::builder().build(entries)?;
        ring.submitter().register_files(&[image_fd])?;
        Ok(UringEngine {
            ring,
            slots: Vec::new(),
            free_slots: Vec::new(),
            force_async,
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
        self.push_slot(slot)
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
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // Completion queue pressure: reaping frees room, the caller reaps next.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Block until at least one operation completes (used when draining a queue).
    pub fn wait_for_completion(&mut self) -> io::Result<()> {
        match self.ring.submit_and_wait(1) {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Collect finished operations into `out`. Short transfers and EAGAIN are resubmitted
    /// here and reported only when whole.
    pub fn reap(&mut self, out: &mut Vec<Completion>) -> io::Result<()> {
        let finished: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|cqe| (cqe.user_data(), cqe.result()))
            .collect();
        for (user_data, res) in finished {
            let slot = user_data as u32;
            let Some(Some(inflight)) = self.slots.get_mut(slot as usize) else {
                tracing::error!(user_data, "io_uring completion for an unknown operation");
                continue;
            };
            let result = match res {
                r if r == -libc::EAGAIN || r == -libc::EINTR => {
                    self.push_slot(slot)?;
                    continue;
                }
                r if r < 0 => Err(-r),
                r => match inflight.op.kind {
                    OpKind::Read | OpKind::Write => {
                        let done = r as u64;
                        if done == 0 && inflight.remaining > 0 {
                            Err(libc::EIO) // end of file inside the image: truncated underneath us
                        } else if done < inflight.remaining {
                            inflight.remaining -= done;
                            inflight.op.offset += done;
                            advance_iovecs(&mut inflight.op.iovecs, done);
                            self.push_slot(slot)?;
                            continue;
                        } else {
                            Ok(())
                        }
                    }
                    _ => Ok(()),
                },
            };
            let tag = self.slots[slot as usize]
                .take()
                .expect("slot checked above")
                .op
                .tag;
            self.free_slots.push(slot);
            out.push(Completion { tag, result });
        }
        Ok(())
    }
}
