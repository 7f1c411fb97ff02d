//! gbtool: workloads for guardblk's guest tests, run inside the busybox initramfs.
//!
//! Built by guest-tests/run.sh as a static x86_64 binary (no libc in the initramfs).
//!
//! ```text
//! gbtool mutate-write DEV OFFSET_MIB LEN_MIB SECONDS
//! gbtool swap-churn MIB SECONDS THREADS
//! gbtool migrate-verify DEV OFFSET_MIB LEN_MIB SECONDS SLOTS [READ_PERCENT]
//! ```
//!
//! `mutate-write` is fstests generic/761's idea against a raw device: O_DIRECT writes (so the
//! kernel hands the pages of the user buffer to virtio as they are, zero-copy) from a buffer
//! another thread keeps overwriting while the writes are in flight. Every write must succeed.
//! Then reads of the region into a buffer that is being overwritten too, plain O_DIRECT reads
//! of the whole region, and finally a known pattern written without interference and read
//! back byte for byte. The region's content after the mutating writes is unspecified (any
//! version of the buffer is a correct result), so only its readability is checked.
//!
//! `swap-churn` maps MIB of anonymous memory (meant to be more than the guest has free, with a
//! swap device active), stamps every page with its index and a version, then THREADS threads
//! sweep over it (each page verified, then rewritten with its next version) for SECONDS, then
//! every page is verified. Now and then a run of pages is pushed out with MADV_PAGEOUT and
//! rewritten at once, while their swap-out is still in flight: Linux maps a page under swap
//! writeback writable again (on a device without stable writes, like virtio-blk), so the
//! process changes it while the device reads it.
//!
//! `migrate-verify` runs while the host live-migrates the guest. It stamps every 4 KiB block
//! of the region (a version per block), then for SECONDS two threads read random blocks with
//! O_DIRECT into SLOTS page-sized read buffers in turn (the daemon writes those pages; the
//! guest's CPUs never do), checking each block's stamp and remembering a checksum of each
//! buffer, and otherwise (100 − READ_PERCENT % of the time, 25 % by default) rewrite a block
//! with its next version. Then every buffer must
//! still hold what was read into it: a page the daemon wrote that QEMU's dirty log did not
//! learn of arrives at the destination as it was before, and its checksum no longer matches
//! ("stale"). Last, every block must read back its latest version ("lost").
//!
//! Output: lines starting with "gbtool:"; exit status 0 on success, 1 on any failure (with the
//! reason on stderr), 2 on bad usage.

use std::alloc::{alloc_zeroed, Layout};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::process::exit;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const PAGE: usize = 4096;
/// Write and read sizes; all multiples of the guest's 4096-byte logical block size.
const SIZES: [usize; 8] = [4096, 8192, 12288, 16384, 32768, 45056, 61440, 65536];

fn fail(msg: String) -> ! {
    eprintln!("gbtool: FAIL: {msg}");
    exit(1)
}

fn usage() -> ! {
    eprintln!(
        "usage: gbtool mutate-write DEV OFFSET_MIB LEN_MIB SECONDS\n       gbtool swap-churn MIB SECONDS THREADS\n       gbtool migrate-verify DEV OFFSET_MIB LEN_MIB SECONDS SLOTS [READ_PERCENT]"
    );
    exit(2)
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize) -> T {
    args.get(i)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| usage())
}

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// xorshift64*: cheap, deterministic noise.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A page-aligned heap buffer shared between an I/O thread and a scribbler. The scribbler
/// only touches it through atomics; the I/O thread only hands its address to the kernel.
struct Buf {
    ptr: *mut u8,
    len: usize,
}
// SAFETY: the buffer is plain heap memory owned for the program's life; threads share it only
// through atomics (scribbler) and raw addresses handed to the kernel (I/O thread).
unsafe impl Send for Buf {}
// SAFETY: as for Send.
unsafe impl Sync for Buf {}
impl Buf {
    fn new(len: usize) -> Buf {
        let layout = Layout::from_size_align(len, PAGE).unwrap();
        // SAFETY: the layout has a non-zero size (every caller asks for at least a page).
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            fail(format!("cannot allocate {len} bytes"));
        }
        Buf { ptr, len }
    }
    fn words(&self) -> &[AtomicU64] {
        // SAFETY: ptr is page-aligned (so 8-byte aligned), valid for len bytes, and never freed;
        // AtomicU64 has the layout of u64 and tolerates concurrent access.
        unsafe { std::slice::from_raw_parts(self.ptr as *const AtomicU64, self.len / 8) }
    }
}

/// Overwrite `buf` with ever-changing words until `stop`; returns the number of sweeps.
fn scribble(buf: &Buf, stop: &AtomicBool) -> u64 {
    let words = buf.words();
    let mut x: u64 = 0x5EED;
    let mut sweeps = 0;
    while !stop.load(Ordering::Relaxed) {
        for w in words {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            w.store(x, Ordering::Relaxed);
        }
        sweeps += 1;
    }
    sweeps
}

/// Run `io` while another thread scribbles over `buf`; returns (io's result, sweeps).
fn with_scribbler<R>(buf: &Arc<Buf>, io: impl FnOnce() -> R) -> (R, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let scribbler = {
        let (buf, stop) = (buf.clone(), stop.clone());
        thread::spawn(move || scribble(&buf, &stop))
    };
    // Let the scribbler get going before the first request.
    thread::sleep(Duration::from_millis(20));
    let r = io();
    stop.store(true, Ordering::Relaxed);
    (r, scribbler.join().unwrap())
}

fn pwrite_all(fd: i32, ptr: *const u8, len: usize, off: u64) -> Result<(), String> {
    // SAFETY: every caller passes a pointer into a live Buf with at least len bytes after it.
    let n = unsafe { libc::pwrite(fd, ptr as *const libc::c_void, len, off as libc::off_t) };
    if n < 0 {
        Err(format!("pwrite of {len} bytes at byte {off}: {}", errno()))
    } else if n as usize != len {
        Err(format!("pwrite of {len} bytes at byte {off} wrote {n}"))
    } else {
        Ok(())
    }
}

fn pread_all(fd: i32, ptr: *mut u8, len: usize, off: u64) -> Result<(), String> {
    // SAFETY: every caller passes a pointer into a live Buf with at least len bytes after it,
    // and holds no Rust reference to those bytes during the call.
    let n = unsafe { libc::pread(fd, ptr as *mut libc::c_void, len, off as libc::off_t) };
    if n < 0 {
        Err(format!("pread of {len} bytes at byte {off}: {}", errno()))
    } else if n as usize != len {
        Err(format!("pread of {len} bytes at byte {off} read {n}"))
    } else {
        Ok(())
    }
}

/// Two-segment write: the request's data comes from two separate parts of the buffer.
fn pwritev2seg(
    fd: i32,
    a: (*const u8, usize),
    b: (*const u8, usize),
    off: u64,
) -> Result<(), String> {
    let iov = [
        libc::iovec {
            iov_base: a.0 as *mut libc::c_void,
            iov_len: a.1,
        },
        libc::iovec {
            iov_base: b.0 as *mut libc::c_void,
            iov_len: b.1,
        },
    ];
    let len = a.1 + b.1;
    // SAFETY: both segments point into a live Buf with their lengths after them (caller), and
    // iov outlives the call.
    let n = unsafe { libc::pwritev(fd, iov.as_ptr(), 2, off as libc::off_t) };
    if n < 0 {
        Err(format!("pwritev of {len} bytes at byte {off}: {}", errno()))
    } else if n as usize != len {
        Err(format!("pwritev of {len} bytes at byte {off} wrote {n}"))
    } else {
        Ok(())
    }
}

/// Deterministic content of the final verification pass: every 4 KiB block stamped with
/// its byte offset on the device.
fn fill_final(chunk: &mut [u8], dev_off: u64) {
    for (i, block) in chunk.chunks_mut(PAGE).enumerate() {
        let pos = dev_off + (i * PAGE) as u64;
        let mut rng = Rng(pos ^ 0xD1B5_4A32_D192_ED03);
        for w in block.chunks_mut(8) {
            w.copy_from_slice(&rng.next().to_le_bytes());
        }
        block[..8].copy_from_slice(b"GBMUTFIN");
        block[8..16].copy_from_slice(&pos.to_le_bytes());
    }
}

fn mutate_write(args: &[String]) {
    let dev: String = arg(args, 2);
    let off_mib: u64 = arg(args, 3);
    let len_mib: u64 = arg(args, 4);
    let secs: f64 = arg(args, 5);
    let (start, len) = (off_mib * MIB, len_mib * MIB);
    let file: File = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&dev)
        .unwrap_or_else(|e| fail(format!("open {dev} O_DIRECT: {e}")));
    let fd = file.as_raw_fd();
    let buf = Arc::new(Buf::new(128 * 1024));
    let blocks = len / PAGE as u64;

    // 1. Mutating writes for SECS.
    let mut rng = Rng(0x1234_5678_9ABC_DEF1);
    let t0 = Instant::now();
    let ((writes, bytes), sweeps) = with_scribbler(&buf, || {
        let (mut writes, mut bytes) = (0u64, 0u64);
        let deadline = t0 + Duration::from_secs_f64(secs);
        while Instant::now() < deadline {
            let size = SIZES[rng.below(SIZES.len() as u64) as usize];
            let nblk = (size / PAGE) as u64;
            let off = start + rng.below(blocks - nblk + 1) * PAGE as u64;
            let buf_off = rng.below(((buf.len - size) / PAGE + 1) as u64) as usize * PAGE;
            // SAFETY: buf_off + size <= buf.len by the choice of buf_off above.
            let p = unsafe { buf.ptr.add(buf_off) } as *const u8;
            let r = if nblk >= 2 && writes % 4 == 3 {
                // Second segment from the other half of the buffer.
                let first = rng.below(nblk - 1) as usize * PAGE + PAGE;
                let b_off = (buf_off + 64 * 1024) % (buf.len - (size - first) + 1) / PAGE * PAGE;
                // SAFETY: b_off + (size - first) <= buf.len by the modulus above.
                let second = unsafe { buf.ptr.add(b_off) };
                pwritev2seg(fd, (p, first), (second, size - first), off)
            } else {
                pwrite_all(fd, p, size, off)
            };
            r.unwrap_or_else(|e| fail(format!("mutating write #{}: {e}", writes + 1)));
            writes += 1;
            bytes += size as u64;
        }
        (writes, bytes)
    });
    // SAFETY: fdatasync takes no memory.
    if unsafe { libc::fdatasync(fd) } != 0 {
        fail(format!("fdatasync after mutating writes: {}", errno()));
    }
    let dt = t0.elapsed().as_secs_f64();
    println!(
        "gbtool: mutate-write: {writes} O_DIRECT writes ({:.1} MiB, 4-64 KiB) to [{off_mib}, {}) MiB in {dt:.1} s, buffer overwritten {sweeps} times meanwhile",
        bytes as f64 / MIB as f64,
        off_mib + len_mib
    );

    // 2. Reads of the whole region into a buffer that is being overwritten.
    let t1 = Instant::now();
    let (reads, sweeps) = with_scribbler(&buf, || {
        let mut pos = start;
        let mut reads = 0u64;
        let mut rng = Rng(0xFEED_FACE_CAFE_BEEF);
        while pos < start + len {
            let size = (SIZES[rng.below(SIZES.len() as u64) as usize] as u64).min(start + len - pos)
                as usize;
            pread_all(fd, buf.ptr, size, pos)
                .unwrap_or_else(|e| fail(format!("read into a mutating buffer: {e}")));
            reads += 1;
            pos += size as u64;
        }
        reads
    });
    println!(
        "gbtool: mutate-write: {reads} O_DIRECT reads of the region into a buffer overwritten {sweeps} times meanwhile, {:.1} s",
        t1.elapsed().as_secs_f64()
    );

    // 3. Plain reads (nobody touches the buffer): every block must read.
    let big = Buf::new(1 << 20);
    let mut pos = start;
    while pos < start + len {
        let size = (big.len as u64).min(start + len - pos) as usize;
        pread_all(fd, big.ptr, size, pos).unwrap_or_else(|e| fail(format!("plain read-back: {e}")));
        pos += size as u64;
    }

    // 4. A known pattern, written and read back without interference.
    // SAFETY: big is live and only this thread uses it; the kernel only reads it (pwrite)
    // while `out` exists.
    let out = unsafe { std::slice::from_raw_parts_mut(big.ptr, big.len) };
    let mut pos = start;
    while pos < start + len {
        let size = (big.len as u64).min(start + len - pos) as usize;
        fill_final(&mut out[..size], pos);
        pwrite_all(fd, big.ptr, size, pos)
            .unwrap_or_else(|e| fail(format!("final pattern write: {e}")));
        pos += size as u64;
    }
    // SAFETY: fdatasync takes no memory.
    if unsafe { libc::fdatasync(fd) } != 0 {
        fail(format!("fdatasync after the final pattern: {}", errno()));
    }
    let check = Buf::new(64 * 1024);
    let expect = &mut out[..check.len];
    let mut pos = start;
    while pos < start + len {
        pread_all(fd, check.ptr, check.len, pos)
            .unwrap_or_else(|e| fail(format!("final read-back: {e}")));
        // SAFETY: check is live, the read into it has completed, and nothing writes it while
        // `got` exists.
        let got = unsafe { std::slice::from_raw_parts(check.ptr, check.len) };
        fill_final(expect, pos);
        if let Some(i) = (0..check.len).find(|&i| got[i] != expect[i]) {
            fail(format!(
                "final pattern differs at device byte {}",
                pos + i as u64
            ));
        }
        pos += check.len as u64;
    }
    println!("gbtool: mutate-write: region read back fine; final pattern written and verified");
}

// --- swap-churn -------------------------------------------------------------------------------

const WORDS: usize = PAGE / 8;
const PAGE_MAGIC: u64 = 0x4742_5357_4150_0000; // "GBSWAP\0\0"

fn page_seed(idx: u64, ver: u64) -> u64 {
    (idx.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ver.wrapping_mul(0xC2B2_AE3D_27D4_EB4F)) | 1
}

fn fill_page(page: &mut [u64], idx: u64, ver: u64) {
    page[0] = PAGE_MAGIC ^ idx;
    page[1] = ver;
    let mut x = page_seed(idx, ver);
    for w in &mut page[2..] {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *w = x;
    }
}

fn check_page(page: &[u64], idx: u64, ver: u64) -> Result<(), String> {
    if page[0] != PAGE_MAGIC ^ idx || page[1] != ver {
        return Err(format!(
            "page {idx}: header {:#018x} {:#x}, expected {:#018x} {ver:#x}",
            page[0],
            page[1],
            PAGE_MAGIC ^ idx
        ));
    }
    let mut x = page_seed(idx, ver);
    for (j, w) in page[2..].iter().enumerate() {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        if *w != x {
            return Err(format!(
                "page {idx} version {ver}: word {} is {w:#x}, expected {x:#x}",
                j + 2
            ));
        }
    }
    Ok(())
}

fn vmstat() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/vmstat").unwrap_or_default();
    let get = |k: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(k).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0)
    };
    (get("pswpin "), get("pswpout "))
}

struct Area(*mut u64);
// SAFETY: the mapping lives until the process exits, and each thread touches only its own
// pages (see swap_churn).
unsafe impl Send for Area {}
// SAFETY: as for Send.
unsafe impl Sync for Area {}

fn swap_churn(args: &[String]) {
    let mib: u64 = arg(args, 2);
    let secs: f64 = arg(args, 3);
    let nthreads: u64 = arg(args, 4);
    if nthreads == 0 || mib == 0 {
        usage();
    }
    let pages = mib * MIB / PAGE as u64;
    let bytes = (mib * MIB) as usize;
    // SAFETY: an anonymous private mapping; no existing memory is affected.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        fail(format!("mmap of {mib} MiB: {}", errno()));
    }
    let area = Arc::new(Area(p as *mut u64));
    let (in0, out0) = vmstat();
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(secs);

    // Thread t owns pages t, t + n, t + 2n, ...; it alone reads and writes them, and keeps
    // their versions in its own (small) memory.
    let workers: Vec<_> = (0..nthreads)
        .map(|t| {
            let area = area.clone();
            thread::spawn(move || {
                // SAFETY: i < pages, so the page lies inside the mapping, and page i belongs to
                // this thread alone (i = t mod nthreads), so no other reference to it exists.
                let page = |i: u64| unsafe {
                    std::slice::from_raw_parts_mut(area.0.add(i as usize * WORDS), WORDS)
                };
                let mine: Vec<u64> = (t..pages).step_by(nthreads as usize).collect();
                let mut ver = vec![0u64; mine.len()];
                for &i in &mine {
                    fill_page(page(i), i, 0);
                }
                let filled = t0.elapsed().as_secs_f64();
                // Sweep the pages in order, over and over: verify, then rewrite with the
                // next version. With the area bigger than RAM, reclaim evicts the pages
                // touched longest ago, which are the ones the sweep is about to touch, so
                // some are faulted back in and rewritten while their swap-out is in flight.
                //
                // Reclaim picks pages far ahead of the sweep, though, and their swap-out is
                // long over when it gets there. So every fourth step of 64 pages also pushes
                // a random run of BURST of this thread's pages out with MADV_PAGEOUT (the
                // kernel's own reclaim path: unmap, start the swap write, return) and rewrites
                // them at once: the writes fault them back from the swap cache, writable,
                // while their swap-out is still in flight.
                const BURST: usize = 32;
                let rewrite = |k: usize, ver: &mut [u64]| {
                    let i = mine[k];
                    let pg = page(i);
                    check_page(pg, i, ver[k]).unwrap_or_else(|e| fail(format!("churn: {e}")));
                    ver[k] += 1;
                    fill_page(pg, i, ver[k]);
                };
                let mut rng = Rng(0xA5A5_0000_0000_0001 + t);
                let (mut ops, mut bursts, mut pageout_ok) = (0u64, 0u64, true);
                let (mut k, mut step) = (0usize, 0u64);
                while Instant::now() < deadline {
                    step += 1;
                    for _ in 0..64 {
                        rewrite(k, &mut ver);
                        k = (k + 1) % mine.len();
                        ops += 1;
                    }
                    if pageout_ok && mine.len() > BURST && step % 4 == 0 {
                        let k0 = rng.below((mine.len() - BURST) as u64) as usize;
                        let (first, last) = (mine[k0], mine[k0 + BURST - 1]);
                        // SAFETY: the range lies inside the mapping; MADV_PAGEOUT does not
                        // change its contents.
                        let r = unsafe {
                            libc::madvise(
                                area.0.add(first as usize * WORDS) as *mut libc::c_void,
                                (last - first + 1) as usize * PAGE,
                                libc::MADV_PAGEOUT,
                            )
                        };
                        if r != 0 {
                            eprintln!(
                                "gbtool: madvise(MADV_PAGEOUT): {} (no more bursts)",
                                errno()
                            );
                            pageout_ok = false;
                            continue;
                        }
                        for kk in k0..k0 + BURST {
                            rewrite(kk, &mut ver);
                        }
                        ops += BURST as u64;
                        bursts += 1;
                    }
                }
                for (k, &i) in mine.iter().enumerate() {
                    check_page(page(i), i, ver[k])
                        .unwrap_or_else(|e| fail(format!("final check: {e}")));
                }
                (ops, filled, bursts)
            })
        })
        .collect();
    let (mut ops, mut filled, mut bursts) = (0u64, 0f64, 0u64);
    for w in workers {
        let (o, f, b) = w.join().unwrap();
        ops += o;
        filled = filled.max(f);
        bursts += b;
    }
    let (in1, out1) = vmstat();
    println!(
        "gbtool: swap-churn: {mib} MiB ({pages} pages), {nthreads} threads, {ops} verified page rewrites ({:.1} sweeps, {bursts} MADV_PAGEOUT bursts), every page verified at the end; {filled:.1} s to fill, {:.1} s in all; pswpin +{} pswpout +{}",
        ops as f64 / pages as f64,
        t0.elapsed().as_secs_f64(),
        in1 - in0,
        out1 - out0
    );
}

/// Checksum of one page (FNV-style over words; any change of a word changes it).
fn page_sum(page: &[u64]) -> u64 {
    page.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &w| {
        (h ^ w).wrapping_mul(0x0100_0000_01b3).rotate_left(7)
    })
}

/// One thread's share of migrate-verify: blocks `[first, first + blocks)` of the region (it
/// alone writes them) and read buffers `slots` of the shared arena.
struct VerifyShare {
    first: u64,
    blocks: u64,
    slots: std::ops::Range<usize>,
    /// Percent of operations that are reads (the rest write).
    read_percent: u64,
}

#[derive(Default)]
struct VerifyTally {
    reads: u64,
    writes: u64,
    stale: u64,
    lost: u64,
    first_problem: Option<String>,
}

impl VerifyTally {
    fn problem(&mut self, what: String) {
        self.first_problem.get_or_insert(what);
    }
}

fn migrate_verify(args: &[String]) {
    let dev: String = arg(args, 2);
    let offset = arg::<u64>(args, 3) * MIB;
    let len = arg::<u64>(args, 4) * MIB;
    let seconds: u64 = arg(args, 5);
    let slots: usize = arg(args, 6);
    let read_percent: u64 = if args.len() > 7 { arg(args, 7) } else { 75 };
    let blocks = len / PAGE as u64;
    if blocks < 2 || slots < 2 || read_percent > 100 {
        usage();
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&dev)
        .unwrap_or_else(|e| fail(format!("open {dev}: {e}")));
    let fd = file.as_raw_fd();
    // Version of each block, and what each read buffer should hold (block, version, sum).
    let versions: Arc<Vec<AtomicU64>> = Arc::new((0..blocks).map(|_| AtomicU64::new(0)).collect());
    let arena = Arc::new(Buf::new(slots * PAGE));
    let stamp = Buf::new(64 * 1024);

    // Version 0 everywhere, written in 64 KiB pieces.
    let per_chunk = stamp.len / PAGE;
    let mut block = 0u64;
    while block < blocks {
        let n = per_chunk.min((blocks - block) as usize);
        // SAFETY: stamp is a live page-aligned buffer of per_chunk pages; no other thread has it.
        let words = unsafe { std::slice::from_raw_parts_mut(stamp.ptr as *mut u64, n * PAGE / 8) };
        for (i, page) in words.chunks_mut(PAGE / 8).enumerate() {
            fill_page(page, block + i as u64, 0);
        }
        pwrite_all(fd, stamp.ptr, n * PAGE, offset + block * PAGE as u64)
            .unwrap_or_else(|e| fail(e));
        block += n as u64;
    }
    println!("gbtool: migrate-verify: {blocks} blocks stamped; reading into {slots} buffers for {seconds}s");

    let deadline = Instant::now() + Duration::from_secs(seconds);
    let half = blocks / 2;
    let shares = [
        VerifyShare {
            first: 0,
            blocks: half,
            slots: 0..slots / 2,
            read_percent,
        },
        VerifyShare {
            first: half,
            blocks: blocks - half,
            slots: slots / 2..slots,
            read_percent,
        },
    ];
    let threads: Vec<_> = shares
        .into_iter()
        .enumerate()
        .map(|(t, share)| {
            let (versions, arena) = (Arc::clone(&versions), Arc::clone(&arena));
            thread::spawn(move || {
                verify_share(fd, offset, &share, &versions, &arena, deadline, t as u64)
            })
        })
        .collect();
    let mut tally = VerifyTally::default();
    for t in threads {
        let part = t
            .join()
            .unwrap_or_else(|_| fail("a verify thread panicked".into()));
        tally.reads += part.reads;
        tally.writes += part.writes;
        tally.stale += part.stale;
        if let Some(p) = part.first_problem {
            tally.problem(p);
        }
    }
    // Every block must read back its last version.
    // SAFETY: stamp is live, one page is enough for a block; no other thread uses it now.
    let page = unsafe { std::slice::from_raw_parts_mut(stamp.ptr as *mut u64, PAGE / 8) };
    for b in 0..blocks {
        if let Err(e) = pread_all(fd, stamp.ptr, PAGE, offset + b * PAGE as u64) {
            fail(e);
        }
        let v = versions[b as usize].load(Ordering::Relaxed);
        if let Err(e) = check_page(page, b, v) {
            tally.lost += 1;
            tally.problem(format!("block {b} (version {v}) read back wrong: {e}"));
        }
    }
    println!(
        "gbtool: migrate-verify: {} reads, {} writes; {} stale read buffers, {} lost writes",
        tally.reads, tally.writes, tally.stale, tally.lost
    );
    if let Some(p) = tally.first_problem {
        fail(format!(
            "{} stale read buffers, {} lost writes; first: {p}",
            tally.stale, tally.lost
        ));
    }
    println!("gbtool: migrate-verify: every read buffer and every block verified");
}

fn verify_share(
    fd: i32,
    offset: u64,
    share: &VerifyShare,
    versions: &[AtomicU64],
    arena: &Buf,
    deadline: Instant,
    seed: u64,
) -> VerifyTally {
    let mut tally = VerifyTally::default();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (seed + 1));
    let write_buf = Buf::new(PAGE);
    // What each of this share's buffers holds: (block, version, checksum), once read into.
    let mut held: Vec<Option<(u64, u64, u64)>> = vec![None; share.slots.len()];
    let mut next_slot = 0usize;
    while Instant::now() < deadline {
        let b = share.first + rng.below(share.blocks);
        if rng.below(100) >= share.read_percent {
            let v = versions[b as usize].load(Ordering::Relaxed) + 1;
            // SAFETY: write_buf is this thread's own live page.
            let page =
                unsafe { std::slice::from_raw_parts_mut(write_buf.ptr as *mut u64, PAGE / 8) };
            fill_page(page, b, v);
            pwrite_all(fd, write_buf.ptr, PAGE, offset + b * PAGE as u64)
                .unwrap_or_else(|e| fail(e));
            versions[b as usize].store(v, Ordering::Relaxed);
            tally.writes += 1;
            continue;
        }
        let slot = share.slots.start + next_slot;
        // SAFETY: slot < slots, so the page lies inside the arena; only this thread uses it.
        let ptr = unsafe { arena.ptr.add(slot * PAGE) };
        pread_all(fd, ptr, PAGE, offset + b * PAGE as u64).unwrap_or_else(|e| fail(e));
        // SAFETY: the read has completed; the page is this thread's alone.
        let page = unsafe { std::slice::from_raw_parts(ptr as *const u64, PAGE / 8) };
        let v = versions[b as usize].load(Ordering::Relaxed);
        if let Err(e) = check_page(page, b, v) {
            fail(format!(
                "block {b} (version {v}) read wrong during the run: {e}"
            ));
        }
        held[next_slot] = Some((b, v, page_sum(page)));
        tally.reads += 1;
        next_slot = (next_slot + 1) % held.len();
    }
    for (i, h) in held.iter().enumerate() {
        let Some((b, v, sum)) = *h else { continue };
        // SAFETY: as above; no I/O is in flight into the arena any more.
        let page = unsafe {
            std::slice::from_raw_parts(
                arena.ptr.add((share.slots.start + i) * PAGE) as *const u64,
                PAGE / 8,
            )
        };
        if page_sum(page) != sum {
            tally.stale += 1;
            let detail = check_page(page, b, v)
                .err()
                .unwrap_or_else(|| "checksum differs".into());
            tally.problem(format!(
                "read buffer {} (block {b} version {v}) changed since its read: {detail}",
                share.slots.start + i
            ));
        }
    }
    tally
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("mutate-write") => mutate_write(&args),
        Some("swap-churn") => swap_churn(&args),
        Some("migrate-verify") => migrate_verify(&args),
        _ => usage(),
    }
}
