//! The newest committed seq per topic, for streams that conflate (`degrade = "latest"`).
//!
//! Why here: only the writer sees every append as it commits; the uplink, which decides
//! what to drop, sees the stream from its head and cannot know whether a newer message
//! of the same topic is already buffered behind what it reads.
//!
//! Invariants: an entry is updated only after the commit that made its record durable,
//! so a record is conflated only in favour of one that really is on disk. Memory is
//! bounded (`MAX_TOPICS` per store); a topic that found no room is simply never
//! conflated — an extra message sent, never an extra one dropped. After a restart the
//! index starts empty and fills as new messages arrive.

use std::collections::{HashMap, HashSet};

/// Topics remembered across all tracked streams, at most.
pub const MAX_TOPICS: usize = 65_536;

#[derive(Debug, Default)]
pub struct LatestIndex {
    tracked: HashSet<u16>,
    newest: HashMap<u16, HashMap<String, u64>>,
    len: usize,
}

impl LatestIndex {
    pub fn track(&mut self, stream: u16) {
        self.tracked.insert(stream);
    }

    pub fn is_tracked(&self, stream: u16) -> bool {
        self.tracked.contains(&stream)
    }

    /// Record `seq` (just committed) as the newest of `topic` in `stream`.
    pub fn committed(&mut self, stream: u16, topic: &str, seq: u64) {
        if !self.tracked.contains(&stream) {
            return;
        }
        let topics = self.newest.entry(stream).or_default();
        if let Some(v) = topics.get_mut(topic) {
            *v = (*v).max(seq);
        } else if self.len < MAX_TOPICS {
            topics.insert(topic.to_owned(), seq);
            self.len += 1;
        }
    }

    /// The newest committed seq of `topic` in `stream`, if known.
    pub fn newest(&self, stream: u16, topic: &str) -> Option<u64> {
        self.newest.get(&stream)?.get(topic).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_tracked_streams_and_bounded() {
        let mut l = LatestIndex::default();
        l.committed(1, "a", 5);
        assert_eq!(l.newest(1, "a"), None);
        l.track(1);
        l.committed(1, "a", 5);
        l.committed(1, "a", 3);
        assert_eq!(l.newest(1, "a"), Some(5));
        for i in 0..MAX_TOPICS + 10 {
            l.committed(1, &format!("t{i}"), i as u64);
        }
        assert!(l.len <= MAX_TOPICS);
        // Known topics still move forward when the index is full.
        l.committed(1, "a", 99);
        assert_eq!(l.newest(1, "a"), Some(99));
        assert_eq!(l.newest(1, &format!("t{}", MAX_TOPICS + 5)), None);
    }
}
