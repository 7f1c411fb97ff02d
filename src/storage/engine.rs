//! One io_uring per queue: submits storage operations and reports each one exactly once, whole.
//!
//! Owns the ring and the bookkeeping of operations the kernel holds. Short transfers are
//! continued here, so callers only ever see "done" or "failed with errno". Knows nothing
//! about virtio; callers attach an opaque `tag` and must keep the memory behind every iovec
//! valid until that tag completes.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{opcode, squeue, types, IoUring};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Read,
    Write,
    /// fdatasync: make completed writes durable.
    Sync,
    /// Deallocate a range; it reads back as zeros.
    PunchHole,
    /// Zero a range keeping its allocation.
    ZeroRange,
}

/// One storage operation against the image.
#[derive(Debug)]
pub struct Op {
    pub kind: OpKind,
    /// Byte offset in the image.
    pub offset: u64,
    /// Byte length for PunchHole/ZeroRange; ignored otherwise (derived from `iovecs`).
    pub len: u64,
    /// Buffers for Read/Write. The caller guarantees they stay valid until completion.
    pub iovecs: Vec<libc::iovec>,
    pub tag: u64,
}

impl Op {
    pub fn transfer(kind: OpKind, offset: u64, iovecs: Vec<libc::iovec>, tag: u64) -> Op {
        Op {
            kind,
            offset,
            len: 0,
            iovecs,
            tag,
        }
    }

    pub fn range(kind: OpKind, offset: u64, len: u64, tag: u64) -> Op {
        Op {
            kind,
            offset,
            len,
            iovecs: Vec::new(),
            tag,
        }
    }

    pub fn sync(tag: u64) -> Op {
        Op {
            kind: OpKind::Sync,
            offset: 0,
            len: 0,
            iovecs: Vec::new(),
            tag,
        }
    }
}

/// The outcome of one [`Op`]: `Err(errno)` if the kernel failed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub tag: u64,
    pub result: Result<(), i32>,
}

struct InFlightOp {
    op: Op,
    /// Bytes still to transfer (Read/Write).
    remaining: u64,
}

pub struct Engine {
    ring: IoUring,
    slots: Vec<Option<InFlightOp>>,
    free_slots: Vec<u32>,
    completion_event: EventFd,
}

// SAFETY: the raw iovec pointers inside queued ops point into memory whose lifetime the
// caller manages (guest memory snapshots, bounce buffers); the engine itself is moved
// between threads only under the owning queue's mutex.
unsafe impl Send for Engine {}

const IMAGE_FILE: types::Fixed = types::Fixed(0);

impl Engine {
    /// A ring with room for `depth` operations in flight against `image_fd`.
    pub fn new(image_fd: RawFd, depth: u32) -> io::Result<Engine> {
        let entries = depth.next_power_of_two().clamp(8, 4096);
        let ring = IoUring::builder().build(entries)?;
        ring.submitter().register_files(&[image_fd])?;
        let completion_event = EventFd::new(EFD_NONBLOCK)?;
        ring.submitter()
            .register_eventfd(completion_event.as_raw_fd())?;
        Ok(Engine {
            ring,
            slots: Vec::new(),
            free_slots: Vec::new(),
            completion_event,
        })
    }

    /// Readable whenever completions may be waiting; register it with the queue's epoll.
    pub fn completion_fd(&self) -> RawFd {
        self.completion_event.as_raw_fd()
    }

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
            OpKind::PunchHole | OpKind::ZeroRange => {
                let mode = if op.kind == OpKind::PunchHole {
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                } else {
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                };
                opcode::Fallocate::new(IMAGE_FILE, op.len)
                    .offset(op.offset)
                    .mode(mode)
                    .build()
            }
        }
        .user_data(u64::from(slot));
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
        // Drain the eventfd first so a completion arriving after we look re-arms it.
        let _ = self.completion_event.read();
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

/// Drop `done` bytes from the front of `iovecs`.
fn advance_iovecs(iovecs: &mut Vec<libc::iovec>, mut done: u64) {
    let mut consumed = 0;
    for iov in iovecs.iter_mut() {
        if done >= iov.iov_len as u64 {
            done -= iov.iov_len as u64;
            consumed += 1;
        } else {
            // SAFETY: done < iov_len, so the new base stays inside the same buffer.
            iov.iov_base = unsafe { (iov.iov_base as *mut u8).add(done as usize) } as *mut _;
            iov.iov_len -= done as usize;
            break;
        }
    }
    iovecs.drain(..consumed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::aligned::AlignedBuf;
    use std::io::Write;

    fn run_to_completion(engine: &mut Engine) -> Vec<Completion> {
        let mut out = Vec::new();
        engine.submit().unwrap();
        while engine.in_flight() > 0 {
            engine.wait_for_completion().unwrap();
            engine.reap(&mut out).unwrap();
        }
        out
    }

    #[test]
    fn write_then_read_round_trips_and_reports_each_tag_once() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&vec![0u8; 1 << 16]).unwrap();
        let mut engine = Engine::new(file.as_raw_fd(), 16).unwrap();
        let mut src = AlignedBuf::zeroed(8192);
        src.as_mut_slice()
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (i % 251) as u8);
        let iov = |b: &mut AlignedBuf, off: usize, len: usize| libc::iovec {
            // SAFETY: off + len is within the 8 KiB buffer in every call below.
            iov_base: unsafe { b.as_mut_ptr().add(off) } as *mut _,
            iov_len: len,
        };
        let w = vec![iov(&mut src, 0, 4096), iov(&mut src, 4096, 4096)];
        engine
            .queue(Op::transfer(OpKind::Write, 4096, w, 7))
            .unwrap();
        engine.queue(Op::sync(8)).unwrap();
        let mut tags: Vec<_> = run_to_completion(&mut engine)
            .iter()
            .map(|c| (c.tag, c.result))
            .collect();
        tags.sort();
        assert_eq!(tags, vec![(7, Ok(())), (8, Ok(()))]);

        let mut dst = AlignedBuf::zeroed(8192);
        let r = vec![iov(&mut dst, 0, 8192)];
        engine
            .queue(Op::transfer(OpKind::Read, 4096, r, 9))
            .unwrap();
        assert_eq!(
            run_to_completion(&mut engine),
            vec![Completion {
                tag: 9,
                result: Ok(())
            }]
        );
        assert_eq!(src.as_slice(), dst.as_slice());
    }

    #[test]
    fn reads_past_end_of_file_fail_instead_of_spinning() {
        let file = tempfile::tempfile().unwrap();
        let mut engine = Engine::new(file.as_raw_fd(), 8).unwrap();
        let mut dst = AlignedBuf::zeroed(4096);
        let r = vec![libc::iovec {
            iov_base: dst.as_mut_ptr() as *mut _,
            iov_len: 4096,
        }];
        engine.queue(Op::transfer(OpKind::Read, 0, r, 1)).unwrap();
        assert_eq!(
            run_to_completion(&mut engine),
            vec![Completion {
                tag: 1,
                result: Err(libc::EIO)
            }]
        );
    }

    #[test]
    fn advance_iovecs_drops_and_trims() {
        let mut buf = [0u8; 64];
        let base = buf.as_mut_ptr();
        let mut v = vec![
            libc::iovec {
                iov_base: base as *mut _,
                iov_len: 16,
            },
            libc::iovec {
                iov_base: base.wrapping_add(16) as *mut _,
                iov_len: 48,
            },
        ];
        advance_iovecs(&mut v, 20);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].iov_len, 44);
        assert_eq!(v[0].iov_base as usize, base as usize + 20);
    }
}
