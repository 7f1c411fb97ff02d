//! Ceph RBD images through librbd, loaded at run time.
//!
//! guardblk does not link against Ceph: `librbd.so.1` and `librados.so.2` (Debian: librbd1,
//! librados2) are opened with dlopen the first time an `rbd:` target is used, as QEMU loads
//! its rbd block driver as a module. A machine without Ceph runs every other target, and an
//! `rbd:` target there fails with one sentence saying which package is missing. No maintained
//! Rust binding for librbd exists (checked: `ceph`, `ceph-rust`, `librbd-sys`, `ceph-rbd`;
//! none has the vectored asynchronous calls, one has an unsound read), so the few C calls are
//! declared here.
//!
//! Naming an image (`rbd:POOL/IMAGE`), connecting with a configuration file, a client id and
//! bounded time-outs, opening an image, and synchronous I/O for tools. The data path's
//! asynchronous I/O is [`engine`]. Errors from Ceph become [`RbdError`]s that say what failed
//! and where.
//!
//! librbd's own cache is switched off (`rbd_cache=false`, as QEMU does for `cache.direct=on`):
//! a write the guest sees completed is on the OSDs, a flush has nothing of ours to write
//! back, and a read returns what the cluster holds, which is what PI verifies.

mod api;
pub mod engine;

use std::ffi::{c_char, c_int, c_void, CString};
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use api::{api, Api, ImageT, IoctxT, RadosT};

/// An `rbd:POOL/IMAGE` target as the command line names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdSpec {
    pub pool: String,
    pub image: String,
}

impl RbdSpec {
    /// `Some` for a target that starts with `rbd:` (parsed, or an error saying what is
    /// wrong with it); `None` for anything else (a file or device path).
    pub fn parse(target: &str) -> Option<Result<RbdSpec, RbdError>> {
        let rest = target.strip_prefix("rbd:")?;
        let bad = || RbdError::BadSpec(target.to_string());
        let Some((pool, image)) = rest.split_once('/') else {
            return Some(Err(bad()));
        };
        let valid = |s: &str| !s.is_empty() && !s.contains(['/', '@', '\0']);
        if !valid(pool) || !valid(image) {
            return Some(Err(bad()));
        }
        Some(Ok(RbdSpec {
            pool: pool.to_string(),
            image: image.to_string(),
        }))
    }
}

impl fmt::Display for RbdSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rbd:{}/{}", self.pool, self.image)
    }
}

/// How to reach the cluster: qemu's rbd driver's `conf` and `user`.
#[derive(Debug, Clone)]
pub struct CephOptions {
    /// Ceph configuration file; `None`: librados's default search (CEPH_CONF,
    /// /etc/ceph/ceph.conf, ...).
    pub conf: Option<PathBuf>,
    /// Client id without the `client.` prefix (`admin`).
    pub id: String,
    /// Longest wait for the monitors when connecting, and for any one operation.
    pub timeout: Duration,
    /// Where guardblk keeps this host's files about RBD images (journal, statistics), as
    /// `POOL/IMAGE...` below it.
    pub state_dir: PathBuf,
}

impl Default for CephOptions {
    fn default() -> CephOptions {
        CephOptions {
            conf: None,
            id: "admin".to_string(),
            timeout: Duration::from_secs(30),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
        }
    }
}

/// `--rbd-state-dir`'s default.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/guardblk/rbd";

#[derive(Debug, thiserror::Error)]
pub enum RbdError {
    #[error("'{0}' is not an RBD image name: write rbd:POOL/IMAGE")]
    BadSpec(String),
    #[error(
        "Ceph's client libraries are not installed ({library}: {reason}); install librbd1 \
         (apt-get install librbd1) to use rbd: images"
    )]
    NoLibrary {
        library: &'static str,
        reason: String,
    },
    #[error("cannot read the Ceph configuration {}: {}", .path.display(), errno_text(*.errno))]
    Config { path: PathBuf, errno: i32 },
    #[error("Ceph option {option}={value} was refused: {}", errno_text(*.errno))]
    Option {
        option: &'static str,
        value: String,
        errno: i32,
    },
    #[error("could not connect to the Ceph cluster as client.{id} within {} s: {}", .timeout.as_secs(), errno_text(*.errno))]
    Connect {
        id: String,
        timeout: Duration,
        errno: i32,
    },
    #[error("client.{id} may not connect to the Ceph cluster (permission denied): check its keyring and caps")]
    ConnectDenied { id: String },
    #[error("there is no pool '{pool}' in the Ceph cluster")]
    NoPool { pool: String },
    #[error("there is no RBD image '{image}' in pool '{pool}'")]
    NoImage { pool: String, image: String },
    #[error("{spec} already exists; refusing to overwrite it")]
    Exists { spec: RbdSpec },
    #[error("{spec} is in use by another Ceph client (it holds the image's exclusive lock): a guardblk serving it, or a tool")]
    Locked { spec: RbdSpec },
    #[error("{spec} is being written by another Ceph client (it holds the image's exclusive lock), so a read-only guardblk would serve blocks and PI tuples that change under it; if that client is gone, serve the image once without --read-only (which takes the lock over) or remove the lock with `rbd lock rm`")]
    LockedReadOnly { spec: RbdSpec },
    #[error("client.{id} may not open {spec} (permission denied): check its caps on pool '{}'", .spec.pool)]
    Denied { id: String, spec: RbdSpec },
    #[error("{what} {spec}: {}", errno_text(*.errno))]
    Call {
        what: &'static str,
        spec: RbdSpec,
        errno: i32,
    },
}

/// "No such file or directory (os error 2)" for a positive errno.
fn errno_text(errno: i32) -> String {
    std::io::Error::from_raw_os_error(errno).to_string()
}

/// A connection to a cluster (librados `rados_t`), shut down on drop.
struct Cluster {
    api: &'static Api,
    handle: RadosT,
}

impl Cluster {
    fn connect(options: &CephOptions) -> Result<Cluster, RbdError> {
        let api = api()?;
        let id = CString::new(options.id.as_str()).map_err(|_| RbdError::Connect {
            id: options.id.clone(),
            timeout: options.timeout,
            errno: libc::EINVAL,
        })?;
        let mut handle: RadosT = std::ptr::null_mut();
        // SAFETY: a valid out-pointer and C string.
        let rc = unsafe { (api.rados_create)(&mut handle, id.as_ptr()) };
        if rc < 0 {
            return Err(RbdError::Connect {
                id: options.id.clone(),
                timeout: options.timeout,
                errno: -rc,
            });
        }
        // From here on `cluster` shuts the handle down on every return.
        let cluster = Cluster { api, handle };
        let conf = options
            .conf
            .as_deref()
            .map(|p| CString::new(p.as_os_str().as_encoded_bytes()))
            .transpose()
            .map_err(|_| RbdError::Config {
                path: options.conf.clone().unwrap_or_default(),
                errno: libc::EINVAL,
            })?;
        // Check that the file is there before librados reads it: its own error for a
        // missing file is a bare ENOENT.
        if let Some(path) = &options.conf {
            if let Err(e) = std::fs::metadata(path) {
                return Err(RbdError::Config {
                    path: path.clone(),
                    errno: e.raw_os_error().unwrap_or(libc::EIO),
                });
            }
        }
        let conf_ptr = conf.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
        // SAFETY: a live handle; NULL means librados's default search path.
        let rc = unsafe { (api.rados_conf_read_file)(handle, conf_ptr) };
        if rc < 0 {
            return Err(RbdError::Config {
                path: options
                    .conf
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("(librados's default search path)")),
                errno: -rc,
            });
        }
        // Bounded waits: a cluster that is not there, or goes away, turns into an error
        // instead of a hang.
        let secs = options.timeout.as_secs().max(1).to_string();
        for option in [
            "client_mount_timeout",
            "rados_mon_op_timeout",
            "rados_osd_op_timeout",
        ] {
            cluster.set(option, &secs)?;
        }
        // librados's own messages would go to our stderr, beside our one-sentence errors.
        // No librbd cache: see the module comment.
        for option in ["log_to_stderr", "err_to_stderr", "rbd_cache"] {
            cluster.set(option, "false")?;
        }
        // SAFETY: a live, configured handle.
        let rc = unsafe { (api.rados_connect)(handle) };
        match -rc {
            0 => Ok(cluster),
            libc::EACCES | libc::EPERM => Err(RbdError::ConnectDenied {
                id: options.id.clone(),
            }),
            errno => Err(RbdError::Connect {
                id: options.id.clone(),
                timeout: options.timeout,
                errno,
            }),
        }
    }

    fn set(&self, option: &'static str, value: &str) -> Result<(), RbdError> {
        let (o, v) = (
            CString::new(option).expect("option names have no NUL"),
            CString::new(value).expect("option values here have no NUL"),
        );
        // SAFETY: a live handle and valid C strings.
        let rc = unsafe { (self.api.rados_conf_set)(self.handle, o.as_ptr(), v.as_ptr()) };
        if rc < 0 {
            return Err(RbdError::Option {
                option,
                value: value.to_string(),
                errno: -rc,
            });
        }
        Ok(())
    }
}

/// A pool context (`rados_ioctx_t`), destroyed on drop.
struct Pool<'a>(IoctxT, &'a Cluster);

impl Drop for Pool<'_> {
    fn drop(&mut self) {
        // SAFETY: a live ioctx of a live cluster (borrowed), destroyed exactly once.
        unsafe { (self.1.api.rados_ioctx_destroy)(self.0) };
    }
}

impl Cluster {
    /// The pool of `spec`.
    fn pool(&self, spec: &RbdSpec, options: &CephOptions) -> Result<Pool<'_>, RbdError> {
        let pool = CString::new(spec.pool.as_str()).expect("validated by RbdSpec::parse");
        let mut ioctx: IoctxT = std::ptr::null_mut();
        // SAFETY: a connected cluster, a valid C string and out-pointer.
        let rc = unsafe { (self.api.rados_ioctx_create)(self.handle, pool.as_ptr(), &mut ioctx) };
        if rc < 0 {
            let missing = RbdError::NoPool {
                pool: spec.pool.clone(),
            };
            return Err(open_error(
                -rc,
                missing,
                "opening the pool of",
                spec,
                options,
            ));
        }
        Ok(Pool(ioctx, self))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: the handle came from rados_create and is shut down exactly once; every
        // ioctx and image made from it was dropped first (they borrow the cluster).
        unsafe { (self.api.rados_shutdown)(self.handle) };
    }
}

/// An open RBD image with its pool context and cluster connection, all released on drop.
pub struct RbdImage {
    spec: RbdSpec,
    /// How it was reached: companion images (the PI metadata) are opened the same way.
    options: CephOptions,
    size: u64,
    image: ImageT,
    ioctx: IoctxT,
    // Dropped last (fields drop in order): the image and ioctx must go first.
    cluster: Cluster,
}

// SAFETY: librbd image handles are thread-safe: any thread may issue synchronous or
// asynchronous operations on one concurrently (librbd serialises internally; QEMU and SPDK
// share one handle between threads the same way). The handles are only closed in Drop,
// when no other reference exists.
unsafe impl Send for RbdImage {}
// SAFETY: as above.
unsafe impl Sync for RbdImage {}

impl RbdImage {
    /// Connect to the cluster and open `spec`.
    pub fn open(
        spec: &RbdSpec,
        options: &CephOptions,
        read_only: bool,
    ) -> Result<RbdImage, RbdError> {
        let cluster = Cluster::connect(options)?;
        let api = cluster.api;
        let pool = CString::new(spec.pool.as_str()).expect("validated by RbdSpec::parse");
        let name = CString::new(spec.image.as_str()).expect("validated by RbdSpec::parse");
        let mut ioctx: IoctxT = std::ptr::null_mut();
        // SAFETY: a connected cluster, a valid C string and out-pointer.
        let rc = unsafe { (api.rados_ioctx_create)(cluster.handle, pool.as_ptr(), &mut ioctx) };
        if rc < 0 {
            let missing = RbdError::NoPool {
                pool: spec.pool.clone(),
            };
            return Err(open_error(
                -rc,
                missing,
                "opening the pool of",
                spec,
                options,
            ));
        }
        let mut image: ImageT = std::ptr::null_mut();
        let open = if read_only {
            api.rbd_open_read_only
        } else {
            api.rbd_open
        };
        // SAFETY: a live ioctx, valid C strings (no snapshot: NULL) and out-pointer.
        let rc = unsafe { open(ioctx, name.as_ptr(), &mut image, std::ptr::null()) };
        if rc < 0 {
            // SAFETY: the ioctx is live and not used again.
            unsafe { (api.rados_ioctx_destroy)(ioctx) };
            let missing = RbdError::NoImage {
                pool: spec.pool.clone(),
                image: spec.image.clone(),
            };
            return Err(open_error(-rc, missing, "opening", spec, options));
        }
        let mut rbd = RbdImage {
            spec: spec.clone(),
            options: options.clone(),
            size: 0,
            image,
            ioctx,
            cluster,
        };
        let mut size = 0u64;
        // SAFETY: a live image and a valid out-pointer.
        let rc = unsafe { (api.rbd_get_size)(rbd.image, &mut size) };
        if rc < 0 {
            return Err(RbdError::Call {
                what: "reading the size of",
                spec: spec.clone(),
                errno: -rc,
            });
        }
        rbd.size = size;
        Ok(rbd)
    }

    /// Create the image `spec` of `size` bytes (librbd's default format and features).
    pub fn create(spec: &RbdSpec, options: &CephOptions, size: u64) -> Result<(), RbdError> {
        let cluster = Cluster::connect(options)?;
        let ioctx = cluster.pool(spec, options)?;
        let name = CString::new(spec.image.as_str()).expect("validated by RbdSpec::parse");
        let mut order: std::ffi::c_int = 0; // 0: the default object size
                                            // SAFETY: a live ioctx, a valid C string and out-pointer.
        let rc = unsafe { (cluster.api.rbd_create)(ioctx.0, name.as_ptr(), size, &mut order) };
        match -rc {
            0 => Ok(()),
            libc::EEXIST => Err(RbdError::Exists { spec: spec.clone() }),
            errno => Err(open_error(
                errno,
                RbdError::Exists { spec: spec.clone() },
                "creating",
                spec,
                options,
            )),
        }
    }

    /// Remove the image `spec` (tools undoing a half-finished create).
    pub fn remove(spec: &RbdSpec, options: &CephOptions) -> Result<(), RbdError> {
        let cluster = Cluster::connect(options)?;
        let ioctx = cluster.pool(spec, options)?;
        let name = CString::new(spec.image.as_str()).expect("validated by RbdSpec::parse");
        // SAFETY: a live ioctx and a valid C string.
        let rc = unsafe { (cluster.api.rbd_remove)(ioctx.0, name.as_ptr()) };
        if rc < 0 {
            let missing = RbdError::NoImage {
                pool: spec.pool.clone(),
                image: spec.image.clone(),
            };
            return Err(open_error(-rc, missing, "removing", spec, options));
        }
        Ok(())
    }

    /// The image's id: unique in its pool and kept across renames (its identity for the
    /// pairing check of its PI metadata).
    pub fn id(&self) -> io::Result<String> {
        let mut buf = vec![0u8; 64];
        // SAFETY: a live image; librbd writes at most buf.len() bytes, NUL-terminated.
        let rc = unsafe {
            (self.api().rbd_get_id)(self.image, buf.as_mut_ptr() as *mut c_char, buf.len())
        };
        if rc < 0 {
            return Err(io::Error::from_raw_os_error(-rc));
        }
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
    }

    /// Take the image's exclusive lock and keep it until the image is closed: librbd then
    /// refuses to hand it to another client, whose writes fail, so a second daemon or a tool
    /// cannot write beside this one. A lock left by a client that died is taken over once
    /// the cluster notices (its watch times out: `osd_client_watch_timeout`, 30 s by
    /// default). An image without the exclusive-lock feature cannot be guarded this way;
    /// that is logged, not refused.
    pub fn lock_exclusive(&self) -> Result<(), RbdError> {
        const RBD_LOCK_MODE_EXCLUSIVE: std::ffi::c_int = 0;
        // SAFETY: a live image.
        let rc = unsafe { (self.api().rbd_lock_acquire)(self.image, RBD_LOCK_MODE_EXCLUSIVE) };
        match -rc {
            0 => Ok(()),
            libc::EINVAL => {
                tracing::warn!(image = %self.spec, "the image has no exclusive-lock feature: nothing stops a second client from writing it while guardblk does (enable it with `rbd feature enable POOL/IMAGE exclusive-lock`)");
                Ok(())
            }
            libc::EROFS | libc::EBUSY => Err(RbdError::Locked {
                spec: self.spec.clone(),
            }),
            errno => Err(RbdError::Call {
                what: "taking the exclusive lock of",
                spec: self.spec.clone(),
                errno,
            }),
        }
    }

    /// For a read-only open: refuse if another client holds the exclusive lock (a writer;
    /// or one that died, whose lock stays until a writer takes it over). Asked through the
    /// lock list of the image's header object, which a read-only handle can read (librbd's
    /// lock-owner call needs a writable one).
    pub fn check_no_writer(&self) -> Result<(), RbdError> {
        const ROOM: usize = 4096;
        let mut exclusive: std::ffi::c_int = 0;
        let mut bufs = [[0u8; ROOM]; 4];
        let mut lens = [ROOM; 4];
        let [tag, clients, cookies, addrs] = &mut bufs;
        let [tag_len, clients_len, cookies_len, addrs_len] = &mut lens;
        // SAFETY: a live image; each buffer is ROOM bytes and its length says so; librbd
        // writes within them or reports ERANGE.
        let rc = unsafe {
            (self.api().rbd_list_lockers)(
                self.image,
                &mut exclusive,
                tag.as_mut_ptr() as *mut c_char,
                tag_len,
                clients.as_mut_ptr() as *mut c_char,
                clients_len,
                cookies.as_mut_ptr() as *mut c_char,
                cookies_len,
                addrs.as_mut_ptr() as *mut c_char,
                addrs_len,
            )
        };
        match rc {
            0 => Ok(()),
            // ERANGE: more lockers than fit in the buffers.
            rc if rc > 0 || -rc == libc::ERANGE as isize => Err(RbdError::LockedReadOnly {
                spec: self.spec.clone(),
            }),
            rc => Err(RbdError::Call {
                what: "listing the lockers of",
                spec: self.spec.clone(),
                errno: i32::try_from(-rc).unwrap_or(libc::EIO),
            }),
        }
    }

    pub fn options(&self) -> &CephOptions {
        &self.options
    }

    /// Bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn spec(&self) -> &RbdSpec {
        &self.spec
    }

    fn api(&self) -> &'static Api {
        self.cluster.api
    }

    /// Read exactly `buf.len()` bytes at `offset`, synchronously (tools; the data path uses
    /// [`engine::RbdEngine`]).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let piece = &mut buf[done..];
            // SAFETY: a live image; librbd writes at most piece.len() bytes into piece.
            let rc = unsafe {
                (self.api().rbd_read2)(
                    self.image,
                    offset + done as u64,
                    piece.len(),
                    piece.as_mut_ptr() as *mut c_char,
                    0,
                )
            };
            match rc {
                rc if rc < 0 => return Err(io::Error::from_raw_os_error(-rc as i32)),
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                n => done += n as usize,
            }
        }
        Ok(())
    }

    /// Write all of `buf` at `offset`, synchronously.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let piece = &buf[done..];
            // SAFETY: a live image; librbd reads piece.len() bytes from piece.
            let rc = unsafe {
                (self.api().rbd_write2)(
                    self.image,
                    offset + done as u64,
                    piece.len(),
                    piece.as_ptr() as *const c_char,
                    0,
                )
            };
            match rc {
                rc if rc < 0 => return Err(io::Error::from_raw_os_error(-rc as i32)),
                0 => return Err(io::ErrorKind::WriteZero.into()),
                n => done += n as usize,
            }
        }
        Ok(())
    }

    /// The first allocated byte range at or after `offset` ((start, end), clamped to start
    /// at `offset`), or `None` when only unallocated space follows. Whole RBD objects: an
    /// object that exists counts as data throughout (reading more than needed is safe;
    /// skipping written data is not). librbd answers from the object map when the image has
    /// one, else by asking the OSDs object by object; it stops at the first range found.
    pub fn next_allocated(&self, offset: u64) -> io::Result<Option<(u64, u64)>> {
        if offset >= self.size {
            return Ok(None);
        }
        /// What the callback looks for and found.
        struct Search {
            from: u64,
            found: Option<(u64, u64)>,
        }
        /// Stops the iteration once a range is found (librbd passes this error back).
        const FOUND: c_int = -libc::ECANCELED;
        unsafe extern "C" fn each(off: u64, len: usize, exists: c_int, arg: *mut c_void) -> c_int {
            // SAFETY: `arg` is the &mut Search passed below, alive for the whole call.
            let search = unsafe { &mut *(arg as *mut Search) };
            let end = off + len as u64;
            if exists == 0 || end <= search.from {
                return 0;
            }
            match &mut search.found {
                // Contiguous ranges (librbd reports them object by object) are joined.
                Some((_, found_end)) if *found_end == off => {
                    *found_end = end;
                    0
                }
                Some(_) => FOUND,
                None => {
                    search.found = Some((off.max(search.from), end));
                    0
                }
            }
        }
        let mut search = Search {
            from: offset,
            found: None,
        };
        // SAFETY: a live image; no snapshot (NULL); the callback matches librbd's type and
        // `search` outlives the call, which invokes the callback only before it returns.
        let rc = unsafe {
            (self.api().rbd_diff_iterate2)(
                self.image,
                std::ptr::null(),
                offset,
                self.size - offset,
                1,
                1,
                each,
                &mut search as *mut Search as *mut c_void,
            )
        };
        if rc < 0 && rc != FOUND {
            return Err(io::Error::from_raw_os_error(-rc));
        }
        Ok(search.found.map(|(start, end)| (start, end.min(self.size))))
    }

    /// Make every completed write durable (nothing is cached here; see the module comment,
    /// but an image opened by other means may be).
    pub fn flush(&self) -> io::Result<()> {
        // SAFETY: a live image.
        let rc = unsafe { (self.api().rbd_flush)(self.image) };
        if rc < 0 {
            return Err(io::Error::from_raw_os_error(-rc));
        }
        Ok(())
    }
}

impl fmt::Debug for RbdImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RbdImage")
            .field("spec", &self.spec)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// What a failed open of the pool or the image means: `missing` for ENOENT, a permission
/// error, or the call's own errno.
fn open_error(
    errno: i32,
    missing: RbdError,
    what: &'static str,
    spec: &RbdSpec,
    options: &CephOptions,
) -> RbdError {
    match errno {
        libc::ENOENT => missing,
        libc::EACCES | libc::EPERM => RbdError::Denied {
            id: options.id.clone(),
            spec: spec.clone(),
        },
        errno => RbdError::Call {
            what,
            spec: spec.clone(),
            errno,
        },
    }
}

impl Drop for RbdImage {
    fn drop(&mut self) {
        let api = self.cluster.api;
        // SAFETY: both handles are live and released exactly once, image before ioctx,
        // before the cluster (dropped after this, as the last field).
        unsafe {
            (api.rbd_close)(self.image);
            (api.rados_ioctx_destroy)(self.ioctx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rbd_targets_are_told_from_paths_and_checked() {
        assert_eq!(RbdSpec::parse("disk.img").map(|r| r.is_ok()), None);
        assert_eq!(RbdSpec::parse("/dev/rbd0").map(|r| r.is_ok()), None);
        let spec = RbdSpec::parse("rbd:pool/image").unwrap().unwrap();
        assert_eq!((spec.pool.as_str(), spec.image.as_str()), ("pool", "image"));
        assert_eq!(spec.to_string(), "rbd:pool/image");
        for bad in [
            "rbd:",
            "rbd:pool",
            "rbd:/image",
            "rbd:pool/",
            "rbd:a/b/c",
            "rbd:p/i@snap",
        ] {
            let err = RbdSpec::parse(bad).unwrap().unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("'{bad}' is not an RBD image name: write rbd:POOL/IMAGE")
            );
        }
    }
}
