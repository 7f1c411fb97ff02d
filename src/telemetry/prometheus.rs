//! `/metrics`: the daemon's counters in the Prometheus text format (0.0.4), encoded by
//! `prometheus-client` from a snapshot taken at scrape time.
//!
//! Names follow the Prometheus and node_exporter conventions: a `guardblk_` prefix, base
//! units (seconds, bytes), `_total` on counters (added by the encoder). Per-queue series
//! carry a `queue` label; sum them with `sum without (queue) (...)`.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::{DaemonStats, Telemetry};
use crate::requests::counters::{Counters, LATENCY_BOUNDS_NS};

/// The `Content-Type` of what [`encode`] returns.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The exposition text for `telemetry` now.
pub fn encode(telemetry: &Arc<Telemetry>) -> String {
    let mut registry = Registry::with_prefix("guardblk");
    registry.register_collector(Box::new(Scrape(telemetry.stats())));
    let mut text = String::new();
    // Writing into a String cannot fail; an encoder error would be a bug in a collector.
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut text, &registry) {
        tracing::warn!(error = %e, "cannot encode metrics");
    }
    text
}

/// One scrape's snapshot, encoded as metric families.
#[derive(Debug)]
struct Scrape(DaemonStats);

type QueueLabel = [(&'static str, String); 1];

fn queue_label(q: usize) -> QueueLabel {
    [("queue", q.to_string())]
}

fn help_of(doc: &str) -> String {
    doc.trim().trim_end_matches('.').to_string()
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = &self.0;
        let queues: Vec<(QueueLabel, &Counters)> = stats
            .queues
            .iter()
            .enumerate()
            .map(|(q, c)| (queue_label(q), c))
            .collect();

        for (i, (field, metric, doc)) in Counters::PLAIN.iter().enumerate() {
            // Rejections are exported by reason below; their sum is the plain counter.
            if *field == "rejected" {
                continue;
            }
            let mut family =
                encoder.encode_descriptor(metric, &help_of(doc), None, MetricType::Counter)?;
            for (labels, c) in &queues {
                ConstCounter::new(c.plain_values()[i]).encode(family.encode_family(labels)?)?;
            }
        }

        let mut family = encoder.encode_descriptor(
            "rejected_requests",
            "Requests refused at validation, by reason",
            None,
            MetricType::Counter,
        )?;
        for (q, c) in stats.queues.iter().enumerate() {
            for (reason, n) in &c.rejected_by_reason.0 {
                let labels = [("queue", q.to_string()), ("reason", reason.clone())];
                ConstCounter::new(*n).encode(family.encode_family(&labels)?)?;
            }
        }

        let mut family = encoder.encode_descriptor(
            "pi_errors",
            "PI check failures of intervals read, by the tuple field that disagreed (guard, ref, app)",
            None,
            MetricType::Counter,
        )?;
        for (q, c) in stats.queues.iter().enumerate() {
            for (kind, n) in c.pi_errors.by_kind() {
                let labels = [("queue", q.to_string()), ("kind", kind.to_string())];
                ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
            }
        }

        let mut family = encoder.encode_descriptor(
            "requests_in_flight",
            "Requests accepted and not yet completed",
            None,
            MetricType::Gauge,
        )?;
        for (labels, c) in &queues {
            ConstGauge::new(c.in_flight as i64).encode(family.encode_family(labels)?)?;
        }

        let mut family = encoder.encode_descriptor(
            "request_duration_seconds",
            "Request latency from taking the descriptor chain off the virtqueue to writing its status byte",
            None,
            MetricType::Histogram,
        )?;
        for (q, c) in stats.queues.iter().enumerate() {
            for (op, h) in &c.latency.0 {
                let labels = [("queue", q.to_string()), ("op", op.clone())];
                let buckets: Vec<(f64, u64)> = h
                    .buckets
                    .iter()
                    .enumerate()
                    .map(|(i, &n)| {
                        let bound = LATENCY_BOUNDS_NS
                            .get(i)
                            .map_or(f64::INFINITY, |&ns| ns as f64 / 1e9);
                        (bound, n)
                    })
                    .collect();
                family
                    .encode_family(&labels)?
                    .encode_histogram::<NoLabelSet>(
                        h.sum_ns as f64 / 1e9,
                        h.count,
                        &buckets,
                        None,
                    )?;
            }
        }

        let daemon_counter = |encoder: &mut DescriptorEncoder, name, help, value| {
            let family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(value).encode(family)
        };
        daemon_counter(
            &mut encoder,
            "frontend_connections",
            "Frontend (QEMU, libblkio) connections accepted",
            stats.sessions,
        )?;
        daemon_counter(
            &mut encoder,
            "frontends_refused",
            "Second frontends turned away while one was connected",
            stats.frontends_refused,
        )?;
        let family = encoder.encode_descriptor(
            "frontend_connected",
            "1 while a frontend is connected",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(i64::from(stats.frontend_connected)).encode(family)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::requests::counters::Operation;
    use std::time::Duration;

    #[test]
    fn exposition_has_conventional_names_and_values() {
        let t = Arc::new(Telemetry::new(2, "/tmp/x.img".into(), None));
        t.session_started(1);
        let q = &t.queues()[1];
        q.in_flight.add(3);
        q.complete(Operation::Write, true, 4096, Duration::from_micros(30));
        q.complete(Operation::Write, true, 4096, Duration::from_millis(2));
        q.reject(&crate::requests::parse::RequestError::EmptyChain);
        let text = encode(&t);
        for line in [
            "# TYPE guardblk_writes_completed_total counter",
            "guardblk_writes_completed_total{queue=\"1\"} 2",
            "guardblk_writes_completed_total{queue=\"0\"} 0",
            "guardblk_written_bytes_total{queue=\"1\"} 8192",
            "guardblk_rejected_requests_total{queue=\"1\",reason=\"malformed_chain\"} 1",
            "guardblk_pi_errors_total{queue=\"0\",kind=\"guard\"} 0",
            "guardblk_requests_in_flight{queue=\"1\"} 1",
            "# TYPE guardblk_request_duration_seconds histogram",
            "guardblk_request_duration_seconds_bucket{queue=\"1\",op=\"write\",le=\"5e-05\"} 1",
            "guardblk_request_duration_seconds_bucket{queue=\"1\",op=\"write\",le=\"0.0025\"} 2",
            "guardblk_request_duration_seconds_bucket{queue=\"1\",op=\"write\",le=\"+Inf\"} 2",
            "guardblk_request_duration_seconds_count{queue=\"1\",op=\"write\"} 2",
            "guardblk_frontend_connections_total 1",
            "guardblk_frontend_connected 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
        assert!(!text.contains("guardblk_rejected_total"), "{text}");
    }
}
