//! Which path a PI write takes where nothing suggests the guest will change it in flight, and
//! the cost model that decides it.
//!
//! The two paths, both exact whatever the guest does:
//! - **zero-copy**: one pass over guest memory computes the guards and a change digest, the
//!   kernel reads the data straight from guest memory, and a second pass recomputes the digest
//!   after completion (changed intervals are rewritten from a snapshot, see `executor`);
//! - **bounce**: one fused copy + guard pass into a pool buffer, written from there; nothing
//!   to re-check.
//!
//! Zero-copy saves a copy only where the kernel moves the data without copying it in our
//! thread (block devices, O_DIRECT on a filesystem over a real device: [`Target::Dma`]). Where
//! the kernel copies anyway (tmpfs, page-cache fallbacks, FUSE, network filesystems:
//! [`Target::KernelCopies`]) bouncing is strictly cheaper: the same kernel copy, from a buffer
//! that is already hot, and no second pass. On a DMA target the answer depends on the CPU
//! (how a copy compares with a CRC pass) and on the request size, so it is measured: at start-up
//! on scratch memory ([`Calibration`], never on the image), then online from sampled CPU time
//! per byte of each path, per size class, with an occasional write sent the other way to keep
//! both estimates fresh.
//!
//! Owns only numbers and decisions: no I/O, no guest memory.

use std::hint::black_box;
use std::time::Instant;

use crate::integrity::PiFormat;

/// What the kernel does with a write's buffer on this target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The data leaves our buffer without our thread copying it (DMA, or a kernel worker's
    /// asynchronous copy): zero-copy can save the bounce copy.
    Dma,
    /// The kernel copies the data in the submitting thread (tmpfs, buffered I/O, FUSE, network
    /// filesystems): zero-copy cannot save a copy.
    KernelCopies,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Target::Dma => "DMA from the buffer",
            Target::KernelCopies => "the kernel copies the buffer",
        })
    }
}

/// How a PI write's data reaches the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WritePath {
    ZeroCopy,
    Bounce,
}

impl WritePath {
    fn index(self) -> usize {
        match self {
            WritePath::ZeroCopy => 0,
            WritePath::Bounce => 1,
        }
    }

    fn other(self) -> WritePath {
        match self {
            WritePath::ZeroCopy => WritePath::Bounce,
            WritePath::Bounce => WritePath::ZeroCopy,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            WritePath::ZeroCopy => "zero-copy",
            WritePath::Bounce => "bounce",
        }
    }
}

/// What `--bounce auto` does with writes where no mutation is expected (`--auto-path`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoPath {
    /// The cheaper path, by the cost model.
    Cost,
    /// Always zero-copy (mutation learning still bounces hot spots).
    ZeroCopy,
    /// Always bounce.
    Bounce,
}

/// Request-size classes with their own decision: (name, largest length in bytes).
pub const SIZE_CLASSES: [(&str, u64); 4] = [
    ("4k", 4096),
    ("16k", 16384),
    ("64k", 65536),
    ("large", u64::MAX),
];

/// Length measured for each class at start-up.
const CALIBRATION_LENGTHS: [usize; 4] = [4096, 16384, 65536, 131072];

fn class_of(len: u64) -> usize {
    SIZE_CLASSES
        .iter()
        .position(|&(_, max)| len <= max)
        .unwrap_or(SIZE_CLASSES.len() - 1)
}

/// CPU cost of each path's own work (picoseconds per byte), per size class, measured on
/// scratch memory at start-up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Calibration {
    /// Guards + digest before submission, digest after completion.
    pub zero_copy: [u32; 4],
    /// Fused copy + guard into a buffer.
    pub bounce: [u32; 4],
}

impl Calibration {
    /// Time both paths' passes with this format and interval on scratch buffers (about 10 ms
    /// in all; the best of several repetitions, so a preempted one does not count).
    pub fn measure(format: PiFormat, interval: usize) -> Calibration {
        let largest = CALIBRATION_LENGTHS[CALIBRATION_LENGTHS.len() - 1];
        let src: Vec<u8> = (0..largest)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let mut dst = vec![0u8; largest];
        let mut zero_copy = [0u32; 4];
        let mut bounce = [0u32; 4];
        for (class, &len) in CALIBRATION_LENGTHS.iter().enumerate() {
            let reps = (256 << 10) / len;
            let src = &src[..len];
            let dst = &mut dst[..len];
            zero_copy[class] = best_ps_per_byte(len, reps, || {
                for piece in src.chunks_exact(interval) {
                    black_box(super::protected::guard_and_digest(format, black_box(piece)));
                }
                for piece in src.chunks_exact(interval) {
                    black_box(super::protected::digest(black_box(piece)));
                }
            });
            bounce[class] = best_ps_per_byte(len, reps, || {
                for (d, s) in dst
                    .chunks_exact_mut(interval)
                    .zip(src.chunks_exact(interval))
                {
                    black_box(super::protected::copy_guard(format, d, black_box(s)));
                }
            });
        }
        Calibration { zero_copy, bounce }
    }
}

/// Best of 7 timings of `reps` runs of `f`, in picoseconds per byte of `len`.
fn best_ps_per_byte(len: usize, reps: usize, mut f: impl FnMut()) -> u32 {
    f(); // warm up caches and the CPU's vector units
    (0..7)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..reps {
                f();
            }
            let ps = start.elapsed().as_nanos() * 1000 / (reps * len) as u128;
            ps.clamp(1, u128::from(u32::MAX)) as u32
        })
        .min()
        .unwrap_or(1)
}

/// Everything the decision starts from; the same for every queue of a daemon.
#[derive(Debug, Clone, Copy)]
pub struct CostBasis {
    pub target: Target,
    pub auto_path: AutoPath,
    pub calibration: Calibration,
}

impl CostBasis {
    /// The path each size class starts on.
    pub fn initial(&self) -> [WritePath; 4] {
        std::array::from_fn(|class| match (self.auto_path, self.target) {
            (AutoPath::ZeroCopy, _) => WritePath::ZeroCopy,
            (AutoPath::Bounce, _) | (AutoPath::Cost, Target::KernelCopies) => WritePath::Bounce,
            (AutoPath::Cost, Target::Dma) => cheaper(
                self.calibration.zero_copy[class],
                self.calibration.bounce[class],
            ),
        })
    }

    /// One line for the log: the target, the chosen path per class and why.
    pub fn describe(&self) -> String {
        let paths = self.initial();
        let classes: Vec<String> = SIZE_CLASSES
            .iter()
            .enumerate()
            .map(|(c, (name, _))| {
                format!(
                    "{name}={} (zero-copy {:.0} ns/KiB, bounce {:.0} ns/KiB)",
                    paths[c].name(),
                    self.calibration.zero_copy[c] as f64 * 1.024,
                    self.calibration.bounce[c] as f64 * 1.024,
                )
            })
            .collect();
        let why = match (self.auto_path, self.target) {
            (AutoPath::ZeroCopy, _) => "forced by --auto-path zero-copy",
            (AutoPath::Bounce, _) => "forced by --auto-path bounce",
            (AutoPath::Cost, Target::KernelCopies) => {
                "the kernel copies on this target, so zero-copy saves nothing"
            }
            (AutoPath::Cost, Target::Dma) => {
                "measured on scratch memory; re-measured online from sampled writes"
            }
        };
        format!("{}; {why}", classes.join(", "))
    }
}

/// Zero-copy unless bouncing is cheaper (ties go to zero-copy: less memory traffic).
fn cheaper(zero_copy: u32, bounce: u32) -> WritePath {
    if bounce < zero_copy {
        WritePath::Bounce
    } else {
        WritePath::ZeroCopy
    }
}

/// Sample one write in this many per size class (time its path's work).
const SAMPLE_EVERY: u32 = 64;
/// Send one write in this many per class the other way, to keep that path's estimate fresh.
const EXPLORE_EVERY: u32 = 512;
/// Switch only when the other path is cheaper by this fraction (avoids flapping on noise).
const HYSTERESIS: f64 = 0.10;

#[derive(Debug, Clone, Copy)]
struct ClassState {
    path: WritePath,
    /// Estimated cost per path, picoseconds per byte (EWMA of samples, 1/8 weight).
    cost: [u32; 2],
    /// Whether each path has had samples of its own. Until it has, its estimate moves in
    /// proportion with the other's: real traffic costs more than scratch memory for both
    /// (cold guest cache lines), and the frequently sampled path must not look dearer than
    /// the rarely explored one only because its estimate was corrected first.
    sampled: [bool; 2],
    writes: u32,
}

/// What the executor should do with one write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    pub path: WritePath,
    /// Time this write's path work and report it with [`WriteCosts::record`].
    pub sample: bool,
}

/// One queue's live decision per size class (no sharing, no locks).
#[derive(Debug, Clone)]
pub struct WriteCosts {
    adaptive: bool,
    classes: [ClassState; 4],
}

impl WriteCosts {
    pub fn new(basis: &CostBasis) -> WriteCosts {
        let initial = basis.initial();
        WriteCosts {
            // Only a cost decision on a DMA target depends on measurements.
            adaptive: basis.auto_path == AutoPath::Cost && basis.target == Target::Dma,
            classes: std::array::from_fn(|c| ClassState {
                path: initial[c],
                cost: [basis.calibration.zero_copy[c], basis.calibration.bounce[c]],
                sampled: [false; 2],
                writes: 0,
            }),
        }
    }

    /// Carry on from a previous session's state (`snapshot`), so what a daemon learned about
    /// this target survives a frontend reconnecting.
    pub fn resume(basis: &CostBasis, previous: [(WritePath, u32, u32); 4]) -> WriteCosts {
        let mut costs = WriteCosts::new(basis);
        if costs.adaptive {
            for (state, (path, zero_copy, bounce)) in costs.classes.iter_mut().zip(previous) {
                state.path = path;
                state.cost = [zero_copy.max(1), bounce.max(1)];
            }
        }
        costs
    }

    /// The path for a write of `len` bytes that nothing suggests will be changed in flight.
    pub fn choose(&mut self, len: u64) -> Choice {
        let adaptive = self.adaptive;
        let state = &mut self.classes[class_of(len)];
        if !adaptive {
            return Choice {
                path: state.path,
                sample: false,
            };
        }
        state.writes = state.writes.wrapping_add(1);
        // Off the sampling grid, so explored writes add samples of the other path.
        let explore = state.writes % EXPLORE_EVERY == EXPLORE_EVERY / 2 + 1;
        Choice {
            path: if explore {
                state.path.other()
            } else {
                state.path
            },
            sample: explore || state.writes.is_multiple_of(SAMPLE_EVERY),
        }
    }

    /// A sampled write of `len` bytes spent `nanos` on `path`'s work. A sample counts at most
    /// 4× (and at least 1/4 of) the current estimate: a thread preempted while timing must not
    /// throw the estimate off, while a real change still moves it by up to 3/8 per sample.
    pub fn record(&mut self, len: u64, path: WritePath, nanos: u64) {
        if len == 0 {
            return;
        }
        let state = &mut self.classes[class_of(len)];
        let old = &mut state.cost[path.index()];
        let current = u64::from(*old).max(1);
        let sample = (nanos.saturating_mul(1000) / len).clamp(current / 4, current * 4);
        let new = ((current * 7 + sample) / 8).clamp(1, u64::from(u32::MAX));
        *old = new as u32;
        state.sampled[path.index()] = true;
        let other = path.other().index();
        if !state.sampled[other] {
            let scaled = u64::from(state.cost[other]) * new / current;
            state.cost[other] = scaled.clamp(1, u64::from(u32::MAX)) as u32;
        }
        let current = f64::from(state.cost[state.path.index()]);
        let other = f64::from(state.cost[state.path.other().index()]);
        if other * (1.0 + HYSTERESIS) < current {
            state.path = state.path.other();
        }
    }

    /// Current path and cost estimates (zero-copy, bounce; ps/byte) per class, for the stats.
    pub fn snapshot(&self) -> [(WritePath, u32, u32); 4] {
        std::array::from_fn(|c| {
            let s = &self.classes[c];
            (s.path, s.cost[0], s.cost[1])
        })
    }
}

/// A packed per-class snapshot for a lock-free stats slot: path (bit 0), zero-copy cost
/// (bits 1..32) and bounce cost (bits 32..64), both in ps/byte.
pub fn pack((path, zero_copy, bounce): (WritePath, u32, u32)) -> u64 {
    (u64::from(bounce) << 32) | (u64::from(zero_copy.min(u32::MAX >> 1)) << 1) | path.index() as u64
}

pub fn unpack(v: u64) -> (WritePath, u32, u32) {
    let path = if v & 1 == 0 {
        WritePath::ZeroCopy
    } else {
        WritePath::Bounce
    };
    (path, ((v >> 1) as u32) & (u32::MAX >> 1), (v >> 32) as u32)
}

/// A stopwatch for sampled path work: the monotonic clock (about 30 ns a read here; the
/// thread CPU-time clock is a system call costing close to a microsecond on this kind of
/// machine). A sample that was preempted halfway is bounded by [`WriteCosts::record`].
pub fn stopwatch() -> Instant {
    Instant::now()
}

/// Nanoseconds since `start`.
pub fn elapsed_ns(start: Instant) -> u64 {
    start.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basis(target: Target, auto_path: AutoPath, zero_copy: u32, bounce: u32) -> CostBasis {
        CostBasis {
            target,
            auto_path,
            calibration: Calibration {
                zero_copy: [zero_copy; 4],
                bounce: [bounce; 4],
            },
        }
    }

    #[test]
    fn a_target_where_the_kernel_copies_always_bounces() {
        // Even when zero-copy's own passes look cheaper: it cannot save the kernel's copy.
        let b = basis(Target::KernelCopies, AutoPath::Cost, 100, 300);
        assert_eq!(b.initial(), [WritePath::Bounce; 4]);
        let mut costs = WriteCosts::new(&b);
        for _ in 0..10_000 {
            let c = costs.choose(4096);
            assert_eq!(
                c,
                Choice {
                    path: WritePath::Bounce,
                    sample: false
                }
            );
        }
    }

    #[test]
    fn a_dma_target_starts_on_the_path_calibration_found_cheaper_per_class() {
        let mut b = basis(Target::Dma, AutoPath::Cost, 0, 0);
        b.calibration.zero_copy = [300, 250, 200, 150];
        b.calibration.bounce = [200, 200, 250, 300];
        assert_eq!(
            b.initial(),
            [
                WritePath::Bounce,
                WritePath::Bounce,
                WritePath::ZeroCopy,
                WritePath::ZeroCopy
            ]
        );
        let mut costs = WriteCosts::new(&b);
        assert_eq!(costs.choose(4096).path, WritePath::Bounce);
        assert_eq!(costs.choose(8192).path, WritePath::Bounce);
        assert_eq!(costs.choose(65536).path, WritePath::ZeroCopy);
        assert_eq!(costs.choose(1 << 20).path, WritePath::ZeroCopy);
    }

    #[test]
    fn forced_paths_ignore_costs() {
        for target in [Target::Dma, Target::KernelCopies] {
            let z = basis(target, AutoPath::ZeroCopy, 900, 1);
            assert_eq!(z.initial(), [WritePath::ZeroCopy; 4]);
            let b = basis(target, AutoPath::Bounce, 1, 900);
            assert_eq!(b.initial(), [WritePath::Bounce; 4]);
            let mut costs = WriteCosts::new(&z);
            for _ in 0..2000 {
                let c = costs.choose(4096);
                assert_eq!(c.path, WritePath::ZeroCopy);
                assert!(!c.sample);
            }
        }
    }

    #[test]
    fn online_samples_move_the_decision_with_hysteresis() {
        let mut costs = WriteCosts::new(&basis(Target::Dma, AutoPath::Cost, 200, 210));
        assert_eq!(costs.choose(4096).path, WritePath::ZeroCopy);
        // An explored bounce costs what calibration said; zero-copy turns out dearer on real
        // guest memory than on scratch memory.
        costs.record(4096, WritePath::Bounce, 4096 * 210 / 1000);
        for _ in 0..4 {
            costs.record(4096, WritePath::ZeroCopy, 4096 * 400 / 1000);
        }
        assert_eq!(costs.choose(4096).path, WritePath::Bounce);
        // Slightly cheaper zero-copy samples (within the hysteresis) do not flip it back...
        let mut costs2 = costs.clone();
        for _ in 0..40 {
            costs2.record(4096, WritePath::ZeroCopy, 4096 * 200 / 1000);
        }
        assert_eq!(
            costs2.choose(4096).path,
            WritePath::Bounce,
            "{:?}",
            costs2.snapshot()
        );
        // ... clearly cheaper ones do.
        for _ in 0..40 {
            costs.record(4096, WritePath::ZeroCopy, 4096 * 100 / 1000);
        }
        assert_eq!(
            costs.choose(4096).path,
            WritePath::ZeroCopy,
            "{:?}",
            costs.snapshot()
        );
        // Other classes were not touched.
        assert_eq!(costs.snapshot()[3], (WritePath::ZeroCopy, 200, 210));
    }

    #[test]
    fn the_unsampled_path_keeps_its_calibrated_ratio_to_the_sampled_one() {
        // Bounce is calibrated 2x cheaper; real traffic costs 3x the calibration for both, but
        // bounce (the chosen path) is sampled 8x as often as zero-copy is explored.
        let mut costs = WriteCosts::new(&basis(Target::Dma, AutoPath::Cost, 200, 100));
        for _ in 0..30 {
            costs.record(4096, WritePath::Bounce, 4096 * 300 / 1000);
            assert_eq!(
                costs.choose(4096).path,
                WritePath::Bounce,
                "{:?}",
                costs.snapshot()
            );
        }
        let (_, zero_copy, bounce) = costs.snapshot()[0];
        assert!(
            (560..=610).contains(&zero_copy) && (280..=300).contains(&bounce),
            "{zero_copy} {bounce}"
        );
        // Once zero-copy has samples of its own they count, not the ratio.
        for _ in 0..40 {
            costs.record(4096, WritePath::ZeroCopy, 4096 * 250 / 1000);
        }
        assert_eq!(
            costs.choose(4096).path,
            WritePath::ZeroCopy,
            "{:?}",
            costs.snapshot()
        );
    }

    #[test]
    fn a_preempted_sample_cannot_flip_the_decision_alone() {
        let mut costs = WriteCosts::new(&basis(Target::Dma, AutoPath::Cost, 200, 300));
        // 3 ms for a 4 KiB write's passes: the thread was descheduled while timing.
        costs.record(4096, WritePath::ZeroCopy, 3_000_000);
        assert_eq!(
            costs.choose(4096).path,
            WritePath::ZeroCopy,
            "{:?}",
            costs.snapshot()
        );
        assert_eq!(costs.snapshot()[0].1, (200 * 7 + 800) / 8);
    }

    #[test]
    fn adaptive_decisions_sample_and_explore_the_other_path() {
        let mut costs = WriteCosts::new(&basis(Target::Dma, AutoPath::Cost, 100, 300));
        let choices: Vec<Choice> = (0..EXPLORE_EVERY * 4).map(|_| costs.choose(4096)).collect();
        let sampled = choices.iter().filter(|c| c.sample).count() as u32;
        let explored = choices
            .iter()
            .filter(|c| c.path == WritePath::Bounce)
            .count() as u32;
        assert_eq!(
            explored, 4,
            "one write in {EXPLORE_EVERY} takes the other path"
        );
        assert_eq!(sampled, 4 * (EXPLORE_EVERY / SAMPLE_EVERY) + 4);
        assert!(choices
            .iter()
            .filter(|c| c.path == WritePath::Bounce)
            .all(|c| c.sample));
    }

    #[test]
    fn a_new_session_resumes_what_the_last_one_learned() {
        let b = basis(Target::Dma, AutoPath::Cost, 200, 300);
        let mut first = WriteCosts::new(&b);
        first.record(4096, WritePath::Bounce, 4096 * 300 / 1000);
        for _ in 0..20 {
            first.record(4096, WritePath::ZeroCopy, 4096 * 800 / 1000);
        }
        assert_eq!(first.choose(4096).path, WritePath::Bounce);
        let mut second = WriteCosts::resume(&b, first.snapshot());
        assert_eq!(second.choose(4096).path, WritePath::Bounce);
        // Forced and structural decisions do not depend on history.
        let forced = basis(Target::Dma, AutoPath::ZeroCopy, 200, 300);
        let mut third = WriteCosts::resume(&forced, first.snapshot());
        assert_eq!(third.choose(4096).path, WritePath::ZeroCopy);
    }

    #[test]
    fn snapshots_pack_and_unpack() {
        for v in [
            (WritePath::ZeroCopy, 0, 0),
            (WritePath::Bounce, 123, 456),
            (WritePath::Bounce, u32::MAX >> 1, u32::MAX),
        ] {
            assert_eq!(unpack(pack(v)), v);
        }
    }

    #[test]
    fn calibration_measures_something_for_every_class() {
        let c = Calibration::measure(PiFormat::Type1, 4096);
        assert!(
            c.zero_copy.iter().chain(&c.bounce).all(|&ps| ps > 0),
            "{c:?}"
        );
    }

    #[test]
    fn size_classes() {
        assert_eq!(class_of(512), 0);
        assert_eq!(class_of(4096), 0);
        assert_eq!(class_of(4097), 1);
        assert_eq!(class_of(65536), 2);
        assert_eq!(class_of(131072), 3);
    }
}
