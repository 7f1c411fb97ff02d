//! `guardblk stats`: a running daemon's counters as a table, once or refreshed, read from its
//! stats socket (SOCKET.stats) or its `--metrics` HTTP address. Both serve the same
//! [`DaemonStats`] document that the stats file holds.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::{io_error, ToolError};
use crate::requests::counters::{HistogramSnapshot, Operation};
use crate::requests::Counters;
use crate::telemetry::DaemonStats;

/// Where to ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatsSource {
    /// The daemon's vhost-user socket; its stats socket is beside it.
    Socket(PathBuf),
    /// `host:port` of a daemon's `--metrics` listener.
    Http(String),
}

impl StatsSource {
    /// `http://127.0.0.1:9717/metrics`, `127.0.0.1:9717` → the `host:port` to connect to.
    pub fn from_url(url: &str) -> Result<StatsSource, ToolError> {
        let rest = url.strip_prefix("http://").unwrap_or(url);
        if rest.starts_with("https://") || url.contains("://") && !url.starts_with("http://") {
            return Err(ToolError::Refused(format!(
                "--metrics {url}: only plain http:// addresses are served by guardblk"
            )));
        }
        let authority = rest.split('/').next().unwrap_or("");
        if authority.is_empty() || !authority.contains(':') {
            return Err(ToolError::Refused(format!(
                "--metrics {url}: expected the daemon's --metrics address, like http://127.0.0.1:9717"
            )));
        }
        Ok(StatsSource::Http(authority.to_string()))
    }

    fn describe(&self) -> String {
        match self {
            StatsSource::Socket(p) => crate::daemon::stats_socket_path(p).display().to_string(),
            StatsSource::Http(a) => format!("http://{a}"),
        }
    }
}

/// Ask the daemon for its stats document now.
pub fn fetch(source: &StatsSource) -> Result<DaemonStats, ToolError> {
    const REQUEST: &[u8] = b"GET /stats HTTP/1.1\r\nHost: guardblk\r\nConnection: close\r\n\r\n";
    let timeout = Some(Duration::from_secs(5));
    let unreachable = |e: std::io::Error| {
        ToolError::Refused(format!(
            "no guardblk answers on {} ({e}); is the daemon running{}?",
            source.describe(),
            match source {
                StatsSource::Socket(_) => " with that --socket",
                StatsSource::Http(_) => " with --metrics at that address",
            }
        ))
    };
    let mut reply = Vec::new();
    match source {
        StatsSource::Socket(socket) => {
            let mut s = UnixStream::connect(crate::daemon::stats_socket_path(socket))
                .map_err(unreachable)?;
            s.set_read_timeout(timeout)
                .map_err(io_error("stats socket"))?;
            s.write_all(REQUEST)
                .map_err(io_error("sending to the stats socket"))?;
            s.read_to_end(&mut reply)
                .map_err(io_error("reading from the stats socket"))?;
        }
        StatsSource::Http(addr) => {
            let mut s = TcpStream::connect(addr).map_err(unreachable)?;
            s.set_read_timeout(timeout)
                .map_err(io_error("metrics address"))?;
            s.write_all(REQUEST)
                .map_err(io_error("sending to the metrics address"))?;
            s.read_to_end(&mut reply)
                .map_err(io_error("reading from the metrics address"))?;
        }
    }
    let text = String::from_utf8_lossy(&reply);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.lines().next().unwrap_or("");
    if !status.starts_with("HTTP/1.1 200") {
        return Err(ToolError::Refused(format!(
            "{} answered {status:?}, not the stats document; is it a guardblk?",
            source.describe()
        )));
    }
    serde_json::from_str(body).map_err(|e| {
        ToolError::Refused(format!(
            "{} sent a stats document this guardblk cannot read: {e}",
            source.describe()
        ))
    })
}

/// The daemon's figures as a table: totals since it started or, given an earlier document
/// and the time between them, per-second rates and latencies over that interval.
pub fn render(now: &DaemonStats, earlier: Option<(&DaemonStats, Duration)>) -> String {
    let mut out = String::new();
    let session = match &now.current_session {
        Some(s) => format!("session {} connected since {}", s.number, s.started),
        None => format!("no frontend connected ({} sessions so far)", now.sessions),
    };
    let _ = writeln!(
        out,
        "guardblk pid {} serving {} since {}; {session}{}",
        now.pid,
        now.image,
        now.daemon_started,
        if now.frontends_refused > 0 {
            format!("; {} second frontends refused", now.frontends_refused)
        } else {
            String::new()
        }
    );
    let rows: Vec<(String, Counters)> = now
        .queues
        .iter()
        .enumerate()
        .map(|(q, c)| (q.to_string(), c.clone()))
        .chain(std::iter::once(("all".to_string(), now.counters.clone())))
        .collect();
    let (rows, seconds) = match earlier {
        Some((before, elapsed)) => {
            let old: Vec<Counters> = before
                .queues
                .iter()
                .cloned()
                .chain(std::iter::once(before.counters.clone()))
                .collect();
            let rows = rows
                .into_iter()
                .enumerate()
                .map(|(i, (name, c))| {
                    let delta = old.get(i).map_or(c.clone(), |o| c.since(o));
                    (name, delta)
                })
                .collect();
            (rows, Some(elapsed.as_secs_f64().max(1e-3)))
        }
        None => (rows, None),
    };
    let _ = writeln!(
        out,
        "{}",
        match seconds {
            Some(s) => format!(
                "over the last {s:.1} s, per second (inflight: now; guard err, rejected: counts):"
            ),
            None => "since the daemon started:".to_string(),
        }
    );
    let per = |n: u64| match seconds {
        Some(s) => format!("{:.0}", n as f64 / s),
        None => n.to_string(),
    };
    let mib = |n: u64| match seconds {
        Some(s) => format!("{:.1}", n as f64 / s / (1 << 20) as f64),
        None => format!("{:.1}", n as f64 / (1 << 20) as f64),
    };
    let header = [
        "queue",
        "reads",
        "writes",
        "flushes",
        "read MiB",
        "write MiB",
        "inflight",
        "read p99",
        "write p99",
        "zero-copy",
        "bounced",
        "rewritten",
        "healed",
        "guard err",
        "rejected",
    ];
    let mut table: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for (name, c) in &rows {
        table.push(vec![
            name.clone(),
            per(c.reads),
            per(c.writes),
            per(c.flushes),
            mib(c.bytes_read),
            mib(c.bytes_written),
            c.in_flight.to_string(),
            p99(c.latency.0.get(Operation::Read.name())),
            p99(c.latency.0.get(Operation::Write.name())),
            per(c.writes_zero_copy),
            per(c.writes_bounced),
            per(c.writes_rewritten),
            per(c.read_retries_healed),
            c.guard_errors.to_string(),
            c.rejected.to_string(),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|col| table.iter().map(|r| r[col].len()).max().unwrap_or(0))
        .collect();
    for row in &table {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (cell, w))| {
                if i == 0 {
                    format!("{cell:<w$}")
                } else {
                    format!("{cell:>w$}")
                }
            })
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    let all = &now.counters;
    if all.guard_errors + all.io_errors + all.rejected > 0 {
        let kinds: Vec<String> = all
            .pi_errors
            .by_kind()
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| format!("{n} {k}"))
            .collect();
        let reasons: Vec<String> = all
            .rejected_by_reason
            .0
            .iter()
            .map(|(r, n)| format!("{n} {r}"))
            .collect();
        let _ = writeln!(
            out,
            "errors since start: {} guard-error reads (intervals: {}), {} I/O errors, {} rejected ({})",
            all.guard_errors,
            if kinds.is_empty() { "none".into() } else { kinds.join(", ") },
            all.io_errors,
            all.rejected,
            if reasons.is_empty() { "none".into() } else { reasons.join(", ") },
        );
    }
    out.trim_end().to_string()
}

/// "850µs": the p99 latency's bucket bound (an upper estimate), or "-" with no requests.
fn p99(h: Option<&HistogramSnapshot>) -> String {
    match h.and_then(|h| h.quantile_bound_ns(0.99)) {
        None => "-".into(),
        Some(u64::MAX) => ">5s".into(),
        Some(ns) if ns < 1_000_000 => format!("≤{}µs", ns / 1000),
        Some(ns) if ns < 1_000_000_000 => format!("≤{}ms", ns / 1_000_000),
        Some(ns) => format!("≤{}s", ns / 1_000_000_000),
    }
}

/// `stats --watch`: print a table every `every`, with rates over each interval, until the
/// daemon stops answering (an error) or the process is interrupted.
pub fn watch(
    source: &StatsSource,
    every: Duration,
    mut print: impl FnMut(&str),
) -> Result<(), ToolError> {
    let mut previous = fetch(source)?;
    let mut taken = Instant::now();
    print(&render(&previous, None));
    loop {
        std::thread::sleep(every);
        let now = fetch(source)?;
        let at = Instant::now();
        // A restarted daemon starts its counters again: show totals rather than negative rates.
        let earlier = (now.pid == previous.pid).then(|| (&previous, at - taken));
        print(&format!("\n{}", render(&now, earlier)));
        previous = now;
        taken = at;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_urls() {
        for url in [
            "http://127.0.0.1:9717/metrics",
            "http://127.0.0.1:9717",
            "127.0.0.1:9717",
        ] {
            assert_eq!(
                StatsSource::from_url(url).unwrap(),
                StatsSource::Http("127.0.0.1:9717".into())
            );
        }
        assert!(StatsSource::from_url("https://x:1").is_err());
        assert!(StatsSource::from_url("http://nohost").is_err());
    }

    #[test]
    fn table_shows_totals_and_rates() {
        let mut now = DaemonStats {
            pid: 7,
            image: "/d.img".into(),
            queues: vec![Counters {
                reads: 300,
                bytes_read: 3 << 20,
                ..Default::default()
            }],
            ..Default::default()
        };
        now.counters = Counters::sum(&now.queues);
        let totals = render(&now, None);
        assert!(totals.contains("since the daemon started"), "{totals}");
        assert!(
            totals
                .lines()
                .any(|l| l.starts_with("all") && l.contains(" 300 ") && l.contains("3.0")),
            "{totals}"
        );
        let mut before = now.clone();
        before.queues[0].reads = 100;
        before.queues[0].bytes_read = 1 << 20;
        before.counters = Counters::sum(&before.queues);
        let rates = render(&now, Some((&before, Duration::from_secs(2))));
        assert!(rates.contains("per second"), "{rates}");
        assert!(
            rates
                .lines()
                .any(|l| l.starts_with("all") && l.contains(" 100 ") && l.contains("1.0")),
            "{rates}"
        );
    }
}
