//! The few operations on files and block devices that more than one layer needs, each in one
//! place: the size of a file or device, the exclusive advisory lock that says "in use",
//! zeroing a byte range, and replacing a small file whole.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};

/// ioctl: the size of a block device in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// Replace `path` with `contents` so a reader sees the old file or the new one, never a part
/// (written beside it, then renamed over it).
pub fn replace(path: &std::path::Path, contents: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path)
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
    fn replace_swaps_the_whole_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("doc.json");
        replace(&path, b"first").unwrap();
        replace(&path, b"second, longer").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second, longer");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no .tmp left behind");
    }
}
