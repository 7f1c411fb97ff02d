//! The few operations on files and block devices that more than one layer needs, each in one
//! place: the size of a file or device, the exclusive advisory lock that says "in use",
//! zeroing a byte range, replacing a small file whole, opening the daemon's own files
//! without following symbolic links, and a shared memory mapping of a file.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// ioctl: the size of a block device in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// Replace `path` with `contents` so a reader sees the old file or the new one, never a part
/// (written beside it, then renamed over it). The file gets `mode`. The temporary is created
/// fresh (O_EXCL, O_NOFOLLOW): a link planted at its name by someone who can write the
/// directory is removed, never written through; and rename replaces a link at `path` itself.
pub fn replace(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    use std::io::Write;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)?;
    file.write_all(contents)?;
    drop(file);
    std::fs::rename(&tmp, path)
}

/// A shared mapping of `len` bytes of a file (the PI metadata, a frontend's in-flight region
/// or dirty log), unmapped on drop. Users reach it only through atomics or volatile copies.
/// A page that loses its backing (file truncated, file system full) does not kill the
/// daemon: see [`super::sigbus`]; [`SharedMapping::faults`] says it happened.
pub struct SharedMapping {
    ptr: *mut u8,
    len: usize,
    guard: super::sigbus::Registration,
}

// SAFETY: plain shared memory, unmapped only on drop; every user accesses it through atomics
// (tuples, bitmap words, region fields, log bytes), so it may be used from any thread.
unsafe impl Send for SharedMapping {}
// SAFETY: as above.
unsafe impl Sync for SharedMapping {}

impl SharedMapping {
    /// Map `len` bytes of `file` from `offset` (page-aligned), read-write if `writable`.
    pub fn new(file: &File, offset: u64, len: usize, writable: bool) -> io::Result<SharedMapping> {
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "mapping offset too large"))?;
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty mapping"));
        }
        let prot = libc::PROT_READ | if writable { libc::PROT_WRITE } else { 0 };
        // SAFETY: a fresh shared mapping of a file we hold open; the kernel picks the address
        // and checks fd, offset and length; the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(SharedMapping {
            ptr: ptr.cast(),
            len,
            guard: super::sigbus::register(ptr.cast(), len),
        })
    }

    /// Faults absorbed in this mapping: not 0 means some of its pages are stand-ins and the
    /// file no longer holds what was stored there.
    pub fn faults(&self) -> usize {
        self.guard.faults()
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }
}

impl Drop for SharedMapping {
    fn drop(&mut self) {
        // Unregister first: once unmapped, the range may be reused by anything.
        self.guard = super::sigbus::Registration::none();
        // SAFETY: ptr/len are exactly what mmap returned; the owner hands out no references
        // that outlive it.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Open one of the daemon's own files (PI metadata, journal) with `options`, without following
/// a symbolic link at `path`: whoever can write the directory could otherwise point the daemon
/// (often root) at any file. A link to a block device is the exception — devices are named
/// that way (`/dev/disk/by-id/...`) and only root makes device nodes — and is opened by its
/// resolved path. A link to anything else is refused with an error that says so.
pub fn open_no_follow(path: &Path, options: &mut OpenOptions) -> io::Result<File> {
    options.custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
    match options.open(path) {
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            let target = std::fs::canonicalize(path)?;
            if std::fs::metadata(&target)?.file_type().is_block_device() {
                return options.open(&target);
            }
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is a symbolic link (to {}); guardblk does not follow links for its own files",
                    path.display(),
                    target.display()
                ),
            ))
        }
        other => other,
    }
}

/// Allocate `len` bytes of `file` from `offset` (keeping what is there), so later writes into
/// the range, through a mapping too, never need space the file system may not have. Ok(false)
/// when the file system cannot preallocate (some FUSE and network file systems).
pub fn allocate(file: &File, offset: u64, len: u64) -> io::Result<bool> {
    // SAFETY: fallocate on a valid descriptor; no memory is involved.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, offset as i64, len as i64) };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Ok(false),
        _ => Err(err),
    }
}

/// Size of a regular file or block device.
pub fn size(file: &File) -> io::Result<u64> {
    let meta = file.metadata()?;
    if !meta.file_type().is_block_device() {
        return Ok(meta.len());
    }
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at `size`.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

/// Take the exclusive advisory lock on `file` without waiting; false if someone holds it.
pub fn try_lock_exclusive(file: &File) -> bool {
    // SAFETY: flock on a valid, owned descriptor; no memory is involved.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// Release the advisory lock now (closing would too, but an io_uring holding the file can
/// delay the close well past our exit).
pub fn unlock(file: &File) {
    // SAFETY: flock on a valid, owned descriptor; no memory is involved.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
}

/// Zero `len` bytes at `offset`, keeping the allocation: by fallocate where the file system or
/// device can, else by writing zeroes.
pub fn zero_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on a valid descriptor; no memory is involved.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let zeros = vec![0u8; 1 << 20];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn size_lock_and_zero_range_on_a_file() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(&[0xAB; 8192]).unwrap();
        assert_eq!(size(file.as_file()).unwrap(), 8192);

        assert!(try_lock_exclusive(file.as_file()));
        let other = File::open(file.path()).unwrap();
        assert!(
            !try_lock_exclusive(&other),
            "a second descriptor must not get the lock"
        );
        unlock(file.as_file());
        assert!(try_lock_exclusive(&other));

        zero_range(file.as_file(), 1024, 2048).unwrap();
        let mut back = vec![0u8; 8192];
        file.as_file().read_exact_at(&mut back, 0).unwrap();
        assert!(back[..1024].iter().all(|&b| b == 0xAB));
        assert!(back[1024..3072].iter().all(|&b| b == 0));
        assert!(back[3072..].iter().all(|&b| b == 0xAB));
    }

    #[test]
    fn replace_never_writes_through_a_planted_link_and_sets_the_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        let path = dir.path().join("doc.json");
        std::os::unix::fs::symlink(&victim, dir.path().join("doc.json.tmp")).unwrap();
        replace(&path, b"new", 0o600).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A link at the name itself is replaced, not followed.
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        replace(&path, b"newer", 0o644).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert!(!std::fs::symlink_metadata(&path)
            .unwrap()
            .file_type()
            .is_symlink());
    }

    #[test]
    fn open_no_follow_refuses_a_link_to_a_file_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        let link = dir.path().join("meta.pi");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let err = open_no_follow(&link, OpenOptions::new().read(true).write(true)).unwrap_err();
        assert!(err.to_string().contains("is a symbolic link"), "{err}");
        // A plain file opens as before.
        assert!(open_no_follow(&victim, OpenOptions::new().read(true)).is_ok());
    }

    #[test]
    fn replace_swaps_the_whole_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("doc.json");
        replace(&path, b"first", 0o644).unwrap();
        replace(&path, b"second, longer", 0o644).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second, longer");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no .tmp left behind");
    }
}
