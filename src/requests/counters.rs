//! Every figure the data path counts, with one owner: a queue's [`QueueCounters`].
//!
//! A queue's counters are written only by whoever holds that queue's worker mutex (its
//! thread, or the vhost-user thread draining or recovering it), one at a time, so a bump is
//! a relaxed load and store (no locked read-modify-write on the I/O path), and readers (the
//! metrics endpoint, the stats file, the session log line) take a [`Counters`] snapshot at
//! any time without stopping I/O. A snapshot is plain data with serde: per queue, summed per
//! session or daemon ([`Counters::add`]), differenced ([`Counters::since`]), written to
//! `IMAGE.pi-stats.json`, served as `/stats` and `/metrics`, and read back by `guardblk
//! info`, `guardblk stats`, the tests and the bench scripts. No other module keeps a count.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::parse::RequestError;
use crate::integrity::pi::PiErrorKind;

/// Declares the plain counters once: the atomic field, the snapshot field, and the table
/// ([`Counters::PLAIN`]) the metrics endpoint and the `stats` table are generated from.
macro_rules! plain_counters {
    ($( $(#[doc = $doc:literal])+ $field:ident => $metric:literal, )+) => {
        /// One queue's counters, written only under that queue's worker mutex.
        #[derive(Debug, Default)]
        pub struct QueueCounters {
            $( $(#[doc = $doc])+ pub $field: Counter, )+
            /// Requests accepted and not yet completed.
            pub in_flight: Counter,
            /// Of the counted errors, PI check failures by the field that failed.
            pub pi_errors: [Counter; PI_ERROR_KINDS.len()],
            /// Requests refused at validation, by [`RejectReason`].
            pub rejected_by_reason: [Counter; RejectReason::ALL.len()],
            /// Request latency from the queue pass that parsed it to the reap that completed
            /// it, per [`Operation`] (measured with the executor's per-pass clock).
            pub latency: [LatencyHistogram; Operation::ALL.len()],
            /// `auto`'s current write path and cost estimates per size class
            /// (`policy::SIZE_CLASSES`), packed by `policy::pack`.
            pub write_path: [AtomicU64; 4],
        }

        /// A snapshot of counters: one queue's, or a sum over queues and sessions.
        #[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(default)]
        pub struct Counters {
            $( $(#[doc = $doc])+ pub $field: u64, )+
            /// Requests accepted and not yet completed (a gauge: summed, never differenced).
            pub in_flight: u64,
            /// PI check failures by field: `guard`, `ref`, `app`.
            pub pi_errors: PiErrorCounts,
            /// Refused requests by reason (see [`RejectReason::name`]).
            pub rejected_by_reason: RejectCounts,
            /// Latency histograms per operation.
            pub latency: Latencies,
        }

        impl Counters {
            /// Each plain counter: snapshot field name, metric name (without the `_total`
            /// the encoder appends), help text.
            pub const PLAIN: &'static [(&'static str, &'static str, &'static str)] = &[
                $( (stringify!($field), $metric, concat!($($doc),+)), )+
            ];

            /// The plain counters' values, in [`Counters::PLAIN`] order.
            pub fn plain_values(&self) -> Vec<u64> {
                vec![$( self.$field, )+]
            }

            fn zip_plain(&mut self, other: &Counters, f: impl Fn(u64, u64) -> u64) {
                $( self.$field = f(self.$field, other.$field); )+
            }
        }

        impl QueueCounters {
            pub fn snapshot(&self) -> Counters {
                Counters {
                    $( $field: self.$field.get(), )+
                    in_flight: self.in_flight.get(),
                    pi_errors: PiErrorCounts {
                        guard: self.pi_errors[0].get(),
                        ref_tag: self.pi_errors[1].get(),
                        app: self.pi_errors[2].get(),
                    },
                    rejected_by_reason: RejectCounts(
                        RejectReason::ALL
                            .iter()
                            .zip(&self.rejected_by_reason)
                            .map(|(r, c)| (r.name().to_string(), c.get()))
                            .filter(|&(_, n)| n > 0)
                            .collect(),
                    ),
                    latency: Latencies(
                        Operation::ALL
                            .iter()
                            .zip(&self.latency)
                            .map(|(op, h)| (op.name().to_string(), h.snapshot()))
                            .collect(),
                    ),
                }
            }
        }
    };
}

plain_counters! {
    /// Read requests completed (with any status).
    reads => "reads_completed",
    /// Write requests completed (with any status).
    writes => "writes_completed",
    /// Flush requests completed.
    flushes => "flushes_completed",
    /// Discard requests completed.
    discards => "discards_completed",
    /// Write-zeroes requests completed.
    write_zeroes => "write_zeroes_completed",
    /// Bytes read by requests that completed OK.
    bytes_read => "read_bytes",
    /// Bytes written by requests that completed OK.
    bytes_written => "written_bytes",
    /// Requests refused at validation (malformed, out of range, unsupported).
    rejected => "rejected_requests",
    /// Requests completed with IOERR after validation.
    io_errors => "io_errors",
    /// Reads and writes bounced because their guest buffers do not meet O_DIRECT's alignment (or are too fragmented).
    bounced => "misaligned_bounced_requests",
    /// Bytes copied through bounce buffers, for any reason.
    bytes_bounced => "bounced_bytes",
    /// PI reads completed with IOERR because data and tuple disagree after a locked re-read.
    guard_errors => "guard_error_reads",
    /// PI reads whose first check failed and whose locked re-read verified (the guest changed its buffer, or the read raced a write).
    read_retries_healed => "read_retries_healed",
    /// PI intervals verified on read.
    intervals_verified => "pi_intervals_verified",
    /// PI intervals whose tuple was stored on write.
    intervals_written => "pi_intervals_written",
    /// PI writes sent to disk straight from guest memory.
    writes_zero_copy => "writes_zero_copy",
    /// PI writes copied into a bounce buffer up front (policy, or known mutation).
    writes_bounced => "writes_bounced",
    /// Of the bounced PI writes: those `auto` bounced because bouncing is the cheaper path.
    writes_bounced_by_cost => "writes_bounced_by_cost",
    /// Zero-copy PI writes the guest changed in flight, rewritten from a snapshot.
    writes_rewritten => "writes_rewritten",
    /// PI intervals those rewrites covered.
    intervals_rewritten => "pi_intervals_rewritten",
    /// Requests a previous daemon left in flight (in-flight region), resubmitted after a restart.
    requests_resubmitted => "requests_resubmitted",
}

/// The PI error kinds, in `QueueCounters::pi_errors` order.
pub const PI_ERROR_KINDS: [PiErrorKind; 3] =
    [PiErrorKind::Guard, PiErrorKind::Ref, PiErrorKind::App];

/// A counter with a single writer (see the module doc).
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Add `by`. Callers hold the owning queue's worker mutex (see the module doc).
    #[inline]
    pub fn add(&self, by: u64) {
        // Not fetch_add: one writer at a time (the mutex orders them), so a plain load and
        // store cannot lose an update, and readers see every value whole.
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_add(by),
            Ordering::Relaxed,
        );
    }

    #[inline]
    pub fn sub(&self, by: u64) {
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_sub(by),
            Ordering::Relaxed,
        );
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// PI check failures by the tuple field that disagreed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PiErrorCounts {
    pub guard: u64,
    #[serde(rename = "ref")]
    pub ref_tag: u64,
    pub app: u64,
}

impl PiErrorCounts {
    pub fn by_kind(&self) -> [(PiErrorKind, u64); 3] {
        [
            (PiErrorKind::Guard, self.guard),
            (PiErrorKind::Ref, self.ref_tag),
            (PiErrorKind::App, self.app),
        ]
    }
}

/// Why a request was refused, coarse enough to be a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// The descriptor chain itself is unusable (empty, looping, misordered, no status).
    MalformedChain,
    /// A descriptor points outside guest memory.
    OutsideGuestMemory,
    /// The header, payload or segments do not fit the request type.
    MalformedRequest,
    /// Sector or length not aligned to the block size.
    Unaligned,
    /// Past the end of the disk.
    OutOfRange,
    /// Larger than the advertised limits.
    TooLarge,
    /// A write-class request on a read-only disk.
    ReadOnly,
    /// A request type or flag the device does not offer.
    Unsupported,
}

impl RejectReason {
    pub const ALL: [RejectReason; 8] = [
        RejectReason::MalformedChain,
        RejectReason::OutsideGuestMemory,
        RejectReason::MalformedRequest,
        RejectReason::Unaligned,
        RejectReason::OutOfRange,
        RejectReason::TooLarge,
        RejectReason::ReadOnly,
        RejectReason::Unsupported,
    ];

    pub fn name(self) -> &'static str {
        match self {
            RejectReason::MalformedChain => "malformed_chain",
            RejectReason::OutsideGuestMemory => "outside_guest_memory",
            RejectReason::MalformedRequest => "malformed_request",
            RejectReason::Unaligned => "unaligned",
            RejectReason::OutOfRange => "out_of_range",
            RejectReason::TooLarge => "too_large",
            RejectReason::ReadOnly => "read_only",
            RejectReason::Unsupported => "unsupported",
        }
    }

    pub fn of(error: &RequestError) -> RejectReason {
        use RequestError as E;
        match error {
            E::EmptyChain
            | E::MalformedChain
            | E::TooManyDescriptors { .. }
            | E::ReadableAfterWritable
            | E::MissingStatus => RejectReason::MalformedChain,
            E::OutsideGuestMemory { .. } => RejectReason::OutsideGuestMemory,
            E::ShortHeader { .. }
            | E::UnexpectedReadableData { .. }
            | E::UnexpectedWritableData { .. }
            | E::NoData { .. }
            | E::IdBufferTooSmall { .. }
            | E::BadSegmentPayload { .. }
            | E::EmptySegment { .. } => RejectReason::MalformedRequest,
            E::UnalignedLength { .. } | E::UnalignedSector { .. } => RejectReason::Unaligned,
            E::SectorOverflow { .. } | E::OutOfRange { .. } => RejectReason::OutOfRange,
            E::TooLarge { .. } | E::TooManySegments { .. } | E::SegmentTooLarge { .. } => {
                RejectReason::TooLarge
            }
            E::ReadOnly { .. } => RejectReason::ReadOnly,
            E::UnsupportedType(_) | E::BadSegmentFlags { .. } => RejectReason::Unsupported,
        }
    }

    fn index(self) -> usize {
        RejectReason::ALL
            .iter()
            .position(|&r| r == self)
            .expect("ALL lists every reason")
    }
}

/// Refused requests by reason name; reasons never seen are left out.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectCounts(pub std::collections::BTreeMap<String, u64>);

/// The operations that get a latency histogram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
}

impl Operation {
    pub const ALL: [Operation; 5] = [
        Operation::Read,
        Operation::Write,
        Operation::Flush,
        Operation::Discard,
        Operation::WriteZeroes,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Operation::Read => "read",
            Operation::Write => "write",
            Operation::Flush => "flush",
            Operation::Discard => "discard",
            Operation::WriteZeroes => "write_zeroes",
        }
    }
}

/// Upper bounds of the latency buckets, in nanoseconds (the last bucket is +Inf): 10 µs to
/// 5 s, roughly ×2.5 apart, covering tmpfs at QD 1 to a stalled network disk.
pub const LATENCY_BOUNDS_NS: [u64; 16] = [
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    1_000_000_000,
    5_000_000_000,
];

/// A latency histogram with a single writer: per-bucket counts (not cumulative), total count
/// and sum.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    buckets: [Counter; LATENCY_BOUNDS_NS.len() + 1],
    count: Counter,
    sum_ns: Counter,
}

impl LatencyHistogram {
    pub fn observe(&self, elapsed: Duration) {
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let bucket = LATENCY_BOUNDS_NS.partition_point(|&bound| bound < ns);
        self.buckets[bucket].add(1);
        self.count.add(1);
        self.sum_ns.add(ns);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            count: self.count.get(),
            sum_ns: self.sum_ns.get(),
            buckets: self.buckets.iter().map(Counter::get).collect(),
        }
    }
}

/// A histogram's values: `buckets[i]` counts observations ≤ `LATENCY_BOUNDS_NS[i]` and above
/// the bound before it; the last counts the rest.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct HistogramSnapshot {
    pub count: u64,
    pub sum_ns: u64,
    pub buckets: Vec<u64>,
}

impl HistogramSnapshot {
    fn zip(&mut self, other: &HistogramSnapshot, f: impl Fn(u64, u64) -> u64) {
        self.count = f(self.count, other.count);
        self.sum_ns = f(self.sum_ns, other.sum_ns);
        self.buckets
            .resize(self.buckets.len().max(other.buckets.len()), 0);
        for (i, b) in self.buckets.iter_mut().enumerate() {
            *b = f(*b, other.buckets.get(i).copied().unwrap_or(0));
        }
    }

    /// The smallest bucket bound at or above quantile `q` (0..=1) of the observations, in
    /// nanoseconds: an upper estimate, as Prometheus' histogram_quantile interpolates within
    /// it. `None` with no observations; `u64::MAX` for the +Inf bucket.
    pub fn quantile_bound_ns(&self, q: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let rank = (q * self.count as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(LATENCY_BOUNDS_NS.get(i).copied().unwrap_or(u64::MAX));
            }
        }
        Some(u64::MAX)
    }
}

/// Latency histograms by operation name.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Latencies(pub std::collections::BTreeMap<String, HistogramSnapshot>);

impl Counters {
    /// Sum of many snapshots (queues of a daemon, say).
    pub fn sum<'a>(all: impl IntoIterator<Item = &'a Counters>) -> Counters {
        let mut total = Counters::default();
        for c in all {
            total.add(c);
        }
        total
    }

    /// Add `other` into `self`.
    pub fn add(&mut self, other: &Counters) {
        self.zip_plain(other, u64::wrapping_add);
        self.in_flight += other.in_flight;
        self.pi_errors.guard += other.pi_errors.guard;
        self.pi_errors.ref_tag += other.pi_errors.ref_tag;
        self.pi_errors.app += other.pi_errors.app;
        for (reason, n) in &other.rejected_by_reason.0 {
            *self.rejected_by_reason.0.entry(reason.clone()).or_default() += n;
        }
        for (op, h) in &other.latency.0 {
            self.latency
                .0
                .entry(op.clone())
                .or_default()
                .zip(h, u64::wrapping_add);
        }
    }

    /// What was counted between `earlier` and `self` (a session's share of the daemon's
    /// totals). `in_flight` stays as it is now.
    pub fn since(&self, earlier: &Counters) -> Counters {
        let mut delta = self.clone();
        delta.zip_plain(earlier, u64::saturating_sub);
        delta.pi_errors.guard = delta
            .pi_errors
            .guard
            .saturating_sub(earlier.pi_errors.guard);
        delta.pi_errors.ref_tag = delta
            .pi_errors
            .ref_tag
            .saturating_sub(earlier.pi_errors.ref_tag);
        delta.pi_errors.app = delta.pi_errors.app.saturating_sub(earlier.pi_errors.app);
        for (reason, n) in delta.rejected_by_reason.0.iter_mut() {
            *n = n.saturating_sub(
                earlier
                    .rejected_by_reason
                    .0
                    .get(reason)
                    .copied()
                    .unwrap_or(0),
            );
        }
        delta.rejected_by_reason.0.retain(|_, n| *n > 0);
        for (op, h) in delta.latency.0.iter_mut() {
            if let Some(e) = earlier.latency.0.get(op) {
                h.zip(e, u64::saturating_sub);
            }
        }
        delta
    }

    /// A plain counter by snapshot field name (for tests and tools that pick one figure).
    pub fn get(&self, name: &str) -> Option<u64> {
        Counters::PLAIN
            .iter()
            .position(|(field, _, _)| *field == name)
            .map(|i| self.plain_values()[i])
    }
}

/// `reads=.. writes=.. ...`: every plain counter, for the session log line.
impl std::fmt::Display for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, ((name, _, _), value)) in
            Counters::PLAIN.iter().zip(self.plain_values()).enumerate()
        {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{name}={value}")?;
        }
        Ok(())
    }
}

impl QueueCounters {
    pub fn reject(&self, error: &RequestError) {
        self.rejected.add(1);
        self.rejected_by_reason[RejectReason::of(error).index()].add(1);
    }

    pub fn pi_error(&self, kind: PiErrorKind) {
        let i = PI_ERROR_KINDS
            .iter()
            .position(|&k| k == kind)
            .expect("every kind is listed");
        self.pi_errors[i].add(1);
    }

    /// A request of `op` finished after `elapsed`, moving `bytes` if it succeeded.
    pub fn complete(&self, op: Operation, ok: bool, bytes: u64, elapsed: Duration) {
        let (requests, moved) = match op {
            Operation::Read => (&self.reads, Some(&self.bytes_read)),
            Operation::Write => (&self.writes, Some(&self.bytes_written)),
            Operation::Flush => (&self.flushes, None),
            Operation::Discard => (&self.discards, None),
            Operation::WriteZeroes => (&self.write_zeroes, None),
        };
        requests.add(1);
        if let (true, Some(moved)) = (ok, moved) {
            moved.add(bytes);
        }
        self.latency[op as usize].observe(elapsed);
        self.in_flight.sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_sum_and_since_agree() {
        let q = QueueCounters::default();
        q.in_flight.add(2);
        q.complete(Operation::Write, true, 4096, Duration::from_micros(30));
        q.complete(Operation::Read, false, 4096, Duration::from_millis(3));
        q.reject(&RequestError::UnsupportedType(99));
        q.pi_error(PiErrorKind::Ref);
        let first = q.snapshot();
        assert_eq!((first.writes, first.bytes_written), (1, 4096));
        assert_eq!(
            (first.reads, first.bytes_read),
            (1, 0),
            "failed reads move no bytes"
        );
        assert_eq!(first.in_flight, 0);
        assert_eq!(first.rejected_by_reason.0["unsupported"], 1);
        assert_eq!(first.pi_errors.ref_tag, 1);
        let write = &first.latency.0["write"];
        assert_eq!((write.count, write.sum_ns), (1, 30_000));
        assert_eq!(write.buckets[2], 1, "30 µs lands in the 50 µs bucket");

        q.complete(Operation::Write, true, 8192, Duration::from_secs(9));
        let second = q.snapshot();
        let delta = second.since(&first);
        assert_eq!(
            (delta.writes, delta.bytes_written, delta.reads),
            (1, 8192, 0)
        );
        assert_eq!(delta.latency.0["write"].buckets[LATENCY_BOUNDS_NS.len()], 1);
        assert!(delta.rejected_by_reason.0.is_empty());
        let total = Counters::sum([&first, &delta]);
        assert_eq!(total.plain_values(), second.plain_values());
        assert_eq!(total.latency, second.latency);
        assert_eq!(second.get("writes"), Some(2));
        assert_eq!(second.get("no_such_counter"), None);
    }

    #[test]
    fn quantile_bound_is_the_bucket_holding_the_rank() {
        let h = LatencyHistogram::default();
        for _ in 0..99 {
            h.observe(Duration::from_micros(20));
        }
        h.observe(Duration::from_millis(40));
        let s = h.snapshot();
        assert_eq!(s.quantile_bound_ns(0.5), Some(25_000));
        assert_eq!(s.quantile_bound_ns(0.99), Some(25_000));
        assert_eq!(s.quantile_bound_ns(1.0), Some(50_000_000));
        assert_eq!(HistogramSnapshot::default().quantile_bound_ns(0.5), None);
    }

    #[test]
    fn snapshots_round_trip_through_json() {
        let q = QueueCounters::default();
        q.complete(Operation::Flush, true, 0, Duration::from_micros(700));
        q.reject(&RequestError::EmptyChain);
        let s = q.snapshot();
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Counters>(&json).unwrap(), s);
        // Files written by an older daemon lack newer fields: they read as zero.
        let old: Counters = serde_json::from_str(r#"{"reads": 3}"#).unwrap();
        assert_eq!((old.reads, old.writes), (3, 0));
    }

    #[test]
    fn every_request_error_has_a_reason() {
        assert_eq!(
            RejectReason::of(&RequestError::OutOfRange {
                sector: 1,
                end: 9,
                capacity: 8
            }),
            RejectReason::OutOfRange
        );
        for (i, r) in RejectReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
    }
}
