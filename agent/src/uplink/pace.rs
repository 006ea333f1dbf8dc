//! Applying the rate controller's plan to the uplink: a token bucket for the send rate,
//! an in-flight window in bytes, the pause while the link is down (`Pacer`), and the
//! once-a-second gathering of what the controller needs (`Adapter`).
//!
//! Invariants: the pacer only delays — it never drops or reorders; what it lets through
//! on average does not exceed the plan's rate (tokens may go negative by one publish,
//! a debt repaid before the next); with a rate of `u64::MAX` (fixed, uncapped) it never
//! waits.

use std::time::{Duration, Instant};

use super::conn::Shallow;
use crate::control::{ControlSettings, Controller, Inputs, Plan};
use crate::link::LinkQuality;
use crate::store::{StoreStats, StreamId};

/// The window over what awaits PUBACK where the kernel's count is missing: this many
/// windows, and a second at the rate.
const PUBACK_WINDOW_GAIN: u64 = 2;

/// Link time the sockets may hold unsent, seconds, and bytes at least.
const SHALLOW_TIME: f64 = 0.02;
const SHALLOW_MIN: f64 = 8192.0;

/// Rate, window and pause for one session.
#[derive(Debug)]
pub struct Pacer {
    plan: Plan,
    tokens: f64,
    refilled: Instant,
    inflight_bytes: u64,
}

impl Pacer {
    /// Wire bytes published and not yet acknowledged.
    pub fn in_flight(&self) -> u64 {
        self.inflight_bytes
    }

    pub fn new(plan: Plan) -> Self {
        Self {
            plan,
            tokens: 0.0,
            refilled: Instant::now(),
            inflight_bytes: 0,
        }
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn set_plan(&mut self, plan: Plan) {
        self.refill(Instant::now());
        self.plan = plan;
    }

    fn unlimited(&self) -> bool {
        self.plan.rate == u64::MAX
    }

    /// A burst of about 100 ms at the rate (at least 8 KiB): smooth enough for the
    /// bottleneck's queue, coarse enough for one timer per burst.
    fn burst(&self) -> f64 {
        (self.plan.rate as f64 / 10.0).max(8192.0)
    }

    fn refill(&mut self, now: Instant) {
        if self.unlimited() {
            return;
        }
        let dt = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + dt * self.plan.rate as f64).min(self.burst());
        self.refilled = now;
    }

    /// The in-flight window, bytes (None: none applies).
    pub fn window(&self) -> Option<u64> {
        (self.plan.window != u64::MAX).then_some(self.plan.window)
    }

    /// May a new publish go now? `windowed`: the writer applies the window to what the
    /// kernel holds; else what awaits PUBACK is bounded here. `Err(Some(t))`: not
    /// before `t` (rate); `Err(None)`: not until something is acknowledged or the plan
    /// changes.
    pub fn may_send(&mut self, now: Instant, windowed: bool) -> Result<(), Option<Instant>> {
        if self.plan.paused {
            return Err(None);
        }
        if let Some(window) = self.window().filter(|_| !windowed) {
            // What awaits PUBACK also holds what waits behind a hole, and the PUBACKs'
            // own way back: a larger bound.
            let limit = window
                .saturating_mul(PUBACK_WINDOW_GAIN)
                .saturating_add(self.plan.rate);
            if self.inflight_bytes > 0 && self.inflight_bytes >= limit {
                return Err(None);
            }
        }
        self.may_send_rate(now, 0.0)
    }

    /// `may_send` by the rate alone, not the window, and allowed `debt` bytes beyond
    /// it: for high priority, which the window must never hold back and which should
    /// not wait for the rest's batches to be paid for (the debt is repaid by what
    /// follows), but which must not flood the link either (a backlog of it after an
    /// outage would fill the bottleneck's buffer).
    pub fn may_send_rate(&mut self, now: Instant, debt: f64) -> Result<(), Option<Instant>> {
        if self.plan.paused {
            return Err(None);
        }
        if self.unlimited() {
            return Ok(());
        }
        self.refill(now);
        if self.tokens >= -debt {
            return Ok(());
        }
        let wait = (-debt - self.tokens) / (self.plan.rate.max(1) as f64);
        Err(Some(now + Duration::from_secs_f64(wait)))
    }

    /// What the sockets may hold unsent at this rate: 20 ms of it (at least 8 KiB),
    /// looked at again when half of that has gone. None without a rate (nothing
    /// adapts): the kernel's TCP_NOTSENT_LOWAT alone.
    pub fn shallow(&self) -> Option<Shallow> {
        if self.unlimited() {
            return None;
        }
        let rate = self.plan.rate.max(1) as f64;
        let limit = (rate * SHALLOW_TIME).max(SHALLOW_MIN);
        Some(Shallow {
            limit: limit as usize,
            recheck: Duration::from_secs_f64(limit / 2.0 / rate)
                .clamp(Duration::from_millis(2), Duration::from_millis(50)),
        })
    }

    pub fn sent(&mut self, bytes: usize) {
        self.inflight_bytes += bytes as u64;
        if !self.unlimited() {
            self.tokens -= bytes as f64;
        }
    }

    pub fn acked(&mut self, bytes: usize) {
        self.inflight_bytes = self.inflight_bytes.saturating_sub(bytes as u64);
    }

    /// A new session: nothing in flight.
    pub fn reset(&mut self) {
        self.inflight_bytes = 0;
        self.tokens = 0.0;
        self.refilled = Instant::now();
    }
}

/// CPU time of this process, in seconds (utime + stime from /proc/self/stat).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3, utime 14 and stime 15 (1-based overall).
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // USER_HZ is 100 on every Linux architecture edgerelay targets.
    Some(ticks / 100.0)
}

/// Gathers the controller's inputs once a second and turns them into a plan.
#[derive(Debug)]
pub struct Adapter {
    controller: Controller,
    /// Streams of low priority (their arrivals are told apart: low degrades first).
    low: Vec<StreamId>,
    /// At the last tick: when, records appended (all, low), CPU seconds.
    last: Option<(Instant, u64, u64, f64)>,
    stored_sent: f64,
    wire_sent: f64,
    records_sent: f64,
    wire_ratio: f64,
    wire_per_record: f64,
    acked: f64,
    /// (seconds, bytes acknowledged) of the last `ACKED_TICKS` ticks: PUBACKs come a
    /// batch at a time, so one second alone says more about batch size than rate.
    acked_recent: std::collections::VecDeque<(f64, f64)>,
    /// When each recent PUBACK came and the wire bytes it acknowledged.
    pubacks: std::collections::VecDeque<(Instant, f64)>,
}

/// Ticks the acknowledged rate is averaged over when PUBACKs are too few to be timed.
const ACKED_TICKS: usize = 3;
/// PUBACKs of this last span time the acknowledged rate...
const PUBACK_SPAN: Duration = Duration::from_secs(2);
/// ...when at least this many, over at least `PUBACK_MIN_SPAN`.
const PUBACK_MIN: usize = 3;
const PUBACK_MIN_SPAN: Duration = Duration::from_millis(300);

impl Adapter {
    pub fn new(settings: ControlSettings) -> Self {
        Self {
            controller: Controller::new(settings),
            low: Vec::new(),
            last: None,
            stored_sent: 0.0,
            wire_sent: 0.0,
            records_sent: 0.0,
            wire_ratio: 1.0,
            wire_per_record: 0.0,
            acked: 0.0,
            acked_recent: std::collections::VecDeque::new(),
            pubacks: std::collections::VecDeque::new(),
        }
    }

    /// Which streams are low priority.
    pub fn set_low_streams(&mut self, low: Vec<StreamId>) {
        self.low = low;
    }

    /// The plan before anything is measured.
    pub fn initial(&self) -> Plan {
        self.controller.initial()
    }

    /// A publish went out: `records` records of `stored` bytes as `wire` bytes.
    pub fn sent(&mut self, records: usize, stored: usize, wire: usize) {
        self.records_sent += records as f64;
        self.stored_sent += stored as f64;
        self.wire_sent += wire as f64;
    }

    /// The broker acknowledged a publish of `wire` bytes.
    pub fn acked(&mut self, wire: usize) {
        self.acked += wire as f64;
        self.pubacks.push_back((Instant::now(), wire as f64));
        if self.pubacks.len() > 256 {
            self.pubacks.pop_front();
        }
    }

    /// Bytes acknowledged per second, timed by the PUBACKs of the last `PUBACK_SPAN`:
    /// the bytes after the first over the time from the first to the last. With a
    /// queue at the bottleneck they come at its rate, whatever the batch size (a
    /// one-second count swings with whether a big batch's PUBACK fell into it).
    fn puback_rate(&mut self, now: Instant) -> Option<f64> {
        while self
            .pubacks
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > PUBACK_SPAN)
        {
            self.pubacks.pop_front();
        }
        let (first, last) = (self.pubacks.front()?, self.pubacks.back()?);
        let span = last.0.saturating_duration_since(first.0);
        if self.pubacks.len() < PUBACK_MIN || span < PUBACK_MIN_SPAN {
            return None;
        }
        let bytes: f64 = self.pubacks.iter().skip(1).map(|(_, b)| b).sum();
        Some(bytes / span.as_secs_f64())
    }

    /// The controller, for the log.
    pub fn controller(&self) -> &Controller {
        &self.controller
    }

    pub fn controller_mut(&mut self) -> &mut Controller {
        &mut self.controller
    }

    pub fn tick(&mut self, link: LinkQuality, stats: &StoreStats) -> Plan {
        let now = Instant::now();
        let appended: u64 = stats.streams.iter().map(|s| s.state.next_seq).sum();
        let appended_low: u64 = stats
            .streams
            .iter()
            .filter(|s| self.low.contains(&s.id))
            .map(|s| s.state.next_seq)
            .sum();
        let backlog: u64 = stats.streams.iter().map(|s| s.state.bytes).sum();
        let records: u64 = stats.streams.iter().map(|s| s.state.count).sum();
        let cpu = cpu_seconds().unwrap_or(0.0);
        let acked = std::mem::take(&mut self.acked);
        let (ingest_rate, ingest_low, cpu_used, acked_rate) = match self.last {
            Some((at, prev_appended, prev_low, prev_cpu)) => {
                let dt = now.saturating_duration_since(at).as_secs_f64().max(1e-3);
                let per_record = if records > 0 {
                    backlog as f64 / records as f64
                } else if self.records_sent > 0.0 {
                    self.stored_sent / self.records_sent
                } else {
                    0.0
                };
                (
                    appended.saturating_sub(prev_appended) as f64 * per_record / dt,
                    appended_low.saturating_sub(prev_low) as f64 * per_record / dt,
                    (cpu - prev_cpu).max(0.0) / dt,
                    {
                        self.acked_recent.push_back((dt, acked));
                        while self.acked_recent.len() > ACKED_TICKS {
                            self.acked_recent.pop_front();
                        }
                        let (t, b) = self
                            .acked_recent
                            .iter()
                            .fold((0.0, 0.0), |(t, b), (dt, a)| (t + dt, b + a));
                        self.puback_rate(now).unwrap_or(b / t.max(1e-3))
                    },
                )
            }
            None => (0.0, 0.0, 0.0, 0.0),
        };
        self.last = Some((now, appended, appended_low, cpu));
        if self.stored_sent > 0.0 {
            // Smoothed over what was sent since the last tick.
            let ratio = self.wire_sent / self.stored_sent;
            let per_record = self.wire_sent / self.records_sent.max(1.0);
            self.wire_ratio += 0.3 * (ratio - self.wire_ratio);
            self.wire_per_record = if self.wire_per_record == 0.0 {
                per_record
            } else {
                self.wire_per_record + 0.3 * (per_record - self.wire_per_record)
            };
            self.stored_sent = 0.0;
            self.wire_sent = 0.0;
            self.records_sent = 0.0;
        }
        self.controller.tick(&Inputs {
            link,
            backlog_bytes: backlog,
            ingest_rate,
            ingest_low,
            wire_ratio: self.wire_ratio,
            wire_per_record: self.wire_per_record,
            cpu: cpu_used,
            acked_rate,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(rate: u64, window: u64) -> Plan {
        Plan {
            paused: false,
            rate,
            window,
            batch_size: 100,
            linger: Duration::from_millis(100),
            level: 3,
            degraded: Default::default(),
        }
    }

    #[test]
    fn the_bucket_holds_the_rate() {
        let t0 = Instant::now();
        let mut p = Pacer::new(plan(10_000, u64::MAX));
        p.refilled = t0;
        assert_eq!(p.may_send(t0, false), Ok(()), "starts with no debt");
        p.sent(5_000);
        let Err(Some(at)) = p.may_send(t0, false) else {
            panic!("5 kB of debt at 10 kB/s must wait");
        };
        assert_eq!(at, t0 + Duration::from_millis(500));
        assert_eq!(p.may_send(at, false), Ok(()));
        // Over a long run: bytes let through ≈ rate × time.
        let mut now = at;
        let mut sent = 0u64;
        let end = at + Duration::from_secs(10);
        while now < end {
            match p.may_send(now, false) {
                Ok(()) => {
                    p.sent(1_500);
                    sent += 1_500;
                }
                Err(Some(t)) => now = t,
                Err(None) => unreachable!("no window"),
            }
        }
        assert!((sent as f64 - 100_000.0).abs() <= 10_000.0, "{sent}");
    }

    #[test]
    fn high_priority_may_run_a_bounded_debt_and_ignores_the_window() {
        let t0 = Instant::now();
        let mut p = Pacer::new(plan(10_000, 1_000));
        p.refilled = t0;
        p.sent(5_000);
        assert!(p.may_send(t0, false).is_err(), "the rest waits");
        assert_eq!(p.may_send_rate(t0, 8_000.0), Ok(()), "within its debt");
        p.sent(4_000);
        let Err(Some(at)) = p.may_send_rate(t0, 8_000.0) else {
            panic!("9 kB owed, 8 kB allowed: must wait");
        };
        assert_eq!(at, t0 + Duration::from_millis(100));
        assert_eq!(p.may_send_rate(at, 8_000.0), Ok(()));
        p.set_plan(Plan {
            paused: true,
            ..plan(10_000, 1_000)
        });
        assert_eq!(
            p.may_send_rate(at, 8_000.0),
            Err(None),
            "never while paused"
        );
    }

    #[test]
    fn without_the_kernels_count_the_window_bounds_what_awaits_puback() {
        let now = Instant::now();
        let mut p = Pacer::new(plan(1_000, 10_000));
        p.tokens = 1e12;
        p.sent(50_000);
        assert_eq!(
            p.may_send(now, true),
            Ok(()),
            "the writer applies the window"
        );
        let mut p = Pacer::new(plan(1_000, 10_000));
        p.tokens = 1e12;
        p.sent(20_000);
        assert_eq!(p.may_send(now, false), Ok(()));
        p.sent(1_000);
        assert_eq!(
            p.may_send(now, false),
            Err(None),
            "2 windows + 1 s at the rate"
        );
        p.acked(5_000);
        assert_eq!(p.may_send(now, false), Ok(()));
        assert_eq!(p.window(), Some(10_000));
    }

    #[test]
    fn pause_blocks_until_resumed_and_unlimited_never_waits() {
        let now = Instant::now();
        let mut p = Pacer::new(plan(u64::MAX, u64::MAX));
        p.sent(6_000_000);
        assert_eq!(p.may_send(now, false), Ok(()), "no window");
        assert_eq!(p.window(), None);
        let mut paused = plan(u64::MAX, 10_000);
        paused.paused = true;
        p.set_plan(paused);
        assert_eq!(p.may_send(now, false), Err(None));
        p.reset();
        p.set_plan(plan(u64::MAX, u64::MAX));
        assert_eq!(p.may_send(now, false), Ok(()), "unlimited: never waits");
    }

    #[test]
    fn shallow_sockets_hold_twenty_milliseconds() {
        let p = Pacer::new(plan(125_000, 10_000));
        let s = p.shallow().expect("a rate");
        assert_eq!(s.limit, 8192, "8 KiB at least");
        assert_eq!(s.recheck, Duration::from_secs_f64(4096.0 / 125_000.0));
        let p = Pacer::new(plan(10_000_000, 10_000));
        assert_eq!(p.shallow().expect("a rate").limit, 200_000);
        assert_eq!(Pacer::new(plan(u64::MAX, 1)).shallow(), None);
    }
}
