//! Load generator for any vhost-user-blk socket, driven through libblkio as the frontend.
//!
//! Each queue runs in its own thread and keeps exactly `--iodepth` requests in flight: it submits
//! `iodepth` requests, then resubmits every request the moment it completes. Completions are
//! counted only inside the measurement window; requests still in flight at its end are drained
//! and discarded.
//!
//!     cargo bench --bench loadgen -- --socket /tmp/s.sock --rw randread --bs 4k --iodepth 32
//!
//! Prints a human-readable summary followed by one JSON line (the last line of stdout).
//!
//! `--scribble` turns a write load into a *mutating* one: a second thread keeps overwriting the
//! buffers of writes while they are in flight, the way Windows page-file writers and Linux swap
//! change pages under writeback. Every slot keeps one fixed buffer that all of its writes reuse,
//! so a daemon that learns where mutation happens (guest pages, disk regions) can see it again.

use std::mem::MaybeUninit;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Rw {
    #[value(name = "randread")]
    RandRead,
    #[value(name = "randwrite")]
    RandWrite,
    Read,
    Write,
}

impl Rw {
    fn is_write(self) -> bool {
        matches!(self, Rw::RandWrite | Rw::Write)
    }

    fn is_random(self) -> bool {
        matches!(self, Rw::RandRead | Rw::RandWrite)
    }

    fn name(self) -> &'static str {
        match self {
            Rw::RandRead => "randread",
            Rw::RandWrite => "randwrite",
            Rw::Read => "read",
            Rw::Write => "write",
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    about = "Drive a vhost-user-blk socket with libblkio and report IOPS, latency and daemon CPU per I/O",
    after_help = "Mutating load (--scribble): every slot (one request in flight per slot, \
        --iodepth slots per queue) has one fixed buffer that all of its requests reuse. With \
        --scribble, a separate thread keeps overwriting the buffers of scribbled slots while \
        their writes are in flight: each pass stores a fresh 8-byte counter value into every \
        4 KiB page of every in-flight scribbled buffer (a different position each pass, so the \
        content never returns to an earlier version), then sleeps --scribble-pause-us. This is \
        what Windows page-file writers and Linux swap do to pages under writeback; a daemon that \
        checksums a buffer and writes it zero-copy may store data and checksum from different \
        versions. --scribble-extent SIZE confines the scribbled slots' writes to the first SIZE \
        bytes of the disk (like a page file) and the other slots' writes to the rest."
)]
struct Opts {
    /// vhost-user-blk Unix socket of the daemon under test.
    #[arg(long)]
    socket: PathBuf,
    /// Access pattern.
    #[arg(long, value_enum, default_value = "randread")]
    rw: Rw,
    /// Request size: bytes, or with a k/m suffix (powers of 1024), e.g. 4k, 128k.
    #[arg(long, default_value = "4k", value_parser = parse_bs)]
    bs: usize,
    /// Requests kept in flight per queue.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=1024))]
    iodepth: u32,
    /// Virtqueues to use, each driven by its own thread.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    queues: u32,
    /// Length of the measurement window.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Pid of the serving daemon; its CPU time (all threads) over the window is divided by the
    /// number of I/Os.
    #[arg(long)]
    pid: Option<i32>,
    /// Mutating write load: a second thread keeps overwriting the buffers of writes while they
    /// are in flight (see below). Write patterns only.
    #[arg(long)]
    scribble: bool,
    /// Fraction of slots whose buffers are scribbled (spread evenly over each queue's slots);
    /// the others are written unchanged.
    #[arg(long, default_value_t = 1.0, requires = "scribble", value_parser = parse_fraction)]
    scribble_fraction: f64,
    /// Pause of the scribbling thread between passes over the in-flight buffers, in
    /// microseconds (0: spin, costing a whole CPU).
    #[arg(long, default_value_t = 10, requires = "scribble")]
    scribble_pause_us: u64,
    /// Scribbled slots write only to the first SIZE bytes of the disk and the other slots only
    /// to the rest (a page file beside ordinary data). Default: every slot uses the whole disk.
    #[arg(long, value_name = "SIZE", requires = "scribble", value_parser = parse_bs)]
    scribble_extent: Option<usize>,
    /// Never have two requests to overlapping blocks in flight at once on a queue (a random
    /// offset that would overlap one in flight is drawn again).
    #[arg(long)]
    no_overlap: bool,
    /// Give up (exit status 3) when no request completes for this many seconds.
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn parse_bs(text: &str) -> Result<usize, String> {
    let lower = text.to_ascii_lowercase();
    let (digits, mult) = match lower.as_bytes().last() {
        Some(b'k') => (&lower[..lower.len() - 1], 1 << 10),
        Some(b'm') => (&lower[..lower.len() - 1], 1 << 20),
        _ => (&lower[..], 1),
    };
    digits
        .parse::<usize>()
        .ok()
        .map(|n| n * mult)
        .filter(|&n| n > 0 && n % 512 == 0)
        .ok_or_else(|| format!("'{text}' is not a positive multiple of 512 bytes like 4k or 128k"))
}

fn parse_fraction(text: &str) -> Result<f64, String> {
    text.parse::<f64>()
        .ok()
        .filter(|f| (0.0..=1.0).contains(f))
        .ok_or_else(|| format!("'{text}' is not a fraction between 0 and 1"))
}

/// Log-linear latency histogram over nanoseconds: 2^SUB_BITS buckets per power of two, so any
/// recorded value is reported within 1/2^SUB_BITS (< 1%) of its true value. Fixed size, so
/// recording never allocates inside the measured loop.
struct Histogram {
    counts: Vec<u64>,
}

const SUB_BITS: u32 = 7;

impl Histogram {
    fn new() -> Self {
        Histogram {
            counts: vec![0; ((64 - SUB_BITS + 1) << SUB_BITS) as usize],
        }
    }

    fn index(v: u64) -> usize {
        if v < 1 << SUB_BITS {
            return v as usize;
        }
        let exp = 63 - v.leading_zeros();
        let shift = exp - SUB_BITS;
        let mantissa = (v >> shift) & ((1 << SUB_BITS) - 1);
        (((shift + 1) << SUB_BITS) as u64 + mantissa) as usize
    }

    /// Midpoint of the values that map to bucket `i`.
    fn value(i: usize) -> u64 {
        if i < 1 << SUB_BITS {
            return i as u64;
        }
        let shift = (i >> SUB_BITS) as u32 - 1;
        let mantissa = (i & ((1 << SUB_BITS) - 1)) as u64;
        (((1 << SUB_BITS) + mantissa) << shift) + ((1u64 << shift) >> 1)
    }

    fn record(&mut self, ns: u64) {
        self.counts[Self::index(ns)] += 1;
    }

    fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
    }

    fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    fn percentile(&self, p: f64) -> u64 {
        let rank = ((self.total() as f64 * p / 100.0).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::value(i);
            }
        }
        0
    }
}

/// xorshift64*: cheap enough not to show up next to a 4 KiB I/O, and deterministic per queue.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Where the next request of one queue goes.
struct Offsets {
    rng: Rng,
    random: bool,
    bs: u64,
    /// First block of the area this stream writes to (the whole disk unless --scribble-extent).
    area_start: u64,
    /// Sequential queues each stream through their own stripe of the area, like fio jobs
    /// with offset_increment, so they do not all hit the same blocks.
    stripe_start: u64,
    stripe_blocks: u64,
    cursor: u64,
    area_blocks: u64,
}

impl Offsets {
    /// Offsets for queue `q` of `queues` within blocks [area_start, area_start + area_blocks).
    fn new(
        seed: u64,
        rw: Rw,
        bs: u64,
        area_start: u64,
        area_blocks: u64,
        q: u64,
        queues: u64,
    ) -> Self {
        let stripe_blocks = (area_blocks / queues).max(1);
        Offsets {
            rng: Rng(0x9E37_79B9_7F4A_7C15 ^ seed),
            random: rw.is_random(),
            bs,
            area_start,
            stripe_start: (q * stripe_blocks).min(area_blocks - 1),
            stripe_blocks,
            cursor: 0,
            area_blocks,
        }
    }

    fn next(&mut self) -> u64 {
        let block = if self.random {
            self.rng.next() % self.area_blocks
        } else {
            let b = self.stripe_start + self.cursor;
            self.cursor = (self.cursor + 1) % self.stripe_blocks;
            b % self.area_blocks
        };
        (self.area_start + block) * self.bs
    }
}

struct QueueResult {
    ios: u64,
    /// Completions inside the window from scribbled slots.
    scribbled_ios: u64,
    latency: Histogram,
}

struct QueueJob {
    queue: Blkioq,
    rw: Rw,
    bs: usize,
    iodepth: usize,
    /// Start address of this queue's `iodepth * bs` bytes in the shared memory region. An
    /// integer rather than a pointer so the job can move to its thread.
    buf_addr: usize,
    offsets: Offsets,
    /// With --no-overlap: the offset of each slot's request in flight (u64::MAX: none).
    no_overlap: Option<Vec<u64>>,
    /// How long to wait for a completion before declaring the daemon stuck.
    timeout: Duration,
    /// Scribbling only: which of this queue's slots are scribbled, where their writes go
    /// (None: the same place as the others), and one "in flight" flag per slot that the
    /// scribbling thread reads.
    scribble: Option<QueueScribble>,
}

struct QueueScribble {
    slots: Vec<bool>,
    offsets: Option<Offsets>,
    in_flight: Arc<[AtomicBool]>,
    /// Index of this queue's first slot in `in_flight`.
    first: usize,
}

fn next_offset(job: &mut QueueJob, slot: usize) -> u64 {
    match &mut job.scribble {
        Some(s) => match &mut s.offsets {
            Some(o) if s.slots[slot] => o.next(),
            _ => job.offsets.next(),
        },
        None => job.offsets.next(),
    }
}

fn submit(job: &mut QueueJob, slot: usize) {
    let mut offset = next_offset(job, slot);
    if let Some(mut busy) = job.no_overlap.take() {
        // Requests are all `bs` long, so two overlap exactly when their offsets are closer than
        // that. Give up after a few draws (a tiny disk or area): better overlap than stall.
        let bs = job.bs as u64;
        for _ in 0..64 {
            let clash = busy
                .iter()
                .enumerate()
                .any(|(i, &o)| i != slot && o != u64::MAX && o.abs_diff(offset) < bs);
            if !clash {
                break;
            }
            offset = next_offset(job, slot);
        }
        busy[slot] = offset;
        job.no_overlap = Some(busy);
    }
    if let Some(s) = &job.scribble {
        s.in_flight[s.first + slot].store(true, Ordering::Relaxed);
    }
    let buf = (job.buf_addr + slot * job.bs) as *mut u8;
    if job.rw.is_write() {
        job.queue
            .write(offset, buf, job.bs, slot, ReqFlags::empty());
    } else {
        job.queue.read(offset, buf, job.bs, slot, ReqFlags::empty());
    }
}

/// Keep the queue full for `window` after `start` releases every queue, then drain it.
fn run_queue(mut job: QueueJob, start: Arc<Barrier>, window: Duration) -> QueueResult {
    let mut latency = Histogram::new();
    let mut ios = 0;
    let mut scribbled_ios = 0;
    let mut issued = vec![Instant::now(); job.iodepth];
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..job.iodepth).map(|_| MaybeUninit::uninit()).collect();

    start.wait();
    let deadline = Instant::now() + window;
    for (slot, t) in issued.iter_mut().enumerate() {
        *t = Instant::now();
        submit(&mut job, slot);
    }
    let mut in_flight = job.iodepth;
    while in_flight > 0 {
        let mut timeout = job.timeout;
        let got = match job
            .queue
            .do_io(&mut completions, 1, Some(&mut timeout), None)
        {
            Ok(got) => got,
            // libblkio reports an expired timeout as an error, not as 0 completions.
            Err(e) if [libc::ETIME, libc::ETIMEDOUT].contains(&e.errno().raw_os_error()) => 0,
            Err(e) => panic!("do_io failed: {e}"),
        };
        if got == 0 {
            eprintln!(
                "no completion within {:?} with {in_flight} request(s) in flight; is the daemon stuck?",
                job.timeout
            );
            std::process::exit(3);
        }
        let now = Instant::now();
        let measuring = now < deadline;
        for c in &completions[..got] {
            // SAFETY: do_io initialised the first `got` entries.
            let c = unsafe { c.assume_init_ref() };
            if c.ret < 0 {
                let msg = if c.error_msg.is_null() {
                    String::new()
                } else {
                    // SAFETY: libblkio sets error_msg to a NUL-terminated string or null, and
                    // it is not null here.
                    unsafe { std::ffi::CStr::from_ptr(c.error_msg) }
                        .to_string_lossy()
                        .into_owned()
                };
                panic!("request failed: errno {} {msg}", -c.ret);
            }
            let slot = c.user_data;
            if let Some(busy) = &mut job.no_overlap {
                busy[slot] = u64::MAX;
            }
            let scribbled = match &job.scribble {
                Some(s) => {
                    s.in_flight[s.first + slot].store(false, Ordering::Relaxed);
                    s.slots[slot]
                }
                None => false,
            };
            if measuring {
                ios += 1;
                scribbled_ios += u64::from(scribbled);
                latency.record(now.duration_since(issued[slot]).as_nanos() as u64);
                issued[slot] = Instant::now();
                submit(&mut job, slot);
            } else {
                in_flight -= 1;
            }
        }
    }
    QueueResult {
        ios,
        scribbled_ios,
        latency,
    }
}

/// Whether slot `i` is scribbled: `fraction` of the slots, spread evenly.
fn slot_scribbled(i: usize, fraction: f64) -> bool {
    ((i + 1) as f64 * fraction).floor() > (i as f64 * fraction).floor()
}

/// Base address and length of each scribbled buffer, with its index in the in-flight flags.
struct ScribbleTarget {
    flag: usize,
    addr: usize,
    len: usize,
}

/// The scribbling thread: until `stop`, store a fresh counter value into every 4 KiB page
/// (or the whole buffer, if smaller) of every scribbled buffer whose write is in flight, at a
/// position that moves with every pass, then pause. Returns the number of stores.
fn scribble(
    targets: Vec<ScribbleTarget>,
    in_flight: Arc<[AtomicBool]>,
    stop: Arc<AtomicBool>,
    pause: Duration,
) -> u64 {
    // Sleep for about `pause`, not the default 50 us of timer slack on top of it.
    // SAFETY: PR_SET_TIMERSLACK only changes this thread's timer slack.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong) };
    let mut counter: u64 = 0x5C21_BB1E_0000_0000;
    let mut stores = 0u64;
    let mut pass = 0usize;
    while !stop.load(Ordering::Relaxed) {
        for t in &targets {
            if !in_flight[t.flag].load(Ordering::Relaxed) {
                continue;
            }
            let step = t.len.min(4096);
            let pos = (pass * 8) % step;
            let mut page = 0;
            while page + pos + 8 <= t.len {
                counter = counter.wrapping_add(1);
                // SAFETY: inside the live memory region; the daemon may be reading it (that is
                // the point), nothing in this process reads or writes it concurrently except
                // through this volatile store.
                unsafe { std::ptr::write_volatile((t.addr + page + pos) as *mut u64, counter) };
                stores += 1;
                page += step;
            }
        }
        pass += 1;
        if pause.is_zero() {
            std::hint::spin_loop();
        } else {
            thread::sleep(pause);
        }
    }
    stores
}

/// utime + stime of every thread of `pid`, in seconds.
fn process_cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/stat: {e}"));
    // The command name (field 2) may contain spaces; fields after it are plain numbers.
    // utime and stime are fields 14 and 15, i.e. the 12th and 13th after the name.
    let rest = &stat[stat.rfind(')').expect("malformed /proc stat") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ticks as f64 / hz as f64
}

fn main() {
    let opts = Opts::parse();
    let bs = opts.bs;
    let iodepth = opts.iodepth as usize;
    let queues = opts.queues as usize;
    if opts.scribble && !opts.rw.is_write() {
        eprintln!("--scribble needs a write pattern (--rw randwrite or write)");
        std::process::exit(2);
    }

    let mut blkio = Blkio::new("virtio-blk-vhost-user").expect("libblkio driver");
    blkio
        .set_str(
            "path",
            opts.socket.to_str().expect("socket path is not UTF-8"),
        )
        .expect("set path");
    blkio
        .connect()
        .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", opts.socket.display()));
    blkio
        .set_i32("num-queues", queues as i32)
        .expect("set num-queues");
    let started = blkio
        .start()
        .unwrap_or_else(|e| panic!("start failed: {e}"));
    let capacity = blkio.get_u64("capacity").expect("capacity");
    let total_blocks = capacity / bs as u64;
    assert!(
        total_blocks >= queues as u64,
        "disk of {capacity} bytes is too small for {queues} queue(s) of {bs}-byte requests"
    );

    let align = blkio.get_u64("mem-region-alignment").expect("alignment") as usize;
    let region_len = (queues * iodepth * bs).div_ceil(align) * align;
    let region = blkio
        .alloc_mem_region(region_len)
        .expect("alloc_mem_region");
    blkio.map_mem_region(&region).expect("map_mem_region");
    // Non-zero payload, so writes carry data a backend cannot shortcut as zeroes.
    // SAFETY: the region is a live mapping of region.len bytes that nothing else uses yet.
    let buffers = unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, region.len) };
    let mut fill = Rng(0x5EED);
    for chunk in buffers.chunks_mut(8) {
        let bytes = fill.next().to_ne_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }

    // With --scribble-extent, scribbled slots write to blocks [0, extent_blocks) and the others
    // to [extent_blocks, total_blocks).
    let extent_blocks = match opts.scribble_extent {
        Some(e) => {
            let blocks = (e / bs) as u64;
            if blocks == 0 || blocks >= total_blocks {
                eprintln!("--scribble-extent must hold at least one request and leave some of the {capacity}-byte disk");
                std::process::exit(2);
            }
            blocks
        }
        None => 0,
    };
    let scribbled: Vec<bool> = (0..iodepth)
        .map(|i| opts.scribble && slot_scribbled(i, opts.scribble_fraction))
        .collect();
    let in_flight: Arc<[AtomicBool]> = (0..queues * iodepth)
        .map(|_| AtomicBool::new(false))
        .collect();
    // One extra party: the main thread samples the daemon's CPU time as the queues start.
    let start = Arc::new(Barrier::new(queues + 1));
    let window = Duration::from_secs_f64(opts.seconds);
    let threads: Vec<_> = started
        .queues
        .into_iter()
        .enumerate()
        .map(|(q, queue)| {
            let (q64, n) = (q as u64, queues as u64);
            let job = QueueJob {
                queue,
                rw: opts.rw,
                bs,
                iodepth,
                buf_addr: region.addr + q * iodepth * bs,
                offsets: Offsets::new(
                    q64 + 1,
                    opts.rw,
                    bs as u64,
                    extent_blocks,
                    total_blocks - extent_blocks,
                    q64,
                    n,
                ),
                no_overlap: opts.no_overlap.then(|| vec![u64::MAX; iodepth]),
                timeout: Duration::from_secs_f64(opts.timeout),
                scribble: opts.scribble.then(|| QueueScribble {
                    slots: scribbled.clone(),
                    offsets: (extent_blocks > 0).then(|| {
                        Offsets::new(
                            (q64 + 1) << 32,
                            opts.rw,
                            bs as u64,
                            0,
                            extent_blocks,
                            q64,
                            n,
                        )
                    }),
                    in_flight: Arc::clone(&in_flight),
                    first: q * iodepth,
                }),
            };
            let start = Arc::clone(&start);
            thread::spawn(move || run_queue(job, start, window))
        })
        .collect();

    let stop = Arc::new(AtomicBool::new(false));
    let scribbler = opts.scribble.then(|| {
        let targets: Vec<ScribbleTarget> = (0..queues * iodepth)
            .filter(|i| scribbled[i % iodepth])
            .map(|i| ScribbleTarget {
                flag: i,
                addr: region.addr + i * bs,
                len: bs,
            })
            .collect();
        let (in_flight, stop) = (Arc::clone(&in_flight), Arc::clone(&stop));
        let pause = Duration::from_micros(opts.scribble_pause_us);
        thread::spawn(move || scribble(targets, in_flight, stop, pause))
    });

    start.wait();
    let cpu_before = opts.pid.map(process_cpu_seconds);
    thread::sleep(window);
    let cpu_after = opts.pid.map(process_cpu_seconds);

    let mut ios = 0;
    let mut scribbled_ios = 0;
    let mut latency = Histogram::new();
    for t in threads {
        let r = t.join().expect("queue thread panicked");
        ios += r.ios;
        scribbled_ios += r.scribbled_ios;
        latency.merge(&r.latency);
    }
    stop.store(true, Ordering::Relaxed);
    let scribble_stores = scribbler.map(|t| t.join().expect("scribbling thread panicked"));
    let scribbled_slots = scribbled.iter().filter(|&&s| s).count() * queues;

    let secs = window.as_secs_f64();
    let iops = ios as f64 / secs;
    let mib_s = iops * bs as f64 / (1 << 20) as f64;
    let p50_us = latency.percentile(50.0) as f64 / 1000.0;
    let p99_us = latency.percentile(99.0) as f64 / 1000.0;
    let cpu_us_per_io = match (cpu_before, cpu_after) {
        (Some(b), Some(a)) if ios > 0 => Some((a - b) * 1e6 / ios as f64),
        _ => None,
    };

    println!(
        "{} bs={} iodepth={} queues={} over {:.1} s on {}",
        opts.rw.name(),
        bs,
        iodepth,
        queues,
        secs,
        opts.socket.display()
    );
    println!("  IOPS        {iops:.0}");
    println!("  throughput  {mib_s:.1} MiB/s");
    println!("  latency     p50 {p50_us:.1} us, p99 {p99_us:.1} us");
    match cpu_us_per_io {
        Some(c) => println!("  daemon CPU  {c:.2} us per I/O"),
        None => println!("  daemon CPU  not measured (no --pid)"),
    }
    if let Some(stores) = scribble_stores {
        println!(
            "  scribble    {scribbled_slots} of {} slots, {scribbled_ios} of their writes completed in the window, {stores} stores into in-flight buffers",
            queues * iodepth
        );
    }
    let cpu_json = cpu_us_per_io.map_or("null".to_string(), |c| format!("{c:.3}"));
    let scribble_json = match scribble_stores {
        Some(stores) => format!(
            ",\"scribble_fraction\":{},\"scribble_pause_us\":{},\"scribble_extent\":{},\"scribbled_slots\":{scribbled_slots},\"scribbled_ios\":{scribbled_ios},\"scribble_stores\":{stores}",
            opts.scribble_fraction,
            opts.scribble_pause_us,
            opts.scribble_extent.map_or("null".to_string(), |e| e.to_string()),
        ),
        None => String::new(),
    };
    println!(
        "{{\"rw\":\"{}\",\"bs\":{bs},\"iodepth\":{iodepth},\"queues\":{queues},\"seconds\":{secs},\"ios\":{ios},\"iops\":{iops:.1},\"mib_s\":{mib_s:.2},\"p50_us\":{p50_us:.2},\"p99_us\":{p99_us:.2},\"daemon_cpu_us_per_io\":{cpu_json}{scribble_json}}}",
        opts.rw.name()
    );
}
