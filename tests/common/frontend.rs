//! A vhost-user frontend for tests, on the `vhost` crate's `Frontend`, speaking the protocol
//! the way QEMU does: guest memory in a shared memfd, one split virtqueue laid out by hand,
//! virtio-blk requests built descriptor by descriptor, and the steps QEMU takes around them
//! (in-flight region, dirty log, reconnect). libblkio hides all of that; these tests need to
//! see and steer it.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

pub const MEM_SIZE: usize = 16 << 20;
pub const QUEUE_SIZE: u16 = 256;
/// Where the ring and the per-request headers and status bytes live (guest-physical).
pub const DESC_GPA: u64 = 0x0;
pub const AVAIL_GPA: u64 = 0x1000;
pub const USED_GPA: u64 = 0x2000;
pub const HEADERS_GPA: u64 = 0x4000;
pub const STATUS_GPA: u64 = 0x6000;
/// Data buffers go from here up.
pub const DATA_GPA: u64 = 0x10_0000;
/// Requests at once: three descriptors each (header, data, status).
pub const MAX_REQUESTS: u16 = QUEUE_SIZE / 3;
pub const PAGE: u64 = 4096;

const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

/// Guest memory: a memfd mapped shared, as QEMU's memory-backend-memfd,share=on.
pub struct GuestMem {
    file: File,
    ptr: *mut u8,
}

// SAFETY: the mapping lives as long as the value; tests access it through bounds-checked
// copies, and the daemon's concurrent writes are what the tests observe.
unsafe impl Send for GuestMem {}
// SAFETY: as above.
unsafe impl Sync for GuestMem {}

impl GuestMem {
    pub fn new() -> GuestMem {
        // SAFETY: memfd_create with a static NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"guardblk-test-guest".as_ptr(), 0) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor we own.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(MEM_SIZE as u64).unwrap();
        // SAFETY: a new shared mapping of the whole memfd; checked below, unmapped in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEM_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        GuestMem {
            file,
            ptr: ptr.cast(),
        }
    }

    fn check(&self, gpa: u64, len: usize) -> usize {
        let at = usize::try_from(gpa).unwrap();
        assert!(at + len <= MEM_SIZE, "{gpa:#x}+{len} outside guest memory");
        at
    }

    pub fn write(&self, gpa: u64, bytes: &[u8]) {
        let at = self.check(gpa, bytes.len());
        // SAFETY: inside the mapping (checked); volatile-free copy is fine for a test driver.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(at), bytes.len()) };
    }

    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let at = self.check(gpa, len);
        let mut out = vec![0u8; len];
        // SAFETY: inside the mapping (checked).
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(at), out.as_mut_ptr(), len) };
        out
    }

    fn read_u16(&self, gpa: u64) -> u16 {
        let at = self.check(gpa, 2);
        // SAFETY: inside the mapping, 2-aligned (every ring field is); a volatile read
        // because the daemon writes it concurrently.
        unsafe { std::ptr::read_volatile(self.ptr.add(at) as *const u16) }
    }

    fn write_u16(&self, gpa: u64, value: u16) {
        let at = self.check(gpa, 2);
        // SAFETY: as read_u16.
        unsafe { std::ptr::write_volatile(self.ptr.add(at) as *mut u16, value) };
    }

    /// The frontend's virtual address of `gpa` (vhost-user speaks in those).
    fn va(&self, gpa: u64) -> u64 {
        self.ptr as u64 + gpa
    }

    fn region(&self) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM_SIZE as u64,
            userspace_addr: self.ptr as u64,
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        }
    }
}

impl Drop for GuestMem {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping `new` made.
        unsafe { libc::munmap(self.ptr.cast(), MEM_SIZE) };
    }
}

/// The dirty log a frontend hands the daemon (SET_LOG_BASE): one bit per 4 KiB page.
pub struct DirtyLog {
    file: File,
    len: usize,
}

impl DirtyLog {
    pub fn new() -> DirtyLog {
        // SAFETY: as GuestMem::new.
        let fd = unsafe { libc::memfd_create(c"guardblk-test-log".as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor we own.
        let file = unsafe { File::from_raw_fd(fd) };
        let len = (MEM_SIZE as u64 / PAGE / 8).max(PAGE) as usize;
        file.set_len(len as u64).unwrap();
        DirtyLog { file, len }
    }

    /// Pages whose bit is set, in order.
    pub fn dirty_pages(&self) -> Vec<u64> {
        let mut bytes = vec![0u8; self.len];
        self.file.read_exact_at(&mut bytes, 0).unwrap();
        (0..bytes.len() as u64 * 8)
            .filter(|&p| bytes[(p / 8) as usize] & (1 << (p % 8)) != 0)
            .collect()
    }

    /// Clear every bit (as QEMU does when it harvests the log).
    pub fn clear(&self) {
        self.file.write_all_at(&vec![0u8; self.len], 0).unwrap();
    }
}

/// What a frontend negotiates.
#[derive(Clone, Copy, Default)]
pub struct FrontendOptions {
    /// Offer VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD and hand over an in-flight region.
    pub inflight: bool,
    /// Negotiate LOG_SHMFD (so a dirty log can be given).
    pub log_shmfd: bool,
}

/// One connection's view of the device: the negotiated features, the queue's kick and call.
pub struct TestFrontend {
    pub frontend: Frontend,
    pub features: u64,
    kick: EventFd,
    call: EventFd,
}

/// A frontend-side queue: our own avail index, the requests we built, and the in-flight
/// region (which outlives connections, as QEMU keeps it).
pub struct TestQueue {
    pub mem: GuestMem,
    avail_idx: u16,
    pub inflight: Option<(VhostUserInflight, File)>,
}

impl TestQueue {
    pub fn new() -> TestQueue {
        TestQueue {
            mem: GuestMem::new(),
            avail_idx: 0,
            inflight: None,
        }
    }

    /// Connect to `socket` and start the queue at `base` (QEMU's SET_VRING_BASE: 0 at first
    /// start, the used index after a backend it could not ask died).
    pub fn connect(&mut self, socket: &Path, options: FrontendOptions, base: u16) -> TestFrontend {
        let mut frontend = Frontend::connect(socket, 1).expect("connect to the daemon");
        frontend.set_owner().unwrap();
        let offered = frontend.get_features().unwrap();
        let features =
            offered & (VIRTIO_F_VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits());
        frontend.set_features(features).unwrap();
        let mut wanted = VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ;
        if options.inflight {
            wanted |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
        }
        if options.log_shmfd {
            wanted |= VhostUserProtocolFeatures::LOG_SHMFD;
        }
        let protocol = frontend.get_protocol_features().unwrap() & wanted;
        frontend.set_protocol_features(protocol).unwrap();
        frontend.set_mem_table(&[self.mem.region()]).unwrap();
        if options.inflight {
            if self.inflight.is_none() {
                let request = VhostUserInflight {
                    mmap_size: 0,
                    mmap_offset: 0,
                    num_queues: 1,
                    queue_size: QUEUE_SIZE,
                };
                self.inflight = Some(frontend.get_inflight_fd(&request).unwrap());
            }
            let (info, file) = self.inflight.as_ref().unwrap();
            frontend.set_inflight_fd(info, file.as_raw_fd()).unwrap();
        }
        frontend.set_vring_num(0, QUEUE_SIZE).unwrap();
        frontend.set_vring_base(0, base).unwrap();
        frontend.set_vring_addr(0, &self.vring_config(0)).unwrap();
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        frontend.set_vring_kick(0, &kick).unwrap();
        frontend.set_vring_call(0, &call).unwrap();
        frontend.set_vring_enable(0, true).unwrap();
        // What the daemon may have completed while we were away counts from here.
        self.avail_idx = self.avail_idx.max(base);
        TestFrontend {
            frontend,
            features,
            kick,
            call,
        }
    }

    fn vring_config(&self, flags: u32) -> VringConfigData {
        VringConfigData {
            queue_max_size: QUEUE_SIZE,
            queue_size: QUEUE_SIZE,
            flags,
            desc_table_addr: self.mem.va(DESC_GPA),
            used_ring_addr: self.mem.va(USED_GPA),
            avail_ring_addr: self.mem.va(AVAIL_GPA),
            log_addr: Some(USED_GPA),
        }
    }

    fn write_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write(DESC_GPA + u64::from(index) * 16, &raw);
    }

    /// Build request `k` (descriptors 3k..3k+2: header, data, status) and make it available.
    /// `data_len` 0 builds a two-descriptor chain without data.
    pub fn submit(&mut self, k: u16, request_type: u32, sector: u64, data_gpa: u64, data_len: u32) {
        assert!(k < MAX_REQUESTS);
        let head = 3 * k;
        let header = HEADERS_GPA + u64::from(k) * 16;
        let mut raw = [0u8; 16];
        raw[..4].copy_from_slice(&request_type.to_le_bytes());
        raw[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write(header, &raw);
        self.mem.write(STATUS_GPA + u64::from(k), &[0xff]);
        let status_desc = if data_len > 0 { head + 2 } else { head + 1 };
        self.write_desc(head, header, 16, DESC_F_NEXT, head + 1);
        if data_len > 0 {
            let writable = if request_type == VIRTIO_BLK_T_OUT {
                0
            } else {
                DESC_F_WRITE
            };
            self.write_desc(
                head + 1,
                data_gpa,
                data_len,
                DESC_F_NEXT | writable,
                head + 2,
            );
        }
        self.write_desc(status_desc, STATUS_GPA + u64::from(k), 1, DESC_F_WRITE, 0);
        let slot = u64::from(self.avail_idx % QUEUE_SIZE);
        self.mem.write_u16(AVAIL_GPA + 4 + 2 * slot, head);
        fence(Ordering::Release);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem.write_u16(AVAIL_GPA + 2, self.avail_idx);
    }

    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    pub fn used_idx(&self) -> u16 {
        self.mem.read_u16(USED_GPA + 2)
    }

    /// Used-ring entry `i` (mod the ring size): (request number k, length).
    pub fn used_entry(&self, i: u16) -> (u16, u32) {
        let raw = self
            .mem
            .read(USED_GPA + 4 + 8 * u64::from(i % QUEUE_SIZE), 8);
        let id = u32::from_le_bytes(raw[..4].try_into().unwrap());
        let len = u32::from_le_bytes(raw[4..].try_into().unwrap());
        assert_eq!(
            id % 3,
            0,
            "used entry {i} names head {id}, not a request head"
        );
        ((id / 3) as u16, len)
    }

    pub fn status(&self, k: u16) -> u8 {
        self.mem.read(STATUS_GPA + u64::from(k), 1)[0]
    }

    /// Wait until the used index reaches `target` (wrapping), or `timeout`.
    pub fn wait_used(&self, target: u16, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.used_idx().wrapping_sub(target) < 0x8000 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    /// The SET_VRING_ADDR message for this queue (flags: VHOST_VRING_F_LOG or 0).
    pub fn vring_addr(&self, log: bool) -> VringConfigData {
        self.vring_config(u32::from(log))
    }

    /// SET_VRING_ADDR again on the running ring, flags only (what QEMU does to flip
    /// VHOST_VRING_F_LOG at the start and end of a migration).
    pub fn resend_vring_addr(&self, frontend: &TestFrontend, log: bool) {
        frontend
            .frontend
            .set_vring_addr(0, &self.vring_config(u32::from(log)))
            .unwrap();
    }
}

/// One request at a time, waited for: what a test that checks each request's outcome needs.
/// Owns its queue and connection (dropping it disconnects).
pub struct SyncIo {
    pub q: TestQueue,
    pub fe: TestFrontend,
    next: u16,
}

impl SyncIo {
    /// A fresh queue, connected to `socket` with the default options.
    pub fn connect(socket: &Path) -> SyncIo {
        let mut q = TestQueue::new();
        let fe = q.connect(socket, FrontendOptions::default(), 0);
        let next = q.used_idx();
        SyncIo { q, fe, next }
    }

    /// Submit one request, wait for it, return its status.
    pub fn run(&mut self, request_type: u32, sector: u64, data: Option<(u64, u32)>) -> u8 {
        let k = self.next % MAX_REQUESTS;
        let (gpa, len) = data.unwrap_or((0, 0));
        self.q.submit(k, request_type, sector, gpa, len);
        self.fe.kick();
        self.next = self.next.wrapping_add(1);
        assert!(
            self.q.wait_used(self.next, Duration::from_secs(15)),
            "request {k} (type {request_type}, sector {sector}) not answered"
        );
        self.q.status(k)
    }

    pub fn write(&mut self, sector: u64, bytes: &[u8]) -> u8 {
        self.q.mem.write(DATA_GPA, bytes);
        self.run(
            VIRTIO_BLK_T_OUT,
            sector,
            Some((DATA_GPA, bytes.len() as u32)),
        )
    }

    pub fn read(&mut self, sector: u64, len: u32) -> (u8, Vec<u8>) {
        self.q.mem.write(DATA_GPA, &vec![0xee; len as usize]);
        let status = self.run(VIRTIO_BLK_T_IN, sector, Some((DATA_GPA, len)));
        (status, self.q.mem.read(DATA_GPA, len as usize))
    }

    pub fn flush(&mut self) -> u8 {
        self.run(VIRTIO_BLK_T_FLUSH, 0, None)
    }
}

impl TestFrontend {
    pub fn kick(&self) {
        self.kick.write(1).unwrap();
    }

    /// A second handle on the queue's kick eventfd, for a guest that goes on queueing
    /// requests and kicking from its own thread, and after this frontend's socket is gone
    /// (the daemon still holds the ring's memory and its own copy of the eventfd).
    pub fn kick_handle(&self) -> EventFd {
        self.kick.try_clone().unwrap()
    }

    /// Hand the daemon a dirty log (SET_LOG_BASE with its fd).
    pub fn set_log(&self, log: &DirtyLog) {
        self.frontend
            .set_log_base(
                0,
                Some(VhostUserDirtyLogRegion {
                    mmap_size: log.len as u64,
                    mmap_offset: 0,
                    mmap_handle: log.file.as_raw_fd(),
                }),
            )
            .unwrap();
    }

    /// Turn VHOST_F_LOG_ALL on or off (SET_FEATURES, as at the start and end of a migration).
    pub fn set_log_all(&self, on: bool) {
        let log_all = VhostUserVirtioFeatures::LOG_ALL.bits();
        let features = if on {
            self.features | log_all
        } else {
            self.features & !log_all
        };
        self.frontend.set_features(features).unwrap();
        // SET_FEATURES has no reply; QEMU waits for the backend to have applied it (REPLY_ACK,
        // or a GET_FEATURES round trip as here) before the guest's next request, so that no
        // write of the daemon's escapes the log.
        self.frontend.get_features().unwrap();
    }

    pub fn offers_log_all(&self) -> bool {
        self.frontend.get_features().unwrap() & VhostUserVirtioFeatures::LOG_ALL.bits() != 0
    }

    /// Interrupts received since the last call.
    pub fn take_interrupts(&self) -> u64 {
        self.call.read().unwrap_or(0)
    }

    /// GET_VRING_BASE: stop the queue (the daemon drains it first).
    pub fn stop(&self) -> u32 {
        self.frontend.get_vring_base(0).unwrap()
    }
}
