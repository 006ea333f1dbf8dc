//! What `edgerelay status` shows, as one snapshot (`Status`, served as JSON at /status
//! and rendered here for people), and the two judgements behind it that need memory:
//! how a backlog's drain is going (`DrainTracker`) and whether the uplink is stuck
//! (`StuckDetector`). Pure: time is passed in.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The agent as `edgerelay status` shows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub gateway_id: String,
    pub version: String,
    pub uptime_seconds: u64,
    pub ready: bool,
    /// Why not ready, when not.
    pub not_ready: Option<String>,
    pub stuck: bool,
    pub buffer: BufferStatus,
    pub streams: Vec<StreamStatus>,
    pub link: LinkStatus,
    pub uplink: UplinkStatus,
    pub dead_letters: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BufferStatus {
    pub used_bytes: u64,
    pub budget_bytes: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StreamStatus {
    pub name: String,
    pub priority: String,
    pub records: u64,
    pub bytes: u64,
    pub oldest_age_seconds: Option<f64>,
    /// Records that left the buffer unsent through retention, ever.
    pub evicted: u64,
    pub drain: Option<Drain>,
}

/// A backlog's drain: since it was last empty, its peak, how much of that is gone, and
/// when it will be gone at the rate it shrinks now.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Drain {
    pub peak_bytes: u64,
    pub done: f64,
    /// Net bytes per second the backlog shrinks (negative: it grows).
    pub rate_bytes: f64,
    pub eta_seconds: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LinkStatus {
    pub source: String,
    pub up: bool,
    pub rtt_ms: f64,
    pub rtt_var_ms: f64,
    pub loss: f64,
    pub delivery_rate_bytes: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct UplinkStatus {
    pub connected: bool,
    pub mode: String,
    pub phase: String,
    pub paused: bool,
    pub rate_bytes: Option<u64>,
    pub window_bytes: Option<u64>,
    pub bandwidth_bytes: u64,
    pub batch_records: Option<usize>,
    pub zstd_level: Option<i32>,
    pub degraded: Vec<String>,
    pub uploaded_records: u64,
    pub compression_ratio: Option<f64>,
    pub last_ack_seconds_ago: Option<f64>,
    pub last_error: Option<String>,
}

/// Follows one stream's backlog from one reading to the next.
#[derive(Debug, Default)]
pub struct DrainTracker {
    peak: u64,
    last: Option<(Instant, u64)>,
    rate: Option<f64>,
}

/// Weight of the newest reading in the drain rate.
const DRAIN_ALPHA: f64 = 0.3;

impl DrainTracker {
    /// The backlog is `bytes` at `now`; None while there is nothing to drain.
    pub fn update(&mut self, now: Instant, bytes: u64) -> Option<Drain> {
        if let Some((at, before)) = self.last.filter(|(_, b)| *b > 0) {
            let dt = now.saturating_duration_since(at).as_secs_f64();
            if dt > 0.0 {
                let r = (before as f64 - bytes as f64) / dt;
                self.rate = Some(self.rate.map_or(r, |o| o + DRAIN_ALPHA * (r - o)));
            }
        }
        self.last = Some((now, bytes));
        if bytes == 0 {
            // Drained: the next backlog is a new one, with a rate of its own.
            self.peak = 0;
            self.rate = None;
            return None;
        }
        self.peak = self.peak.max(bytes);
        let rate = self.rate.unwrap_or(0.0);
        Some(Drain {
            peak_bytes: self.peak,
            done: 1.0 - bytes as f64 / self.peak as f64,
            rate_bytes: rate,
            eta_seconds: (rate > 0.0).then(|| bytes as f64 / rate),
        })
    }
}

/// Backlog waiting, link up, and nothing acknowledged upstream for `after`: a broker
/// that takes the connection and forwards nothing (the bridges users replace say
/// "connected" then). Counted from the latest of the last acknowledgement, the backlog
/// appearing and the link coming up, so neither a new backlog nor a reconnect is
/// "stuck" at once.
#[derive(Debug)]
pub struct StuckDetector {
    after: Duration,
    since: Option<Instant>,
    was_up: bool,
    stuck: bool,
}

impl StuckDetector {
    pub fn new(after: Duration) -> Self {
        Self {
            after,
            since: None,
            was_up: false,
            stuck: false,
        }
    }

    /// One look: is it stuck now? (The caller logs a change.)
    pub fn update(
        &mut self,
        now: Instant,
        backlog: bool,
        link_up: bool,
        last_ack: Option<Instant>,
    ) -> bool {
        if !backlog || !link_up {
            self.since = None;
        } else if self.since.is_none() || !self.was_up {
            self.since = Some(now);
        }
        self.was_up = link_up;
        self.stuck = match self.since {
            Some(since) => {
                let progress = last_ack.map_or(since, |a| a.max(since));
                now.saturating_duration_since(progress) >= self.after
            }
            None => false,
        };
        self.stuck
    }

    pub fn stuck(&self) -> bool {
        self.stuck
    }
}

/// "1.9 MiB", "512 B": bytes for people.
pub fn human_bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n;
    let mut unit = 0;
    while v.abs() >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{v:.0} {}", UNITS[unit])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// "3h02m", "5m07s", "42s".
pub fn human_duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s / 60 % 60),
    }
}

/// A bar of `width` cells, `done` (0..1) of them filled.
pub fn bar(done: f64, width: usize) -> String {
    let filled = ((done.clamp(0.0, 1.0) * width as f64).round() as usize).min(width);
    format!("[{}{}]", "#".repeat(filled), "-".repeat(width - filled))
}

impl Status {
    /// The status for people.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let ready = if self.ready {
            "ready".to_owned()
        } else {
            format!(
                "NOT READY: {}",
                self.not_ready.as_deref().unwrap_or("starting")
            )
        };
        out.push_str(&format!(
            "edgerelay {} ({}) — up {}, {ready}\n",
            self.gateway_id,
            self.version,
            human_duration(self.uptime_seconds as f64)
        ));
        let l = &self.link;
        out.push_str(&format!(
            "link:    {} ({}), rtt {:.0} ms ±{:.0}, loss {:.1} %, delivering {}/s\n",
            if l.up { "up" } else { "DOWN" },
            l.source,
            l.rtt_ms,
            l.rtt_var_ms,
            l.loss * 100.0,
            human_bytes(l.delivery_rate_bytes as f64)
        ));
        let u = &self.uplink;
        let mut line = format!(
            "uplink:  {}, {} mode",
            if u.connected {
                "connected"
            } else {
                "NOT CONNECTED"
            },
            u.mode
        );
        if let Some(rate) = u.rate_bytes {
            line.push_str(&format!(
                ", {}{}, pace {}/s",
                u.phase,
                if u.paused { " (paused)" } else { "" },
                human_bytes(rate as f64)
            ));
        }
        if let Some(w) = u.window_bytes {
            line.push_str(&format!(", window {}", human_bytes(w as f64)));
        }
        if u.bandwidth_bytes > 0 {
            line.push_str(&format!(
                ", bandwidth {}/s",
                human_bytes(u.bandwidth_bytes as f64)
            ));
        }
        if let (Some(b), Some(z)) = (u.batch_records, u.zstd_level) {
            line.push_str(&format!(", batch {b}, zstd {z}"));
        }
        out.push_str(&line);
        out.push('\n');
        let mut line = format!("         {} records uploaded", u.uploaded_records);
        if let Some(r) = u.compression_ratio {
            line.push_str(&format!(", {r:.1}x smaller on the wire"));
        }
        if let Some(a) = u.last_ack_seconds_ago {
            line.push_str(&format!(", last PUBACK {} ago", human_duration(a)));
        }
        if !u.degraded.is_empty() {
            line.push_str(&format!(", degraded: {}", u.degraded.join(", ")));
        }
        out.push_str(&line);
        out.push('\n');
        if let Some(e) = &u.last_error {
            out.push_str(&format!("         last upstream error: {e}\n"));
        }
        if self.stuck {
            out.push_str(
                "         STUCK: a backlog waits, the link is up, and nothing is acknowledged\n",
            );
        }
        out.push_str(&format!(
            "buffer:  {} of {}\n",
            human_bytes(self.buffer.used_bytes as f64),
            human_bytes(self.buffer.budget_bytes as f64)
        ));
        let width = self
            .streams
            .iter()
            .map(|s| s.name.len())
            .max()
            .unwrap_or(6)
            .max(6);
        out.push_str(&format!(
            "  {:width$}  {:6}  {:>9}  {:>10}  {:>7}  drain\n",
            "stream", "prio", "records", "bytes", "oldest"
        ));
        for s in &self.streams {
            let oldest = s
                .oldest_age_seconds
                .map_or_else(|| "-".to_owned(), human_duration);
            let drain = match s.drain {
                None => String::new(),
                Some(d) => {
                    let eta = match d.eta_seconds {
                        Some(e) => format!(
                            "ETA {} at {}/s",
                            human_duration(e),
                            human_bytes(d.rate_bytes)
                        ),
                        None if d.rate_bytes < 0.0 => {
                            format!("growing {}/s", human_bytes(-d.rate_bytes))
                        }
                        None => "not draining".to_owned(),
                    };
                    format!("{} {:3.0} %  {eta}", bar(d.done, 20), d.done * 100.0)
                }
            };
            out.push_str(&format!(
                "  {:width$}  {:6}  {:>9}  {:>10}  {:>7}  {drain}\n",
                s.name,
                s.priority,
                s.records,
                human_bytes(s.bytes as f64),
                oldest
            ));
            if s.evicted > 0 {
                out.push_str(&format!(
                    "  {:width$}  {} records dropped unsent by retention (reported as gaps)\n",
                    "", s.evicted
                ));
            }
        }
        out.push_str(&format!("dead letters: {}", self.dead_letters));
        if self.dead_letters > 0 {
            out.push_str(" (edgerelay dead-letters list)");
        }
        out.push('\n');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_progress_and_eta() {
        let t0 = Instant::now();
        let mut d = DrainTracker::default();
        assert_eq!(d.update(t0, 0), None, "nothing to drain");
        let first = d
            .update(t0 + Duration::from_secs(1), 1000)
            .expect("a backlog");
        assert_eq!(first.done, 0.0);
        let mut last = first;
        for i in 2..=6 {
            last = d
                .update(t0 + Duration::from_secs(i), 1000 - 100 * (i - 1))
                .expect("draining");
        }
        assert_eq!(last.peak_bytes, 1000);
        assert!((last.done - 0.5).abs() < 1e-9, "{last:?}");
        let eta = last.eta_seconds.expect("an ETA");
        assert!((eta - 5.0).abs() < 1.5, "500 bytes at ~100/s: {eta}");
        assert_eq!(d.update(t0 + Duration::from_secs(7), 0), None);
        let again = d
            .update(t0 + Duration::from_secs(8), 300)
            .expect("a new backlog");
        assert_eq!(again.peak_bytes, 300, "the peak starts over");
    }

    #[test]
    fn stuck_needs_backlog_link_and_silence() {
        let t0 = Instant::now();
        let s = |n| t0 + Duration::from_secs(n);
        let mut d = StuckDetector::new(Duration::from_secs(60));
        assert!(!d.update(s(0), true, true, None));
        assert!(!d.update(s(59), true, true, None));
        assert!(
            d.update(s(60), true, true, None),
            "a minute with nothing acked"
        );
        assert!(
            !d.update(s(61), true, true, Some(s(61))),
            "a PUBACK: moving"
        );
        assert!(d.update(s(121), true, true, Some(s(61))));
        assert!(
            !d.update(s(122), true, false, Some(s(61))),
            "link down: not stuck"
        );
        assert!(
            !d.update(s(130), true, true, Some(s(61))),
            "counted from coming up"
        );
        assert!(d.update(s(190), true, true, Some(s(61))));
        assert!(!d.update(s(191), false, true, Some(s(61))), "nothing waits");
    }

    #[test]
    fn renders_what_an_operator_needs() {
        let st = Status {
            gateway_id: "gw-1".into(),
            version: "0.1.0".into(),
            uptime_seconds: 3700,
            ready: false,
            not_ready: Some("uplink stuck".into()),
            stuck: true,
            buffer: BufferStatus {
                used_bytes: 2 << 20,
                budget_bytes: 512 << 20,
            },
            streams: vec![StreamStatus {
                name: "telemetry".into(),
                priority: "low".into(),
                records: 60_000,
                bytes: 2 << 20,
                oldest_age_seconds: Some(302.0),
                evicted: 0,
                drain: Some(Drain {
                    peak_bytes: 4 << 20,
                    done: 0.5,
                    rate_bytes: 100_000.0,
                    eta_seconds: Some(21.0),
                }),
            }],
            link: LinkStatus {
                source: "ebpf".into(),
                up: true,
                rtt_ms: 312.0,
                rtt_var_ms: 5.0,
                loss: 0.031,
                delivery_rate_bytes: 119_000,
            },
            uplink: UplinkStatus {
                connected: true,
                mode: "batch".into(),
                phase: "track".into(),
                rate_bytes: Some(180_000),
                window_bytes: Some(44_000),
                last_error: Some("i/o error: connection reset".into()),
                ..Default::default()
            },
            dead_letters: 2,
        };
        let text = st.render();
        for want in [
            "NOT READY: uplink stuck",
            "up 1h01m",
            "link:    up (ebpf), rtt 312 ms",
            "loss 3.1 %",
            "STUCK",
            "telemetry",
            "[##########----------]  50 %  ETA 21s",
            "5m02s",
            "last upstream error: i/o error: connection reset",
            "dead letters: 2",
        ] {
            assert!(text.contains(want), "{want:?} in\n{text}");
        }
        let json = serde_json::to_string(&st).expect("json");
        let back: Status = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, st);
    }
}
