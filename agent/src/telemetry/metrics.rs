//! The agent's Prometheus metrics: one process-wide registry (as a Prometheus client
//! library's default registry is), so any part of the agent counts its events without
//! a handle threaded through every constructor. Counters are counted where events
//! happen; gauges are set once a second from the state they describe (`Hub`), so a
//! scrape never waits on the store or the uplink.
//!
//! Names follow Prometheus conventions: `edgerelay_` prefix, `_total` on counters (the
//! encoder adds it), base units (`_bytes`, `_seconds`).

use std::sync::atomic::{AtomicI64, AtomicU64};
use std::sync::OnceLock;

use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of a metric: (name, value) pairs.
pub type Labels = Vec<(String, String)>;

type IntGauge = Gauge<i64, AtomicI64>;
type FloatGauge = Gauge<f64, AtomicU64>;

/// Labels from string pairs.
pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub accepted: Family<Labels, Counter>,
    pub rejected: Family<Labels, Counter>,
    pub uploaded_records: Family<Labels, Counter>,
    pub uploaded_bytes: Family<Labels, Counter>,
    pub evicted: Family<Labels, Counter>,
    pub gap_notices: Family<Labels, Counter>,
    pub dead_lettered: Counter,
    pub puback_latency: Histogram,
    pub upstream_connects: Counter,
    pub upstream_errors: Counter,
    pub local_connections: IntGauge,
    pub buffer_records: Family<Labels, IntGauge>,
    pub buffer_bytes: Family<Labels, IntGauge>,
    pub buffer_oldest_age: Family<Labels, FloatGauge>,
    pub buffer_used: IntGauge,
    pub buffer_budget: IntGauge,
    pub dead_letters: IntGauge,
    pub compression_ratio: FloatGauge,
    pub link_up: IntGauge,
    pub link_info: Family<Labels, IntGauge>,
    pub link_rtt: FloatGauge,
    pub link_rtt_var: FloatGauge,
    pub link_loss: FloatGauge,
    pub link_delivery_rate: IntGauge,
    pub rate: IntGauge,
    pub window: IntGauge,
    pub bandwidth: IntGauge,
    pub batch_records: IntGauge,
    pub zstd_level: IntGauge,
    pub degraded: Family<Labels, IntGauge>,
    pub uplink_connected: IntGauge,
    pub stuck: IntGauge,
    pub ready: IntGauge,
}

impl Metrics {
    fn new() -> Self {
        let mut r = Registry::with_prefix("edgerelay");
        macro_rules! reg {
            ($name:expr, $help:expr, $metric:expr) => {{
                let m = $metric;
                r.register($name, $help, m.clone());
                m
            }};
        }
        Self {
            accepted: reg!("messages_accepted", "Messages accepted into the buffer (acknowledged to their sender), by source", Family::default()),
            rejected: reg!("messages_rejected", "Messages refused, by source and reason", Family::default()),
            uploaded_records: reg!("uploaded_records", "Records the central broker acknowledged, by stream", Family::default()),
            uploaded_bytes: reg!("uploaded_bytes", "Bytes the central broker acknowledged: kind=stored (as buffered) or wire (as published)", Family::default()),
            evicted: reg!("evicted_records", "Records that left the buffer unsent through retention (max_age, max_size), by stream", Family::default()),
            gap_notices: reg!("gap_notices", "Gap notices published upstream (ranges dropped unsent), by reason", Family::default()),
            dead_lettered: reg!("dead_lettered_records", "Records moved to the dead-letter table after the broker refused them", Counter::default()),
            puback_latency: reg!("puback_latency_seconds", "Time from a publish being queued upstream to its PUBACK", Histogram::new(exponential_buckets(0.005, 2.0, 14))),
            upstream_connects: reg!("upstream_connects", "Upstream sessions established", Counter::default()),
            upstream_errors: reg!("upstream_errors", "Upstream sessions lost or connects that failed", Counter::default()),
            local_connections: reg!("local_connections", "Clients connected to the local MQTT endpoint", IntGauge::default()),
            buffer_records: reg!("buffer_records", "Records waiting in the buffer, by stream", Family::default()),
            buffer_bytes: reg!("buffer_bytes", "Bytes waiting in the buffer, by stream", Family::default()),
            buffer_oldest_age: reg!("buffer_oldest_age_seconds", "Age of the oldest record waiting, by stream", Family::default()),
            buffer_used: reg!("buffer_used_bytes", "Bytes the buffer holds, as counted against its budget", IntGauge::default()),
            buffer_budget: reg!("buffer_budget_bytes", "The buffer's budget ([buffer] max_size, less the file's overhead)", IntGauge::default()),
            dead_letters: reg!("dead_letters", "Records in the dead-letter table", IntGauge::default()),
            compression_ratio: reg!("compression_ratio", "Stored bytes per wire byte of recent uploads (how much compression saves)", FloatGauge::default()),
            link_up: reg!("link_up", "1 while the link monitor finds the upstream link up", IntGauge::default()),
            link_info: reg!("link_source", "Where link measurements come from (ebpf, tcp-info, none): 1 for the one in use", Family::default()),
            link_rtt: reg!("link_rtt_seconds", "Smoothed transport RTT of the upstream connection", FloatGauge::default()),
            link_rtt_var: reg!("link_rtt_variance_seconds", "Transport RTT variation of the upstream connection", FloatGauge::default()),
            link_loss: reg!("link_loss_ratio", "Retransmitted share of segments sent (0..1)", FloatGauge::default()),
            link_delivery_rate: reg!("link_delivery_rate_bytes_per_second", "Bytes per second the link delivered", IntGauge::default()),
            rate: reg!("uplink_rate_bytes_per_second", "The rate controller's pace, wire bytes per second (0: unpaced)", IntGauge::default()),
            window: reg!("uplink_window_bytes", "The in-flight window, bytes (0: no window)", IntGauge::default()),
            bandwidth: reg!("uplink_bandwidth_bytes_per_second", "The controller's bottleneck bandwidth estimate, bytes per second", IntGauge::default()),
            batch_records: reg!("uplink_batch_records", "Records per batch the controller plans", IntGauge::default()),
            zstd_level: reg!("uplink_zstd_level", "zstd level of new batches", IntGauge::default()),
            degraded: reg!("uplink_degraded", "1 while a priority's degradable topics are sampled or conflated", Family::default()),
            uplink_connected: reg!("uplink_connected", "1 while an upstream session is established", IntGauge::default()),
            stuck: reg!("uplink_stuck", "1 while a backlog waits, the link is up and nothing has been acknowledged for [metrics] stuck_after", IntGauge::default()),
            ready: reg!("ready", "1 while /ready answers 200", IntGauge::default()),
            registry: r,
        }
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

/// The Content-Type of `Metrics::encode`.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        let m = Metrics::new();
        m.accepted
            .get_or_create(&labels(&[("source", "mqtt")]))
            .inc_by(3);
        m.puback_latency.observe(0.02);
        m.buffer_bytes
            .get_or_create(&labels(&[("stream", "default")]))
            .set(42);
        let text = m.encode();
        assert!(
            text.contains("edgerelay_messages_accepted_total{source=\"mqtt\"} 3"),
            "{text}"
        );
        assert!(text.contains("# TYPE edgerelay_puback_latency_seconds histogram"));
        assert!(text.contains("edgerelay_buffer_bytes{stream=\"default\"} 42"));
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            let name = line.split_whitespace().nth(2).unwrap_or_default();
            assert!(name.starts_with("edgerelay_"), "{line}");
        }
    }
}
