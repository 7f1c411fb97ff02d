//! The PI tools as an operator meets them: create, import, scrub, info and inject on real
//! files, and `serve` refusing metadata that is damaged or belongs to another image.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The command failed with status `code` and exactly one `guardblk: ` line on stderr
/// containing `needle`.
fn assert_one_sentence(out: &Output, code: i32, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout: {}\nstderr: {stderr}",
        stdout(out)
    );
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "expected one line, got:\n{stderr}"
    );
    assert!(stderr.starts_with("guardblk: "), "{stderr}");
    assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        stdout(out),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `guardblk serve IMAGE --socket DIR/s.sock EXTRA...`, run to completion (these fail fast).
fn serve(image: &Path, extra: &[&str]) -> Output {
    let socket = image.with_extension("sock");
    let base = ["serve", s(image), "--socket", s(&socket)];
    guardblk(&[&base[..], extra].concat())
}

fn pi_of(image: &Path) -> PathBuf {
    PathBuf::from(format!("{}.pi", image.display()))
}

/// A raw image of `size` bytes with a pattern (depending on `seed`) written in the given
/// byte ranges and holes everywhere else.
fn raw_image(path: &Path, size: u64, seed: u64, written: &[(u64, u64)]) {
    let file = std::fs::File::create(path).unwrap();
    file.set_len(size).unwrap();
    for &(start, len) in written {
        let mut buf = vec![0u8; len as usize];
        fill_pattern(&mut buf, start, seed);
        file.write_all_at(&buf, start).unwrap();
    }
    file.sync_all().unwrap();
}

/// A `size`-byte raw image with data in its first half and PI imported with `pi_args`.
fn imported(dir: &Path, name: &str, size: u64, seed: u64, pi_args: &[&str]) -> PathBuf {
    let image = dir.join(name);
    raw_image(&image, size, seed, &[(0, size / 2)]);
    let out = guardblk(&[&["import", s(&image)][..], pi_args].concat());
    assert_ok(&out);
    assert!(stdout(&out).contains("imported"), "{}", stdout(&out));
    image
}

/// (LBA, kind) of every guard error in `scrub --json` output; also checks the summary.
fn scrub_json(image: &Path) -> (i32, BTreeSet<(u64, String)>, Value) {
    let out = guardblk(&["scrub", s(image), "--json"]);
    let text = stdout(&out);
    let mut errors = BTreeSet::new();
    let mut summary = Value::Null;
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if let Some(s) = v.get("summary") {
            summary = s.clone();
            continue;
        }
        assert_eq!(v["event"], "guard_error", "{line}");
        assert_eq!(v["source"], "scrub", "{line}");
        let lba = v["lba"].as_u64().unwrap();
        assert!(v["byte_offset"].as_u64().is_some(), "{line}");
        assert!(v["expected"].as_str().unwrap().starts_with("0x"), "{line}");
        assert!(v["actual"].as_str().unwrap().starts_with("0x"), "{line}");
        assert!(v["time"].as_str().is_some(), "{line}");
        errors.insert((lba, v["kind"].as_str().unwrap().to_string()));
    }
    assert!(
        summary.is_object(),
        "no summary line in:\n{text}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(summary["errors"].as_u64(), Some(errors.len() as u64));
    (out.status.code().unwrap(), errors, summary)
}

fn inject(image: &Path, lba: u64, kind: &str) -> Output {
    guardblk(&[
        "inject",
        s(image),
        "--lba",
        &lba.to_string(),
        "--kind",
        kind,
    ])
}

#[test]
fn help_describes_the_pi_tools_and_scrub_exit_codes() {
    let text = stdout(&guardblk(&["--help"]));
    for word in ["create", "import", "scrub", "info", "inject", "serve"] {
        assert!(text.contains(word), "--help lacks {word}:\n{text}");
    }
    let scrub = stdout(&guardblk(&["scrub", "--help"]));
    for word in ["Exit status", "0 ", "1 ", "2 ", "--json", "--pi-meta"] {
        assert!(
            scrub.contains(word),
            "scrub --help lacks {word:?}:\n{scrub}"
        );
    }
    let inject = stdout(&guardblk(&["inject", "--help"]));
    for word in ["--lba", "--kind", "data", "guard", "ref", "app"] {
        assert!(inject.contains(word), "inject --help lacks {word}");
    }
    for cmd in ["import", "info", "create"] {
        assert!(stdout(&guardblk(&[cmd, "--help"])).contains("--pi-meta"));
    }
}

#[test]
fn creating_a_1_tib_protected_image_is_fast_with_sparse_data_and_allocated_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("big.img");
    let start = Instant::now();
    let out = guardblk(&["create", s(&image), "--size", "1T"]);
    let took = start.elapsed();
    assert_ok(&out);
    assert!(took < Duration::from_secs(10), "create took {took:?}");
    let img = std::fs::metadata(&image).unwrap();
    assert_eq!(img.len(), 1 << 40);
    assert!(img.blocks() * 512 < MIB, "image not sparse");
    let pi = std::fs::metadata(pi_of(&image)).unwrap();
    // Header page + 128 KiB bitmap + 2 GiB of 8-byte tuples.
    assert_eq!(pi.len(), 4096 + (128 << 10) + (2 << 30));
    // The metadata is allocated up front (fallocate: extents reserved, nothing
    // written), so a tuple store can never fault on a full file system.
    assert!(
        pi.blocks() * 512 >= pi.len(),
        "metadata not allocated: {} of {} bytes",
        pi.blocks() * 512,
        pi.len()
    );
    let info = stdout(&guardblk(&["info", s(&image)]));
    assert!(
        info.contains("type1, 4096-byte intervals, 268435456 blocks"),
        "{info}"
    );
    assert!(info.contains("state:     clean"), "{info}");
}

/// A fresh 4 MiB type1 image and its metadata path.
fn fresh(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let image = dir.join(name);
    assert_ok(&guardblk(&["create", s(&image), "--size", "4M"]));
    let pi = pi_of(&image);
    (image, pi)
}

fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

#[test]
fn serve_refuses_damaged_metadata_in_one_sentence() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    let (image, pi) = fresh(d, "truncated.img");
    let len = std::fs::metadata(&pi).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&pi)
        .unwrap()
        .set_len(len - 4096)
        .unwrap();
    assert_one_sentence(&serve(&image, &[]), 1, "truncated");

    let (image, pi) = fresh(d, "tiny.img");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&pi)
        .unwrap()
        .set_len(100)
        .unwrap();
    assert_one_sentence(&serve(&image, &[]), 1, "truncated");

    let (image, pi) = fresh(d, "magic.img");
    patch(&pi, 0, b"NOTMAGIC");
    assert_one_sentence(&serve(&image, &[]), 1, "bad magic");

    let (image, pi) = fresh(d, "version.img");
    patch(&pi, 8, &9u32.to_le_bytes());
    assert_one_sentence(&serve(&image, &[]), 1, "version 9");

    let (image, pi) = fresh(d, "checksum.img");
    patch(&pi, 40, &[0xff]);
    assert_one_sentence(&serve(&image, &[]), 1, "header checksum mismatch");

    let (image, _pi) = fresh(d, "resized.img");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(8 * MIB)
        .unwrap();
    assert_one_sentence(&serve(&image, &[]), 1, "resized");

    // An explicit --pi-meta that does not exist.
    let (image, _pi) = fresh(d, "elsewhere.img");
    let missing = d.join("no-such.pi");
    assert_one_sentence(
        &serve(&image, &["--pi-meta", s(&missing)]),
        1,
        "does not exist",
    );
}

#[test]
fn serve_refuses_metadata_of_another_image() {
    let dir = tempfile::tempdir().unwrap();
    let a = imported(dir.path(), "a.img", 4 * MIB, 1, &[]);
    let b = imported(dir.path(), "b.img", 4 * MIB, 2, &[]);

    // A served with B's metadata.
    let out = serve(&a, &["--pi-meta", s(&pi_of(&b))]);
    assert_one_sentence(&out, 1, "does not belong");

    // B's metadata copied over A's.
    std::fs::copy(pi_of(&b), pi_of(&a)).unwrap();
    assert_one_sentence(&serve(&a, &[]), 1, "does not belong");
    assert_one_sentence(&guardblk(&["scrub", s(&a)]), 2, "does not belong");

    // A genuine copy of B (other inode, same data) is accepted: the sample verifies.
    let c = dir.path().join("c.img");
    std::fs::copy(&b, &c).unwrap();
    std::fs::copy(pi_of(&b), pi_of(&c)).unwrap();
    let (code, errors, _) = scrub_json(&c);
    assert_eq!((code, errors.len()), (0, 0));
}

#[test]
fn metadata_behind_a_symbolic_link_is_refused_in_one_sentence() {
    let dir = tempfile::tempdir().unwrap();
    let a = imported(dir.path(), "a.img", 4 * MIB, 1, &[]);
    // Someone who can write the directory swaps the metadata for a link to another file.
    let elsewhere = dir.path().join("elsewhere.pi");
    std::fs::rename(pi_of(&a), &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, pi_of(&a)).unwrap();
    let before = std::fs::read(&elsewhere).unwrap();
    assert_one_sentence(&serve(&a, &[]), 1, "is a symbolic link");
    assert_one_sentence(&guardblk(&["scrub", s(&a)]), 2, "is a symbolic link");
    assert_eq!(
        std::fs::read(&elsewhere).unwrap(),
        before,
        "written through the link"
    );
}

#[test]
fn import_then_scrub_is_clean() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("data.img");
    // Data, a hole, data at the very end.
    raw_image(
        &image,
        16 * MIB,
        7,
        &[
            (0, 3 * MIB + 512),
            (10 * MIB, 4096),
            (16 * MIB - 8192, 8192),
        ],
    );
    let out = guardblk(&["import", s(&image)]);
    assert_ok(&out);
    let text = stdout(&out);
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.contains("4096 blocks"), "{text}");
    assert!(text.contains("type1"), "{text}");

    let out = guardblk(&["scrub", s(&image)]);
    assert_ok(&out);
    let text = stdout(&out);
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.contains("4096 blocks checked"), "{text}");
    assert!(text.contains(" 0 guard errors"), "{text}");

    let (code, errors, summary) = scrub_json(&image);
    assert_eq!(code, 0);
    assert!(errors.is_empty());
    assert_eq!(summary["blocks"], 4096);
    assert_eq!(summary["errors"], 0);
    assert_eq!(summary["format"], "type1");
    assert_eq!(summary["interval"], 4096);
    assert_eq!(summary["recovered"], 0);

    // Importing again is refused, pointing at scrub; so are --pi none and odd sizes.
    assert_one_sentence(&guardblk(&["import", s(&image)]), 1, "scrub");
    let raw = dir.path().join("raw.img");
    raw_image(&raw, 4 * MIB + 512, 3, &[(0, MIB)]);
    assert_one_sentence(
        &guardblk(&["import", s(&raw), "--pi", "none"]),
        1,
        "--pi none",
    );
    assert_one_sentence(
        &guardblk(&["import", s(&raw)]),
        1,
        "not a multiple of the 4096-byte protection interval",
    );
    assert!(!pi_of(&raw).exists(), "half-made metadata left behind");
    // With 512-byte intervals it fits.
    assert_ok(&guardblk(&["import", s(&raw), "--interval", "512"]));
    let (code, _, summary) = scrub_json(&raw);
    assert_eq!(code, 0);
    assert_eq!(summary["blocks"], (4 * MIB + 512) / 512);
    assert_eq!(summary["interval"], 512);
}

#[test]
fn import_and_scrub_with_metadata_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("data.img");
    raw_image(&image, 4 * MIB, 9, &[(0, 2 * MIB)]);
    let meta = dir.path().join("meta").join("data.meta");
    std::fs::create_dir(meta.parent().unwrap()).unwrap();
    assert_ok(&guardblk(&[
        "import",
        s(&image),
        "--pi",
        "nvme64",
        "--pi-meta",
        s(&meta),
    ]));
    assert!(meta.exists() && !pi_of(&image).exists());
    let out = guardblk(&["scrub", s(&image), "--pi-meta", s(&meta)]);
    assert_ok(&out);
    // Without --pi-meta the image has no metadata.
    assert_one_sentence(&guardblk(&["scrub", s(&image)]), 2, "import");
    assert_one_sentence(&inject(&image, 1, "guard"), 1, "import");
    let out = guardblk(&[
        "inject",
        s(&image),
        "--lba",
        "1",
        "--kind",
        "guard",
        "--pi-meta",
        s(&meta),
    ]);
    assert_ok(&out);
    let out = guardblk(&["scrub", s(&image), "--pi-meta", s(&meta)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).starts_with("LBA 1 (byte offset 4096): guard mismatch"));
    let info = stdout(&guardblk(&["info", s(&image), "--pi-meta", s(&meta)]));
    assert!(
        info.contains("nvme64, 4096-byte intervals, 1024 blocks, 16-byte tuples"),
        "{info}"
    );
}

fn inject_each_kind(pi_args: &[&str], interval: u64) {
    let dir = tempfile::tempdir().unwrap();
    let image = imported(dir.path(), "disk.img", 4 * MIB, 5, pi_args);
    let blocks = 4 * MIB / interval;
    let hole = blocks - 3; // in the unwritten second half
    let cases = [
        (3u64, "data", "guard"),
        (5, "guard", "guard"),
        (7, "ref", "ref"),
        (9, "app", "app"),
        (hole, "guard", "guard"),
        (hole + 1, "data", "guard"),
        (hole + 2, "app", "app"),
    ];
    for (lba, kind, _) in cases {
        let out = inject(&image, lba, kind);
        assert_ok(&out);
        let text = stdout(&out);
        assert!(text.contains(&format!("LBA {lba} ")), "{text}");
        assert!(
            text.contains(&format!("byte offset {}", lba * interval)),
            "{text}"
        );
    }
    let expected: BTreeSet<(u64, String)> = cases
        .iter()
        .map(|&(lba, _, found)| (lba, found.to_string()))
        .collect();

    let out = guardblk(&["scrub", s(&image)]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), cases.len() + 1, "{text}");
    for (lba, found) in &expected {
        let prefix = format!(
            "LBA {lba} (byte offset {}): {found} mismatch",
            lba * interval
        );
        assert!(
            lines.iter().any(|l| l.starts_with(&prefix)),
            "no {prefix:?} in:\n{text}"
        );
    }
    assert!(lines.last().unwrap().contains("7 guard errors"), "{text}");

    let (code, errors, summary) = scrub_json(&image);
    assert_eq!(code, 1);
    assert_eq!(errors, expected);
    assert_eq!(summary["blocks"], blocks);
    assert_eq!(summary["interval"], interval);

    let out = inject(&image, blocks, "data");
    assert_one_sentence(&out, 1, "past the end");
}

#[test]
fn injected_faults_are_found_by_scrub_type1() {
    inject_each_kind(&[], 4096);
}

#[test]
fn injected_faults_are_found_by_scrub_nvme64_512() {
    inject_each_kind(&["--pi", "nvme64", "--interval", "512"], 512);
}

#[test]
fn type3_has_no_reference_tag_check() {
    let dir = tempfile::tempdir().unwrap();
    let image = imported(dir.path(), "t3.img", 4 * MIB, 11, &["--pi", "type3"]);
    assert_ok(&inject(&image, 7, "ref"));
    assert_ok(&inject(&image, 1000, "ref")); // unwritten: a real tuple is made first
    let (code, errors, summary) = scrub_json(&image);
    assert_eq!((code, errors.len()), (0, 0), "{summary}");
    assert_eq!(summary["format"], "type3");
    assert_ok(&inject(&image, 8, "guard"));
    let (code, errors, _) = scrub_json(&image);
    assert_eq!(code, 1);
    assert_eq!(errors, BTreeSet::from([(8, "guard".to_string())]));
}

#[test]
fn info_shows_format_geometry_and_the_journal_by_lba() {
    let dir = tempfile::tempdir().unwrap();
    let image = imported(
        dir.path(),
        "disk.img",
        8 * MIB,
        4,
        &["--pi", "type1", "--interval", "512"],
    );
    assert_ok(&inject(&image, 17, "guard"));
    assert_ok(&inject(&image, 42, "ref"));
    assert_eq!(guardblk(&["scrub", s(&image)]).status.code(), Some(1));
    assert_eq!(guardblk(&["scrub", s(&image)]).status.code(), Some(1));

    let out = guardblk(&["info", s(&image)]);
    assert_ok(&out);
    let text = stdout(&out);
    for needle in [
        "type1, 512-byte intervals, 16384 blocks, 8-byte tuples",
        "state:     clean",
        "guard_error 4, injected 2, recovered 0",
        "blocks with guard errors: 2",
        "LBA 17 (byte offset 8704): guard x2",
        "LBA 42 (byte offset 21504): ref x2",
        "injected LBA 17 (byte offset 8704) guard",
        "uuid:",
        "created:",
        "inode",
    ] {
        assert!(text.contains(needle), "info lacks {needle:?}:\n{text}");
    }

    let out = guardblk(&["info", s(&image), "--json"]);
    assert_ok(&out);
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["pi"]["format"], "type1");
    assert_eq!(v["pi"]["interval"], 512);
    assert_eq!(v["pi"]["blocks"], 16384);
    assert_eq!(v["pi"]["tuple_size"], 8);
    assert_eq!(v["pi"]["state"], "clean");
    assert_eq!(v["image"]["size"], 8 * MIB);
    assert_eq!(v["journal"]["records"], 6);
    assert_eq!(v["journal"]["by_event"]["guard_error"], 4);
    assert_eq!(v["journal"]["by_event"]["injected"], 2);
    let lbas: Vec<u64> = v["journal"]["guard_error_lbas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["lba"].as_u64().unwrap())
        .collect();
    assert_eq!(lbas, [17, 42]);
    assert_eq!(v["journal"]["guard_error_lbas"][1]["kinds"]["ref"], 2);
    assert_eq!(v["journal"]["last"].as_array().unwrap().len(), 6);

    // No metadata: said so, with the way to add it, and success.
    let raw = dir.path().join("raw.img");
    assert_ok(&guardblk(&[
        "create",
        s(&raw),
        "--size",
        "1M",
        "--pi",
        "none",
    ]));
    let out = guardblk(&["info", s(&raw)]);
    assert_ok(&out);
    assert!(stdout(&out).contains("guardblk import"), "{}", stdout(&out));
    let v: Value = serde_json::from_str(&stdout(&guardblk(&["info", s(&raw), "--json"]))).unwrap();
    assert!(v["pi"].is_null());
}

#[test]
fn info_works_while_served_but_inject_and_scrub_refuse() {
    let d = Daemon::start_created(&std::env::temp_dir(), 4 * MIB, &["--pi", "type1"], &[]);
    let out = guardblk(&["info", s(&d.image)]);
    assert_ok(&out);
    let text = stdout(&out);
    assert!(text.contains("type1, 4096-byte intervals"), "{text}");
    assert!(text.contains("in use"), "{text}");
    let v: Value =
        serde_json::from_str(&stdout(&guardblk(&["info", s(&d.image), "--json"]))).unwrap();
    assert_eq!(v["pi"]["state"], "in_use");

    assert_one_sentence(&inject(&d.image, 0, "data"), 1, "being served");
    assert_one_sentence(&guardblk(&["scrub", s(&d.image)]), 2, "being served");
    assert_one_sentence(
        &guardblk(&[
            "import",
            s(&d.image),
            "--pi-meta",
            s(&d.dir.path().join("x.pi")),
        ]),
        1,
        "being served",
    );
    drop(d);
}

/// A killed daemon's image lock goes when the kernel has torn down its io_uring rings, which
/// happens asynchronously after exit.
fn wait_until_unlocked(image: &Path) {
    use std::os::fd::AsRawFd;
    let deadline = Instant::now() + Duration::from_secs(20);
    let file = std::fs::File::open(image).unwrap();
    // SAFETY: flock on a descriptor we own.
    while unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        assert!(Instant::now() < deadline, "image lock never released");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn scrub_after_a_killed_daemon_recovers_and_is_clean() {
    let mut d = Daemon::start_created(&std::env::temp_dir(), 4 * MIB, &["--pi", "type1"], &[]);
    let mut c = Client::connect(&d.socket, 1, MIB as usize).unwrap();
    fill_pattern(c.buf(), 0, 21);
    assert_eq!(write(&mut c, 0, MIB, 0, MIB as usize), 0);
    d.child.kill().unwrap();
    d.child.wait().unwrap();
    drop(c);
    wait_until_unlocked(&d.image);
    let info = stdout(&guardblk(&["info", s(&d.image)]));
    assert!(info.contains("not closed cleanly"), "{info}");
    let (code, errors, summary) = scrub_json(&d.image);
    assert_eq!((code, errors.len()), (0, 0), "{summary}");
    assert!(summary["recovered"].as_u64().is_some());
    let info = stdout(&guardblk(&["info", s(&d.image)]));
    assert!(info.contains("state:     clean"), "{info}");
}

#[test]
fn scrub_without_metadata_cannot_run() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("raw.img");
    assert_ok(&guardblk(&[
        "create",
        s(&image),
        "--size",
        "1M",
        "--pi",
        "none",
    ]));
    assert_one_sentence(&guardblk(&["scrub", s(&image)]), 2, "guardblk import");
    assert_one_sentence(
        &guardblk(&[
            "scrub",
            s(&image),
            "--json",
            "--pi-meta",
            s(&dir.path().join("x")),
        ]),
        2,
        "does not exist",
    );
    assert_one_sentence(
        &guardblk(&["scrub", s(&dir.path().join("missing.img"))]),
        2,
        "does not exist",
    );
    assert_one_sentence(&inject(&image, 0, "guard"), 1, "guardblk import");
}

#[test]
fn serve_without_an_image_creates_a_protected_default() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s.sock");
    let log = dir.path().join("log");
    let mut child = Command::new(BIN)
        .args(["serve", "--socket", s(&socket)])
        .current_dir(dir.path())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("guardblk ready")
    {
        assert!(Instant::now() < deadline, "never ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(text.contains("type1, 4096-byte intervals"), "{text}");
    let image = dir.path().join("guardblk-default.img");
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 8 << 30);
    assert!(pi_of(&image).exists());
}
