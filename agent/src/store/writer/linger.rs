//! When the writer waits for more requests before committing (adaptive group commit).
//!
//! Why: at a moderate steady load (thousands of messages a second from many devices,
//! each sending a few per second) requests trickle in one by one, so without waiting
//! every commit holds one or two records and the agent pays, per message, an fsync,
//! a wake-up of this thread and a wake-up of the producer's task — several times the
//! CPU a non-durable broker spends on the same message. Waiting a few milliseconds
//! turns that into one commit and one round of wake-ups per group. But a lone
//! producer that waits for each acknowledgement before sending the next gains
//! nothing from a wait and would be slowed to one message per linger.
//!
//! Invariants:
//! - The writer never waits when the previous group and the requests queued right now
//!   are both a single request: that is what a lone sequential producer looks like
//!   (its next request only comes after this commit's reply).
//! - A wait ends at `max` after the first request, when the group is full, or at the
//!   first poll that finds nothing new once the group is as large as the last one — so
//!   producers that all answered the last commit at once (many sequential clients) are
//!   committed after one quiet poll, not after `max`, while independent devices that
//!   each send now and then (where quiet polls come by chance) still fill a group.
//! - The writer sleeps between polls instead of being woken per request, which is
//!   where the saving comes from.

use std::time::Duration;

/// How often the writer looks at its queue while it waits.
pub const POLL: Duration = Duration::from_millis(2);

#[derive(Debug, Clone)]
pub struct Linger {
    max: Duration,
    last_group: usize,
}

/// What the writer does after a poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Sleep this long, then poll again.
    Sleep(Duration),
    /// Commit what the group holds.
    Commit,
}

impl Linger {
    pub fn new(max: Duration) -> Self {
        Self { max, last_group: 0 }
    }

    /// Whether to wait for more, given the requests already gathered without waiting.
    pub fn start(&self, gathered: usize, full: usize) -> bool {
        !self.max.is_zero() && gathered < full && (gathered > 1 || self.last_group > 1)
    }

    /// How long to sleep before the first poll.
    pub fn first_sleep(&self) -> Duration {
        POLL.min(self.max)
    }

    /// After a poll: `waited` since the first request, `before`/`after` the group's
    /// size before and after the poll drained the queue.
    pub fn next(&self, waited: Duration, before: usize, after: usize, full: usize) -> Next {
        let quiet = after == before && after >= self.last_group;
        if after >= full || quiet || waited >= self.max {
            return Next::Commit;
        }
        Next::Sleep(POLL.min(self.max - waited))
    }

    /// The group that was committed, which tells the next decision whether requests
    /// come from more than one producer at a time.
    pub fn committed(&mut self, group: usize) {
        self.last_group = group;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn a_lone_sequential_producer_never_waits() {
        let mut l = Linger::new(MS(20));
        for _ in 0..100 {
            assert!(!l.start(1, 512));
            l.committed(1);
        }
    }

    #[test]
    fn zero_means_never_wait() {
        let mut l = Linger::new(Duration::ZERO);
        l.committed(300);
        assert!(!l.start(40, 512));
    }

    #[test]
    fn concurrency_now_or_in_the_last_group_waits() {
        let mut l = Linger::new(MS(20));
        assert!(l.start(2, 512));
        assert!(!l.start(1, 512));
        l.committed(3);
        assert!(l.start(1, 512));
        assert!(!l.start(512, 512), "a full group commits at once");
    }

    #[test]
    fn a_quiet_poll_commits_once_the_last_groups_producers_are_back() {
        let mut l = Linger::new(MS(20));
        l.committed(7);
        assert_eq!(l.next(MS(2), 7, 7, 512), Next::Commit);
        assert_eq!(l.next(MS(2), 7, 9, 512), Next::Sleep(POLL));
        // Sporadic senders: a quiet poll by chance does not end a small group.
        l.committed(10);
        assert_eq!(l.next(MS(4), 3, 3, 512), Next::Sleep(POLL));
        assert_eq!(l.next(MS(20), 3, 3, 512), Next::Commit);
    }

    #[test]
    fn the_last_sleep_is_cut_to_the_deadline() {
        assert_eq!(Linger::new(MS(1)).first_sleep(), MS(1));
        assert_eq!(Linger::new(MS(20)).first_sleep(), POLL);
        let l = Linger::new(MS(5));
        assert_eq!(l.next(MS(4), 1, 2, 512), Next::Sleep(MS(1)));
        assert_eq!(l.next(MS(5), 1, 2, 512), Next::Commit);
    }

    proptest! {
        /// Whatever the arrivals, a wait ends: the sleeps add up to at most `max`
        /// (plus one poll, since the first poll may start late), never past it.
        #[test]
        fn waits_are_bounded(max_ms in 0u64..50, arrivals in proptest::collection::vec(0usize..40, 0..64)) {
            let l = Linger::new(MS(max_ms));
            let mut waited = Duration::ZERO;
            let mut size = 2usize;
            for a in arrivals {
                match l.next(waited, size, size + a, 512) {
                    Next::Commit => break,
                    Next::Sleep(d) => {
                        prop_assert!(d > Duration::ZERO && d <= POLL);
                        waited += d;
                        prop_assert!(waited <= MS(max_ms));
                        size += a;
                    }
                }
            }
        }
    }
}
