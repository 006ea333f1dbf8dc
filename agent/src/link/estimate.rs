//! Link quality from measurements: the pure core of the link monitor (no I/O, time
//! passed in).
//!
//! Inputs are transport samples — cumulative counters and the kernel's smoothed RTT of
//! the upstream connection, from the eBPF probe or TCP_INFO — and application samples
//! (PUBACK round trips, bytes acknowledged), plus connect/disconnect events.
//!
//! Invariants: counters are cumulative per connection, so a new connection (or a
//! counter going backwards) starts a new baseline instead of producing negative deltas;
//! the loss rate is retransmitted / sent segments over the last `LOSS_WINDOW`
//! segments or `LOSS_SAMPLES` readings, whichever is more (weighted by segments); `up` is false while disconnected,
//! and while data is outstanding without any acknowledgement for longer than
//! `stall_after(srtt)`.

use std::time::{Duration, Instant};

/// Where transport measurements came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Ebpf,
    TcpInfo,
    /// No transport measurements: PUBACK round trips only.
    None,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Ebpf => "ebpf",
            Source::TcpInfo => "tcp-info",
            Source::None => "none",
        }
    }
}

/// One reading of the upstream connection's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transport {
    pub source: Source,
    /// Identifies the connection (e.g. its local port): counters restart with it.
    pub connection: u64,
    pub srtt: Duration,
    pub rttvar: Duration,
    /// The smallest RTT sample of about the last second (eBPF), or the kernel's srtt
    /// as read (TCP_INFO); zero: no sample lately.
    pub rtt_recent: Duration,
    /// Segments sent, cumulative.
    pub segs_out: u64,
    /// Segments retransmitted, cumulative.
    pub retrans: u64,
    /// The kernel's delivery-rate estimate, bytes/s (0: unknown).
    pub delivery_rate: u64,
    /// Bytes the peer has received: cumulatively acknowledged plus SACKed (0: unknown).
    pub bytes_acked: u64,
    /// Segments sent and not yet acknowledged.
    pub unacked: u32,
    /// Time since the last ACK arrived (None: unknown).
    pub since_last_ack: Option<Duration>,
}

/// The link as the uplink and the rate controller see it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkQuality {
    pub source: Source,
    pub up: bool,
    /// Smoothed transport RTT (zero until measured).
    pub srtt: Duration,
    pub rttvar: Duration,
    /// The RTT now, unsmoothed: the smallest sample of about the last second (eBPF) or
    /// the kernel's smoothed RTT as last read (TCP_INFO); zero when unknown. What the
    /// rate controller judges a queue by: `srtt` lags a drained queue by seconds on a
    /// slow link.
    pub rtt_recent: Duration,
    /// Retransmitted / sent segments, smoothed (0..1).
    pub loss: f64,
    /// Connection resets and refused connections seen, cumulative.
    pub resets: u64,
    /// Delivery rate, bytes/s (kernel estimate, else acknowledged bytes per second).
    pub delivery_rate: u64,
    /// Bytes acknowledged by PUBACKs per second, smoothed.
    pub goodput: u64,
    /// PUBACK round trip, smoothed (zero until measured).
    pub app_rtt: Duration,
}

/// Weight of a new sample in the EWMAs (per sample or per second).
const ALPHA: f64 = 0.2;
/// Weight of a new RTT reading (already smoothed by the kernel).
const RTT_ALPHA: f64 = 0.5;

fn ewma(old: Option<f64>, new: f64) -> f64 {
    old.map_or(new, |o| o + ALPHA * (new - o))
}

/// Segments the loss rate is measured over, at least...
pub const LOSS_WINDOW: f64 = 2000.0;
/// ...and readings (seconds) it spans, at least.
pub const LOSS_SAMPLES: f64 = 10.0;

/// Outstanding data with no ACK for this long means the link is down.
pub fn stall_after(srtt: Duration) -> Duration {
    (srtt * 4).max(Duration::from_secs(2))
}

#[derive(Debug, Default)]
pub struct Estimator {
    source: Option<Source>,
    connected: bool,
    last: Option<Transport>,
    srtt: Option<f64>,
    rttvar: Option<f64>,
    rtt_recent: Duration,
    loss: Option<f64>,
    /// Segments counted into `loss` so far (the window fills up first).
    window_segs: f64,
    delivery_rate: u64,
    resets: u64,
    stalled: bool,
    app_rtt: Option<f64>,
    /// Transport readings since the last PUBACK arrived.
    readings_since_puback: u32,
    acked_since: u64,
    goodput: Option<f64>,
    last_tick: Option<Instant>,
    /// The last acknowledged-bytes reading: connection, bytes, when.
    acked_reading: Option<(u64, u64, Instant)>,
    /// Whether the delivery rate comes from those readings (they beat the kernel's
    /// per-ACK estimate, which swings with every stretch ACK and loss recovery).
    delivery_from_counter: bool,
}

impl Estimator {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn connected(&mut self) {
        self.connected = true;
        self.stalled = false;
    }

    /// The session ended; `reset`: by a reset or a refused connect.
    pub fn disconnected(&mut self, reset: bool) {
        self.connected = false;
        self.last = None;
        self.rtt_recent = Duration::ZERO;
        if reset {
            self.resets += 1;
        }
    }

    /// Resets counted by a probe that sees them itself (cumulative there).
    pub fn add_resets(&mut self, n: u64) {
        self.resets += n;
    }

    pub fn transport(&mut self, t: Transport) {
        self.source = Some(t.source);
        if !t.srtt.is_zero() {
            // The kernel's RTT is already smoothed per ACK: a light touch here, or a
            // queue that is gone would still look like one for seconds.
            let ewma_rtt =
                |old: Option<f64>, new: f64| old.map_or(new, |o| o + RTT_ALPHA * (new - o));
            self.srtt = Some(ewma_rtt(self.srtt, t.srtt.as_secs_f64()));
            self.rttvar = Some(ewma_rtt(self.rttvar, t.rttvar.as_secs_f64()));
        }
        self.rtt_recent = t.rtt_recent;
        if t.delivery_rate > 0 && !self.delivery_from_counter {
            self.delivery_rate = t.delivery_rate;
        }
        let srtt = Duration::from_secs_f64(self.srtt.unwrap_or(0.0));
        // PUBACKs still arriving are progress too: during a long loss recovery (a rate
        // step into a full bottleneck buffer) ACKs may yield no RTT sample — the eBPF
        // probe's evidence — for seconds while data gets through.
        self.readings_since_puback = self.readings_since_puback.saturating_add(1);
        self.stalled = t.unacked > 0
            && self.readings_since_puback > 2
            && t.since_last_ack
                .is_some_and(|since| since > stall_after(srtt));
        if let Some(prev) = self.last.filter(|p| {
            p.connection == t.connection && t.segs_out >= p.segs_out && t.retrans >= p.retrans
        }) {
            let segs = (t.segs_out - prev.segs_out) as f64;
            let retrans = (t.retrans - prev.retrans) as f64;
            if segs > 0.0 {
                // Loss over the last LOSS_WINDOW segments or LOSS_SAMPLES readings,
                // whichever holds more (everything until then): a 2 % rate needs
                // thousands of segments to be measured to within a point, and a fast
                // link's last second alone is noisy.
                self.window_segs += segs;
                let span = LOSS_WINDOW.max(LOSS_SAMPLES * segs);
                let a = (segs / self.window_segs.min(span)).min(1.0);
                let rate = (retrans / segs).min(1.0);
                self.loss = Some(self.loss.map_or(rate, |l| l + a * (rate - l)));
            }
        }
        self.last = Some(t);
    }

    /// A reading of the connection's acknowledged bytes (TCP_INFO, whatever the source
    /// of the rest: the eBPF probe's counters move only with RTT samples, which a loss
    /// recovery starves): the delivery rate is their growth over the time between
    /// readings of one connection.
    pub fn acked_bytes(&mut self, connection: u64, bytes_acked: u64, now: Instant) {
        if bytes_acked == 0 {
            return;
        }
        if let Some((c, bytes, at)) = self.acked_reading {
            let secs = now.saturating_duration_since(at).as_secs_f64();
            if c == connection && bytes_acked >= bytes && secs >= 0.2 {
                self.delivery_rate = ((bytes_acked - bytes) as f64 / secs) as u64;
                self.delivery_from_counter = true;
            } else if c == connection && secs < 0.2 {
                return; // too close to the last one to time
            }
        }
        self.acked_reading = Some((connection, bytes_acked, now));
    }

    /// A PUBACK arrived `rtt` after its publish was queued, acknowledging `bytes`.
    pub fn puback(&mut self, rtt: Duration, bytes: usize) {
        self.app_rtt = Some(ewma(self.app_rtt, rtt.as_secs_f64()));
        self.acked_since += bytes as u64;
        self.readings_since_puback = 0;
        if self.source.is_none() || self.source == Some(Source::None) {
            // Without transport data, PUBACKs are the only evidence of progress.
            self.stalled = false;
        }
    }

    /// Close a measurement interval (once a second): goodput from the bytes acknowledged.
    pub fn tick(&mut self, now: Instant) {
        if let Some(prev) = self.last_tick {
            let secs = now.saturating_duration_since(prev).as_secs_f64();
            if secs > 0.0 {
                self.goodput = Some(ewma(self.goodput, self.acked_since as f64 / secs));
            }
        }
        self.acked_since = 0;
        self.last_tick = Some(now);
    }

    pub fn quality(&self) -> LinkQuality {
        let loss = self.loss.unwrap_or(0.0).clamp(0.0, 1.0);
        let goodput = self.goodput.unwrap_or(0.0) as u64;
        LinkQuality {
            source: self.source.unwrap_or(Source::None),
            up: self.connected && !self.stalled,
            srtt: Duration::from_secs_f64(self.srtt.unwrap_or(0.0)),
            rttvar: Duration::from_secs_f64(self.rttvar.unwrap_or(0.0)),
            rtt_recent: self.rtt_recent,
            loss,
            resets: self.resets,
            delivery_rate: if self.delivery_rate > 0 {
                self.delivery_rate
            } else {
                goodput
            },
            goodput,
            app_rtt: Duration::from_secs_f64(self.app_rtt.unwrap_or(0.0)),
        }
    }
}

#[cfg(test)]
mod tests;
