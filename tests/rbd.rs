//! Ceph RBD targets against a real one-node cluster (tests/ceph/cluster.sh: a monitor and a
//! memstore OSD on 127.0.0.1, started for this test and removed after it). Needs Debian's
//! ceph-mon, ceph-osd and ceph-common (the `rbd` tool) and librbd1, which .ci/run installs.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;

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
        // A port of its own, so a developer's cluster on the default port is left alone.
        let port = 27000 + (std::process::id() % 20) * 100;
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

    /// The `rbd` tool against this cluster.
    fn rbd(&self, args: &[&str]) {
        let out = Command::new("rbd")
            .arg("-c")
            .arg(self.conf())
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "rbd {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
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

/// `guardblk info TARGET --ceph-conf CONF EXTRA...`
fn info(target: &str, conf: &Path, extra: &[&str]) -> Output {
    let base = ["info", target, "--ceph-conf", conf.to_str().unwrap()];
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
    assert!(
        text.contains("rbd:rbd/disk (Ceph RBD: pool rbd, image disk;"),
        "{text}"
    );
    assert!(text.contains("size:      67108864 bytes"), "{text}");
    assert!(text.contains("PI:        none"), "{text}");
    let out = info("rbd:rbd/disk", &conf, &["--json"]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["size"], 64 << 20);
    assert_eq!(doc["pool"], "rbd");
    assert_eq!(doc["rbd_image"], "disk");
    assert_eq!(doc["kind"], "rbd");

    // Growing the image shows at once: the size is Ceph's, not a cached one.
    cluster.rbd(&["resize", "--size", "128M", "rbd/disk"]);
    let out = info("rbd:rbd/disk", &conf, &["--json"]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["size"], 128 << 20);

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
    // Commands that do not take RBD images yet say so.
    assert_one_sentence(
        &guardblk(&["scrub", "rbd:rbd/disk"]),
        "guardblk scrub does not take Ceph RBD images yet",
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
