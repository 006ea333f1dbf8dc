use proptest::prelude::*;

use super::*;
use crate::link::Source;

fn settings() -> ControlSettings {
    ControlSettings {
        adapt: true,
        max_rate: None,
        batch_size: 1000,
        linger: Duration::from_secs(1),
        level: 3,
        auto_level: true,
        initial_rate: 16_000,
    }
}

/// A bottleneck of `bw` bytes/s behind a buffer, with a base RTT, and a sender that
/// follows the plan's pace and window (the uplink's pacer and its in-flight gate) in
/// 10-ms steps: what the controller's plan makes of the link, one second at a time.
#[derive(Debug, Clone)]
struct SimLink {
    bw: f64,
    base: Duration,
    queue: f64,
    buffer: f64,
    up: bool,
    /// Relative swing of the delivery readings (stretch ACKs), 0..1; with any, one in
    /// ten readings is at half (loss recovery).
    noise: f64,
    rng: u64,
    /// Bytes past the bottleneck whose delivery is not yet known to the sender: (when
    /// it will be, bytes).
    pipe: std::collections::VecDeque<(f64, f64)>,
    now: f64,
    /// Pacer tokens, bytes.
    tokens: f64,
    /// Bytes delivered so far, and dropped at the full buffer.
    delivered: f64,
    dropped: f64,
    /// The largest window overshoot ever (in flight above the window, bytes).
    overshoot: f64,
    /// Mean queue delay over the last second, seconds; worst ever.
    mean_queue: f64,
    worst_queue: f64,
    /// The last second's reading.
    last: Option<LinkQuality>,
}

const STEP: f64 = 0.01;

impl SimLink {
    fn new(bw: f64, base_ms: u64) -> Self {
        Self {
            bw,
            base: Duration::from_millis(base_ms),
            queue: 0.0,
            // Like the link lab's default: 250 ms at the rate, at least 64 KiB (bytes:
            // it does not shrink when the rate steps down).
            buffer: (bw * 0.25).max(65_536.0),
            up: true,
            noise: 0.0,
            rng: 0x2545_f491_4f6c_dd1d,
            pipe: std::collections::VecDeque::new(),
            now: 0.0,
            tokens: 0.0,
            delivered: 0.0,
            dropped: 0.0,
            overshoot: 0.0,
            mean_queue: 0.0,
            worst_queue: 0.0,
            last: None,
        }
    }

    fn queue_delay(&self) -> Duration {
        Duration::from_secs_f64(self.queue / self.bw)
    }

    fn in_flight(&self) -> f64 {
        self.queue + self.pipe.iter().map(|(_, b)| b).sum::<f64>()
    }

    fn random(&mut self) -> f64 {
        // xorshift
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }

    /// One second with `plan` and always data waiting; the link quality seen after it.
    fn step(&mut self, plan: &Plan) -> LinkQuality {
        let mut delivered = 0.0;
        let mut rtt_min = f64::MAX;
        let mut queued = 0.0;
        for _ in 0..(1.0 / STEP) as usize {
            self.now += STEP;
            while self.pipe.front().is_some_and(|(t, _)| *t <= self.now) {
                if let Some((_, b)) = self.pipe.pop_front() {
                    delivered += b;
                }
            }
            if !plan.paused && self.up {
                // The pacer's bucket (a burst of 100 ms), then the window.
                let rate = plan.rate as f64;
                self.tokens = (self.tokens + rate * STEP).min((rate / 10.0).max(8192.0));
                let room = (plan.window as f64 - self.in_flight()).max(0.0);
                let send = self.tokens.max(0.0).min(room);
                self.tokens -= send;
                self.queue += send;
                if send > 0.0 {
                    self.overshoot = self.overshoot.max(self.in_flight() - plan.window as f64);
                }
            }
            if self.queue > self.buffer {
                self.dropped += self.queue - self.buffer;
                self.queue = self.buffer;
            }
            let out = if self.up {
                self.queue.min(self.bw * STEP)
            } else {
                0.0
            };
            self.queue -= out;
            if out > 0.0 {
                let at = self.now + self.base.as_secs_f64();
                self.pipe.push_back((at, out));
            }
            rtt_min = rtt_min.min(self.base.as_secs_f64() + self.queue / self.bw);
            queued += self.queue / self.bw;
            self.worst_queue = self.worst_queue.max(self.queue / self.bw);
        }
        self.mean_queue = queued * STEP;
        if !self.up {
            // What was in flight is lost with the connection.
            self.pipe.clear();
            self.queue = 0.0;
        }
        self.delivered += delivered;
        let u = self.random();
        // Off by up to ±noise, and one reading in ten at half (a loss recovery's
        // second), as the lab's lossy link reads.
        let reading = if self.noise > 0.0 && (self.rng & 0xff) < 26 {
            delivered * 0.5
        } else {
            delivered * (1.0 + self.noise * (2.0 * u - 1.0))
        };
        let q = LinkQuality {
            source: Source::TcpInfo,
            up: self.up,
            srtt: self.base + self.queue_delay(),
            rttvar: Duration::ZERO,
            rtt_recent: Duration::from_secs_f64(rtt_min),
            loss: 0.0,
            resets: 0,
            delivery_rate: reading as u64,
            goodput: reading as u64,
            app_rtt: self.base,
        };
        self.last = Some(q);
        q
    }
}

fn inputs(link: LinkQuality) -> Inputs {
    Inputs {
        acked_rate: link.goodput as f64,
        link,
        backlog_bytes: 100 << 20,
        ingest_rate: 0.0,
        ingest_low: 0.0,
        wire_ratio: 0.1,
        wire_per_record: 20.0,
        cpu: 0.1,
    }
}

/// One tick of the controller on what the link did in the second before, then that
/// plan for a second.
fn tick(c: &mut Controller, link: &mut SimLink) -> Plan {
    let q = match link.last {
        Some(q) => q,
        None => link.step(&Plan {
            paused: true,
            rate: 0,
            window: 0,
            batch_size: 10,
            linger: Duration::ZERO,
            level: 3,
            degraded: Degradation::default(),
        }),
    };
    let plan = c.tick(&inputs(q));
    link.step(&plan);
    plan
}

/// What `ticks` seconds did: the plans, the link's busy share, the mean and worst queue
/// delay of each second (s).
struct Run {
    plans: Vec<Plan>,
    busy: f64,
    mean_queue: f64,
    worst_queue: f64,
    dropped: f64,
}

fn run(c: &mut Controller, link: &mut SimLink, ticks: usize) -> Run {
    let (d0, x0) = (link.delivered, link.dropped);
    let mut plans = Vec::new();
    let (mut queue, mut worst) = (0.0, 0.0f64);
    for _ in 0..ticks {
        plans.push(tick(c, link));
        queue += link.mean_queue;
        worst = worst.max(link.mean_queue);
    }
    Run {
        plans,
        busy: (link.delivered - d0) / (link.bw * ticks as f64),
        mean_queue: queue / ticks as f64,
        worst_queue: worst,
        dropped: link.dropped - x0,
    }
}

#[test]
fn fills_the_bottleneck_without_keeping_its_queue_full() {
    // 1 Mbit/s, 150 ms one way: full within 10 s, then busy with a queue of tens of ms.
    let mut link = SimLink::new(125_000.0, 300);
    let mut c = Controller::new(settings());
    let warmup = run(&mut c, &mut link, 10);
    let steady = run(&mut c, &mut link, 30);
    assert!(
        steady.busy >= 0.97,
        "busy {:.2} after 10 s; warm-up rates {:?}",
        steady.busy,
        warmup.plans.iter().map(|p| p.rate).collect::<Vec<_>>()
    );
    assert!(
        steady.mean_queue < 0.1,
        "mean queue {:.3} s",
        steady.mean_queue
    );
    assert!(
        steady.worst_queue < 0.15,
        "queue up to {:.3} s",
        steady.worst_queue
    );
    assert_eq!(
        steady.dropped, 0.0,
        "the buffer never overflows once adapted"
    );
    assert!(
        (c.bandwidth() / 125_000.0 - 1.0).abs() < 0.05,
        "estimate {}",
        c.bandwidth()
    );
    // The window binds, not the pace: one bandwidth-delay product and the target.
    let w = steady.plans.last().expect("plans").window as f64;
    assert!(w > 125_000.0 * 0.3 && w < 125_000.0 * 0.45, "window {w}");
    assert!(
        link.overshoot <= 0.0,
        "never more in flight than the window"
    );
}

#[test]
fn noisy_delivery_readings_neither_idle_the_link_nor_fill_its_queue() {
    // 1 Mbit/s, 300 ms RTT, readings off by up to ±15 % every second and one in ten at
    // half (a 3 %-loss lab link reads within ±5 %, with such dips): the window, sized
    // by the largest reading, keeps the link busy; a too-high one shows as a queue.
    let mut link = SimLink::new(125_000.0, 300);
    link.noise = 0.15;
    let mut c = Controller::new(settings());
    run(&mut c, &mut link, 20);
    let steady = run(&mut c, &mut link, 60);
    assert!(steady.busy >= 0.97, "the link busy only {:.2}", steady.busy);
    assert!(
        steady.mean_queue < 0.15,
        "mean queue {:.3} s",
        steady.mean_queue
    );
    assert!(
        steady.worst_queue < 0.3,
        "a second with a mean queue of {:.3} s (full: 524 ms)",
        steady.worst_queue
    );
}

#[test]
fn adapts_to_rate_steps_within_ten_seconds_each_way() {
    let mut link = SimLink::new(250_000.0, 100); // 2 Mbit/s
    let mut c = Controller::new(settings());
    run(&mut c, &mut link, 20);
    link.bw = 32_000.0; // 256 kbit/s
    let down = run(&mut c, &mut link, 10);
    let after = run(&mut c, &mut link, 10);
    assert!(
        after.busy >= 0.95 && after.worst_queue < 0.4,
        "after the step down: busy {:.2}, queue up to {:.3} s; rates {:?}",
        after.busy,
        after.worst_queue,
        down.plans.iter().map(|p| p.rate).collect::<Vec<_>>()
    );
    link.bw = 250_000.0;
    let up = run(&mut c, &mut link, 10);
    let after = run(&mut c, &mut link, 10);
    assert!(
        after.busy >= 0.95 && after.worst_queue < 0.15,
        "after the step up: busy {:.2}, queue up to {:.3} s; rates {:?}",
        after.busy,
        after.worst_queue,
        up.plans.iter().map(|p| p.rate).collect::<Vec<_>>()
    );
}

#[test]
fn a_queue_that_never_drains_does_not_hide_the_base_rtt() {
    // On a link without noise the window's own target queue never drains: without the
    // base probe the minimum RTT would creep up by it, and the window with it.
    let mut link = SimLink::new(125_000.0, 300);
    let mut c = Controller::new(settings());
    let r = run(&mut c, &mut link, 120);
    let base = c.base_rtt().as_secs_f64();
    assert!((0.3..0.31).contains(&base), "base RTT read as {base} s");
    let probes = r
        .plans
        .iter()
        .filter(|p| p.window < 125_000 * 3 / 10)
        .count();
    assert!(
        (3..=8).contains(&probes),
        "{probes} ticks of base probe in 2 min"
    );
    let late = run(&mut c, &mut link, 30);
    assert!(late.busy >= 0.97, "busy {:.2}", late.busy);
}

#[test]
fn a_longer_path_is_followed() {
    // The route changes: the RTT doubles. The base window (30 s) forgets the old one
    // and the window grows to the new bandwidth-delay product.
    let mut link = SimLink::new(125_000.0, 100);
    let mut c = Controller::new(settings());
    run(&mut c, &mut link, 20);
    link.base = Duration::from_millis(200);
    run(&mut c, &mut link, 35);
    let after = run(&mut c, &mut link, 10);
    assert!(
        after.busy >= 0.95,
        "busy {:.2} on the longer path",
        after.busy
    );
    let base = c.base_rtt().as_secs_f64();
    assert!((0.2..0.21).contains(&base), "base RTT read as {base} s");
}

#[test]
fn an_outage_pauses_and_recovery_resumes_at_the_known_link_without_a_flood() {
    let mut link = SimLink::new(125_000.0, 100);
    let mut c = Controller::new(settings());
    run(&mut c, &mut link, 20);
    let bw = c.bandwidth();
    link.up = false;
    let during = run(&mut c, &mut link, 5);
    // Paused from the first reading of the dead link.
    assert!(during.plans[1..].iter().all(|p| p.paused));
    link.up = true;
    link.worst_queue = 0.0;
    // The tick that still sees the outage's last second, then the first one after.
    run(&mut c, &mut link, 1);
    let after = run(&mut c, &mut link, 5);
    let first = after.plans[0];
    assert!(!first.paused);
    // At most a bandwidth-delay product and the target queue in flight: no flood into
    // the backlog, yet the link busy at once.
    assert!(
        (first.window as f64) < bw * 0.2,
        "window {} after an outage (bandwidth {bw})",
        first.window
    );
    assert!(after.busy >= 0.95, "busy {:.2} after recovery", after.busy);
    assert!(
        after.worst_queue < 0.1,
        "a second with a mean queue of {:.3} s after recovery",
        after.worst_queue
    );
    assert!(
        link.worst_queue < 0.2,
        "queue up to {:.3} s after recovery (a burst of the pacer's 100 ms at most)",
        link.worst_queue
    );
}

/// A plan that just sends at `rate`, for a second on the simulated link.
fn steady(rate: u64) -> Plan {
    Plan {
        paused: false,
        rate,
        window: u64::MAX,
        batch_size: 10,
        linger: Duration::ZERO,
        level: 3,
        degraded: Degradation::default(),
    }
}

#[test]
fn degraded_while_arrivals_exceed_the_link_and_level_follows_cpu() {
    let mut link = SimLink::new(12_500.0, 100); // 100 kbit/s
    let mut c = Controller::new(settings());
    run(&mut c, &mut link, 20);
    let q = link.step(&steady(12_500));
    let mut i = inputs(q);
    i.ingest_rate = 200_000.0; // × 0.1 wire ratio = 20 kB/s > 12.5 kB/s
    i.ingest_low = 150_000.0; // without low: 5 kB/s, which the link carries
    let p = c.tick(&i);
    assert!(p.degraded.low && !p.degraded.normal, "{:?}", p.degraded);
    assert!(!p.degraded.of(Priority::High));
    assert_eq!(p.level, 9, "slow link, idle CPU: compress harder");
    i.ingest_low = 50_000.0; // normal alone is now 15 kB/s: too much as well
    let p = c.tick(&i);
    assert!(p.degraded.low && p.degraded.normal, "{:?}", p.degraded);
    assert!(!p.degraded.of(Priority::High), "high is never degraded");
    i.ingest_rate = 50_000.0; // 5 kB/s on the wire
    i.ingest_low = 0.0;
    let p = c.tick(&i);
    assert!(!p.degraded.any());
    i.cpu = 0.95;
    assert_eq!(c.tick(&i).level, 1, "CPU-bound: compress less");
}

#[test]
fn fixed_behaviour_without_adapt() {
    let mut s = settings();
    s.adapt = false;
    s.max_rate = Some(50_000);
    let mut c = Controller::new(s);
    let mut link = SimLink::new(12_500.0, 100);
    for p in run(&mut c, &mut link, 5).plans {
        assert_eq!(p.rate, 50_000);
        assert_eq!(p.batch_size, 1000);
        assert_eq!(p.level, 3);
        assert!(!p.paused && !p.degraded.any());
    }
}

proptest! {
    /// Whatever the link does, the plan never exceeds max_rate, and its batch size,
    /// linger and window stay within their bounds.
    #[test]
    fn never_exceeds_max_rate(
        steps in prop::collection::vec((1_000f64..2_000_000.0, 1u64..800, any::<bool>()), 1..60),
        cap in 5_000u64..500_000,
    ) {
        let mut s = settings();
        s.max_rate = Some(cap);
        let mut c = Controller::new(s);
        let mut link = SimLink::new(steps[0].0, steps[0].1);
        for (bw, rtt, up) in steps {
            link.bw = bw;
            link.base = Duration::from_millis(rtt);
            link.up = up;
            for p in run(&mut c, &mut link, 3).plans {
                prop_assert!(p.rate <= cap);
                prop_assert!((10..=1000).contains(&p.batch_size));
                prop_assert!(p.window >= MIN_WINDOW);
                prop_assert!(p.linger >= Duration::from_millis(50) && p.linger <= Duration::from_secs(1));
            }
        }
    }
}

#[test]
fn resuming_with_no_readings_yet_keeps_the_restart_rate() {
    let mut link = SimLink::new(125_000.0, 300);
    let mut c = Controller::new(settings());
    run(&mut c, &mut link, 20);
    let bw = c.bandwidth();
    link.up = false;
    run(&mut c, &mut link, 5);
    // The new connections' first seconds: up, but no delivery reading, no RTT sample.
    let silent = LinkQuality {
        source: Source::Ebpf,
        up: true,
        srtt: Duration::from_millis(305),
        rttvar: Duration::ZERO,
        rtt_recent: Duration::ZERO,
        loss: 0.2,
        resets: 0,
        delivery_rate: 0,
        goodput: 0,
        app_rtt: Duration::from_millis(310),
    };
    let rates: Vec<u64> = (0..3).map(|_| c.tick(&inputs(silent)).rate).collect();
    eprintln!("{rates:?} bw {bw}");
    assert!(
        rates.iter().all(|&r| r as f64 >= bw * 0.45),
        "resuming at {rates:?} of a {bw} link"
    );
}

/// A link that keeps up: batches take what arrives within the configured linger
/// (bytes matter on a metered link, and the link has room), while a backlog sizes them
/// by link time (a high-priority publish must not wait behind a long batch).
#[test]
fn batches_follow_the_linger_while_the_link_keeps_up_and_link_time_with_a_backlog() {
    let mut link = SimLink::new(12_500.0, 100); // 100 kbit/s
    let mut c = Controller::new(settings());
    run(&mut c, &mut link, 20);
    let q = link.step(&steady(12_500));
    let mut i = inputs(q);
    // 30 kB/s stored × 0.1 = 3 kB/s on the wire, 150 records/s of 20 wire bytes.
    i.ingest_rate = 30_000.0;
    i.backlog_bytes = 5_000;
    let p = c.tick(&i);
    assert_eq!(p.linger, Duration::from_secs(1), "the configured linger");
    assert!(
        (140..=160).contains(&p.batch_size),
        "a second's arrivals: {}",
        p.batch_size
    );
    // A backlog of 10 s of link time: the batch is 150 ms of the link (~94 records).
    i.backlog_bytes = 1_250_000;
    let p = c.tick(&i);
    assert!(
        p.batch_size < 120,
        "link-time bound with a backlog: {}",
        p.batch_size
    );
}
