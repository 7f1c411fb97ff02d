//! Storage operations and their completions: what the engines take and report. A module of
//! its own so that the engines (io_uring, inline) depend on it and not on each other.

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

impl OpKind {
    /// fallocate(2) mode for the range operations; both keep the file size.
    pub fn fallocate_mode(self) -> i32 {
        match self {
            OpKind::PunchHole => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            OpKind::ZeroRange => libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            OpKind::Read | OpKind::Write | OpKind::Sync => 0,
        }
    }
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

/// Drop `done` bytes from the front of `iovecs`.
pub(super) fn advance_iovecs(iovecs: &mut Vec<libc::iovec>, mut done: u64) {
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
