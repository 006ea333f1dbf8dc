//! The rate controller: decides, once a second, how fast the uplink sends, how much it
//! keeps in flight, how big and how compressed its batches are, and whether the link
//! keeps up with the data — from the measured link and the backlog. Pure: no I/O, no
//! clock (time is the tick).
//!
//! Delay-based, on the bottleneck's queue: the queue delay is the recent RTT (the
//! smallest sample of the last second) above the base RTT (its minimum over
//! `RTT_WINDOW` ticks). The queue is the integral of sending faster than the link, so it
//! is a low-noise signal where the per-second delivery rate is not (loss recovery,
//! stretch ACKs). Each tick the rate is the measured delivery rate × a gain that removes
//! half of the queue above `target_queue` within the next tick (at most ×0.5 — a queue
//! of seconds drains in a few), or offers `PROBE_GAIN` more while the queue is below
//! it: the bottleneck stays busy with a queue of tens of milliseconds, never full, so
//! data sent later (high priority) is not stuck behind seconds of it. Startup doubles
//! the rate each tick until a queue forms or the link stops keeping up; a link that
//! carries every ask without a queue for `ROOM_TICKS` is asked `ROOM_GAIN` more, and
//! if it carries that too it got faster: startup again.
//!
//! Invariants: the rate never exceeds `max_rate`; a link that is down pauses sending
//! (ingest goes on into the buffer); after an outage the rate restarts from the last
//! bandwidth estimate halved and grows again (no flood); with `adapt = false` the plan
//! is the configured fixed one.

use std::collections::VecDeque;
use std::time::Duration;

use crate::link::LinkQuality;
use crate::policy::Priority;

/// Ticks the base-RTT minimum is taken over.
const RTT_WINDOW: usize = 30;
/// A queue delay this much above the target (relative to the base, plus a fixed
/// allowance) is a standing queue: startup ends there.
const INFLATION: f64 = 0.25;
const INFLATION_FIXED: Duration = Duration::from_millis(20);
/// The tick, seconds: the queue excess is removed over two of them.
const TICK: f64 = 1.0;
/// Lowest gain: a queue of seconds (a step down into a full buffer) drains at half the
/// link rate.
const MIN_GAIN: f64 = 0.5;
/// Gain while the queue is below the target: the link's use grows back from an
/// under-estimate, by at most 5 % of a tick's worth of queue.
const PROBE_GAIN: f64 = 1.05;
/// Ticks with every ask carried and no queue before the ask grows by `ROOM_GAIN`, and
/// (if that too is carried without a queue) before startup resumes: near the link's
/// rate a false "room" must cost a small queue, not a doubled rate's full buffer.
const ROOM_TICKS: u32 = 2;
const ROOM_GAIN: f64 = 1.25;
/// Growth per tick in startup.
const STARTUP_GAIN: f64 = 2.0;
/// Weight of a new delivery sample in the bandwidth estimate.
const BW_ALPHA: f64 = 0.2;
/// Slowest rate ever planned, bytes/s (a paused link is `paused`, not rate 0).
const MIN_RATE: u64 = 2_000;
/// In-flight time allowed beyond two base RTTs for retransmission stalls.
const LOSS_ALLOWANCE: Duration = Duration::from_secs(1);
/// Smallest in-flight window, bytes.
const MIN_WINDOW: u64 = 16 << 10;

/// The queue delay aimed for: enough to keep the bottleneck busy between ticks, small
/// next to the path's RTT — plus what RTT samples carry on a slow link even without a
/// queue: their frame's serialisation and the delayed ACK's second frame (47 ms each
/// at 256 kbit/s; a target below that read every sample as a queue and drained an idle
/// link).
fn target_queue(base: Duration, bw: f64) -> Duration {
    let frames = if bw > 0.0 {
        Duration::from_secs_f64((3.0 * FRAME / bw).min(1.0))
    } else {
        Duration::ZERO
    };
    (base / 10).max(Duration::from_millis(20)) + frames
}

/// A full Ethernet frame, bytes.
const FRAME: f64 = 1514.0;

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
    Track,
}

#[derive(Debug)]
pub struct Controller {
    s: ControlSettings,
    rtt: VecDeque<Duration>,
    phase: Phase,
    rate: f64,
    /// The rate of the tick before.
    prev_rate: f64,
    /// Delivery rate while data waits, smoothed: the bottleneck bandwidth estimate.
    bw: f64,
    /// Startup ticks in which the delivery rate did not grow, and the best one seen.
    stalls: u32,
    startup_best: f64,
    /// Tracking ticks in which the link carried every ask without a queue.
    room: u32,
    /// After a reconnect, startup stops at the bandwidth measured before it: the link is
    /// known, and doubling past it into a full backlog fills the bottleneck's buffer
    /// (its losses then stall the drain). More is found by tracking's room test.
    resume_at: Option<f64>,
    was_up: bool,
    degraded: Degradation,
    level: i32,
    /// The kernel's last delivery-rate readings.
    delivery: VecDeque<f64>,
}

/// The RTT a queue is judged by: the recent unsmoothed one where the link monitor has
/// it (a drained queue shows at once), else the smoothed one.
fn rtt_now(l: &LinkQuality) -> Duration {
    if l.rtt_recent.is_zero() {
        l.srtt
    } else {
        l.rtt_recent
    }
}

impl Controller {
    pub fn new(s: ControlSettings) -> Self {
        let rate = (s.initial_rate as f64).min(s.max_rate.map_or(f64::MAX, |m| m as f64));
        let level = s.level;
        Self {
            s,
            rtt: VecDeque::new(),
            phase: Phase::Startup,
            rate,
            prev_rate: rate,
            bw: 0.0,
            stalls: 0,
            startup_best: 0.0,
            room: 0,
            resume_at: None,
            was_up: false,
            degraded: Degradation::default(),
            level,
            delivery: VecDeque::new(),
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

    /// The phase, for the log: "startup", "resume" (startup back to the bandwidth known
    /// before a reconnect) or "track".
    pub fn phase(&self) -> &'static str {
        match (self.phase, self.resume_at) {
            (Phase::Startup, Some(_)) => "resume",
            (Phase::Startup, None) => "startup",
            (Phase::Track, _) => "track",
        }
    }

    /// Bottleneck bandwidth estimate, bytes/s (zero until measured).
    pub fn bandwidth(&self) -> f64 {
        self.bw
    }

    /// What the link delivered over the last tick, bytes/s: the kernel's count of
    /// bytes delivered (acknowledged or SACKed) as the median of its last three
    /// readings; PUBACKed bytes per second only without it (they stall behind every
    /// retransmission). Not the larger of the two: the maximum of two noisy readings
    /// is biased upwards, and a biased rate keeps a standing queue.
    fn delivered(&mut self, i: &Inputs) -> f64 {
        if i.link.delivery_rate > 0 {
            self.delivery.push_back(i.link.delivery_rate as f64);
            while self.delivery.len() > 3 {
                self.delivery.pop_front();
            }
        }
        let mut recent: Vec<f64> = self.delivery.iter().copied().collect();
        recent.sort_by(f64::total_cmp);
        match recent.get(recent.len() / 2) {
            Some(&kernel) if kernel > 0.0 => kernel,
            _ if i.acked_rate > 0.0 => i.acked_rate,
            _ => i.link.goodput as f64,
        }
    }

    pub fn tick(&mut self, i: &Inputs) -> Plan {
        if !self.s.adapt {
            return self.fixed();
        }
        if !i.link.up {
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
            if self.bw > 0.0 {
                self.rate = (self.bw / 2.0)
                    .max(self.s.initial_rate as f64)
                    .min(self.cap());
                self.phase = Phase::Startup;
                self.stalls = 0;
                self.startup_best = 0.0;
                // Back to the known bandwidth only where it was measured above the
                // restart rate: an estimate from an app-limited link (what it was
                // asked, not what it could do) is no ceiling.
                self.resume_at = (self.bw > self.rate).then_some(self.bw);
                self.delivery.clear();
                return self.plan(i);
            }
        }
        let sample = self.delivered(i);
        let rtt = rtt_now(&i.link);
        if !rtt.is_zero() {
            self.rtt.push_back(rtt);
            while self.rtt.len() > RTT_WINDOW {
                self.rtt.pop_front();
            }
        }
        let base = self.base_rtt();
        let queue = rtt.saturating_sub(base).as_secs_f64();
        let target = target_queue(base, self.bw.max(sample)).as_secs_f64();
        let standing = !base.is_zero()
            && queue > base.as_secs_f64() * INFLATION + INFLATION_FIXED.as_secs_f64() + target;
        // Only a link with data waiting tells its bandwidth: an idle one is app-limited.
        let link_limited = i.backlog_bytes as f64 * i.wire_ratio.clamp(0.0, 1.0) > self.rate;
        // The link carried (nearly) all of the last tick's ask — judged on this tick's
        // own reading (the median lags a one-tick ask by two ticks), against the smaller
        // of the last two asks (a tick's bytes follow the ask before in part).
        let now = (i.link.delivery_rate as f64).max(sample);
        let carried = now >= 0.9 * self.rate.min(self.prev_rate);
        self.prev_rate = self.rate;
        if link_limited && sample > 0.0 {
            self.bw = if self.bw == 0.0 || (queue > target && sample < 0.5 * self.bw) {
                // With a queue the delivery rate is the bottleneck's: a reading of half
                // the estimate is a step down, not noise (smoothed, the estimate took
                // ten seconds to follow one, and kept the queue full meanwhile).
                sample
            } else if self.resume_at.is_some() {
                // Resuming: the estimate from before the outage stands until the link
                // is full again (the first readings are a new connection's).
                self.bw
            } else {
                self.bw + BW_ALPHA * (sample - self.bw)
            };
        }
        match self.phase {
            Phase::Startup => {
                // The link is full when what it delivers stops growing (by 25 % a tick,
                // as BBR's full-pipe test) while data waits — not when it fails to carry
                // the ask: TCP's own slow start cannot in a connection's first seconds.
                if now > self.startup_best * 1.25 || !link_limited {
                    self.stalls = 0;
                } else {
                    self.stalls += 1;
                }
                self.startup_best = self.startup_best.max(now);
                if standing || self.stalls >= 3 {
                    // The link is full: from here on its delivery rate is its bandwidth.
                    self.phase = Phase::Track;
                    self.room = 0;
                    self.resume_at = None;
                    self.bw = sample.max(MIN_RATE as f64);
                    self.rate = self.bw * gain(queue, target);
                } else if link_limited {
                    // A link that carried the whole ask is measured by the ask (the
                    // delivery sample lags it by part of a tick).
                    let known = if carried {
                        self.rate.max(sample)
                    } else {
                        sample
                    };
                    let asked = known.max(self.s.initial_rate as f64) * STARTUP_GAIN;
                    // Resuming, the restart rate (half the known bandwidth) is a floor:
                    // a new connection's first readings (TCP's slow start, or only
                    // high priority's connection busy) must not talk it down.
                    self.rate = match self.resume_at {
                        Some(_) => asked.max(self.rate),
                        None => asked,
                    };
                    if let Some(known_bw) = self.resume_at.filter(|b| self.rate >= *b) {
                        self.phase = Phase::Track;
                        self.room = 0;
                        self.resume_at = None;
                        self.rate = known_bw;
                    }
                }
            }
            Phase::Track => {
                self.room = if link_limited && carried && queue < target / 2.0 {
                    self.room + 1
                } else {
                    0
                };
                if self.room > ROOM_TICKS {
                    // Every ask carried and still no queue: the link got faster.
                    self.phase = Phase::Startup;
                    self.stalls = 0;
                    self.resume_at = None;
                    self.startup_best = now;
                    self.rate *= STARTUP_GAIN;
                } else if self.room == ROOM_TICKS {
                    // Of the ask, not of a reading that may be a spike.
                    self.rate *= ROOM_GAIN;
                } else if queue < target && carried && link_limited {
                    // Below the target and the link took all of it: ask more of the ask
                    // (compounding), not of the smoothed measurement of it, which lags.
                    self.rate = (self.rate.max(self.bw) * PROBE_GAIN).min(2.0 * self.bw.max(now));
                } else if self.bw > 0.0 {
                    self.rate = self.bw * gain(queue, target);
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
        // The pacer steers the queue; the window only bounds what is in flight, and
        // must let the rate through: sized by the measured bandwidth alone it capped
        // what could be sent, which capped what was measured (startup stalled at
        // 16 KiB a round trip).
        let bw = self.rate.max(self.bandwidth());
        // Two base RTTs at the rate, and `LOSS_ALLOWANCE` more for the PUBACKs that
        // wait for a retransmission (in-order delivery) — not sized by the PUBACK round
        // trip itself, which grows with whatever the window lets queue and would feed
        // it.
        let window = ((bw * (2.0 * base.as_secs_f64() + LOSS_ALLOWANCE.as_secs_f64())) as u64)
            .max(MIN_WINDOW);
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

/// The gain on the delivery rate for a queue of `queue` seconds against a target of
/// `target`: below it, `PROBE_GAIN`; above it, what removes half the excess within the
/// next tick (the queue integrates the rate error, so correcting more per tick would
/// overshoot and oscillate), at least `MIN_GAIN`.
fn gain(queue: f64, target: f64) -> f64 {
    if queue < target {
        PROBE_GAIN
    } else {
        (1.0 - (queue - target) / (2.0 * TICK)).max(MIN_GAIN)
    }
}

#[cfg(test)]
mod tests;
