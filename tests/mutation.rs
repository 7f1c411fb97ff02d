//! Guests that change buffers while their requests are in flight (docs/MUTATION.md).
//!
//! A host-side mutation harness: a libblkio client submits PI writes (4 KiB and 64 KiB, random
//! LBAs over a small disk, 24 in flight) from buffers in its shared memory region while a
//! second thread scribbles random bytes over those same buffers, continuously — the way
//! Windows reuses page-file buffers whose writes have not completed. Afterwards every block
//! must read back without EIO, the log must hold no guard error and `guardblk scrub` must find
//! the image clean, for `--bounce never`, `auto` and `always`; the per-session counters show
//! the detection at work. Against `--no-mutation-check` the same harness must produce guard
//! errors: proof that it really reproduces the problem the checks solve.
//!
//! Also: a clean workload stays zero-copy; `auto` learns the guest pages and the disk regions
//! where mutation happens (measured rewrite fraction after warm-up); back-pressure on a small
//! bounce pool; and reads whose buffers are scribbled never fail.
//!
//! The scribbler threads need the CPU, so the tests run one at a time (`one_at_a_time`).
//! `GUARDBLK_MUTATION_SEED` (decimal or 0x-hex) replays a run's random choices (the timing,
//! and so the exact mutations, cannot be replayed).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use blkio::ReqFlags;
use common::*;

const KIB: usize = 1 << 10;
const MIB: u64 = 1 << 20;
/// Each in-flight request owns one slot of this many bytes of the buffer region.
const SLOT: usize = 64 * KIB;
/// Requests in flight in the mutation workloads.
const DEPTH: usize = 24;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Serialise the tests of this file: scribblers, writers and the daemon share two cores.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn seed() -> u64 {
    let seed = seed_from_env("GUARDBLK_MUTATION_SEED");
    eprintln!("GUARDBLK_MUTATION_SEED={seed:#x}");
    seed
}

// ---------------------------------------------------------------------------------------------
// The scribbler
// ---------------------------------------------------------------------------------------------

/// A thread overwriting random 8-byte words of [base, base + len) with random values, as fast
/// as it can, until stopped.
///
/// The memory is a MAP_SHARED mapping of the libblkio client (or a [`SharedMem`]), which the
/// test keeps alive until the scribbler is stopped (`stop`, or drop — declare the scribbler
/// after the memory so it drops first). The daemon process and the kernel read it concurrently:
/// that race is the point of the test, and it crosses the process boundary, where Rust's
/// aliasing rules do not reach. Inside this process no Rust reference to those bytes exists
/// while the scribbler runs (the writers hand libblkio raw pointers only), and the stores are
/// `write_volatile`, so the compiler can neither elide, merge nor reorder them away: every
/// store happens, at an unpredictable moment relative to the daemon's reads.
struct Scribbler {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<u64>>,
}

impl Scribbler {
    fn start(base: usize, len: usize, seed: u64) -> Scribbler {
        assert!(base.is_multiple_of(8) && len >= 8);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = std::thread::spawn(move || {
            let mut rng = Rng(seed);
            let words = (len / 8) as u64;
            let mut stores = 0u64;
            while !flag.load(Ordering::Relaxed) {
                for _ in 0..4096 {
                    let r = rng.next_u64();
                    let word = ((r >> 16) % words) as usize;
                    // SAFETY: see the type's documentation: an aligned word inside a live
                    // mapping of `len` bytes at `base`, no Rust reference to it in this process.
                    unsafe {
                        std::ptr::write_volatile((base + word * 8) as *mut u64, mix64(r));
                    }
                }
                stores += 4096;
            }
            stores
        });
        Scribbler {
            stop,
            handle: Some(handle),
        }
    }

    /// Stop and join; the number of stores made.
    fn stop(mut self) -> u64 {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .map_or(0, |h| h.join().expect("scribbler panicked"))
    }
}

impl Drop for Scribbler {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

// ---------------------------------------------------------------------------------------------
// Workloads
// ---------------------------------------------------------------------------------------------

/// One request: disk offset, length, and offset of its buffer inside its slot.
type Pick<'a> = dyn FnMut(usize, u64, &mut Rng) -> (u64, usize, usize) + 'a;

/// A random write within [lo, hi): 4 KiB (from a random page of the slot) or 64 KiB (the whole
/// slot), 4 KiB-aligned. Requests in flight may overlap.
fn random_write(lo: u64, hi: u64) -> impl FnMut(usize, u64, &mut Rng) -> (u64, usize, usize) {
    move |_slot, _n, rng| {
        let len = if rng.below(2) == 0 { 4 * KIB } else { SLOT };
        let offset = lo + rng.below((hi - lo - len as u64) / 4096 + 1) * 4096;
        let buf_off = rng.below(((SLOT - len) / 4096 + 1) as u64) as usize * 4096;
        (offset, len, buf_off)
    }
}

/// As [`random_write`], but slot `s` of `depth` stays within its own stripe of [lo, hi), so
/// requests in flight never overlap (for tests about something else than overlap).
fn striped_write(
    lo: u64,
    hi: u64,
    depth: usize,
) -> impl FnMut(usize, u64, &mut Rng) -> (u64, usize, usize) {
    let stripe = (hi - lo) / depth as u64 / 4096 * 4096;
    assert!(stripe >= SLOT as u64);
    move |slot, n, rng| {
        let start = lo + slot as u64 * stripe;
        random_write(start, start + stripe)(slot, n, rng)
    }
}

#[derive(Debug, Default)]
struct WriteStats {
    writes: u64,
    bytes: u64,
    /// (offset, len, ret) of every write that did not return 0.
    failures: Vec<(u64, usize, i32)>,
    elapsed: Duration,
}

/// How long a workload runs: until `duration` has passed or `writes` were submitted.
#[derive(Clone, Copy)]
struct Until {
    duration: Duration,
    writes: u64,
}

fn for_secs(secs: f64) -> Until {
    Until {
        duration: Duration::from_secs_f64(secs),
        writes: u64::MAX,
    }
}

/// Keep `depth` writes in flight on queue 0 `until` enough, slot `s` writing from
/// `base + s * slot_len + buf_off`; `pick(slot, n, rng)` chooses the `n`th request.
fn run_writes(
    c: &mut Client,
    base: usize,
    slot_len: usize,
    depth: usize,
    until: Until,
    rng: &mut Rng,
    pick: &mut Pick<'_>,
) -> WriteStats {
    let start = Instant::now();
    let deadline = start + until.duration;
    let mut stats = WriteStats::default();
    let mut submitted = 0u64;
    let q = &mut c.queues[0];
    let mut submit = |q: &mut blkio::Blkioq, slot: usize, rng: &mut Rng| {
        let (offset, len, buf_off) = pick(slot, submitted, rng);
        submitted += 1;
        assert!(buf_off + len <= slot_len);
        let ptr = (base + slot * slot_len + buf_off) as *const u8;
        q.write(offset, ptr, len, slot, ReqFlags::empty());
        (offset, len)
    };
    let mut sizes = vec![(0u64, 0usize); depth];
    for (slot, size) in sizes.iter_mut().enumerate() {
        *size = submit(q, slot, rng);
    }
    let mut outstanding = depth;
    while outstanding > 0 {
        let done = reap_some(q, depth, Duration::from_secs(10));
        assert!(
            !done.is_empty(),
            "no write completed in 10 s ({outstanding} outstanding): the daemon stopped \
             completing requests"
        );
        for (slot, ret) in done {
            outstanding -= 1;
            let (offset, len) = sizes[slot];
            stats.writes += 1;
            stats.bytes += len as u64;
            if ret != 0 {
                stats.failures.push((offset, len, ret));
            }
            if Instant::now() < deadline && stats.writes + (outstanding as u64) < until.writes {
                sizes[slot] = submit(q, slot, rng);
                outstanding += 1;
            }
        }
    }
    stats.elapsed = start.elapsed();
    stats
}

/// Read [0, size) in `chunk`-byte requests, `depth` in flight, into the client's region (which
/// must hold `depth * chunk` bytes); calls `check(offset, ret, data)` for each.
fn read_disk(
    c: &mut Client,
    size: u64,
    chunk: usize,
    depth: usize,
    mut check: impl FnMut(u64, i32, &[u8]),
) {
    assert!(c.region.len >= depth * chunk);
    let base = c.region.addr;
    let mut offset = 0u64;
    while offset < size {
        let n = depth.min(((size - offset) / chunk as u64) as usize);
        for i in 0..n {
            let ptr = (base + i * chunk) as *mut u8;
            c.queues[0].read(
                offset + (i * chunk) as u64,
                ptr,
                chunk,
                i,
                ReqFlags::empty(),
            );
        }
        for (i, ret) in wait_all(&mut c.queues[0], n) {
            let data = &c.buf()[i * chunk..(i + 1) * chunk];
            check(offset + (i * chunk) as u64, ret, data);
        }
        offset += (n * chunk) as u64;
    }
}

/// Offsets and return values of the `chunk`-byte reads of [0, size) that did not return 0.
fn failed_reads(c: &mut Client, size: u64, chunk: usize) -> Vec<(u64, i32)> {
    let mut failed = Vec::new();
    read_disk(c, size, chunk, 32, |offset, ret, _| {
        if ret != 0 {
            failed.push((offset, ret));
        }
    });
    failed
}

fn fill_random(buf: &mut [u8], rng: &mut Rng) {
    for word in buf.chunks_exact_mut(8) {
        word.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
}

// ---------------------------------------------------------------------------------------------
// One mutating (or clean) write session, then a read-back session
// ---------------------------------------------------------------------------------------------

struct Outcome {
    d: Daemon,
    size: u64,
    interval: u64,
    writes: WriteStats,
    /// Counters of the write session.
    w: SessionCounters,
    /// Counters of the read-back session.
    r: SessionCounters,
    /// Blocks whose read-back failed: (byte offset, ret).
    failed: Vec<(u64, i32)>,
    scribbles: u64,
}

/// Serve a fresh `size`-byte image (`create` arguments) with `serve` arguments on one queue;
/// write for `secs` from DEPTH slots, with a scribbler on them if `scribble`; then read every
/// block back in a second session.
fn write_session(
    create: &[&str],
    serve: &[&str],
    size: u64,
    secs: f64,
    scribble: bool,
    seed: u64,
) -> Outcome {
    write_session_in(
        &std::env::temp_dir(),
        create,
        serve,
        size,
        secs,
        scribble,
        seed,
    )
}

/// As [`write_session`], with the image on the filesystem holding `base`.
fn write_session_in(
    base: &std::path::Path,
    create: &[&str],
    serve: &[&str],
    size: u64,
    secs: f64,
    scribble: bool,
    seed: u64,
) -> Outcome {
    let mut args = vec!["--queues", "1"];
    args.extend_from_slice(serve);
    let d = Daemon::start_created(base, size, create, &args);
    let interval = PiLayout::read(&d.image).interval;
    let mut rng = Rng(seed);
    let mut c = Client::connect(&d.socket, 1, DEPTH * SLOT).unwrap();
    fill_random(&mut c.buf()[..DEPTH * SLOT], &mut rng);
    let base = c.region.addr;
    let scribbler = scribble.then(|| Scribbler::start(base, DEPTH * SLOT, mix64(seed)));
    let writes = run_writes(
        &mut c,
        base,
        SLOT,
        DEPTH,
        for_secs(secs),
        &mut rng,
        &mut random_write(0, size),
    );
    let scribbles = scribbler.map_or(0, Scribbler::stop);
    drop(c);
    let w = d.session_counters(1);
    let (failed, r) = read_back(&d, size, interval, 2);
    Outcome {
        d,
        size,
        interval,
        writes,
        w,
        r,
        failed,
        scribbles,
    }
}

/// Read every block of the disk, one request per block, in a new session (the `session`th);
/// the failures and the session's counters.
fn read_back(
    d: &Daemon,
    size: u64,
    interval: u64,
    session: usize,
) -> (Vec<(u64, i32)>, SessionCounters) {
    // The smallest virtqueue the daemon accepts, so this fits any `--queue-size`.
    let opts = ClientOptions {
        num_queues: 1,
        queue_size: Some(16),
        buffer_len: 32 * interval as usize,
        memory: None,
    };
    let mut c = Client::connect_opts(&d.socket, opts).unwrap_or_else(|e| {
        panic!(
            "connecting for the read-back: {e:?}; log:\n{}",
            d.log_text()
        )
    });
    let failed = failed_reads(&mut c, size, interval as usize);
    drop(c);
    (failed, d.session_counters(session))
}

fn report(label: &str, o: &Outcome) {
    let w = &o.w;
    eprintln!(
        "{label}: {} writes ({} MiB) in {:.2?} ({:.0}/s), {} scribbles; writes={} zero_copy={} \
         bounced={} rewritten={} intervals_rewritten={} bytes_bounced={}; read-back: {} failed \
         blocks, guard_errors={} read_retries_healed={}",
        o.writes.writes,
        o.writes.bytes >> 20,
        o.writes.elapsed,
        o.writes.writes as f64 / o.writes.elapsed.as_secs_f64(),
        o.scribbles,
        w.get("writes"),
        w.get("writes_zero_copy"),
        w.get("writes_bounced"),
        w.get("writes_rewritten"),
        w.get("intervals_rewritten"),
        w.get("bytes_bounced"),
        o.failed.len(),
        o.r.get("guard_errors"),
        o.r.get("read_retries_healed"),
    );
}

/// What every checked mode promises, scribbled or not: every write succeeded, every block
/// reads back, no guard error anywhere, scrub clean after the daemon stopped. Consumes the
/// daemon.
fn assert_all_good(label: &str, mut o: Outcome) {
    assert!(
        o.writes.failures.is_empty(),
        "{label}: writes failed (offset, len, ret): {:?}",
        &o.writes.failures[..o.writes.failures.len().min(20)]
    );
    assert_eq!(o.w.get("writes"), o.writes.writes, "{label}: {}", o.w.line);
    assert_eq!(o.w.get("io_errors"), 0, "{label}: {}", o.w.line);
    let log = o.d.log_text();
    // A hint for the reader of a failure, not an excuse: the after-the-fact check compares
    // guards, and a 16-bit guard misses 1 in 65536 changed intervals (docs/MUTATION.md).
    let hint = if PiLayout::read(&o.d.image).format != 64 && o.w.get("intervals_rewritten") > 0 {
        format!(
            "\n(note: the check compared 16-bit guards for {} changed intervals; expect about \
             {:.2} undetected changes (guard collisions), each a guard error if the disk got a \
             mix of versions)",
            o.w.get("intervals_rewritten"),
            o.w.get("intervals_rewritten") as f64 / 65536.0
        )
    } else {
        String::new()
    };
    assert!(
        o.failed.is_empty(),
        "{label}: {} of {} blocks fail to read back (offset, ret), first: {:?}\n{}{hint}",
        o.failed.len(),
        o.size / o.interval,
        &o.failed[..o.failed.len().min(20)],
        guard_error_summary(&log)
    );
    assert_eq!(o.r.get("guard_errors"), 0, "{label}: {}", o.r.line);
    assert_eq!(o.r.get("io_errors"), 0, "{label}: {}", o.r.line);
    assert!(
        !log.contains("PI guard error"),
        "{label}: guard errors logged:\n{}",
        guard_error_summary(&log)
    );
    let status = o.d.terminate();
    assert!(status.success(), "{label}: daemon exited with {status}");
    assert_scrub_clean(&o.d.image, label);
}

fn guard_error_summary(log: &str) -> String {
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("PI guard error"))
        .collect();
    format!(
        "{} guard error lines, first: {:#?}",
        lines.len(),
        &lines[..lines.len().min(10)]
    )
}

// ---------------------------------------------------------------------------------------------
// 1. Scribbled writes stay correct in every checked mode
// ---------------------------------------------------------------------------------------------

const SIZE: u64 = 16 * MIB;
const SECS: f64 = 1.0;

#[test]
fn scribbled_writes_never_type1_4096_are_rewritten_and_verify() {
    let _serial = one_at_a_time();
    let o = write_session(
        &["--pi", "type1", "--interval", "4096"],
        &["--bounce", "never"],
        SIZE,
        SECS,
        true,
        seed(),
    );
    report("never type1/4096", &o);
    assert_eq!(o.w.get("writes_bounced"), 0, "{}", o.w.line);
    assert_eq!(o.w.get("writes_zero_copy"), o.writes.writes, "{}", o.w.line);
    assert!(
        o.w.get("writes_rewritten") > 0 && o.w.get("intervals_rewritten") > 0,
        "the scribbler never changed a write in flight: {}",
        o.w.line
    );
    assert_all_good("never type1/4096", o);
}

#[test]
fn scribbled_writes_auto_type1_4096_are_bounced_or_rewritten_and_verify() {
    let _serial = one_at_a_time();
    // Learning needs zero-copy writes to learn from: auto's base path fixed to zero-copy (the
    // cost model may prefer bouncing on this target; that path has tests of its own below).
    let o = write_session(
        &["--pi", "type1", "--interval", "4096"],
        &["--bounce", "auto", "--auto-path", "zero-copy"],
        SIZE,
        SECS,
        true,
        seed(),
    );
    report("auto type1/4096", &o);
    let (w, b, r) = (
        o.w.get("writes"),
        o.w.get("writes_bounced"),
        o.w.get("writes_rewritten"),
    );
    assert!(
        r > 0,
        "auto must have detected the first mutations: {}",
        o.w.line
    );
    assert!(b > 0, "auto never bounced up front: {}", o.w.line);
    assert_eq!(
        o.w.get("writes_zero_copy") + b,
        w,
        "every write is zero-copy or bounced: {}",
        o.w.line
    );
    assert_all_good("auto type1/4096", o);
}

#[test]
fn scribbled_writes_always_type1_4096_are_all_bounced_and_verify() {
    let _serial = one_at_a_time();
    let o = write_session(
        &["--pi", "type1", "--interval", "4096"],
        &["--bounce", "always"],
        SIZE,
        SECS,
        true,
        seed(),
    );
    report("always type1/4096", &o);
    assert_eq!(o.w.get("writes_bounced"), o.w.get("writes"), "{}", o.w.line);
    assert_eq!(o.w.get("writes_zero_copy"), 0, "{}", o.w.line);
    assert_eq!(o.w.get("writes_rewritten"), 0, "{}", o.w.line);
    assert_eq!(o.w.get("intervals_rewritten"), 0, "{}", o.w.line);
    assert_all_good("always type1/4096", o);
}

#[test]
fn scribbled_writes_never_nvme64_4096_are_rewritten_and_verify() {
    let _serial = one_at_a_time();
    let o = write_session(
        &["--pi", "nvme64", "--interval", "4096"],
        &["--bounce", "never"],
        SIZE,
        1.0,
        true,
        seed(),
    );
    report("never nvme64/4096", &o);
    assert!(o.w.get("writes_rewritten") > 0, "{}", o.w.line);
    assert_all_good("never nvme64/4096", o);
}

#[test]
fn scribbled_writes_auto_nvme64_512_are_bounced_or_rewritten_and_verify() {
    let _serial = one_at_a_time();
    let o = write_session(
        &["--pi", "nvme64", "--interval", "512"],
        &["--bounce", "auto", "--auto-path", "zero-copy"],
        SIZE,
        1.0,
        true,
        seed(),
    );
    report("auto nvme64/512", &o);
    assert!(o.w.get("writes_rewritten") > 0, "{}", o.w.line);
    assert!(o.w.get("writes_bounced") > 0, "{}", o.w.line);
    assert_all_good("auto nvme64/512", o);
}

// ---------------------------------------------------------------------------------------------
// 2. The harness reproduces the problem: --no-mutation-check stores wrong guards
// ---------------------------------------------------------------------------------------------

#[test]
fn scribbled_writes_without_the_check_produce_guard_errors() {
    let _serial = one_at_a_time();
    let seed = seed();
    let size = SIZE;
    let d = Daemon::start_created(
        &std::env::temp_dir(),
        size,
        &["--pi", "type1", "--interval", "4096"],
        &["--queues", "1", "--no-mutation-check"],
    );
    let mut rng = Rng(seed);
    let mut session = 0;
    let mut failed = Vec::new();
    let start = Instant::now();
    // Rounds of 0.5 s of scribbled writes and a full read-back, until a block fails (the
    // first round practically always does) or 6 s have passed.
    while failed.is_empty() && start.elapsed() < Duration::from_secs(6) {
        let mut c = Client::connect(&d.socket, 1, DEPTH * SLOT).unwrap();
        fill_random(&mut c.buf()[..DEPTH * SLOT], &mut rng);
        let base = c.region.addr;
        let scribbler = Scribbler::start(base, DEPTH * SLOT, rng.next_u64());
        let writes = run_writes(
            &mut c,
            base,
            SLOT,
            DEPTH,
            for_secs(0.5),
            &mut rng,
            &mut random_write(0, size),
        );
        let scribbles = scribbler.stop();
        drop(c);
        session += 1;
        let w = d.session_counters(session);
        assert!(writes.failures.is_empty(), "{:?}", writes.failures);
        assert_eq!(w.get("writes_zero_copy"), w.get("writes"), "{}", w.line);
        assert_eq!(w.get("writes_rewritten"), 0, "{}", w.line);
        let (f, r) = read_back(&d, size, 4096, session + 1);
        session += 1;
        eprintln!(
            "--no-mutation-check round: {} writes, {scribbles} scribbles; read-back: {} of {} \
             blocks fail, guard_errors={}",
            writes.writes,
            f.len(),
            size / 4096,
            r.get("guard_errors")
        );
        assert_eq!(
            r.get("guard_errors"),
            f.len() as u64,
            "one guard error per failed read: {}",
            r.line
        );
        failed = f;
    }
    assert!(
        !failed.is_empty(),
        "the harness did not reproduce the problem in {:.1?}: scribbled writes without the check \
         left no bad block",
        start.elapsed()
    );
    assert!(
        failed.iter().all(|&(_, ret)| ret == -libc::EIO),
        "failed reads must be EIO: {failed:?}"
    );
    // The daemon reported exactly those blocks, once each (reads are retried under the lock
    // first: these are real mismatches between data and tuple).
    let mut failed_lbas: Vec<u64> = failed.iter().map(|&(o, _)| o / 4096).collect();
    failed_lbas.sort();
    let mut logged: Vec<u64> = guard_error_lines(&d.log_text())
        .iter()
        .map(|e| e.lba)
        .collect();
    logged.sort();
    assert_eq!(logged, failed_lbas, "guard error lines vs failed reads");
    let mut d = d;
    assert!(d.terminate().success());
    let scrub = scrub_json(&d.image);
    assert_eq!(
        scrub.code,
        Some(1),
        "scrub must report guard errors: {scrub}"
    );
    let scrubbed: Vec<u64> = scrub.lbas_and_kinds().iter().map(|(l, _)| *l).collect();
    let mut unique = scrubbed.clone();
    unique.dedup();
    assert_eq!(
        unique, failed_lbas,
        "scrub finds exactly the blocks whose reads failed"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. A guest that does not scribble stays zero-copy
// ---------------------------------------------------------------------------------------------

fn clean_workload_stays_zero_copy(mode: &[&str]) {
    let _serial = one_at_a_time();
    let o = write_session(
        &["--pi", "type1", "--interval", "4096"],
        mode,
        SIZE,
        0.5,
        false,
        seed(),
    );
    let label = format!("clean {}", mode.join(" "));
    report(&label, &o);
    assert!(o.writes.writes > 100, "too few writes: {}", o.writes.writes);
    assert_eq!(o.w.get("writes"), o.writes.writes, "{}", o.w.line);
    assert_eq!(
        o.w.get("writes_zero_copy"),
        o.w.get("writes"),
        "{}",
        o.w.line
    );
    assert_eq!(o.w.get("writes_bounced"), 0, "{}", o.w.line);
    assert_eq!(o.w.get("writes_rewritten"), 0, "{}", o.w.line);
    assert_eq!(o.w.get("intervals_rewritten"), 0, "{}", o.w.line);
    assert_eq!(o.w.get("bytes_bounced"), 0, "{}", o.w.line);
    assert_eq!(o.r.get("read_retries_healed"), 0, "{}", o.r.line);
    assert_all_good(&label, o);
}

#[test]
fn clean_workload_auto_stays_zero_copy() {
    clean_workload_stays_zero_copy(&["--bounce", "auto", "--auto-path", "zero-copy"]);
}

#[test]
fn clean_workload_never_stays_zero_copy() {
    clean_workload_stays_zero_copy(&["--bounce", "never"]);
}

// ---------------------------------------------------------------------------------------------
// 3b. auto picks the cheaper path by cost (issue 10)
// ---------------------------------------------------------------------------------------------

/// tmpfs, if this kernel's tmpfs takes O_DIRECT (6.6+): a target where the kernel copies.
fn tmpfs_dir() -> Option<std::path::PathBuf> {
    let dir = std::path::PathBuf::from("/dev/shm");
    let probe = tempfile::NamedTempFile::new_in(&dir).ok()?;
    std::fs::write(probe.path(), vec![0u8; 4096]).ok()?;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(probe.path())
        .ok()
        .map(|_| dir)
}

#[test]
fn auto_bounces_every_write_where_the_kernel_copies_anyway() {
    let _serial = one_at_a_time();
    let Some(dir) = tmpfs_dir() else {
        eprintln!("SKIPPED: /dev/shm is not a tmpfs that accepts O_DIRECT here");
        return;
    };
    // Clean and scribbled alike: on tmpfs zero-copy cannot save the kernel's copy, so auto
    // bounces everything (by cost) and nothing is ever rewritten or wrong.
    for scribble in [false, true] {
        let o = write_session_in(
            &dir,
            &["--pi", "type1", "--interval", "4096"],
            &["--bounce", "auto"],
            SIZE,
            0.5,
            scribble,
            seed(),
        );
        let label = format!("auto on tmpfs, scribble {scribble}");
        report(&label, &o);
        let log = o.d.log_text();
        assert!(
            log.contains("PI write path chosen") && log.contains("the kernel copies"),
            "{label}: no write-path decision logged:\n{log}"
        );
        assert!(o.writes.writes > 100, "{label}: too few writes");
        assert_eq!(o.w.get("writes_zero_copy"), 0, "{label}: {}", o.w.line);
        assert_eq!(
            o.w.get("writes_bounced"),
            o.w.get("writes"),
            "{label}: {}",
            o.w.line
        );
        assert_eq!(
            o.w.get("writes_bounced_by_cost"),
            o.w.get("writes"),
            "{label}: {}",
            o.w.line
        );
        assert_eq!(o.w.get("writes_rewritten"), 0, "{label}: {}", o.w.line);
        let stats = o.d.stats();
        assert_eq!(
            stats["write_path"][0]["4k"]["path"], "bounce",
            "{label}: {stats}"
        );
        assert_all_good(&label, o);
    }
}

#[test]
fn auto_by_cost_on_a_dma_target_takes_either_path_and_stays_exact() {
    let _serial = one_at_a_time();
    // ext4/XFS under the temp dir: io_uring, O_DIRECT; which path is cheaper depends on this
    // CPU, so the assertions hold for either. Scribbled, so the zero-copy writes that the
    // model takes (chosen, or exploring) are checked and repaired.
    let o = write_session(
        &["--pi", "type1", "--interval", "4096"],
        &["--bounce", "auto"],
        SIZE,
        SECS,
        true,
        seed(),
    );
    report("auto by cost, DMA target", &o);
    let log = o.d.log_text();
    assert!(
        log.contains("PI write path chosen"),
        "no decision logged:\n{log}"
    );
    let by_cost = o.w.get("writes_bounced_by_cost");
    assert!(by_cost <= o.w.get("writes_bounced"), "{}", o.w.line);
    assert_eq!(
        o.w.get("writes_zero_copy") + o.w.get("writes_bounced"),
        o.w.get("writes"),
        "every write is zero-copy or bounced: {}",
        o.w.line
    );
    // IMAGE.pi-stats.json is published when each session ends; session 2 (the read-back) has
    // ended by now.
    // The file is written just after the session's end shows on the stats socket.
    let stats_path = o.d.image.with_extension("img.pi-stats.json");
    let live = o.d.stats();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let file = loop {
        let file: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&stats_path).unwrap_or_default())
                .unwrap_or(serde_json::Value::Null);
        if file["recent_sessions"] == live["recent_sessions"]
            || std::time::Instant::now() > deadline
        {
            break file;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_all_good("auto by cost, DMA target", o);
    let path = &file["write_path"][0]["4k"]["path"];
    assert!(
        path == "zero-copy" || path == "bounce",
        "stats file lacks the 4k decision: {file}"
    );
    assert_eq!(
        file["recent_sessions"], live["recent_sessions"],
        "the stats file and the stats socket disagree"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. auto learns where the guest mutates
// ---------------------------------------------------------------------------------------------

/// Largest fraction of writes that may still need a rewrite after warm-up.
const MAX_REWRITE_FRACTION: f64 = 0.01;

/// One write session on `mem` (DEPTH slots) writing with `pick`, with a scribbler on the
/// buffers if `scribble`; its counters.
fn session_on(
    d: &Daemon,
    session: usize,
    mem: &SharedMem,
    until: Until,
    rng: &mut Rng,
    pick: &mut Pick<'_>,
    scribble: bool,
) -> (WriteStats, SessionCounters) {
    let opts = ClientOptions {
        num_queues: 1,
        queue_size: None,
        buffer_len: 0,
        memory: Some(mem),
    };
    let mut c = Client::connect_opts(&d.socket, opts).unwrap();
    let scribbler = scribble.then(|| Scribbler::start(mem.addr, DEPTH * SLOT, rng.next_u64()));
    let stats = run_writes(&mut c, mem.addr, SLOT, DEPTH, until, rng, pick);
    if let Some(scribbler) = scribbler {
        scribbler.stop();
    }
    drop(c);
    assert!(stats.failures.is_empty(), "{:?}", stats.failures);
    (stats, d.session_counters(session))
}

fn scribbled_session(
    d: &Daemon,
    session: usize,
    mem: &SharedMem,
    until: Until,
    rng: &mut Rng,
    pick: &mut Pick<'_>,
) -> (WriteStats, SessionCounters) {
    session_on(d, session, mem, until, rng, pick, true)
}

fn fraction(c: &SessionCounters, name: &str) -> f64 {
    c.get(name) as f64 / c.get("writes").max(1) as f64
}

/// Guest pages: the same buffers (`mem`) are reused, as page files do, for writes spread over
/// a 4 GiB disk: the warm-up over the first 2 GiB, the measured session over the other 2 GiB,
/// which the warm-up never touched. Region marks cannot keep up with that (each 1 MiB region
/// needs its own detected mutation: a rewrite per region); only the page marks from the
/// warm-up can send these writes to the bounce path up front. (A warm-up confined to a few
/// regions would not do: once its regions are hot every write there bounces, and the pages
/// the first writes did not mark would never be learned.)
fn auto_learns_pages(mem: &SharedMem) {
    let mut rng = Rng(seed());
    let size = 4096 * MIB;
    let warm_end = size / 2;
    // nvme64: a 16-bit guard would hide 1 in 65536 changed intervals from the check (see
    // docs/MUTATION.md) and make the scrub below fail now and then for a reason that is not
    // the one under test.
    let mut d = Daemon::start_created(
        &std::env::temp_dir(),
        size,
        &["--pi", "nvme64", "--interval", "4096"],
        &[
            "--queues",
            "1",
            "--bounce",
            "auto",
            "--auto-path",
            "zero-copy",
        ],
    );
    // SAFETY: our own live mapping; no scribbler or request uses it yet.
    fill_random(
        unsafe { std::slice::from_raw_parts_mut(mem.addr as *mut u8, mem.len) },
        &mut rng,
    );
    // Counted in writes, not time (throughput on fresh parts of a sparse image varies a lot
    // on a shared machine): 4000 warm-up writes give each of the 384 pages ~80 chances to be
    // seen mutating in a zero-copy write of its own; 5000 measured writes make the few pages
    // the warm-up may still have missed (one rewrite each) a small fraction.
    let until = |writes| Until {
        duration: Duration::from_secs(4),
        writes,
    };
    let (_, warm) = scribbled_session(
        &d,
        1,
        mem,
        until(4000),
        &mut rng,
        &mut striped_write(0, warm_end, DEPTH),
    );
    let (stats, measured) = scribbled_session(
        &d,
        2,
        mem,
        until(5000),
        &mut rng,
        &mut striped_write(warm_end, size, DEPTH),
    );
    let rewritten = fraction(&measured, "writes_rewritten");
    eprintln!(
        "auto, guest pages at {:#x}: warm-up {} writes, {} rewritten, {} bounced; measured {} \
         writes ({:.0}/s): {} rewritten = {:.3}%, bounced up front {:.2}%",
        mem.addr,
        warm.get("writes"),
        warm.get("writes_rewritten"),
        warm.get("writes_bounced"),
        measured.get("writes"),
        stats.writes as f64 / stats.elapsed.as_secs_f64(),
        measured.get("writes_rewritten"),
        rewritten * 100.0,
        fraction(&measured, "writes_bounced") * 100.0
    );
    assert!(
        warm.get("writes_rewritten") > 0,
        "warm-up saw no mutation: {}",
        warm.line
    );
    assert!(
        rewritten <= MAX_REWRITE_FRACTION,
        "guest pages at {:#x}: after warm-up {:.3}% of writes still needed a rewrite (limit \
         {}%): {}",
        mem.addr,
        rewritten * 100.0,
        MAX_REWRITE_FRACTION * 100.0,
        measured.line
    );
    assert!(!d.log_text().contains("PI guard error"));
    assert!(d.terminate().success());
    assert_scrub_clean(&d.image, "auto pages");
}

/// Memory where a libblkio client's allocations land (mmap's choice: just below 2^47 on
/// x86-64): libblkio's vhost-user driver passes its virtual addresses as guest-physical
/// addresses, so these are the pages the daemon must learn for such a frontend.
#[test]
fn auto_learns_the_guest_pages_that_mutate() {
    let _serial = one_at_a_time();
    let mem = SharedMem::new(DEPTH * SLOT);
    auto_learns_pages(&mem);
}

/// Memory at 1 TiB: a guest-physical address like a large VM's.
#[test]
fn auto_learns_the_guest_pages_that_mutate_at_vm_like_addresses() {
    let _serial = one_at_a_time();
    let mem = SharedMem::new_at(1 << 40, DEPTH * SLOT);
    auto_learns_pages(&mem);
}

/// What `auto` learned survives a restart of the daemon (an upgrade: SIGTERM, start again on
/// the same image): after it, writes from the same guest pages to disk regions never written
/// before are bounced up front, although nothing scribbles any more. The control run removes
/// the saved marks (IMAGE.pi-mutations.json) before the restart: the same writes then go
/// zero-copy, so the test sees what it claims to.
#[test]
fn auto_remembers_the_guest_pages_that_mutate_across_a_restart() {
    let _serial = one_at_a_time();
    let mem = SharedMem::new(DEPTH * SLOT);
    let mut rng = Rng(seed());
    let size = 1024 * MIB;
    let serve = [
        "--queues",
        "1",
        "--bounce",
        "auto",
        "--auto-path",
        "zero-copy",
    ];
    for keep_marks in [true, false] {
        let d = Daemon::start_created(
            &std::env::temp_dir(),
            size,
            &["--pi", "nvme64", "--interval", "4096"],
            &serve,
        );
        // SAFETY: our own live mapping; no scribbler or request uses it yet.
        fill_random(
            unsafe { std::slice::from_raw_parts_mut(mem.addr as *mut u8, mem.len) },
            &mut rng,
        );
        let until = |writes| Until {
            duration: Duration::from_secs(4),
            writes,
        };
        let (_, warm) = scribbled_session(
            &d,
            1,
            &mem,
            until(4000),
            &mut rng,
            &mut striped_write(0, size / 2, DEPTH),
        );
        assert!(
            warm.get("writes_rewritten") > 0,
            "warm-up saw no mutation: {}",
            warm.line
        );
        let mut d = d;
        assert!(d.terminate().success());
        let marks = d.image.with_extension("img.pi-mutations.json");
        assert!(marks.exists(), "no marks saved at {}", marks.display());
        if !keep_marks {
            std::fs::remove_file(&marks).unwrap();
        }
        let d = d.restart_after_exit(&serve);
        let (_, after) = session_on(
            &d,
            1,
            &mem,
            until(1000),
            &mut rng,
            &mut striped_write(size / 2, size, DEPTH),
            false,
        );
        let up_front = after.get("writes_bounced") - after.get("writes_bounced_by_cost");
        let share = up_front as f64 / after.get("writes").max(1) as f64;
        eprintln!(
            "restart {} the marks: {} of {} writes bounced up front ({:.0}%), warm-up had {} rewrites",
            if keep_marks { "keeping" } else { "without" },
            up_front,
            after.get("writes"),
            share * 100.0,
            warm.get("writes_rewritten")
        );
        if keep_marks {
            assert!(
                d.log_text()
                    .contains("remembered where the guest changed buffers"),
                "{}",
                d.log_text()
            );
            assert!(
                share >= 0.5,
                "the restarted daemon forgot the pages: {}",
                after.line
            );
        } else {
            assert_eq!(up_front, 0, "nothing to remember, yet: {}", after.line);
        }
        assert!(!d.log_text().contains("PI guard error"));
        let mut d = d;
        assert!(d.terminate().success());
        assert_scrub_clean(&d.image, "auto marks across a restart");
    }
}

/// Disk regions: the measured session writes to the same few MiB as the warm-up (as a page
/// file does) from memory the daemon has never seen, so only the region marks can help.
#[test]
fn auto_learns_the_disk_regions_that_mutate() {
    let _serial = one_at_a_time();
    let mut rng = Rng(seed());
    let size = 64 * MIB;
    let hot = 4 * MIB;
    let mut d = Daemon::start_created(
        &std::env::temp_dir(),
        size,
        &["--pi", "nvme64", "--interval", "4096"],
        &[
            "--queues",
            "1",
            "--bounce",
            "auto",
            "--auto-path",
            "zero-copy",
        ],
    );
    // Both mappings alive at once: distinct addresses.
    let first = SharedMem::new(DEPTH * SLOT);
    let second = SharedMem::new(DEPTH * SLOT);
    assert_ne!(first.addr, second.addr);
    // Striped: the first round of (cold, zero-copy, scribbled) writes reaches every 1 MiB
    // region of the hot extent, so each is seen mutating.
    let (_, warm) = scribbled_session(
        &d,
        1,
        &first,
        for_secs(0.5),
        &mut rng,
        &mut striped_write(0, hot, DEPTH),
    );
    let (stats, measured) = scribbled_session(
        &d,
        2,
        &second,
        for_secs(1.0),
        &mut rng,
        &mut striped_write(0, hot, DEPTH),
    );
    let rewritten = fraction(&measured, "writes_rewritten");
    eprintln!(
        "auto, disk regions: warm-up {} writes, {} rewritten; measured {} writes ({:.0}/s): \
         {} rewritten = {:.3}%, bounced up front {:.2}%",
        warm.get("writes"),
        warm.get("writes_rewritten"),
        measured.get("writes"),
        stats.writes as f64 / stats.elapsed.as_secs_f64(),
        measured.get("writes_rewritten"),
        rewritten * 100.0,
        fraction(&measured, "writes_bounced") * 100.0
    );
    assert!(warm.get("writes_rewritten") > 0, "{}", warm.line);
    assert!(
        rewritten <= MAX_REWRITE_FRACTION,
        "after warm-up {:.3}% of writes still needed a rewrite (limit {}%): {}",
        rewritten * 100.0,
        MAX_REWRITE_FRACTION * 100.0,
        measured.line
    );
    assert!(!d.log_text().contains("PI guard error"));
    assert!(d.terminate().success());
    assert_scrub_clean(&d.image, "auto regions");
    drop((first, second));
}

// ---------------------------------------------------------------------------------------------
// 5. Back-pressure on a small bounce pool
// ---------------------------------------------------------------------------------------------

/// `--queue-size 16`: the pool holds 16 chunks of 64 KiB (1 MiB) and a request may carry up to
/// 14 × 64 KiB. Many concurrent large bounced writes must all succeed (they wait for buffers,
/// they never fail for want of one) and read back exactly.
#[test]
fn large_concurrent_writes_on_a_small_pool_wait_and_succeed() {
    let _serial = one_at_a_time();
    let size = 32 * MIB;
    let mut d = Daemon::start_created(
        &std::env::temp_dir(),
        size,
        &["--pi", "type1", "--interval", "4096"],
        &["--queues", "1", "--queue-size", "16", "--bounce", "always"],
    );
    let max_transfer = 14 * SLOT;
    let rounds: [(usize, usize); 3] = [(12, 512 * KIB), (24, 256 * KIB), (20, max_transfer)];
    let region = rounds.iter().map(|&(n, len)| n * len).max().unwrap();
    let opts = ClientOptions {
        num_queues: 1,
        queue_size: Some(16),
        buffer_len: region,
        memory: None,
    };
    let mut c = Client::connect_opts(&d.socket, opts).unwrap();
    assert_eq!(
        c.blkio.get_i32("max-transfer").unwrap() as usize,
        max_transfer,
        "the device's transfer limit"
    );
    let start = Instant::now();
    let mut written = Vec::new();
    for (round, &(n, len)) in rounds.iter().enumerate() {
        let seed = 100 + round as u64;
        // Distinct, len-aligned places on the disk, all submitted at once.
        for i in 0..n {
            let offset = (i * len) as u64 % (size - len as u64);
            let buf = &mut c.buf()[i * len..(i + 1) * len];
            fill_pattern(buf, offset, seed);
            let ptr = c.buf_ptr(i * len);
            c.queues[0].write(offset, ptr, len, i, ReqFlags::empty());
        }
        for (i, ret) in wait_all(&mut c.queues[0], n) {
            assert_eq!(ret, 0, "round {round}: write {i} ({len} bytes) failed");
        }
        written.push((n, len, seed));
    }
    let elapsed = start.elapsed();
    // Read back the last round's content (it overwrote the earlier rounds where they overlap).
    let (n, len, seed) = *written.last().unwrap();
    for i in 0..n {
        let offset = (i * len) as u64 % (size - len as u64);
        assert_eq!(read(&mut c, 0, offset, 0, len), 0, "read at {offset}");
        check_pattern(&c.buf()[..len], offset, seed).unwrap();
    }
    drop(c);
    let w = d.session_counters(1);
    eprintln!(
        "small pool, --bounce always: writes in {elapsed:.2?}; {}",
        w.line
    );
    let total: usize = rounds.iter().map(|&(n, _)| n).sum();
    assert_eq!(w.get("writes"), total as u64, "{}", w.line);
    assert_eq!(w.get("writes_bounced"), total as u64, "{}", w.line);
    assert_eq!(w.get("rejected"), 0, "{}", w.line);
    assert_eq!(w.get("io_errors"), 0, "{}", w.line);
    assert!(d.terminate().success());
    assert_scrub_clean(&d.image, "small pool");
}

/// The same small pool under scribbled 512 KiB zero-copy writes: every rewrite after detection
/// needs pool buffers too (up to 8 of the 16 chunks each).
#[test]
fn scribbled_large_writes_on_a_small_pool_are_rewritten_and_verify() {
    let _serial = one_at_a_time();
    let mut rng = Rng(seed());
    let size = 32 * MIB;
    let len = 512 * KIB;
    let depth = 8;
    let d = Daemon::start_created(
        &std::env::temp_dir(),
        size,
        &["--pi", "nvme64", "--interval", "4096"],
        &["--queues", "1", "--queue-size", "16", "--bounce", "never"],
    );
    let opts = ClientOptions {
        num_queues: 1,
        queue_size: Some(16),
        buffer_len: depth * len,
        memory: None,
    };
    let mut c = Client::connect_opts(&d.socket, opts).unwrap();
    fill_random(&mut c.buf()[..depth * len], &mut rng);
    let base = c.region.addr;
    let scribbler = Scribbler::start(base, depth * len, rng.next_u64());
    // Slot s writes 512 KiB-aligned within its own stripe: no overlap (see striped_write).
    let stripe = size / depth as u64;
    let mut pick = move |slot: usize, _n: u64, rng: &mut Rng| {
        let offset = slot as u64 * stripe + rng.below(stripe / len as u64) * len as u64;
        (offset, len, 0)
    };
    let writes = run_writes(&mut c, base, len, depth, for_secs(1.0), &mut rng, &mut pick);
    let scribbles = scribbler.stop();
    drop(c);
    let w = d.session_counters(1);
    let (failed, r) = read_back(&d, size, 4096, 2);
    let o = Outcome {
        d,
        size,
        interval: 4096,
        writes,
        w,
        r,
        failed,
        scribbles,
    };
    report("small pool, never, 512 KiB", &o);
    assert!(o.w.get("writes_rewritten") > 0, "{}", o.w.line);
    assert_all_good("small pool, never, 512 KiB", o);
}

// ---------------------------------------------------------------------------------------------
// 6. Reads whose buffers the guest scribbles over
// ---------------------------------------------------------------------------------------------

/// A guest changing its read buffer while the read is in flight makes the daemon's check of
/// guest memory fail; the locked re-read verifies and hands over good data, so a good block
/// never gets EIO. (What such a read returns is unspecified: the guest scribbled it.)
#[test]
fn scribbled_read_buffers_never_fail_good_blocks() {
    let _serial = one_at_a_time();
    let mut rng = Rng(seed());
    let size = 8 * MIB;
    let pattern = 21;
    let mut d = Daemon::start_created(
        &std::env::temp_dir(),
        size,
        &["--pi", "type1", "--interval", "4096"],
        &["--queues", "1"],
    );
    let depth = 16;
    let mut c = Client::connect(&d.socket, 1, depth * SLOT).unwrap();
    // Good data everywhere, written without scribbling.
    let mut offset = 0;
    while offset < size {
        for i in 0..depth {
            let o = offset + (i * SLOT) as u64;
            fill_pattern(&mut c.buf()[i * SLOT..(i + 1) * SLOT], o, pattern);
            let ptr = c.buf_ptr(i * SLOT);
            c.queues[0].write(o, ptr, SLOT, i, ReqFlags::empty());
        }
        for (i, ret) in wait_all(&mut c.queues[0], depth) {
            assert_eq!(ret, 0, "fill write {i} at {offset}");
        }
        offset += (depth * SLOT) as u64;
    }
    // Scribbled reads: 4 KiB and 64 KiB at random places, `depth` in flight, for 1 s.
    let base = c.region.addr;
    let scribbler = Scribbler::start(base, depth * SLOT, rng.next_u64());
    let deadline = Instant::now() + Duration::from_millis(1000);
    let mut current = vec![(0u64, 0usize); depth];
    let mut failures = Vec::new();
    let mut reads = 0u64;
    let mut outstanding = 0;
    let mut pick = random_write(0, size);
    loop {
        if Instant::now() < deadline {
            for (slot, cur) in current.iter_mut().enumerate() {
                if cur.1 != 0 {
                    continue;
                }
                let (o, len, buf_off) = pick(slot, 0, &mut rng);
                *cur = (o, len);
                let ptr = (base + slot * SLOT + buf_off) as *mut u8;
                c.queues[0].read(o, ptr, len, slot, ReqFlags::empty());
                outstanding += 1;
            }
        }
        if outstanding == 0 {
            break;
        }
        let done = reap_some(&mut c.queues[0], depth, Duration::from_secs(10));
        assert!(!done.is_empty(), "no read completed in 10 s");
        for (slot, ret) in done {
            outstanding -= 1;
            reads += 1;
            if ret != 0 {
                failures.push((current[slot], ret));
            }
            current[slot] = (0, 0);
        }
    }
    let scribbles = scribbler.stop();
    assert!(
        failures.is_empty(),
        "{} of {reads} scribbled reads of good blocks failed ((offset, len), ret): {:?}\n{}",
        failures.len(),
        &failures[..failures.len().min(20)],
        guard_error_summary(&d.log_text())
    );
    // Without the scribbler, the content is exactly what was written.
    read_disk(&mut c, size, SLOT, depth, |offset, ret, data| {
        assert_eq!(ret, 0, "read at {offset}");
        check_pattern(data, offset, pattern).unwrap();
    });
    drop(c);
    let s = d.session_counters(1);
    eprintln!(
        "scribbled reads: {reads} reads, {scribbles} scribbles; {}",
        s.line
    );
    assert_eq!(s.get("guard_errors"), 0, "{}", s.line);
    assert_eq!(s.get("io_errors"), 0, "{}", s.line);
    assert!(
        s.get("read_retries_healed") > 0,
        "the scribbler never hit a read in flight (the test proves nothing): {}",
        s.line
    );
    assert!(!d.log_text().contains("PI guard error"));
    assert!(d.terminate().success());
    assert_scrub_clean(&d.image, "scribbled reads");
}
