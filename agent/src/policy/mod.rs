//! Policies: which stream a message goes to, how urgent that stream is, what may be
//! dropped from it while the link cannot keep up, and in which order its backlog drains.
//!
//! Why: a gateway's data is not all equal. An alarm must overtake an hour of buffered
//! temperature readings; a reading superseded by a newer one of the same sensor is worth
//! little on a link that cannot carry everything. `[[policy]]` tables say so per topic
//! filter; this module is the pure core that answers, per topic, "which stream, which
//! degradation" and, per stream, "which priority, which drain order".
//!
//! Invariants:
//! - The first policy whose filter matches a topic decides; topics no policy matches go
//!   to the `default` stream (normal priority, never degraded, oldest first) — so a
//!   config without policies behaves exactly as before policies existed.
//! - Policies that share a stream agree on its priority and drain order (config
//!   validation refuses anything else), so a stream has one of each.
//! - High priority is never degraded (validation refuses `degrade` on it).
//! - Sampling state is bounded: at most `MAX_SAMPLED_TOPICS` topics are remembered; past
//!   that, a topic without state keeps its next message (never a silent extra drop).

use std::collections::HashMap;
use std::time::Duration;

use rumqttc::mqttbytes::matches;

/// Name of the stream for topics no policy matches.
pub const DEFAULT_STREAM: &str = "default";

/// Topics whose last kept timestamp a [`Sampler`] remembers at most.
pub const MAX_SAMPLED_TOPICS: usize = 16_384;

/// How urgent a stream is: lower sorts first, and goes first upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    High,
    Normal,
    Low,
}

impl Priority {
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// What may be dropped from a topic while its priority is degraded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Degrade {
    None,
    /// Keep only the newest message per topic (conflation).
    Latest,
    /// Keep one message per topic per interval (by the message's own timestamp).
    Sample(Duration),
}

/// Order in which a stream's backlog is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    OldestFirst,
    NewestFirst,
}

impl Drain {
    pub fn as_str(self) -> &'static str {
        match self {
            Drain::OldestFirst => "oldest-first",
            Drain::NewestFirst => "newest-first",
        }
    }
}

/// One `[[policy]]` table, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// MQTT topic filters (wildcards allowed).
    pub topics: Vec<String>,
    /// The stream its messages are buffered and uploaded in.
    pub stream: String,
    pub priority: Priority,
    pub degrade: Degrade,
    pub drain: Drain,
}

/// A stream as the uplink schedules it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamPolicy {
    pub name: String,
    pub priority: Priority,
    pub drain: Drain,
}

/// All policies, in file order (`[[policy]]`). Only built by [`Policies::new`] (also
/// behind `Default`): it always has the `default` stream, which routing falls back to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policies {
    list: Vec<Policy>,
    /// Distinct streams, the default one last; index = position.
    streams: Vec<StreamPolicy>,
    /// Stream index of each policy.
    stream_of_policy: Vec<usize>,
}

impl Default for Policies {
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

impl Policies {
    /// `list` must be validated (see `config`): consistent streams, no degraded high.
    pub fn new(list: Vec<Policy>) -> Self {
        let mut streams: Vec<StreamPolicy> = Vec::new();
        let mut stream_of_policy = Vec::with_capacity(list.len());
        for p in &list {
            let i = match streams.iter().position(|s| s.name == p.stream) {
                Some(i) => i,
                None => {
                    streams.push(StreamPolicy {
                        name: p.stream.clone(),
                        priority: p.priority,
                        drain: p.drain,
                    });
                    streams.len() - 1
                }
            };
            stream_of_policy.push(i);
        }
        if !streams.iter().any(|s| s.name == DEFAULT_STREAM) {
            streams.push(StreamPolicy {
                name: DEFAULT_STREAM.to_owned(),
                priority: Priority::Normal,
                drain: Drain::OldestFirst,
            });
        }
        Self {
            list,
            streams,
            stream_of_policy,
        }
    }

    pub fn list(&self) -> &[Policy] {
        &self.list
    }

    /// Every stream messages can go to (at least `default`).
    pub fn streams(&self) -> &[StreamPolicy] {
        &self.streams
    }

    fn policy_of(&self, topic: &str) -> Option<usize> {
        self.list
            .iter()
            .position(|p| p.topics.iter().any(|f| matches(topic, f)))
    }

    fn default_index(&self) -> usize {
        self.streams
            .iter()
            .position(|s| s.name == DEFAULT_STREAM)
            .unwrap_or(0)
    }

    /// Index (into [`Policies::streams`]) of the stream `topic` goes to.
    pub fn stream_of(&self, topic: &str) -> usize {
        self.policy_of(topic)
            .map_or_else(|| self.default_index(), |i| self.stream_of_policy[i])
    }

    /// What may be dropped from `topic` while its priority is degraded.
    pub fn degrade_of(&self, topic: &str) -> Degrade {
        self.policy_of(topic)
            .map_or(Degrade::None, |i| self.list[i].degrade)
    }

    /// Whether any policy conflates (`degrade = "latest"`) in stream `index`: only those
    /// streams need the store to track the newest message per topic.
    pub fn conflates(&self, index: usize) -> bool {
        self.list
            .iter()
            .zip(&self.stream_of_policy)
            .any(|(p, s)| *s == index && p.degrade == Degrade::Latest)
    }
}

/// Decides which messages `degrade = "sample:INTERVAL"` keeps: one per topic per
/// interval, by timestamp, in the order the messages are read (forwards when a stream
/// drains oldest first, backwards when newest first).
#[derive(Debug, Default)]
pub struct Sampler {
    /// Timestamp (ms) of the last message kept, per topic.
    kept: HashMap<String, u64>,
}

impl Sampler {
    /// Whether to keep a message of `topic` stamped `ts_ms`; remembers it if kept.
    pub fn keep(&mut self, topic: &str, ts_ms: u64, interval: Duration, backwards: bool) -> bool {
        let iv = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
        let keep = match self.kept.get(topic) {
            None => true,
            Some(&last) if backwards => ts_ms.saturating_add(iv) <= last || ts_ms > last,
            Some(&last) => ts_ms >= last.saturating_add(iv) || ts_ms < last,
        };
        if keep {
            if let Some(v) = self.kept.get_mut(topic) {
                *v = ts_ms;
            } else if self.kept.len() < MAX_SAMPLED_TOPICS {
                self.kept.insert(topic.to_owned(), ts_ms);
            }
        }
        keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(topics: &[&str], stream: &str, priority: Priority, degrade: Degrade) -> Policy {
        Policy {
            topics: topics.iter().map(|s| s.to_string()).collect(),
            stream: stream.into(),
            priority,
            degrade,
            drain: Drain::OldestFirst,
        }
    }

    #[test]
    fn first_match_decides_and_the_rest_goes_to_default() {
        let p = Policies::new(vec![
            policy(&["alarms/#"], "alarms", Priority::High, Degrade::None),
            policy(&["sensors/+/temp"], "bulk", Priority::Low, Degrade::Latest),
            policy(
                &["sensors/#"],
                "bulk",
                Priority::Low,
                Degrade::Sample(Duration::from_secs(10)),
            ),
        ]);
        let names: Vec<&str> = p.streams().iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["alarms", "bulk", "default"]);
        assert_eq!(p.stream_of("alarms/fire"), 0);
        assert_eq!(p.stream_of("sensors/a/temp"), 1);
        assert_eq!(p.degrade_of("sensors/a/temp"), Degrade::Latest);
        assert_eq!(
            p.degrade_of("sensors/a/hum"),
            Degrade::Sample(Duration::from_secs(10))
        );
        assert_eq!(p.stream_of("other"), 2);
        assert_eq!(p.degrade_of("other"), Degrade::None);
        assert!(p.conflates(1));
        assert!(!p.conflates(0));
        assert!(!p.conflates(2));
    }

    #[test]
    fn no_policies_means_one_default_stream() {
        let p = Policies::new(Vec::new());
        assert_eq!(p.streams().len(), 1);
        assert_eq!(p.streams()[0].name, DEFAULT_STREAM);
        assert_eq!(p.streams()[0].priority, Priority::Normal);
        assert_eq!(p.stream_of("x/y"), 0);
    }

    #[test]
    fn a_policy_may_name_the_default_stream() {
        let p = Policies::new(vec![policy(
            &["a"],
            "default",
            Priority::Low,
            Degrade::None,
        )]);
        assert_eq!(p.streams().len(), 1);
        assert_eq!(p.streams()[0].priority, Priority::Low);
    }

    #[test]
    fn sampling_keeps_one_per_interval_per_topic() {
        let mut s = Sampler::default();
        let iv = Duration::from_secs(10);
        let kept: Vec<u64> = (0..35u64)
            .map(|i| i * 1000)
            .filter(|ts| s.keep("a", *ts, iv, false))
            .collect();
        assert_eq!(kept, [0, 10_000, 20_000, 30_000]);
        // Another topic has its own clock.
        assert!(s.keep("b", 5_000, iv, false));
    }

    #[test]
    fn sampling_backwards_keeps_the_newest_of_each_interval() {
        let mut s = Sampler::default();
        let iv = Duration::from_secs(10);
        let kept: Vec<u64> = (0..35u64)
            .rev()
            .map(|i| i * 1000)
            .filter(|ts| s.keep("a", *ts, iv, true))
            .collect();
        assert_eq!(kept, [34_000, 24_000, 14_000, 4_000]);
    }

    proptest! {
        /// Kept messages of one topic are at least an interval apart (read in order),
        /// and every dropped one is within an interval of the last kept.
        #[test]
        fn sampled_gaps_are_at_least_the_interval(
            steps in proptest::collection::vec(0u64..5_000, 1..200),
            iv_ms in 1u64..20_000,
        ) {
            let mut s = Sampler::default();
            let iv = Duration::from_millis(iv_ms);
            let mut ts = 0u64;
            let mut last_kept: Option<u64> = None;
            for step in steps {
                ts += step;
                let keep = s.keep("t", ts, iv, false);
                match last_kept {
                    None => prop_assert!(keep),
                    Some(l) => prop_assert_eq!(keep, ts >= l + iv_ms),
                }
                if keep { last_kept = Some(ts); }
            }
        }
    }
}
