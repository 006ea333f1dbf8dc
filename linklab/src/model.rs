//! What the emulated link does to one frame: the pure core of the lab, no I/O.
//!
//! A frame arriving at time `now` is dropped (outage, random loss, full queue) or
//! delivered at a computed time: it waits behind earlier frames for the serializer
//! (`rate`, with a queue bounded in bytes: tail drop, like a router's FIFO), then
//! travels for `delay` ± `jitter`.
//!
//! Invariants: frames leave in the order they arrived (jitter never reorders, as on a
//! single path); the serializer never sends faster than `rate`; randomness comes only
//! from the seeded generator, so a run is reproducible frame for frame.

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// What the link does in one direction.
#[derive(Debug, Clone, PartialEq)]
pub struct Conditions {
    /// One-way propagation delay.
    pub delay: Duration,
    /// Uniform jitter added to the delay, in ±`jitter` (order is kept).
    pub jitter: Duration,
    /// Probability (0..=1) that a frame is lost.
    pub loss: f64,
    /// Serialisation rate in bit/s (frame bytes, Ethernet header included); None: as
    /// fast as the forwarder goes.
    pub rate_bps: Option<u64>,
    /// Bytes that may wait for the serializer; more are dropped. None: the larger of
    /// 64 KiB and 250 ms at `rate`.
    pub queue_bytes: Option<usize>,
    /// Blackhole: every frame is dropped.
    pub outage: bool,
}

impl Default for Conditions {
    fn default() -> Self {
        Self {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            rate_bps: None,
            queue_bytes: None,
            outage: false,
        }
    }
}

impl Conditions {
    /// The queue limit in effect.
    pub fn queue_limit(&self) -> usize {
        match (self.queue_bytes, self.rate_bps) {
            (Some(q), _) => q,
            (None, Some(rate)) => (64 << 10).max((rate / 8 / 4) as usize),
            (None, None) => usize::MAX,
        }
    }
}

/// Why a frame was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    Outage,
    Loss,
    QueueFull,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Deliver(Instant),
    Drop(Drop),
}

/// One direction of the link.
#[derive(Debug)]
pub struct LinkModel {
    cond: Conditions,
    rng: StdRng,
    /// When the serializer finishes what it has been given.
    busy_until: Option<Instant>,
    last_release: Option<Instant>,
    /// How long the last admitted frame waits in the queue before its serialisation.
    last_wait: Duration,
}

impl LinkModel {
    pub fn new(cond: Conditions, seed: u64) -> Self {
        Self {
            cond,
            rng: StdRng::seed_from_u64(seed),
            busy_until: None,
            last_release: None,
            last_wait: Duration::ZERO,
        }
    }

    pub fn conditions(&self) -> &Conditions {
        &self.cond
    }

    /// Change the conditions; frames already admitted keep their delivery times.
    pub fn set(&mut self, cond: Conditions) {
        self.cond = cond;
    }

    /// The queueing delay of the last frame delivered (zero without a rate): what the
    /// queue adds to the RTT, the ground truth a sender's RTT inflation estimates.
    pub fn last_wait(&self) -> Duration {
        self.last_wait
    }

    /// Decide the fate of a `len`-byte frame arriving at `now`.
    pub fn admit(&mut self, now: Instant, len: usize) -> Verdict {
        self.last_wait = Duration::ZERO;
        if self.cond.outage {
            return Verdict::Drop(Drop::Outage);
        }
        // Drawn for every frame whatever the rate, so the loss pattern depends only on
        // the seed and the frame count.
        let draw: f64 = self.rng.random();
        if draw < self.cond.loss {
            return Verdict::Drop(Drop::Loss);
        }
        let mut sent = now;
        if let Some(rate) = self.cond.rate_bps.filter(|r| *r > 0) {
            let busy = self.busy_until.filter(|b| *b > now);
            let backlog = busy.map_or(0.0, |b| (b - now).as_secs_f64() * rate as f64 / 8.0);
            if backlog + len as f64 > self.cond.queue_limit() as f64 {
                return Verdict::Drop(Drop::QueueFull);
            }
            let start = busy.unwrap_or(now);
            self.last_wait = start - now;
            let done = start + Duration::from_secs_f64(len as f64 * 8.0 / rate as f64);
            self.busy_until = Some(done);
            sent = done;
        }
        let mut release = sent + self.cond.delay;
        if !self.cond.jitter.is_zero() {
            let j = self.cond.jitter.as_secs_f64();
            let offset = self.rng.random_range(-j..=j);
            release = if offset >= 0.0 {
                release + Duration::from_secs_f64(offset)
            } else {
                release
                    .checked_sub(Duration::from_secs_f64(-offset))
                    .unwrap_or(release)
                    .max(sent)
            };
        }
        if let Some(last) = self.last_release {
            release = release.max(last);
        }
        self.last_release = Some(release);
        Verdict::Deliver(release)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn delay_only() {
        let t0 = Instant::now();
        let mut m = LinkModel::new(
            Conditions {
                delay: ms(50),
                ..Conditions::default()
            },
            1,
        );
        assert_eq!(m.admit(t0, 1500), Verdict::Deliver(t0 + ms(50)));
        assert_eq!(m.admit(t0 + ms(1), 60), Verdict::Deliver(t0 + ms(51)));
    }

    #[test]
    fn rate_serialises_and_the_queue_tail_drops() {
        let t0 = Instant::now();
        let mut m = LinkModel::new(
            Conditions {
                rate_bps: Some(1_000_000),
                queue_bytes: Some(3000),
                ..Conditions::default()
            },
            1,
        );
        // 1250 bytes = 10 ms at 1 Mbit/s.
        assert_eq!(m.admit(t0, 1250), Verdict::Deliver(t0 + ms(10)));
        assert_eq!(m.last_wait(), ms(0));
        assert_eq!(m.admit(t0, 1250), Verdict::Deliver(t0 + ms(20)));
        assert_eq!(
            m.last_wait(),
            ms(10),
            "waits for the first to be serialised"
        );
        // 2500 bytes wait: one more of 1250 would exceed 3000.
        assert_eq!(m.admit(t0, 1250), Verdict::Drop(Drop::QueueFull));
        // Later the queue has drained.
        assert_eq!(m.admit(t0 + ms(30), 1250), Verdict::Deliver(t0 + ms(40)));
    }

    #[test]
    fn outage_drops_everything_and_ends() {
        let t0 = Instant::now();
        let mut m = LinkModel::new(Conditions::default(), 1);
        let mut c = Conditions {
            outage: true,
            ..Conditions::default()
        };
        m.set(c.clone());
        assert_eq!(m.admit(t0, 100), Verdict::Drop(Drop::Outage));
        c.outage = false;
        m.set(c);
        assert_eq!(m.admit(t0, 100), Verdict::Deliver(t0));
    }

    #[test]
    fn loss_rate_and_reproducibility() {
        let t0 = Instant::now();
        let run = |seed| {
            let mut m = LinkModel::new(
                Conditions {
                    loss: 0.05,
                    ..Conditions::default()
                },
                seed,
            );
            (0..100_000)
                .map(|_| m.admit(t0, 100) == Verdict::Drop(Drop::Loss))
                .collect::<Vec<bool>>()
        };
        let a = run(7);
        let lost = a.iter().filter(|l| **l).count() as f64 / a.len() as f64;
        assert!((lost - 0.05).abs() < 0.003, "{lost}");
        assert_eq!(a, run(7), "same seed, same losses");
        assert_ne!(a, run(8));
    }

    #[test]
    fn default_queue_scales_with_rate() {
        let c = |rate| Conditions {
            rate_bps: Some(rate),
            ..Conditions::default()
        };
        assert_eq!(c(1_000_000).queue_limit(), 64 << 10);
        assert_eq!(c(20_000_000).queue_limit(), 625_000);
    }

    proptest! {
        /// Whatever the conditions and arrivals: order is kept, nothing leaves before
        /// arrival + delay − jitter, and the serializer never beats the rate.
        #[test]
        fn order_and_rate_hold(
            delay in 0u64..200,
            jitter in prop_oneof![Just(0u64), 0u64..50],
            rate in prop::option::of(100_000u64..50_000_000),
            gaps in prop::collection::vec((0u64..5000, 60usize..1514), 1..300),
        ) {
            let t0 = Instant::now();
            let cond = Conditions {
                delay: ms(delay),
                jitter: ms(jitter.min(delay)),
                rate_bps: rate,
                ..Conditions::default()
            };
            let mut m = LinkModel::new(cond, 3);
            let mut now = t0;
            let mut last = None;
            let mut sent_bytes = 0u64;
            let mut first_arrival = None;
            for (gap_us, len) in gaps {
                now += Duration::from_micros(gap_us);
                first_arrival.get_or_insert(now);
                if let Verdict::Deliver(at) = m.admit(now, len) {
                    prop_assert!(at + ms(jitter.min(delay)) >= now + ms(delay));
                    if let Some(l) = last { prop_assert!(at >= l); }
                    last = Some(at);
                    sent_bytes += len as u64;
                    if let (Some(r), Some(first), 0) = (rate, first_arrival, jitter) {
                        // Everything delivered by `at` went through the serializer
                        // after `first`, at most at `rate`.
                        let serialising = (at - first).as_secs_f64() - delay as f64 / 1000.0;
                        prop_assert!(sent_bytes as f64 * 8.0 <= r as f64 * serialising + 1.0);
                    }
                }
            }
        }
    }
}
