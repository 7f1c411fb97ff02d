//! The daemon: owns the listening socket and serves one frontend at a time, forever.
//!
//! Each connection gets a fresh vhost-user device around the same open image; when the
//! frontend leaves (exit, crash, reconnect), in-flight I/O is drained and the next
//! connection is accepted on the same socket. A second concurrent frontend is accepted and
//! closed at once with a log line. SIGINT/SIGTERM end the daemon cleanly: the current
//! session is closed, its I/O drained, and the socket file removed.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;

use thiserror::Error;
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::VhostUserDaemon;
use vmm_sys_util::eventfd::EventFd;

use crate::integrity::PiStore;
use crate::protocol::handover::DeviceLedger;
use crate::protocol::{features, BlkBackend, DeviceSettings};
use crate::requests::mutation::{MutationTracker, SavedMarks};
use crate::requests::policy::{self, Calibration, CostBasis, Target, WriteCosts};
use crate::requests::WritePolicy;
use crate::storage::Image;
use crate::telemetry::{http, RecoveryStats, Telemetry};

#[derive(Debug, Error)]
pub enum DaemonError {
    #[error("socket {path} is in use by a running daemon; stop it or choose another --socket")]
    SocketInUse { path: PathBuf },
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("cannot tell whether socket {path} belongs to a running daemon ({source}); remove it if it is stale, or choose another --socket")]
    SocketUnknown { path: PathBuf, source: io::Error },
    #[error("cannot create socket {path}: directory {dir} does not exist")]
    SocketDirMissing { path: PathBuf, dir: PathBuf },
    #[error("cannot create socket {path}: directory {dir} is not writable")]
    SocketDirNotWritable { path: PathBuf, dir: PathBuf },
    #[error("cannot create socket {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("cannot set up signal handling: {0}")]
    Signals(io::Error),
    #[error("cannot set up a vhost-user session: {0}")]
    Session(String),
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics { addr: SocketAddr, source: io::Error },
    #[error("I/O error while serving: {0}")]
    Io(#[from] io::Error),
}

/// Everything `serve` needs, already validated.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub socket: PathBuf,
    pub socket_mode: u32,
    pub device: DeviceSettings,
    /// Serve `/metrics` and `/stats` over HTTP here (`--metrics`).
    pub metrics: Option<SocketAddr>,
    /// Where to write the stats document (`--stats-file`); by default beside a PI image.
    pub stats_file: Option<PathBuf>,
}

/// The Unix socket beside the vhost-user socket that serves `/metrics` and `/stats` to
/// `guardblk stats --socket`.
pub fn stats_socket_path(socket: &Path) -> PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(".stats");
    PathBuf::from(name)
}

/// Removes the socket file when the daemon ends, if it is still the one we created.
struct SocketFile {
    path: PathBuf,
    inode: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// What connecting to an existing socket file says about it.
#[derive(Debug)]
enum Probe {
    /// Someone accepts on it (or its backlog is full, which only a listener has).
    Listening,
    /// Nobody listens: ECONNREFUSED, the only proof the file is left over.
    Stale,
    /// Removed since we looked.
    Gone,
    /// Anything else (permission denied, say): not proof either way.
    Unknown(io::Error),
}

/// Connect to `path` without blocking: a live daemon whose backlog is full (busy, or
/// stopped under a debugger) must read as in use, not make us wait or call it stale.
fn probe_socket(path: &Path) -> Probe {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: plain zero-initialised address struct, filled below within its bounds.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Probe::Unknown(io::Error::new(
            io::ErrorKind::InvalidInput,
            "path too long for a Unix socket",
        ));
    }
    for (dst, &b) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = b as libc::c_char;
    }
    // SAFETY: socket(2) with constant arguments; the fd is owned (and closed) below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Probe::Unknown(io::Error::last_os_error());
    }
    // SAFETY: fd was just created and nothing else owns it.
    let socket = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: addr is a valid sockaddr_un of the given size for the duration of the call.
    let rc = unsafe {
        libc::connect(
            socket.as_raw_fd(),
            std::ptr::addr_of!(addr).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        return Probe::Listening;
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        // A Unix socket's nonblocking connect fails with EAGAIN when the backlog is full.
        Some(libc::EAGAIN) | Some(libc::EINPROGRESS) => Probe::Listening,
        Some(libc::ECONNREFUSED) => Probe::Stale,
        Some(libc::ENOENT) => Probe::Gone,
        _ => Probe::Unknown(e),
    }
}

/// Bind the socket: refuse a live daemon's socket, replace a stale one, mode `mode`.
fn bind_socket(path: &Path, mode: u32) -> Result<(UnixListener, SocketFile), DaemonError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(DaemonError::NotASocket { path: path.into() })
        }
        Ok(_) => match probe_socket(path) {
            Probe::Listening => return Err(DaemonError::SocketInUse { path: path.into() }),
            Probe::Stale => {
                tracing::info!(socket = %path.display(), "replacing stale socket file");
                std::fs::remove_file(path).map_err(|source| DaemonError::Bind {
                    path: path.into(),
                    source,
                })?;
            }
            Probe::Gone => {}
            Probe::Unknown(source) => {
                return Err(DaemonError::SocketUnknown {
                    path: path.into(),
                    source,
                })
            }
        },
        Err(_) => {}
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    // Create the socket with the requested mode from the start (no window with wider access).
    // SAFETY: umask only swaps the process file-creation mask; restored right after bind.
    let old_umask = unsafe { libc::umask(0o777 & !mode as libc::mode_t) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old_umask) };
    let listener = bound.map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => DaemonError::SocketDirMissing {
            path: path.into(),
            dir: dir.clone(),
        },
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => {
            DaemonError::SocketDirNotWritable {
                path: path.into(),
                dir: dir.clone(),
            }
        }
        _ => DaemonError::Bind {
            path: path.into(),
            source,
        },
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        DaemonError::Bind {
            path: path.into(),
            source,
        }
    })?;
    let inode = std::fs::symlink_metadata(path)
        .map_err(|source| DaemonError::Bind {
            path: path.into(),
            source,
        })?
        .ino();
    Ok((
        listener,
        SocketFile {
            path: path.into(),
            inode,
        },
    ))
}

/// Block SIGINT/SIGTERM in every thread and turn them into a write to `shutdown`.
/// Must run before any other thread is spawned so they all inherit the mask.
/// Block SIGINT and SIGTERM in the calling thread and every thread it starts from now on,
/// so that only the signal thread (which waits for them) receives them. Call it before
/// anything starts threads of its own: librados starts a dozen when it connects, and a
/// signal delivered to one of those would kill the daemon on the spot instead of shutting
/// it down.
pub fn block_shutdown_signals() -> Result<libc::sigset_t, DaemonError> {
    // SAFETY: sigset manipulation on a local, zero-initialised sigset_t.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        set
    };
    // SAFETY: blocks the two signals for this thread (and threads spawned from now on).
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(DaemonError::Signals(io::Error::from_raw_os_error(rc)));
    }
    Ok(set)
}

fn spawn_signal_thread(shutdown: Arc<EventFd>) -> Result<(), DaemonError> {
    let set = block_shutdown_signals()?;
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: sigwait reads the set and writes one int we own.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                tracing::info!(signal = sig, "shutdown requested");
                let _ = shutdown.write(1);
            }
        })
        .map_err(DaemonError::Signals)?;
    Ok(())
}

/// Wait until one of `fds` is readable; returns their readiness in order.
fn poll_readable(fds: &[RawFd]) -> io::Result<Vec<bool>> {
    poll_readable_timeout(fds, -1)
}

/// As [`poll_readable`], giving up after `timeout_ms` (all false then).
fn poll_readable_timeout(fds: &[RawFd], timeout_ms: i32) -> io::Result<Vec<bool>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: pfds is a valid array of pollfd of the given length.
        let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout_ms) };
        if rc >= 0 {
            return Ok(pfds.iter().map(|p| p.revents != 0).collect());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// How long a guest page or disk region where a guest changed a buffer in flight keeps its
/// writes bounced up front.
const MUTATION_DECAY: std::time::Duration = std::time::Duration::from_secs(30);

/// What every session of one daemon shares.
struct Shared {
    image: Arc<Image>,
    pi: Option<Arc<PiStore>>,
    telemetry: Arc<Telemetry>,
    tracker: Arc<MutationTracker>,
    cost_basis: CostBasis,
    /// Where the stats document is written when a session starts and ends.
    stats_file: Option<PathBuf>,
    /// Where the tracker's marks are kept for the next daemon (PI images only).
    marks_file: Option<PathBuf>,
}

impl Shared {
    fn publish(&self) {
        if let Some(path) = &self.stats_file {
            self.telemetry.publish(path);
        }
        if let Some(path) = &self.marks_file {
            save_marks(&self.tracker, path);
        }
    }
}

/// How often new mutation marks are saved while serving (so a `kill -9` loses at most this
/// much of what was learned).
const MARKS_SAVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Write the tracker's hot marks to `path` (atomically, by rename). Best effort.
fn save_marks(tracker: &MutationTracker, path: &Path) {
    let text = match serde_json::to_string(&tracker.save(unix_now())) {
        Ok(text) => text + "\n",
        Err(e) => return tracing::warn!(error = %e, "cannot encode the mutation marks"),
    };
    if let Err(e) = crate::storage::files::replace(path, text.as_bytes(), 0o600) {
        tracing::warn!(path = %path.display(), error = %e, "cannot save the mutation marks");
    }
}

/// Put back what an earlier daemon learned about where this guest changes buffers in flight.
fn restore_marks(tracker: &MutationTracker, path: &Path) {
    let Ok(text) = std::fs::read_to_string(path) else {
        return; // never saved: nothing learned yet
    };
    match serde_json::from_str::<SavedMarks>(&text) {
        Ok(saved) => {
            let (pages, regions) = tracker.restore(&saved, unix_now());
            if pages + regions > 0 {
                tracing::info!(
                    pages,
                    regions,
                    file = %path.display(),
                    "remembered where the guest changed buffers in flight before the restart: those writes are bounced up front"
                );
            }
        }
        Err(e) => tracing::warn!(
            file = %path.display(),
            error = %e,
            "ignoring unreadable mutation marks; they will be learned again"
        ),
    }
}

/// Serve `image` on the configured socket until SIGINT/SIGTERM.
pub fn serve(
    image: Image,
    pi: Option<Arc<PiStore>>,
    recovery: Option<RecoveryStats>,
    config: &ServeConfig,
) -> Result<(), DaemonError> {
    let shutdown = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(DaemonError::Signals)?);
    spawn_signal_thread(Arc::clone(&shutdown))?;
    let (std_listener, _socket_file) = bind_socket(&config.socket, config.socket_mode)?;
    let mut listener = Listener::from(std_listener);
    let image = Arc::new(image);
    let telemetry = Arc::new(Telemetry::new(
        usize::from(config.device.num_queues),
        image.path().to_path_buf(),
        recovery,
    ));
    // The stats socket is a convenience: a daemon that cannot have one (a socket path too
    // long for the extra ".stats", say) serves anyway and says so.
    let stats_socket = stats_socket_path(&config.socket);
    let _stats_socket_file = match bind_socket(&stats_socket, config.socket_mode) {
        Ok((stats_listener, file)) => {
            http::spawn_unix(stats_listener, Arc::clone(&telemetry))?;
            Some(file)
        }
        Err(e) => {
            tracing::warn!(error = %e, "no stats socket: `guardblk stats --socket` will not reach this daemon (--metrics still works)");
            None
        }
    };
    let metrics = match config.metrics {
        Some(addr) => {
            let listener = std::net::TcpListener::bind(addr)
                .map_err(|source| DaemonError::Metrics { addr, source })?;
            Some(
                http::spawn_tcp(listener, Arc::clone(&telemetry))
                    .map_err(|source| DaemonError::Metrics { addr, source })?,
            )
        }
        None => None,
    };
    // Outlives sessions, and (saved beside a PI image) restarts: a guest that reconnects
    // keeps its learned mutation hot spots.
    let tracker = Arc::new(MutationTracker::new(image.size(), MUTATION_DECAY));
    let marks_file = pi
        .as_ref()
        .map(|_| crate::integrity::journal::mutations_path(&image.state_base()));
    if let Some(path) = &marks_file {
        restore_marks(&tracker, path);
        let (tracker, path) = (Arc::clone(&tracker), path.clone());
        thread::Builder::new()
            .name("mutation-marks".into())
            .spawn(move || loop {
                thread::sleep(MARKS_SAVE_INTERVAL);
                if tracker.take_changed() {
                    save_marks(&tracker, &path);
                }
            })?;
    }
    let stats_file = config.stats_file.clone().or_else(|| {
        pi.as_ref()
            .map(|_| crate::integrity::journal::stats_path(&image.state_base()))
    });
    let shared = Shared {
        image: Arc::clone(&image),
        pi: pi.clone(),
        telemetry,
        stats_file,
        marks_file,
        tracker,
        cost_basis: cost_basis(&image, pi.as_deref(), &config.device),
    };
    let initial = WriteCosts::new(&shared.cost_basis).snapshot();
    for queue in shared.telemetry.queues() {
        for (slot, state) in queue.write_path.iter().zip(initial) {
            slot.store(policy::pack(state), Ordering::Relaxed);
        }
    }
    if pi.is_some() && config.device.write_policy == WritePolicy::Auto {
        tracing::info!(
            target = %shared.cost_basis.target,
            paths = %shared.cost_basis.describe(),
            "PI write path chosen per request size"
        );
    }
    shared.publish();
    tracing::info!(
        socket = %config.socket.display(),
        image = %image.path().display(),
        size = image.size(),
        queues = config.device.num_queues,
        queue_size = config.device.queue_size,
        read_only = image.read_only(),
        direct_io = image.direct_io().is_some(),
        io_engine = %image.engine_for(config.device.engine),
        io_uring_async = image.submission_may_block(),
        write_policy = ?config.device.write_policy,
        pi = pi.as_ref().map_or("none".to_string(), |p| describe_pi(p)),
        stats_socket = %stats_socket.display(),
        metrics = %metrics.map_or("off".to_string(), |a| format!("http://{a}/metrics")),
        "guardblk ready"
    );

    serve_sessions(&shared, config, &mut listener, &shutdown)?;
    if let Some(pi) = &pi {
        let c = shared.telemetry.totals();
        tracing::info!(
            intervals_written = c.intervals_written,
            intervals_verified = c.intervals_verified,
            guard_errors = c.guard_errors,
            read_retries_healed = c.read_retries_healed,
            journal = %pi.journal.path().display(),
            "PI summary"
        );
        // Sessions drained every queue: nothing is in flight, so the intents can go.
        if let Err(e) = image.sync().and_then(|()| pi.close_clean()) {
            tracing::error!(error = %e, "cannot close the PI metadata cleanly; the next start will re-check regions with writes");
        }
        pi.meta.release_lock();
    }
    image.release_lock();
    tracing::info!("guardblk stopped");
    Ok(())
}

/// How long a newcomer waits for the current session to end before it is served beside it.
const RECONNECT_GRACE_MS: i32 = 2000;

/// Frontends served at once: the guest's, and during a live migration on this host the
/// destination QEMU's. A third is refused.
const MAX_SESSIONS: usize = 2;

/// One connected frontend.
struct Session {
    number: u64,
    backend: BlkBackend,
    shutdown: Option<vhost_user_backend::ShutdownHandle>,
    /// Written when the connection ends.
    ended: Arc<EventFd>,
    waiter: thread::JoinHandle<(VhostUserDaemon<BlkBackend>, vhost_user_backend::Result<()>)>,
}

/// Accept frontends until SIGINT/SIGTERM and every session has ended. Usually one is
/// connected at a time; a frontend that connects while one is (after a grace period for a
/// reconnecting QEMU's old connection to close) gets a session beside it: that is how a
/// live migration's destination attaches. The ledger keeps their I/O apart
/// (protocol/handover.rs).
fn serve_sessions(
    shared: &Shared,
    config: &ServeConfig,
    listener: &mut Listener,
    shutdown: &EventFd,
) -> Result<(), DaemonError> {
    let ledger = Arc::new(DeviceLedger::default());
    let mut sessions: Vec<Session> = Vec::new();
    let mut session_number = 0u64;
    let mut shutdown_requested = false;
    let mut failures = SessionFailures::default();
    loop {
        // Once shutdown is requested, only the sessions' ends matter (the shutdown eventfd
        // stays readable, and a newcomer is not served): watching those would spin.
        let mut fds = Vec::new();
        if !shutdown_requested {
            fds.extend([listener.as_raw_fd(), shutdown.as_raw_fd()]);
        }
        let first_session = fds.len();
        fds.extend(sessions.iter().map(|s| s.ended.as_raw_fd()));
        let ready = poll_readable(&fds)?;
        let ended: Vec<usize> = (0..sessions.len())
            .filter(|&i| ready[first_session + i])
            .collect();
        for index in ended.into_iter().rev() {
            let number = sessions[index].number;
            if finish_session(sessions.remove(index), shared) == Ended::Probe
                && number == session_number
            {
                session_number -= 1;
            }
        }
        if !shutdown_requested && ready[1] {
            shutdown_requested = true;
            for session in &sessions {
                if let Some(h) = &session.shutdown {
                    h.shutdown();
                }
            }
        }
        if shutdown_requested {
            if sessions.is_empty() {
                return Ok(());
            }
            continue;
        }
        if !ready[0] {
            continue;
        }
        if sessions.len() == 1 {
            // A frontend that restarts (or reconnects) often connects before we have seen
            // its old connection close: give the current session a moment to end first.
            if poll_readable_timeout(&[sessions[0].ended.as_raw_fd()], RECONNECT_GRACE_MS)?[0] {
                let number = sessions[0].number;
                if finish_session(sessions.remove(0), shared) == Ended::Probe
                    && number == session_number
                {
                    session_number -= 1;
                }
            }
        }
        if sessions.len() >= MAX_SESSIONS {
            if let Ok(Some(stream)) = listener.accept() {
                shared.telemetry.frontend_refused();
                tracing::warn!(
                    sessions = ?sessions.iter().map(|s| s.number).collect::<Vec<_>>(),
                    "refused a third frontend: two are connected (a guest and its migration destination)"
                );
                drop(stream);
            }
            continue;
        }
        session_number += 1;
        if let Some(current) = sessions.first() {
            tracing::info!(
                session = session_number,
                connected = current.number,
                "a second frontend connected while session {} is attached: serving it beside it (a live migration's destination); only one of them does I/O at a time",
                current.number
            );
        }
        match start_session(session_number, &ledger, shared, config, listener) {
            Ok(session) => {
                failures.succeeded();
                sessions.push(session);
            }
            Err(e) => {
                // One frontend's session could not be set up (out of file descriptors or
                // memory for its rings, an accept that failed): that frontend is turned
                // away, the daemon and any other session go on.
                session_number -= 1;
                failures.failed(&e);
                turn_away_pending(listener);
                thread::sleep(SESSION_RETRY_DELAY);
            }
        }
    }
}

/// Pause after a session could not be set up, so a persistent cause (no file descriptors
/// left) does not spin the accept loop.
const SESSION_RETRY_DELAY: std::time::Duration = std::time::Duration::from_millis(100);

/// A frontend still waiting in the backlog after its session failed gets its connection
/// closed (QEMU reports it, or reconnects), rather than waiting on a session that is not
/// coming. If even the accept fails, it stays queued for the next attempt.
fn turn_away_pending(listener: &mut Listener) {
    if poll_readable_timeout(&[listener.as_raw_fd()], 0).is_ok_and(|ready| ready[0]) {
        if let Ok(Some(stream)) = listener.accept() {
            drop(stream);
        }
    }
}

/// Failed session set-ups in a row, logged at most every [`FAILURE_LOG_INTERVAL`] with the
/// count in between.
#[derive(Default)]
struct SessionFailures {
    in_a_row: u64,
    unlogged: u64,
    last_logged: Option<std::time::Instant>,
}

const FAILURE_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

impl SessionFailures {
    fn failed(&mut self, error: &DaemonError) {
        self.in_a_row += 1;
        self.unlogged += 1;
        let now = std::time::Instant::now();
        if self
            .last_logged
            .is_none_or(|at| now.duration_since(at) >= FAILURE_LOG_INTERVAL)
        {
            tracing::warn!(
                error = %error,
                failed_in_a_row = self.in_a_row,
                since_last_line = self.unlogged,
                "could not serve a frontend; it was turned away and the daemon keeps serving"
            );
            self.unlogged = 0;
            self.last_logged = Some(now);
        }
    }

    fn succeeded(&mut self) {
        if self.in_a_row > 0 {
            tracing::info!(
                failed_before = self.in_a_row,
                "serving frontends again after failed session set-ups"
            );
        }
        *self = SessionFailures::default();
    }
}

/// Accept one frontend and start serving it on threads of its own.
fn start_session(
    number: u64,
    ledger: &Arc<DeviceLedger>,
    shared: &Shared,
    config: &ServeConfig,
    listener: &mut Listener,
) -> Result<Session, DaemonError> {
    let Shared {
        image,
        pi,
        telemetry,
        tracker,
        cost_basis,
        ..
    } = shared;
    let backend = BlkBackend::new(
        number,
        Arc::clone(ledger),
        Arc::clone(image),
        pi.clone(),
        tracker,
        &config.device,
        cost_basis,
        telemetry.queues(),
    )?;
    let mut daemon = VhostUserDaemon::new("guardblk".into(), backend.clone(), backend.memory())
        .map_err(|e| DaemonError::Session(e.to_string()))?;
    backend.register_completion_events(&daemon.get_epoll_handlers())?;
    daemon
        .start(listener)
        .map_err(|e| DaemonError::Session(e.to_string()))?;
    telemetry.session_started(number);
    shared.publish();
    // "frontend connected" is logged at its first message (BlkBackend): a probe that
    // closes without one is not a session.
    tracing::debug!(session = number, "connection accepted");
    let shutdown = daemon.shutdown_handle();
    // Wait for the connection's end on a helper, so the main thread keeps accepting.
    let ended = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
    let ended_signal = Arc::clone(&ended);
    let ending = backend.clone();
    let waiter = thread::Builder::new()
        .name(format!("session-{number}"))
        .spawn(move || {
            let result = daemon.wait();
            // Stop the queues popping at once, not when the main thread gets to it: a
            // reconnecting frontend's next session takes over these rings.
            ending.begin_teardown();
            if ending.heard_from_frontend() {
                tracing::info!(
                    session = number,
                    "the frontend's connection closed: finishing the requests it started"
                );
            }
            let _ = ended_signal.write(1);
            (daemon, result)
        })?;
    Ok(Session {
        number,
        backend,
        shutdown,
        ended,
        waiter,
    })
}

/// How a connection ended.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    Session,
    /// It closed without a message: a liveness probe (another guardblk checking whether
    /// the socket is in use, a monitoring script), not counted as a session.
    Probe,
}

/// A session's connection ended: stop its queues, finish its I/O, give back the image.
/// Nothing here ends the daemon: a session thread that panicked is logged, and its I/O is
/// drained all the same.
fn finish_session(session: Session, shared: &Shared) -> Ended {
    let Session {
        number,
        backend,
        waiter,
        ..
    } = session;
    // The waiter stopped the queues taking new requests (begin_teardown) before it said
    // the connection ended; let their threads finish what they took before the vhost-user
    // daemon, dropped below, ends them.
    backend.quiesce();
    match waiter.join() {
        // Dropping the daemon stops its queue threads; then finish whatever the kernel
        // still holds.
        Ok((daemon, result)) => {
            match result {
                // A frontend closing its socket (QEMU exiting, a client detaching) is the
                // normal end.
                Ok(())
                | Err(vhost_user_backend::Error::HandleRequest(
                    VhostUserError::Disconnected | VhostUserError::PartialMessage,
                )) => {}
                Err(e) => {
                    tracing::warn!(session = number, error = %e, "frontend connection ended with an error")
                }
            }
            drop(daemon);
        }
        Err(_) => tracing::error!(
            session = number,
            "the session's connection thread panicked; finishing its I/O and serving on"
        ),
    }
    let refused = backend.end_session();
    let telemetry = &shared.telemetry;
    if !backend.heard_from_frontend() {
        telemetry.session_discarded(number);
        tracing::debug!(
            session = number,
            "a connection closed without a vhost-user message (a liveness probe): not counted as a session"
        );
        shared.publish();
        return Ended::Probe;
    }
    let stats = telemetry.session_ended(number);
    tracing::info!(
        session = number,
        features = %features::describe(backend.acked_features()),
        counters = %stats.counters,
        write_path = %telemetry.describe_write_paths(),
        refused_while_another_guest_ran = refused,
        "frontend disconnected"
    );
    shared.publish();
    Ended::Session
}
/// What `--bounce auto` decides from: the target's kind, the operator's `--auto-path`, and
/// (for a PI image served with `auto`) each path's CPU cost measured on scratch memory now.
fn cost_basis(image: &Image, pi: Option<&PiStore>, device: &DeviceSettings) -> CostBasis {
    let calibration = match pi {
        Some(pi) if device.write_policy == WritePolicy::Auto => {
            Calibration::measure(pi.format(), pi.interval() as usize)
        }
        _ => Calibration::default(),
    };
    CostBasis {
        target: if image.kernel_copies_data() {
            Target::KernelCopies
        } else {
            Target::Dma
        },
        auto_path: device.auto_path,
        calibration,
    }
}

/// "type1, 4096-byte intervals, metadata disk.img.pi" for the ready line.
fn describe_pi(pi: &PiStore) -> String {
    format!(
        "{}, {}-byte intervals, metadata {}",
        pi.format(),
        pi.interval(),
        pi.meta.path().display()
    )
}
