//! End-to-end PI tests: the real daemon with PI metadata, driven by libblkio.

mod common;

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
