//! The inline engine: the queue thread performs each operation with a plain system call.
//!
//! For targets that cannot do non-blocking I/O (tmpfs, many network and FUSE filesystems),
//! io_uring hands every operation to a kernel worker thread, which then performs exactly
//! this blocking call. Doing it in the queue thread gives the same result without the two
//! context switches and the extra runnable thread per queue. Operations run in submission
//! order; completions are reported by the next reap.

use std::io;
use std::os::fd::RawFd;

use super::op::{advance_iovecs, Completion, Op, OpKind};

pub struct InlineEngine {
    fd: RawFd,
    queued: Vec<Op>,
    finished: Vec<Completion>,
}

// SAFETY: queued ops hold raw iovec pointers whose lifetime the caller manages (as for the
// io_uring engine); the engine moves between threads only under its queue's mutex.
unsafe impl Send for InlineEngine {}

impl InlineEngine {
    pub fn new(fd: RawFd) -> InlineEngine {
        InlineEngine {
            fd,
            queued: Vec::new(),
            finished: Vec::new(),
        }
    }

    #[cfg(test)]
    pub fn in_flight(&self) -> usize {
        self.queued.len() + self.finished.len()
    }

    pub fn queue(&mut self, op: Op) {
        self.queued.push(op);
    }

    /// Perform every queued operation now.
    pub fn run_queued(&mut self) {
        for op in std::mem::take(&mut self.queued) {
            let result = perform(self.fd, op.kind, op.offset, op.len, op.iovecs);
            self.finished.push(Completion {
                tag: op.tag,
                result,
            });
        }
    }

    pub fn reap(&mut self, out: &mut Vec<Completion>) {
        self.run_queued();
        out.append(&mut self.finished);
    }
}

fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// One blocking operation, retried on EINTR and continued after short transfers.
fn perform(
    fd: RawFd,
    kind: OpKind,
    mut offset: u64,
    len: u64,
    mut iovecs: Vec<libc::iovec>,
) -> Result<(), i32> {
    loop {
        // SAFETY: the caller guarantees every iovec points at memory valid for its length
        // until this operation completes; fd is the image, open for the engine's lifetime.
        let rc: i64 = unsafe {
            match kind {
                OpKind::Read | OpKind::Write if iovecs.is_empty() => return Ok(()),
                OpKind::Read => {
                    libc::preadv(fd, iovecs.as_ptr(), iovecs.len() as i32, offset as i64) as i64
                }
                OpKind::Write => {
                    libc::pwritev(fd, iovecs.as_ptr(), iovecs.len() as i32, offset as i64) as i64
                }
                OpKind::Sync => libc::fdatasync(fd) as i64,
                OpKind::PunchHole | OpKind::ZeroRange => {
                    libc::fallocate(fd, kind.fallocate_mode(), offset as i64, len as i64) as i64
                }
            }
        };
        if rc < 0 {
            match errno() {
                libc::EINTR | libc::EAGAIN => continue,
                e => return Err(e),
            }
        }
        if !matches!(kind, OpKind::Read | OpKind::Write) {
            return Ok(());
        }
        let done = rc as u64;
        let remaining: u64 = iovecs.iter().map(|v| v.iov_len as u64).sum();
        if done >= remaining {
            return Ok(());
        }
        if done == 0 {
            return Err(libc::EIO); // end of file inside the image: truncated underneath us
        }
        offset += done;
        advance_iovecs(&mut iovecs, done);
    }
}
