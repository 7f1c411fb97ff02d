//! The RBD engine: a queue's operations go to librbd's asynchronous calls, straight from the
//! caller's iovecs, as many in flight as the queue has requests.
//!
//! librbd finishes an operation on one of its own threads and calls back there. The callback
//! only records the result and wakes the queue thread through an eventfd, which sits in the
//! queue's epoll like an io_uring's completion fd; everything else (what the result means for
//! the request) happens on the queue thread when it reaps. A cluster that stops answering
//! fails each operation with ETIMEDOUT once `rados_osd_op_timeout` passes (set from
//! `--ceph-timeout`), so nothing waits forever.

use std::ffi::{c_int, c_void};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use super::api::{Api, CompletionT};
use super::RbdImage;
use crate::storage::op::{Completion, Op, OpKind};

/// Results handed from librbd's threads to the queue thread.
struct Finished {
    completions: Mutex<Vec<Completion>>,
    /// Readable while `completions` may hold something.
    wake: EventFd,
}

impl Finished {
    /// Hand over `completion`. Only the completion that finds the list empty wakes the queue
    /// thread (one eventfd write per batch, not per operation): every later one until the
    /// list is taken is taken with it, because [`RbdEngine::reap`] consumes the wakeup first
    /// and then takes the whole list.
    fn push(&self, completion: Completion) {
        let was_empty = {
            let mut list = self
                .completions
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            list.push(completion);
            list.len() == 1
        };
        if was_empty {
            // Cannot fail short of the counter overflowing (2^64 - 1 wakeups unread).
            let _ = self.wake.write(1);
        }
    }
}

/// What one submitted operation needs until librbd calls back: owned by librbd from
/// submission to the callback, which frees it.
struct Pending {
    tag: u64,
    /// librbd keeps a pointer to this array and scatters a read's data through it when the
    /// read completes, so the array lives until then.
    iovecs: Vec<libc::iovec>,
    /// Bytes a read must return; `None` for other operations.
    read_len: Option<usize>,
    api: &'static Api,
    finished: Arc<Finished>,
}

/// Called by librbd exactly once per submitted operation, on one of its threads.
unsafe extern "C" fn operation_done(completion: CompletionT, arg: *mut c_void) {
    // SAFETY: `arg` is the Box<Pending> that `RbdEngine::start` leaked for this completion,
    // and librbd calls back once per completion, so the box is reclaimed exactly once.
    let pending = unsafe { Box::from_raw(arg as *mut Pending) };
    // SAFETY: the completion is live until released just below, and not used after.
    let rc = unsafe { (pending.api.rbd_aio_get_return_value)(completion) };
    // SAFETY: as above; librbd allows releasing a completion inside its own callback.
    unsafe { (pending.api.rbd_aio_release)(completion) };
    let result = match (rc, pending.read_len) {
        (rc, _) if rc < 0 => Err(i32::try_from(-rc).unwrap_or(libc::EIO)),
        // A read inside the image always returns its full length (unwritten parts as
        // zeros); anything else would leave guest memory partly unfilled.
        (rc, Some(len)) if rc as usize != len => Err(libc::EIO),
        _ => Ok(()),
    };
    pending.finished.push(Completion {
        tag: pending.tag,
        result,
    });
}

/// A queue's engine for an RBD image.
pub struct RbdEngine {
    image: Arc<RbdImage>,
    finished: Arc<Finished>,
    /// Operations started and not yet reaped.
    in_flight: usize,
}

// SAFETY: the raw iovec pointers inside operations point into memory whose lifetime the
// caller manages (guest memory snapshots, bounce buffers), as for the other engines; the
// engine is used by one queue thread at a time, under the queue's mutex.
unsafe impl Send for RbdEngine {}

impl RbdEngine {
    pub fn new(image: Arc<RbdImage>) -> io::Result<RbdEngine> {
        Ok(RbdEngine {
            image,
            finished: Arc::new(Finished {
                completions: Mutex::new(Vec::new()),
                wake: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            }),
            in_flight: 0,
        })
    }

    /// Readable while completions wait to be reaped.
    pub fn completion_fd(&self) -> RawFd {
        self.finished.wake.as_raw_fd()
    }

    #[cfg(test)]
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Start `op` at once (librbd has no separate submission step). An operation librbd
    /// refuses to start completes with its errno at the next reap, like any other failure.
    pub fn queue(&mut self, op: Op) {
        self.in_flight += 1;
        let tag = op.tag;
        if let Err(errno) = self.start(op) {
            self.finished.push(Completion {
                tag,
                result: Err(errno),
            });
        }
    }

    fn start(&mut self, op: Op) -> Result<(), i32> {
        let api = self.image.api();
        let image = self.image.image;
        let transfer_len: usize = op.iovecs.iter().map(|iov| iov.iov_len).sum();
        if matches!(op.kind, OpKind::Read | OpKind::Write) && transfer_len == 0 {
            // librbd refuses an empty iovec array; there is nothing to move.
            self.finished.push(Completion {
                tag: op.tag,
                result: Ok(()),
            });
            return Ok(());
        }
        let iovcnt = c_int::try_from(op.iovecs.len()).map_err(|_| libc::EINVAL)?;
        let range_len = usize::try_from(op.len).map_err(|_| libc::EINVAL)?;
        let pending = Box::into_raw(Box::new(Pending {
            tag: op.tag,
            iovecs: op.iovecs,
            read_len: (op.kind == OpKind::Read).then_some(transfer_len),
            api,
            finished: Arc::clone(&self.finished),
        }));
        // Read before submitting: once submitted, the callback may free `pending` at any time.
        // SAFETY: `pending` was just allocated and is not shared yet.
        let iov = unsafe { (*pending).iovecs.as_ptr() };
        let mut completion: CompletionT = std::ptr::null_mut();
        // SAFETY: a valid callback of the declared type and out-pointer; `pending` is the
        // argument the callback reclaims.
        let rc = unsafe {
            (api.rbd_aio_create_completion)(pending as *mut c_void, operation_done, &mut completion)
        };
        if rc < 0 {
            // SAFETY: no completion exists, so nothing else will reclaim `pending`.
            drop(unsafe { Box::from_raw(pending) });
            return Err(-rc);
        }
        // SAFETY: every call gets a live image handle (held by self.image) and a fresh
        // completion; transfers get an iovec array that lives in `pending` until the
        // callback, over buffers the caller keeps valid until this tag completes.
        let rc = unsafe {
            match op.kind {
                OpKind::Read => (api.rbd_aio_readv)(image, iov, iovcnt, op.offset, completion),
                OpKind::Write => (api.rbd_aio_writev)(image, iov, iovcnt, op.offset, completion),
                OpKind::Sync => (api.rbd_aio_flush)(image, completion),
                // Both must read back as zeros (a guest's write-zeroes with unmap becomes a
                // hole punch), which librbd's discard does not promise for ranges smaller
                // than its discard granularity; write-zeroes does, and deallocates whole
                // objects it covers.
                OpKind::PunchHole | OpKind::ZeroRange => {
                    (api.rbd_aio_write_zeroes)(image, op.offset, range_len, completion, 0, 0)
                }
            }
        };
        if rc < 0 {
            // librbd refused before taking the operation: the callback will not run.
            // SAFETY: the completion is ours again; release it and reclaim `pending`.
            unsafe {
                (api.rbd_aio_release)(completion);
                drop(Box::from_raw(pending));
            }
            return Err(-rc);
        }
        Ok(())
    }

    /// Block until at least one started operation has finished.
    pub fn wait_for_completion(&mut self) -> io::Result<()> {
        if self.in_flight == 0 {
            return Ok(());
        }
        let mut pfd = libc::pollfd {
            fd: self.completion_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // SAFETY: one pollfd that outlives the call.
            let rc = unsafe { libc::poll(&mut pfd, 1, -1) };
            if rc >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Move finished operations into `out`.
    pub fn reap(&mut self, out: &mut Vec<Completion>) {
        // Consume the wakeup before taking the list: a completion pushed in between is
        // taken now (at worst its wakeup comes later, and finds nothing: harmless), and one
        // pushed after the take finds the list empty and wakes us again.
        let _ = self.finished.wake.read();
        let mut done = self
            .finished
            .completions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        self.in_flight -= done.len();
        out.append(&mut done);
    }
}

impl Drop for RbdEngine {
    /// Wait for librbd to finish with every operation: their buffers belong to the caller,
    /// who may free them once the engine is gone. Bounded by the OSD operation time-out.
    fn drop(&mut self) {
        let mut discarded = Vec::new();
        while self.in_flight > 0 {
            if self.wait_for_completion().is_err() {
                break;
            }
            self.reap(&mut discarded);
        }
    }
}
