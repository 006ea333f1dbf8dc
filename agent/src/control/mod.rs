//! The rate controller: decides, once a second, how fast the uplink sends, how much it
//! may have in flight, how big and how compressed its batches are, and whether the link
//! keeps up with the data — from the measured link and the backlog. Pure: no I/O, no
//! clock (time is the tick).
//!
//! Two loops. The fast one is the in-flight window, applied by the uplink at every
//! write against the kernel's own count of what is in the pipe (TCP_INFO: sent, not
//! delivered, not lost) plus what waits unsent: the bandwidth estimate × (base RTT +
//! a small target queue). A window of one bandwidth-delay product and a little more
//! keeps the bottleneck busy and its queue at the target whatever the per-second
//! readings do, and reacts within a round trip — a once-a-second rate loop sees a
//! queue a second and a round trip late, so it overshoots and idles in turn (the
//! first controllers here carried 83–97 % of a lossy link). Holes do not stall it:
//! SACKed and lost data are not in the pipe, and PUBACKs delayed behind them (or by
//! the broker's Nagle) do not count.
//!
//! The slow loop, here, is the estimate the window is sized by. The bandwidth is the
//! largest delivery rate of the last `BW_TICKS` seconds in which data waited (a loss
//! recovery's dip is no measurement of the link; the largest reading is): the window
//! then always lets the link's rate through, and a reading above it — the link
//! carrying more than the estimate, which the window's target queue allows by
//! `target/base` a round trip — raises it. An estimate too high shows as a standing
//! queue (RTT inflation): delivery under a queue is the bottleneck's rate exactly, so
//! two ticks of it replace the estimate (a step down). Startup doubles window and pace
//! each tick until delivery stops growing (BBR's full-pipe test) or a queue stands; a
//! link that grows 15 % twice in a row while tracking got faster: startup again. The
//! pacer runs `PACING_GAIN` above the estimate so the window, not the pace, binds; it
//! smooths bursts and holds the hard cap.
//!
//! Invariants: the rate never exceeds `max_rate`; a link that is down pauses sending
//! (ingest goes on into the buffer); after an outage sending resumes at the bandwidth
//! known before it, window-bound (no flood: at most a bandwidth-delay product and the
//! target queue are ever in flight); with `adapt = false` the plan is the configured
//! fixed one.

use std::collections::VecDeque;
use std::time::Duration;

use crate::link::LinkQuality;
use crate::policy::Priority;

/// Ticks the base-RTT minimum is taken over.
const RTT_WINDOW: usize = 30;
/// Ticks the bandwidth maximum is taken over.
const BW_TICKS: usize = 10;
/// A queue delay this much above the target (relative to the base, plus a fixed
/// allowance) is a standing queue: the estimate is too high (or startup is over).
const INFLATION: f64 = 0.25;
const INFLATION_FIXED: Duration = Duration::from_millis(20);
/// Ticks of a standing queue before the estimate is replaced by what the link
/// delivers under it (one may be a burst the window already absorbs).
const QUEUED_TICKS: u32 = 2;
/// Window and pace above the estimate in startup, per tick.
const STARTUP_GAIN: f64 = 2.0;
/// Startup ends when delivery has not grown by this much for `STARTUP_STALLS` ticks.
const STARTUP_GROWTH: f64 = 1.25;
const STARTUP_STALLS: u32 = 3;
/// Tracking: an estimate this much above the one `GROWTH_TICKS` ago means the link got
/// faster (the window lets delivery grow by its target queue a round trip, the pace by
/// `PACING_GAIN` a tick, where the link has room): startup again. Over two ticks, as a
/// tick's reading lags the plan before it and alternates.
const TRACK_GROWTH: f64 = 1.3;
const GROWTH_TICKS: usize = 2;
/// Pace above the estimate while tracking: the window binds, the pacer only smooths.
const PACING_GAIN: f64 = 1.5;
/// Tracking: after this many ticks without an RTT sample near the base (a queue that
/// never drains hides the base, and the minimum over `RTT_WINDOW` then creeps up with
/// it, and the window with that), one tick with the window at `BASE_PROBE_GAIN` of the
/// bandwidth-delay product drains the queue and shows the base again (BBR's ProbeRTT,
/// lighter). Longer than the kernel BBR's own 10 s: where the upstream socket runs BBR,
/// its ProbeRTT drains the queue anyway and this never fires.
const BASE_PROBE_TICKS: u32 = 20;
const BASE_PROBE_GAIN: f64 = 0.9;

/// Slowest rate ever planned, bytes/s (a paused link is `paused`, not rate 0).
const MIN_RATE: u64 = 2_000;
/// Smallest in-flight window, bytes: four full segments.
pub const MIN_WINDOW: u64 = 4 * 1448;

/// The queue delay aimed for: enough to keep the bottleneck busy between ACKs (delayed
/// and stretch ACKs, a lost segment not yet marked lost), small next to the path's
/// RTT — plus what RTT samples carry on a slow link even without a queue: their
/// frame's serialisation and the delayed ACK's second frame (47 ms each at
/// 256 kbit/s; a target below that read every sample as a queue).
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
    /// Bytes the connections may hold in the pipe (sent, not yet delivered, not lost)
    /// and queued unsent, together: the in-flight window (`u64::MAX`: none).
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
    /// Delivery readings of the last `BW_TICKS` ticks in which data waited.
    delivery: VecDeque<f64>,
    phase: Phase,
    /// Bottleneck bandwidth estimate, bytes/s (0: not measured yet).
    bw: f64,
    /// Pace, bytes/s, and the gain the window is sized with.
    rate: f64,
    window_gain: f64,
    /// Startup: ticks in which delivery did not grow, and the best reading.
    stalls: u32,
    startup_best: f64,
    /// The estimate at the last `GROWTH_TICKS` ticks, oldest first.
    history: VecDeque<f64>,
    /// Ticks since an RTT sample near the base; whether this tick drains for one.
    since_base: u32,
    base_probe: bool,
    /// Consecutive ticks with a standing queue, and the readings taken under it.
    queued: u32,
    under_queue: f64,
    was_up: bool,
    degraded: Degradation,
    level: i32,
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
            delivery: VecDeque::new(),
            phase: Phase::Startup,
            bw: 0.0,
            rate,
            window_gain: STARTUP_GAIN,
            stalls: 0,
            startup_best: 0.0,
            history: VecDeque::new(),
            since_base: 0,
            base_probe: false,
            queued: 0,
            under_queue: 0.0,
            was_up: false,
            degraded: Degradation::default(),
            level,
        }
    }

    /// A new hard cap (a reloaded `[rate] max_rate`), bytes/s; applies from the next
    /// tick.
    pub fn set_max_rate(&mut self, max_rate: Option<u64>) {
        self.s.max_rate = max_rate;
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

    /// The phase, for the log: "startup", "track", or "base-probe" (a tick draining
    /// the queue to see the base RTT).
    pub fn phase(&self) -> &'static str {
        match self.phase {
            Phase::Startup => "startup",
            Phase::Track if self.base_probe => "base-probe",
            Phase::Track => "track",
        }
    }

    /// Bottleneck bandwidth estimate, bytes/s (zero until measured).
    pub fn bandwidth(&self) -> f64 {
        self.bw
    }

    /// What the link delivered over the last tick, bytes/s: the kernel's count of bytes
    /// delivered (acknowledged or SACKed); PUBACKed bytes per second only without it
    /// (they stall behind every retransmission, and behind the broker's Nagle).
    fn delivered(i: &Inputs) -> f64 {
        if i.link.delivery_rate > 0 {
            i.link.delivery_rate as f64
        } else if i.acked_rate > 0.0 {
            i.acked_rate
        } else {
            i.link.goodput as f64
        }
    }

    /// The bandwidth to plan with: the estimate, or the initial rate before one — and
    /// in startup never less than that (a connection's first readings are no ceiling).
    fn known(&self) -> f64 {
        match self.phase {
            _ if self.bw <= 0.0 => self.s.initial_rate as f64,
            Phase::Startup => self.bw.max(self.s.initial_rate as f64),
            Phase::Track => self.bw,
        }
    }

    fn enter_startup(&mut self, best: f64) {
        self.phase = Phase::Startup;
        self.stalls = 0;
        self.startup_best = best;
    }

    fn enter_track(&mut self) {
        self.phase = Phase::Track;
        self.history.clear();
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
            // (Re)connected. This tick's reading is a new connection's first moments,
            // no measurement of the link. A known link resumes at its bandwidth, bound
            // by the window (at most its bandwidth-delay product and the target queue
            // in flight); an unknown one starts up.
            self.was_up = true;
            self.queued = 0;
            if self.bw > 0.0 {
                self.delivery.clear();
                self.delivery.push_back(self.bw);
                self.enter_track();
                self.rate = (self.bw * PACING_GAIN).max(MIN_RATE as f64).min(self.cap());
                self.window_gain = 1.0;
            }
            return self.plan(i);
        }
        let sample = Self::delivered(i);
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
        self.since_base = if !rtt.is_zero() && queue <= target / 2.0 {
            0
        } else {
            self.since_base + 1
        };
        // Only a link with data waiting tells its bandwidth: an idle one is app-limited.
        let link_limited = i.backlog_bytes as f64 * i.wire_ratio.clamp(0.0, 1.0) > self.rate;
        if link_limited && sample > 0.0 {
            self.delivery.push_back(sample);
            while self.delivery.len() > BW_TICKS {
                self.delivery.pop_front();
            }
            if standing {
                self.queued += 1;
                self.under_queue = if self.queued == 1 {
                    sample
                } else {
                    self.under_queue.max(sample)
                };
            } else {
                self.queued = 0;
            }
        } else if !standing {
            self.queued = 0;
        }
        if self.queued >= QUEUED_TICKS {
            // The link has been full for two ticks: what it delivered is its rate.
            self.delivery.clear();
            self.delivery.push_back(self.under_queue);
            self.queued = 0;
            if self.phase == Phase::Startup {
                self.enter_track();
            }
        }
        self.bw = self.delivery.iter().copied().fold(0.0, f64::max);
        match self.phase {
            Phase::Startup => {
                if sample > self.startup_best * STARTUP_GROWTH || !link_limited {
                    self.stalls = 0;
                } else {
                    self.stalls += 1;
                }
                self.startup_best = self.startup_best.max(sample);
                if self.stalls >= STARTUP_STALLS || (standing && self.bw > 0.0) {
                    self.enter_track();
                }
            }
            Phase::Track => {
                let grew = self.history.len() == GROWTH_TICKS
                    && self
                        .history
                        .front()
                        .is_some_and(|&b| b > 0.0 && self.bw > b * TRACK_GROWTH);
                self.history.push_back(self.bw);
                while self.history.len() > GROWTH_TICKS {
                    self.history.pop_front();
                }
                if grew && link_limited {
                    self.enter_startup(sample);
                }
            }
        }
        self.base_probe = self.phase == Phase::Track && self.since_base >= BASE_PROBE_TICKS;
        if self.base_probe {
            self.since_base = 0;
        }
        (self.rate, self.window_gain) = match self.phase {
            Phase::Startup => (self.known() * STARTUP_GAIN, STARTUP_GAIN),
            Phase::Track => (self.known() * PACING_GAIN, 1.0),
        };
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

    /// The window in bytes: the estimate (in startup, doubled) × (base RTT + the target
    /// queue); none until a base RTT is known. Capped links: sized by the cap.
    fn window(&self) -> u64 {
        let base = self.base_rtt();
        if base.is_zero() {
            return u64::MAX;
        }
        let bw = self.known().min(self.cap()) * self.window_gain;
        let time = if self.base_probe {
            base.mul_f64(BASE_PROBE_GAIN)
        } else {
            base + target_queue(base, self.bw)
        };
        ((bw * time.as_secs_f64()) as u64).max(MIN_WINDOW)
    }

    fn plan(&self, i: &Inputs) -> Plan {
        let base = self.base_rtt().max(Duration::from_millis(10));
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
        // Sized by what the link carries, not by startup's pace.
        let carried = if self.bw > 0.0 {
            self.rate.min(self.bw)
        } else {
            self.rate
        };
        let mut records = (carried * batch_time.as_secs_f64() / per_record) as usize;
        // While the link keeps up (nothing waits beyond what is in flight) the
        // bandwidth estimate is only what the data needed, and sizing batches by it
        // would send small batches often: the bytes a metered link pays for. Then a
        // batch takes what arrives within the configured linger — at most linger's
        // worth of link time, since the link carries more than arrives. With a backlog
        // the link-time bound alone holds, so a high-priority publish never waits
        // behind a long batch.
        let waiting = i.backlog_bytes as f64 * i.wire_ratio.clamp(0.0, 1.0);
        if waiting <= self.rate.min(carried.max(1.0)) {
            let arriving = i.ingest_rate * i.wire_ratio.clamp(0.0, 1.0) / per_record;
            records = records.max((arriving * self.s.linger.as_secs_f64()) as usize);
        }
        Plan {
            paused: false,
            rate: self.rate.min(self.cap()) as u64,
            window: self.window(),
            batch_size: records.clamp(10, self.s.batch_size.max(10)),
            // The operator's latency budget for a partial batch: lingering less only
            // buys latency nobody asked for with bytes on the link.
            linger: self.s.linger.max(Duration::from_millis(50)),
            level: self.level,
            degraded: self.degraded,
        }
    }
}

#[cfg(test)]
mod tests;
