//! Surviving SIGBUS in the daemon's shared file mappings.
//!
//! The PI metadata, a frontend's in-flight region and its dirty log are files mapped shared.
//! Touching such a mapping raises SIGBUS when the page has no backing: the file was truncated
//! under the daemon (by an operator, or by a hostile frontend shrinking its own memfd), or the
//! file system could not allocate the page (a full tmpfs, a sparse file on a full disk). The
//! default action kills the process, every guest with it.
//!
//! Instead, each [`crate::storage::files::SharedMapping`] registers its address range here, and
//! a process-wide handler answers a fault inside a registered range by putting a private
//! zero-filled page over the faulting one (`mmap(MAP_FIXED | MAP_ANONYMOUS)`) and counting the
//! fault for that mapping. The access then completes on the stand-in page and the thread goes
//! on; the mapping's owner sees [`Registration::faults`] rise and treats the mapping as lost
//! from then on (the PI store answers every request with an I/O error). A fault outside every
//! registered range is not ours: the handler puts back the action that was there before and
//! returns, so the access faults again and gets the old behaviour (a core dump by default).
//!
//! The handler does only what is async-signal-safe: atomic loads and stores, `mmap` and
//! `sigaction`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;

/// Registered mappings at most: the metadata plus an in-flight region and a dirty log for
/// each of at most two sessions fit many times over. A mapping beyond that is unguarded.
const SLOTS: usize = 32;

/// `len` of a slot being filled in (never a real length: mappings are far smaller).
const CLAIMING: usize = usize::MAX;

struct Slot {
    start: AtomicUsize,
    /// 0: free; CLAIMING: being filled in; else the registered length.
    len: AtomicUsize,
    faults: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)] // only to build the static array below
const FREE: Slot = Slot {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    faults: AtomicUsize::new(0),
};

static REGISTRY: [Slot; SLOTS] = [FREE; SLOTS];
static PAGE_SIZE: AtomicUsize = AtomicUsize::new(4096);
static INSTALL: Once = Once::new();
/// The SIGBUS action before ours, put back for faults that are not in a registered mapping.
static mut PREVIOUS: std::mem::MaybeUninit<libc::sigaction> = std::mem::MaybeUninit::zeroed();

/// A mapping's place in the registry; unregisters on drop (before the owner unmaps).
#[derive(Debug)]
pub struct Registration {
    slot: Option<usize>,
}

impl Registration {
    /// No registration (what a dropped mapping holds while it unmaps).
    pub fn none() -> Registration {
        Registration { slot: None }
    }

    /// How many faults the handler absorbed in this mapping (0 while its backing is whole).
    pub fn faults(&self) -> usize {
        self.slot
            .map_or(0, |i| REGISTRY[i].faults.load(Ordering::Acquire))
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            REGISTRY[i].len.store(0, Ordering::Release);
        }
    }
}

/// Guard `[start, start + len)` from now on (installing the handler on first use).
pub fn register(start: *mut u8, len: usize) -> Registration {
    install();
    for (i, slot) in REGISTRY.iter().enumerate() {
        if slot
            .len
            .compare_exchange(0, CLAIMING, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            slot.start.store(start as usize, Ordering::Relaxed);
            slot.faults.store(0, Ordering::Relaxed);
            slot.len.store(len, Ordering::Release);
            return Registration { slot: Some(i) };
        }
    }
    tracing::warn!(
        len,
        "more shared mappings than the SIGBUS guard tracks: this one is unguarded"
    );
    Registration { slot: None }
}

fn install() {
    INSTALL.call_once(|| {
        // SAFETY: sysconf has no memory effects.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if page > 0 {
            PAGE_SIZE.store(page as usize, Ordering::Relaxed);
        }
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; we fill in the
        // handler and flags, and sigaction reads `action` and writes the old action into
        // PREVIOUS, which nothing else touches until the handler runs (after this returns).
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut action.sa_mask);
            let previous = std::ptr::addr_of_mut!(PREVIOUS).cast::<libc::sigaction>();
            if libc::sigaction(libc::SIGBUS, &action, previous) != 0 {
                tracing::warn!(
                    error = %std::io::Error::last_os_error(),
                    "could not install the SIGBUS guard: a truncated metadata file would stop the daemon"
                );
            }
        }
    });
}

/// The SIGBUS handler (see the module comment).
extern "C" fn on_sigbus(
    _signal: libc::c_int,
    info: *mut libc::siginfo_t,
    _context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers; for SIGBUS si_addr
    // is the faulting address.
    let addr = unsafe { (*info).si_addr() } as usize;
    let page = PAGE_SIZE.load(Ordering::Relaxed);
    for slot in &REGISTRY {
        let len = slot.len.load(Ordering::Acquire);
        if len == 0 || len == CLAIMING {
            continue;
        }
        let start = slot.start.load(Ordering::Relaxed);
        if addr < start || addr - start >= len {
            continue;
        }
        let stand_in = addr & !(page - 1);
        // SAFETY: replaces exactly one page inside a mapping the daemon owns and registered
        // (so no other object lives there) with fresh private zeroed memory; mmap is
        // async-signal-safe on Linux (a plain system call).
        let mapped = unsafe {
            libc::mmap(
                stand_in as *mut libc::c_void,
                page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if mapped != libc::MAP_FAILED {
            slot.faults.fetch_add(1, Ordering::AcqRel);
            return;
        }
        break;
    }
    // Not a registered mapping (or no stand-in page to be had): the previous action handles
    // the fault again when the access is retried.
    // SAFETY: PREVIOUS was filled in by the sigaction call that installed this handler.
    unsafe {
        let previous = std::ptr::addr_of!(PREVIOUS).cast::<libc::sigaction>();
        libc::sigaction(libc::SIGBUS, previous, std::ptr::null_mut());
    }
}

#[cfg(test)]
mod tests {
    use crate::storage::files::SharedMapping;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn a_mapping_whose_file_is_truncated_underneath_faults_into_a_counted_stand_in_page() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(3 * 4096).unwrap();
        let map = SharedMapping::new(&file, 0, 3 * 4096, true).unwrap();
        let word = |page: usize| {
            // SAFETY: inside the 3-page mapping, 8-aligned.
            unsafe { &*map.as_ptr().add(page * 4096).cast::<AtomicU64>() }
        };
        word(0).store(7, Ordering::Release);
        word(2).store(9, Ordering::Release);
        assert_eq!(map.faults(), 0);

        file.set_len(4096).unwrap(); // pages 1 and 2 lose their backing
        assert_eq!(word(0).load(Ordering::Acquire), 7, "page 0 still backed");
        assert_eq!(map.faults(), 0);
        // Without the guard, each of these kills the test process.
        assert_eq!(
            word(2).load(Ordering::Acquire),
            0,
            "a stand-in page reads zeros"
        );
        word(1).store(5, Ordering::Release);
        assert_eq!(word(1).load(Ordering::Acquire), 5);
        assert_eq!(map.faults(), 2);
    }
}
