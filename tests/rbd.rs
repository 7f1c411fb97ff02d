//! Ceph RBD targets against a real one-node cluster (tests/ceph/cluster.sh: a monitor and a
//! memstore OSD on 127.0.0.1, started for this test and removed after it). Needs Debian's
//! ceph-mon, ceph-osd and ceph-common (the `rbd` tool) and librbd1, which .ci/run installs.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use blkio::ReqFlags;
use common::*;

const MIB: u64 = 1 << 20;

/// A running test cluster, stopped and removed on drop.
struct Cluster {
    dir: PathBuf,
    _parent: tempfile::TempDir,
}

impl Cluster {
    fn start() -> Cluster {
        for tool in ["ceph-mon", "ceph-osd", "rbd"] {
            assert!(
                Command::new("sh")
                    .args(["-c", &format!("command -v {tool}")])
                    .output()
                    .unwrap()
                    .status
                    .success(),
                "{tool} is not installed: apt-get install ceph-mon ceph-osd ceph-common (see tests/ceph/README.md)"
            );
        }
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("cluster");
        // A port of its own, so a developer's cluster on the default port is left alone, and
        // one per cluster, so this file's tests can run at once.
        static STARTED: AtomicU32 = AtomicU32::new(0);
        // Each cluster takes 100 ports (see cluster.sh).
        let port = 20000
            + (std::process::id() % 100) * 400
            + STARTED.fetch_add(1, Ordering::Relaxed) % 4 * 100;
        let out = Command::new("bash")
            .arg(script())
            .arg("start")
            .arg(&dir)
            .env("CEPH_TEST_PORT", port.to_string())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "the test cluster did not start:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Cluster {
            dir,
            _parent: parent,
        }
    }

    fn conf(&self) -> PathBuf {
        self.dir.join("ceph.conf")
    }

    /// `TOOL -c CONF ARGS...` (rbd, rados) against this cluster; it must succeed.
    fn tool(&self, tool: &str, args: &[&str]) -> Output {
        let out = Command::new(tool)
            .arg("-c")
            .arg(self.conf())
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// The `rbd` tool against this cluster.
    fn rbd(&self, args: &[&str]) {
        self.tool("rbd", args);
    }

    /// Every byte of `image` as the cluster holds it (`rbd export`), read beside guardblk.
    fn export(&self, image: &str) -> Vec<u8> {
        let file = self.dir.join("export.raw");
        let _ = std::fs::remove_file(&file);
        self.rbd(&["export", "--no-progress", image, file.to_str().unwrap()]);
        std::fs::read(&file).unwrap()
    }

    /// Serve `rbd:IMAGE` of this cluster with the extra `args`.
    fn serve(&self, image: &str, args: &[&str]) -> Daemon {
        let d = self.spawn(image, args);
        d.wait_for_log("guardblk ready");
        d
    }

    /// As [`Cluster::serve`], without waiting for the daemon to be ready.
    fn spawn(&self, image: &str, args: &[&str]) -> Daemon {
        let ceph = self.args();
        let ceph: Vec<&str> = ceph.iter().map(String::as_str).collect();
        Daemon::spawn(
            tempfile::tempdir().unwrap(),
            PathBuf::from(format!("rbd:{image}")),
            &[&ceph[..], args].concat(),
        )
    }

    /// The options every guardblk command needs for this cluster: its configuration, and
    /// a state directory (journal, statistics) of its own.
    fn args(&self) -> Vec<String> {
        vec![
            "--ceph-conf".into(),
            self.conf().to_str().unwrap().into(),
            "--rbd-state-dir".into(),
            self.state_dir().to_str().unwrap().into(),
        ]
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.join("guardblk-state")
    }

    /// `guardblk VERB rbd:IMAGE EXTRA... --ceph-conf ... --rbd-state-dir ...`
    fn guardblk(&self, verb: &str, image: &str, extra: &[&str]) -> Output {
        let target = format!("rbd:{image}");
        let ceph = self.args();
        let ceph: Vec<&str> = ceph.iter().map(String::as_str).collect();
        guardblk(&[&[verb, target.as_str()], extra, &ceph[..]].concat())
    }

    /// Delete the RADOS object number `n` of `image`, behind librbd and any daemon.
    fn remove_object(&self, image: &str, n: u64) {
        let (pool, _) = image.split_once('/').unwrap();
        let object = format!("{}.{n:016x}", self.object_prefix(image).0);
        self.tool("rados", &["-p", pool, "rm", &object]);
    }

    /// The name prefix of `image`'s RADOS objects and its object size.
    fn object_prefix(&self, image: &str) -> (String, u64) {
        let info = self.tool("rbd", &["info", "--format", "json", image]);
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        (
            info["block_name_prefix"].as_str().unwrap().to_string(),
            1u64 << info["order"].as_u64().unwrap(),
        )
    }

    /// `guardblk scrub rbd:IMAGE` must pass with no guard error; its report.
    fn scrub_clean(&self, image: &str) -> String {
        let out = self.guardblk("scrub", image, &[]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains(" 0 guard errors"), "{text}");
        text
    }

    /// Flip every bit of the byte at `offset` of `image` straight in its RADOS object,
    /// behind librbd and any daemon: what a bad disk or a bug below Ceph's checksums does.
    fn corrupt_byte(&self, image: &str, offset: u64) {
        let (pool, name) = image.split_once('/').unwrap();
        let (prefix, object_size) = self.object_prefix(image);
        let object = format!("{prefix}.{:016x}", offset / object_size);
        let file = self.dir.join(format!("object-{name}"));
        let rados = |args: &[&str]| self.tool("rados", &[&["-p", pool], args].concat());
        rados(&["get", &object, file.to_str().unwrap()]);
        let mut bytes = std::fs::read(&file).unwrap();
        let at = (offset % object_size) as usize;
        bytes[at] = !bytes[at];
        std::fs::write(&file, &bytes).unwrap();
        rados(&["put", &object, file.to_str().unwrap()]);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ceph/cluster.sh")
}

/// `guardblk info TARGET --ceph-conf CONF EXTRA...` (this host's state in a throw-away place)
fn info(target: &str, conf: &Path, extra: &[&str]) -> Output {
    let state = conf.with_file_name("info-state");
    let base = [
        "info",
        target,
        "--ceph-conf",
        conf.to_str().unwrap(),
        "--rbd-state-dir",
        state.to_str().unwrap(),
    ];
    guardblk(&[&base[..], extra].concat())
}

#[test]
fn info_describes_an_rbd_image_and_names_every_ceph_failure_in_one_sentence() {
    let cluster = Cluster::start();
    let conf = cluster.conf();
    cluster.rbd(&["create", "--size", "64M", "rbd/disk"]);

    let out = info("rbd:rbd/disk", &conf, &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("ceph:      pool rbd, image disk ("), "{text}");
    assert!(
        text.contains("image:     rbd:rbd/disk (67108864 bytes"),
        "{text}"
    );
    assert!(
        text.contains("PI:        none (rbd:rbd/disk.pi does not exist)"),
        "{text}"
    );
    let out = info("rbd:rbd/disk", &conf, &["--json"]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["image"]["size"], 64 << 20);
    assert_eq!(doc["ceph"]["pool"], "rbd");
    assert_eq!(doc["ceph"]["image"], "disk");
    assert_eq!(doc["kind"], "rbd");
    assert_eq!(doc["pi"], serde_json::Value::Null);

    // Growing the image shows at once: the size is Ceph's, not a cached one.
    cluster.rbd(&["resize", "--size", "128M", "rbd/disk"]);
    let out = info("rbd:rbd/disk", &conf, &["--json"]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["image"]["size"], 128 << 20);

    assert_one_sentence(
        &info("rbd:rbd/missing", &conf, &[]),
        "there is no RBD image 'missing' in pool 'rbd'",
    );
    assert_one_sentence(
        &info("rbd:nopool/disk", &conf, &[]),
        "there is no pool 'nopool' in the Ceph cluster",
    );
    assert_one_sentence(
        &info("rbd:rbd", &conf, &[]),
        "'rbd:rbd' is not an RBD image name: write rbd:POOL/IMAGE",
    );
    assert_one_sentence(
        &info("rbd:rbd/disk", Path::new("/nonexistent/ceph.conf"), &[]),
        "cannot read the Ceph configuration /nonexistent/ceph.conf",
    );
    // A client the cluster has no key for.
    assert_one_sentence(
        &info("rbd:rbd/disk", &conf, &["--ceph-id", "nobody"]),
        "client.nobody",
    );
    // An image without PI metadata: scrub says how to add it.
    assert_one_sentence(
        &cluster.guardblk("scrub", "rbd/disk", &[]),
        "rbd:rbd/disk has no PI metadata (rbd:rbd/disk.pi does not exist); add it with `guardblk import rbd:rbd/disk`",
    );

    // A cluster that is not there: an error within the time-out, not a hang.
    let text = std::fs::read_to_string(&conf).unwrap();
    let unreachable = cluster.dir.join("unreachable.conf");
    let port = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("mon_host = "))
        .expect("mon_host in the test cluster's ceph.conf")
        .to_string();
    // The same configuration with the monitors moved to a port where nothing listens.
    let dead = text.replace(&port, "[v2:127.0.0.1:9,v1:127.0.0.1:10]");
    std::fs::write(&unreachable, dead).unwrap();
    let started = Instant::now();
    let out = info("rbd:rbd/disk", &unreachable, &["--ceph-timeout", "3"]);
    let took = started.elapsed();
    assert_one_sentence(
        &out,
        "could not connect to the Ceph cluster as client.admin within 3 s",
    );
    assert!(took < Duration::from_secs(20), "took {took:?}");
}

/// Without Ceph's libraries (librados hidden behind an empty file in a private mount
/// namespace; needs root, as the FUSE tests do) an rbd: target is one sentence naming the
/// package, and nothing else about guardblk changes.
#[test]
fn without_the_ceph_libraries_an_rbd_target_names_the_package_to_install() {
    let hidden = ["librados.so.2", "librbd.so.1"]
        .iter()
        .map(|l| format!("mount --bind /dev/null $(readlink -f /usr/lib/x86_64-linux-gnu/{l} || echo /nonexistent) 2>/dev/null;"))
        .collect::<String>();
    let out = Command::new("unshare")
        .args([
            "-m",
            "sh",
            "-c",
            &format!("{hidden} exec \"$0\" info rbd:pool/image"),
            BIN,
        ])
        .output()
        .unwrap();
    assert_one_sentence(
        &out,
        "Ceph's client libraries are not installed (librados.so.2: ",
    );
    assert_one_sentence(
        &out,
        "install librbd1 (apt-get install librbd1) to use rbd: images",
    );
}

/// The libblkio suite of tests/libblkio.rs against an `rbd:` image: the daemon serves it
/// through librbd's asynchronous calls, and what the guest wrote is checked in the cluster
/// itself with `rbd export`.
#[test]
fn libblkio_suite_on_an_rbd_image() {
    let cluster = Cluster::start();
    let size = 64 * MIB;
    cluster.rbd(&["create", "--size", "64M", "rbd/disk"]);
    let mut d = cluster.serve("rbd/disk", &["--queues", "4"]);
    d.wait_for_log("io_engine=librbd");

    // Pattern write / read / verify over the whole disk, 8 MiB in flight on one queue.
    let chunk = MIB as usize;
    let depth = 8usize;
    let mut c = Client::connect(&d.socket, 1, chunk * depth).unwrap();
    assert_eq!(c.capacity(), size);
    for pass_is_read in [false, true] {
        if pass_is_read {
            c.buf().fill(0);
        }
        for offset in (0..size).step_by(chunk * depth) {
            for slot in 0..depth {
                let disk_off = offset + (slot * chunk) as u64;
                let ptr = c.buf_ptr(slot * chunk);
                if pass_is_read {
                    c.queues[0].read(disk_off, ptr, chunk, slot, ReqFlags::empty());
                } else {
                    fill_pattern(&mut c.buf()[slot * chunk..(slot + 1) * chunk], disk_off, 1);
                    c.queues[0].write(disk_off, ptr, chunk, slot, ReqFlags::empty());
                }
            }
            for (slot, ret) in wait_all(&mut c.queues[0], depth) {
                assert_eq!(ret, 0, "request of slot {slot} at {offset} failed");
            }
            if pass_is_read {
                for slot in 0..depth {
                    let disk_off = offset + (slot * chunk) as u64;
                    check_pattern(&c.buf()[slot * chunk..(slot + 1) * chunk], disk_off, 1).unwrap();
                }
            }
        }
    }
    c.queues[0].flush(0, ReqFlags::empty());
    assert_eq!(wait_all(&mut c.queues[0], 1)[0].1, 0, "flush failed");
    drop(c);
    check_pattern(&cluster.export("rbd/disk"), 0, 1).unwrap();

    // Discard and write-zeroes read back as zeros (librbd's discard alone would not promise
    // that below its 64 KiB granularity), neighbours untouched, on disk too.
    let len = 4 * MIB as usize;
    let mut c = Client::connect(&d.socket, 1, len).unwrap();
    c.queues[0].discard(MIB, MIB, 0, ReqFlags::empty());
    assert_eq!(wait_all(&mut c.queues[0], 1)[0].1, 0);
    c.queues[0].write_zeroes(3 * MIB + 4096, 8192, 0, ReqFlags::empty());
    assert_eq!(wait_all(&mut c.queues[0], 1)[0].1, 0);
    c.queues[0].write_zeroes(2 * MIB + 512, 1024, 0, ReqFlags::NO_UNMAP);
    assert_eq!(wait_all(&mut c.queues[0], 1)[0].1, 0);
    c.buf().fill(0xAA);
    assert_eq!(read(&mut c, 0, 0, 0, len), 0);
    let m = MIB as usize;
    let zeroed = [
        (m, 2 * m),
        (2 * m + 512, 2 * m + 1536),
        (3 * m + 4096, 3 * m + 12288),
    ];
    let check = |buf: &[u8], what: &str| {
        let mut at = 0;
        for (start, end) in zeroed {
            check_pattern(&buf[at..start], at as u64, 1).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert!(
                buf[start..end].iter().all(|&b| b == 0),
                "{what}: {start}..{end} is not zero"
            );
            at = end;
        }
        check_pattern(&buf[at..len], at as u64, 1).unwrap_or_else(|e| panic!("{what}: {e}"));
    };
    check(&c.buf()[..len], "read back");
    check(&cluster.export("rbd/disk")[..len], "rbd export");

    // Requests past the end fail; the image does not grow.
    assert!(
        read(&mut c, 0, size, 0, 4096) < 0,
        "read past the end succeeded"
    );
    assert!(
        write(&mut c, 0, size - 4096, 0, 8192) < 0,
        "write straddling the end succeeded"
    );
    d.wait_for_log("past the disk");
    drop(c);

    // Four queues at once, each rewriting its own 16 MiB of the disk, 16 x 64 KiB in flight;
    // buffers at odd addresses, which librbd takes as they are.
    let c = Client::connect(&d.socket, 4, 4 * 2 * MIB as usize).unwrap();
    let base = c.region.addr;
    let Client {
        queues,
        blkio,
        region,
    } = c;
    let threads: Vec<_> = queues
        .into_iter()
        .enumerate()
        .map(|(qi, mut q)| {
            std::thread::spawn(move || {
                let buf = (base + qi * 2 * MIB as usize) as *mut u8;
                // SAFETY: disjoint 2 MiB slices of one live mapping, one per thread.
                let slice = unsafe { std::slice::from_raw_parts_mut(buf, 2 * MIB as usize) };
                let (bs, depth, skew) = (64 * 1024, 16, 512 * qi);
                for pass in 0..16u64 {
                    let disk = |i: usize| qi as u64 * 16 * MIB + pass * MIB + (i * bs) as u64;
                    for i in 0..depth {
                        let b = &mut slice[skew + i * bs..skew + (i + 1) * bs];
                        fill_pattern(b, disk(i), 2);
                        q.write(disk(i), b.as_ptr(), bs, i, ReqFlags::empty());
                    }
                    assert!(
                        wait_all(&mut q, depth).iter().all(|(_, r)| *r == 0),
                        "queue {qi} write failed"
                    );
                    slice.fill(0);
                    for i in 0..depth {
                        q.read(
                            disk(i),
                            slice[skew + i * bs..].as_mut_ptr(),
                            bs,
                            i,
                            ReqFlags::empty(),
                        );
                    }
                    assert!(
                        wait_all(&mut q, depth).iter().all(|(_, r)| *r == 0),
                        "queue {qi} read failed"
                    );
                    for i in 0..depth {
                        check_pattern(&slice[skew + i * bs..skew + (i + 1) * bs], disk(i), 2)
                            .unwrap();
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    drop((blkio, region));

    // Everything the guest wrote and flushed is in the cluster after the daemon stops, and
    // the daemon stops cleanly (closing the image releases its exclusive lock).
    assert!(d.terminate().success(), "{}", d.log_text());
    let exported = cluster.export("rbd/disk");
    check_pattern(&exported, 0, 2).unwrap();

    // Read-only: reads served, writes refused, the image unchanged.
    let d = cluster.serve("rbd/disk", &["--read-only"]);
    let mut c = Client::connect_with(&d.socket, 1, 65536, true).unwrap();
    assert_eq!(read(&mut c, 0, 65536, 0, 65536), 0);
    check_pattern(&c.buf()[..65536], 65536, 2).unwrap();
    assert!(
        write(&mut c, 0, 0, 0, 4096) < 0,
        "write to a read-only disk succeeded"
    );
    drop(c);
    assert!(
        cluster.export("rbd/disk") == exported,
        "read-only image changed"
    );
}

/// What `serve` says about RBD targets it cannot serve, in one sentence each, before it
/// listens on anything.
#[test]
fn serve_names_each_rbd_problem_in_one_sentence() {
    let cluster = Cluster::start();
    cluster.rbd(&["create", "--size", "8M", "rbd/disk"]);
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s.sock");
    let ceph = cluster.args();
    let ceph: Vec<&str> = ceph.iter().map(String::as_str).collect();
    let serve = |target: &str, extra: &[&str]| {
        let base = ["serve", target, "--socket", socket.to_str().unwrap()];
        guardblk(&[&base[..], &ceph[..], extra].concat())
    };
    assert_one_sentence(
        &serve("rbd:rbd/missing", &[]),
        "there is no RBD image 'missing' in pool 'rbd'",
    );
    assert_one_sentence(
        &serve("rbd:nopool/disk", &[]),
        "there is no pool 'nopool' in the Ceph cluster",
    );
    assert_one_sentence(
        &serve("rbd:disk", &[]),
        "'rbd:disk' is not an RBD image name: write rbd:POOL/IMAGE",
    );
    assert_one_sentence(
        &serve("rbd:rbd/disk", &["--io-engine", "io-uring"]),
        "--io-engine io-uring does not apply to rbd: images",
    );
    assert_one_sentence(
        &serve("rbd:rbd/disk", &["--pi-meta", "rbd:rbd/nothere.pi"]),
        "PI metadata rbd:rbd/nothere.pi does not exist",
    );
    assert!(!socket.exists(), "a refused serve left a socket behind");
    // One daemon per image: the second is refused while the first holds the image.
    let first = cluster.serve("rbd/disk", &[]);
    assert_one_sentence(
        &serve("rbd:rbd/disk", &[]),
        "rbd:rbd/disk is in use by another Ceph client (it holds the image's exclusive lock)",
    );
    // Nor may a read-only daemon serve it beside a writer.
    assert_one_sentence(
        &serve("rbd:rbd/disk", &["--read-only"]),
        "rbd:rbd/disk is being written by another Ceph client",
    );
    drop(first);
}

/// A cluster that goes away under a guest: its requests fail with IOERR once --ceph-timeout
/// passes, the daemon keeps answering (stats), and it still shuts down when told to.
#[test]
fn a_cluster_that_goes_away_turns_into_io_errors_not_a_hang() {
    let cluster = Cluster::start();
    cluster.rbd(&["create", "--size", "16M", "rbd/disk"]);
    let mut d = cluster.serve("rbd/disk", &["--queues", "1", "--ceph-timeout", "3"]);
    let mut c = Client::connect(&d.socket, 1, 16 * 65536).unwrap();
    fill_pattern(&mut c.buf()[..65536], 0, 7);
    assert_eq!(write(&mut c, 0, 0, 0, 65536), 0);

    // Every Ceph daemon killed at once (SIGKILL, as a power loss would).
    let mut killed = 0;
    for entry in std::fs::read_dir(cluster.dir.join("run")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "pid") {
            let pid: i32 = std::fs::read_to_string(&path)
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            // SAFETY: kill(2) with a pid the cluster script recorded for its own daemon.
            let rc = unsafe { libc::kill(pid, libc::SIGKILL) };
            assert_eq!(rc, 0, "{}", path.display());
            killed += 1;
        }
    }
    assert_eq!(killed, 2, "expected a monitor and an OSD to kill");

    let started = Instant::now();
    for i in 0..8 {
        let ptr = c.buf_ptr(i * 65536);
        if i % 2 == 0 {
            c.queues[0].read(i as u64 * 65536, ptr, 65536, i, ReqFlags::empty());
        } else {
            c.queues[0].write(i as u64 * 65536, ptr, 65536, i, ReqFlags::empty());
        }
    }
    let mut results = Vec::new();
    while results.len() < 8 && started.elapsed() < Duration::from_secs(60) {
        results.extend(reap_some(&mut c.queues[0], 8, Duration::from_secs(5)));
    }
    let took = started.elapsed();
    assert_eq!(results.len(), 8, "requests still pending after {took:?}");
    assert!(results.iter().all(|(_, r)| *r < 0), "{results:?}");
    assert!(
        took < Duration::from_secs(30),
        "errors took {took:?} with a 3 s time-out"
    );
    // The daemon still answers, and counted every failure.
    assert_eq!(d.stats()["counters"]["io_errors"], 8, "{}", d.stats());
    drop(c);
    let stopping = Instant::now();
    assert!(d.terminate().success(), "{}", d.log_text());
    assert!(
        stopping.elapsed() < Duration::from_secs(30),
        "shutdown took {:?}",
        stopping.elapsed()
    );
}

/// PI on an RBD image: tuples in the RBD image IMAGE.pi beside it. Data written through the
/// daemon scrubs clean; a byte changed in the cluster behind the daemon's back fails exactly
/// the read that covers it (IOERR), and the daemon's log, the journal (this host's, under
/// --rbd-state-dir) and scrub name its LBA. Tools are refused while a daemon holds the image.
#[test]
fn pi_on_rbd_fails_the_read_of_a_block_changed_behind_the_daemons_back_and_names_its_lba() {
    let cluster = Cluster::start();
    let out = cluster.guardblk("create", "rbd/pi", &["--size", "16M", "--pi", "type1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("metadata in rbd:rbd/pi.pi"));

    let mut d = cluster.serve("rbd/pi", &["--queues", "1"]);
    d.wait_for_log("metadata rbd:rbd/pi.pi");
    let len = 4 * MIB as usize;
    let mut c = Client::connect(&d.socket, 1, len).unwrap();
    fill_pattern(c.buf(), 0, 9);
    assert_eq!(write(&mut c, 0, 0, 0, len), 0);
    c.queues[0].flush(0, ReqFlags::empty());
    assert_eq!(wait_all(&mut c.queues[0], 1)[0].1, 0);
    // Busy: tools are refused in one sentence, and nothing is changed.
    assert_one_sentence(
        &cluster.guardblk("scrub", "rbd/pi", &[]),
        "stop it before scrubbing it",
    );
    drop(c);
    assert!(d.terminate().success(), "{}", d.log_text());

    let text = cluster.scrub_clean("rbd/pi");
    assert!(text.contains("4096 blocks checked"), "{text}");

    // LBA 300 (byte 1228800 + 1000) changed in its RADOS object.
    let lba = 300u64;
    cluster.corrupt_byte("rbd/pi", lba * 4096 + 1000);
    let d = cluster.serve("rbd/pi", &["--queues", "1"]);
    let mut c = Client::connect(&d.socket, 1, len).unwrap();
    assert!(
        read(&mut c, 0, lba * 4096, 0, 4096) < 0,
        "the corrupt block was served"
    );
    assert!(
        read(&mut c, 0, 0, 0, len) < 0,
        "a read covering the corrupt block succeeded"
    );
    assert_eq!(
        read(&mut c, 0, (lba + 1) * 4096, 0, 4096),
        0,
        "its neighbour failed"
    );
    check_pattern(&c.buf()[..4096], (lba + 1) * 4096, 9).unwrap();
    d.wait_for_log(&format!(
        "PI guard error lba={lba} byte_offset={}",
        lba * 4096
    ));
    drop(c);
    drop(d);
    let journal =
        std::fs::read_to_string(cluster.state_dir().join("rbd/pi.pi-journal.jsonl")).unwrap();
    assert!(
        journal
            .lines()
            .any(|l| l.contains("\"guard_error\"") && l.contains(&format!("\"lba\":{lba},"))),
        "{journal}"
    );
    let out = cluster.guardblk("scrub", "rbd/pi", &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!("LBA {lba} (byte offset {})", lba * 4096)),
        "{text}"
    );
    assert!(text.contains(" 1 guard error"), "{text}");
    let out = cluster.guardblk("info", "rbd/pi", &["--json"]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["pi"]["format"], "type1", "{doc}");
    assert_eq!(doc["pi"]["metadata"]["path"], "rbd:rbd/pi.pi", "{doc}");
    assert_eq!(doc["journal"]["guard_error_lbas"][0]["lba"], lba, "{doc}");

    // The object holding the written blocks deleted behind guardblk's back: scrub finds it
    // gone (a hole, which it does not read) and names every block whose tuple says it was
    // written. The other objects never existed, and their blocks are clean.
    cluster.remove_object("rbd/pi", 0);
    let out = cluster.guardblk("scrub", "rbd/pi", &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains(" 1024 guard errors"), "{text}");
    assert!(text.contains("LBA 1023 (byte offset"), "{text}");
    assert!(!text.contains("LBA 1024 (byte offset"), "{text}");
}

/// A crash round on RBD: the daemon killed (SIGKILL) with writes in flight, after a flush the
/// guest saw complete. The restart takes the image over once the cluster lets the dead
/// client's lock go, re-checks the regions with write intents, and serves; the flushed data
/// is intact and the image scrubs clean.
#[test]
fn kill_9_under_writes_on_rbd_loses_nothing_flushed_and_scrubs_clean() {
    let cluster = Cluster::start();
    let out = cluster.guardblk("create", "rbd/crash", &["--size", "32M", "--pi", "type1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut d = cluster.serve("rbd/crash", &["--queues", "1"]);
    let (bs, depth) = (64 * 1024, 32usize);
    let mut c = Client::connect(&d.socket, 1, bs * depth).unwrap();
    // 2 MiB flushed: must survive.
    for i in 0..depth {
        fill_pattern(&mut c.buf()[i * bs..(i + 1) * bs], (i * bs) as u64, 11);
        let ptr = c.buf_ptr(i * bs);
        c.queues[0].write((i * bs) as u64, ptr, bs, i, ReqFlags::empty());
    }
    assert!(wait_all(&mut c.queues[0], depth)
        .iter()
        .all(|(_, r)| *r == 0));
    c.queues[0].flush(0, ReqFlags::empty());
    assert_eq!(wait_all(&mut c.queues[0], 1)[0].1, 0);
    // Then writes all over the rest of the disk, killed with some in flight.
    let mut rng = Rng(seed_from_env("GUARDBLK_CRASH_SEED"));
    for round in 0..20 {
        for i in 0..depth {
            let block = rng.between(2 * MIB / bs as u64, 32 * MIB / bs as u64);
            fill_pattern(
                &mut c.buf()[i * bs..(i + 1) * bs],
                block * bs as u64,
                12 + round,
            );
            let ptr = c.buf_ptr(i * bs);
            c.queues[0].write(block * bs as u64, ptr, bs, i, ReqFlags::empty());
        }
        if round < 19 {
            wait_all(&mut c.queues[0], depth);
        }
    }
    d.child.kill().unwrap();
    let _ = d.child.wait();
    drop(c);

    let started = Instant::now();
    let mut d = cluster.spawn("rbd/crash", &["--queues", "1"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !d.log_text().contains("guardblk ready") {
        assert!(
            d.child.try_wait().unwrap().is_none(),
            "restart failed:\n{}",
            d.log_text()
        );
        assert!(
            Instant::now() < deadline,
            "restart never ready:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "restart took {:?} (the dead client's lock)",
        started.elapsed()
    );
    assert!(
        d.log_text().contains("PI metadata was not closed cleanly"),
        "{}",
        d.log_text()
    );
    let mut c = Client::connect(&d.socket, 1, 2 * MIB as usize).unwrap();
    assert_eq!(read(&mut c, 0, 0, 0, 2 * MIB as usize), 0);
    check_pattern(&c.buf()[..2 * MIB as usize], 0, 11).unwrap();
    drop(c);
    assert!(d.terminate().success(), "{}", d.log_text());
    cluster.scrub_clean("rbd/crash");
}
