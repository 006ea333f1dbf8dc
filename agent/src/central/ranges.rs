//! A compact set of u64 sequence numbers as sorted, disjoint, non-adjacent ranges: what
//! `unpack` remembers per (gateway, epoch, stream) to drop duplicates. Seqs arrive mostly
//! in order, so the set stays a handful of ranges however many records went through.
//!
//! Pure, property-tested against a `BTreeSet`.

use std::collections::BTreeMap;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    /// start → end (inclusive).
    ranges: BTreeMap<u64, u64>,
}

impl RangeSet {
    pub fn contains(&self, seq: u64) -> bool {
        self.ranges
            .range(..=seq)
            .next_back()
            .is_some_and(|(_, end)| *end >= seq)
    }

    /// Add `seq`; false if it was already there.
    pub fn insert(&mut self, seq: u64) -> bool {
        if self.contains(seq) {
            return false;
        }
        let mut start = seq;
        let mut end = seq;
        // Merge with a range ending just before.
        if let Some((&s, &e)) = self.ranges.range(..seq).next_back() {
            if e.checked_add(1) == Some(seq) {
                start = s;
                self.ranges.remove(&s);
            }
        }
        // Merge with a range starting just after.
        if let Some(next) = seq.checked_add(1) {
            if let Some(e) = self.ranges.remove(&next) {
                end = e;
            }
        }
        self.ranges.insert(start, end);
        true
    }

    pub fn len_ranges(&self) -> usize {
        self.ranges.len()
    }

    /// 16 bytes per range: start, end (little-endian).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.ranges.len() * 16);
        for (s, e) in &self.ranges {
            out.extend_from_slice(&s.to_le_bytes());
            out.extend_from_slice(&e.to_le_bytes());
        }
        out
    }

    /// `None` for bytes that are not a valid encoding (wrong length, overlapping or
    /// unsorted ranges).
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if !bytes.len().is_multiple_of(16) {
            return None;
        }
        let mut ranges = BTreeMap::new();
        let mut prev_end: Option<u64> = None;
        for chunk in bytes.chunks_exact(16) {
            let s = u64::from_le_bytes(chunk[..8].try_into().ok()?);
            let e = u64::from_le_bytes(chunk[8..].try_into().ok()?);
            if e < s || prev_end.is_some_and(|p| p.checked_add(1).is_none_or(|n| s <= n)) {
                return None;
            }
            prev_end = Some(e);
            ranges.insert(s, e);
        }
        Some(Self { ranges })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    proptest! {
        #[test]
        fn behaves_like_a_set(seqs in proptest::collection::vec(0u64..200, 0..300)) {
            let mut r = RangeSet::default();
            let mut model = BTreeSet::new();
            for s in seqs {
                prop_assert_eq!(r.insert(s), model.insert(s));
            }
            for s in 0..210 {
                prop_assert_eq!(r.contains(s), model.contains(&s));
            }
            prop_assert_eq!(RangeSet::decode(&r.encode()), Some(r.clone()));
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = RangeSet::decode(&bytes);
        }
    }

    #[test]
    fn in_order_stays_one_range_and_extremes_work() {
        let mut r = RangeSet::default();
        for s in 0..10_000 {
            r.insert(s);
        }
        assert_eq!(r.len_ranges(), 1);
        assert!(r.insert(u64::MAX));
        assert!(!r.insert(u64::MAX));
        assert!(r.insert(u64::MAX - 1));
        assert_eq!(r.len_ranges(), 2);
    }
}
