//! End-to-end PI tests: the real daemon with PI metadata, driven by libblkio.
//!
//! Besides plain write/read/verify, these corrupt data and tuples behind the running daemon's
//! back (pwrite to the image, to `IMAGE.pi`, which the daemon maps shared) and check that
//! exactly the damaged blocks fail, with the right kind in the log, the journal and
//! `guardblk scrub --json`; that discard and write-zeroes leave verifiable zeros; and that
//! reads racing overlapping writes on two queues never see a false guard error.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkio::ReqFlags;
use common::*;

const MIB: u64 = 1 << 20;

fn write_read_verify(format: &str, interval: &str) {
    let size = 16 * MIB;
    let d = Daemon::start_created(
        &std::env::temp_dir(),
        size,
        &["--pi", format, "--interval", interval],
        &["--queues", "2"],
    );
    d.wait_for_log(&format!("pi=\"{format}, {interval}-byte intervals"));
    let chunk = 256 * 1024usize;
    let depth = 4usize;
    let mut c = Client::connect(&d.socket, 2, chunk * depth).unwrap();
    let mut offset = 0u64;
    while offset < size {
        for slot in 0..depth {
            let disk_off = offset + (slot * chunk) as u64;
            fill_pattern(&mut c.buf()[slot * chunk..(slot + 1) * chunk], disk_off, 3);
            let ptr = c.buf_ptr(slot * chunk);
            c.queues[slot % 2].write(disk_off, ptr, chunk, slot, ReqFlags::empty());
        }
        for q in 0..2 {
            for (slot, ret) in wait_all(&mut c.queues[q], depth / 2) {
                assert_eq!(ret, 0, "write of slot {slot} failed");
            }
        }
        offset += (chunk * depth) as u64;
    }
    drop(c);
    let d = d.restart(&["--queues", "1"]);
    let mut c = Client::connect(&d.socket, 1, chunk).unwrap();
    let mut offset = 0u64;
    while offset < size {
        assert_eq!(read(&mut c, 0, offset, 0, chunk), 0, "read at {offset}");
        check_pattern(&c.buf()[..chunk], offset, 3).unwrap();
        offset += chunk as u64;
    }
    assert_eq!(d.log_count("PI guard error"), 0, "{}", d.log_text());
}

#[test]
fn type1_4096_write_read_verify_across_restart() {
    write_read_verify("type1", "4096");
}

#[test]
fn type3_512_write_read_verify_across_restart() {
    write_read_verify("type3", "512");
}

#[test]
fn nvme64_4096_write_read_verify_across_restart() {
    write_read_verify("nvme64", "4096");
}

// ---------------------------------------------------------------------------------------------
// Corruption behind the daemon's back
// ---------------------------------------------------------------------------------------------

/// Write the `seed` pattern over the whole disk, 256 KiB requests alternating between the
/// client's queues. The client's buffer must hold 1 MiB.
fn fill_disk(c: &mut Client, size: u64, seed: u64) {
    let chunk = 256 * 1024usize;
    let depth = 4usize;
    let queues = c.queues.len();
    let mut offset = 0u64;
    while offset < size {
        for slot in 0..depth {
            let disk_off = offset + (slot * chunk) as u64;
            fill_pattern(
                &mut c.buf()[slot * chunk..(slot + 1) * chunk],
                disk_off,
                seed,
            );
            let ptr = c.buf_ptr(slot * chunk);
            c.queues[slot % queues].write(disk_off, ptr, chunk, slot, ReqFlags::empty());
        }
        for q in 0..queues {
            let n = (0..depth).filter(|s| s % queues == q).count();
            for (slot, ret) in wait_all(&mut c.queues[q], n) {
                assert_eq!(ret, 0, "write of slot {slot} at {offset} failed");
            }
        }
        offset += (chunk * depth) as u64;
    }
}

/// Read every block with its own request (64 in flight on queue `q`); returns each block's
/// completion value and content.
fn read_each_block(c: &mut Client, q: usize, size: u64, bs: u64) -> Vec<(i32, Vec<u8>)> {
    let batch = 64u64;
    assert!(c.region.len as u64 >= batch * bs);
    let blocks = size / bs;
    let mut out = Vec::with_capacity(blocks as usize);
    let mut first = 0u64;
    while first < blocks {
        let n = batch.min(blocks - first);
        c.buf()[..(n * bs) as usize].fill(0xEE);
        for i in 0..n {
            let ptr = c.buf_ptr((i * bs) as usize);
            c.queues[q].read(
                (first + i) * bs,
                ptr,
                bs as usize,
                i as usize,
                ReqFlags::empty(),
            );
        }
        let mut rets = vec![i32::MIN; n as usize];
        for (i, ret) in wait_all(&mut c.queues[q], n as usize) {
            rets[i] = ret;
        }
        for (i, ret) in rets.into_iter().enumerate() {
            let data = c.buf()[i * bs as usize..(i + 1) * bs as usize].to_vec();
            out.push((ret, data));
        }
        first += n;
    }
    out
}

/// A corruption the test made and the error it must produce.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Expected {
    lba: u64,
    kind: &'static str,
    expected: u64,
    actual: u64,
}

fn hex(v: u64) -> String {
    format!("{v:#x}")
}

fn corruption_is_detected_exactly(format: &str, interval: u64) {
    let size = 8 * MIB;
    let seed = 7;
    let tmp = std::env::temp_dir();
    let interval_arg = interval.to_string();
    let mut d = Daemon::start_created(
        &tmp,
        size,
        &["--pi", format, "--interval", &interval_arg],
        &["--queues", "2"],
    );
    let mut c = Client::connect(&d.socket, 2, MIB as usize).unwrap();
    fill_disk(&mut c, size, seed);

    let image = d.image.clone();
    let layout = PiLayout::read(&image);
    assert_eq!(layout.interval, interval);
    assert_eq!(layout.blocks, size / interval);
    let type3 = layout.format == 3;
    let bs = interval;
    let pattern_of = |lba: u64| {
        let mut v = vec![0u8; bs as usize];
        fill_pattern(&mut v, lba * bs, seed);
        v
    };
    // Every written tuple is what the daemon should have stored: guard of the pattern,
    // app tag "GB", reference tag = LBA (0 for Type 3).
    for lba in [0, 1, layout.blocks / 2, layout.blocks - 1] {
        let (guard, app, reference) = layout.decode(&layout.read_tuple(&image, lba));
        assert_eq!(guard, layout.guard_of(&pattern_of(lba)), "guard of {lba}");
        assert_eq!(app, 0x4742, "app tag of {lba}");
        assert_eq!(reference, if type3 { 0 } else { lba }, "ref tag of {lba}");
    }

    let (a, b, cc, dd, e, f, g) = (3u64, 10, 17, 24, 31, 40, 47);
    let mut expected = Vec::new();
    // (a) One data byte of block A.
    {
        let mut data = layout.read_block(&image, a);
        assert_eq!(data, pattern_of(a));
        data[100] ^= 0x20;
        layout.write_block(&image, a, &data);
        assert_ne!(layout.read_block(&image, a), pattern_of(a), "A unchanged");
        let stored = layout.decode(&layout.read_tuple(&image, a)).0;
        expected.push(Expected {
            lba: a,
            kind: "guard",
            expected: stored,
            actual: layout.guard_of(&data),
        });
    }
    // (b) The guard of block B.
    {
        let before = layout.read_tuple(&image, b);
        let mut raw = before.clone();
        raw[0] ^= 0x5A;
        layout.write_tuple(&image, b, &raw);
        assert_ne!(layout.read_tuple(&image, b), before, "B's tuple unchanged");
        expected.push(Expected {
            lba: b,
            kind: "guard",
            expected: layout.decode(&raw).0,
            actual: layout.guard_of(&pattern_of(b)),
        });
    }
    // (c) The reference tag of block C. Type 3 does not check reference tags (Linux
    // t10-pi rules): there it is not an error and C must read back fine.
    {
        let before = layout.read_tuple(&image, cc);
        let mut raw = before.clone();
        raw[layout.ref_range().end - 1] ^= 0x80;
        layout.write_tuple(&image, cc, &raw);
        assert_ne!(layout.read_tuple(&image, cc), before, "C's tuple unchanged");
        if !type3 {
            expected.push(Expected {
                lba: cc,
                kind: "ref",
                expected: cc,
                actual: layout.decode(&raw).2,
            });
        }
    }
    // (d) Misdirected write, data only: D's data lands on E; E's tuple stays.
    {
        let data = layout.read_block(&image, dd);
        assert_ne!(data, layout.read_block(&image, e));
        layout.write_block(&image, e, &data);
        assert_eq!(layout.read_block(&image, e), data);
        expected.push(Expected {
            lba: e,
            kind: "guard",
            expected: layout.decode(&layout.read_tuple(&image, e)).0,
            actual: layout.guard_of(&data),
        });
    }
    // (e) Misdirected write with its tuple: F's data and tuple land on G. Type 1 and NVMe64
    // catch it by the reference tag; Type 3 has none, so it is undetectable by design: G
    // reads back F's data without an error.
    {
        let data = layout.read_block(&image, f);
        let tuple = layout.read_tuple(&image, f);
        assert_ne!(data, layout.read_block(&image, g));
        layout.write_block(&image, g, &data);
        layout.write_tuple(&image, g, &tuple);
        assert_eq!(layout.read_tuple(&image, g), tuple);
        if !type3 {
            expected.push(Expected {
                lba: g,
                kind: "ref",
                expected: g,
                actual: f,
            });
        }
    }
    // (f) One data byte of the disk's last block (the locked re-read must not read past it).
    let h = layout.blocks - 1;
    {
        let mut data = layout.read_block(&image, h);
        data[bs as usize - 1] ^= 0x01;
        layout.write_block(&image, h, &data);
        assert_ne!(layout.read_block(&image, h), pattern_of(h), "H unchanged");
        expected.push(Expected {
            lba: h,
            kind: "guard",
            expected: layout.decode(&layout.read_tuple(&image, h)).0,
            actual: layout.guard_of(&data),
        });
    }
    expected.sort();
    let bad: BTreeMap<u64, &Expected> = expected.iter().map(|x| (x.lba, x)).collect();

    // Every block on its own: exactly the corrupted ones fail, with EIO.
    let results = read_each_block(&mut c, 0, size, bs);
    let mut wrong = Vec::new();
    for (lba, (ret, data)) in results.iter().enumerate() {
        let lba = lba as u64;
        if bad.contains_key(&lba) {
            if *ret != -libc::EIO {
                wrong.push(format!(
                    "block {lba} (corrupted) read returned {ret}, want -EIO"
                ));
            }
            continue;
        }
        if *ret != 0 {
            wrong.push(format!("block {lba} (intact) read failed with {ret}"));
            continue;
        }
        let want = if type3 && lba == g {
            pattern_of(f)
        } else {
            pattern_of(lba)
        };
        if *data != want {
            wrong.push(format!("block {lba} read back wrong content"));
        }
    }
    assert!(wrong.is_empty(), "{format}/{interval}: {wrong:#?}");

    // One log line per bad block, naming it and what was wrong.
    let deadline = Instant::now() + Duration::from_secs(5);
    while guard_error_lines(&d.log_text()).len() < expected.len() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut lines = guard_error_lines(&d.log_text());
    lines.sort_by_key(|l| l.lba);
    let got: Vec<(u64, String, String, String)> = lines
        .iter()
        .map(|l| (l.lba, l.kind.clone(), l.expected.clone(), l.actual.clone()))
        .collect();
    let want: Vec<(u64, String, String, String)> = expected
        .iter()
        .map(|x| (x.lba, x.kind.to_string(), hex(x.expected), hex(x.actual)))
        .collect();
    assert_eq!(got, want, "log:\n{}", d.log_text());
    for l in &lines {
        assert_eq!(l.byte_offset, l.lba * bs);
        assert_eq!(l.request, "read");
    }

    // The journal has the same, as guard_error records from reads.
    let records = journal_records(&image);
    let mut from_reads: Vec<(u64, String, String, String)> = records
        .iter()
        .filter(|r| r["event"] == "guard_error" && r["source"] == "read")
        .map(|r| {
            assert_eq!(r["byte_offset"].as_u64(), r["lba"].as_u64().map(|l| l * bs));
            (
                r["lba"].as_u64().unwrap(),
                r["kind"].as_str().unwrap().to_string(),
                r["expected"].as_str().unwrap().to_string(),
                r["actual"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    from_reads.sort();
    assert_eq!(from_reads, want, "journal: {records:#?}");

    // A read spanning a good and a bad block fails; the good block alone is fine.
    assert_eq!(
        read(&mut c, 0, (a - 1) * bs, 0, 2 * bs as usize),
        -libc::EIO
    );
    assert_eq!(read(&mut c, 0, (a - 1) * bs, 0, bs as usize), 0);
    check_pattern(&c.buf()[..bs as usize], (a - 1) * bs, seed).unwrap();
    assert_eq!(read(&mut c, 0, (a + 1) * bs, 0, bs as usize), 0);

    // Queue 0 keeps hitting a bad block while queue 1 reads and rewrites good ones: queue 1
    // sees no error and correct data.
    other_queues_are_unaffected(&mut c, a * bs, bs, 4 * MIB, seed);

    drop(c);
    assert!(d.terminate().success(), "{}", d.log_text());
    let s = scrub_json(&image);
    assert_eq!(s.code, Some(1), "{s}");
    let want_scrub: Vec<(u64, String)> = expected
        .iter()
        .map(|x| (x.lba, x.kind.to_string()))
        .collect();
    assert_eq!(s.lbas_and_kinds(), want_scrub, "{s}");
    for err in &s.errors {
        assert_eq!(err["event"], "guard_error", "{err}");
        assert_eq!(err["source"], "scrub", "{err}");
        let lba = err["lba"].as_u64().unwrap();
        assert_eq!(err["byte_offset"].as_u64(), Some(lba * bs), "{err}");
        let x = bad[&lba];
        assert_eq!(
            err["expected"].as_str(),
            Some(hex(x.expected).as_str()),
            "{err}"
        );
        assert_eq!(
            err["actual"].as_str(),
            Some(hex(x.actual).as_str()),
            "{err}"
        );
    }
    assert_eq!(s.summary_u64("errors"), Some(expected.len() as u64), "{s}");
    assert_eq!(s.summary_u64("blocks"), Some(size / bs), "{s}");
}

/// Queue 0 reads the bad block at `bad_off` over and over while, at the same time, queue 1
/// writes and reads back 1 MiB from `good_off`: queue 0 fails every time, queue 1 never.
fn other_queues_are_unaffected(c: &mut Client, bad_off: u64, bs: u64, good_off: u64, seed: u64) {
    let base = c.region.addr;
    let (q0, q1) = c.queues.split_at_mut(1);
    let (q0, q1) = (&mut q0[0], &mut q1[0]);
    std::thread::scope(|s| {
        let bad = s.spawn(move || {
            for _ in 0..8 {
                for i in 0..16 {
                    q0.read(bad_off, base as *mut u8, bs as usize, i, ReqFlags::empty());
                }
                for (i, ret) in wait_all(q0, 16) {
                    assert_eq!(ret, -libc::EIO, "read {i} of the bad block");
                }
            }
        });
        let good = s.spawn(move || {
            // Buffer bytes [64 KiB, 64 KiB + 1 MiB) of the region; queue 0 only uses the first
            // block.
            let chunk = 64 * 1024usize;
            // SAFETY: the region is a live shared mapping of at least 1 MiB (asserted by the
            // caller's connect size); queue 0's thread only touches its first block.
            let buf =
                unsafe { std::slice::from_raw_parts_mut((base + chunk) as *mut u8, 15 * chunk) };
            for round in 0..4u64 {
                let seed = seed + 100 + round;
                for i in 0..15 {
                    let off = good_off + (i * chunk) as u64;
                    fill_pattern(&mut buf[i * chunk..(i + 1) * chunk], off, seed);
                    q1.write(off, buf[i * chunk..].as_ptr(), chunk, i, ReqFlags::empty());
                }
                for (i, ret) in wait_all(q1, 15) {
                    assert_eq!(ret, 0, "queue 1 write {i}");
                }
                buf.fill(0);
                for i in 0..15 {
                    let off = good_off + (i * chunk) as u64;
                    q1.read(
                        off,
                        buf[i * chunk..].as_mut_ptr(),
                        chunk,
                        i,
                        ReqFlags::empty(),
                    );
                }
                for (i, ret) in wait_all(q1, 15) {
                    assert_eq!(ret, 0, "queue 1 read {i}");
                }
                for i in 0..15 {
                    let off = good_off + (i * chunk) as u64;
                    check_pattern(&buf[i * chunk..(i + 1) * chunk], off, seed).unwrap();
                }
            }
            // Put the original pattern back for the scrub that follows.
            for i in 0..15 {
                let off = good_off + (i * chunk) as u64;
                fill_pattern(&mut buf[i * chunk..(i + 1) * chunk], off, seed);
                q1.write(off, buf[i * chunk..].as_ptr(), chunk, i, ReqFlags::empty());
            }
            assert!(wait_all(q1, 15).iter().all(|(_, r)| *r == 0));
        });
        bad.join().unwrap();
        good.join().unwrap();
    });
}

#[test]
fn type1_4096_corruption_is_detected_exactly() {
    corruption_is_detected_exactly("type1", 4096);
}

#[test]
fn type3_512_corruption_is_detected_exactly_and_ref_tags_are_not_checked() {
    corruption_is_detected_exactly("type3", 512);
}

#[test]
fn nvme64_4096_corruption_is_detected_exactly() {
    corruption_is_detected_exactly("nvme64", 4096);
}

// ---------------------------------------------------------------------------------------------
// Discard and write-zeroes
// ---------------------------------------------------------------------------------------------

fn discard_and_write_zeroes_verify(base: &std::path::Path, format: &str, interval: u64) {
    let size = 8 * MIB;
    let seed = 11;
    let interval_arg = interval.to_string();
    let mut d = Daemon::start_created(
        base,
        size,
        &["--pi", format, "--interval", &interval_arg],
        &["--queues", "2"],
    );
    let mut c = Client::connect(&d.socket, 2, 4 * MIB as usize).unwrap();
    fill_disk(&mut c, size, seed);
    let bs = interval;
    let zeroed: Vec<(u64, u64)> = vec![
        (MIB, MIB),                 // discard, whole region
        (3 * MIB, MIB / 2),         // write-zeroes (may unmap)
        (2 * MIB + 4096, 8192),     // write-zeroes, NO_UNMAP
        (5 * MIB + 3 * bs, bs),     // discard, one interval
        (6 * MIB - 2 * bs, 4 * bs), // write-zeroes across a 1 MiB region boundary
        (7 * MIB + 5 * bs, 3 * bs), // discard, then partly rewritten below
    ];
    let q = &mut c.queues[0];
    q.discard(zeroed[0].0, zeroed[0].1, 0, ReqFlags::empty());
    q.write_zeroes(zeroed[1].0, zeroed[1].1, 1, ReqFlags::empty());
    q.write_zeroes(zeroed[2].0, zeroed[2].1, 2, ReqFlags::NO_UNMAP);
    q.discard(zeroed[3].0, zeroed[3].1, 3, ReqFlags::empty());
    q.write_zeroes(zeroed[4].0, zeroed[4].1, 4, ReqFlags::empty());
    q.discard(zeroed[5].0, zeroed[5].1, 5, ReqFlags::empty());
    for (i, ret) in wait_all(q, 6) {
        assert_eq!(ret, 0, "discard/write-zeroes {i}");
    }
    // Rewrite the middle interval of the last discarded range: it must verify again.
    let rewrite = zeroed[5].0 + bs;
    fill_pattern(&mut c.buf()[..bs as usize], rewrite, seed + 1);
    assert_eq!(write(&mut c, 1, rewrite, 0, bs as usize), 0);

    let expect = |off: u64, out: &mut [u8]| {
        fill_pattern(out, off, seed);
        if off == rewrite {
            fill_pattern(out, off, seed + 1);
        } else if zeroed.iter().any(|&(s, l)| off >= s && off < s + l) {
            out.fill(0);
        }
    };
    // Whole-disk reads (4 MiB requests) and every block on its own.
    for half in 0..2u64 {
        let off = half * 4 * MIB;
        c.buf().fill(0xAA);
        assert_eq!(read(&mut c, half as usize, off, 0, 4 * MIB as usize), 0);
        let got = c.buf()[..4 * MIB as usize].to_vec();
        let mut want = vec![0u8; bs as usize];
        for (i, block) in got.chunks_exact(bs as usize).enumerate() {
            let o = off + i as u64 * bs;
            expect(o, &mut want);
            assert!(block == want.as_slice(), "{format}: block at {o} wrong");
        }
    }
    let mut want = vec![0u8; bs as usize];
    for (lba, (ret, data)) in read_each_block(&mut c, 1, size, bs).into_iter().enumerate() {
        let o = lba as u64 * bs;
        assert_eq!(ret, 0, "{format}: read of block {lba}");
        expect(o, &mut want);
        assert!(data == want, "{format}: block {lba} wrong");
    }
    assert_eq!(d.log_count("PI guard error"), 0, "{}", d.log_text());
    drop(c);
    let image = d.image.clone();
    assert!(d.terminate().success(), "{}", d.log_text());
    // Zeroed intervals are stored as unwritten (all-zero tuples).
    let layout = PiLayout::read(&image);
    for &(s, l) in &zeroed {
        for lba in s / bs..(s + l) / bs {
            if lba * bs != rewrite {
                assert!(
                    layout.read_tuple(&image, lba).iter().all(|&b| b == 0),
                    "{format}: tuple of zeroed block {lba} is not unwritten"
                );
            }
        }
    }
    assert_scrub_clean(&image, &format!("{format}/{interval} after discard/zeroes"));
}

#[test]
fn discard_and_write_zeroes_read_back_verified_zeros_type1_4096() {
    discard_and_write_zeroes_verify(&std::env::temp_dir(), "type1", 4096);
}

#[test]
fn discard_and_write_zeroes_read_back_verified_zeros_type3_512() {
    discard_and_write_zeroes_verify(&std::env::temp_dir(), "type3", 512);
}

#[test]
fn discard_and_write_zeroes_read_back_verified_zeros_nvme64_4096_on_tmpfs() {
    // tmpfs cannot zero a range (EOPNOTSUPP): exercises the punch-hole fallback under PI.
    let shm = std::path::Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    discard_and_write_zeroes_verify(&base, "nvme64", 4096);
}

// ---------------------------------------------------------------------------------------------
// Reads racing overlapping writes
// ---------------------------------------------------------------------------------------------

/// What one hammering queue saw.
#[derive(Debug, Default)]
struct RaceStats {
    reads: u64,
    writes: u64,
    blocks_checked: u64,
    zero_blocks: u64,
}

/// Two queues, each on its own thread, hammer `hot` blocks at the start of the disk with
/// overlapping writes (1–8 blocks) and reads (1–16 blocks), 16 requests in flight per queue,
/// for `secs` seconds. Every read must succeed and every block it returns must be exactly one
/// write's content (never torn, never a false guard error); afterwards the log holds no guard
/// error and scrub is clean.
fn reads_race_overlapping_writes(format: &str, interval: u64, secs: f64) {
    let size = 4 * MIB;
    let hot = 48u64;
    let bs = interval;
    let interval_arg = interval.to_string();
    let seed = seed_from_env("GUARDBLK_RACE_SEED");
    let mut d = Daemon::start_created(
        &std::env::temp_dir(),
        size,
        &["--pi", format, "--interval", &interval_arg],
        &["--queues", "2"],
    );
    let depth = 16usize;
    let max_blocks = 16u64;
    let slot_len = (max_blocks * bs) as usize;
    let c = Client::connect(&d.socket, 2, 2 * depth * slot_len).unwrap();
    let base = c.region.addr;
    let Client {
        queues,
        blkio,
        region,
    } = c;
    let next_version = Arc::new(AtomicU64::new(1));
    let stop = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let handles: Vec<_> = queues
        .into_iter()
        .enumerate()
        .map(|(qi, mut q)| {
            let next_version = Arc::clone(&next_version);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || -> Result<RaceStats, String> {
                let mut rng = Rng(seed ^ mix64(qi as u64 + 1));
                let mut stats = RaceStats::default();
                // Per slot: None (free) or Some((is_read, first block, blocks)).
                let mut slots: Vec<Option<(bool, u64, u64)>> = vec![None; depth];
                let slot_buf = |slot: usize| {
                    let addr = base + (qi * depth + slot) * slot_len;
                    // SAFETY: each (queue, slot) owns a disjoint slot_len piece of the live
                    // region; the kernel side only touches it while the request is in flight,
                    // and the thread only touches it while it is not.
                    unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, slot_len) }
                };
                let result = (|| loop {
                    let running = Instant::now() < deadline && !stop.load(Ordering::Relaxed);
                    if running {
                        for (slot, state) in slots.iter_mut().enumerate() {
                            if state.is_some() {
                                continue;
                            }
                            let is_read = rng.below(2) == 0;
                            let n = rng.between(1, if is_read { 16 } else { 8 });
                            let first = rng.below(hot - n + 1);
                            let buf = slot_buf(slot);
                            if is_read {
                                buf[..(n * bs) as usize].fill(0xEE);
                                q.read(
                                    first * bs,
                                    buf.as_mut_ptr(),
                                    (n * bs) as usize,
                                    slot,
                                    ReqFlags::empty(),
                                );
                            } else {
                                let version = next_version.fetch_add(1, Ordering::Relaxed);
                                for (i, block) in buf[..(n * bs) as usize]
                                    .chunks_exact_mut(bs as usize)
                                    .enumerate()
                                {
                                    fill_versioned(block, first + i as u64, version);
                                }
                                q.write(
                                    first * bs,
                                    buf.as_ptr(),
                                    (n * bs) as usize,
                                    slot,
                                    ReqFlags::empty(),
                                );
                            }
                            *state = Some((is_read, first, n));
                        }
                    } else if slots.iter().all(Option::is_none) {
                        return Ok(());
                    }
                    let completed = reap_some(&mut q, depth, Duration::from_secs(10));
                    if completed.is_empty() {
                        return Err(format!("queue {qi}: no completion in 10 s"));
                    }
                    for (slot, ret) in completed {
                        let (is_read, first, n) =
                            slots[slot].take().ok_or("completion for a free slot")?;
                        if ret != 0 {
                            return Err(format!(
                                "queue {qi}: {} of blocks {first}..{} failed: {ret}",
                                if is_read { "read" } else { "write" },
                                first + n
                            ));
                        }
                        if !is_read {
                            stats.writes += 1;
                            continue;
                        }
                        stats.reads += 1;
                        let max = next_version.load(Ordering::Relaxed);
                        let buf = slot_buf(slot);
                        for (i, block) in buf[..(n * bs) as usize]
                            .chunks_exact(bs as usize)
                            .enumerate()
                        {
                            let v = decode_versioned(block, first + i as u64)
                                .map_err(|e| format!("queue {qi} read: {e}"))?;
                            if v >= max {
                                return Err(format!(
                                    "queue {qi}: block {} has version {v}, never written",
                                    first + i as u64
                                ));
                            }
                            stats.blocks_checked += 1;
                            stats.zero_blocks += u64::from(v == 0);
                        }
                    }
                })();
                if result.is_err() {
                    stop.store(true, Ordering::Relaxed);
                }
                result.map(|()| stats)
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    drop((blkio, region));
    let mut failures = Vec::new();
    let mut total = RaceStats::default();
    for r in results {
        match r {
            Ok(s) => {
                total.reads += s.reads;
                total.writes += s.writes;
                total.blocks_checked += s.blocks_checked;
                total.zero_blocks += s.zero_blocks;
            }
            Err(e) => failures.push(e),
        }
    }
    let healed = d.session_counters(1).get("read_retries_healed");
    let log = d.log_text();
    eprintln!(
        "{format}/{interval} race (seed {seed:#x}): {} reads, {} writes, {} blocks checked \
         ({} still zero), {healed} reads healed by the locked re-read",
        total.reads, total.writes, total.blocks_checked, total.zero_blocks
    );
    assert!(
        failures.is_empty(),
        "seed {seed:#x} (GUARDBLK_RACE_SEED): {failures:#?}\ndaemon warnings and errors:\n{}",
        log.lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .take(40)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        total.reads > 100 && total.writes > 100,
        "too little load: {total:?}"
    );
    assert_eq!(guard_error_lines(&log), vec![], "{log}");
    let image = d.image.clone();
    assert!(d.terminate().success(), "{}", d.log_text());
    assert_scrub_clean(&image, &format!("{format}/{interval} after the race"));
}

#[test]
fn reads_racing_overlapping_writes_on_two_queues_never_fail_type1_4096() {
    reads_race_overlapping_writes("type1", 4096, 3.0);
}

#[test]
fn reads_racing_overlapping_writes_on_two_queues_never_fail_type3_512() {
    reads_race_overlapping_writes("type3", 512, 2.0);
}

/// A read across a corrupted range fails once, journals every bad interval (one sync, not
/// one per interval), and logs only the first few with a line summing up the rest.
#[test]
fn a_read_across_many_corrupt_blocks_journals_every_lba_and_logs_a_summary() {
    let size = 8 * MIB;
    let seed = 11;
    let d = Daemon::start_created(
        &std::env::temp_dir(),
        size,
        &["--pi", "type1", "--interval", "4096"],
        &[],
    );
    let mut c = Client::connect(&d.socket, 1, MIB as usize).unwrap();
    fill_disk(&mut c, size, seed);
    let image = d.image.clone();
    let layout = PiLayout::read(&image);
    let (first, count) = (64u64, 48u64);
    for lba in first..first + count {
        let mut data = layout.read_block(&image, lba);
        data[7] ^= 0x01;
        layout.write_block(&image, lba, &data);
    }
    assert!(read(&mut c, 0, first * 4096, 0, (count * 4096) as usize) < 0);
    let journal = std::fs::read_to_string(journal_path(&image)).unwrap();
    let journalled: BTreeSet<u64> = journal
        .lines()
        .filter(|l| l.contains("\"guard_error\""))
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["lba"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(
        journalled,
        (first..first + count).collect::<BTreeSet<u64>>()
    );
    let logged = d.log_count("PI guard error ");
    assert!(logged <= 8, "{logged} guard error lines for one request");
    d.wait_for_log("more PI guard errors in the same request");
}
