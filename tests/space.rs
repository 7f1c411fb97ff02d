//! What a full file system, or a metadata file truncated under the daemon, does to guardblk,
//! through the real kernel: small size-limited tmpfs mounts (this needs root, as the FUSE
//! tests do), filled to the last page. A full disk must fail the writes that need space with
//! I/O errors and nothing else; a lost metadata page must fail PI requests, never raise a
//! false guard error, and never kill the daemon (a shared mapping's page without backing
//! raises SIGBUS).

mod common;

use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::frontend::*;
use common::*;

const MIB: u64 = 1 << 20;
const BLOCK: usize = 4096;
/// Sectors per 2 MiB: one 4 KiB page of 8-byte tuples covers that much of the disk.
const TUPLE_PAGE_SECTORS: u64 = 2 * MIB / 512;

/// A tmpfs of a fixed size, unmounted on drop.
struct SmallTmpfs {
    dir: tempfile::TempDir,
}

impl SmallTmpfs {
    fn mount(bytes: u64) -> SmallTmpfs {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={bytes},mode=0700"))
            .arg("guardblk-test")
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mounting a small tmpfs failed (these tests need root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallTmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Take every free byte with a filler file; returns it (remove it to free the space).
    fn fill(&self) -> PathBuf {
        let filler = self.path().join("filler");
        let mut file = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0xA5u8; 64 * 1024];
        loop {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling the tmpfs: {e}"),
            }
        }
        // Partial pages: fill byte by byte to the very end.
        while file.write(&[0xA5]).is_ok_and(|n| n == 1) {}
        filler
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

fn block(sector: u64, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; BLOCK];
    fill_pattern(&mut data, sector * 512, seed);
    data
}

fn counter(daemon: &Daemon, name: &str) -> u64 {
    daemon.stats()["counters"][name].as_u64().unwrap()
}

fn create(image: &Path, meta: &Path, size: u64) -> std::process::Output {
    guardblk(&[
        "create",
        image.to_str().unwrap(),
        "--size",
        &size.to_string(),
        "--pi",
        "type1",
        "--pi-meta",
        meta.to_str().unwrap(),
    ])
}

fn serve(image: &Path, meta: &Path) -> Daemon {
    Daemon::serve(
        tempfile::tempdir().unwrap(),
        image.to_path_buf(),
        &["--pi-meta", meta.to_str().unwrap()],
    )
}

fn scrub(image: &Path, meta: &Path) -> std::process::Output {
    guardblk(&[
        "scrub",
        image.to_str().unwrap(),
        "--pi-meta",
        meta.to_str().unwrap(),
    ])
}

/// Sectors of one block in each 2 MiB of a `size`-byte disk: every tuple page gets a store.
fn one_block_per_tuple_page(size: u64) -> Vec<u64> {
    (0..size / (2 * MIB))
        .map(|i| i * TUPLE_PAGE_SECTORS + 8)
        .collect()
}

#[test]
fn pi_metadata_on_a_full_file_system_is_allocated_up_front_so_every_tuple_is_stored() {
    let small = SmallTmpfs::mount(2 * MIB);
    let data_dir = tempfile::tempdir().unwrap();
    let image = data_dir.path().join("disk.img");
    let meta = small.path().join("disk.img.pi");
    let size = 64 * MIB;
    let created = create(&image, &meta, size);
    assert!(created.status.success(), "{created:?}");
    small.fill();

    // Each write stores a tuple in a page of its own. Left sparse, the first store into a
    // page the full tmpfs cannot allocate would raise SIGBUS and kill the daemon.
    let mut daemon = serve(&image, &meta);
    let mut io = SyncIo::connect(&daemon.socket);
    let sectors = one_block_per_tuple_page(size);
    for &sector in &sectors {
        assert_eq!(
            io.write(sector, &block(sector, 1)),
            0,
            "write at sector {sector}"
        );
    }
    assert_eq!(io.flush(), 0);
    for &sector in &sectors {
        assert_eq!(io.read(sector, BLOCK as u32), (0, block(sector, 1)));
    }
    assert_eq!(counter(&daemon, "io_errors"), 0);
    drop(io);
    let status = daemon.terminate();
    assert!(status.success(), "{status:?}: {}", daemon.log_text());
    let scrubbed = scrub(&image, &meta);
    assert!(scrubbed.status.success(), "{scrubbed:?}");
}

#[test]
fn a_sparse_pi_metadata_file_on_a_full_file_system_is_refused_at_start_in_one_sentence() {
    let small = SmallTmpfs::mount(2 * MIB);
    let data_dir = tempfile::tempdir().unwrap();
    let image = data_dir.path().join("disk.img");
    let meta = small.path().join("disk.img.pi");
    let created = create(&image, &meta, 64 * MIB);
    assert!(created.status.success(), "{created:?}");
    // As a sparse copy (or an older guardblk) leaves it: the tuple area unallocated.
    let file = std::fs::OpenOptions::new().write(true).open(&meta).unwrap();
    let len = file.metadata().unwrap().len();
    // SAFETY: fallocate on a descriptor we own; no memory is involved.
    let rc = unsafe {
        libc::fallocate(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            64 * 1024,
            (len - 64 * 1024) as i64,
        )
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    drop(file);
    small.fill();

    let mut daemon = Daemon::spawn(
        tempfile::tempdir().unwrap(),
        image.clone(),
        &["--pi-meta", meta.to_str().unwrap()],
    );
    let err = daemon
        .wait_ready_or_exit()
        .expect_err("served metadata it cannot store tuples in");
    assert!(
        err.contains("has no room for it") && err.contains(meta.to_str().unwrap()),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn pi_metadata_truncated_under_a_running_daemon_fails_pi_requests_and_the_daemon_lives() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let meta = dir.path().join("disk.img.pi");
    let created = create(&image, &meta, 64 * MIB);
    assert!(created.status.success(), "{created:?}");
    let mut daemon = serve(&image, &meta);
    let mut io = SyncIo::connect(&daemon.socket);
    let (a, b) = (8, 32 * MIB / 512);
    assert_eq!(io.write(a, &block(a, 1)), 0);
    assert_eq!(io.write(b, &block(b, 1)), 0);
    assert_eq!(io.flush(), 0);

    // Someone truncates the metadata to its header page under the daemon.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&meta)
        .unwrap()
        .set_len(4096)
        .unwrap();

    // A read's tuple now comes from a page without backing: an I/O error, not a guard error.
    assert_eq!(io.read(b, BLOCK as u32).0, 1, "read over a lost tuple page");
    let c = 40 * MIB / 512;
    assert_eq!(
        io.write(c, &block(c, 2)),
        1,
        "write with nowhere to keep its tuple"
    );
    assert_eq!(io.flush(), 1, "a flush cannot make lost tuples durable");
    assert_eq!(io.read(a, BLOCK as u32).0, 1);
    // The daemon lives: requests without PI work, and the counters and log say what happened.
    assert_eq!(
        io.run(VIRTIO_BLK_T_GET_ID, 0, Some((DATA_GPA, 20))),
        0,
        "GET_ID"
    );
    assert!(io.q.mem.read(DATA_GPA, 20).starts_with(b"guardblk"));
    assert_eq!(counter(&daemon, "guard_errors"), 0);
    assert!(counter(&daemon, "io_errors") >= 4);
    let log = daemon.log_text();
    assert_eq!(
        log.matches("the PI metadata lost pages under the daemon")
            .count(),
        1,
        "{log}"
    );
    drop(io);
    let status = daemon.terminate();
    assert_eq!(
        status.signal(),
        None,
        "killed by a signal: {}",
        daemon.log_text()
    );

    // The next start names the damage in one sentence.
    let mut next = Daemon::spawn(
        tempfile::tempdir().unwrap(),
        image.clone(),
        &["--pi-meta", meta.to_str().unwrap()],
    );
    let err = next
        .wait_ready_or_exit()
        .expect_err("served truncated metadata");
    assert!(err.contains("is truncated"), "{err}");
}

#[test]
fn a_sparse_image_on_a_full_file_system_fails_writes_that_need_space_and_works_once_space_returns()
{
    let small = SmallTmpfs::mount(4 * MIB);
    let meta_dir = tempfile::tempdir().unwrap();
    let image = small.path().join("disk.img");
    let meta = meta_dir.path().join("disk.img.pi");
    let size = 64 * MIB;
    let created = create(&image, &meta, size);
    assert!(created.status.success(), "{created:?}");
    let mut daemon = serve(&image, &meta);
    let mut io = SyncIo::connect(&daemon.socket);
    let written = 8;
    assert_eq!(io.write(written, &block(written, 1)), 0);
    let filler = small.fill();

    // Writes into holes need space: each fails, alone.
    let sectors = one_block_per_tuple_page(size);
    let holes = &sectors[1..];
    for &sector in holes {
        assert_eq!(
            io.write(sector, &block(sector, 2)),
            1,
            "write at {sector} on a full disk"
        );
    }
    // An allocated block is rewritten in place, and everything reads.
    assert_eq!(io.write(written, &block(written, 3)), 0);
    assert_eq!(io.read(written, BLOCK as u32), (0, block(written, 3)));
    for &sector in holes {
        let (status, data) = io.read(sector, BLOCK as u32);
        assert_eq!(
            status, 0,
            "a block a write failed on does not read (guard error?)"
        );
        assert!(
            data == vec![0; BLOCK] || data == block(sector, 2),
            "sector {sector}"
        );
    }
    assert_eq!(counter(&daemon, "guard_errors"), 0);
    assert_eq!(counter(&daemon, "io_errors"), holes.len() as u64);

    // Space returns: the same writes succeed and stick, with no restart.
    std::fs::remove_file(filler).unwrap();
    for &sector in holes {
        assert_eq!(
            io.write(sector, &block(sector, 4)),
            0,
            "write at {sector} with space"
        );
    }
    assert_eq!(io.flush(), 0);
    for &sector in holes {
        assert_eq!(io.read(sector, BLOCK as u32), (0, block(sector, 4)));
    }
    drop(io);
    let status = daemon.terminate();
    assert!(status.success(), "{status:?}: {}", daemon.log_text());
    let scrubbed = scrub(&image, &meta);
    assert!(scrubbed.status.success(), "{scrubbed:?}");
}
