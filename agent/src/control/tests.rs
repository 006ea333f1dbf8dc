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

/// A bottleneck of `bw` bytes/s behind a buffer, with a base RTT: what the controller's
/// plan makes of it, one second at a time.
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
    /// Bytes delivered so far.
    delivered: f64,
}

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
            delivered: 0.0,
        }
    }

    fn queue_delay(&self) -> Duration {
        Duration::from_secs_f64(self.queue / self.bw)
    }

    /// One second with `plan` and always data waiting; the link quality seen after it.
    fn step(&mut self, plan: &Plan) -> LinkQuality {
        let offered = if plan.paused || !self.up {
            0.0
        } else {
            plan.rate as f64
        };
        let total = self.queue + offered;
        let delivered = total.min(self.bw);
        self.queue = (total - delivered).min(self.buffer);
        self.delivered += delivered;
        // xorshift: a reading off by up to ±noise (the link delivered exactly).
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let u = (self.rng >> 11) as f64 / (1u64 << 53) as f64;
        // Off by up to ±noise, and one reading in ten at half (a loss recovery's
        // second), as the lab's lossy link reads.
        let reading = if self.noise > 0.0 && (self.rng & 0xff) < 26 {
            delivered * 0.5
        } else {
            delivered * (1.0 + self.noise * (2.0 * u - 1.0))
        };
        LinkQuality {
            source: Source::TcpInfo,
            up: self.up,
            srtt: self.base + self.queue_delay(),
            rttvar: Duration::ZERO,
            rtt_recent: self.base + self.queue_delay(),
            loss: 0.0,
            resets: 0,
            delivery_rate: reading as u64,
            goodput: reading as u64,
            app_rtt: self.base,
        }
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

/// Run `ticks` seconds; returns the plans.
fn run(c: &mut Controller, link: &mut SimLink, ticks: usize) -> Vec<(Plan, Duration)> {
    let mut q = link.step(&Plan {
        paused: true,
        rate: 0,
        window: 0,
        batch_size: 10,
        linger: Duration::ZERO,
        level: 3,
        degraded: Degradation::default(),
    });
    let mut out = Vec::new();
    for _ in 0..ticks {
        let plan = c.tick(&inputs(q));
        q = link.step(&plan);
        out.push((plan, link.queue_delay()));
    }
    out
}

fn mean_rate(plans: &[(Plan, Duration)]) -> f64 {
    plans.iter().map(|(p, _)| p.rate as f64).sum::<f64>() / plans.len() as f64
}

#[test]
fn converges_to_the_bottleneck_without_keeping_its_queue_full() {
    // 1 Mbit/s, 150 ms one way.
    let mut link = SimLink::new(125_000.0, 300);
    let mut c = Controller::new(settings());
    let warmup = run(&mut c, &mut link, 15);
    let steady = run(&mut c, &mut link, 30);
    let mean = mean_rate(&steady);
    assert!(
        (mean / 125_000.0 - 1.0).abs() < 0.15,
        "mean rate {mean} after 15 s; warm-up {:?}",
        warmup.iter().map(|(p, _)| p.rate).collect::<Vec<_>>()
    );
    // Bounded oscillation: the probe/drain cycle stays within -50 %/+30 % of the
    // bottleneck (the drain gain after a probe that queued is 0.5).
    for (p, _) in &steady {
        let r = p.rate as f64 / 125_000.0;
        assert!(
            (0.5..=1.3).contains(&r),
            "rate {} oscillates too far",
            p.rate
        );
    }
    let worst = steady.iter().map(|(_, q)| *q).max().expect("ticks");
    assert!(worst <= Duration::from_millis(400), "queue up to {worst:?}");
    let mean_queue = steady.iter().map(|(_, q)| q.as_secs_f64()).sum::<f64>() / steady.len() as f64;
    assert!(mean_queue < 0.15, "mean standing queue {mean_queue} s");
}

#[test]
fn noisy_delivery_readings_neither_idle_the_link_nor_fill_its_queue() {
    // 1 Mbit/s, 300 ms RTT, readings off by up to ±15 % every second and one in ten at
    // half (a 3 %-loss lab link reads within ±5 %, with such dips): the queue, not the
    // readings, steers.
    let mut link = SimLink::new(125_000.0, 300);
    link.noise = 0.15;
    let mut c = Controller::new(settings());
    run(&mut c, &mut link, 20);
    let before = link.delivered;
    let steady = run(&mut c, &mut link, 60);
    let busy = (link.delivered - before) / (125_000.0 * 60.0);
    let mean_queue = steady.iter().map(|(_, q)| q.as_secs_f64()).sum::<f64>() / steady.len() as f64;
    assert!(
        busy >= 0.9,
        "the link busy only {:.0} % of the time",
        busy * 100.0
    );
    assert!(mean_queue < 0.2, "mean standing queue {mean_queue:.3} s");
    let worst = steady.iter().map(|(_, q)| *q).max().expect("ticks");
    assert!(
        worst < Duration::from_millis(500),
        "queue up to {worst:?} (full: 524 ms)"
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
        (mean_rate(&after) / 32_000.0 - 1.0).abs() < 0.2,
        "after the step down: {:?}",
        down.iter().map(|(p, _)| p.rate).collect::<Vec<_>>()
    );
    assert!(
        link.queue_delay() < Duration::from_millis(500),
        "queue drained"
    );
    link.bw = 250_000.0;
    let up = run(&mut c, &mut link, 10);
    let after = run(&mut c, &mut link, 10);
    assert!(
        (mean_rate(&after) / 250_000.0 - 1.0).abs() < 0.2,
        "after the step up: {:?}",
        up.iter().map(|(p, _)| p.rate).collect::<Vec<_>>()
    );
}

#[test]
fn an_outage_pauses_and_recovery_ramps_from_half() {
    let mut link = SimLink::new(125_000.0, 100);
    let mut c = Controller::new(settings());
    run(&mut c, &mut link, 20);
    let bw = c.bandwidth();
    link.up = false;
    let during = run(&mut c, &mut link, 5);
    assert!(during.iter().all(|(p, _)| p.paused));
    link.up = true;
    link.queue = 0.0;
    let after = run(&mut c, &mut link, 1);
    assert!(!after[0].0.paused);
    assert!(
        (after[0].0.rate as f64) <= bw * 0.6,
        "restarts at about half of {bw}: {}",
        after[0].0.rate
    );
    let later = run(&mut c, &mut link, 15);
    // Back to the known bandwidth, not doubled past it into the backlog's flood.
    let peak = later[..5].iter().map(|(p, _)| p.rate).max().unwrap_or(0) as f64;
    assert!(peak <= bw * 1.3, "ramp peaked at {peak} (bandwidth {bw})");
    assert!((mean_rate(&later[5..]) / 125_000.0 - 1.0).abs() < 0.2);
}

#[test]
fn degraded_while_arrivals_exceed_the_link_and_level_follows_cpu() {
    let mut link = SimLink::new(12_500.0, 100); // 100 kbit/s
    let mut c = Controller::new(settings());
    run(&mut c, &mut link, 20);
    let q = link.step(&Plan {
        paused: false,
        rate: 12_500,
        window: 0,
        batch_size: 10,
        linger: Duration::ZERO,
        level: 3,
        degraded: Degradation::default(),
    });
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
    for (p, _) in run(&mut c, &mut link, 5) {
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
            for (p, _) in run(&mut c, &mut link, 3) {
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
