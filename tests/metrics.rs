//! The operator's live view: `/metrics` (Prometheus text format) and `/stats` on
//! `--metrics`, the stats socket beside the vhost-user socket, the stats file, and
//! `guardblk stats` — scraped while a libblkio client loads the real daemon.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkio::ReqFlags;
use common::*;

const MIB: u64 = 1 << 20;

/// A port nothing listens on right now (bound and released; the daemon binds it next).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One scrape: every sample line, `series{labels}` → value.
fn scrape(port: u16) -> BTreeMap<String, f64> {
    let (status, body) = http_get(TcpStream::connect(("127.0.0.1", port)).unwrap(), "/metrics");
    assert_eq!(status, 200, "{body}");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad line {l:?}"));
            (series.to_string(), value.parse().unwrap())
        })
        .collect()
}

/// Sum of a family's samples whose labels contain `filter` (e.g. `op="write"`).
fn sum(samples: &BTreeMap<String, f64>, family: &str, filter: &str) -> f64 {
    samples
        .iter()
        .filter(|(s, _)| s.split('{').next() == Some(family) && s.contains(filter))
        .map(|(_, v)| v)
        .sum()
}

/// Is `series` a counter-like sample that may never decrease?
fn monotonic(series: &str) -> bool {
    let name = series.split('{').next().unwrap_or("");
    name.ends_with("_total")
        || name.ends_with("_bucket")
        || name.ends_with("_count")
        || name.ends_with("_sum")
}

/// The stats file at `path` once it records `ended` ended sessions (waits up to 10 s).
fn stats_file_with_sessions(path: &std::path::Path, ended: usize) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let file: serde_json::Value = std::fs::read(path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or(serde_json::Value::Null);
        let recorded = file["recent_sessions"].as_array().map_or(0, Vec::len);
        if recorded >= ended {
            return file;
        }
        assert!(
            Instant::now() < deadline,
            "{} never recorded {ended} ended session(s): {file}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[derive(Default, Debug)]
struct Load {
    writes: u64,
    reads: u64,
}

/// Write on queue 0 and read back on queue 1, 8 × 4 KiB at a time, until `stop`.
fn run_load(socket: &std::path::Path, stop: &AtomicBool) -> Load {
    let mut c = Client::connect(socket, 2, 16 * 4096).unwrap();
    let mut load = Load::default();
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let base = (round % 64) * 8 * 4096;
        for i in 0..8usize {
            fill_pattern(
                &mut c.buf()[i * 4096..(i + 1) * 4096],
                base + i as u64 * 4096,
                round,
            );
            let ptr = c.buf_ptr(i * 4096);
            c.queues[0].write(base + i as u64 * 4096, ptr, 4096, i, ReqFlags::empty());
        }
        assert!(wait_all(&mut c.queues[0], 8).iter().all(|&(_, r)| r == 0));
        load.writes += 8;
        for i in 0..8usize {
            let ptr = c.buf_ptr((8 + i) * 4096);
            c.queues[1].read(base + i as u64 * 4096, ptr, 4096, i, ReqFlags::empty());
        }
        assert!(wait_all(&mut c.queues[1], 8).iter().all(|&(_, r)| r == 0));
        load.reads += 8;
        check_pattern(&c.buf()[8 * 4096..16 * 4096], base, round).unwrap();
        round += 1;
    }
    load
}

#[test]
fn metrics_follow_a_libblkio_load_and_end_equal_to_the_stats_file() {
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let d = Daemon::start_created(
        &std::env::temp_dir(),
        16 * MIB,
        &["--pi", "type1"],
        &["--queues", "2", "--metrics", &metrics],
    );
    let before = scrape(port);
    assert_eq!(before["guardblk_frontend_connected"], 0.0);
    assert_eq!(sum(&before, "guardblk_writes_completed_total", ""), 0.0);

    let stop = Arc::new(AtomicBool::new(false));
    let loader = {
        let (socket, stop) = (d.socket.clone(), Arc::clone(&stop));
        std::thread::spawn(move || run_load(&socket, &stop))
    };
    let started = Instant::now();
    let mut previous = before;
    let mut scrapes = 0;
    let mut saw_connected = false;
    while started.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(100));
        let now = scrape(port);
        scrapes += 1;
        saw_connected |= now["guardblk_frontend_connected"] == 1.0;
        for (series, &old) in previous.iter().filter(|(s, _)| monotonic(s)) {
            let new = now.get(series).copied().unwrap_or(0.0);
            assert!(new >= old, "{series} went from {old} to {new}");
        }
        previous = now;
    }
    stop.store(true, Ordering::Relaxed);
    let load = loader.join().unwrap();
    assert!(saw_connected, "never scraped frontend_connected 1");
    assert!(load.writes > 0 && load.reads > 0, "{load:?}");

    // After the session ends, the stats file, the stats socket and /metrics agree, and all
    // of them count exactly what the client did.
    let session = d.session_counters(1);
    // The daemon writes the file just after the session's end shows on the stats socket.
    let file = stats_file_with_sessions(&d.image.with_extension("img.pi-stats.json"), 1);
    let end = scrape(port);
    let counters = &file["counters"];
    for (family, field) in [
        ("guardblk_writes_completed_total", "writes"),
        ("guardblk_reads_completed_total", "reads"),
        ("guardblk_written_bytes_total", "bytes_written"),
        ("guardblk_read_bytes_total", "bytes_read"),
        ("guardblk_pi_intervals_verified_total", "intervals_verified"),
        ("guardblk_guard_error_reads_total", "guard_errors"),
    ] {
        assert_eq!(
            sum(&end, family, "") as u64,
            counters[field].as_u64().unwrap(),
            "{family} vs the stats file's {field}"
        );
    }
    assert_eq!(counters["writes"], load.writes, "{counters}");
    assert_eq!(counters["reads"], load.reads, "{counters}");
    assert_eq!(session.get("writes"), load.writes);
    assert_eq!(
        sum(&end, "guardblk_writes_completed_total", "queue=\"0\""),
        load.writes as f64
    );
    assert_eq!(
        sum(&end, "guardblk_reads_completed_total", "queue=\"1\""),
        load.reads as f64
    );
    assert_eq!(
        sum(
            &end,
            "guardblk_request_duration_seconds_count",
            "op=\"write\""
        ),
        load.writes as f64,
        "every write is timed"
    );
    assert_eq!(
        end["guardblk_request_duration_seconds_bucket{queue=\"0\",op=\"write\",le=\"+Inf\"}"],
        load.writes as f64
    );
    assert_eq!(sum(&end, "guardblk_requests_in_flight", ""), 0.0);
    assert_eq!(end["guardblk_frontend_connections_total"], 1.0);
    assert_eq!(end["guardblk_frontend_connected"], 0.0);
    assert_eq!(sum(&end, "guardblk_pi_errors_total", ""), 0.0);
    assert!(scrapes >= 10, "only {scrapes} scrapes in 2 s");

    // `guardblk stats`, both ways, reads the same document.
    let json = guardblk(&["stats", "--socket", d.socket.to_str().unwrap(), "--json"]);
    assert!(json.status.success(), "{json:?}");
    let live: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(live["counters"]["writes"], counters["writes"]);
    assert_eq!(live["recent_sessions"], file["recent_sessions"]);
    let table = guardblk(&["stats", "--metrics", &format!("http://{metrics}/metrics")]);
    assert!(table.status.success(), "{table:?}");
    let text = String::from_utf8_lossy(&table.stdout);
    let all = text
        .lines()
        .find(|l| l.starts_with("all "))
        .unwrap_or_else(|| panic!("no 'all' row:\n{text}"));
    let cells: Vec<&str> = all.split_whitespace().collect();
    assert_eq!(
        (cells[1], cells[2]),
        (
            load.reads.to_string().as_str(),
            load.writes.to_string().as_str()
        ),
        "{text}"
    );
}

#[test]
fn bad_http_requests_get_clear_refusals_and_io_goes_on() {
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let d = Daemon::start(4 * MIB, &["--queues", "1", "--metrics", &metrics]);
    let exchange = |raw: &[u8]| {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(raw).unwrap();
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut reply = String::new();
        std::io::Read::read_to_string(&mut s, &mut reply).unwrap();
        reply
    };
    for (raw, status) in [
        (&b"BLAH\r\n\r\n"[..], "400"),
        (b"GET /nope HTTP/1.1\r\n\r\n", "404"),
        (b"DELETE /metrics HTTP/1.1\r\n\r\n", "405"),
        (b"GET /metrics HTTP/1.1\r\nHost: x", "400"),
        (b"\xff\xfe\xfd\r\n\r\n", "400"),
    ] {
        let reply = exchange(raw);
        assert!(
            reply.starts_with(&format!("HTTP/1.1 {status} ")),
            "{:?} got {reply:?}",
            String::from_utf8_lossy(raw)
        );
    }
    let huge = exchange(&vec![b'x'; 64 * 1024]);
    assert!(huge.starts_with("HTTP/1.1 431 "), "{huge:?}");
    // A client that connects and says nothing delays the next scrape by the 2 s timeout at
    // most.
    let silent = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let t = Instant::now();
    let samples = scrape(port);
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    assert_eq!(samples["guardblk_frontend_connections_total"], 0.0);
    drop(silent);

    // The daemon still serves I/O, and still answers.
    let mut c = Client::connect(&d.socket, 1, 65536).unwrap();
    fill_pattern(&mut c.buf()[..65536], 0, 9);
    assert_eq!(write(&mut c, 0, 0, 0, 65536), 0);
    c.buf().fill(0);
    assert_eq!(read(&mut c, 0, 0, 0, 65536), 0);
    check_pattern(&c.buf()[..65536], 0, 9).unwrap();
    let samples = scrape(port);
    assert_eq!(samples["guardblk_writes_completed_total{queue=\"0\"}"], 1.0);
    assert_eq!(samples["guardblk_frontend_connected"], 1.0);
    assert_eq!(sum(&samples, "guardblk_rejected_requests_total", ""), 0.0);
}

#[test]
fn stats_without_a_daemon_is_one_sentence() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("none.sock");
    let out = guardblk(&["stats", "--socket", socket.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("guardblk: no guardblk answers on"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    let out = guardblk(&["stats", "--metrics", "ftp://x:1"]);
    assert_eq!(out.status.code(), Some(1));
    let out = guardblk(&["serve", "--metrics", "not-an-address"]);
    assert_eq!(out.status.code(), Some(2), "clap refuses it: {out:?}");
}

#[test]
fn a_taken_metrics_port_is_refused_in_one_sentence() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("d.img");
    std::fs::write(&image, vec![0u8; MIB as usize]).unwrap();
    let socket = dir.path().join("s.sock");
    let out = guardblk(&[
        "serve",
        image.to_str().unwrap(),
        "--socket",
        socket.to_str().unwrap(),
        "--metrics",
        &addr,
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.trim_end().lines().last().unwrap_or("");
    assert!(
        last.starts_with(&format!("guardblk: cannot serve metrics on {addr}")),
        "{err}"
    );
    assert!(!socket.exists(), "the vhost-user socket is removed again");
}

#[test]
fn a_socket_path_too_long_for_the_stats_socket_still_serves() {
    let dir = tempfile::tempdir().unwrap();
    // sun_path holds 107 bytes: room for this socket, not for it plus ".stats".
    let base = dir.path().to_str().unwrap().len() + 1;
    let name = "s".repeat(104 - base);
    let socket = dir.path().join(name);
    assert_eq!(socket.as_os_str().len(), 104);
    let image = dir.path().join("d.img");
    std::fs::write(&image, vec![0u8; MIB as usize]).unwrap();
    let socket_arg = socket.to_str().unwrap().to_string();
    let d = Daemon::serve(dir, image, &["--socket", &socket_arg]);
    assert!(d.log_text().contains("no stats socket"), "{}", d.log_text());
    let mut c = Client::connect(&d.socket, 1, 4096).unwrap();
    assert_eq!(write(&mut c, 0, 0, 0, 4096), 0);
}
