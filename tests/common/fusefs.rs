//! A FUSE filesystem for tests: one file, `disk.img`, passed through to a real file, whose
//! I/O the test can slow down or fail at run time. Other files (the daemon's journal and
//! stats beside the image) can be created, written, renamed and removed; they live in the
//! backing file's directory, and their writes and syncs can be failed as a whole. It puts a real kernel path (VFS, FUSE,
//! io_uring's workers) under the daemon while letting a test decide how each operation ends:
//! - slow writes: the data lands in the backing file at once, the reply comes later (a disk
//!   that has written but not yet acknowledged, which is what a crash leaves half done);
//! - failing writes in a byte range: the first half of the data is written (a torn write),
//!   then the error (EIO, ENOSPC) is returned;
//! - failing reads in a byte range, and failing the next fsyncs.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use super::{guardblk, Daemon};
use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    INodeNo, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, WriteFlags,
};

const FILE_NAME: &str = "disk.img";
const FILE_INO: INodeNo = INodeNo(2);
const TTL: Duration = Duration::from_secs(1);

/// What the test changes while the filesystem runs.
#[derive(Default)]
struct Knobs {
    /// Replies to writes overlapping this byte range wait this long.
    slow_writes: Option<(Range<u64>, Duration)>,
    /// Replies to reads overlapping this byte range wait this long.
    slow_reads: Option<(Range<u64>, Duration)>,
    /// Writes overlapping this range are torn and fail with this errno.
    failing_writes: Option<(Range<u64>, i32)>,
    /// Reads overlapping this range fail with this errno.
    failing_reads: Option<(Range<u64>, i32)>,
    /// This many fsyncs from now fail with EIO.
    failing_fsyncs: u32,
    /// fsyncs that reached the filesystem (failed ones included).
    fsyncs: u64,
    /// Writes and fsyncs of every file but `disk.img` fail with this errno.
    failing_other_files: Option<i32>,
}

fn overlaps(range: &Range<u64>, offset: u64, len: u64) -> bool {
    offset < range.end && range.start < offset + len
}

struct PassThrough {
    backing: File,
    /// The directory holding `backing`, where the other files live.
    dir: PathBuf,
    /// The other files by inode: name and open file.
    others: Mutex<BTreeMap<INodeNo, (OsString, Arc<File>)>>,
    next_ino: std::sync::atomic::AtomicU64,
    /// Open the file with FOPEN_DIRECT_IO (no page cache, no shared mapping).
    direct_io: bool,
    knobs: Arc<Mutex<Knobs>>,
}

/// The mounted filesystem; unmounted when dropped.
pub struct FaultFs {
    session: Option<BackgroundSession>,
    _mountpoint: tempfile::TempDir,
    path: PathBuf,
    backing: PathBuf,
    knobs: Arc<Mutex<Knobs>>,
}

impl Drop for FaultFs {
    /// Unmount. A daemon killed a moment ago may still hold the image open for a little
    /// while (the kernel tears its io_uring down after the process exits), so a busy mount
    /// is tried again for up to 2 s, then detached; the session's own drop gave up at the
    /// first EBUSY and left a mount behind for nearly every test.
    fn drop(&mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        let mountpoint = self._mountpoint.path().to_path_buf();
        let c = std::ffi::CString::new(mountpoint.as_os_str().as_encoded_bytes()).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        loop {
            // SAFETY: a NUL-terminated path that lives across the call.
            if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
                let _ = session.join();
                return;
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EBUSY) || std::time::Instant::now() > deadline {
                eprintln!("unmounting {}: {e}; detaching it", mountpoint.display());
                // SAFETY: as above; MNT_DETACH touches nothing of ours.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl FaultFs {
    /// Mount a filesystem whose `disk.img` is `backing`, without a page cache: every read
    /// and write of the daemon is a request here.
    pub fn mount(backing: &Path) -> FaultFs {
        Self::mount_with(backing, true)
    }

    /// As [`FaultFs::mount`], with the kernel's page cache, so the file can be mapped shared
    /// (PI metadata is): stores reach us as write-back WRITEs, msync as FSYNC.
    pub fn mount_cached(backing: &Path) -> FaultFs {
        Self::mount_with(backing, false)
    }

    fn mount_with(backing: &Path, direct_io: bool) -> FaultFs {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(backing)
            .unwrap();
        let knobs = Arc::new(Mutex::new(Knobs::default()));
        let mountpoint = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("guardblk-test".into()),
            MountOption::DefaultPermissions,
        ];
        // Several threads, so fast requests are answered while a slow one's reply waits.
        config.n_threads = Some(4);
        let session = fuser::spawn_mount(
            PassThrough {
                backing: file,
                dir: backing.parent().unwrap().to_path_buf(),
                others: Mutex::new(BTreeMap::new()),
                next_ino: std::sync::atomic::AtomicU64::new(FILE_INO.0 + 1),
                direct_io,
                knobs: Arc::clone(&knobs),
            },
            mountpoint.path(),
            &config,
        )
        .expect("mount the FUSE test filesystem (needs /dev/fuse and root)");
        let path = mountpoint.path().join(FILE_NAME);
        FaultFs {
            session: Some(session),
            _mountpoint: mountpoint,
            path,
            backing: backing.to_path_buf(),
            knobs,
        }
    }

    /// The file behind the mount: what actually reached the "disk".
    pub fn backing(&self) -> &Path {
        &self.backing
    }

    /// The image as the daemon sees it, through FUSE.
    pub fn image(&self) -> &Path {
        &self.path
    }

    /// From now on, replies to writes touching `range` come `delay` late (the data is
    /// written at once).
    pub fn slow_writes(&self, range: Range<u64>, delay: Duration) {
        self.knobs.lock().unwrap().slow_writes = Some((range, delay));
    }

    pub fn fast_writes(&self) {
        self.knobs.lock().unwrap().slow_writes = None;
    }

    /// From now on, replies to reads touching `range` come `delay` late.
    pub fn slow_reads(&self, range: Range<u64>, delay: Duration) {
        self.knobs.lock().unwrap().slow_reads = Some((range, delay));
    }

    pub fn fast_reads(&self) {
        self.knobs.lock().unwrap().slow_reads = None;
    }

    /// Writes touching `range` write half their data, then fail with `errno`.
    pub fn fail_writes(&self, range: Range<u64>, errno: i32) {
        self.knobs.lock().unwrap().failing_writes = Some((range, errno));
    }

    /// Reads touching `range` fail with `errno`.
    pub fn fail_reads(&self, range: Range<u64>, errno: i32) {
        self.knobs.lock().unwrap().failing_reads = Some((range, errno));
    }

    /// The next `n` fsyncs fail with EIO.
    pub fn fail_fsyncs(&self, n: u32) {
        self.knobs.lock().unwrap().failing_fsyncs = n;
    }

    /// From now on, writes and fsyncs of every file but the image (the journal, the stats)
    /// fail with `errno`.
    pub fn fail_other_files(&self, errno: i32) {
        self.knobs.lock().unwrap().failing_other_files = Some(errno);
    }

    /// fsyncs that reached the filesystem so far.
    pub fn fsyncs(&self) -> u64 {
        self.knobs.lock().unwrap().fsyncs
    }

    /// The image's bytes as they are in the backing file (beneath FUSE).
    pub fn backing_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        let file = File::open(&self.backing).unwrap();
        file.read_exact_at(&mut out, offset).unwrap();
        out
    }

    /// Every operation succeeds again (slow writes stay as set).
    pub fn heal(&self) {
        let mut knobs = self.knobs.lock().unwrap();
        knobs.failing_writes = None;
        knobs.failing_reads = None;
        knobs.failing_fsyncs = 0;
        knobs.failing_other_files = None;
    }
}

impl PassThrough {
    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let (kind, size, perm, nlink) = if ino == INodeNo::ROOT {
            (FileType::Directory, 0, 0o755, 2)
        } else if ino == FILE_INO {
            (
                FileType::RegularFile,
                self.backing.metadata().ok()?.len(),
                0o600,
                1,
            )
        } else {
            let file = self.other(ino)?;
            let meta = file.metadata().ok()?;
            (
                FileType::RegularFile,
                meta.len(),
                std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) as u16 & 0o7777,
                1,
            )
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            flags: 0,
            blksize: 4096,
        })
    }

    fn other(&self, ino: INodeNo) -> Option<Arc<File>> {
        self.others
            .lock()
            .unwrap()
            .get(&ino)
            .map(|(_, f)| Arc::clone(f))
    }

    fn other_by_name(&self, name: &OsStr) -> Option<INodeNo> {
        let others = self.others.lock().unwrap();
        others
            .iter()
            .find(|(_, (n, _))| n == name)
            .map(|(ino, _)| *ino)
    }

    /// The file behind `ino`, and whether the failures set for other files apply to it.
    fn file(&self, ino: INodeNo) -> Option<(Arc<File>, Option<i32>)> {
        if ino == FILE_INO {
            return None;
        }
        let failing = self.knobs.lock().unwrap().failing_other_files;
        self.other(ino).map(|f| (f, failing))
    }
}

impl Filesystem for PassThrough {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let ino = if name == FILE_NAME {
            Some(FILE_INO)
        } else {
            self.other_by_name(name)
        };
        match ino.and_then(|ino| self.attr(ino)) {
            Some(attr) if parent == INodeNo::ROOT => reply.entry(&TTL, &attr, fuser::Generation(0)),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino != FILE_INO {
            return match self.other(ino) {
                Some(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO),
                None => reply.error(Errno::EISDIR),
            };
        }
        if self.direct_io {
            reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
        } else {
            reply.opened(FileHandle(0), FopenFlags::empty());
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if let Some((file, _)) = self.file(ino) {
            let mut buf = vec![0u8; size as usize];
            return match file.read_at(&mut buf, offset) {
                Ok(n) => reply.data(&buf[..n]),
                Err(e) => reply.error(Errno::from(e)),
            };
        }
        if let Some((range, errno)) = &self.knobs.lock().unwrap().failing_reads {
            if overlaps(range, offset, u64::from(size)) {
                return reply.error(Errno::from_i32(*errno));
            }
        }
        let mut buf = vec![0u8; size as usize];
        let n = match self.backing.read_at(&mut buf, offset) {
            Ok(n) => n,
            Err(e) => return reply.error(Errno::from(e)),
        };
        buf.truncate(n);
        let delay = match &self.knobs.lock().unwrap().slow_reads {
            Some((range, delay)) if overlaps(range, offset, u64::from(size)) => Some(*delay),
            _ => None,
        };
        match delay {
            Some(delay) => {
                std::thread::spawn(move || {
                    std::thread::sleep(delay);
                    reply.data(&buf);
                });
            }
            None => reply.data(&buf),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if let Some((file, failing)) = self.file(ino) {
            if let Some(errno) = failing {
                return reply.error(Errno::from_i32(errno));
            }
            return match file.write_all_at(data, offset) {
                Ok(()) => reply.written(data.len() as u32),
                Err(e) => reply.error(Errno::from(e)),
            };
        }
        let failing = match &self.knobs.lock().unwrap().failing_writes {
            Some((range, errno)) if overlaps(range, offset, data.len() as u64) => Some(*errno),
            _ => None,
        };
        if let Some(errno) = failing {
            // Torn: the first half reaches the disk, then the error.
            let _ = self.backing.write_all_at(&data[..data.len() / 2], offset);
            return reply.error(Errno::from_i32(errno));
        }
        if let Err(e) = self.backing.write_all_at(data, offset) {
            return reply.error(Errno::from(e));
        }
        let len = data.len() as u32;
        let delay = match &self.knobs.lock().unwrap().slow_writes {
            Some((range, delay)) if overlaps(range, offset, u64::from(len)) => Some(*delay),
            _ => None,
        };
        match delay {
            Some(delay) => {
                std::thread::spawn(move || {
                    std::thread::sleep(delay);
                    reply.written(len);
                });
            }
            None => reply.written(len),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        if let Some((file, failing)) = self.file(ino) {
            if let Some(errno) = failing {
                return reply.error(Errno::from_i32(errno));
            }
            return match file.sync_data() {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(Errno::from(e)),
            };
        }
        {
            let mut knobs = self.knobs.lock().unwrap();
            knobs.fsyncs += 1;
            if knobs.failing_fsyncs > 0 {
                knobs.failing_fsyncs -= 1;
                return reply.error(Errno::EIO);
            }
        }
        match self.backing.sync_data() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(Errno::from(e)),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        if parent != INodeNo::ROOT {
            return reply.error(Errno::ENOENT);
        }
        if name == FILE_NAME || self.other_by_name(name).is_some() {
            return reply.error(Errno::EEXIST);
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(mode & !umask & 0o7777)
            .open(self.dir.join(name));
        let file = match file {
            Ok(f) => f,
            Err(e) => return reply.error(Errno::from(e)),
        };
        let ino = INodeNo(
            self.next_ino
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        );
        self.others
            .lock()
            .unwrap()
            .insert(ino, (name.to_owned(), Arc::new(file)));
        match self.attr(ino) {
            Some(attr) => reply.created(
                &TTL,
                &attr,
                fuser::Generation(0),
                FileHandle(0),
                FopenFlags::FOPEN_DIRECT_IO,
            ),
            None => reply.error(Errno::EIO),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if let (Some(size), Some((file, _))) = (size, self.file(ino)) {
            if let Err(e) = file.set_len(size) {
                return reply.error(Errno::from(e));
            }
        }
        match self.attr(ino) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let Some(ino) = self.other_by_name(name) else {
            return reply.error(if name == FILE_NAME {
                Errno::EPERM
            } else {
                Errno::ENOENT
            });
        };
        if let Err(e) = std::fs::remove_file(self.dir.join(name)) {
            return reply.error(Errno::from(e));
        }
        self.others.lock().unwrap().remove(&ino);
        reply.ok();
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        name: &OsStr,
        _newparent: INodeNo,
        newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let Some(ino) = self.other_by_name(name) else {
            return reply.error(Errno::ENOENT);
        };
        if newname == FILE_NAME {
            return reply.error(Errno::EPERM);
        }
        if let Err(e) = std::fs::rename(self.dir.join(name), self.dir.join(newname)) {
            return reply.error(Errno::from(e));
        }
        let mut others = self.others.lock().unwrap();
        others.retain(|_, (n, _)| n != newname);
        if let Some(entry) = others.get_mut(&ino) {
            entry.0 = newname.to_owned();
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(1 << 20, 1 << 19, 1 << 19, 16, 14, 4096, 255, 4096);
    }
}

/// A PI image (type 1, 4 KiB intervals) whose data lives behind a [`FaultFs`] (its metadata on
/// a plain filesystem: the store is memory-mapped, which FUSE's direct I/O does not allow),
/// and a daemon serving it. Fields drop in order: the daemon dies before the filesystem
/// unmounts.
pub struct FuseImage {
    pub daemon: Option<Daemon>,
    pub fs: FaultFs,
    /// The filesystem holding the metadata, when it is a FaultFs too.
    pub meta_fs: Option<FaultFs>,
    pub meta: PathBuf,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

impl FuseImage {
    pub fn new(size: u64) -> FuseImage {
        Self::build(size, false)
    }

    /// As [`FuseImage::new`], with the metadata file behind a second, page-cached FaultFs
    /// (`meta_fs`), so its write-back and syncs can fail too.
    pub fn with_metadata_on_fuse(size: u64) -> FuseImage {
        Self::build(size, true)
    }

    fn build(size: u64, metadata_on_fuse: bool) -> FuseImage {
        let backing_dir = tempfile::tempdir().unwrap();
        let meta_dir = tempfile::tempdir().unwrap();
        let backing = backing_dir.path().join(FILE_NAME);
        let meta = meta_dir.path().join("disk.img.pi");
        let created = guardblk(&[
            "create",
            backing.to_str().unwrap(),
            "--size",
            &size.to_string(),
            "--pi",
            "type1",
            "--interval",
            "4096",
            "--pi-meta",
            meta.to_str().unwrap(),
        ]);
        assert!(created.status.success(), "{created:?}");
        let fs = FaultFs::mount(&backing);
        let meta_fs = metadata_on_fuse.then(|| FaultFs::mount_cached(&meta));
        let meta = match &meta_fs {
            Some(meta_fs) => meta_fs.image().to_path_buf(),
            None => meta,
        };
        let mut image = FuseImage {
            daemon: None,
            fs,
            meta_fs,
            meta,
            _dirs: (backing_dir, meta_dir),
        };
        let args = image.serve_args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        image.daemon = Some(Daemon::serve(
            tempfile::tempdir().unwrap(),
            image.fs.image().to_path_buf(),
            &args,
        ));
        image
    }

    pub fn serve_args(&self) -> Vec<String> {
        vec![
            "--pi-meta".into(),
            self.meta.to_str().unwrap().into(),
            "--io-engine".into(),
            "io-uring".into(),
        ]
    }

    pub fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().unwrap()
    }

    /// SIGKILL the daemon and start another on the same socket and image.
    pub fn kill_and_restart(&mut self) {
        let mut d = self.daemon.take().unwrap();
        d.child.kill().unwrap();
        let args = self.serve_args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (d, _) = d.restart_after_kill(&args, Duration::from_secs(20));
        self.daemon = Some(d);
    }

    /// Stop the daemon with SIGTERM (it must exit cleanly), scrub the image, and fail the
    /// test unless the scrub is clean.
    pub fn stop_and_assert_scrub_clean(&mut self) {
        let scrub = self.stop_and_scrub();
        assert!(
            scrub.status.success(),
            "scrub not clean: {}\n{}",
            String::from_utf8_lossy(&scrub.stdout),
            String::from_utf8_lossy(&scrub.stderr)
        );
    }

    /// Stop the daemon with SIGTERM (it must exit cleanly) and scrub the image.
    pub fn stop_and_scrub(&mut self) -> std::process::Output {
        let mut d = self.daemon.take().unwrap();
        let status = d.terminate();
        assert!(status.success(), "daemon exit {status:?}: {}", d.log_text());
        guardblk(&[
            "scrub",
            self.fs.image().to_str().unwrap(),
            "--pi-meta",
            self.meta.to_str().unwrap(),
        ])
    }
}
