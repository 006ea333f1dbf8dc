//! What the demo shows: the live view (a few lines redrawn each second) and the
//! closing summary, rendered from plain snapshots so both can be tested without a
//! terminal. The summary's verdict is computed here, once: every acknowledged message
//! arrived, none twice.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use edgerelay::telemetry::Status;

use crate::fleet::Kind;

/// One moment of the run, as the live view shows it.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub elapsed: Duration,
    pub duration: Duration,
    /// After the fleet stopped: waiting for the backlog to arrive.
    pub draining: bool,
    pub phase: String,
    pub conditions: String,
    /// The next phase and when it starts, if any.
    pub next: Option<(String, Duration)>,
    pub published: u64,
    pub acked: u64,
    /// Messages per second over the last second.
    pub ingest_rate: f64,
    /// Payload bytes of the messages that arrived, and what they would cost as one
    /// MQTT publish each (see `central::Arrivals`).
    pub payload_bytes: u64,
    pub publish_bytes: u64,
    /// Bytes the emulated link carried each way.
    pub link_up_bytes: u64,
    pub link_down_bytes: u64,
    pub arrived: u64,
    pub status: Option<Status>,
}

fn clock(d: Duration) -> String {
    let s = d.as_secs();
    format!("{:02}:{:02}", s / 60, s % 60)
}

/// "1.2 MB", "340 kB", "512 B".
pub fn bytes(n: u64) -> String {
    match n {
        n if n >= 1_000_000 => format!("{:.1} MB", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1} kB", n as f64 / 1e3),
        n => format!("{n} B"),
    }
}

/// What arrived against what crossed the link for it, in full (the summary).
fn bytes_line(head: &str, payload: u64, publish: u64, over: u64) -> String {
    format!(
        "{head} delivered {} of payload, {} as one MQTT publish each; over the link {} (both ways){}",
        bytes(payload),
        bytes(publish),
        bytes(over),
        ratio(publish, over)
    )
}

fn ratio(publish: u64, over: u64) -> String {
    if over > 0 && publish > 0 {
        format!(": {:.1}x fewer", publish as f64 / over as f64)
    } else {
        String::new()
    }
}

fn bar(done: f64, width: usize) -> String {
    let full = ((done.clamp(0.0, 1.0) * width as f64).round() as usize).min(width);
    format!("[{}{}]", "#".repeat(full), "-".repeat(width - full))
}

/// The live view's lines.
pub fn render(s: &Snapshot) -> Vec<String> {
    let mut out = Vec::with_capacity(8);
    let when = if s.draining {
        format!("{} (fleet stopped, draining)", clock(s.elapsed))
    } else {
        format!("{} / {}", clock(s.elapsed), clock(s.duration))
    };
    let next = s
        .next
        .as_ref()
        .map(|(name, at)| format!("   next: {name} at {}", clock(*at)))
        .unwrap_or_default();
    out.push(format!(
        "edgerelay demo  {when}   link: {} ({}){next}",
        s.phase.to_uppercase(),
        s.conditions
    ));
    out.push(format!(
        "devices   {:>7.0} msg/s   published {:>8}   acknowledged by the agent {:>8}",
        s.ingest_rate, s.published, s.acked
    ));
    match &s.status {
        None => out.push("agent     (starting)".to_owned()),
        Some(st) => {
            let records: u64 = st.streams.iter().map(|x| x.records).sum();
            let stored: u64 = st.streams.iter().map(|x| x.bytes).sum();
            let oldest = st
                .streams
                .iter()
                .filter_map(|x| x.oldest_age_seconds)
                .fold(0.0f64, f64::max);
            let drain = st
                .streams
                .iter()
                .filter_map(|x| x.drain)
                .max_by_key(|d| d.peak_bytes);
            let progress = match drain {
                Some(d) if records > 0 => format!(
                    "   drain {} {:>3.0} %{}",
                    bar(d.done, 20),
                    d.done * 100.0,
                    d.eta_seconds
                        .map(|e| format!(", ~{e:.0} s to go"))
                        .unwrap_or_default()
                ),
                _ => String::new(),
            };
            out.push(format!(
                "backlog   {records:>7} records  {:>9}   oldest {oldest:>5.1} s{progress}",
                bytes(stored)
            ));
            let l = &st.link;
            out.push(format!(
                "link      {}   rtt {:.1} ms   delivery {}/s   (measured by {})",
                if l.up { "up  " } else { "DOWN" },
                l.rtt_ms,
                bytes(l.delivery_rate_bytes),
                l.source
            ));
            let u = &st.uplink;
            let rate = match u.rate_bytes {
                Some(0) | None => "unpaced".to_owned(),
                Some(r) => format!("{}/s", bytes(r)),
            };
            let degraded = if u.degraded.is_empty() {
                String::new()
            } else {
                format!("   degraded: {}", u.degraded.join(", "))
            };
            out.push(format!(
                "uplink    {}   rate {rate}   batch {}   zstd {}   {}{degraded}",
                if u.connected {
                    "connected   "
                } else {
                    "disconnected"
                },
                u.batch_records.map_or("-".to_owned(), |b| b.to_string()),
                u.zstd_level.map_or("-".to_owned(), |z| z.to_string()),
                u.phase,
            ));
        }
    }
    let over = s.link_up_bytes + s.link_down_bytes;
    out.push(format!(
        "bytes     {} as one publish per message; {} over the link{}",
        bytes(s.publish_bytes),
        bytes(over),
        ratio(s.publish_bytes, over)
    ));
    out.push(format!(
        "central   {:>8} messages arrived (unpack, duplicates removed)",
        s.arrived
    ));
    out
}

/// Per sender: what it published and had acknowledged, and what arrived of it.
#[derive(Debug, Clone)]
pub struct SenderResult {
    pub kind: Kind,
    pub published: u64,
    pub acked: u64,
}

/// The end of the run.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub ran: Duration,
    pub drained_in: Duration,
    pub devices: usize,
    pub senders: HashMap<String, SenderResult>,
    pub arrivals: HashMap<String, HashSet<u64>>,
    pub duplicate_records: u64,
    pub duplicate_messages: u64,
    pub foreign: u64,
    pub payload_bytes: u64,
    pub publish_bytes: u64,
    pub link_bytes: u64,
    pub connections: u64,
    pub phases: Vec<String>,
    pub latency_ms: HashMap<&'static str, Vec<u64>>,
}

/// One row of the summary's table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Row {
    pub published: u64,
    pub acked: u64,
    /// Acknowledged messages that arrived.
    pub arrived: u64,
    /// Acknowledged messages that did not.
    pub missing: u64,
}

impl Summary {
    pub fn rows(&self) -> Vec<(Kind, Row)> {
        Kind::ALL
            .iter()
            .map(|k| {
                let mut row = Row::default();
                for (id, s) in self.senders.iter().filter(|(_, s)| s.kind == *k) {
                    row.published += s.published;
                    row.acked += s.acked;
                    let got = self.arrivals.get(id);
                    let arrived = (0..s.acked)
                        .filter(|n| got.is_some_and(|g| g.contains(n)))
                        .count() as u64;
                    row.arrived += arrived;
                    row.missing += s.acked - arrived;
                }
                (*k, row)
            })
            .collect()
    }

    /// Every acknowledged message arrived, none twice, nothing unexplained.
    pub fn ok(&self) -> bool {
        let rows = self.rows();
        rows.iter().all(|(_, r)| r.missing == 0)
            && rows.iter().map(|(_, r)| r.acked).sum::<u64>() > 0
            && self.duplicate_records == 0
            && self.duplicate_messages == 0
            && self.foreign == 0
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let rows = self.rows();
        out.push_str(&format!(
            "\n== edgerelay demo: {} s with {} devices, an alarm panel, a PLC over TCP and an app over a Unix socket\n",
            self.ran.as_secs(),
            self.devices
        ));
        out.push_str(&format!("link phases: {}\n\n", self.phases.join(" → ")));
        out.push_str(&format!(
            "{:<22} {:>10} {:>13} {:>9} {:>8}\n",
            "source", "published", "acknowledged", "arrived", "missing"
        ));
        for (k, r) in &rows {
            out.push_str(&format!(
                "{:<22} {:>10} {:>13} {:>9} {:>8}\n",
                k.label(),
                r.published,
                r.acked,
                r.arrived,
                r.missing
            ));
        }
        let total = rows.iter().fold(Row::default(), |t, (_, r)| Row {
            published: t.published + r.published,
            acked: t.acked + r.acked,
            arrived: t.arrived + r.arrived,
            missing: t.missing + r.missing,
        });
        out.push_str(&format!(
            "{:<22} {:>10} {:>13} {:>9} {:>8}\n\n",
            "total", total.published, total.acked, total.arrived, total.missing
        ));
        out.push_str(&format!(
            "duplicates: {} records twice in unpack's output, {} messages under two records; {} foreign records\n",
            self.duplicate_records, self.duplicate_messages, self.foreign
        ));
        out.push_str(&bytes_line(
            "bytes:",
            self.payload_bytes,
            self.publish_bytes,
            self.link_bytes,
        ));
        out.push('\n');
        for (kind, label) in [("alarm", "alarms (high)"), ("other", "everything else")] {
            if let Some(l) = self.latency_ms.get(kind).filter(|l| !l.is_empty()) {
                out.push_str(&format!(
                    "publish -> central latency, {label}: p50 {:.2} s, p99 {:.2} s, max {:.2} s\n",
                    percentile(l, 0.5) as f64 / 1e3,
                    percentile(l, 0.99) as f64 / 1e3,
                    percentile(l, 1.0) as f64 / 1e3
                ));
            }
        }
        out.push_str(&format!(
            "the agent connected {} times through the link; backlog drained {:.1} s after the fleet stopped\n",
            self.connections,
            self.drained_in.as_secs_f64()
        ));
        if self.ok() {
            out.push_str(&format!(
                "RESULT: OK: every acknowledged message arrived exactly once ({} of {})\n",
                total.arrived, total.acked
            ));
        } else {
            out.push_str(&format!(
                "RESULT: FAILED: {} of {} acknowledged messages arrived, {} duplicates, {} foreign\n",
                total.arrived,
                total.acked,
                self.duplicate_records + self.duplicate_messages,
                self.foreign
            ));
        }
        out
    }
}

fn percentile(values: &[u64], p: f64) -> u64 {
    let mut v = values.to_vec();
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v.get(i).copied().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(acked: u64, arrived: &[u64]) -> Summary {
        let mut s = Summary {
            devices: 1,
            ..Summary::default()
        };
        s.senders.insert(
            "dev-000".to_owned(),
            SenderResult {
                kind: Kind::Telemetry,
                published: acked + 1,
                acked,
            },
        );
        s.arrivals
            .insert("dev-000".to_owned(), arrived.iter().copied().collect());
        s
    }

    #[test]
    fn every_acknowledged_message_must_arrive() {
        let s = summary(3, &[0, 1, 2]);
        assert!(s.ok());
        assert!(s
            .render()
            .contains("RESULT: OK: every acknowledged message arrived exactly once (3 of 3)"));
        let s = summary(3, &[0, 2, 3]);
        assert!(!s.ok());
        assert_eq!(
            s.rows()[0].1,
            Row {
                published: 4,
                acked: 3,
                arrived: 2,
                missing: 1
            }
        );
        assert!(s.render().contains("RESULT: FAILED: 2 of 3"));
    }

    #[test]
    fn duplicates_strangers_and_an_empty_run_fail() {
        let mut s = summary(2, &[0, 1]);
        s.duplicate_messages = 1;
        assert!(!s.ok());
        let mut s = summary(2, &[0, 1]);
        s.foreign = 1;
        assert!(!s.ok());
        assert!(!summary(0, &[]).ok());
    }

    #[test]
    fn the_live_view_shows_backlog_link_and_savings() {
        let mut st = Status::default();
        st.link.source = "tcp-info".to_owned();
        st.link.up = true;
        st.uplink.connected = true;
        st.uplink.rate_bytes = Some(12_000);
        st.streams.push(edgerelay::telemetry::status::StreamStatus {
            name: "default".to_owned(),
            records: 120,
            bytes: 24_000,
            oldest_age_seconds: Some(3.5),
            drain: Some(edgerelay::telemetry::status::Drain {
                peak_bytes: 48_000,
                done: 0.5,
                rate_bytes: 6000.0,
                eta_seconds: Some(4.0),
            }),
            ..Default::default()
        });
        let lines = render(&Snapshot {
            elapsed: Duration::from_secs(75),
            duration: Duration::from_secs(120),
            phase: "degraded".to_owned(),
            conditions: "64 kbit/s, 300 ms".to_owned(),
            payload_bytes: 800_000,
            publish_bytes: 1_000_000,
            link_up_bytes: 90_000,
            link_down_bytes: 10_000,
            status: Some(st),
            ..Snapshot::default()
        });
        let text = lines.join("\n");
        assert!(text.contains("01:15 / 02:00"), "{text}");
        assert!(text.contains("DEGRADED (64 kbit/s, 300 ms)"), "{text}");
        assert!(text.contains("120 records"), "{text}");
        assert!(
            text.contains("[##########----------]  50 %, ~4 s to go"),
            "{text}"
        );
        assert!(text.contains("rate 12.0 kB/s"), "{text}");
        assert!(
            text.contains("1.0 MB as one publish per message; 100.0 kB over the link: 10.0x fewer"),
            "{text}"
        );
    }

    #[test]
    fn percentiles_pick_from_the_sorted_values() {
        let v = [5, 1, 4, 2, 3];
        assert_eq!(percentile(&v, 0.5), 3);
        assert_eq!(percentile(&v, 1.0), 5);
        assert_eq!(percentile(&[], 0.99), 0);
    }
}
