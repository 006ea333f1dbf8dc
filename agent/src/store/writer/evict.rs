//! The writer's evictions: what retention (store/retention.rs) decides to drop leaves
//! the records table here, inside the writer's commit, and is recorded as a gap in the
//! same transaction — so a record is either stored or covered by a gap notice.

use redb::ReadableTable;

use super::super::codec::{self, GapReason, GapValue};
use super::super::retention::{self, Head};
use super::super::state::State;
use super::{Effects, Tables, Writer, AGE_EVICT_CHUNK};

impl Writer {
    /// Evict globally-oldest records until at least `need` bytes are freed.
    pub(super) fn evict_bytes(
        &mut self,
        work: &mut State,
        t: &mut Tables<'_>,
        need: u64,
        reason: GapReason,
        fx: &mut Effects,
    ) -> Result<(), redb::Error> {
        let mut freed = 0u64;
        while freed < need {
            let mut heads = Vec::with_capacity(work.streams.len());
            for (id, s) in &work.streams {
                if s.state.count == 0 {
                    continue;
                }
                if let Some(entry) = t.records.range((*id, 0)..=(*id, u64::MAX))?.next() {
                    let (_, v) = entry?;
                    heads.push(Head {
                        stream: *id,
                        ts_ms: codec::peek_ts(v.value()).unwrap_or(0),
                    });
                }
            }
            let Some(victim) = retention::oldest_head(&heads) else {
                break;
            };
            freed += self.evict_head(work, t, victim, reason, fx)?;
        }
        Ok(())
    }

    /// Evict records older than max_age from every stream's head; true if more remain.
    pub(super) fn evict_by_age(
        &mut self,
        work: &mut State,
        t: &mut Tables<'_>,
        fx: &mut Effects,
    ) -> Result<bool, redb::Error> {
        let cutoff = retention::age_cutoff(
            (self.opts.clock)(),
            u64::try_from(self.opts.max_age.as_millis()).unwrap_or(u64::MAX),
        );
        let ids: Vec<u16> = work.streams.keys().copied().collect();
        let mut evicted = 0usize;
        for id in ids {
            loop {
                if evicted >= AGE_EVICT_CHUNK {
                    return Ok(true);
                }
                let expired = match t.records.range((id, 0)..=(id, u64::MAX))?.next() {
                    Some(entry) => {
                        let (_, v) = entry?;
                        codec::peek_ts(v.value()).unwrap_or(0) < cutoff
                    }
                    None => false,
                };
                if !expired {
                    break;
                }
                self.evict_head(work, t, id, GapReason::MaxAge, fx)?;
                evicted += 1;
            }
        }
        if evicted > 0 {
            tracing::warn!(evicted, max_age = ?self.opts.max_age, "records older than max_age dropped unsent (recorded as a gap)");
        }
        Ok(false)
    }

    /// Remove the head record of `stream`, account for it and record the gap. Returns the
    /// bytes freed.
    pub(super) fn evict_head(
        &mut self,
        work: &mut State,
        t: &mut Tables<'_>,
        stream: u16,
        reason: GapReason,
        fx: &mut Effects,
    ) -> Result<u64, redb::Error> {
        let head = match t.records.range((stream, 0)..=(stream, u64::MAX))?.next() {
            Some(entry) => {
                let (k, v) = entry?;
                Some((k.value().1, v.value().len()))
            }
            None => None,
        };
        let Some((seq, len)) = head else {
            return Ok(0);
        };
        t.records.remove((stream, seq))?;
        let cost = retention::entry_cost(len);
        work.used = work.used.saturating_sub(cost);
        fx.freed = true;
        fx.touched.push(stream);
        if let Some(s) = work.streams.get_mut(&stream) {
            s.state.count = s.state.count.saturating_sub(1);
            s.state.bytes = s.state.bytes.saturating_sub(cost);
            s.state.evicted += 1;
            let gap = match s.open_gap {
                Some((first, mut g))
                    if g.last.checked_add(1) == Some(seq) && g.reason == reason =>
                {
                    g.last = seq;
                    g.count += 1;
                    (first, g)
                }
                _ => (
                    seq,
                    GapValue {
                        last: seq,
                        count: 1,
                        reason,
                    },
                ),
            };
            t.gaps.insert((stream, gap.0), gap.1.encode().as_slice())?;
            s.open_gap = Some(gap);
        }
        Ok(cost)
    }
}
