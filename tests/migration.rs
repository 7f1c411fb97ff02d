//! Live migration, frontend side: the dirty log and the hand-over of the image between two
//! frontends, driven by a vhost-user frontend built on the `vhost` crate (tests/common/
//! frontend.rs) the way QEMU drives them. The guest-level test (a Linux guest migrated between
//! two QEMUs while it writes) is guest-tests/run.sh's `migrate`; it cannot check read buffers
//! under TCG (docs/RESTART.md §6), which is what these tests do, page by page.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::frontend::*;
use common::*;
use vhost::VhostBackend;

const MIB: u64 = 1 << 20;
const WAIT: Duration = Duration::from_secs(10);
/// A frontend that can hand the daemon a dirty log, as QEMU negotiates for migration.
const LOGGING: FrontendOptions = FrontendOptions {
    inflight: false,
    log_shmfd: true,
};

fn daemon(env: &[(&str, &str)]) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let created = guardblk(&[
        "create",
        image.to_str().unwrap(),
        "--size",
        &(8 * MIB).to_string(),
        "--pi",
        "none",
    ]);
    assert!(created.status.success());
    Daemon::serve_with_env(dir, image, &[], env)
}

fn pages(gpa: u64, len: u64) -> impl Iterator<Item = u64> {
    gpa / PAGE..=(gpa + len - 1) / PAGE
}

/// Requests of the logged batch: (type, sector, guest address, length).
fn logged_batch() -> Vec<(u32, u64, u64, u32)> {
    let mut batch = Vec::new();
    // One-page reads with two untouched pages between them.
    for k in 0..8u64 {
        batch.push((
            VIRTIO_BLK_T_IN,
            k * 8,
            DATA_GPA + 0x40000 + k * 3 * PAGE,
            4096,
        ));
    }
    // A read across two pages, and a misaligned one (bounced: copied into guest memory).
    batch.push((VIRTIO_BLK_T_IN, 64, DATA_GPA + 0x80000, 8192));
    batch.push((VIRTIO_BLK_T_IN, 80, DATA_GPA + 0x90000 + 512, 4096));
    // The serial string, and a write (its buffer is only read by the device: not logged).
    batch.push((VIRTIO_BLK_T_GET_ID, 0, DATA_GPA + 0xa0000, 20));
    batch.push((VIRTIO_BLK_T_OUT, 200, DATA_GPA + 0xb0000, 4096));
    batch
}

/// Write a pattern to the first 64 KiB through the device, then run [`logged_batch`] with
/// LOG_ALL on. Returns (pages the device wrote, pages the log has).
fn log_of_a_batch(d: &Daemon) -> (BTreeSet<u64>, BTreeSet<u64>) {
    let mut q = TestQueue::new();
    let fe = q.connect(&d.socket, LOGGING, 0);
    assert!(
        fe.offers_log_all(),
        "the device does not offer VHOST_F_LOG_ALL"
    );
    let mut pattern = vec![0u8; 65536];
    fill_pattern(&mut pattern, 0, 21);
    q.mem.write(DATA_GPA, &pattern);
    q.submit(0, VIRTIO_BLK_T_OUT, 0, DATA_GPA, 65536);
    q.mem.write(DATA_GPA + 0xb0000, &pattern[..4096]);
    fe.kick();
    assert!(q.wait_used(1, WAIT));
    assert_eq!(q.status(0), 0);

    let log = DirtyLog::new();
    fe.set_log(&log);
    // Given a log but LOG_ALL off: the device marks nothing.
    q.submit(1, VIRTIO_BLK_T_IN, 0, DATA_GPA + 0x20000, 4096);
    fe.kick();
    assert!(q.wait_used(2, WAIT));
    assert_eq!(
        log.dirty_pages(),
        Vec::<u64>::new(),
        "marked with LOG_ALL off"
    );

    // Migration starts: LOG_ALL, and SET_VRING_ADDR with VHOST_VRING_F_LOG on the running ring.
    fe.set_log_all(true);
    q.resend_vring_addr(&fe, true);
    let batch = logged_batch();
    let mut written = BTreeSet::new();
    for (i, &(kind, sector, gpa, len)) in batch.iter().enumerate() {
        q.submit(2 + i as u16, kind, sector, gpa, len);
        if kind != VIRTIO_BLK_T_OUT {
            written.extend(pages(gpa, u64::from(len)));
        }
    }
    fe.kick();
    let end = 2 + batch.len() as u16;
    assert!(q.wait_used(end, WAIT), "batch not completed");
    for k in 2..end {
        assert_eq!(q.status(k), 0, "request {k} failed");
    }
    // The reads hold the data.
    for (i, &(kind, sector, gpa, len)) in batch.iter().enumerate() {
        if kind == VIRTIO_BLK_T_IN && sector < 128 {
            let got = q.mem.read(gpa, len as usize);
            check_pattern(&got, sector * 512, 21).unwrap_or_else(|e| panic!("read {i}: {e}"));
        }
    }
    written.insert(STATUS_GPA / PAGE);
    written.insert(USED_GPA / PAGE);
    let logged: BTreeSet<u64> = log.dirty_pages().into_iter().collect();

    // Migration ends: LOG_ALL off. Nothing more is marked.
    log.clear();
    fe.set_log_all(false);
    q.resend_vring_addr(&fe, false);
    q.submit(end, VIRTIO_BLK_T_IN, 0, DATA_GPA + 0x30000, 4096);
    fe.kick();
    assert!(q.wait_used(end + 1, WAIT));
    assert_eq!(
        log.dirty_pages(),
        Vec::<u64>::new(),
        "marked after LOG_ALL was cleared"
    );
    (written, logged)
}

#[test]
fn every_page_the_device_writes_is_in_the_dirty_log_and_nothing_else() {
    let d = daemon(&[]);
    let (written, logged) = log_of_a_batch(&d);
    let missing: Vec<_> = written.difference(&logged).collect();
    let extra: Vec<_> = logged.difference(&written).collect();
    assert!(
        missing.is_empty(),
        "pages written but not logged: {missing:?}"
    );
    // Not the write's buffer, not the descriptor table, avail ring or headers (device-read).
    assert!(extra.is_empty(), "pages logged but not written: {extra:?}");
    d.wait_for_log("live migration started");
}

/// The control: with the test-only knob that skips marking, the same check finds every
/// device-written page missing, so the test above can tell a working log from none.
#[test]
fn without_marking_the_check_finds_the_pages_missing() {
    let d = daemon(&[("GUARDBLK_UNSAFE_SKIP_DIRTY_LOG", "1")]);
    let (written, logged) = log_of_a_batch(&d);
    assert!(logged.is_empty(), "marked despite the knob: {logged:?}");
    assert!(written.len() > 10, "{written:?}");
    d.wait_for_log("GUARDBLK_UNSAFE_SKIP_DIRTY_LOG=1");
}

/// GET_VRING_BASE drains the queue, and what it completes is logged before the reply (QEMU
/// harvests the log right after stopping the device; anything marked later is lost).
#[test]
fn requests_completed_by_the_stop_are_logged_before_it_returns() {
    let d = daemon(&[]);
    let mut q = TestQueue::new();
    let fe = q.connect(&d.socket, LOGGING, 0);
    let log = DirtyLog::new();
    fe.set_log(&log);
    fe.set_log_all(true);
    let n = 48u16;
    for k in 0..n {
        q.submit(
            k,
            VIRTIO_BLK_T_IN,
            u64::from(k) * 16,
            DATA_GPA + u64::from(k) * 2 * PAGE,
            8192,
        );
    }
    fe.kick();
    // Let the queue take some of them, then stop it while they run.
    assert!(q.wait_used(1, WAIT));
    let base = fe.stop() as u16;
    assert!(base > 0);
    assert_eq!(
        q.used_idx(),
        base,
        "the stop answered every request it had taken before returning"
    );
    let logged: BTreeSet<u64> = log.dirty_pages().into_iter().collect();
    for i in 0..base {
        let (k, _) = q.used_entry(i);
        for p in pages(DATA_GPA + u64::from(k) * 2 * PAGE, 8192) {
            assert!(
                logged.contains(&p),
                "request {k}'s page {p} not logged at the stop"
            );
        }
    }
    // The rest were never taken: a restarted queue (or the destination) starts at `base`.
    let fe = q.connect(&d.socket, FrontendOptions::default(), base);
    fe.kick();
    assert!(
        q.wait_used(n, WAIT),
        "the requests after the stop were not served"
    );
    assert!((0..n).all(|k| q.status(k) == 0));
}

/// QEMU resends SET_VRING_ADDR to running rings when it turns logging on and off. The stock
/// handler re-read the used index there, racing the queue's worker: a completion landing in
/// between was overwritten. Hammer it while requests complete; every one must be answered once.
#[test]
fn set_vring_addr_on_a_running_ring_loses_no_completion() {
    let d = daemon(&[]);
    let mut q = TestQueue::new();
    let fe = q.connect(&d.socket, LOGGING, 0);
    let (on, off) = (q.vring_addr(true), q.vring_addr(false));
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut done = 0u16;
    std::thread::scope(|scope| {
        // QEMU's control thread flipping the log flag, as fast as the daemon answers.
        let hammer = scope.spawn(|| {
            let mut flips = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let config = if flips.is_multiple_of(2) { &on } else { &off };
                fe.frontend.set_vring_addr(0, config).unwrap();
                flips += 1;
            }
            flips
        });
        for round in 0..200u16 {
            let n = MAX_REQUESTS;
            for k in 0..n {
                q.submit(
                    k,
                    VIRTIO_BLK_T_IN,
                    u64::from(k) * 8,
                    DATA_GPA + u64::from(k) * PAGE,
                    4096,
                );
            }
            fe.kick();
            done = done.wrapping_add(n);
            let answered = q.wait_used(done, WAIT);
            if !answered {
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                panic!(
                    "round {round}: the used index reached {} of {done}",
                    q.used_idx()
                );
            }
            let mut seen = BTreeSet::new();
            for i in done.wrapping_sub(n)..done {
                let (k, len) = q.used_entry(i);
                assert!(seen.insert(k), "round {round}: request {k} answered twice");
                assert_eq!(len, 4097, "read data plus status byte");
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let flips = hammer.join().unwrap();
        assert!(
            flips > 100,
            "only {flips} SET_VRING_ADDR while requests ran"
        );
    });
}

/// A live migration on one host: the destination connects while the source runs; while the
/// source is migrating (LOG_ALL on) the destination's requests wait; once the source stops
/// its device they run, and the destination reads what the source wrote.
#[test]
fn the_destination_waits_for_the_migrating_source_then_takes_over() {
    let d = daemon(&[]);
    let mut source = TestQueue::new();
    let src = source.connect(&d.socket, LOGGING, 0);
    let mut pattern = vec![0u8; 65536];
    fill_pattern(&mut pattern, 0, 33);
    source.mem.write(DATA_GPA, &pattern);
    source.submit(0, VIRTIO_BLK_T_OUT, 0, DATA_GPA, 65536);
    src.kick();
    assert!(source.wait_used(1, WAIT));
    let log = DirtyLog::new();
    src.set_log(&log);
    src.set_log_all(true);

    let mut destination = TestQueue::new();
    let dst = destination.connect(&d.socket, FrontendOptions::default(), 0);
    d.wait_for_log("a second frontend connected while session 1 is attached");
    destination.submit(0, VIRTIO_BLK_T_IN, 0, DATA_GPA, 65536);
    dst.kick();
    assert!(
        !destination.wait_used(1, Duration::from_millis(500)),
        "the destination did I/O while the source still ran"
    );
    d.wait_for_log("its requests wait for the hand-over");
    // The source keeps working meanwhile.
    source.submit(1, VIRTIO_BLK_T_IN, 0, DATA_GPA + 0x20000, 4096);
    src.kick();
    assert!(source.wait_used(2, WAIT));

    assert_eq!(src.stop(), 2);
    d.wait_for_log("the image passes to the destination");
    assert!(
        destination.wait_used(1, WAIT),
        "the destination was not woken at the hand-over"
    );
    assert_eq!(destination.status(0), 0);
    check_pattern(&destination.mem.read(DATA_GPA, 65536), 0, 33).unwrap();
    drop(src);
    d.wait_for_log("frontend disconnected");
}
