//! What a failing disk does to guardblk, through a real kernel path: the image lives behind a
//! FUSE filesystem (tests/common/fusefs.rs) that tears and fails chosen writes (EIO, ENOSPC),
//! fails reads and fsyncs. Every fault must fail exactly the request that met it, keep the
//! daemon serving, leave no false guard error behind, and leave an image that scrubs clean.

mod common;

use common::frontend::*;
use common::fusefs::FuseImage;
use common::*;

const MIB: u64 = 1 << 20;
const BLOCK: usize = 4096;
/// The block the faults hit (byte offset 1 MiB), and one they do not.
const HIT_SECTOR: u64 = MIB / 512;
const MISS_SECTOR: u64 = 3 * MIB / 512;
const HIT_RANGE: std::ops::Range<u64> = MIB..MIB + BLOCK as u64;

fn block(sector: u64, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; BLOCK];
    fill_pattern(&mut data, sector * 512, seed);
    data
}

fn counter(image: &FuseImage, name: &str) -> u64 {
    image.daemon().stats()["counters"][name].as_u64().unwrap()
}

fn a_failed_write(errno: i32) {
    let mut image = FuseImage::new(8 * MIB);
    let mut io = SyncIo::connect(&image.daemon().socket);
    assert_eq!(io.write(HIT_SECTOR, &block(HIT_SECTOR, 1)), 0);
    assert_eq!(io.flush(), 0);

    image.fs.fail_writes(HIT_RANGE, errno);
    assert_eq!(
        io.write(HIT_SECTOR, &block(HIT_SECTOR, 2)),
        1,
        "a torn write completed OK"
    );
    // Only that request: a write elsewhere, and a read of the failed block, still work.
    assert_eq!(io.write(MISS_SECTOR, &block(MISS_SECTOR, 3)), 0);
    image.fs.heal();
    let (status, data) = io.read(HIT_SECTOR, BLOCK as u32);
    assert_eq!(
        status, 0,
        "the block a write failed on reads with an error (false guard error?)"
    );
    // It holds what the disk holds: the torn mix, which the guest was told did not succeed.
    assert_eq!(data, image.fs.backing_bytes(MIB, BLOCK));
    assert!(
        data[..BLOCK / 2] == block(HIT_SECTOR, 2)[..BLOCK / 2]
            && data[BLOCK / 2..] == block(HIT_SECTOR, 1)[BLOCK / 2..],
        "the write was not torn as the filesystem was told to"
    );
    let (status, data) = io.read(MISS_SECTOR, BLOCK as u32);
    assert_eq!((status, data), (0, block(MISS_SECTOR, 3)));
    // A new write over it succeeds and sticks.
    assert_eq!(io.write(HIT_SECTOR, &block(HIT_SECTOR, 4)), 0);
    assert_eq!(io.read(HIT_SECTOR, BLOCK as u32), (0, block(HIT_SECTOR, 4)));
    assert_eq!(io.flush(), 0);
    assert_eq!(counter(&image, "guard_errors"), 0);
    assert_eq!(counter(&image, "io_errors"), 1);
    drop(io);
    image.stop_and_assert_scrub_clean();
}

#[test]
fn a_torn_write_failing_with_eio_fails_only_that_request() {
    a_failed_write(libc::EIO);
}

#[test]
fn a_torn_write_failing_with_enospc_fails_only_that_request() {
    a_failed_write(libc::ENOSPC);
}

#[test]
fn a_failed_read_is_an_io_error_not_a_guard_error() {
    let mut image = FuseImage::new(8 * MIB);
    let mut io = SyncIo::connect(&image.daemon().socket);
    assert_eq!(io.write(HIT_SECTOR, &block(HIT_SECTOR, 5)), 0);
    image.fs.fail_reads(HIT_RANGE, libc::EIO);
    assert_eq!(io.read(HIT_SECTOR, BLOCK as u32).0, 1);
    // Neighbours read fine meanwhile.
    assert_eq!(io.read(MISS_SECTOR, BLOCK as u32).0, 0);
    image.fs.heal();
    assert_eq!(io.read(HIT_SECTOR, BLOCK as u32), (0, block(HIT_SECTOR, 5)));
    assert_eq!(
        counter(&image, "guard_errors"),
        0,
        "a failed read was reported as corruption"
    );
    assert_eq!(counter(&image, "io_errors"), 1);
    drop(io);
    image.stop_and_assert_scrub_clean();
}

/// fsyncgate: a flush that failed must not be forgotten. The next flush asks the disk again
/// (never "nothing written since, so OK"), and data written before the failure reads back.
#[test]
fn a_failed_flush_is_reported_and_the_next_flush_asks_the_disk_again() {
    let mut image = FuseImage::new(8 * MIB);
    let mut io = SyncIo::connect(&image.daemon().socket);
    assert_eq!(io.write(HIT_SECTOR, &block(HIT_SECTOR, 6)), 0);
    image.fs.fail_fsyncs(1);
    assert_eq!(
        io.flush(),
        1,
        "a failed fsync was reported as a successful flush"
    );
    let before = image.fs.fsyncs();
    assert_eq!(io.flush(), 0);
    assert!(
        image.fs.fsyncs() > before,
        "the flush after a failure did not reach the disk"
    );
    assert_eq!(io.read(HIT_SECTOR, BLOCK as u32), (0, block(HIT_SECTOR, 6)));
    drop(io);
    image.stop_and_assert_scrub_clean();
}

/// A write fails torn and the block cannot be read back at that moment either, so its tuples
/// cannot be re-derived then. Once the disk reads again, the first read of the block re-derives
/// them: no guard error for content the guest was told may be anything.
#[test]
fn a_write_that_fails_unreadable_is_re_derived_by_the_first_read_that_works() {
    let mut image = FuseImage::new(8 * MIB);
    let mut io = SyncIo::connect(&image.daemon().socket);
    assert_eq!(io.write(HIT_SECTOR, &block(HIT_SECTOR, 1)), 0);
    image.fs.fail_writes(HIT_RANGE, libc::EIO);
    image.fs.fail_reads(HIT_RANGE, libc::EIO);
    assert_eq!(io.write(HIT_SECTOR, &block(HIT_SECTOR, 2)), 1);
    image.daemon().wait_for_log("stays marked for recovery");
    image.fs.heal();
    let (status, data) = io.read(HIT_SECTOR, BLOCK as u32);
    assert_eq!(status, 0, "the torn block was reported as corrupt");
    assert_eq!(data, image.fs.backing_bytes(MIB, BLOCK));
    assert_eq!(counter(&image, "guard_errors"), 0);
    image
        .daemon()
        .wait_for_log("re-derived the tuples of a range whose write had failed");
    drop(io);
    image.stop_and_assert_scrub_clean();
}

/// The same failed write, never read again: its write intent must survive flushes and a
/// crash, so the restarted daemon re-derives the block (a flush that cleared it would leave a
/// tuple that no longer matches the torn data: a false guard error after the restart).
#[test]
fn a_write_that_fails_unreadable_keeps_its_intent_through_flushes_and_a_crash() {
    let mut image = FuseImage::new(8 * MIB);
    {
        let mut io = SyncIo::connect(&image.daemon().socket);
        assert_eq!(io.write(HIT_SECTOR, &block(HIT_SECTOR, 1)), 0);
        image.fs.fail_writes(HIT_RANGE, libc::EIO);
        image.fs.fail_reads(HIT_RANGE, libc::EIO);
        assert_eq!(io.write(HIT_SECTOR, &block(HIT_SECTOR, 2)), 1);
        image.fs.heal();
        // Flushes a second apart: each may clear intents of regions idle since the last.
        for _ in 0..3 {
            std::thread::sleep(std::time::Duration::from_millis(1100));
            assert_eq!(io.flush(), 0);
        }
    }
    image.kill_and_restart();
    let recovery = image.daemon().stats()["recovery"].clone();
    assert!(
        recovery["dirty_regions"].as_u64().unwrap_or(0) > 0,
        "the failed write's intent was cleared before the crash: {recovery}"
    );
    let mut io = SyncIo::connect(&image.daemon().socket);
    let (status, data) = io.read(HIT_SECTOR, BLOCK as u32);
    assert_eq!(status, 0, "false guard error after the restart");
    assert_eq!(data, image.fs.backing_bytes(MIB, BLOCK));
    assert_eq!(counter(&image, "guard_errors"), 0);
    drop(io);
    image.stop_and_assert_scrub_clean();
}

/// A guest that reuses descriptor heads still in flight can present more requests than its
/// ring holds. The daemon keeps at most a ring's worth in flight (the rest wait in the ring)
/// instead of growing its tables without bound, and answers all of them in the end.
#[test]
fn requests_in_flight_never_exceed_the_ring() {
    let image = FuseImage::new(8 * MIB);
    let mut q = TestQueue::new();
    let fe = q.connect(&image.daemon().socket, FrontendOptions::default(), 0);
    image
        .fs
        .slow_reads(0..8 * MIB, std::time::Duration::from_secs(2));
    let rounds = 4u16;
    let mut most = 0u64;
    for round in 0..rounds {
        for k in 0..MAX_REQUESTS {
            let sector = u64::from(round * MAX_REQUESTS + k) * 8;
            q.submit(
                k,
                VIRTIO_BLK_T_IN,
                sector,
                DATA_GPA + u64::from(k) * PAGE,
                BLOCK as u32,
            );
        }
        fe.kick();
        std::thread::sleep(std::time::Duration::from_millis(150));
        most = most.max(counter(&image, "in_flight"));
    }
    let total = rounds * MAX_REQUESTS;
    assert!(
        most <= u64::from(QUEUE_SIZE),
        "{most} requests in flight on a ring of {QUEUE_SIZE}"
    );
    assert!(
        most >= 200,
        "only {most} in flight: the load did not reach the cap"
    );
    image
        .daemon()
        .wait_for_log("more requests in flight than its ring has descriptors");
    image.fs.fast_reads();
    assert!(
        q.wait_used(total, std::time::Duration::from_secs(60)),
        "only {} of {total} answered",
        q.used_idx()
    );
}

/// A guest that sends nothing but bad requests gets each one answered (UNSUPP) and counted,
/// while the host's log gets a few lines a second saying how many were left out.
#[test]
fn a_flood_of_bad_requests_is_counted_in_full_and_logged_a_few_times_a_second() {
    let d = Daemon::start(4 * MIB, &[]);
    let mut q = TestQueue::new();
    let fe = q.connect(&d.socket, FrontendOptions::default(), 0);
    let rounds = 12u16;
    let started = std::time::Instant::now();
    for round in 1..=rounds {
        for k in 0..MAX_REQUESTS {
            q.submit(k, 99, 0, DATA_GPA, 512); // no such request type
        }
        fe.kick();
        assert!(q.wait_used(round * MAX_REQUESTS, std::time::Duration::from_secs(10)));
    }
    let seconds = started.elapsed().as_secs() + 1;
    let total = u64::from(rounds * MAX_REQUESTS);
    assert!(
        (0..MAX_REQUESTS).all(|k| q.status(k) == 2),
        "not answered UNSUPP"
    );
    let stats = d.stats();
    assert_eq!(stats["counters"]["rejected"], total, "{stats}");
    let lines = d.log_count("rejected guest request");
    assert!(lines >= 1, "no rejection logged at all");
    assert!(
        lines as u64 <= 5 * (seconds + 1),
        "{lines} log lines for {total} rejections in {seconds} s"
    );
}

/// Scrub what actually reached the disks behind both FUSE mounts (the backing files), not
/// what the page cache shows: a tuple whose write-back failed is in the mapping but not there.
fn assert_backing_scrubs_clean(image: &mut FuseImage) {
    let meta_fs = image.meta_fs.as_ref().unwrap();
    let scrub = guardblk(&[
        "scrub",
        image.fs.backing().to_str().unwrap(),
        "--pi-meta",
        meta_fs.backing().to_str().unwrap(),
    ]);
    assert!(
        scrub.status.success(),
        "what reached the disks does not scrub clean: {}\n{}",
        String::from_utf8_lossy(&scrub.stdout),
        String::from_utf8_lossy(&scrub.stderr)
    );
}

/// The metadata's file system fails an fsync: the flush that needed it fails, and the next
/// flush asks that file system again (a failed sync is no proof the tuples are safe).
#[test]
fn a_failed_metadata_sync_fails_the_flush_and_the_next_flush_syncs_it_again() {
    let mut image = FuseImage::with_metadata_on_fuse(8 * MIB);
    let mut io = SyncIo::connect(&image.daemon().socket);
    assert_eq!(io.write(HIT_SECTOR, &block(HIT_SECTOR, 21)), 0);
    let meta_fs = image.meta_fs.as_ref().unwrap();
    meta_fs.fail_fsyncs(1);
    assert_eq!(
        io.flush(),
        1,
        "a failed metadata sync was reported as a successful flush"
    );
    let before = meta_fs.fsyncs();
    assert_eq!(io.flush(), 0);
    assert!(
        meta_fs.fsyncs() > before,
        "the flush after a failed metadata sync did not sync the metadata"
    );
    assert_eq!(
        io.read(HIT_SECTOR, BLOCK as u32),
        (0, block(HIT_SECTOR, 21))
    );
    assert_eq!(io.read(MISS_SECTOR, BLOCK as u32).0, 0);
    drop(io);
    image.stop_and_assert_scrub_clean();
    assert_backing_scrubs_clean(&mut image);
}

/// The metadata's file system fails the write-back of the page holding a new tuple. The
/// kernel marks such a page clean (its content now only in memory): a later sync finds
/// nothing dirty and succeeds. The flush that met the failure fails; the next one must write
/// the tuples out again rather than report OK over a tuple the disk never got (fsyncgate).
#[test]
fn a_failed_metadata_write_back_fails_the_flush_and_the_next_flush_writes_it_again() {
    let mut image = FuseImage::with_metadata_on_fuse(8 * MIB);
    let mut io = SyncIo::connect(&image.daemon().socket);
    assert_eq!(io.write(HIT_SECTOR, &block(HIT_SECTOR, 22)), 0);
    let meta_fs = image.meta_fs.as_ref().unwrap();
    meta_fs.fail_writes(0..u64::MAX, libc::EIO);
    assert_eq!(
        io.flush(),
        1,
        "a failed metadata write-back was reported as a successful flush"
    );
    meta_fs.heal();
    assert_eq!(io.flush(), 0);
    assert_eq!(
        io.read(HIT_SECTOR, BLOCK as u32),
        (0, block(HIT_SECTOR, 22))
    );
    drop(io);
    image.stop_and_assert_scrub_clean();
    assert_backing_scrubs_clean(&mut image);
}

/// The journal's disk fails while a real guard error is found: the read still fails with an
/// I/O error and is counted, the daemon keeps serving, and the record is not lost: it is
/// written by the first flush after the disk works again.
#[test]
fn a_guard_error_found_while_the_journal_cannot_be_written_fails_and_is_journalled_later() {
    use std::os::unix::fs::FileExt;
    let mut image = FuseImage::new(8 * MIB);
    let mut io = SyncIo::connect(&image.daemon().socket);
    assert_eq!(io.write(HIT_SECTOR, &block(HIT_SECTOR, 30)), 0);
    assert_eq!(io.write(MISS_SECTOR, &block(MISS_SECTOR, 31)), 0);
    assert_eq!(io.flush(), 0);
    // Corrupt the block beneath FUSE, behind the daemon's back.
    let disk = std::fs::OpenOptions::new()
        .write(true)
        .open(image.fs.backing())
        .unwrap();
    let byte = image.fs.backing_bytes(MIB + 100, 1)[0];
    disk.write_all_at(&[!byte], MIB + 100).unwrap();

    image.fs.fail_other_files(libc::EIO);
    assert_eq!(
        io.read(HIT_SECTOR, BLOCK as u32).0,
        1,
        "corrupt data was returned while the journal failed"
    );
    assert_eq!(counter(&image, "guard_errors"), 1);
    // The daemon keeps serving.
    assert_eq!(
        io.read(MISS_SECTOR, BLOCK as u32),
        (0, block(MISS_SECTOR, 31))
    );
    assert_eq!(io.write(MISS_SECTOR, &block(MISS_SECTOR, 32)), 0);
    let journal_beneath = journal_path(image.fs.backing());
    let guard_records = || {
        journal_records(image.fs.backing())
            .into_iter()
            .filter(|r| r["event"] == "guard_error" && r["lba"] == 256)
            .count()
    };
    assert_eq!(
        guard_records(),
        0,
        "{} was written while its disk failed",
        journal_beneath.display()
    );

    image.fs.heal();
    assert_eq!(io.flush(), 0);
    assert_eq!(
        guard_records(),
        1,
        "the guard error's record was lost when the journal failed"
    );
    // The guest repairs the block.
    assert_eq!(io.write(HIT_SECTOR, &block(HIT_SECTOR, 33)), 0);
    assert_eq!(
        io.read(HIT_SECTOR, BLOCK as u32),
        (0, block(HIT_SECTOR, 33))
    );
    drop(io);
    image.stop_and_assert_scrub_clean();
}
