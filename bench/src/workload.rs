//! The two workloads, as pure seeded generators: what a gateway's devices publish.
//!
//! Why seeded and pure: both systems under test must get byte-for-byte the same
//! messages, and a rerun must too, or the ratios compare different loads.
//!
//! Invariants: every message carries its source index (in the topic) and a per-source
//! sequence number (`"seq":N` in telemetry, `seq=N` in a log line), which is how the
//! collector counts each message once, finds duplicates and computes latency; payloads
//! are valid UTF-8 and never contain a newline.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Which workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// JSON telemetry from 200 devices, ~190 bytes each.
    Telemetry,
    /// Application log lines from 20 services on the gateway's host.
    Logs,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Telemetry => "telemetry",
            Kind::Logs => "logs",
        }
    }

    /// How many publishing clients.
    pub fn sources(self) -> usize {
        match self {
            Kind::Telemetry => 200,
            Kind::Logs => 20,
        }
    }

    pub fn topic(self, source: usize) -> String {
        match self {
            Kind::Telemetry => format!("sensors/dev-{source:04}/telemetry"),
            Kind::Logs => format!("logs/svc-{source:02}"),
        }
    }
}

/// One source's message stream: deterministic from (kind, seed, source).
#[derive(Debug)]
pub struct Source {
    kind: Kind,
    index: usize,
    rng: StdRng,
    /// Random-walk state of the telemetry readings.
    temp: f64,
    humidity: f64,
    /// Added to the clock for `uptime_s`: devices booted at different times.
    boot_s: u64,
}

const SERVICES: [&str; 5] = ["modbus-poller", "opcua-client", "rules", "ota", "watchdog"];
const PATHS: [&str; 4] = [
    "/api/v1/readings",
    "/api/v1/config",
    "/health",
    "/api/v1/alarms",
];

impl Source {
    pub fn new(kind: Kind, seed: u64, index: usize) -> Self {
        let mut rng = StdRng::seed_from_u64(seed ^ (index as u64).wrapping_mul(0x9E37_79B9));
        let temp = rng.random_range(15.0..30.0);
        let humidity = rng.random_range(35.0..60.0);
        let boot_s = rng.random_range(0..2_000_000);
        Self {
            kind,
            index,
            rng,
            temp,
            humidity,
            boot_s,
        }
    }

    /// The payload of message `seq`, sent at `ts_ms` (Unix ms).
    pub fn payload(&mut self, seq: u64, ts_ms: u64) -> Vec<u8> {
        match self.kind {
            Kind::Telemetry => self.telemetry(seq, ts_ms),
            Kind::Logs => self.log_line(seq, ts_ms),
        }
        .into_bytes()
    }

    fn telemetry(&mut self, seq: u64, ts_ms: u64) -> String {
        let r = &mut self.rng;
        self.temp = (self.temp + r.random_range(-0.15..0.15)).clamp(-20.0, 60.0);
        self.humidity = (self.humidity + r.random_range(-0.5..0.5)).clamp(5.0, 95.0);
        let status = if r.random_range(0..100) == 0 {
            "warn"
        } else {
            "ok"
        };
        format!(
            "{{\"device\":\"dev-{:04}\",\"site\":\"pl-{}\",\"seq\":{seq},\"ts\":{ts_ms},\"uptime_s\":{},\"temp_c\":{:.2},\"humidity\":{:.1},\"pressure_hpa\":{:.1},\"battery_v\":{:.3},\"rssi_dbm\":{},\"status\":\"{status}\",\"fw\":\"2.4.1\"}}",
            self.index,
            self.index % 8,
            self.boot_s + ts_ms / 1000 % 1_000_000,
            self.temp,
            self.humidity,
            1013.0 + r.random_range(-3.0..3.0),
            3.3 + r.random_range(0.0..0.8),
            -55 - r.random_range(0..30),
        )
    }

    fn log_line(&mut self, seq: u64, ts_ms: u64) -> String {
        let r = &mut self.rng;
        let service = SERVICES[self.index % SERVICES.len()];
        let (secs, ms) = (ts_ms / 1000, ts_ms % 1000);
        let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
        let pid = 1000 + self.index * 37;
        let body = match r.random_range(0..10) {
            0..=5 => format!(
                "level=info msg=\"request served\" method=GET path={} status=200 bytes={} dur_ms={:.1}",
                PATHS[r.random_range(0..PATHS.len())],
                r.random_range(120..4000),
                r.random_range(0.2..40.0)
            ),
            6 | 7 => format!(
                "level=debug msg=\"poll cycle\" unit={} registers={} errors=0 cycle_ms={}",
                r.random_range(1..32),
                r.random_range(8..64),
                r.random_range(90..120)
            ),
            8 => format!(
                "level=warn msg=\"slow response\" peer=10.20.{}.{} retry={} timeout_ms=500",
                r.random_range(0..4),
                r.random_range(2..250),
                r.random_range(1..4)
            ),
            _ => format!(
                "level=error msg=\"read failed\" unit={} err=\"timeout after 3 attempts\" code=E{:03}",
                r.random_range(1..32),
                r.random_range(100..140)
            ),
        };
        format!("2026-12-07T{h:02}:{m:02}:{s:02}.{ms:03}Z gw-1 {service}[{pid}]: seq={seq} {body}")
    }
}

/// (source, seq) of a delivered message, from its topic (whatever prefix the path added)
/// and payload; None for anything else (gap notices, dictionaries, stray messages).
pub fn identify(topic: &str, payload: &[u8]) -> Option<(usize, u64)> {
    let marker = ["/dev-", "/svc-"]
        .iter()
        .find_map(|m| topic.find(m).map(|i| i + m.len()))?;
    let digits: String = topic[marker..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    let source = digits.parse().ok()?;
    let text = std::str::from_utf8(payload).ok()?;
    let at = text
        .find("\"seq\":")
        .map(|i| i + 6)
        .or_else(|| text.find(" seq=").map(|i| i + 5))?;
    let seq = text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()?;
    Some((source, seq))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn telemetry_is_about_190_bytes() {
        let mut total = 0;
        let mut n = 0;
        for d in 0..200 {
            let mut s = Source::new(Kind::Telemetry, 1, d);
            for seq in 0..20 {
                total += s.payload(seq, 1_796_659_668_123 + seq * 1000).len();
                n += 1;
            }
        }
        let mean = total as f64 / n as f64;
        eprintln!("telemetry: mean payload {mean:.1} B");
        assert!((170.0..=210.0).contains(&mean), "mean payload {mean} B");
        let mut s = Source::new(Kind::Logs, 1, 3);
        let logs: usize = (0..1000)
            .map(|i| s.payload(i, 1_796_659_668_123).len())
            .sum();
        eprintln!("logs: mean line {:.1} B", logs as f64 / 1000.0);
    }

    #[test]
    fn same_seed_same_messages_other_seed_other_messages() {
        let gen = |seed| {
            let mut s = Source::new(Kind::Logs, seed, 3);
            (0..50).map(|i| s.payload(i, 1000 * i)).collect::<Vec<_>>()
        };
        assert_eq!(gen(5), gen(5));
        assert_ne!(gen(5), gen(6));
    }

    #[test]
    fn prefixes_do_not_confuse_identification() {
        let mut s = Source::new(Kind::Telemetry, 1, 42);
        let p = s.payload(7, 1);
        assert_eq!(
            identify("gw-1/sensors/dev-0042/telemetry", &p),
            Some((42, 7))
        );
        assert_eq!(
            identify("out/sensors/dev-0042/telemetry", &p),
            Some((42, 7))
        );
        assert_eq!(identify("gw-1/batch/default", b"\x28\xb5"), None);
    }

    proptest! {
        #[test]
        fn every_message_identifies_as_itself(
            logs in any::<bool>(), source in 0usize..200, seq in 0u64..u64::MAX / 2, ts in 0u64..4_000_000_000_000
        ) {
            let kind = if logs { Kind::Logs } else { Kind::Telemetry };
            let source = source % kind.sources();
            let mut s = Source::new(kind, 9, source);
            let p = s.payload(seq, ts);
            prop_assert!(!p.contains(&b'\n'));
            prop_assert_eq!(identify(&format!("gw-1/{}", kind.topic(source)), &p), Some((source, seq)));
        }
    }
}
