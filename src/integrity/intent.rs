//! Write-intent log: one bit per region of the disk, durable before any data or tuple in the
//! region changes, cleared only once the region's writes are durable and it has been idle.
//!
//! Data and tuples live in two files and cannot be written atomically together. After a
//! crash, only regions whose bit is set can hold an interval whose data and tuple disagree;
//! recovery re-derives those tuples from the data (the guest never saw those writes
//! complete-and-flushed, so any version of the data is a legal outcome). The argument is in
//! docs/CRASH-CONSISTENCY.md.
//!
//! Per region, memory holds `state` (bit 31: "marked dirty on disk"; low bits: writes in
//! flight) and `stamp` (the flush epoch when the last write started). A bit is cleared only
//! by a flush that (1) saw the region idle when it started, (2) made data and tuples durable,
//! and (3) finds no write has started there since — checked with a compare-and-swap that a
//! concurrent writer's increment defeats.

use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const DIRTY: u32 = 1 << 31;
/// A region must stay idle this long before a flush may clear its bit, so a hot region is not
/// re-marked (one synchronous metadata write) after every flush.
const MIN_EPOCH_AGE: Duration = Duration::from_secs(1);

struct Region {
    state: AtomicU32,
    stamp: AtomicU32,
}

pub struct IntentLog {
    regions: Vec<Region>,
    region_shift: u32,
    interval_shift: u32,
    epoch: AtomicU32,
    /// Serialises marking and clearing on-disk bits (rare: first write to an idle region).
    bits: Mutex<EpochClock>,
}

struct EpochClock {
    last_bump: Instant,
}

/// The regions a flush may clean, chosen when it started.
#[derive(Debug, Default)]
pub struct FlushTicket {
    epoch: u32,
    candidates: Vec<u64>,
}

impl IntentLog {
    pub fn new(regions: u64, region_shift: u32, interval_shift: u32) -> IntentLog {
        IntentLog {
            regions: (0..regions)
                .map(|_| Region {
                    state: AtomicU32::new(0),
                    stamp: AtomicU32::new(0),
                })
                .collect(),
            region_shift,
            interval_shift,
            // Start at 2 so "stamp + 2 <= epoch" has room for never-written regions (stamp 0).
            epoch: AtomicU32::new(2),
            bits: Mutex::new(EpochClock {
                last_bump: Instant::now(),
            }),
        }
    }

    /// Take the on-disk bits as the starting state.
    pub fn load(&self, bitmap: &[AtomicU64]) {
        for region in self.dirty_regions(bitmap) {
            self.regions[region as usize]
                .state
                .fetch_or(DIRTY, Ordering::SeqCst);
        }
    }

    fn region_range(&self, lba: u64, count: u64) -> std::ops::RangeInclusive<u64> {
        let first = (lba << self.interval_shift) >> self.region_shift;
        let last = ((lba + count.max(1) - 1) << self.interval_shift) >> self.region_shift;
        first..=last
    }

    /// Announce a write to `count` intervals from `lba`. Returns once every region it touches
    /// is marked dirty on disk; `persist` makes the bitmap word of a region durable.
    pub fn begin(
        &self,
        lba: u64,
        count: u64,
        bitmap: &[AtomicU64],
        persist: impl Fn(u64) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut result = Ok(());
        for r in self.region_range(lba, count) {
            let region = &self.regions[r as usize];
            // Count first, then stamp: a flush that saw this region idle will then see the
            // new stamp and leave the bit alone (both SeqCst).
            let before = region.state.fetch_add(1, Ordering::SeqCst);
            region
                .stamp
                .store(self.epoch.load(Ordering::SeqCst), Ordering::SeqCst);
            if before & DIRTY != 0 {
                continue;
            }
            let _guard = self.bits.lock().unwrap_or_else(|p| p.into_inner());
            if region.state.load(Ordering::SeqCst) & DIRTY != 0 {
                continue;
            }
            bitmap[(r / 64) as usize].fetch_or(1 << (r % 64), Ordering::SeqCst);
            match persist(r) {
                // Durable: later writes to the region need not persist it again.
                Ok(()) => {
                    region.state.fetch_or(DIRTY, Ordering::SeqCst);
                }
                // Not durable: leave the region unmarked in memory so the next write tries
                // again (the caller fails this one). Marking it anyway would let every later
                // write skip the persist, and a crash skip the region's recovery.
                Err(e) => result = Err(e),
            }
        }
        result
    }

    /// The write announced by [`IntentLog::begin`] is over (data and tuples stored).
    pub fn end(&self, lba: u64, count: u64) {
        for r in self.region_range(lba, count) {
            self.regions[r as usize]
                .state
                .fetch_sub(1, Ordering::SeqCst);
        }
    }

    pub fn dirty_regions(&self, bitmap: &[AtomicU64]) -> Vec<u64> {
        let mut out = Vec::new();
        for (i, word) in bitmap.iter().enumerate() {
            let mut w = word.load(Ordering::SeqCst);
            while w != 0 {
                let bit = u64::from(w.trailing_zeros());
                let region = i as u64 * 64 + bit;
                if region < self.regions.len() as u64 {
                    out.push(region);
                }
                w &= w - 1;
            }
        }
        out
    }

    /// Called before a flush syncs anything. Advances the epoch (at most once per
    /// [`MIN_EPOCH_AGE`]) and picks the idle dirty regions last written two epochs ago.
    pub fn ticket(&self, bitmap: &[AtomicU64]) -> FlushTicket {
        let mut clock = self.bits.lock().unwrap_or_else(|p| p.into_inner());
        if clock.last_bump.elapsed() < MIN_EPOCH_AGE {
            return FlushTicket::default();
        }
        clock.last_bump = Instant::now();
        let epoch = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        drop(clock);
        let candidates = self
            .dirty_regions(bitmap)
            .into_iter()
            .filter(|&r| {
                let region = &self.regions[r as usize];
                region.state.load(Ordering::SeqCst) == DIRTY
                    && region.stamp.load(Ordering::SeqCst) + 2 <= epoch
            })
            .collect();
        FlushTicket { epoch, candidates }
    }

    /// After the flush made data and tuples durable: clear the ticket's regions that are
    /// still idle and unwritten since the ticket was taken.
    pub fn clear(&self, ticket: FlushTicket, bitmap: &[AtomicU64]) {
        if ticket.candidates.is_empty() {
            return;
        }
        let _guard = self.bits.lock().unwrap_or_else(|p| p.into_inner());
        for r in ticket.candidates {
            let region = &self.regions[r as usize];
            if region.stamp.load(Ordering::SeqCst) + 2 > ticket.epoch {
                continue;
            }
            if region
                .state
                .compare_exchange(DIRTY, 0, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                // No durability needed: a bit that stays set on disk only costs a check.
                bitmap[(r / 64) as usize].fetch_and(!(1 << (r % 64)), Ordering::SeqCst);
            }
        }
    }

    /// Clear every bit: only when no write is in flight and everything is durable.
    pub fn clear_all(&self, bitmap: &[AtomicU64]) {
        let _guard = self.bits.lock().unwrap_or_else(|p| p.into_inner());
        for (r, region) in self.regions.iter().enumerate() {
            // A write still counted here is one held for recovery (its range could not be
            // read back after it failed): its bit must survive a clean shutdown.
            if region.state.load(Ordering::SeqCst) & !DIRTY != 0 {
                continue;
            }
            region.state.fetch_and(!DIRTY, Ordering::SeqCst);
            bitmap[r / 64].fetch_and(!(1 << (r % 64)), Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    fn bitmap(regions: u64) -> Vec<AtomicU64> {
        (0..regions.div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect()
    }

    #[test]
    fn first_write_to_a_region_persists_its_bit_once() {
        // 4 KiB intervals, 1 MiB regions: 256 intervals per region.
        let log = IntentLog::new(8, 20, 12);
        let bits = bitmap(8);
        let persisted = RefCell::new(Vec::new());
        let persist = |r| {
            persisted.borrow_mut().push(r);
            Ok(())
        };
        log.begin(250, 10, &bits, persist).unwrap(); // spans regions 0 and 1
        log.begin(0, 1, &bits, persist).unwrap();
        assert_eq!(*persisted.borrow(), vec![0, 1]);
        assert_eq!(log.dirty_regions(&bits), vec![0, 1]);
    }

    #[test]
    fn a_flush_clears_only_idle_regions_untouched_since_it_started() {
        let log = IntentLog::new(4, 20, 12);
        let bits = bitmap(4);
        let ok = |_| Ok(());
        log.begin(0, 1, &bits, ok).unwrap(); // region 0, stays in flight
        log.begin(256, 1, &bits, ok).unwrap(); // region 1, completes
        log.end(256, 1);
        log.begin(512, 1, &bits, ok).unwrap(); // region 2, completes
        log.end(512, 1);
        // Too young: written in the current epoch.
        log.bits.lock().unwrap().last_bump = Instant::now() - MIN_EPOCH_AGE;
        let t = log.ticket(&bits);
        assert!(t.candidates.is_empty());
        log.bits.lock().unwrap().last_bump = Instant::now() - MIN_EPOCH_AGE;
        let t = log.ticket(&bits);
        assert_eq!(t.candidates, vec![1, 2]);
        // Region 2 is written again while the flush runs: it must stay dirty.
        log.begin(512, 1, &bits, ok).unwrap();
        log.end(512, 1);
        log.clear(t, &bits);
        assert_eq!(log.dirty_regions(&bits), vec![0, 2]);
        // A region cleared in memory is re-marked (and persisted) by its next write.
        let persisted = RefCell::new(Vec::new());
        log.begin(256, 1, &bits, |r| {
            persisted.borrow_mut().push(r);
            Ok(())
        })
        .unwrap();
        assert_eq!(*persisted.borrow(), vec![1]);
    }

    #[test]
    fn a_mark_that_did_not_become_durable_is_retried_by_the_next_write() {
        let log = IntentLog::new(4, 20, 12);
        let bits = bitmap(4);
        let attempts = RefCell::new(0);
        let failing_once = |_| {
            *attempts.borrow_mut() += 1;
            if *attempts.borrow() == 1 {
                Err(io::Error::from_raw_os_error(libc::EIO))
            } else {
                Ok(())
            }
        };
        assert!(log.begin(0, 1, &bits, failing_once).is_err());
        log.end(0, 1); // the caller fails the request and ends its intent
        log.begin(0, 1, &bits, failing_once).unwrap();
        assert_eq!(
            *attempts.borrow(),
            2,
            "the second write did not persist the mark"
        );
        log.end(0, 1);
        log.begin(0, 1, &bits, failing_once).unwrap();
        assert_eq!(*attempts.borrow(), 2, "a durable mark is persisted once");
    }

    #[test]
    fn a_clean_shutdown_keeps_the_bit_of_a_write_held_for_recovery() {
        let log = IntentLog::new(4, 20, 12);
        let bits = bitmap(4);
        let ok = |_| Ok(());
        log.begin(0, 1, &bits, ok).unwrap(); // region 0: held (never ended)
        log.begin(256, 1, &bits, ok).unwrap(); // region 1: done
        log.end(256, 1);
        log.clear_all(&bits);
        assert_eq!(log.dirty_regions(&bits), vec![0]);
    }

    #[test]
    fn a_flush_soon_after_the_last_does_not_clear_anything() {
        let log = IntentLog::new(2, 20, 12);
        let bits = bitmap(2);
        log.begin(0, 1, &bits, |_| Ok(())).unwrap();
        log.end(0, 1);
        let t = log.ticket(&bits);
        log.clear(t, &bits);
        assert_eq!(log.dirty_regions(&bits), vec![0]);
    }
}
