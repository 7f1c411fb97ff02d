//! The command line as an operator meets it: clear one-sentence errors, clean shutdown.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;

use common::*;

/// `guardblk serve IMAGE --socket SOCKET EXTRA...`, run to completion (these all fail fast).
fn serve(image: &Path, socket: &Path, extra: &[&str]) -> Output {
    let base = [
        "serve",
        image.to_str().unwrap(),
        "--socket",
        socket.to_str().unwrap(),
    ];
    guardblk(&[&base[..], extra].concat())
}

#[test]
fn help_describes_every_subcommand() {
    let out = guardblk(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for word in ["create", "serve", "vhost-user", "--log-level"] {
        assert!(text.contains(word), "--help lacks {word}");
    }
    let serve = String::from_utf8_lossy(&guardblk(&["serve", "--help"]).stdout).to_string();
    for word in [
        "--socket",
        "--queues",
        "--queue-size",
        "--read-only",
        "--serial",
        "--cache",
        "--socket-mode",
    ] {
        assert!(serve.contains(word), "serve --help lacks {word}");
    }
    let create = String::from_utf8_lossy(&guardblk(&["create", "--help"]).stdout).to_string();
    assert!(create.contains("--size"));
}

#[test]
fn missing_image_is_one_sentence() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("nope.img");
    let sock = dir.path().join("s.sock");
    let out = serve(&img, &sock, &[]);
    assert_one_sentence(&out, "does not exist");
}

#[test]
fn image_size_not_a_multiple_of_512_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("odd.img");
    std::fs::write(&img, vec![0u8; 1000]).unwrap();
    let sock = dir.path().join("s.sock");
    let out = serve(&img, &sock, &[]);
    assert_one_sentence(&out, "not a multiple of 512");
    let out = guardblk(&[
        "create",
        dir.path().join("x.img").to_str().unwrap(),
        "--size",
        "1000",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("multiple of 512"));
}

#[test]
fn create_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.img");
    assert!(guardblk(&["create", img.to_str().unwrap(), "--size", "1M"])
        .status
        .success());
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 1 << 20);
    assert_one_sentence(
        &guardblk(&["create", img.to_str().unwrap(), "--size", "2M"]),
        "already exists",
    );
}

#[test]
fn live_socket_is_refused_and_stale_socket_is_replaced() {
    let d = Daemon::start(1 << 20, &[]);
    let other = d.dir.path().join("other.img");
    assert!(
        guardblk(&["create", other.to_str().unwrap(), "--size", "1M"])
            .status
            .success()
    );
    let out = serve(&other, &d.socket, &[]);
    assert_one_sentence(&out, "in use by a running daemon");
    // The refused daemon's probe (connected, closed without a message) is no session of
    // the running one: the first real frontend is still session 1.
    let mut c = Client::connect(&d.socket, 1, 4096).unwrap();
    assert_eq!(read(&mut c, 0, 0, 0, 4096), 0);
    drop(c);
    let first = d.session_counters(1);
    assert_eq!(first.get("reads"), 1, "the client's session is number 1");
    let stats = d.stats();
    assert_eq!(stats["sessions"], 1, "{stats:#}");
    assert_eq!(
        stats["recent_sessions"].as_array().unwrap().len(),
        1,
        "{stats:#}"
    );

    // A stale socket file (nobody listening) is replaced.
    let stale = d.dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let d2 = Daemon::serve(
        tempfile::tempdir().unwrap(),
        other,
        &["--socket", stale.to_str().unwrap()],
    );
    d2.wait_for_log("replacing stale socket file");
    let mut c = Client::connect(&stale, 1, 4096).unwrap();
    assert_eq!(read(&mut c, 0, 0, 0, 4096), 0);
}

/// A listener whose backlog is full refuses new connections with EAGAIN: that is a live
/// daemon too busy to accept (or stopped under a debugger), not a stale file. The old probe
/// blocked in connect() there, or called it stale and unlinked it.
#[test]
fn a_socket_with_a_full_backlog_is_in_use_not_stale() {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.img");
    assert!(guardblk(&["create", img.to_str().unwrap(), "--size", "1M"])
        .status
        .success());
    let socket = dir.path().join("busy.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    // SAFETY: listen(2) on a socket we own; a backlog of 0 holds one connection.
    assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
    // SAFETY: a zeroed sockaddr_un, filled within its bounds (the path is short).
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, b) in addr
        .sun_path
        .iter_mut()
        .zip(socket.to_str().unwrap().bytes())
    {
        *d = b as libc::c_char;
    }
    // Nonblocking connects until the kernel says the backlog is full (EAGAIN).
    let mut queued = Vec::new();
    let full = loop {
        // SAFETY: socket(2) with constant arguments; the fd is owned right away.
        let fd = unsafe {
            OwnedFd::from_raw_fd(libc::socket(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK,
                0,
            ))
        };
        // SAFETY: addr is a valid sockaddr_un for the duration of the call.
        let rc = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                std::ptr::addr_of!(addr).cast(),
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            break std::io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN);
        }
        queued.push(fd);
        if queued.len() > 64 {
            break false;
        }
    };
    assert!(full, "the backlog never filled");
    // The daemon must answer at once; one that blocks in connect() is killed and fails.
    let mut child = std::process::Command::new(BIN)
        .args([
            "serve",
            img.to_str().unwrap(),
            "--socket",
            socket.to_str().unwrap(),
        ])
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("guardblk waited in connect() on a busy socket for 10 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_one_sentence(
        &child.wait_with_output().unwrap(),
        "in use by a running daemon",
    );
    assert!(socket.exists(), "a live listener's socket was removed");
    drop(listener);
}

#[test]
fn unusable_socket_directory_is_one_sentence() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.img");
    assert!(guardblk(&["create", img.to_str().unwrap(), "--size", "1M"])
        .status
        .success());
    let missing = dir.path().join("no/such/dir/s.sock");
    assert_one_sentence(&serve(&img, &missing, &[]), "does not exist");
    let file_in_the_way = dir.path().join("taken");
    std::fs::write(&file_in_the_way, b"x").unwrap();
    assert_one_sentence(&serve(&img, &file_in_the_way, &[]), "not a socket");
    // A link where the socket should be is neither followed nor removed, even when it points
    // at a stale socket.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    for target in [&file_in_the_way, &stale] {
        let link = dir.path().join("link.sock");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(target, &link).unwrap();
        assert_one_sentence(&serve(&img, &link, &[]), "not a socket");
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(target.exists());
    }
    assert_eq!(std::fs::read(&file_in_the_way).unwrap(), b"x");
}

#[test]
fn bad_arguments_are_one_sentence() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.img");
    assert!(guardblk(&["create", img.to_str().unwrap(), "--size", "1M"])
        .status
        .success());
    let sock = dir.path().join("s.sock");
    let with = |extra: &[&str]| serve(&img, &sock, extra);
    assert_one_sentence(&with(&["--queues", "0"]), "--queues");
    assert_one_sentence(&with(&["--queue-size", "100"]), "--queue-size");
    assert_one_sentence(
        &with(&["--serial", "this-serial-is-far-too-long"]),
        "--serial",
    );
    assert!(!with(&["--cache", "sometimes"]).status.success());
}

#[test]
fn sigterm_drains_and_removes_the_socket_which_is_private() {
    let mut d = Daemon::start(4 << 20, &[]);
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket should be owner-only by default");
    let mut c = Client::connect(&d.socket, 1, 1 << 20).unwrap();
    fill_pattern(&mut c.buf()[..1 << 20], 0, 7);
    // Leave writes in flight while the daemon is told to stop.
    for i in 0..4usize {
        let ptr = c.buf_ptr(i * (256 << 10));
        c.queues[0].write(
            (i * (256 << 10)) as u64,
            ptr,
            256 << 10,
            i,
            blkio::ReqFlags::empty(),
        );
    }
    let _ = c.queues[0].do_io(&mut [], 0, None, None);
    let status = d.terminate();
    assert!(status.success(), "daemon exited with {status}");
    assert!(!d.socket.exists(), "socket file left behind");
    d.wait_for_log("guardblk stopped");
}

/// A session that cannot be set up (here: the daemon is out of file descriptors, so its
/// queues' io_uring and eventfds, and even the accept, fail) turns that frontend away and
/// leaves the daemon serving; once descriptors are back, frontends are served again.
#[test]
fn a_session_that_cannot_be_set_up_does_not_end_the_daemon() {
    use std::io::Read;
    let mut d = Daemon::start(1 << 20, &[]);
    let pid = d.child.id() as libc::pid_t;
    let open_fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as u64;
    let mut original = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit(2) on our own child, writing only `original`.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut original) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    let set_nofile = |soft: u64| {
        // Only the soft limit moves: raising the hard one needs CAP_SYS_RESOURCE.
        let limit = libc::rlimit {
            rlim_cur: soft,
            rlim_max: original.rlim_max,
        };
        // SAFETY: prlimit(2) on our own child, reading nothing back.
        let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &limit, std::ptr::null_mut()) };
        assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    };
    set_nofile(open_fds);

    let mut frontend = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    d.wait_for_log("could not serve a frontend");
    assert!(d.child.try_wait().unwrap().is_none(), "the daemon exited");
    // Nothing answers this connection while the daemon is out of descriptors.
    frontend
        .set_read_timeout(Some(std::time::Duration::from_millis(300)))
        .unwrap();
    let mut byte = [0u8; 1];
    assert!(!matches!(frontend.read(&mut byte), Ok(1..)));

    set_nofile(original.rlim_cur);
    drop(frontend);
    let mut c = Client::connect(&d.socket, 1, 4096).unwrap();
    assert_eq!(read(&mut c, 0, 0, 0, 4096), 0);
    drop(c);
    assert!(
        d.log_count("could not serve a frontend") <= 2,
        "{}",
        d.log_text()
    );
    d.wait_for_log("serving frontends again");
    assert!(d.terminate().success());
}
