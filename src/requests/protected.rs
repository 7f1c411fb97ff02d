//! The PI side of request execution: gathering guest data into a bounce buffer while
//! computing guards, verifying read data (in guest memory or a buffer) interval by interval,
//! recording write intents before I/O and storing (or re-deriving) tuples after it, and the
//! synchronous slow paths (locked re-read, re-deriving tuples after a failed write).
//!
//! The executor decides when; this module does the per-interval work against a [`PiStore`].

use std::io;

use vm_memory::GuestMemoryMmap;

use super::guest_mem::{Interval, Intervals};
use super::parse::GuestRange;
use crate::integrity::guard::{
    copy_crc16_t10dif, copy_crc16_t10dif_x2, copy_crc64_nvme, copy_crc64_nvme_x2,
    crc16_t10dif_and_crc64_nvme, crc64_nvme,
};
use crate::integrity::intent::FlushTicket;
use crate::integrity::{PiError, PiFormat, PiStore};
use crate::storage::{AlignedBuf, Image};

/// Copy one interval into `dst`, returning the guard of the copied bytes (one fused pass).
pub(crate) fn copy_guard(format: PiFormat, dst: &mut [u8], src: &[u8]) -> u64 {
    match format {
        PiFormat::Type1 | PiFormat::Type3 => u64::from(copy_crc16_t10dif(dst, src)),
        PiFormat::Nvme64 => copy_crc64_nvme(dst, src),
    }
}

/// [`copy_guard`] of two intervals, from one interleaved pass where the CPU has one.
fn copy_guard_x2(format: PiFormat, dst: [&mut [u8]; 2], src: [&[u8]; 2]) -> [u64; 2] {
    match format {
        PiFormat::Type1 | PiFormat::Type3 => copy_crc16_t10dif_x2(dst, src).map(u64::from),
        PiFormat::Nvme64 => copy_crc64_nvme_x2(dst, src),
    }
}

/// The 64-bit digest that tells whether an interval changed between two looks at it: the
/// CRC-64/NVME, so a change slips through with probability 2^-64 (for the 16-bit T10 formats
/// too, whose own guard would miss one change in 65,536).
pub(crate) fn digest(data: &[u8]) -> u64 {
    crc64_nvme(data)
}

/// An interval's guard and its [`digest`], from one pass over the bytes: for nvme64 the guard
/// is the digest; for the T10 formats one kernel folds both CRCs from the same loads.
pub(crate) fn guard_and_digest(format: PiFormat, data: &[u8]) -> (u64, u64) {
    match format {
        PiFormat::Nvme64 => {
            let d = crc64_nvme(data);
            (d, d)
        }
        PiFormat::Type1 | PiFormat::Type3 => {
            let (guard, digest) = crc16_t10dif_and_crc64_nvme(data);
            (u64::from(guard), digest)
        }
    }
}

/// Gather the guest's write data into `dst` (the bounce buffer's chunks, in order, together
/// exactly the request's length) and return the guard of every interval, computed over the
/// copy — the bytes that will reach the disk — in the same pass as the copy when an interval
/// is contiguous in guest memory.
pub fn gather_with_guards(
    mem: &GuestMemoryMmap,
    ranges: &[GuestRange],
    dst: &mut [&mut [u8]],
    format: PiFormat,
    interval: usize,
    guards: &mut Vec<u64>,
) {
    let mut walker = Intervals::new(mem, ranges, interval);
    for chunk in dst.iter_mut() {
        let mut outs = chunk.chunks_exact_mut(interval);
        while let Some(out) = outs.next() {
            // Two intervals in place at once: one interleaved kernel overlaps each one's
            // fixed cost with the other's work (+8-15 % at 512 B, docs/ROOFLINE.md).
            if outs.len() > 0 {
                if let Some(src) = walker.next_two_in_place() {
                    let second = outs.next().expect("outs.len() > 0");
                    guards.extend(copy_guard_x2(format, [out, second], src));
                    continue;
                }
            }
            match walker.next() {
                Some(Interval::InPlace(src)) => guards.push(copy_guard(format, out, src)),
                Some(Interval::Assembled(src)) => {
                    out.copy_from_slice(src);
                    guards.push(format.guard(out));
                }
                None => return,
            }
        }
    }
}

/// For a zero-copy write, per interval of the request's data as it is in guest memory now:
/// its guard (into `guards`, when asked) and its [`digest`] (into `digests`), both from one
/// pass over guest memory. Called before submission (guards and digests) and after
/// completion (digests only).
pub fn guest_digests(
    mem: &GuestMemoryMmap,
    ranges: &[GuestRange],
    format: PiFormat,
    interval: usize,
    mut guards: Option<&mut Vec<u64>>,
    digests: &mut Vec<u64>,
) {
    let mut walker = Intervals::new(mem, ranges, interval);
    digests.reserve(walker.count());
    while let Some(data) = walker.next() {
        let bytes = data.bytes();
        match guards.as_deref_mut() {
            Some(guards) => {
                let (guard, d) = guard_and_digest(format, bytes);
                guards.push(guard);
                digests.push(d);
            }
            None => digests.push(digest(bytes)),
        }
    }
}

/// Copy the intervals `which` (indices into the request, strictly ascending, as mutation
/// detection lists them) out of guest memory into `dst` (one interval each, in order),
/// returning their guards computed over the copies.
///
/// One walk over the request, matched against `which` with a cursor and stopped after the
/// last chosen interval: linear in the request's size (looking each index up in `which`
/// made a large request with many changed intervals quadratic).
pub fn snapshot_intervals(
    mem: &GuestMemoryMmap,
    ranges: &[GuestRange],
    which: &[usize],
    dst: &mut [&mut [u8]],
    format: PiFormat,
    interval: usize,
) -> Vec<u64> {
    debug_assert!(
        which.windows(2).all(|w| w[0] < w[1]),
        "snapshot_intervals: indices must be strictly ascending"
    );
    let mut walker = Intervals::new(mem, ranges, interval);
    let mut out = Vec::with_capacity(which.len());
    let mut wanted = which.iter().copied().peekable();
    let mut slots = dst.iter_mut().flat_map(|c| c.chunks_exact_mut(interval));
    let mut index = 0usize;
    while let Some(&want) = wanted.peek() {
        let Some(data) = walker.next() else { break };
        let this = index;
        index += 1;
        if this != want {
            continue;
        }
        wanted.next();
        let Some(slot) = slots.next() else { break };
        out.push(match data {
            Interval::InPlace(src) => copy_guard(format, slot, src),
            Interval::Assembled(src) => {
                slot.copy_from_slice(src);
                format.guard(slot)
            }
        });
    }
    out
}

/// Verify data that a read placed straight into guest memory. Returns the first failing
/// interval's LBA and error, if any.
pub fn verify_guest(
    store: &PiStore,
    mem: &GuestMemoryMmap,
    ranges: &[GuestRange],
    first_lba: u64,
) -> Result<(), (u64, PiError)> {
    let interval = store.interval() as usize;
    let mut walker = Intervals::new(mem, ranges, interval);
    let mut lba = first_lba;
    while let Some(data) = walker.next() {
        // A guest changing its own read buffer meanwhile can only make this check fail,
        // which sends the request to the locked re-read.
        store.check(lba, data.bytes()).map_err(|e| (lba, e))?;
        lba += 1;
    }
    Ok(())
}

/// Verify every interval of `data` (read from `first_lba`); all failures, in order.
pub fn verify_buffer(store: &PiStore, data: &[u8], first_lba: u64) -> Vec<(u64, PiError)> {
    let interval = store.interval() as usize;
    data.chunks_exact(interval)
        .enumerate()
        .filter_map(|(i, d)| {
            let lba = first_lba + i as u64;
            store.check(lba, d).err().map(|e| (lba, e))
        })
        .collect()
}

/// Exactly `count` intervals read synchronously, in an aligned buffer (which may be larger:
/// allocations round up to a page, and nothing past `len` belongs to the request).
pub struct IntervalData {
    buffer: AlignedBuf,
    len: usize,
}

impl IntervalData {
    pub fn as_slice(&self) -> &[u8] {
        &self.buffer.as_slice()[..self.len]
    }
}

/// Read `count` intervals from `lba` synchronously.
pub fn read_intervals(
    image: &Image,
    store: &PiStore,
    lba: u64,
    count: u64,
) -> io::Result<IntervalData> {
    let len = (count * u64::from(store.interval())) as usize;
    let mut buffer = AlignedBuf::zeroed(len);
    let offset = lba * u64::from(store.interval());
    crate::integrity::reader::read_upto(image, &mut buffer.as_mut_slice()[..len], offset)?;
    Ok(IntervalData { buffer, len })
}

/// After a write or zeroing failed part-way the disk may hold any mix of old and new data:
/// re-derive the tuples of the range from what it holds now, so a failed request cannot
/// leave a false guard error behind. If the range cannot be read back either, its write
/// intent is held (the write does not end) and the range remembered, so the first read that
/// finds it readable re-derives it, and a crash before then recovers it.
/// Returns whether the write may end (false: held).
pub fn rederive_from_disk(image: &Image, store: &PiStore, lba: u64, count: u64) -> bool {
    match read_intervals(image, store, lba, count) {
        Ok(buffer) => {
            let interval = store.interval() as usize;
            for (i, data) in buffer.as_slice().chunks_exact(interval).enumerate() {
                store.store_generated(lba + i as u64, data);
            }
            tracing::warn!(
                lba,
                count,
                "a write failed; re-derived the range's tuples from the data on disk"
            );
            true
        }
        Err(e) => {
            tracing::error!(
                lba,
                count,
                error = %e,
                "a write failed and the range cannot be read back; its tuples are unchanged and the region stays marked for recovery"
            );
            store.hold_for_recovery(lba, count);
            false
        }
    }
}

/// A PI range (in intervals) a discard or write-zeroes covers, and whether the storage
/// operation left it reading as zeros.
#[derive(Debug, Clone, Copy)]
pub struct RangeOutcome {
    pub lba: u64,
    pub count: u64,
    pub zeroed: bool,
}

/// Record the write intents of a request before any I/O, for every `(lba, count)`; on
/// failure end those already begun and return the error (the request then fails untouched).
pub fn begin_writes(store: &PiStore, ranges: &[(u64, u64)]) -> io::Result<()> {
    let mut result = Ok(());
    for &(lba, count) in ranges {
        result = result.and(store.meta.begin_write(lba, count));
    }
    if result.is_err() {
        for &(lba, count) in ranges {
            store.meta.end_write(lba, count);
        }
    }
    result
}

/// A write of `guards.len()` intervals from `lba` finished. Succeeded: store the tuple of
/// each guard (the guards describe exactly the bytes that reached the disk), made durable
/// now if `durable` (write-through); returns how many were stored. Failed: the disk may
/// hold any mix, so re-derive the tuples from what it holds. Either way the write intent
/// ends.
pub fn finish_write(
    store: &PiStore,
    image: &Image,
    lba: u64,
    guards: &[u64],
    succeeded: bool,
    durable: bool,
) -> (u64, io::Result<()>) {
    let count = guards.len() as u64;
    let mut result = Ok(());
    let mut stored = 0;
    if succeeded {
        for (i, &guard) in guards.iter().enumerate() {
            let l = lba + i as u64;
            store.meta.set_tuple(l, &store.tuple_for(l, guard));
        }
        stored = count;
        // Stores into a page the file lost (see PiMetadata::intact) did not reach it.
        result = store.meta.intact();
        if durable && result.is_ok() {
            result = store.meta.sync_tuples(lba, count);
        }
        store.meta.end_write(lba, count);
    } else if rederive_from_disk(image, store, lba, count) {
        store.meta.end_write(lba, count);
    }
    (stored, result)
}

/// A discard or write-zeroes finished. Ranges that now read as zeros become unwritten (made
/// durable if `durable`); the others are re-derived from the disk when their content is not
/// known (`uncertain`: a zeroing that did not complete, or a failed request), and left alone
/// otherwise (a discard the target ignored changes nothing). The write intents end.
pub fn finish_ranges(
    store: &PiStore,
    image: &Image,
    ranges: &[RangeOutcome],
    uncertain: bool,
    durable: bool,
) -> io::Result<()> {
    let mut result = Ok(());
    for r in ranges {
        if r.zeroed {
            store.meta.set_unwritten(r.lba, r.count);
            if durable {
                result = result.and(store.meta.sync_tuples(r.lba, r.count));
            }
        } else if uncertain && !rederive_from_disk(image, store, r.lba, r.count) {
            continue; // held for recovery: the intent stays
        }
        store.meta.end_write(r.lba, r.count);
    }
    result.and(store.meta.intact())
}

/// A flush's data sync succeeded: make the tuples durable, then drop the write intents of
/// regions that are durable and idle since `ticket` was taken. Journal records a failing
/// disk kept back are written again too; the flush does not fail for them (they describe
/// requests that already failed, and the log line of each is already out).
pub fn finish_flush(store: &PiStore, ticket: FlushTicket) -> io::Result<()> {
    store.meta.sync()?;
    store.meta.clear_intents(ticket);
    store.journal.retry_pending();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::integrity::metadata::{DataIdentity, Header};
    use crate::integrity::PiMetadata;
    use vm_memory::{Bytes, GuestAddress};

    const KIB: u64 = 1024;

    /// Two adjacent 64 KiB memory regions, so ranges can straddle a region boundary.
    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 64 * KIB as usize),
            (GuestAddress(64 * KIB), 64 * KIB as usize),
        ])
        .unwrap()
    }

    fn store(dir: &std::path::Path, format: PiFormat, interval: u32) -> (Image, PiStore) {
        let path = dir.join("disk.img");
        Image::create(&path, 1 << 20).unwrap();
        let image = Image::open(&path, false).unwrap();
        let data = DataIdentity::of(&path, image.size()).unwrap();
        let meta = crate::integrity::metadata::default_path(&path);
        PiMetadata::create(&meta, &Header::new(format, interval, data)).unwrap();
        let (store, _) = PiStore::open_beside(&image, None, true).unwrap();
        (image, store)
    }

    /// Guest ranges covering 16 KiB: a 2 KiB descriptor, then one that crosses the region
    /// boundary mid-interval, then the rest.
    fn ranges() -> Vec<GuestRange> {
        vec![
            GuestRange {
                addr: GuestAddress(58 * KIB),
                len: 2 * KIB as u32,
            },
            GuestRange {
                addr: GuestAddress(60 * KIB + 512),
                len: 10 * KIB as u32,
            },
            GuestRange {
                addr: GuestAddress(100 * KIB),
                len: 4 * KIB as u32,
            },
        ]
    }

    fn fill(mem: &GuestMemoryMmap, ranges: &[GuestRange]) -> Vec<u8> {
        let mut all = Vec::new();
        for (i, r) in ranges.iter().enumerate() {
            let bytes: Vec<u8> = (0..r.len).map(|j| (j as u8) ^ (i as u8 * 37)).collect();
            mem.write_slice(&bytes, r.addr).unwrap();
            all.extend(bytes);
        }
        all
    }

    #[test]
    fn gathering_across_descriptors_and_regions_gives_the_bytes_and_their_guards() {
        for format in [PiFormat::Type1, PiFormat::Nvme64] {
            for interval in [512usize, 4096] {
                let mem = memory();
                let expected = fill(&mem, &ranges());
                let mut buffer = vec![0u8; expected.len()];
                let mut guards = Vec::new();
                // Two destination chunks, as the bounce pool hands them out.
                let (a, b) = buffer.split_at_mut(8192);
                gather_with_guards(&mem, &ranges(), &mut [a, b], format, interval, &mut guards);
                assert_eq!(buffer, expected);
                let want: Vec<u64> = expected.chunks(interval).map(|c| format.guard(c)).collect();
                assert_eq!(guards, want, "{format} {interval}");
            }
        }
    }

    /// Pairs are taken where both intervals lie in place — within a piece or across a piece
    /// boundary — and never where one of them straddles pieces; nothing is skipped.
    #[test]
    fn two_intervals_in_place_are_paired_and_straddling_ones_are_not() {
        let mem = memory();
        let expected = fill(&mem, &ranges());
        // Pieces (KiB): 2, 3.5 (to the region boundary), 6.5, 4.
        let mut walker = Intervals::new(&mem, &ranges(), 1024);
        let mut seen = Vec::new();
        let mut pairs = 0;
        loop {
            if let Some([a, b]) = walker.next_two_in_place() {
                pairs += 1;
                seen.extend_from_slice(a);
                seen.extend_from_slice(b);
                continue;
            }
            match walker.next() {
                Some(i) => seen.extend_from_slice(i.bytes()),
                None => break,
            }
        }
        assert_eq!(seen, expected, "bytes lost, repeated or out of order");
        // 1 pair in the first piece; 1 in the second, whose third interval is alone (the
        // fourth straddles into the third piece); 3 in the rest of the third; 2 in the last.
        assert_eq!(pairs, 7, "in-place intervals not paired as they lie");
    }

    #[test]
    fn guards_and_digests_over_guest_memory_match_the_reference_crcs() {
        const CRC16: crc::Crc<u16> = crc::Crc::<u16>::new(&crc::CRC_16_T10_DIF);
        const CRC64: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_NVME);
        for format in [PiFormat::Type1, PiFormat::Type3, PiFormat::Nvme64] {
            for interval in [512usize, 4096] {
                let mem = memory();
                let data = fill(&mem, &ranges());
                let (mut guards, mut digests) = (Vec::new(), Vec::new());
                guest_digests(
                    &mem,
                    &ranges(),
                    format,
                    interval,
                    Some(&mut guards),
                    &mut digests,
                );
                let want_digests: Vec<u64> =
                    data.chunks(interval).map(|c| CRC64.checksum(c)).collect();
                let want_guards: Vec<u64> = data
                    .chunks(interval)
                    .map(|c| match format {
                        PiFormat::Type1 | PiFormat::Type3 => u64::from(CRC16.checksum(c)),
                        PiFormat::Nvme64 => CRC64.checksum(c),
                    })
                    .collect();
                assert_eq!(guards, want_guards, "{format} {interval}: guards");
                assert_eq!(digests, want_digests, "{format} {interval}: digests");
                for (chunk, (&g, &d)) in data.chunks(interval).zip(guards.iter().zip(&digests)) {
                    assert_eq!(guard_and_digest(format, chunk), (g, d));
                }
                // After completion: digests only, the same values.
                let mut again = Vec::new();
                guest_digests(&mem, &ranges(), format, interval, None, &mut again);
                assert_eq!(again, want_digests, "{format} {interval}: digests alone");
            }
        }
    }

    #[test]
    fn snapshots_copy_exactly_the_chosen_intervals_with_their_guards() {
        // Scattered choices, first and last included; for 4096 interval 1 straddles the
        // descriptors and the region boundary.
        for (interval, which) in [(512usize, vec![0, 3, 4, 9, 11, 31]), (4096, vec![1, 3])] {
            for format in [PiFormat::Type1, PiFormat::Nvme64] {
                let mem = memory();
                let data = fill(&mem, &ranges());
                let mut buffer = vec![0u8; which.len() * interval];
                // Two destination chunks, as the bounce pool hands them out.
                let (a, b) = buffer.split_at_mut(interval);
                let guards =
                    snapshot_intervals(&mem, &ranges(), &which, &mut [a, b], format, interval);
                let want: Vec<u8> = which
                    .iter()
                    .flat_map(|&i| data[i * interval..(i + 1) * interval].iter().copied())
                    .collect();
                assert_eq!(
                    buffer, want,
                    "{format} {interval}: the chosen intervals, in order"
                );
                let want: Vec<u64> = want.chunks(interval).map(|c| format.guard(c)).collect();
                assert_eq!(guards, want, "{format} {interval}");
            }
        }
    }

    #[test]
    fn verification_in_guest_memory_finds_the_changed_interval_even_when_it_straddles() {
        let dir = tempfile::tempdir().unwrap();
        let (_image, store) = store(dir.path(), PiFormat::Type1, 4096);
        let mem = memory();
        let data = fill(&mem, &ranges());
        for (i, chunk) in data.chunks(4096).enumerate() {
            store.store_generated(10 + i as u64, chunk);
        }
        assert_eq!(verify_guest(&store, &mem, &ranges(), 10), Ok(()));
        // Interval 1 (bytes 4096..8192 of the request) spans the first two descriptors'
        // pieces and the region boundary at 64 KiB; change a byte after the boundary.
        mem.write_obj(0xAAu8, GuestAddress(64 * KIB + 100)).unwrap();
        let (lba, error) = verify_guest(&store, &mem, &ranges(), 10).unwrap_err();
        assert_eq!(lba, 11);
        assert_eq!(error.kind, crate::integrity::pi::PiErrorKind::Guard);
        // The same data verifies when it is unwritten only if it is all zeros.
        store.meta.set_unwritten(11, 1);
        assert!(verify_guest(&store, &mem, &ranges(), 10).is_err());
    }

    #[test]
    fn a_failed_write_rederives_tuples_from_what_the_disk_holds() {
        let dir = tempfile::tempdir().unwrap();
        let (image, store) = store(dir.path(), PiFormat::Nvme64, 512);
        let mut block = AlignedBuf::zeroed(4096);
        // A neighbour outside the range, which re-derivation must not touch.
        let mut neighbour = AlignedBuf::zeroed(4096);
        neighbour.as_mut_slice().fill(0x11);
        image.write_at(neighbour.as_slice(), 12288).unwrap();
        block.as_mut_slice().fill(0x5A);
        image.write_at(block.as_slice(), 8192).unwrap();
        // Tuples say "unwritten" but the disk holds data: what a write that failed after
        // reaching the disk leaves behind.
        assert!(store.check(16, &block.as_slice()[..512]).is_err());
        rederive_from_disk(&image, &store, 16, 8);
        for lba in 16..24 {
            assert_eq!(store.check(lba, &block.as_slice()[..512]), Ok(()));
        }
        rederive_from_disk(&image, &store, 24, 1);
        assert_eq!(store.check(24, &neighbour.as_slice()[..512]), Ok(()));
        assert!(
            store.check(25, &neighbour.as_slice()[..512]).is_err(),
            "re-deriving LBA 24 must not touch LBA 25"
        );
    }
}
