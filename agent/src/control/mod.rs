//! The rate controller: decides, once a second, how fast the uplink sends, how much it
//! keeps in flight, how big and how compressed its batches are, and whether the link
//! keeps up with the data — from the measured link and the backlog. Pure: no I/O, no
//! clock (time is the tick).
//!
//! BBR-like: the bottleneck bandwidth is the maximum delivery rate of the last
//! `BW_WINDOW` ticks, the base RTT the minimum smoothed RTT of the last `RTT_WINDOW`
//! ticks. The send rate is a gain × the bandwidth: a short probe above it (to find
//! more), a drain below it (to empty the queue the probe made), 1 otherwise. RTT above
//! the base by more than `INFLATION` means a standing queue — the gain is held below 1
//! until it is gone: the controller never keeps the bottleneck's buffer full, so data
//! sent later (high priority) is not stuck behind seconds of queue.
//!
//! Invariants: the rate never exceeds `max_rate`; a link that is down pauses sending
//! (ingest goes on into the buffer); after an outage the rate restarts from the last
//! bandwidth estimate halved and grows again (no flood); with `adapt = false` the plan
//! is the configured fixed one.

use std::collections::VecDeque;
use std::time::Duration;

use crate::link::LinkQuality;
use crate::policy::Priority;

/// Ticks (seconds) the bandwidth maximum is taken over.
const BW_WINDOW: usize = 8;
/// Ticks the base-RTT minimum is taken over.
const RTT_WINDOW: usize = 30;
/// A smoothed RTT this much above the base (relative, plus a fixed allowance) is a
/// standing queue.
const INFLATION: f64 = 0.25;
const INFLATION_FIXED: Duration = Duration::from_millis(20);
/// Gain while a standing queue persists: low enough to empty a 2 s bottleneck buffer
/// within seconds.
const DRAIN_GAIN: f64 = 0.5;
/// While a standing queue persists, the bandwidth is re-measured this often (ticks).
const REMEASURE_TICKS: u32 = 8;
/// Gains of the probe-bandwidth cycle, one per tick.
const CYCLE: [f64; 4] = [1.25, 0.8, 1.0, 1.0];
/// Growth per tick while the bandwidth is unknown (startup).
const STARTUP_GAIN: f64 = 2.0;
/// Slowest rate ever planned, bytes/s (a paused link is `paused`, not rate 0).
const MIN_RATE: u64 = 2_000;
/// In-flight time allowed beyond two base RTTs for retransmission stalls.
const LOSS_ALLOWANCE: Duration = Duration::from_secs(1);
/// Smallest in-flight window, bytes.
const MIN_WINDOW: u64 = 16 << 10;

/// How the controller is set up (from `[rate]`, `[upstream]`, `[compression]`).
#[derive(Debug, Clone, PartialEq)]
pub struct ControlSettings {
    pub adapt: bool,
    /// Hard cap, bytes/s on the wire.
    pub max_rate: Option<u64>,
    /// The configured batch size: the largest batch the controller plans.
    pub batch_size: usize,
    pub linger: Duration,
    /// zstd level; `auto_level`: the controller picks it.
    pub level: i32,
    pub auto_level: bool,
    /// Rate before anything is measured, bytes/s.
    pub initial_rate: u64,
}

/// What the controller sees each tick.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Inputs {
    pub link: LinkQuality,
    /// Bytes waiting in the buffer (stored size).
    pub backlog_bytes: u64,
    /// Stored bytes arriving per second (all streams)...
    pub ingest_rate: f64,
    /// ...and of it, those of low-priority streams.
    pub ingest_low: f64,
    /// Wire bytes per stored byte of recent batches (compression), 0..1.
    pub wire_ratio: f64,
    /// Wire bytes per record of recent batches.
    pub wire_per_record: f64,
    /// CPU the agent used over the last tick, in cores.
    pub cpu: f64,
    /// Wire bytes the broker acknowledged (PUBACK) over the last tick, per second: the
    /// delivery rate in the units the rate is planned in (0: none acknowledged).
    pub acked_rate: f64,
}

/// What the uplink does until the next tick.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    /// Send nothing new (the link is down).
    pub paused: bool,
    /// Wire bytes per second.
    pub rate: u64,
    /// Wire bytes allowed in flight (published, not yet acknowledged).
    pub window: u64,
    pub batch_size: usize,
    pub linger: Duration,
    pub level: i32,
    /// Which priorities the link cannot keep up with: their degradable topics are
    /// sampled or conflated (`[[policy]] degrade`).
    pub degraded: Degradation,
}

/// Degradation state per priority. High is never degraded; low goes first, normal only
/// when even without low the link cannot carry what arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Degradation {
    pub normal: bool,
    pub low: bool,
}

impl Degradation {
    pub fn of(self, p: Priority) -> bool {
        match p {
            Priority::High => false,
            Priority::Normal => self.normal,
            Priority::Low => self.low,
        }
    }

    pub fn any(self) -> bool {
        self.normal || self.low
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Startup,
    Probe,
}

#[derive(Debug)]
pub struct Controller {
    s: ControlSettings,
    bw: VecDeque<f64>,
    rtt: VecDeque<Duration>,
    phase: Phase,
    cycle: usize,
    rate: f64,
    startup_stalls: u32,
    last_bw: f64,
    was_up: bool,
    degraded: Degradation,
    level: i32,
    /// Consecutive ticks with an inflated RTT.
    inflated_ticks: u32,
    /// The bandwidth estimate when the last probe started.
    probe_base: f64,
    /// The kernel's last delivery-rate readings.
    delivery: VecDeque<f64>,
    /// Ticks left to send below the bandwidth to empty a standing queue.
    drain_left: u32,
}

fn max_of(v: &VecDeque<f64>) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

impl Controller {
    pub fn new(s: ControlSettings) -> Self {
        let rate = (s.initial_rate as f64).min(s.max_rate.map_or(f64::MAX, |m| m as f64));
        let level = s.level;
        Self {
            s,
            bw: VecDeque::new(),
            rtt: VecDeque::new(),
            phase: Phase::Startup,
            cycle: 0,
            rate,
            startup_stalls: 0,
            last_bw: 0.0,
            was_up: false,
            degraded: Degradation::default(),
            level,
            inflated_ticks: 0,
            probe_base: 0.0,
            delivery: VecDeque::new(),
            drain_left: 0,
        }
    }

    fn cap(&self) -> f64 {
        self.s.max_rate.map_or(f64::MAX, |m| m as f64)
    }

    /// The plan when nothing adapts: configured batches, the cap as the rate.
    fn fixed(&self) -> Plan {
        Plan {
            paused: false,
            rate: self.s.max_rate.unwrap_or(u64::MAX),
            window: u64::MAX,
            batch_size: self.s.batch_size,
            linger: self.s.linger,
            level: self.s.level,
            degraded: Degradation::default(),
        }
    }

    /// The plan before the first tick: the initial rate (or the fixed plan).
    pub fn initial(&self) -> Plan {
        if !self.s.adapt {
            return self.fixed();
        }
        Plan {
            paused: false,
            rate: self.rate.min(self.cap()) as u64,
            window: u64::MAX,
            batch_size: self.s.batch_size,
            linger: self.s.linger,
            level: self.level,
            degraded: Degradation::default(),
        }
    }

    /// Base RTT: the minimum of the window (zero until measured).
    pub fn base_rtt(&self) -> Duration {
        self.rtt.iter().copied().min().unwrap_or(Duration::ZERO)
    }

    /// Bottleneck bandwidth estimate, bytes/s (zero until measured).
    pub fn bandwidth(&self) -> f64 {
        max_of(&self.bw)
    }

    pub fn tick(&mut self, i: &Inputs) -> Plan {
        if !self.s.adapt {
            return self.fixed();
        }
        let up = i.link.up;
        if !up {
            self.was_up = false;
            return Plan {
                paused: true,
                ..self.plan(i)
            };
        }
        if !self.was_up {
            // (Re)connected: restart below what the link did before, then grow from
            // the next tick on.
            self.was_up = true;
            let known = self.bandwidth();
            if known > 0.0 {
                self.rate = (known / 2.0)
                    .max(self.s.initial_rate as f64)
                    .min(self.cap());
                self.phase = Phase::Startup;
                self.startup_stalls = 0;
                self.last_bw = 0.0;
                self.bw.clear();
                return self.plan(i);
            }
        }
        // PUBACKed bytes per second are in the plan's units but stall behind a
        // retransmission; the kernel's delivery rate does not, but it spikes (stretch
        // ACKs after a queue): take the larger, the kernel's as the median of its
        // last three readings.
        self.delivery.push_back(i.link.delivery_rate as f64);
        while self.delivery.len() > 3 {
            self.delivery.pop_front();
        }
        let mut recent: Vec<f64> = self.delivery.iter().copied().collect();
        recent.sort_by(f64::total_cmp);
        let delivery = recent[recent.len() / 2];
        let mut sample = if i.acked_rate > 0.0 {
            i.acked_rate.max(delivery)
        } else {
            delivery.max(i.link.goodput as f64)
        };
        // A queue as long again as the path (the fixed allowance keeps a fast LAN's
        // microsecond jitter from counting), seen on the last tick too.
        let severe = self.inflated_ticks >= 1
            && !self.base_rtt().is_zero()
            && i.link.srtt > self.base_rtt() * 2 + INFLATION_FIXED;
        if (self.inflated_ticks == 1 || self.drain_left > 0 || severe) && self.bandwidth() > 0.0 {
            // A queue being found or drained: the link carries no more than it did.
            // (Afterwards the smoothed RTT lags the emptied queue by seconds; samples
            // count again, or a low re-measurement would stick until it caught up.)
            sample = sample.min(self.bandwidth());
        }
        if sample > 0.0 {
            self.bw.push_back(sample);
            while self.bw.len() > BW_WINDOW {
                self.bw.pop_front();
            }
        }
        if !i.link.srtt.is_zero() {
            self.rtt.push_back(i.link.srtt);
            while self.rtt.len() > RTT_WINDOW {
                self.rtt.pop_front();
            }
        }
        let base = self.base_rtt();
        let inflated = !base.is_zero()
            && i.link.srtt.as_secs_f64()
                > base.as_secs_f64() * (1.0 + INFLATION) + INFLATION_FIXED.as_secs_f64();
        self.inflated_ticks = if inflated { self.inflated_ticks + 1 } else { 0 };
        if self.inflated_ticks >= 2 && (self.inflated_ticks - 2).is_multiple_of(REMEASURE_TICKS) {
            // A queue that persists while less is acknowledged than the estimate says
            // means the bottleneck got slower: while the queue exists the acknowledged
            // rate *is* the bottleneck rate; forget the older maxima. Once per episode
            // (then every few ticks): re-measured every tick, the drain's own lower
            // rate would be taken for the link's and the rate would spiral down.
            // Right after a step down both readings still carry data from before it
            // (PUBACKs of batches already through, the kernel's samples of a busy
            // second): take the smaller. An under-estimate costs a few seconds until
            // the next probe finds the room; an over-estimate keeps the queue.
            // (The kernel reports ~1 B/s for an idle or application-limited moment:
            // a reading far below what was acknowledged is no measurement.)
            let raw = i.link.delivery_rate as f64;
            let measured = match (i.acked_rate > 0.0, raw > 0.25 * i.acked_rate) {
                (true, true) => i.acked_rate.min(raw),
                (true, false) => i.acked_rate,
                _ => sample,
            };
            if measured > 0.0 && measured < 0.9 * self.bandwidth() {
                self.bw.clear();
                self.bw.push_back(measured);
            }
            // Drain for as long as the queue takes to empty at DRAIN_GAIN, not for as
            // long as the smoothed RTT says: it lags the queue by seconds on a slow
            // link, and draining on would take the drain's own rate for the link's.
            let excess = i.link.srtt.saturating_sub(self.base_rtt()).as_secs_f64();
            self.drain_left =
                ((excess / (1.0 - DRAIN_GAIN)).ceil() as u32).clamp(1, REMEASURE_TICKS);
        }
        let bw = self.bandwidth();
        // Only a link with data waiting tells its bandwidth: an idle one is app-limited.
        let link_limited = i.backlog_bytes as f64 * i.wire_ratio.clamp(0.0, 1.0) > self.rate;
        match self.phase {
            Phase::Startup => {
                if bw > self.last_bw * 1.25 || !link_limited {
                    self.startup_stalls = 0;
                } else {
                    self.startup_stalls += 1;
                }
                self.last_bw = self.last_bw.max(bw);
                if inflated || self.startup_stalls >= 2 {
                    self.phase = Phase::Probe;
                    self.cycle = 1; // start by draining what startup queued
                    self.rate = bw.max(MIN_RATE as f64);
                } else if link_limited {
                    // Twice what the link was measured to carry, as BBR's startup: growing
                    // with the measurements, never running off ahead of them.
                    self.rate = if bw > 0.0 {
                        bw.max(self.last_bw) * STARTUP_GAIN
                    } else {
                        self.rate * STARTUP_GAIN
                    };
                }
            }
            Phase::Probe => {
                // The last probe was delivered in full without a queue: the link has
                // room to spare; find it quickly again.
                // Judged on this tick's own readings: the smoothed ones dilute a
                // one-tick probe below any threshold.
                let probed = self.cycle % CYCLE.len() == 1;
                let now = sample.max(i.link.delivery_rate as f64);
                if probed && !inflated && link_limited && now >= self.probe_base * 1.1 {
                    self.phase = Phase::Startup;
                    self.startup_stalls = 0;
                    self.last_bw = now;
                    self.rate = now * STARTUP_GAIN;
                } else {
                    let mut gain = CYCLE[self.cycle % CYCLE.len()];
                    if gain > 1.0 {
                        self.probe_base = bw;
                    }
                    self.cycle += 1;
                    if inflated {
                        // Drain the queue found; then hold at the bandwidth (no probing
                        // into a queue that may still be there).
                        if self.drain_left > 0 || severe {
                            self.drain_left = self.drain_left.saturating_sub(1);
                            gain = gain.min(DRAIN_GAIN);
                        } else {
                            gain = gain.min(1.0);
                        }
                    }
                    if bw > 0.0 {
                        self.rate = bw * gain;
                    }
                }
            }
        }
        self.rate = self.rate.max(MIN_RATE as f64).min(self.cap());
        self.update_degraded(i);
        self.update_level(i, link_limited);
        self.plan(i)
    }

    /// A priority is degraded when what arrives for it and above (as wire bytes)
    /// exceeds 90 % of what the link carries; cleared below 70 % (hysteresis, so the
    /// state does not flap with every tick's noise).
    fn update_degraded(&mut self, i: &Inputs) {
        let ratio = i.wire_ratio.clamp(0.0, 1.0);
        let capacity = self.bandwidth().min(self.cap());
        if capacity <= 0.0 {
            return;
        }
        let flip = |on: &mut bool, arriving: f64| {
            if arriving > capacity * 0.9 {
                *on = true;
            } else if arriving < capacity * 0.7 {
                *on = false;
            }
        };
        flip(&mut self.degraded.low, i.ingest_rate * ratio);
        flip(
            &mut self.degraded.normal,
            (i.ingest_rate - i.ingest_low).max(0.0) * ratio,
        );
    }

    /// Higher when the link is the bottleneck and the CPU is idle, lower when CPU-bound.
    fn update_level(&mut self, i: &Inputs, link_limited: bool) {
        if !self.s.auto_level {
            self.level = self.s.level;
            return;
        }
        let slow = self.rate < 64_000.0;
        self.level = if i.cpu > 0.8 {
            1
        } else if link_limited && i.cpu < 0.5 {
            if slow {
                9
            } else {
                6
            }
        } else {
            3
        };
    }

    fn plan(&self, i: &Inputs) -> Plan {
        let base = self.base_rtt().max(Duration::from_millis(10));
        // What the link was measured to carry, not what startup or a probe asks of it:
        // a window sized by the asking lets the asking queue up.
        let bw = if self.bandwidth() > 0.0 {
            self.bandwidth()
        } else {
            self.rate
        };
        // Two bandwidth-delay products of the transport — and enough for the PUBACK
        // round trip, which loss (in-order delivery waits for retransmissions) and big
        // batches make longer. But the PUBACK round trip also grows with whatever the
        // window lets queue in the socket (the transport's RTT does not see that
        // queue): sized by it alone, the window would feed itself. So that part is
        // capped at `LOSS_ALLOWANCE` over two base RTTs — what a high-priority publish
        // may find ahead of it.
        let bdp2 = 2.0 * bw * base.as_secs_f64();
        let for_pubacks = (1.5 * self.rate * i.link.app_rtt.as_secs_f64())
            .min(bw * (2.0 * base.as_secs_f64() + LOSS_ALLOWANCE.as_secs_f64()));
        let window = (bdp2.max(for_pubacks) as u64).max(MIN_WINDOW);
        // A batch carries about half an RTT (at least 150 ms, at most 1 s) of link
        // time: big batches on slow links compress better, but a high-priority publish
        // may find one just queued ahead of it.
        // By the base RTT: a queue must not make batches (and the next queue) bigger.
        let batch_time = (base / 2).clamp(Duration::from_millis(150), Duration::from_secs(1));
        let per_record = if i.wire_per_record > 0.0 {
            i.wire_per_record
        } else {
            30.0
        };
        // Sized by what the link carries, not by a probe's or startup's rate.
        let carried = if self.bandwidth() > 0.0 {
            self.rate.min(self.bandwidth())
        } else {
            self.rate
        };
        let records = (carried * batch_time.as_secs_f64() / per_record) as usize;
        Plan {
            paused: false,
            rate: self.rate.min(self.cap()) as u64,
            window,
            batch_size: records.clamp(10, self.s.batch_size.max(10)),
            linger: (batch_time / 2).clamp(
                Duration::from_millis(50),
                self.s.linger.max(Duration::from_millis(50)),
            ),
            level: self.level,
            degraded: self.degraded,
        }
    }
}

#[cfg(test)]
mod tests;
