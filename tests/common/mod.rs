//! Shared harness for the end-to-end tests: starts the real `guardblk` binary on a temporary
//! image and drives it with libblkio's virtio-blk-vhost-user driver.
#![allow(dead_code)]

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, MemoryRegion, ReqFlags};

pub const BIN: &str = env!("CARGO_BIN_EXE_guardblk");

/// Run the binary with `args` to completion (errors-only logging), as an operator would.
pub fn guardblk(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .unwrap()
}

/// A running daemon; killed (SIGKILL) on drop if the test did not stop it.
pub struct Daemon {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub image: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Daemon {
    /// Create a `size`-byte image and serve it with the extra `args`.
    pub fn start(size: u64, args: &[&str]) -> Daemon {
        Self::start_in(&std::env::temp_dir(), size, args)
    }

    /// As [`Daemon::start`], with the image on the filesystem holding `base`. The image is
    /// plain raw (`--pi none`): these tests cover the data path without PI.
    pub fn start_in(base: &Path, size: u64, args: &[&str]) -> Daemon {
        Self::start_created(base, size, &["--pi", "none"], args)
    }

    /// Create a `size`-byte image with `create_args` (e.g. `--pi type1 --interval 512`) on
    /// the filesystem holding `base`, and serve it with `args`.
    pub fn start_created(base: &Path, size: u64, create_args: &[&str], args: &[&str]) -> Daemon {
        let dir = tempfile::tempdir_in(base).unwrap();
        let image = dir.path().join("disk.img");
        let status = Command::new(BIN)
            .args([
                "create",
                image.to_str().unwrap(),
                "--size",
                &size.to_string(),
            ])
            .args(create_args)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "guardblk create failed");
        Self::serve(dir, image, args)
    }

    /// Serve an existing image. `args` may name `--socket`; otherwise it goes inside `dir`.
    pub fn serve(dir: tempfile::TempDir, image: PathBuf, args: &[&str]) -> Daemon {
        let d = Self::spawn(dir, image, args);
        d.wait_for_log("guardblk ready");
        d
    }

    /// As [`Daemon::serve`], without waiting for it to be ready.
    pub fn spawn(dir: tempfile::TempDir, image: PathBuf, args: &[&str]) -> Daemon {
        let socket = match args.iter().position(|a| *a == "--socket") {
            Some(i) => PathBuf::from(args[i + 1]),
            None => dir.path().join("guardblk.sock"),
        };
        let log = dir.path().join("daemon.log");
        let mut command = Command::new(BIN);
        command.args(["serve", image.to_str().unwrap()]).args(args);
        if !args.contains(&"--socket") {
            command.args(["--socket", socket.to_str().unwrap()]);
        }
        let child = command
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Daemon {
            child,
            dir,
            image,
            socket,
            log,
        }
    }

    /// Wait (up to 20 s) until the daemon is ready, or has exited (`Err`: its log).
    pub fn wait_ready_or_exit(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.log_text().contains("guardblk ready") {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                return Err(format!("daemon exited ({status}):\n{}", self.log_text()));
            }
            assert!(
                Instant::now() < deadline,
                "daemon neither ready nor exited; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Serve the same image again after the daemon was killed. A killed daemon's image lock
    /// can outlive it briefly (its io_uring, which holds the image as a registered file, is
    /// torn down asynchronously by the kernel), so a start refused with "already being
    /// served" is retried for up to `patience`. Returns the daemon and how long it was
    /// refused (zero: the first start succeeded).
    pub fn restart_after_kill(mut self, args: &[&str], patience: Duration) -> (Daemon, Duration) {
        let _ = self.child.wait();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        let image = self.image.clone();
        drop(self);
        let first = Instant::now();
        let mut dir = Some(dir);
        loop {
            let attempt = Instant::now();
            let mut d = Daemon::spawn(dir.take().unwrap(), image.clone(), args);
            match d.wait_ready_or_exit() {
                Ok(()) => {
                    let refused = if attempt == first {
                        Duration::ZERO
                    } else {
                        attempt - first
                    };
                    return (d, refused);
                }
                Err(log) => {
                    assert!(
                        log.contains("already being served") && first.elapsed() < patience,
                        "restart after a kill failed (refused for {:?}): {log}",
                        first.elapsed()
                    );
                    dir = Some(std::mem::replace(&mut d.dir, tempfile::tempdir().unwrap()));
                    drop(d);
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait (up to 20 s) until the daemon's log contains `needle`.
    pub fn wait_for_log(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.log_text().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "daemon never logged {needle:?}; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Count occurrences of `needle` in the log.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log_text().matches(needle).count()
    }

    /// Stop (SIGTERM, must exit cleanly) and serve the same image again with `args`.
    pub fn restart(mut self, args: &[&str]) -> Daemon {
        let status = self.terminate();
        assert!(status.success(), "daemon exited with {status}");
        self.restart_after_exit(args)
    }

    /// Serve the same image again once the daemon has exited (or was killed).
    pub fn restart_after_exit(mut self, args: &[&str]) -> Daemon {
        let _ = self.child.wait();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        let image = self.image.clone();
        drop(self);
        Daemon::serve(dir, image, args)
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A libblkio connection with one shared buffer region.
pub struct Client {
    pub blkio: Blkio,
    pub queues: Vec<Blkioq>,
    pub region: MemoryRegion,
}

impl Client {
    pub fn connect(socket: &Path, num_queues: i32, buffer_len: usize) -> blkio::Result<Client> {
        Self::connect_with(socket, num_queues, buffer_len, false)
    }

    pub fn connect_with(
        socket: &Path,
        num_queues: i32,
        buffer_len: usize,
        read_only: bool,
    ) -> blkio::Result<Client> {
        let mut blkio = Blkio::new("virtio-blk-vhost-user")?;
        blkio.set_str("path", socket.to_str().unwrap())?;
        blkio.set_bool("read-only", read_only)?;
        blkio.connect()?;
        blkio.set_i32("num-queues", num_queues)?;
        let outcome = blkio.start()?;
        let align = blkio.get_u64("mem-region-alignment")? as usize;
        let len = buffer_len.div_ceil(align) * align;
        let region = blkio.alloc_mem_region(len)?;
        blkio.map_mem_region(&region)?;
        Ok(Client {
            blkio,
            queues: outcome.queues,
            region,
        })
    }

    pub fn capacity(&self) -> u64 {
        self.blkio.get_u64("capacity").unwrap()
    }

    /// The buffer region as a byte slice.
    pub fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the region is a live shared mapping of `len` bytes owned by this client.
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }

    pub fn buf_ptr(&self, offset: usize) -> *mut u8 {
        (self.region.addr + offset) as *mut u8
    }
}

/// Wait for `n` completions on `q`; returns their `ret` values indexed by user_data order.
pub fn wait_all(q: &mut Blkioq, n: usize) -> Vec<(usize, i32)> {
    let mut out = Vec::with_capacity(n);
    let mut completions: Vec<MaybeUninit<blkio::Completion>> =
        (0..n.max(1)).map(|_| MaybeUninit::uninit()).collect();
    while out.len() < n {
        let want = n - out.len();
        let mut timeout = Duration::from_secs(30);
        let got = q
            .do_io(&mut completions[..want], 1, Some(&mut timeout), None)
            .expect("do_io");
        assert!(got > 0, "timed out waiting for completions");
        for c in &completions[..got] {
            // SAFETY: do_io initialised the first `got` entries.
            let c = unsafe { c.assume_init_ref() };
            out.push((c.user_data, c.ret));
        }
    }
    out
}

pub fn read(client: &mut Client, q: usize, offset: u64, buf_off: usize, len: usize) -> i32 {
    let ptr = client.buf_ptr(buf_off);
    client.queues[q].read(offset, ptr, len, 0, ReqFlags::empty());
    wait_all(&mut client.queues[q], 1)[0].1
}

pub fn write(client: &mut Client, q: usize, offset: u64, buf_off: usize, len: usize) -> i32 {
    let ptr = client.buf_ptr(buf_off);
    client.queues[q].write(offset, ptr, len, 0, ReqFlags::empty());
    wait_all(&mut client.queues[q], 1)[0].1
}

/// A pattern that differs per byte offset on the disk and per `seed`.
pub fn pattern_byte(disk_offset: u64, seed: u64) -> u8 {
    let x = (disk_offset / 8).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ seed.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    (x >> ((disk_offset % 8) * 8)) as u8
}

pub fn fill_pattern(buf: &mut [u8], disk_offset: u64, seed: u64) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = pattern_byte(disk_offset + i as u64, seed);
    }
}

pub fn check_pattern(buf: &[u8], disk_offset: u64, seed: u64) -> Result<(), String> {
    match buf
        .iter()
        .enumerate()
        .find(|(i, b)| **b != pattern_byte(disk_offset + *i as u64, seed))
    {
        None => Ok(()),
        Some((i, b)) => Err(format!(
            "mismatch at disk offset {}: got {:#04x}, want {:#04x}",
            disk_offset + i as u64,
            b,
            pattern_byte(disk_offset + i as u64, seed)
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// PI helpers: the metadata file's layout, corrupting data and tuples behind the daemon's back,
// the error journal, the daemon's guard-error log lines and `guardblk scrub --json`.
// ---------------------------------------------------------------------------------------------

/// `IMAGE.pi`.
pub fn meta_path(image: &Path) -> PathBuf {
    let mut name = image.as_os_str().to_owned();
    name.push(".pi");
    PathBuf::from(name)
}

/// `IMAGE.pi-journal.jsonl`.
pub fn journal_path(image: &Path) -> PathBuf {
    let mut name = image.as_os_str().to_owned();
    name.push(".pi-journal.jsonl");
    PathBuf::from(name)
}

/// Where an image's tuples are, read from its metadata header (docs/FORMAT.md: little-endian
/// fields; format code at byte 32, tuple size at 33, interval at 36, blocks at 40,
/// tuples_offset at 80).
#[derive(Debug, Clone, Copy)]
pub struct PiLayout {
    /// 1, 3 or 64.
    pub format: u8,
    pub tuple_size: u64,
    pub interval: u64,
    pub blocks: u64,
    pub tuples_offset: u64,
}

impl PiLayout {
    pub fn read(image: &Path) -> PiLayout {
        let header = pread(&meta_path(image), 0, 4096);
        assert_eq!(&header[..8], b"GBLK-PI\0", "not PI metadata");
        let u32_at = |o: usize| u32::from_le_bytes(header[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(header[o..o + 8].try_into().unwrap());
        PiLayout {
            format: header[32],
            tuple_size: u64::from(header[33]),
            interval: u64::from(u32_at(36)),
            blocks: u64_at(40),
            tuples_offset: u64_at(80),
        }
    }

    /// Byte offset of `lba`'s tuple in the metadata file.
    pub fn tuple_offset(&self, lba: u64) -> u64 {
        self.tuples_offset + lba * self.tuple_size
    }

    /// Byte range of the reference tag within a tuple (big-endian).
    pub fn ref_range(&self) -> std::ops::Range<usize> {
        if self.tuple_size == 16 {
            10..16
        } else {
            4..8
        }
    }

    /// The guard of `data` in this format.
    pub fn guard_of(&self, data: &[u8]) -> u64 {
        if self.format == 64 {
            crc::Crc::<u64>::new(&crc::CRC_64_NVME).checksum(data)
        } else {
            u64::from(crc::Crc::<u16>::new(&crc::CRC_16_T10_DIF).checksum(data))
        }
    }

    /// (guard, app, ref) of a raw big-endian tuple.
    pub fn decode(&self, raw: &[u8]) -> (u64, u16, u64) {
        if self.tuple_size == 16 {
            let mut r = [0u8; 8];
            r[2..].copy_from_slice(&raw[10..16]);
            (
                u64::from_be_bytes(raw[0..8].try_into().unwrap()),
                u16::from_be_bytes([raw[8], raw[9]]),
                u64::from_be_bytes(r),
            )
        } else {
            (
                u64::from(u16::from_be_bytes([raw[0], raw[1]])),
                u16::from_be_bytes([raw[2], raw[3]]),
                u64::from(u32::from_be_bytes(raw[4..8].try_into().unwrap())),
            )
        }
    }

    pub fn read_tuple(&self, image: &Path, lba: u64) -> Vec<u8> {
        pread(
            &meta_path(image),
            self.tuple_offset(lba),
            self.tuple_size as usize,
        )
    }

    /// Overwrite `lba`'s tuple through the page cache (the daemon maps the file shared, so
    /// it sees the change at once).
    pub fn write_tuple(&self, image: &Path, lba: u64, raw: &[u8]) {
        assert_eq!(raw.len() as u64, self.tuple_size);
        pwrite_sync(&meta_path(image), self.tuple_offset(lba), raw);
    }

    pub fn read_block(&self, image: &Path, lba: u64) -> Vec<u8> {
        pread(image, lba * self.interval, self.interval as usize)
    }

    pub fn write_block(&self, image: &Path, lba: u64, data: &[u8]) {
        assert_eq!(data.len() as u64, self.interval);
        pwrite_sync(image, lba * self.interval, data);
    }
}

pub fn pread(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

/// Buffered write plus fdatasync: the daemon's O_DIRECT reads see it (the kernel writes back
/// and invalidates cached pages of a range before direct I/O to it, and we synced anyway).
pub fn pwrite_sync(path: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
    f.sync_data().unwrap();
}

/// A field of a `tracing` log line (`name=value`, value unquoted).
pub fn log_field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let pat = format!(" {name}=");
    let start = line.find(&pat)? + pat.len();
    let rest = &line[start..];
    let end = rest.find(' ').unwrap_or(rest.len());
    Some(rest[..end].trim_matches('"'))
}

/// One `PI guard error` line of the daemon's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardErrorLine {
    pub lba: u64,
    pub byte_offset: u64,
    pub kind: String,
    pub expected: String,
    pub actual: String,
    pub request: String,
}

pub fn guard_error_lines(log: &str) -> Vec<GuardErrorLine> {
    log.lines()
        .filter(|l| l.contains("PI guard error"))
        .map(|l| {
            let field = |n| {
                log_field(l, n)
                    .unwrap_or_else(|| panic!("no {n}= in {l:?}"))
                    .to_string()
            };
            GuardErrorLine {
                lba: field("lba").parse().unwrap(),
                byte_offset: field("byte_offset").parse().unwrap(),
                kind: field("kind"),
                expected: field("expected"),
                actual: field("actual"),
                request: field("request"),
            }
        })
        .collect()
}

/// Every parsable record of the image's error journal.
pub fn journal_records(image: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(journal_path(image))
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("journal line {l:?}: {e}")))
        .collect()
}

/// What `guardblk scrub IMAGE --json` said.
#[derive(Debug)]
pub struct ScrubOutcome {
    pub code: Option<i32>,
    /// The per-error objects (everything but the summary).
    pub errors: Vec<serde_json::Value>,
    pub summary: Option<serde_json::Value>,
    pub stdout: String,
    pub stderr: String,
}

impl ScrubOutcome {
    /// (lba, kind) of every reported error, sorted.
    pub fn lbas_and_kinds(&self) -> Vec<(u64, String)> {
        let mut v: Vec<(u64, String)> = self
            .errors
            .iter()
            .map(|e| {
                (
                    e["lba"].as_u64().unwrap_or_else(|| panic!("no lba in {e}")),
                    e["kind"].as_str().unwrap_or("?").to_string(),
                )
            })
            .collect();
        v.sort();
        v
    }

    pub fn summary_u64(&self, name: &str) -> Option<u64> {
        self.summary.as_ref()?.get(name)?.as_u64()
    }
}

impl std::fmt::Display for ScrubOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "scrub exit {:?}\nstdout:\n{}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Run `guardblk scrub IMAGE --json` (the daemon must be stopped: scrub takes the lock).
pub fn scrub_json(image: &Path) -> ScrubOutcome {
    let out = Command::new(BIN)
        .args(["scrub", image.to_str().unwrap(), "--json"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let mut errors = Vec::new();
    let mut summary = None;
    for line in stdout.lines().filter(|l| l.trim_start().starts_with('{')) {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("scrub printed a line that is not JSON ({e}): {line:?}"));
        match v.get("summary") {
            Some(s) => summary = Some(s.clone()),
            None => errors.push(v),
        }
    }
    ScrubOutcome {
        code: out.status.code(),
        errors,
        summary,
        stdout,
        stderr,
    }
}

/// Scrub must find the image clean: exit 0, no error objects, a summary saying 0 errors.
pub fn assert_scrub_clean(image: &Path, context: &str) -> ScrubOutcome {
    let s = scrub_json(image);
    assert_eq!(s.code, Some(0), "{context}: scrub not clean: {s}");
    assert!(s.errors.is_empty(), "{context}: scrub reported errors: {s}");
    assert_eq!(
        s.summary_u64("errors"),
        Some(0),
        "{context}: scrub summary: {s}"
    );
    s
}

// ---------------------------------------------------------------------------------------------
// Randomness and self-describing block content for race and crash tests.
// ---------------------------------------------------------------------------------------------

/// splitmix64: small, seedable, good enough for test workloads.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.0)
    }

    /// Uniform in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Uniform in [lo, hi].
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
}

pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A seed from `var` (decimal or 0x-hex) or, if unset, from the clock.
pub fn seed_from_env(var: &str) -> u64 {
    match std::env::var(var) {
        Ok(s) => {
            let s = s.trim();
            s.strip_prefix("0x")
                .map_or_else(|| s.parse(), |h| u64::from_str_radix(h, 16))
                .unwrap_or_else(|e| panic!("{var}={s:?}: {e}"))
        }
        Err(_) => mix64(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                ^ u64::from(std::process::id()),
        ),
    }
}

const VERSIONED_MAGIC: u64 = u64::from_le_bytes(*b"GBLKvers");

/// Fill one block (`buf`, a multiple of 512 bytes) with content that names `block` and
/// `version` in every 512-byte sector, so any read can be attributed to the write that put
/// it there, and a block mixing two writes (torn) is recognised. Version 0 is reserved for
/// "never written" (all zeros).
pub fn fill_versioned(buf: &mut [u8], block: u64, version: u64) {
    assert!(version != 0 && buf.len().is_multiple_of(512));
    for (s, sector) in buf.chunks_exact_mut(512).enumerate() {
        sector[0..8].copy_from_slice(&VERSIONED_MAGIC.to_le_bytes());
        sector[8..16].copy_from_slice(&block.to_le_bytes());
        sector[16..24].copy_from_slice(&version.to_le_bytes());
        sector[24..32].copy_from_slice(&(s as u64).to_le_bytes());
        let base = mix64(block ^ mix64(version ^ mix64(s as u64)));
        for (i, w) in sector[32..].chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&mix64(base.wrapping_add(i as u64)).to_le_bytes());
        }
    }
}

/// The version [`fill_versioned`] put in `buf` for `block`; `Ok(0)` for all zeros; `Err` if
/// the content is not one write's (wrong block, torn between versions, garbage).
pub fn decode_versioned(buf: &[u8], block: u64) -> Result<u64, String> {
    if buf.iter().all(|&b| b == 0) {
        return Ok(0);
    }
    let version = u64::from_le_bytes(buf[16..24].try_into().unwrap());
    let mut expect = vec![0u8; buf.len()];
    if version != 0 {
        fill_versioned(&mut expect, block, version);
    }
    if version == 0 || buf != expect.as_slice() {
        let describe = |s: &[u8]| {
            format!(
                "magic ok {}, block {}, version {}, sector {}",
                u64::from_le_bytes(s[0..8].try_into().unwrap()) == VERSIONED_MAGIC,
                u64::from_le_bytes(s[8..16].try_into().unwrap()),
                u64::from_le_bytes(s[16..24].try_into().unwrap()),
                u64::from_le_bytes(s[24..32].try_into().unwrap()),
            )
        };
        let sectors: Vec<String> = buf.chunks_exact(512).map(describe).collect();
        return Err(format!(
            "block {block} is not one write's content; sectors: [{}]",
            sectors.join("; ")
        ));
    }
    Ok(version)
}

/// Collect whatever completions are ready on `q` within `timeout` (at least one unless the
/// timeout expires); `(user_data, ret)` pairs. A timeout is not an error here. At least one
/// request must be outstanding (libblkio refuses to wait for more than that).
pub fn reap_some(q: &mut Blkioq, max: usize, timeout: Duration) -> Vec<(usize, i32)> {
    let mut completions: Vec<MaybeUninit<blkio::Completion>> =
        (0..max.max(1)).map(|_| MaybeUninit::uninit()).collect();
    let mut t = timeout;
    match q.do_io(&mut completions, 1, Some(&mut t), None) {
        Ok(got) => completions[..got]
            .iter()
            .map(|c| {
                // SAFETY: do_io initialised the first `got` entries.
                let c = unsafe { c.assume_init_ref() };
                (c.user_data, c.ret)
            })
            .collect(),
        Err(e) if e.errno() == blkio::Errno::TIME => Vec::new(),
        Err(e) => panic!("do_io: {}", e.message()),
    }
}

// ---------------------------------------------------------------------------------------------
// Clients with options, memory the test owns across sessions, and per-session counters.
// ---------------------------------------------------------------------------------------------

/// Shared memory the test owns (a memfd mapped MAP_SHARED), handed to successive clients so
/// the daemon sees the same guest-physical addresses in every session, as with a VM's RAM.
/// (libblkio's vhost-user driver uses the client's virtual addresses as guest-physical
/// addresses.) Must outlive every client it is mapped into.
pub struct SharedMem {
    pub addr: usize,
    pub len: usize,
    fd: std::os::fd::OwnedFd,
}

impl SharedMem {
    pub fn new(len: usize) -> SharedMem {
        Self::map(len, None)
    }

    /// As [`SharedMem::new`], mapped at exactly `addr` (page-aligned; fails if anything is
    /// mapped there): to choose the guest-physical addresses the daemon sees.
    pub fn new_at(addr: usize, len: usize) -> SharedMem {
        Self::map(len, Some(addr))
    }

    fn map(len: usize, at: Option<usize>) -> SharedMem {
        use std::os::fd::FromRawFd;
        let page = 4096;
        let len = len.div_ceil(page) * page;
        // SAFETY: plain syscalls; every result is checked before use.
        unsafe {
            let fd = libc::memfd_create(c"guardblk-test-mem".as_ptr(), libc::MFD_CLOEXEC);
            assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
            let fd = std::os::fd::OwnedFd::from_raw_fd(fd);
            use std::os::fd::AsRawFd;
            assert_eq!(libc::ftruncate(fd.as_raw_fd(), len as libc::off_t), 0);
            let (hint, fixed) = match at {
                Some(a) => (a as *mut libc::c_void, libc::MAP_FIXED_NOREPLACE),
                None => (std::ptr::null_mut(), 0),
            };
            let addr = libc::mmap(
                hint,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | fixed,
                fd.as_raw_fd(),
                0,
            );
            assert_ne!(
                addr,
                libc::MAP_FAILED,
                "mmap at {at:x?}: {}",
                std::io::Error::last_os_error()
            );
            if let Some(a) = at {
                assert_eq!(addr as usize, a, "mapped elsewhere than asked");
            }
            SharedMem {
                addr: addr as usize,
                len,
                fd,
            }
        }
    }

    /// The libblkio description of this memory.
    pub fn region(&self) -> MemoryRegion {
        use std::os::fd::AsRawFd;
        MemoryRegion {
            addr: self.addr,
            iova: 0,
            len: self.len,
            fd: self.fd.as_raw_fd(),
            fd_offset: 0,
            flags: 0,
        }
    }
}

impl Drop for SharedMem {
    fn drop(&mut self) {
        // SAFETY: our own mapping; no client uses it any more (documented contract).
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

/// Connection options beyond [`Client::connect`].
#[derive(Clone, Copy)]
pub struct ClientOptions<'a> {
    pub num_queues: i32,
    /// libblkio's virtqueue size (default 256); must not exceed the daemon's `--queue-size`.
    pub queue_size: Option<i32>,
    /// Size of a freshly allocated buffer region (ignored with `memory`).
    pub buffer_len: usize,
    /// Map this memory instead of allocating a region.
    pub memory: Option<&'a SharedMem>,
}

impl Client {
    pub fn connect_opts(socket: &Path, opts: ClientOptions<'_>) -> blkio::Result<Client> {
        let mut blkio = Blkio::new("virtio-blk-vhost-user")?;
        blkio.set_str("path", socket.to_str().unwrap())?;
        blkio.connect()?;
        blkio.set_i32("num-queues", opts.num_queues)?;
        if let Some(size) = opts.queue_size {
            blkio.set_i32("queue-size", size)?;
        }
        let outcome = blkio.start()?;
        let region = match opts.memory {
            Some(mem) => mem.region(),
            None => {
                let align = blkio.get_u64("mem-region-alignment")? as usize;
                blkio.alloc_mem_region(opts.buffer_len.div_ceil(align) * align)?
            }
        };
        blkio.map_mem_region(&region)?;
        Ok(Client {
            blkio,
            queues: outcome.queues,
            region,
        })
    }
}

/// One session's counters, as the daemon's stats document reports them.
#[derive(Debug, Clone)]
pub struct SessionCounters {
    /// The session's counters as JSON, for failure messages.
    pub line: String,
    pub values: std::collections::BTreeMap<String, u64>,
}

impl SessionCounters {
    /// From a stats-document counters object: its plain (numeric) fields.
    pub fn from_json(counters: &serde_json::Value) -> SessionCounters {
        let values = counters
            .as_object()
            .map(|o| {
                o.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
                    .collect()
            })
            .unwrap_or_default();
        SessionCounters {
            line: counters.to_string(),
            values,
        }
    }

    /// A counter; panics (naming the counters) if there is no such counter.
    pub fn get(&self, name: &str) -> u64 {
        *self
            .values
            .get(name)
            .unwrap_or_else(|| panic!("no counter {name} in {}", self.line))
    }
}

/// GET `path` from a guardblk HTTP endpoint over `stream`: (status code, body).
pub fn http_get(mut stream: impl std::io::Read + std::io::Write, path: &str) -> (u16, String) {
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {reply:?}"));
    (status, body.to_string())
}

impl Daemon {
    /// The stats socket beside the vhost-user socket.
    pub fn stats_socket(&self) -> PathBuf {
        let mut name = self.socket.as_os_str().to_owned();
        name.push(".stats");
        PathBuf::from(name)
    }

    /// The daemon's stats document now, from its stats socket.
    pub fn stats(&self) -> serde_json::Value {
        let stream = std::os::unix::net::UnixStream::connect(self.stats_socket())
            .unwrap_or_else(|e| panic!("stats socket {}: {e}", self.stats_socket().display()));
        let (status, body) = http_get(stream, "/stats");
        assert_eq!(status, 200, "GET /stats: {body}");
        serde_json::from_str(&body).unwrap()
    }

    /// Wait (up to 20 s) until session `n` (1-based) has ended and return its counters, as
    /// the daemon's stats document reports them.
    pub fn session_counters(&self, n: usize) -> SessionCounters {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let stats = self.stats();
            let ended = stats["recent_sessions"]
                .as_array()
                .and_then(|all| all.iter().find(|s| s["number"] == n as u64).cloned());
            if let Some(session) = ended {
                return SessionCounters::from_json(&session["counters"]);
            }
            assert!(
                Instant::now() < deadline,
                "session {n} never ended; stats: {stats:#}\nlog:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
