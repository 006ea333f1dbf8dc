//! Reconnect backoff: exponential from `min` to `max`, with jitter so a fleet of
//! gateways that lost the broker together does not reconnect in lock-step.
//!
//! Pure (the random source is passed in), so bounds are unit-tested.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        let max = max.max(min);
        Self {
            min,
            max,
            current: min,
        }
    }

    /// Forget past failures (after a successful session).
    pub fn reset(&mut self) {
        self.current = self.min;
    }

    /// The next delay: uniform in [current/2, current] ("equal jitter"), then double.
    /// `unit` is a random number in [0, 1).
    pub fn next_delay(&mut self, unit: f64) -> Duration {
        let base = self.current;
        let half = base / 2;
        let jitter = half.mul_f64(unit.clamp(0.0, 1.0));
        self.current = (self.current * 2).min(self.max);
        (half + jitter).max(self.min.min(base))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn grows_to_max_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<Duration> = (0..8).map(|_| b.next_delay(1.0)).collect();
        assert_eq!(delays[0], Duration::from_millis(100));
        assert_eq!(delays[1], Duration::from_millis(200));
        assert_eq!(delays[3], Duration::from_millis(800));
        assert_eq!(delays[7], Duration::from_secs(1));
        b.reset();
        assert_eq!(b.next_delay(1.0), Duration::from_millis(100));
    }

    proptest! {
        #[test]
        fn delays_stay_within_bounds(units in proptest::collection::vec(0.0f64..1.0, 1..40), min_ms in 1u64..1000, extra in 0u64..60_000) {
            let min = Duration::from_millis(min_ms);
            let max = min + Duration::from_millis(extra);
            let mut b = Backoff::new(min, max);
            for u in units {
                let d = b.next_delay(u);
                prop_assert!(d >= min / 2 && d >= Duration::ZERO);
                prop_assert!(d <= max, "{:?} > {:?}", d, max);
            }
        }
    }
}
