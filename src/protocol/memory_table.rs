//! Guest memory tables a frontend hands over (SET_MEM_TABLE, ADD_MEM_REG): is every region
//! backed by its file?
//!
//! vhost-user-backend maps each region at the offset and length the frontend names and
//! installs the result; vm-memory 0.18 checks neither against the file's size on Unix. A
//! region past the end of its memfd is then a mapping whose first touch raises SIGBUS — the
//! request handler reading a used index at SET_VRING_ADDR, a queue thread reading a ring —
//! and the daemon dies with every request in flight. Guest RAM is not one of the mappings
//! the SIGBUS guard (storage/sigbus.rs) covers, so the table is refused instead.
//!
//! Owns only the check; must not touch the regions' contents.

use std::io;

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Every file-backed region lies inside its file: `[offset, offset + len)` ends at or
/// before the file's end. Only regular files are checked (memfds, tmpfs and hugetlbfs
/// files): a character device such as a DAX device has no size to check against and is
/// mapped as given.
pub fn check_backing(mem: &GuestMemoryMmap) -> io::Result<()> {
    for region in mem.iter() {
        let Some(backing) = region.file_offset() else {
            continue; // anonymous memory: nothing to run past
        };
        let meta = backing.file().metadata()?;
        if !meta.file_type().is_file() {
            continue;
        }
        let (offset, len) = (backing.start(), region.len());
        if offset.checked_add(len).is_none_or(|end| end > meta.len()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "guest memory region at {:#x} maps {len:#x} bytes from offset {offset:#x} of a file of {:#x} bytes: past its end",
                    region.start_addr().0,
                    meta.len()
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap, MmapRegion};

    const PAGE: u64 = 4096;

    fn table(file: &File, offset: u64, len: u64) -> GuestMemoryMmap {
        let mapping = MmapRegion::from_file(
            FileOffset::new(file.try_clone().unwrap(), offset),
            len as usize,
        )
        .unwrap();
        let region = GuestRegionMmap::new(mapping, GuestAddress(0x10_0000)).unwrap();
        GuestMemoryMmap::from_regions(vec![region]).unwrap()
    }

    fn four_page_file() -> File {
        let file = tempfile::tempfile().unwrap();
        file.set_len(4 * PAGE).unwrap();
        file
    }

    #[test]
    fn regions_inside_their_file_pass() {
        let file = four_page_file();
        assert!(check_backing(&table(&file, 0, 4 * PAGE)).is_ok());
        assert!(check_backing(&table(&file, 2 * PAGE, 2 * PAGE)).is_ok());
        let anonymous =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), PAGE as usize)]).unwrap();
        assert!(check_backing(&anonymous).is_ok());
    }

    /// Each of these maps without complaint and would SIGBUS at its first touch.
    #[test]
    fn regions_past_their_file_are_refused() {
        let file = four_page_file();
        for (offset, len) in [
            (0, 5 * PAGE),                // longer than the file
            (PAGE, 4 * PAGE),             // ends a page past it
            (4 * PAGE, PAGE),             // starts at its end
            (0x2400_0000_0000, 4 * PAGE), // the fuzzer's offset
        ] {
            let err = check_backing(&table(&file, offset, len)).unwrap_err();
            assert_eq!(
                err.kind(),
                io::ErrorKind::InvalidInput,
                "{offset:#x}+{len:#x}"
            );
        }
    }

    /// A device file has no size to compare with (a DAX device as guest RAM): not refused.
    #[test]
    fn device_files_are_not_checked() {
        let zero = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/zero")
            .unwrap();
        assert!(check_backing(&table(&zero, 0, PAGE)).is_ok());
    }
}
