//! The disk image the daemon serves: a raw file or block device (opened for direct I/O), or
//! a Ceph RBD image ([`super::rbd`]).
//!
//! Owns opening, creating, sizing and locking the image, and synchronous I/O for tools.
//! Knows nothing about virtio or requests; the data path's I/O goes through
//! [`super::engine`], which asks [`Image::backing`] which engines can reach it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;

use super::rbd::{CephOptions, RbdError, RbdImage, RbdSpec};
use super::{files, AlignedBuf, EngineChoice, EngineKind};

/// The unit all virtio-blk offsets are expressed in.
pub const SECTOR_SIZE: u64 = 512;

#[derive(Debug, Error)]
pub enum ImageError {
    #[error("image {path} does not exist (create it with `guardblk create {path} --size 8G`)")]
    Missing { path: PathBuf },
    #[error("cannot open image {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("image {path} is {size} bytes, which is not a multiple of 512; pad or truncate it to a whole number of sectors")]
    NotSectorMultiple { path: PathBuf, size: u64 },
    #[error("image {path} is empty; a disk needs at least one sector")]
    Empty { path: PathBuf },
    #[error("{path} is neither a regular file nor a block device")]
    NotADisk { path: PathBuf },
    #[error("image {path} is already being served by another process (it holds the image lock)")]
    Locked { path: PathBuf },
    #[error("{path} already exists; refusing to overwrite it")]
    AlreadyExists { path: PathBuf },
    #[error("cannot create image {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("image size {size} is not a positive multiple of 512 bytes")]
    BadSize { size: u64 },
    #[error(transparent)]
    Rbd(#[from] RbdError),
}

/// Alignment the kernel demands of O_DIRECT buffers and file offsets on this image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectIoAlignment {
    pub memory: u64,
    pub offset: u64,
}

// Filesystem magics (linux/magic.h).
const TMPFS_MAGIC: i64 = 0x0102_1994;
const FUSE_MAGIC: i64 = 0x6573_5546;
const NFS_MAGIC: i64 = 0x0000_6969;
const SMB_MAGIC: i64 = 0x0000_517b;
const CIFS_MAGIC: i64 = 0xff53_4d42;
const SMB2_MAGIC: i64 = 0xfe53_4d42;
const CEPH_MAGIC: i64 = 0x00c3_6400;
const V9FS_MAGIC: i64 = 0x0102_1997;

/// An open disk image shared (read-only after opening) by every queue.
#[derive(Debug)]
pub struct Image {
    /// What the operator named: a file or device path, or `rbd:POOL/IMAGE`.
    path: PathBuf,
    size: u64,
    read_only: bool,
    backing: Backing,
}

/// Where the image's bytes live.
#[derive(Debug)]
pub enum Backing {
    File(FileImage),
    /// Shared by every queue's engine: one librbd handle, so one exclusive-lock owner.
    Rbd(Arc<RbdImage>),
}

/// A raw image file or block device.
#[derive(Debug)]
pub struct FileImage {
    file: File,
    /// Holds the exclusive flock that says "this image is being served" (see `Image::open`).
    lock: File,
    /// `None` when the host filesystem refused O_DIRECT and the image is served buffered.
    direct_io: Option<DirectIoAlignment>,
    block_device: bool,
}

impl FileImage {
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl Image {
    /// Create a sparse raw image of `size` bytes. Refuses to touch an existing file.
    pub fn create(path: &Path, size: u64) -> Result<(), ImageError> {
        if size == 0 || !size.is_multiple_of(SECTOR_SIZE) {
            return Err(ImageError::BadSize { size });
        }
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| match source.kind() {
                io::ErrorKind::AlreadyExists => ImageError::AlreadyExists { path: path.into() },
                _ => ImageError::Create {
                    path: path.into(),
                    source,
                },
            })?;
        file.set_len(size).map_err(|source| {
            let _ = std::fs::remove_file(path);
            ImageError::Create {
                path: path.into(),
                source,
            }
        })
    }

    /// Open an existing image for serving, preferring O_DIRECT, and take its exclusive lock.
    pub fn open(path: &Path, read_only: bool) -> Result<Image, ImageError> {
        let meta = std::fs::metadata(path).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => ImageError::Missing { path: path.into() },
            _ => ImageError::Open {
                path: path.into(),
                source,
            },
        })?;
        let block_device = meta.file_type().is_block_device();
        if !meta.is_file() && !block_device {
            return Err(ImageError::NotADisk { path: path.into() });
        }

        let open = |direct: bool| {
            let mut opts = OpenOptions::new();
            opts.read(true).write(!read_only);
            opts.custom_flags(libc::O_CLOEXEC | if direct { libc::O_DIRECT } else { 0 });
            opts.open(path)
        };
        let (file, direct) = match open(true) {
            Ok(f) => (f, true),
            // EINVAL: the filesystem has no O_DIRECT support. Serve through the page cache.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                let f = open(false).map_err(|source| ImageError::Open {
                    path: path.into(),
                    source,
                })?;
                tracing::warn!(image = %path.display(), "host filesystem refuses O_DIRECT; serving through the page cache");
                (f, false)
            }
            Err(source) => {
                return Err(ImageError::Open {
                    path: path.into(),
                    source,
                })
            }
        };

        // The lock lives on a descriptor of its own that no io_uring ever holds: the kernel
        // tears rings down asynchronously after a process dies (even by SIGKILL), and a lock
        // on a registered file would outlive the daemon by that long.
        let lock = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| ImageError::Open {
                path: path.into(),
                source,
            })?;
        if !files::try_lock_exclusive(&lock) {
            return Err(ImageError::Locked { path: path.into() });
        }

        let size = if block_device {
            files::size(&file).map_err(|source| ImageError::Open {
                path: path.into(),
                source,
            })?
        } else {
            meta.len()
        };
        if size == 0 {
            return Err(ImageError::Empty { path: path.into() });
        }
        if size % SECTOR_SIZE != 0 {
            return Err(ImageError::NotSectorMultiple {
                path: path.into(),
                size,
            });
        }
        let direct_io = direct.then(|| direct_io_alignment(&file));
        Ok(Image {
            path: path.into(),
            size,
            read_only,
            backing: Backing::File(FileImage {
                file,
                lock,
                direct_io,
                block_device,
            }),
        })
    }

    /// Connect to the cluster and open the RBD image `spec` for serving or for tools.
    pub fn open_rbd(
        spec: &RbdSpec,
        options: &CephOptions,
        read_only: bool,
    ) -> Result<Image, ImageError> {
        let rbd = RbdImage::open(spec, options, read_only)?;
        if read_only {
            rbd.check_no_writer()?;
        } else {
            rbd.lock_exclusive()?;
        }
        let path = PathBuf::from(spec.to_string());
        let size = rbd.size();
        if size == 0 {
            return Err(ImageError::Empty { path });
        }
        if size % SECTOR_SIZE != 0 {
            return Err(ImageError::NotSectorMultiple { path, size });
        }
        Ok(Image {
            path,
            size,
            read_only,
            backing: Backing::Rbd(Arc::new(rbd)),
        })
    }

    pub fn backing(&self) -> &Backing {
        &self.backing
    }

    /// The file image, if this is one.
    fn file_image(&self) -> Option<&FileImage> {
        match &self.backing {
            Backing::File(f) => Some(f),
            Backing::Rbd(_) => None,
        }
    }

    /// Where the files guardblk keeps beside an image go (its journal, statistics and
    /// learned mutation marks, named by appending to this path): beside a file image, and
    /// for an `rbd:` image under `--rbd-state-dir` as `POOL/IMAGE` (they are this host's
    /// record, not the cluster's).
    pub fn state_base(&self) -> PathBuf {
        match &self.backing {
            Backing::File(_) => self.path.clone(),
            Backing::Rbd(rbd) => rbd
                .options()
                .state_dir
                .join(&rbd.spec().pool)
                .join(&rbd.spec().image),
        }
    }

    /// How to name the image to the operator: its path, or `rbd:POOL/IMAGE`.
    pub fn name(&self) -> std::path::Display<'_> {
        self.path.display()
    }

    /// The path the operator named. For an `rbd:` image this is its name, not a local file:
    /// its default PI metadata (`rbd:POOL/IMAGE.pi`) is named from it, but the local files
    /// kept beside an image are named from [`Image::state_base`].
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn sectors(&self) -> u64 {
        self.size / SECTOR_SIZE
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// `None` for images served through the page cache, and for `rbd:` images (librbd
    /// takes any buffer and offset).
    pub fn direct_io(&self) -> Option<DirectIoAlignment> {
        self.file_image().and_then(|f| f.direct_io)
    }

    pub fn is_block_device(&self) -> bool {
        self.file_image().is_some_and(|f| f.block_device)
    }

    /// Read exactly `buf.len()` bytes at `offset`, synchronously (tools and slow paths; the
    /// data path uses the engines). Under O_DIRECT, `buf` and `offset` must be aligned.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match &self.backing {
            Backing::File(f) => std::os::unix::fs::FileExt::read_exact_at(&f.file, buf, offset),
            Backing::Rbd(rbd) => rbd.read_at(buf, offset),
        }
    }

    /// Read up to `buf.len()` bytes at `offset`; fewer (0 at the end) only at the end of
    /// the image.
    pub fn read_some_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        match &self.backing {
            Backing::File(f) => std::os::unix::fs::FileExt::read_at(&f.file, buf, offset),
            Backing::Rbd(rbd) => {
                let n = buf.len().min(self.size.saturating_sub(offset) as usize);
                rbd.read_at(&mut buf[..n], offset)?;
                Ok(n)
            }
        }
    }

    /// Write all of `buf` at `offset`, synchronously; same alignment rules as `read_at`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match &self.backing {
            Backing::File(f) => std::os::unix::fs::FileExt::write_all_at(&f.file, buf, offset),
            Backing::Rbd(rbd) => rbd.write_at(buf, offset),
        }
    }

    /// Make completed writes durable: fdatasync a file, flush an RBD image.
    pub fn sync(&self) -> io::Result<()> {
        match &self.backing {
            Backing::File(f) => f.file.sync_data(),
            Backing::Rbd(rbd) => rbd.flush(),
        }
    }

    /// Start of the next allocated extent at or after `offset` (`None`: only a hole follows).
    /// Block devices and filesystems without SEEK_DATA report everything as data.
    pub fn next_data(&self, offset: u64) -> Option<u64> {
        self.seek(offset, libc::SEEK_DATA)
    }

    /// Start of the next hole at or after `offset` (the end of the image if none).
    pub fn next_hole(&self, offset: u64) -> u64 {
        self.seek(offset, libc::SEEK_HOLE).unwrap_or(self.size)
    }

    fn seek(&self, offset: u64, whence: i32) -> Option<u64> {
        if offset >= self.size {
            return None;
        }
        let f = match &self.backing {
            Backing::File(f) => f,
            // RBD: objects that do not exist are holes. If the cluster cannot say, everything
            // counts as data, as for file systems without SEEK_DATA.
            Backing::Rbd(rbd) => {
                return match (rbd.next_allocated(offset), whence == libc::SEEK_DATA) {
                    (Ok(None), true) => None,
                    (Ok(None), false) => Some(offset),
                    (Ok(Some((start, _))), true) => Some(start),
                    (Ok(Some((start, end))), false) => {
                        Some(if start > offset { offset } else { end })
                    }
                    (Err(_), true) => Some(offset),
                    (Err(_), false) => Some(self.size),
                }
            }
        };
        if f.block_device {
            return Some(if whence == libc::SEEK_DATA {
                offset
            } else {
                self.size
            });
        }
        // SAFETY: lseek on a valid descriptor; the data path never uses the file position
        // (it uses positioned I/O only), so moving it is harmless.
        let rc = unsafe { libc::lseek(f.fd(), offset as libc::off_t, whence) };
        if rc < 0 {
            return match io::Error::last_os_error().raw_os_error() {
                Some(libc::ENXIO) => None,
                _ => Some(if whence == libc::SEEK_DATA {
                    offset
                } else {
                    self.size
                }),
            };
        }
        Some((rc as u64).min(self.size))
    }

    /// Whether the kernel can attempt I/O on this image without blocking (RWF_NOWAIT).
    /// Without it io_uring hands every operation to a worker thread, so the inline engine
    /// is faster (see `storage::inline`).
    pub fn supports_nonblocking_io(&self) -> bool {
        let Some(f) = self.file_image() else {
            return false;
        };
        let mut probe = AlignedBuf::zeroed(f.direct_io.map_or(SECTOR_SIZE, |a| a.offset) as usize);
        let iov = libc::iovec {
            iov_base: probe.as_mut_ptr() as *mut libc::c_void,
            iov_len: probe.len(),
        };
        // SAFETY: one iovec over our own buffer, valid for its length during the call.
        let rc = unsafe { libc::preadv2(f.fd(), &iov, 1, 0, libc::RWF_NOWAIT) };
        rc >= 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN)
    }

    /// Whether writing to this image makes the kernel copy the data in the submitting thread
    /// (tmpfs and ramfs, FUSE, network filesystems, or no O_DIRECT at all: the page cache)
    /// rather than moving it from the caller's buffer by DMA. Decides whether a zero-copy PI
    /// write can save a copy at all (`requests::policy`).
    ///
    /// librbd copies a write into its messages before sending it (`rbd_disable_zero_copy_writes`
    /// is on by default, so that a buffer changing in flight cannot break the messenger's CRC),
    /// so `rbd:` images count as copying.
    pub fn kernel_copies_data(&self) -> bool {
        if self.file_image().is_none() {
            return true;
        }
        if self.is_block_device() {
            return false; // the node sits on devtmpfs; the device itself DMAs
        }
        if self.direct_io().is_none() {
            return true;
        }
        // Filesystem magics (linux/magic.h) whose "direct" I/O is a copy by the kernel.
        const COPYING: [i64; 9] = [
            TMPFS_MAGIC,
            0x8584_58f6, // ramfs
            FUSE_MAGIC,
            NFS_MAGIC,
            SMB_MAGIC,
            CIFS_MAGIC,
            SMB2_MAGIC,
            CEPH_MAGIC,
            V9FS_MAGIC,
        ];
        self.fs_magic().is_some_and(|m| COPYING.contains(&m))
    }

    /// Whether io_uring would run this image's reads and writes in the submitting thread and
    /// block it there: FUSE and network filesystems accept non-blocking submission but then
    /// wait for their server inside it (seen on Linux 6.18: a FUSE write whose reply is late
    /// holds the queue thread in `request_wait_answer` under `io_uring_enter`, so every
    /// request behind it waits). For those the engine sends every operation to the kernel's
    /// worker threads instead (IOSQE_ASYNC), and they run concurrently.
    pub fn submission_may_block(&self) -> bool {
        const BLOCKING: [i64; 7] = [
            FUSE_MAGIC, NFS_MAGIC, SMB_MAGIC, CIFS_MAGIC, SMB2_MAGIC, CEPH_MAGIC, V9FS_MAGIC,
        ];
        !self.is_block_device() && self.fs_magic().is_some_and(|m| BLOCKING.contains(&m))
    }

    /// The magic number of the filesystem holding the image (statfs f_type).
    fn fs_magic(&self) -> Option<i64> {
        let f = self.file_image()?;
        // SAFETY: statfs is plain data; fstatfs fills it for our open descriptor.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: as above; the struct outlives the call.
        if unsafe { libc::fstatfs(f.fd(), &mut st) } != 0 {
            return None;
        }
        Some(st.f_type as i64)
    }

    /// The engine to use for this image when the operator chose `choice` (which the command
    /// line only lets name io_uring or inline for files; librbd is all `rbd:` images have).
    pub fn engine_for(&self, choice: EngineChoice) -> EngineKind {
        if self.file_image().is_none() {
            return EngineKind::Rbd;
        }
        match choice {
            EngineChoice::Auto => self.preferred_engine(),
            EngineChoice::Fixed(kind) => kind,
        }
    }

    /// The engine `--io-engine auto` picks for this image.
    fn preferred_engine(&self) -> EngineKind {
        if self.supports_nonblocking_io() {
            EngineKind::IoUring
        } else {
            EngineKind::Inline
        }
    }

    /// Drop the image lock now, at the end of a clean shutdown, rather than at exit.
    pub fn release_lock(&self) {
        if let Some(f) = self.file_image() {
            files::unlock(&f.lock);
        }
    }

    /// The image file's descriptor; `None` for an `rbd:` image.
    pub fn fd(&self) -> Option<RawFd> {
        self.file_image().map(FileImage::fd)
    }

    /// Whether a transfer with these buffers at this offset can go to the kernel as is.
    /// Buffered images accept anything; O_DIRECT ones need aligned addresses and lengths.
    pub fn accepts_direct(&self, offset: u64, buffers: &[libc::iovec]) -> bool {
        let Some(align) = self.direct_io() else {
            return true;
        };
        offset.is_multiple_of(align.offset)
            && buffers.iter().all(|iov| {
                (iov.iov_base as u64).is_multiple_of(align.memory)
                    && (iov.iov_len as u64).is_multiple_of(align.offset)
            })
    }
}

/// Ask the kernel (statx STATX_DIOALIGN, Linux 6.1+) what O_DIRECT needs; assume 512 when it
/// cannot say, which every Linux direct-I/O target accepts for memory and most for offsets.
fn direct_io_alignment(file: &File) -> DirectIoAlignment {
    // SAFETY: statx is a plain struct of integers, valid when zeroed.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: statx writes only into `stx`; the empty path with AT_EMPTY_PATH names the fd.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 && stx.stx_dio_offset_align != 0 {
        DirectIoAlignment {
            memory: u64::from(stx.stx_dio_mem_align.max(1)),
            offset: u64::from(stx.stx_dio_offset_align),
        }
    } else {
        DirectIoAlignment {
            memory: SECTOR_SIZE,
            offset: SECTOR_SIZE,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_refuses_bad_sizes_and_existing_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.img");
        assert!(matches!(
            Image::create(&p, 0),
            Err(ImageError::BadSize { .. })
        ));
        assert!(matches!(
            Image::create(&p, 1000),
            Err(ImageError::BadSize { .. })
        ));
        Image::create(&p, 1 << 20).unwrap();
        assert!(matches!(
            Image::create(&p, 1 << 20),
            Err(ImageError::AlreadyExists { .. })
        ));
        let img = Image::open(&p, false).unwrap();
        assert_eq!(img.sectors(), 2048);
    }

    #[test]
    fn open_rejects_missing_unaligned_and_locked_images() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("odd.img");
        assert!(matches!(
            Image::open(&p, false),
            Err(ImageError::Missing { .. })
        ));
        std::fs::write(&p, vec![0u8; 1000]).unwrap();
        assert!(matches!(
            Image::open(&p, false),
            Err(ImageError::NotSectorMultiple { .. })
        ));
        std::fs::write(&p, vec![0u8; 1024]).unwrap();
        let _held = Image::open(&p, false).unwrap();
        assert!(matches!(
            Image::open(&p, true),
            Err(ImageError::Locked { .. })
        ));
    }
}
