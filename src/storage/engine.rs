//! A queue's storage engine: io_uring or inline, behind one interface that submits
//! [`Op`]s and reports each one exactly once, whole.
//!
//! Short transfers are continued inside the engines, so callers only ever see "done" or
//! "failed with errno". Knows nothing about virtio; callers attach an opaque `tag` and must
//! keep the memory behind every iovec valid until that tag completes.

use std::io;
use std::os::fd::RawFd;

use super::image::Backing;
use super::inline::InlineEngine;
#[cfg(test)]
use super::op::OpKind;
use super::op::{Completion, Op};
use super::rbd::engine::RbdEngine;
use super::uring::UringEngine;
use super::Image;

/// How a queue's storage operations reach the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    /// io_uring: many operations in flight, completed out of order.
    IoUring,
    /// The queue thread performs each operation itself, at submission. For targets without
    /// non-blocking I/O (tmpfs, many network and FUSE filesystems) io_uring would hand every
    /// operation to a kernel worker thread that does the same copy; doing it here saves two
    /// context switches per operation.
    Inline,
    /// librbd's asynchronous calls, for `rbd:` images (the only engine they have).
    Rbd,
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EngineKind::IoUring => "io_uring",
            EngineKind::Inline => "inline",
            EngineKind::Rbd => "librbd",
        })
    }
}

/// What the operator asked for (`--io-engine`): a given engine, or the one that suits the
/// image ([`Image::engine_for`](super::Image::engine_for)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineChoice {
    Auto,
    Fixed(EngineKind),
}

/// A queue's storage engine.
pub enum Engine {
    Uring(Box<UringEngine>),
    Inline(InlineEngine),
    Rbd(RbdEngine),
    /// Tests: the inline engine on a target that lacks features or fails; see [`Faulty`].
    #[cfg(test)]
    Faulty(Faulty),
}

/// Tests: the inline engine on a target whose fallocate has neither zeroing mode (like a
/// block device without write-zeroes support): range operations fail with EOPNOTSUPP; and
/// writes that start at or past `fail_writes_from` fail with EIO. Reported at the next reap.
#[cfg(test)]
pub struct Faulty {
    inner: InlineEngine,
    refused: Vec<Completion>,
    pub fail_writes_from: u64,
}

impl Engine {
    /// An engine of `kind` for `image` with room for `depth` operations in flight. A kind
    /// the image cannot use (io_uring for an `rbd:` image, librbd for a file) is refused
    /// with EINVAL; [`Image::engine_for`] never picks one.
    pub fn for_image(kind: EngineKind, image: &Image, depth: u32) -> io::Result<Engine> {
        match (image.backing(), kind) {
            (Backing::File(file), EngineKind::IoUring | EngineKind::Inline) => {
                Engine::new(kind, file.fd(), depth, image.submission_may_block())
            }
            (Backing::Rbd(rbd), EngineKind::Rbd) => {
                Ok(Engine::Rbd(RbdEngine::new(std::sync::Arc::clone(rbd))?))
            }
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the {kind} engine cannot serve {}", image.name()),
            )),
        }
    }

    /// An engine of `kind` with room for `depth` operations in flight against `image_fd`;
    /// `force_async` for targets whose I/O would block the submitting thread.
    pub fn new(
        kind: EngineKind,
        image_fd: RawFd,
        depth: u32,
        force_async: bool,
    ) -> io::Result<Engine> {
        Ok(match kind {
            EngineKind::IoUring => {
                Engine::Uring(Box::new(UringEngine::new(image_fd, depth, force_async)?))
            }
            EngineKind::Inline => Engine::Inline(InlineEngine::new(image_fd)),
            EngineKind::Rbd => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "the librbd engine serves rbd: images, not file descriptors",
                ))
            }
        })
    }

    /// A [`Faulty`] engine whose writes all work.
    #[cfg(test)]
    pub fn without_fallocate(image_fd: RawFd) -> Faulty {
        Faulty {
            inner: InlineEngine::new(image_fd),
            refused: Vec::new(),
            fail_writes_from: u64::MAX,
        }
    }

    /// An fd that is readable while completions wait, for the queue's epoll; `None` when
    /// completions are always ready by the time [`Engine::submit`] returns.
    pub fn completion_fd(&self) -> Option<RawFd> {
        match self {
            Engine::Uring(e) => Some(e.completion_fd()),
            Engine::Inline(_) => None,
            Engine::Rbd(e) => Some(e.completion_fd()),
            #[cfg(test)]
            Engine::Faulty(_) => None,
        }
    }

    /// Operations queued or in flight whose completion has not been reaped (the executor
    /// keeps its own count; the engine tests use this one).
    #[cfg(test)]
    pub fn in_flight(&self) -> usize {
        match self {
            Engine::Uring(e) => e.in_flight(),
            Engine::Inline(e) => e.in_flight(),
            Engine::Rbd(e) => e.in_flight(),
            #[cfg(test)]
            Engine::Faulty(f) => f.inner.in_flight() + f.refused.len(),
        }
    }

    /// Queue `op`; it starts at the next [`Engine::submit`] at the latest.
    pub fn queue(&mut self, op: Op) -> io::Result<()> {
        match self {
            Engine::Uring(e) => e.queue(op),
            Engine::Inline(e) => {
                e.queue(op);
                Ok(())
            }
            Engine::Rbd(e) => {
                e.queue(op);
                Ok(())
            }
            #[cfg(test)]
            Engine::Faulty(f) => {
                let refused = match op.kind {
                    OpKind::PunchHole | OpKind::ZeroRange => Some(libc::EOPNOTSUPP),
                    OpKind::Write if op.offset >= f.fail_writes_from => Some(libc::EIO),
                    _ => None,
                };
                match refused {
                    Some(errno) => f.refused.push(Completion {
                        tag: op.tag,
                        result: Err(errno),
                    }),
                    None => f.inner.queue(op),
                }
                Ok(())
            }
        }
    }

    pub fn submit(&mut self) -> io::Result<()> {
        match self {
            Engine::Uring(e) => e.submit(),
            Engine::Inline(e) => {
                e.run_queued();
                Ok(())
            }
            // Operations started when queued.
            Engine::Rbd(_) => Ok(()),
            #[cfg(test)]
            Engine::Faulty(f) => {
                f.inner.run_queued();
                Ok(())
            }
        }
    }

    /// Block until at least one operation completes (used when draining a queue).
    pub fn wait_for_completion(&mut self) -> io::Result<()> {
        match self {
            Engine::Uring(e) => e.wait_for_completion(),
            Engine::Inline(e) => {
                e.run_queued();
                Ok(())
            }
            Engine::Rbd(e) => e.wait_for_completion(),
            #[cfg(test)]
            Engine::Faulty(f) => {
                f.inner.run_queued();
                Ok(())
            }
        }
    }

    /// Move finished operations into `out`, each reported once, whole.
    pub fn reap(&mut self, out: &mut Vec<Completion>) -> io::Result<()> {
        match self {
            Engine::Uring(e) => e.reap(out),
            Engine::Inline(e) => {
                e.reap(out);
                Ok(())
            }
            Engine::Rbd(e) => {
                e.reap(out);
                Ok(())
            }
            #[cfg(test)]
            Engine::Faulty(f) => {
                f.inner.reap(out);
                out.append(&mut f.refused);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::aligned::AlignedBuf;
    use crate::storage::op::OpKind;
    use std::io::Write;
    use std::os::fd::AsRawFd;

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
        for kind in [EngineKind::IoUring, EngineKind::Inline] {
            let mut engine = Engine::new(kind, file.as_raw_fd(), 16, false).unwrap();
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
    }

    #[test]
    fn reads_past_end_of_file_fail_instead_of_spinning() {
        let file = tempfile::tempfile().unwrap();
        for kind in [EngineKind::IoUring, EngineKind::Inline] {
            let mut engine = Engine::new(kind, file.as_raw_fd(), 8, false).unwrap();
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
    }
}
