//! Requests in flight across a daemon crash, seen from a frontend that keeps many in flight
//! and completes them out of order — what QEMU under TCG almost never produces. The image sits
//! on a FUSE filesystem (tests/common/fusefs.rs) whose replies to some writes come seconds
//! late: those writes have reached the disk, but the daemon has not seen them finish (their PI
//! tuples not stored, their write intents still set) when it is killed. With the in-flight
//! region (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) the restarted daemon must answer every request
//! exactly once; without it, QEMU's rewind of the avail index to the used index answers some
//! twice and others never, which the control shows.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::frontend::*;
use common::fusefs::FuseImage;
use common::*;

const MIB: u64 = 1 << 20;
const REQUESTS: u16 = 64;
/// Requests whose writes are slow: one in sixteen, spread over the ring.
const SLOW_EVERY: u16 = 16;
/// Slow writes go to [4 MiB, 5 MiB); fast reads come from the first MiB.
const SLOW_SECTOR: u64 = 4 * MIB / 512;
const WAIT: Duration = Duration::from_secs(15);

fn is_slow(k: u16) -> bool {
    k.is_multiple_of(SLOW_EVERY)
}

fn slow_sector(k: u16) -> u64 {
    SLOW_SECTOR + u64::from(k) * 8
}

/// What the frontend saw after the restart: how often each request was answered.
struct Outcome {
    answered: BTreeMap<u16, usize>,
    used_idx: u16,
}

impl Outcome {
    fn twice(&self) -> Vec<u16> {
        self.answered
            .iter()
            .filter(|(_, &n)| n > 1)
            .map(|(&k, _)| k)
            .collect()
    }

    fn never(&self) -> Vec<u16> {
        (0..REQUESTS)
            .filter(|k| !self.answered.contains_key(k))
            .collect()
    }
}

/// 64 requests in flight (slow writes among fast reads), the fast ones answered first, the
/// daemon killed while the slow ones are still running, restarted, and the frontend back as
/// QEMU comes back: with the same region if it has one, and the ring's base at the used index.
fn crash_with_requests_in_flight(
    setup: &mut FuseImage,
    q: &mut TestQueue,
    inflight: bool,
) -> Outcome {
    let options = FrontendOptions {
        inflight,
        ..Default::default()
    };
    let fe = q.connect(&setup.daemon().socket, options, 0);
    setup.fs.slow_writes(
        SLOW_SECTOR * 512..SLOW_SECTOR * 512 + MIB,
        Duration::from_secs(4),
    );
    for k in 0..REQUESTS {
        let buffer = DATA_GPA + u64::from(k) * PAGE;
        if is_slow(k) {
            let mut data = vec![0u8; PAGE as usize];
            fill_pattern(&mut data, slow_sector(k) * 512, 40);
            q.mem.write(buffer, &data);
            q.submit(k, VIRTIO_BLK_T_OUT, slow_sector(k), buffer, PAGE as u32);
        } else {
            q.submit(k, VIRTIO_BLK_T_IN, u64::from(k) * 8, buffer, PAGE as u32);
        }
    }
    fe.kick();
    let fast = REQUESTS - REQUESTS / SLOW_EVERY;
    assert!(
        q.wait_used(fast, WAIT),
        "the fast reads were not answered: used index {} of {fast}; daemon log:\n{}",
        q.used_idx(),
        setup.daemon().log_text()
    );
    // Out of order: every later read is answered while the earlier writes still run.
    for k in (0..REQUESTS).filter(|&k| is_slow(k)) {
        assert_eq!(q.status(k), 0xff, "slow write {k} finished before the kill");
    }
    assert_eq!(q.used_idx(), fast);
    drop(fe);
    setup.kill_and_restart();
    setup.fs.fast_writes();

    // QEMU could not ask the dead daemon for the ring's base: it uses the used index.
    let base = q.used_idx();
    let fe = q.connect(&setup.daemon().socket, options, base);
    fe.kick();
    // Wait for everything that will come, then a little more for anything answered twice.
    q.wait_used(REQUESTS, Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(300));
    let used_idx = q.used_idx();
    let mut answered = BTreeMap::new();
    for i in 0..used_idx {
        *answered.entry(q.used_entry(i).0).or_insert(0) += 1;
    }
    drop(fe);
    Outcome { answered, used_idx }
}

#[test]
fn every_request_in_flight_at_a_kill_is_answered_once_and_pi_stays_exact() {
    let mut setup = FuseImage::new(8 * MIB);
    let mut q = TestQueue::new();
    let outcome = crash_with_requests_in_flight(&mut setup, &mut q, true);
    assert_eq!(outcome.twice(), Vec::<u16>::new(), "answered twice");
    assert_eq!(outcome.never(), Vec::<u16>::new(), "never answered");
    assert_eq!(outcome.used_idx, REQUESTS);
    for k in 0..REQUESTS {
        assert_eq!(q.status(k), 0, "request {k}");
    }
    let d = setup.daemon();
    d.wait_for_log("recovered the requests a previous daemon left in flight");
    assert_eq!(
        d.stats()["counters"]["requests_resubmitted"],
        u64::from(REQUESTS / SLOW_EVERY),
        "the slow writes, and only they, were resubmitted"
    );
    // The killed daemon's writes were on disk with their intents still set: the restart
    // re-derived their tuples, then the resubmitted writes stored them again.
    let recovery = &d.stats()["recovery"];
    assert!(
        recovery["dirty_regions"].as_u64().unwrap_or(0) > 0,
        "the restart found no write intents: {recovery}"
    );

    // Read the written blocks back through the daemon (request slots past the first 64).
    let fe = q.connect(
        &d.socket,
        FrontendOptions {
            inflight: true,
            ..Default::default()
        },
        REQUESTS,
    );
    let slow: Vec<u16> = (0..REQUESTS).filter(|&k| is_slow(k)).collect();
    for (i, &k) in slow.iter().enumerate() {
        let slot = REQUESTS + i as u16;
        q.submit(
            slot,
            VIRTIO_BLK_T_IN,
            slow_sector(k),
            DATA_GPA + u64::from(slot) * PAGE,
            PAGE as u32,
        );
    }
    fe.kick();
    assert!(q.wait_used(REQUESTS + slow.len() as u16, WAIT));
    for (i, &k) in slow.iter().enumerate() {
        let slot = REQUESTS + i as u16;
        assert_eq!(
            q.status(slot),
            0,
            "read-back of write {k}: guard error or I/O error"
        );
        let data = q.mem.read(DATA_GPA + u64::from(slot) * PAGE, PAGE as usize);
        check_pattern(&data, slow_sector(k) * 512, 40).unwrap();
    }
    drop(fe);
    let scrub = setup.stop_and_scrub();
    assert!(scrub.status.success(), "scrub not clean: {scrub:?}");
}

/// The control: the same crash without the in-flight region. QEMU's rewind re-pops the ring
/// from the used index, so requests answered before the kill are answered again and the
/// writes that were in flight are never answered — the test above would see both.
#[test]
fn without_the_region_the_restart_answers_twice_and_loses_requests() {
    let mut setup = FuseImage::new(8 * MIB);
    let mut q = TestQueue::new();
    let outcome = crash_with_requests_in_flight(&mut setup, &mut q, false);
    let never = outcome.never();
    let twice = outcome.twice();
    assert!(
        !twice.is_empty() && never.iter().all(|&k| is_slow(k)) && !never.is_empty(),
        "expected double answers and lost writes without the region; twice {twice:?}, never {never:?}"
    );
}
