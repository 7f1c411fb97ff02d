//! The real daemon binary as a child process: start, restart, stop, its log, its stats
//! document (stats socket) and the per-session counters in it.

use super::*;

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
        Self::spawn_with_env(dir, image, args, &[])
    }

    /// As [`Daemon::serve`], with extra environment variables for the daemon.
    pub fn serve_with_env(
        dir: tempfile::TempDir,
        image: PathBuf,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        let d = Self::spawn_with_env(dir, image, args, env);
        d.wait_for_log("guardblk ready");
        d
    }

    /// As [`Daemon::spawn`], with extra environment variables for the daemon.
    pub fn spawn_with_env(
        dir: tempfile::TempDir,
        image: PathBuf,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
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
            .envs(env.iter().copied())
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
