//! A FUSE filesystem for tests: one file, `disk.img`, passed through to a real file, whose
//! I/O the test can slow down at run time. It puts a real kernel path (VFS, FUSE, io_uring's
//! workers) under the daemon while letting a test decide when each write completes: data
//! lands in the backing file at once, the reply to the daemon comes later — a disk that has
//! written but not yet acknowledged, which is what a crash leaves half done.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    INodeNo, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyWrite, Request, WriteFlags,
};

const FILE_NAME: &str = "disk.img";
const FILE_INO: INodeNo = INodeNo(2);
const TTL: Duration = Duration::from_secs(1);

/// What the test changes while the filesystem runs.
#[derive(Default)]
struct Knobs {
    /// Replies to writes overlapping this byte range wait this long.
    slow_writes: Option<(Range<u64>, Duration)>,
}

struct PassThrough {
    backing: File,
    knobs: Arc<Mutex<Knobs>>,
}

/// The mounted filesystem; unmounted when dropped.
pub struct FaultFs {
    _session: BackgroundSession,
    _mountpoint: tempfile::TempDir,
    path: PathBuf,
    knobs: Arc<Mutex<Knobs>>,
}

impl FaultFs {
    /// Mount a filesystem whose `disk.img` is `backing`.
    pub fn mount(backing: &Path) -> FaultFs {
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
                knobs: Arc::clone(&knobs),
            },
            mountpoint.path(),
            &config,
        )
        .expect("mount the FUSE test filesystem (needs /dev/fuse and root)");
        let path = mountpoint.path().join(FILE_NAME);
        FaultFs {
            _session: session,
            _mountpoint: mountpoint,
            path,
            knobs,
        }
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
            return None;
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
}

impl Filesystem for PassThrough {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.attr(FILE_INO) {
            Some(attr) if parent == INodeNo::ROOT && name == FILE_NAME => {
                reply.entry(&TTL, &attr, fuser::Generation(0))
            }
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
            return reply.error(Errno::EISDIR);
        }
        // No page cache: every read and write of the daemon is a request here.
        reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let mut buf = vec![0u8; size as usize];
        match self.backing.read_at(&mut buf, offset) {
            Ok(n) => reply.data(&buf[..n]),
            Err(e) => reply.error(Errno::from(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if let Err(e) = self.backing.write_all_at(data, offset) {
            return reply.error(Errno::from(e));
        }
        let len = data.len() as u32;
        let delay = match &self.knobs.lock().unwrap().slow_writes {
            Some((range, delay)) if offset < range.end && range.start < offset + u64::from(len) => {
                Some(*delay)
            }
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
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.backing.sync_data() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(Errno::from(e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(1 << 20, 1 << 19, 1 << 19, 16, 14, 4096, 255, 4096);
    }
}
