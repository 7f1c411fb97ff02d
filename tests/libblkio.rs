//! End-to-end tests: the real daemon binary driven by libblkio (virtio-blk-vhost-user).

mod common;

use blkio::ReqFlags;
use common::*;

const MIB: u64 = 1 << 20;

#[test]
fn pattern_write_read_verify_across_the_whole_disk() {
    let size = 64 * MIB;
    let d = Daemon::start(size, &["--queues", "1"]);
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
