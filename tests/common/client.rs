//! libblkio clients: connecting (buffers in libblkio's or our own shared memory), one-shot
//! reads and writes, reaping completions.

use super::*;

/// A libblkio connection with one shared buffer region.
pub struct Client {
    pub blkio: Blkio,
    pub queues: Vec<Blkioq>,
    pub region: MemoryRegion,
}

impl Client {
    pub fn connect(socket: &Path, num_queues: i32, buffer_len: usize) -> blkio::Result<Client> {
        Self::connect_with(socket, num_queues, buffer_len, false)
    }

    pub fn connect_with(
        socket: &Path,
        num_queues: i32,
        buffer_len: usize,
        read_only: bool,
    ) -> blkio::Result<Client> {
        let mut blkio = Blkio::new("virtio-blk-vhost-user")?;
        blkio.set_str("path", socket.to_str().unwrap())?;
        blkio.set_bool("read-only", read_only)?;
        blkio.connect()?;
        blkio.set_i32("num-queues", num_queues)?;
        let outcome = blkio.start()?;
        let align = blkio.get_u64("mem-region-alignment")? as usize;
        let len = buffer_len.div_ceil(align) * align;
        let region = blkio.alloc_mem_region(len)?;
        blkio.map_mem_region(&region)?;
        Ok(Client {
            blkio,
            queues: outcome.queues,
            region,
        })
    }

    pub fn capacity(&self) -> u64 {
        self.blkio.get_u64("capacity").unwrap()
    }

    /// The buffer region as a byte slice.
    pub fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the region is a live shared mapping of `len` bytes owned by this client.
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }

    pub fn buf_ptr(&self, offset: usize) -> *mut u8 {
        (self.region.addr + offset) as *mut u8
    }
}

/// Wait for `n` completions on `q`; returns their `ret` values indexed by user_data order.
pub fn wait_all(q: &mut Blkioq, n: usize) -> Vec<(usize, i32)> {
    let mut out = Vec::with_capacity(n);
    let mut completions: Vec<MaybeUninit<blkio::Completion>> =
        (0..n.max(1)).map(|_| MaybeUninit::uninit()).collect();
    while out.len() < n {
        let want = n - out.len();
        let mut timeout = Duration::from_secs(30);
        let got = q
            .do_io(&mut completions[..want], 1, Some(&mut timeout), None)
            .expect("do_io");
        assert!(got > 0, "timed out waiting for completions");
        for c in &completions[..got] {
            // SAFETY: do_io initialised the first `got` entries.
            let c = unsafe { c.assume_init_ref() };
            out.push((c.user_data, c.ret));
        }
    }
    out
}

pub fn read(client: &mut Client, q: usize, offset: u64, buf_off: usize, len: usize) -> i32 {
    let ptr = client.buf_ptr(buf_off);
    client.queues[q].read(offset, ptr, len, 0, ReqFlags::empty());
    wait_all(&mut client.queues[q], 1)[0].1
}

pub fn write(client: &mut Client, q: usize, offset: u64, buf_off: usize, len: usize) -> i32 {
    let ptr = client.buf_ptr(buf_off);
    client.queues[q].write(offset, ptr, len, 0, ReqFlags::empty());
    wait_all(&mut client.queues[q], 1)[0].1
}

/// Collect whatever completions are ready on `q` within `timeout` (at least one unless the
/// timeout expires); `(user_data, ret)` pairs. A timeout is not an error here. At least one
/// request must be outstanding (libblkio refuses to wait for more than that).
pub fn reap_some(q: &mut Blkioq, max: usize, timeout: Duration) -> Vec<(usize, i32)> {
    let mut completions: Vec<MaybeUninit<blkio::Completion>> =
        (0..max.max(1)).map(|_| MaybeUninit::uninit()).collect();
    let mut t = timeout;
    match q.do_io(&mut completions, 1, Some(&mut t), None) {
        Ok(got) => completions[..got]
            .iter()
            .map(|c| {
                // SAFETY: do_io initialised the first `got` entries.
                let c = unsafe { c.assume_init_ref() };
                (c.user_data, c.ret)
            })
            .collect(),
        Err(e) if e.errno() == blkio::Errno::TIME => Vec::new(),
        Err(e) => panic!("do_io: {}", e.message()),
    }
}

// ---------------------------------------------------------------------------------------------
// Clients with options, memory the test owns across sessions, and per-session counters.
// ---------------------------------------------------------------------------------------------

/// Shared memory the test owns (a memfd mapped MAP_SHARED), handed to successive clients so
/// the daemon sees the same guest-physical addresses in every session, as with a VM's RAM.
/// (libblkio's vhost-user driver uses the client's virtual addresses as guest-physical
/// addresses.) Must outlive every client it is mapped into.
pub struct SharedMem {
    pub addr: usize,
    pub len: usize,
    fd: std::os::fd::OwnedFd,
}

impl SharedMem {
    pub fn new(len: usize) -> SharedMem {
        Self::map(len, None)
    }

    /// As [`SharedMem::new`], mapped at exactly `addr` (page-aligned; fails if anything is
    /// mapped there): to choose the guest-physical addresses the daemon sees.
    pub fn new_at(addr: usize, len: usize) -> SharedMem {
        Self::map(len, Some(addr))
    }

    fn map(len: usize, at: Option<usize>) -> SharedMem {
        use std::os::fd::FromRawFd;
        let page = 4096;
        let len = len.div_ceil(page) * page;
        // SAFETY: plain syscalls; every result is checked before use.
        unsafe {
            let fd = libc::memfd_create(c"guardblk-test-mem".as_ptr(), libc::MFD_CLOEXEC);
            assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
            let fd = std::os::fd::OwnedFd::from_raw_fd(fd);
            use std::os::fd::AsRawFd;
            assert_eq!(libc::ftruncate(fd.as_raw_fd(), len as libc::off_t), 0);
            let (hint, fixed) = match at {
                Some(a) => (a as *mut libc::c_void, libc::MAP_FIXED_NOREPLACE),
                None => (std::ptr::null_mut(), 0),
            };
            let addr = libc::mmap(
                hint,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | fixed,
                fd.as_raw_fd(),
                0,
            );
            assert_ne!(
                addr,
                libc::MAP_FAILED,
                "mmap at {at:x?}: {}",
                std::io::Error::last_os_error()
            );
            if let Some(a) = at {
                assert_eq!(addr as usize, a, "mapped elsewhere than asked");
            }
            SharedMem {
                addr: addr as usize,
                len,
                fd,
            }
        }
    }

    /// The libblkio description of this memory.
    pub fn region(&self) -> MemoryRegion {
        use std::os::fd::AsRawFd;
        MemoryRegion {
            addr: self.addr,
            iova: 0,
            len: self.len,
            fd: self.fd.as_raw_fd(),
            fd_offset: 0,
            flags: 0,
        }
    }
}

impl Drop for SharedMem {
    fn drop(&mut self) {
        // SAFETY: our own mapping; no client uses it any more (documented contract).
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

/// Connection options beyond [`Client::connect`].
#[derive(Clone, Copy)]
pub struct ClientOptions<'a> {
    pub num_queues: i32,
    /// libblkio's virtqueue size (default 256); must not exceed the daemon's `--queue-size`.
    pub queue_size: Option<i32>,
    /// Size of a freshly allocated buffer region (ignored with `memory`).
    pub buffer_len: usize,
    /// Map this memory instead of allocating a region.
    pub memory: Option<&'a SharedMem>,
}

impl Client {
    pub fn connect_opts(socket: &Path, opts: ClientOptions<'_>) -> blkio::Result<Client> {
        let mut blkio = Blkio::new("virtio-blk-vhost-user")?;
        blkio.set_str("path", socket.to_str().unwrap())?;
        blkio.connect()?;
        blkio.set_i32("num-queues", opts.num_queues)?;
        if let Some(size) = opts.queue_size {
            blkio.set_i32("queue-size", size)?;
        }
        let outcome = blkio.start()?;
        let region = match opts.memory {
            Some(mem) => mem.region(),
            None => {
                let align = blkio.get_u64("mem-region-alignment")? as usize;
                blkio.alloc_mem_region(opts.buffer_len.div_ceil(align) * align)?
            }
        };
        blkio.map_mem_region(&region)?;
        Ok(Client {
            blkio,
            queues: outcome.queues,
            region,
        })
    }
}
