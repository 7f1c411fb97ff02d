//! What a serving daemon tells operators about itself, all from the queues' counters
//! ([`QueueCounters`], the one owner of every figure): [`DaemonStats`] (the serde document
//! written to the stats file, served as `/stats` and read by `guardblk info` and `guardblk
//! stats`), the Prometheus text format on `/metrics` ([`prometheus`]), and the small HTTP
//! server both are served by ([`http`]). Nothing here runs on the I/O path: readers load
//! the queues' atomics when asked.

pub mod http;
pub mod prometheus;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::requests::policy;
use crate::requests::{Counters, QueueCounters};

/// Ended sessions the stats document keeps, newest last.
pub const RECENT_SESSIONS: usize = 32;

/// The stats document: the daemon's counters in total and per queue, its sessions, and
/// `auto`'s write paths. Every reader of a figure reads it from here.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DaemonStats {
    /// When this document was taken (RFC 3339).
    pub updated: String,
    pub daemon_started: String,
    pub pid: u32,
    pub image: String,
    /// Frontend connections accepted so far (the current one included).
    pub sessions: u64,
    pub frontend_connected: bool,
    /// Second frontends turned away while one was connected.
    pub frontends_refused: u64,
    /// All queues, since the daemon started.
    pub counters: Counters,
    /// Per queue, since the daemon started.
    pub queues: Vec<Counters>,
    /// The connected frontend's session so far (the newest, while a live migration has two
    /// connected).
    pub current_session: Option<SessionStats>,
    /// The last sessions that ended, oldest first (at most [`RECENT_SESSIONS`]).
    pub recent_sessions: Vec<SessionStats>,
    /// `auto`'s current write path per queue and size class, with each path's cost estimate.
    pub write_path: serde_json::Value,
    /// What opening the PI metadata found (none for an image without PI).
    pub recovery: Option<RecoveryStats>,
}

/// What the daemon found when it opened the PI metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RecoveryStats {
    /// Regions with write intents: the previous run did not close the metadata cleanly.
    pub dirty_regions: u64,
    /// Tuples re-derived from the data in those regions.
    pub recovered: u64,
    /// The image was moved or copied since the metadata last saw it (pairing re-checked).
    pub rebound: bool,
}

/// One frontend connection's share of the counters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SessionStats {
    pub number: u64,
    pub started: String,
    /// `None` while the session runs.
    pub ended: Option<String>,
    pub counters: Counters,
}

/// The daemon's live view: its queues' counters and its session bookkeeping.
pub struct Telemetry {
    queues: Vec<Arc<QueueCounters>>,
    image: PathBuf,
    started: SystemTime,
    sessions: AtomicU64,
    connected: AtomicBool,
    refused: AtomicU64,
    /// Number, start time and counters at the start of each connected session, oldest
    /// first (two only during a live migration's hand-over; each session's counters then
    /// include what the other's device did while both were connected).
    current: Mutex<Vec<(u64, SystemTime, Counters)>>,
    recent: Mutex<VecDeque<SessionStats>>,
    recovery: Option<RecoveryStats>,
}

fn stamp(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

impl Telemetry {
    pub fn new(num_queues: usize, image: PathBuf, recovery: Option<RecoveryStats>) -> Telemetry {
        Telemetry {
            queues: (0..num_queues)
                .map(|_| Arc::new(QueueCounters::default()))
                .collect(),
            image,
            started: SystemTime::now(),
            sessions: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            refused: AtomicU64::new(0),
            current: Mutex::new(Vec::new()),
            recent: Mutex::new(VecDeque::new()),
            recovery,
        }
    }

    /// The queues' counters, for their executors (queue `q` writes `queues()[q]`).
    pub fn queues(&self) -> &[Arc<QueueCounters>] {
        &self.queues
    }

    /// All queues now.
    pub fn totals(&self) -> Counters {
        Counters::sum(&self.per_queue())
    }

    fn per_queue(&self) -> Vec<Counters> {
        self.queues.iter().map(|q| q.snapshot()).collect()
    }

    pub fn session_started(&self, number: u64) {
        self.sessions.store(number, Ordering::Relaxed);
        self.connected.store(true, Ordering::Relaxed);
        lock(&self.current).push((number, SystemTime::now(), self.totals()));
    }

    /// The session ended (its I/O drained): returns its counters and keeps them in the
    /// recent sessions.
    pub fn session_ended(&self, number: u64) -> SessionStats {
        let (number, started, before) = {
            let mut current = lock(&self.current);
            let found = current.iter().position(|(n, ..)| *n == number);
            let session = found.map_or((number, self.started, Counters::default()), |i| {
                current.remove(i)
            });
            self.connected.store(!current.is_empty(), Ordering::Relaxed);
            session
        };
        let ended = SessionStats {
            number,
            started: stamp(started),
            ended: Some(stamp(SystemTime::now())),
            counters: self.totals().since(&before),
        };
        let mut recent = lock(&self.recent);
        if recent.len() == RECENT_SESSIONS {
            recent.pop_front();
        }
        recent.push_back(ended.clone());
        ended
    }

    /// The connection turned out to be a liveness probe (it closed without a message): it
    /// was not a session, and its number goes to the next connection.
    pub fn session_discarded(&self, number: u64) {
        let mut current = lock(&self.current);
        current.retain(|(n, ..)| *n != number);
        self.connected.store(!current.is_empty(), Ordering::Relaxed);
        let _ = self.sessions.compare_exchange(
            number,
            number.saturating_sub(1),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    pub fn frontend_refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }

    pub fn stats(&self) -> DaemonStats {
        let queues = self.per_queue();
        let counters = Counters::sum(&queues);
        let current_session =
            lock(&self.current)
                .last()
                .map(|(number, started, before)| SessionStats {
                    number: *number,
                    started: stamp(*started),
                    ended: None,
                    counters: counters.since(before),
                });
        DaemonStats {
            updated: stamp(SystemTime::now()),
            daemon_started: stamp(self.started),
            pid: std::process::id(),
            image: self.image.display().to_string(),
            sessions: self.sessions.load(Ordering::Relaxed),
            frontend_connected: self.connected.load(Ordering::Relaxed),
            frontends_refused: self.refused.load(Ordering::Relaxed),
            counters,
            queues,
            current_session,
            recent_sessions: lock(&self.recent).iter().cloned().collect(),
            write_path: self.write_paths_json(),
            recovery: self.recovery.clone(),
        }
    }

    /// `auto`'s current path per size class (queue 0's; every queue decides alike), for the
    /// log: "4k=bounce 16k=bounce 64k=zero-copy large=zero-copy".
    pub fn describe_write_paths(&self) -> String {
        let Some(queue) = self.queues.first() else {
            return String::new();
        };
        policy::SIZE_CLASSES
            .iter()
            .zip(&queue.write_path)
            .map(|((name, _), slot)| {
                let (path, _, _) = policy::unpack(slot.load(Ordering::Relaxed));
                format!("{name}={}", path.name())
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The same per queue and class, with each path's estimated cost.
    fn write_paths_json(&self) -> serde_json::Value {
        let queues: Vec<serde_json::Value> = self
            .queues
            .iter()
            .map(|queue| {
                let classes: serde_json::Map<String, serde_json::Value> = policy::SIZE_CLASSES
                    .iter()
                    .zip(&queue.write_path)
                    .map(|((name, _), slot)| {
                        let (path, zero_copy, bounce) =
                            policy::unpack(slot.load(Ordering::Relaxed));
                        let value = serde_json::json!({
                            "path": path.name(),
                            "zero_copy_ps_per_byte": zero_copy,
                            "bounce_ps_per_byte": bounce,
                        });
                        ((*name).to_string(), value)
                    })
                    .collect();
                serde_json::Value::Object(classes)
            })
            .collect();
        serde_json::Value::Array(queues)
    }

    /// Write the stats document to `path` (atomically, by rename). Best effort: a failure
    /// is logged, never fatal.
    pub fn publish(&self, path: &std::path::Path) {
        let text = match serde_json::to_string_pretty(&self.stats()) {
            Ok(text) => text + "\n",
            Err(e) => {
                tracing::warn!(error = %e, "cannot encode the stats document");
                return;
            }
        };
        if let Err(e) = crate::storage::files::replace(path, text.as_bytes(), 0o644) {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the stats file");
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::requests::counters::Operation;
    use std::time::Duration;

    #[test]
    fn sessions_get_their_share_and_the_document_round_trips() {
        let t = Telemetry::new(2, "/tmp/x.img".into(), None);
        t.queues()[1].in_flight.add(1);
        t.queues()[1].complete(Operation::Write, true, 512, Duration::from_micros(5));
        t.session_started(1);
        t.queues()[0].in_flight.add(1);
        t.queues()[0].complete(Operation::Read, true, 4096, Duration::from_micros(5));
        let live = t.stats();
        assert!(live.frontend_connected);
        let current = live.current_session.as_ref().unwrap();
        assert_eq!((current.counters.reads, current.counters.writes), (1, 0));
        let ended = t.session_ended(1);
        assert_eq!((ended.number, ended.counters.reads), (1, 1));
        let doc = t.stats();
        assert_eq!((doc.counters.reads, doc.counters.writes), (1, 1));
        assert_eq!(doc.queues.len(), 2);
        assert_eq!(doc.recent_sessions, vec![ended]);
        assert_eq!(doc.current_session, None);
        let json = serde_json::to_string(&doc).unwrap();
        assert_eq!(serde_json::from_str::<DaemonStats>(&json).unwrap(), doc);
    }

    #[test]
    fn a_discarded_probe_leaves_no_session_behind() {
        let t = Telemetry::new(1, "/tmp/x.img".into(), None);
        t.session_started(1);
        t.session_ended(1);
        t.session_started(2);
        t.session_discarded(2);
        let doc = t.stats();
        assert_eq!(doc.sessions, 1);
        assert!(!doc.frontend_connected);
        assert_eq!(doc.current_session, None);
        assert_eq!(doc.recent_sessions.len(), 1);
        // The next connection reuses the number.
        t.session_started(2);
        assert_eq!(t.stats().sessions, 2);
    }
}
