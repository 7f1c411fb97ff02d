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

use std::mem::MaybeUninit;
use std::path::PathBuf;
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
    about = "Drive a vhost-user-blk socket with libblkio and report IOPS, latency and daemon CPU per I/O"
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
    /// Sequential queues each stream through their own stripe of the disk, like fio jobs
    /// with offset_increment, so they do not all hit the same blocks.
    stripe_start: u64,
    stripe_blocks: u64,
    cursor: u64,
    total_blocks: u64,
}

impl Offsets {
    fn next(&mut self) -> u64 {
        if self.random {
            return self.rng.next() % self.total_blocks * self.bs;
        }
        let off = self.stripe_start + self.cursor * self.bs;
        self.cursor = (self.cursor + 1) % self.stripe_blocks;
        off
    }
}

struct QueueResult {
    ios: u64,
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
}

fn submit(job: &mut QueueJob, slot: usize) {
    let offset = job.offsets.next();
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
        let mut timeout = Duration::from_secs(30);
        let got = job
            .queue
            .do_io(&mut completions, 1, Some(&mut timeout), None)
            .unwrap_or_else(|e| panic!("do_io failed: {e}"));
        assert!(got > 0, "no completion within 30 s; is the daemon alive?");
        let now = Instant::now();
        let measuring = now < deadline;
        for c in &completions[..got] {
            // SAFETY: do_io initialised the first `got` entries.
            let c = unsafe { c.assume_init_ref() };
            if c.ret < 0 {
                // SAFETY: libblkio sets error_msg to a NUL-terminated string or null.
                let msg = if c.error_msg.is_null() {
                    String::new()
                } else {
                    unsafe { std::ffi::CStr::from_ptr(c.error_msg) }
                        .to_string_lossy()
                        .into_owned()
                };
                panic!("request failed: errno {} {msg}", -c.ret);
            }
            let slot = c.user_data;
            if measuring {
                ios += 1;
                latency.record(now.duration_since(issued[slot]).as_nanos() as u64);
                issued[slot] = Instant::now();
                submit(&mut job, slot);
            } else {
                in_flight -= 1;
            }
        }
    }
    QueueResult { ios, latency }
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

    let stripe_blocks = total_blocks / queues as u64;
    // One extra party: the main thread samples the daemon's CPU time as the queues start.
    let start = Arc::new(Barrier::new(queues + 1));
    let window = Duration::from_secs_f64(opts.seconds);
    let threads: Vec<_> = started
        .queues
        .into_iter()
        .enumerate()
        .map(|(q, queue)| {
            let job = QueueJob {
                queue,
                rw: opts.rw,
                bs,
                iodepth,
                buf_addr: region.addr + q * iodepth * bs,
                offsets: Offsets {
                    rng: Rng(0x9E37_79B9_7F4A_7C15 ^ (q as u64 + 1)),
                    random: opts.rw.is_random(),
                    bs: bs as u64,
                    stripe_start: q as u64 * stripe_blocks * bs as u64,
                    stripe_blocks,
                    cursor: 0,
                    total_blocks,
                },
            };
            let start = Arc::clone(&start);
            thread::spawn(move || run_queue(job, start, window))
        })
        .collect();

    start.wait();
    let cpu_before = opts.pid.map(process_cpu_seconds);
    thread::sleep(window);
    let cpu_after = opts.pid.map(process_cpu_seconds);

    let mut ios = 0;
    let mut latency = Histogram::new();
    for t in threads {
        let r = t.join().expect("queue thread panicked");
        ios += r.ios;
        latency.merge(&r.latency);
    }

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
    let cpu_json = cpu_us_per_io.map_or("null".to_string(), |c| format!("{c:.3}"));
    println!(
        "{{\"rw\":\"{}\",\"bs\":{bs},\"iodepth\":{iodepth},\"queues\":{queues},\"seconds\":{secs},\"ios\":{ios},\"iops\":{iops:.1},\"mib_s\":{mib_s:.2},\"p50_us\":{p50_us:.2},\"p99_us\":{p99_us:.2},\"daemon_cpu_us_per_io\":{cpu_json}}}",
        opts.rw.name()
    );
}
