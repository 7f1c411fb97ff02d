//! End-to-end tests: the real daemon binary driven by libblkio (virtio-blk-vhost-user).

mod common;

use blkio::ReqFlags;
use common::*;

const MIB: u64 = 1 << 20;

#[test]
fn pattern_write_read_verify_across_the_whole_disk_io_uring() {
    pattern_write_read_verify_across_the_whole_disk("io-uring");
}

#[test]
fn pattern_write_read_verify_across_the_whole_disk_inline() {
    pattern_write_read_verify_across_the_whole_disk("inline");
}

fn pattern_write_read_verify_across_the_whole_disk(engine: &str) {
    let size = 64 * MIB;
    let d = Daemon::start(size, &["--queues", "1", "--io-engine", engine]);
    d.wait_for_log(&format!("io_engine={}", engine.replace('-', "_")));
    let chunk = MIB as usize;
    let depth = 8usize;
    let mut c = Client::connect(&d.socket, 1, chunk * depth).unwrap();
    assert_eq!(c.capacity(), size);
    let mut offset = 0u64;
    while offset < size {
        for slot in 0..depth {
            let disk_off = offset + (slot * chunk) as u64;
            fill_pattern(&mut c.buf()[slot * chunk..(slot + 1) * chunk], disk_off, 1);
            let ptr = c.buf_ptr(slot * chunk);
            c.queues[0].write(disk_off, ptr, chunk, slot, ReqFlags::empty());
        }
        for (slot, ret) in wait_all(&mut c.queues[0], depth) {
            assert_eq!(ret, 0, "write of slot {slot} failed");
        }
        offset += (chunk * depth) as u64;
    }
    c.buf().fill(0);
    let mut offset = 0u64;
    while offset < size {
        for slot in 0..depth {
            let ptr = c.buf_ptr(slot * chunk);
            c.queues[0].read(
                offset + (slot * chunk) as u64,
                ptr,
                chunk,
                slot,
                ReqFlags::empty(),
            );
        }
        for (slot, ret) in wait_all(&mut c.queues[0], depth) {
            assert_eq!(ret, 0, "read of slot {slot} failed");
        }
        for slot in 0..depth {
            let disk_off = offset + (slot * chunk) as u64;
            check_pattern(&c.buf()[slot * chunk..(slot + 1) * chunk], disk_off, 1).unwrap();
        }
        offset += (chunk * depth) as u64;
    }
    // The bytes really are in the image file, where the guest put them.
    let on_disk = std::fs::read(&d.image).unwrap();
    check_pattern(&on_disk, 0, 1).unwrap();
}

#[test]
fn flush_succeeds_and_data_survives_a_daemon_restart() {
    let mut d = Daemon::start(16 * MIB, &[]);
    let mut c = Client::connect(&d.socket, 1, 65536).unwrap();
    fill_pattern(&mut c.buf()[..65536], 4 * MIB, 2);
    assert_eq!(write(&mut c, 0, 4 * MIB, 0, 65536), 0);
    c.queues[0].flush(0, ReqFlags::empty());
    assert_eq!(wait_all(&mut c.queues[0], 1)[0].1, 0);
    drop(c);
    assert!(d.terminate().success());
    let on_disk = std::fs::read(&d.image).unwrap();
    check_pattern(
        &on_disk[4 * MIB as usize..4 * MIB as usize + 65536],
        4 * MIB,
        2,
    )
    .unwrap();
}

#[test]
fn discard_and_write_zeroes_read_back_as_zeros_without_touching_neighbours() {
    // ext4 zeroes ranges natively; tmpfs cannot (EOPNOTSUPP), exercising the fallbacks.
    discard_and_write_zeroes_on(&std::env::temp_dir());
    if std::path::Path::new("/dev/shm").is_dir() {
        discard_and_write_zeroes_on(std::path::Path::new("/dev/shm"));
    }
}

fn discard_and_write_zeroes_on(base: &std::path::Path) {
    let d = Daemon::start_in(base, 16 * MIB, &[]);
    let len = 4 * MIB as usize;
    let mut c = Client::connect(&d.socket, 1, len).unwrap();
    fill_pattern(c.buf(), 0, 3);
    assert_eq!(write(&mut c, 0, 0, 0, len), 0);

    c.queues[0].discard(MIB, MIB, 0, ReqFlags::empty());
    assert_eq!(wait_all(&mut c.queues[0], 1)[0].1, 0);
    c.queues[0].write_zeroes(3 * MIB, 512 * 1024, 0, ReqFlags::empty());
    assert_eq!(wait_all(&mut c.queues[0], 1)[0].1, 0);
    // Keep the allocation (no UNMAP) for a second range, too.
    c.queues[0].write_zeroes(2 * MIB + 4096, 8192, 0, ReqFlags::NO_UNMAP);
    assert_eq!(wait_all(&mut c.queues[0], 1)[0].1, 0);

    c.buf().fill(0xAA);
    assert_eq!(read(&mut c, 0, 0, 0, len), 0);
    let buf = c.buf().to_vec();
    let m = MIB as usize;
    check_pattern(&buf[..m], 0, 3).unwrap();
    assert!(
        buf[m..2 * m].iter().all(|&b| b == 0),
        "discarded range is not zero"
    );
    check_pattern(&buf[2 * m..2 * m + 4096], 2 * MIB, 3).unwrap();
    assert!(
        buf[2 * m + 4096..2 * m + 12288].iter().all(|&b| b == 0),
        "write-zeroes (no unmap) range is not zero"
    );
    check_pattern(&buf[2 * m + 12288..3 * m], 2 * MIB + 12288, 3).unwrap();
    assert!(
        buf[3 * m..3 * m + m / 2].iter().all(|&b| b == 0),
        "write-zeroes range is not zero"
    );
    check_pattern(&buf[3 * m + m / 2..], 3 * MIB + MIB / 2, 3).unwrap();
}

#[test]
fn reads_and_writes_past_the_end_fail_and_are_logged() {
    let d = Daemon::start(MIB, &[]);
    let mut c = Client::connect(&d.socket, 1, 8192).unwrap();
    assert!(
        read(&mut c, 0, MIB, 0, 4096) < 0,
        "read past the end succeeded"
    );
    assert!(
        read(&mut c, 0, MIB - 4096, 0, 8192) < 0,
        "read straddling the end succeeded"
    );
    assert!(
        write(&mut c, 0, MIB, 0, 4096) < 0,
        "write past the end succeeded"
    );
    // The last block itself is fine.
    assert_eq!(read(&mut c, 0, MIB - 4096, 0, 4096), 0);
    d.wait_for_log("rejected guest request");
    assert!(
        d.log_text().contains("past the disk"),
        "log does not say why:\n{}",
        d.log_text()
    );
    assert_eq!(
        std::fs::metadata(&d.image).unwrap().len(),
        MIB,
        "the image grew"
    );
}

#[test]
fn four_queues_at_once() {
    let size = 32 * MIB;
    let d = Daemon::start(size, &["--queues", "4"]);
    let c = Client::connect(&d.socket, 4, 4 * 2 * MIB as usize).unwrap();
    let region_base = c.region.addr;
    let Client {
        queues,
        blkio,
        region,
    } = c;
    let handles: Vec<_> = queues
        .into_iter()
        .enumerate()
        .map(|(qi, mut q)| {
            std::thread::spawn(move || {
                // Each queue owns 8 MiB of the disk and 2 MiB of the buffer region.
                let buf = (region_base + qi * 2 * MIB as usize) as *mut u8;
                // SAFETY: disjoint 2 MiB slices of one live mapping, one per thread.
                let slice = unsafe { std::slice::from_raw_parts_mut(buf, 2 * MIB as usize) };
                let disk_base = qi as u64 * 8 * MIB;
                let depth = 32;
                let bs = 64 * 1024;
                for pass in 0..4u64 {
                    for i in 0..depth {
                        let off = disk_base + pass * 2 * MIB + (i * bs) as u64;
                        fill_pattern(&mut slice[i * bs..(i + 1) * bs], off, 4);
                        q.write(off, slice[i * bs..].as_ptr(), bs, i, ReqFlags::empty());
                    }
                    assert!(
                        wait_all(&mut q, depth).iter().all(|(_, r)| *r == 0),
                        "queue {qi} write failed"
                    );
                }
                slice.fill(0);
                for pass in 0..4u64 {
                    for i in 0..depth {
                        let off = disk_base + pass * 2 * MIB + (i * bs) as u64;
                        q.read(off, slice[i * bs..].as_mut_ptr(), bs, i, ReqFlags::empty());
                    }
                    assert!(
                        wait_all(&mut q, depth).iter().all(|(_, r)| *r == 0),
                        "queue {qi} read failed"
                    );
                    for i in 0..depth {
                        let off = disk_base + pass * 2 * MIB + (i * bs) as u64;
                        check_pattern(&slice[i * bs..(i + 1) * bs], off, 4).unwrap();
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    drop((blkio, region));
    let on_disk = std::fs::read(&d.image).unwrap();
    check_pattern(&on_disk, 0, 4).unwrap();
}

#[test]
fn read_only_disk_refuses_writes_but_serves_reads() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("ro.img");
    let mut content = vec![0u8; MIB as usize];
    fill_pattern(&mut content, 0, 5);
    std::fs::write(&image, &content).unwrap();
    let d = Daemon::serve(dir, image, &["--read-only"]);
    // libblkio refuses a read-write connection to a disk that advertises VIRTIO_BLK_F_RO.
    let err = Client::connect(&d.socket, 1, 65536)
        .err()
        .expect("read-write attach to a read-only disk");
    assert!(err.message().contains("read-only"), "{}", err.message());
    d.wait_for_log("frontend disconnected");
    let mut c = Client::connect_with(&d.socket, 1, 65536, true).unwrap();
    assert_eq!(read(&mut c, 0, 65536, 0, 65536), 0);
    check_pattern(&c.buf()[..65536], 65536, 5).unwrap();
    c.buf().fill(0x55);
    // libblkio refuses writes to a read-only device itself; the daemon-side refusal of a
    // write is covered by the parser's unit tests. Either way nothing may reach the image.
    assert!(
        write(&mut c, 0, 0, 0, 4096) < 0,
        "write to a read-only disk succeeded"
    );
    drop(c);
    assert_eq!(
        std::fs::read(&d.image).unwrap(),
        content,
        "read-only image changed"
    );
}

#[test]
fn a_second_guest_gets_io_errors_while_the_first_runs_and_a_third_is_refused() {
    let d = Daemon::start(8 * MIB, &[]);
    let mut first = Client::connect(&d.socket, 1, 65536).unwrap();
    fill_pattern(&mut first.buf()[..65536], MIB, 6);
    assert_eq!(write(&mut first, 0, MIB, 0, 65536), 0);

    // A second frontend is served beside the first (that is how a live migration's
    // destination attaches), but while the first guest runs and is not migrating, every
    // request of the second fails and nothing of it reaches the image...
    let mut second = Client::connect(&d.socket, 1, 65536).unwrap();
    d.wait_for_log("a second frontend connected while session 1 is attached");
    second.buf().fill(0x77);
    assert!(
        write(&mut second, 0, MIB, 0, 65536) < 0,
        "a second guest wrote the disk while the first ran"
    );
    assert!(read(&mut second, 0, MIB, 0, 65536) < 0);
    d.wait_for_log("a second guest started its device while session 1");
    // ...a third is turned away...
    assert!(
        Client::connect(&d.socket, 1, 4096).is_err(),
        "a third concurrent frontend was accepted"
    );
    d.wait_for_log("refused a third frontend");
    // ...and the first keeps working, its data intact.
    assert_eq!(read(&mut first, 0, MIB, 0, 65536), 0);
    check_pattern(&first.buf()[..65536], MIB, 6).unwrap();
    drop(first);
    d.wait_for_log("frontend disconnected");

    // Once the first has left, the second has the disk.
    assert_eq!(read(&mut second, 0, MIB, 0, 65536), 0);
    check_pattern(&second.buf()[..65536], MIB, 6).unwrap();
    drop(second);
    for round in 0..2 {
        let mut next = Client::connect(&d.socket, 1, 65536).unwrap();
        assert_eq!(read(&mut next, 0, MIB, 0, 65536), 0, "round {round}");
        check_pattern(&next.buf()[..65536], MIB, 6).unwrap();
    }
    let stats = d.stats();
    assert_eq!(stats["sessions"], 4, "{stats}");
    assert_eq!(stats["frontends_refused"], 1, "{stats}");
    let second_session = &stats["recent_sessions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["number"] == 2)
        .cloned()
        .unwrap();
    assert!(second_session["ended"].is_string(), "{stats}");
}

#[test]
fn misaligned_guest_buffers_go_through_a_bounce_buffer_and_stay_correct() {
    for engine in ["io-uring", "inline"] {
        let d = Daemon::start(4 * MIB, &["--io-engine", engine]);
        let mut c = Client::connect(&d.socket, 1, 3 * 65536).unwrap();
        // Buffers 8 bytes past an aligned address: O_DIRECT refuses them as they are.
        let (len, at) = (65536usize, 8usize);
        fill_pattern(&mut c.buf()[at..at + len], MIB, 8);
        assert_eq!(write(&mut c, 0, MIB, at, len), 0);
        c.buf().fill(0);
        assert_eq!(read(&mut c, 0, MIB, 65536 + at, len), 0);
        check_pattern(&c.buf()[65536 + at..65536 + at + len], MIB, 8).unwrap();
        // Bytes around the bounced read are untouched.
        assert!(c.buf()[65536..65536 + at].iter().all(|&b| b == 0));
        assert!(c.buf()[65536 + at + len..].iter().all(|&b| b == 0));
        drop(c);
        let session = d.session_counters(1);
        assert_eq!(
            (session.get("bounced"), session.get("bytes_bounced")),
            (2, 2 * len as u64),
            "{engine}: expected 2 bounced requests: {}",
            session.line
        );
        let on_disk = std::fs::read(&d.image).unwrap();
        check_pattern(&on_disk[MIB as usize..MIB as usize + len], MIB, 8).unwrap();
    }
}

/// A request whose data buffer is not in any memory region the daemon was given must fail,
/// never complete "successfully" with an untouched buffer: its status byte is valid, so the
/// daemon writes IOERR there.
#[test]
fn a_buffer_outside_shared_memory_fails_the_request() {
    let d = Daemon::start(4 * MIB, &["--queues", "1"]);
    let mut c = Client::connect(&d.socket, 1, 4096).unwrap();
    // Plain heap memory of the test process: never mapped into the daemon.
    let mut private = vec![0u8; 3 * 4096];
    let ptr = ((private.as_mut_ptr() as usize + 4095) & !4095) as *mut u8;
    c.queues[0].read(0, ptr, 4096, 0, ReqFlags::empty());
    let (_, ret) = wait_all(&mut c.queues[0], 1)[0];
    assert!(ret < 0, "read into unshared memory returned {ret}");
    c.queues[0].write(0, ptr, 4096, 1, ReqFlags::empty());
    let (_, ret) = wait_all(&mut c.queues[0], 1)[0];
    assert!(ret < 0, "write from unshared memory returned {ret}");
    // The daemon says why, and still serves proper requests.
    d.wait_for_log("lies outside guest memory");
    assert_eq!(read(&mut c, 0, 0, 0, 4096), 0);
}
