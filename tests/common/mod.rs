//! Shared harness for the end-to-end tests: starts the real `guardblk` binary on a temporary
//! image and drives it with libblkio's virtio-blk-vhost-user driver.
#![allow(dead_code)]

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, MemoryRegion, ReqFlags};

pub const BIN: &str = env!("CARGO_BIN_EXE_guardblk");

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
        let d = Daemon {
            child,
            dir,
            image,
            socket,
            log,
        };
        d.wait_for_log("guardblk ready");
        d
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
