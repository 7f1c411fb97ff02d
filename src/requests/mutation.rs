//! Where guests mutate buffers that are still being written: learned, not configured.
//!
//! When a zero-copy write turns out to have been changed by the guest while the disk was
//! reading it, the guest pages of the changed intervals and the LBA region they were written to
//! are marked. For a decay period afterwards, writes that touch a marked guest page or region
//! are bounced up front (copied with their guards computed in the same pass) instead of going
//! zero-copy and being rewritten after the fact. Windows reuses page-file and hibernation
//! buffers, Linux swap rewrites pages under writeback: both show up as the same guest pages
//! (and the same disk extents) again and again, so the marks catch them from behaviour alone.
//!
//! Memory is bounded and small: one byte per 4 KiB guest page, allocated per GiB of guest
//! physical address space only once a mutation is seen there, and one byte per 1 MiB of disk.
//! A byte holds a coarse timestamp (2 s units, wrapping); 0 means never marked.
//!
//! The marks outlive a daemon restart: [`MutationTracker::save`] lists the hot ones with their
//! age ([`SavedMarks`], which the daemon keeps beside the image), [`MutationTracker::restore`]
//! puts them back with the time that passed meanwhile added, so a guest known to scribble is
//! bounced from its first write after an upgrade or a crash.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use serde::{Deserialize, Serialize};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const PAGE_SHIFT: u64 = 12;
/// Guest physical address space covered by one lazily allocated block of page marks.
const BLOCK_SHIFT: u64 = 30;
const PAGES_PER_BLOCK: usize = 1 << (BLOCK_SHIFT - PAGE_SHIFT);
/// Blocks are found through a two-level table covering guest addresses below 2^48: VM
/// guest-physical addresses, and also the process virtual addresses that libblkio-style
/// frontends use as "guest" addresses (0x7f…). Above that nothing is marked (those writes
/// simply stay on the detect-and-repair path).
const TOP_SHIFT: u64 = 39;
const TOP_ENTRIES: usize = 1 << (48 - TOP_SHIFT);
const BLOCKS_PER_TOP: usize = 1 << (TOP_SHIFT - BLOCK_SHIFT);

type Marks = Box<[AtomicU8]>;
type Blocks = Box<[OnceLock<Marks>]>;
const REGION_SHIFT: u64 = 20;
/// Timestamp unit.
const TICK: Duration = Duration::from_secs(2);

pub struct MutationTracker {
    start: Instant,
    /// Marks stay "hot" for this many ticks.
    decay_ticks: u8,
    pages: Box<[OnceLock<Blocks>]>,
    regions: Box<[AtomicU8]>,
    /// Set by the first mark: until then every query answers "no" without reading a clock,
    /// so guests that never mutate pay nothing for the tracking.
    any_marks: AtomicBool,
    /// A mark was set since the last [`MutationTracker::take_changed`].
    changed: AtomicBool,
}

/// A tracker's hot marks with their age, to carry across a restart.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SavedMarks {
    /// When they were taken, in seconds since the Unix epoch.
    pub taken_unix: u64,
    /// Guest page addresses (4 KiB-aligned), each with how many seconds ago it was marked.
    pub pages: Vec<(u64, u64)>,
    /// Disk byte offsets of 1 MiB regions, each with how many seconds ago it was marked.
    pub regions: Vec<(u64, u64)>,
}

impl MutationTracker {
    /// Track a disk of `disk_bytes`; marks decay after `decay` (at most about 8 minutes).
    pub fn new(disk_bytes: u64, decay: Duration) -> MutationTracker {
        let regions = disk_bytes.div_ceil(1 << REGION_SHIFT) as usize;
        MutationTracker {
            start: Instant::now(),
            decay_ticks: (decay.as_secs() / TICK.as_secs()).clamp(1, 250) as u8,
            pages: (0..TOP_ENTRIES).map(|_| OnceLock::new()).collect(),
            regions: (0..regions).map(|_| AtomicU8::new(0)).collect(),
            any_marks: AtomicBool::new(false),
            changed: AtomicBool::new(false),
        }
    }

    /// Whether anything was marked since the last call (for saving only when needed).
    pub fn take_changed(&self) -> bool {
        self.changed.swap(false, Ordering::Relaxed)
    }

    /// Ticks since `stamp`, if it is still hot at `now`.
    fn age_if_hot(&self, stamp: u8, now: u8) -> Option<u64> {
        self.hot(stamp, now)
            .then(|| u64::from((u16::from(now) + 255 - u16::from(stamp)) % 255))
    }

    /// The stamp that makes a mark `age` ticks old at `now`.
    fn stamp_aged(now: u8, age: u64) -> u8 {
        ((u64::from(now) - 1 + 255 - age % 255) % 255) as u8 + 1
    }

    /// Every hot mark with its age, taken at `now_unix` (seconds since the epoch).
    pub fn save(&self, now_unix: u64) -> SavedMarks {
        let now = self.now();
        let secs = |age: u64| age * TICK.as_secs();
        let mut saved = SavedMarks {
            taken_unix: now_unix,
            ..SavedMarks::default()
        };
        if !self.any_marks.load(Ordering::Relaxed) {
            return saved;
        }
        for (t, top) in self.pages.iter().enumerate() {
            let Some(blocks) = top.get() else { continue };
            for (b, block) in blocks.iter().enumerate() {
                let Some(marks) = block.get() else { continue };
                let base = ((t * BLOCKS_PER_TOP + b) as u64) << BLOCK_SHIFT;
                for (i, m) in marks.iter().enumerate() {
                    if let Some(age) = self.age_if_hot(m.load(Ordering::Relaxed), now) {
                        saved
                            .pages
                            .push((base | ((i as u64) << PAGE_SHIFT), secs(age)));
                    }
                }
            }
        }
        for (r, m) in self.regions.iter().enumerate() {
            if let Some(age) = self.age_if_hot(m.load(Ordering::Relaxed), now) {
                saved.regions.push(((r as u64) << REGION_SHIFT, secs(age)));
            }
        }
        saved
    }

    /// Put back the marks of `saved` that are still hot at `now_unix`, aged by the time that
    /// passed since they were taken. Returns (pages, regions) restored.
    pub fn restore(&self, saved: &SavedMarks, now_unix: u64) -> (usize, usize) {
        let now = self.now();
        let since = now_unix.saturating_sub(saved.taken_unix);
        let decay_secs = u64::from(self.decay_ticks) * TICK.as_secs();
        let aged = |age_secs: u64| {
            let age = age_secs.saturating_add(since);
            (age < decay_secs).then(|| Self::stamp_aged(now, age / TICK.as_secs()))
        };
        let mut restored = (0, 0);
        for &(gpa, age) in &saved.pages {
            let Some(stamp) = aged(age) else { continue };
            if let Some((block, index)) = self.page_slot(gpa, true) {
                let marks =
                    block.get_or_init(|| (0..PAGES_PER_BLOCK).map(|_| AtomicU8::new(0)).collect());
                marks[index].store(stamp, Ordering::Relaxed);
                restored.0 += 1;
            }
        }
        for &(offset, age) in &saved.regions {
            let Some(stamp) = aged(age) else { continue };
            if let Some(r) = self.regions.get((offset >> REGION_SHIFT) as usize) {
                r.store(stamp, Ordering::Relaxed);
                restored.1 += 1;
            }
        }
        if restored != (0, 0) {
            self.any_marks.store(true, Ordering::Relaxed);
        }
        restored
    }

    /// Current timestamp, never 0. `Instant` reads the precise clock; one read per write
    /// (see `write_expects_mutation`) is all the hot path does.
    fn now(&self) -> u8 {
        ((self.start.elapsed().as_secs() / TICK.as_secs()) % 255) as u8 + 1
    }

    /// Whether a write of guest memory `pages` (address, length) to the disk range
    /// [offset, offset + len) touches anything marked recently: one clock read, none at all
    /// while nothing was ever marked.
    pub fn write_expects_mutation(
        &self,
        pages: impl Iterator<Item = (u64, u64)>,
        offset: u64,
        len: u64,
    ) -> bool {
        if !self.any_marks.load(Ordering::Relaxed) {
            return false;
        }
        let now = self.now();
        self.region_hot_at(offset, len, now)
            || pages
                .into_iter()
                .any(|(gpa, n)| self.pages_hot_at(gpa, n, now))
    }

    fn hot(&self, stamp: u8, now: u8) -> bool {
        if stamp == 0 {
            return false;
        }
        // Ages wrap every 255 ticks; a very old mark may look fresh again, which only costs
        // one decay period of bouncing.
        let age = (u16::from(now) + 255 - u16::from(stamp)) % 255;
        age < u16::from(self.decay_ticks)
    }

    /// The block of marks holding `gpa` (None above the tracked space, or when `create` is
    /// false and nothing was ever marked in that part of it), and the page's index in it.
    fn page_slot(&self, gpa: u64, create: bool) -> Option<(&OnceLock<Marks>, usize)> {
        let block = (gpa >> BLOCK_SHIFT) as usize;
        let index = ((gpa >> PAGE_SHIFT) as usize) & (PAGES_PER_BLOCK - 1);
        let top = self.pages.get(block / BLOCKS_PER_TOP)?;
        let blocks = if create {
            top.get_or_init(|| (0..BLOCKS_PER_TOP).map(|_| OnceLock::new()).collect())
        } else {
            top.get()?
        };
        Some((&blocks[block % BLOCKS_PER_TOP], index))
    }

    /// The guest page holding `gpa` was changed during a write.
    pub fn mark_page(&self, gpa: u64) {
        if let Some((block, index)) = self.page_slot(gpa, true) {
            let marks =
                block.get_or_init(|| (0..PAGES_PER_BLOCK).map(|_| AtomicU8::new(0)).collect());
            marks[index].store(self.now(), Ordering::Relaxed);
            self.any_marks.store(true, Ordering::Relaxed);
            self.changed.store(true, Ordering::Relaxed);
        }
    }

    /// A write to `byte_offset` on the disk was changed in flight.
    pub fn mark_region(&self, byte_offset: u64) {
        if let Some(r) = self.regions.get((byte_offset >> REGION_SHIFT) as usize) {
            r.store(self.now(), Ordering::Relaxed);
            self.any_marks.store(true, Ordering::Relaxed);
            self.changed.store(true, Ordering::Relaxed);
        }
    }

    /// Whether any page of guest memory [gpa, gpa + len) was marked recently.
    #[cfg(test)]
    pub fn pages_hot(&self, gpa: u64, len: u64) -> bool {
        self.pages_hot_at(gpa, len, self.now())
    }

    fn pages_hot_at(&self, gpa: u64, len: u64, now: u8) -> bool {
        if len == 0 {
            return false;
        }
        let mut page = gpa >> PAGE_SHIFT;
        let last = gpa.saturating_add(len - 1) >> PAGE_SHIFT;
        while page <= last {
            if (page << PAGE_SHIFT) >> 48 != 0 {
                return false;
            }
            match self
                .page_slot(page << PAGE_SHIFT, false)
                .and_then(|(b, _)| b.get())
            {
                // Nothing ever marked in this GiB: skip to the next one.
                None => {
                    page = ((page >> (BLOCK_SHIFT - PAGE_SHIFT)) + 1) << (BLOCK_SHIFT - PAGE_SHIFT)
                }
                Some(marks) => {
                    let index = (page as usize) & (PAGES_PER_BLOCK - 1);
                    if self.hot(marks[index].load(Ordering::Relaxed), now) {
                        return true;
                    }
                    page += 1;
                }
            }
        }
        false
    }

    /// Whether the disk range [offset, offset + len) lies in a recently marked region.
    #[cfg(test)]
    pub fn region_hot(&self, offset: u64, len: u64) -> bool {
        self.region_hot_at(offset, len, self.now())
    }

    fn region_hot_at(&self, offset: u64, len: u64, now: u8) -> bool {
        let first = offset >> REGION_SHIFT;
        let last = offset.saturating_add(len.max(1) - 1) >> REGION_SHIFT;
        (first..=last).any(|r| {
            self.regions
                .get(r as usize)
                .is_some_and(|s| self.hot(s.load(Ordering::Relaxed), now))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_per_page_and_per_region_and_decay() {
        let t = MutationTracker::new(64 << 20, Duration::from_secs(10));
        assert!(!t.pages_hot(0x1234_5000, 4096));
        assert!(!t.write_expects_mutation([(0x1234_5000, 4096)].into_iter(), 0, 4096));
        t.mark_page(0x1234_5678);
        assert!(t.write_expects_mutation([(0x1234_5000, 4096)].into_iter(), 0, 4096));
        assert!(!t.write_expects_mutation([(0x1234_6000, 4096)].into_iter(), 0, 4096));
        assert!(t.pages_hot(0x1234_5000, 4096));
        assert!(
            t.pages_hot(0x1234_0000, 0x10000),
            "a range covering the page"
        );
        assert!(
            !t.pages_hot(0x1234_6000, 4096),
            "the next page is not marked"
        );
        assert!(
            !t.pages_hot(0x5_0000_0000, 1 << 20),
            "another GiB, never allocated"
        );
        // Where libblkio-style frontends put their "guest" memory: process addresses.
        t.mark_page(0x7f12_3456_7000);
        assert!(t.pages_hot(0x7f12_3456_7000, 4096));
        assert!(!t.pages_hot(0x7f12_3456_8000, 4096));
        t.mark_region(5 << 20);
        assert!(t.region_hot((5 << 20) + 4096, 4096));
        assert!(!t.region_hot(6 << 20, 4096));
        // Decay: a mark older than the period is cold.
        let stamp = t.now();
        assert!(t.hot(stamp, stamp));
        assert!(t.hot(stamp, stamp.wrapping_add(4)));
        assert!(!t.hot(stamp, stamp.wrapping_add(5)));
        assert!(!t.hot(0, stamp), "0 means never marked");
    }

    #[test]
    fn hot_marks_survive_a_save_and_restore_with_their_age() {
        let t = MutationTracker::new(64 << 20, Duration::from_secs(30));
        assert_eq!(t.save(1000).pages, vec![], "nothing marked");
        assert!(!t.take_changed());
        t.mark_page(0x7f00_0000_3000);
        t.mark_page(1 << 40);
        t.mark_region(7 << 20);
        assert!(t.take_changed() && !t.take_changed());
        let saved = t.save(1000);
        assert_eq!(saved.pages, vec![(1 << 40, 0), (0x7f00_0000_3000, 0)]);
        assert_eq!(saved.regions, vec![(7 << 20, 0)]);
        let json = serde_json::to_string(&saved).unwrap();
        let saved: SavedMarks = serde_json::from_str(&json).unwrap();

        // A restart 10 s later: everything is still hot, 10 s older.
        let after = MutationTracker::new(64 << 20, Duration::from_secs(30));
        assert_eq!(after.restore(&saved, 1010), (2, 1));
        assert!(after.pages_hot(0x7f00_0000_3000, 4096) && after.pages_hot(1 << 40, 4096));
        assert!(after.region_hot(7 << 20, 4096));
        assert!(!after.pages_hot(0x7f00_0000_4000, 4096));
        assert!(!after.take_changed(), "restoring is not news worth saving");
        let again = after.save(1010);
        assert!(again.regions.iter().all(|&(_, age)| age == 10), "{again:?}");
        // A restart after the decay period: nothing comes back.
        let late = MutationTracker::new(64 << 20, Duration::from_secs(30));
        assert_eq!(late.restore(&saved, 1031), (0, 0));
        assert!(!late.write_expects_mutation([(1 << 40, 4096)].into_iter(), 7 << 20, 4096));
    }

    #[test]
    fn aged_stamps_read_back_as_their_age() {
        let t = MutationTracker::new(1 << 20, Duration::from_secs(500));
        for now in [1u8, 2, 100, 255] {
            for age in [0u64, 1, 7, 200] {
                let stamp = MutationTracker::stamp_aged(now, age);
                assert_ne!(stamp, 0);
                assert_eq!(t.age_if_hot(stamp, now), Some(age), "now {now} age {age}");
            }
        }
    }

    #[test]
    fn addresses_beyond_the_tracked_space_are_ignored() {
        let t = MutationTracker::new(1 << 20, Duration::from_secs(30));
        t.mark_page(u64::MAX - 4095);
        assert!(!t.pages_hot(u64::MAX - 4095, 4096));
        t.mark_region(1 << 40);
        assert!(!t.region_hot(1 << 40, 4096));
    }
}
