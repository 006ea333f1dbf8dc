//! One lane per buffered stream: what the forwarder has read of it, in which order it
//! drains, and what degradation drops from it before it is sent.
//!
//! Why: priorities are decided here, in the agent, per publish — so a high-priority
//! message never waits behind a backlog of lower ones (only behind what is already in
//! flight, which the controller keeps small). Each lane reads its stream in bounded
//! chunks, oldest first or newest first.
//!
//! Invariants:
//! - Every stored record is read at most once per session (a new session resets the
//!   lanes and reads from scratch: whatever was not acknowledged is sent again).
//! - Newest-first: `taken` holds the seq ranges already read, sorted and disjoint; a
//!   read takes the newest records of the highest range not taken yet. Records only
//!   ever arrive above every existing seq, so a range found empty between two taken
//!   ones stays empty and the two are merged: `taken` stays short.
//! - A record dropped by degradation is deleted and recorded as a gap (`sampled` /
//!   `conflated`) in one store commit before the forwarder moves on; nothing it drops
//!   is ever sent, and nothing is dropped unrecorded.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::policy::{Degrade, Drain, Policies, Priority, Sampler};
use crate::record::StoredRecord;
use crate::store::{GapReason, Store, StoreError, StreamId};

/// Records and bytes read from the store at once, at most: one read transaction serves
/// many publishes, and read-ahead memory stays small whatever the backlog.
pub const READ_CHUNK_RECORDS: usize = 512;
pub const READ_CHUNK_BYTES: usize = 256 << 10;
/// Dropped records are deleted (and reported) in groups of up to this many, or after
/// `DROP_LINGER`: one gap notice per group, not one per chunk read — on a link too
/// slow for the data, notices must not eat what sampling saved.
const DROP_BATCH: usize = 4096;
const DROP_LINGER: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Debug)]
pub struct Lane {
    pub id: StreamId,
    pub name: String,
    pub priority: Priority,
    pub drain: Drain,
    /// Read, not yet packed (in read order).
    pub queue: VecDeque<StoredRecord>,
    /// Refused by the broker in a publish of several, or too large for it in one:
    /// sent again one per publish, before the queue, to find which one it refuses.
    pub retry: VecDeque<StoredRecord>,
    /// Nothing more to read until something is committed.
    pub caught_up: bool,
    /// When a partial batch must go anyway (set once the lane is caught up).
    pub linger_deadline: Option<tokio::time::Instant>,
    pub linger_expired: bool,
    /// Acknowledged upstream, waiting to be deleted.
    pub acked: Vec<u64>,
    /// When this lane last sent (round robin among lanes of one priority).
    pub served: u64,
    /// Oldest-first: the last seq read.
    cursor: Option<u64>,
    /// Newest-first: seq ranges read, sorted, disjoint, inclusive.
    taken: Vec<(u64, u64)>,
    sampler: Sampler,
    /// Dropped, not yet deleted; since when.
    dropped: Dropped,
    dropped_since: Option<std::time::Instant>,
}

/// What one fill dropped, per reason.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Dropped {
    pub sampled: Vec<u64>,
    pub conflated: Vec<u64>,
}

impl Lane {
    pub fn new(id: StreamId, name: String, priority: Priority, drain: Drain) -> Self {
        Self {
            id,
            name,
            priority,
            drain,
            queue: VecDeque::new(),
            retry: VecDeque::new(),
            caught_up: false,
            linger_deadline: None,
            linger_expired: false,
            acked: Vec::new(),
            served: 0,
            cursor: None,
            taken: Vec::new(),
            sampler: Sampler::default(),
            dropped: Dropped::default(),
            dropped_since: None,
        }
    }

    /// A new session: read everything not deleted again, from scratch (records
    /// dropped but not deleted yet are read again and judged again).
    pub fn reset(&mut self) {
        self.dropped = Dropped::default();
        self.dropped_since = None;
        self.queue.clear();
        self.retry.clear();
        self.caught_up = false;
        self.linger_deadline = None;
        self.linger_expired = false;
        self.cursor = None;
        self.taken.clear();
    }

    /// Read one chunk into the queue, dropping what degradation drops (`degraded`: this
    /// lane's priority is degraded now). Sets `caught_up` when nothing was left to read.
    pub async fn fill(
        &mut self,
        store: &Store,
        policies: &Arc<Policies>,
        degraded: bool,
    ) -> Result<(), StoreError> {
        let chunk = match self.drain {
            Drain::OldestFirst => {
                let chunk = store
                    .read(self.id, self.cursor, READ_CHUNK_RECORDS, READ_CHUNK_BYTES)
                    .await?;
                self.cursor = chunk.last().map(|r| r.seq).or(self.cursor);
                chunk
            }
            Drain::NewestFirst => self.read_newest(store).await?,
        };
        if chunk.is_empty() {
            self.caught_up = true;
            return Ok(());
        }
        if !degraded {
            self.queue.extend(chunk);
            return Ok(());
        }
        let id = self.id;
        let dropped = self.degrade(chunk, policies, |topic| store.newest(id, topic));
        if self.dropped_since.is_none()
            && !(dropped.sampled.is_empty() && dropped.conflated.is_empty())
        {
            self.dropped_since = Some(std::time::Instant::now());
        }
        self.dropped.sampled.extend(dropped.sampled);
        self.dropped.conflated.extend(dropped.conflated);
        if self.dropped.sampled.len() + self.dropped.conflated.len() >= DROP_BATCH {
            self.delete_dropped(store).await;
        }
        Ok(())
    }

    /// Delete what degradation dropped if it has waited `DROP_LINGER` (or `now`).
    pub async fn flush_dropped(&mut self, store: &Store, now: bool) {
        if self
            .dropped_since
            .is_some_and(|t| now || t.elapsed() >= DROP_LINGER)
        {
            self.delete_dropped(store).await;
        }
    }

    /// Delete the dropped records and record them as gaps (one per reason), in one
    /// commit each.
    async fn delete_dropped(&mut self, store: &Store) {
        self.dropped_since = None;
        let dropped = std::mem::take(&mut self.dropped);
        for (seqs, reason) in [
            (dropped.sampled, GapReason::Sampled),
            (dropped.conflated, GapReason::Conflated),
        ] {
            if seqs.is_empty() {
                continue;
            }
            let n = seqs.len();
            match store.discard(self.id, seqs, reason).await {
                Ok(done) => tracing::debug!(
                    stream = %self.name,
                    dropped = done,
                    reason = reason.as_str(),
                    "degraded: dropped (reported as a gap)"
                ),
                // They stay stored and are read again after the next reconnect.
                Err(e) => {
                    tracing::warn!(stream = %self.name, records = n, error = %e, "could not drop degraded records; they will be sent later")
                }
            }
        }
    }

    /// Queue what degradation keeps of `chunk`; return what it drops. `newest`: the seq
    /// of the newest stored message of a topic (conflation).
    fn degrade(
        &mut self,
        chunk: Vec<StoredRecord>,
        policies: &Policies,
        newest: impl Fn(&str) -> Option<u64>,
    ) -> Dropped {
        let backwards = self.drain == Drain::NewestFirst;
        let mut dropped = Dropped::default();
        for r in chunk {
            let keep = match policies.degrade_of(&r.record.topic) {
                Degrade::None => true,
                Degrade::Latest => {
                    let keep = newest(&r.record.topic).is_none_or(|n| n <= r.seq);
                    if !keep {
                        dropped.conflated.push(r.seq);
                    }
                    keep
                }
                Degrade::Sample(iv) => {
                    let keep = self
                        .sampler
                        .keep(&r.record.topic, r.record.ts_ms, iv, backwards);
                    if !keep {
                        dropped.sampled.push(r.seq);
                    }
                    keep
                }
            };
            if keep {
                self.queue.push_back(r);
            }
        }
        dropped
    }

    /// The newest records not read yet (see the module invariants).
    async fn read_newest(&mut self, store: &Store) -> Result<Vec<StoredRecord>, StoreError> {
        let mut k = self.taken.len();
        loop {
            let n = self.taken.len();
            let lower = (k > 0).then(|| self.taken[k - 1].1);
            let upper = if k == n {
                Some(u64::MAX)
            } else {
                self.taken[k].0.checked_sub(1)
            };
            let empty_interval = match (lower, upper) {
                (_, None) => true,
                (Some(l), Some(u)) => l >= u,
                (None, Some(_)) => false,
            };
            let chunk = match upper {
                Some(u) if !empty_interval => {
                    store
                        .read_newest(self.id, lower, u, READ_CHUNK_RECORDS, READ_CHUNK_BYTES)
                        .await?
                }
                _ => Vec::new(),
            };
            if let (Some(first), Some(last)) = (chunk.first(), chunk.last()) {
                let hi = if k == n {
                    first.seq
                } else {
                    upper.unwrap_or(first.seq)
                };
                self.insert_taken(k, (last.seq, hi));
                return Ok(chunk);
            }
            // Nothing between taken ranges k-1 and k, and nothing can arrive there.
            if k < n {
                if k > 0 {
                    self.taken[k - 1].1 = self.taken[k].1;
                    self.taken.remove(k);
                } else {
                    self.taken[0].0 = 0;
                }
            }
            if k == 0 {
                return Ok(Vec::new());
            }
            k -= 1;
        }
    }

    fn insert_taken(&mut self, at: usize, (lo, hi): (u64, u64)) {
        self.taken.insert(at, (lo, hi));
        if at + 1 < self.taken.len() && hi.checked_add(1) == Some(self.taken[at + 1].0) {
            self.taken[at].1 = self.taken[at + 1].1;
            self.taken.remove(at + 1);
        }
        if at > 0 && self.taken[at - 1].1.checked_add(1) == Some(lo) {
            self.taken[at - 1].1 = self.taken[at].1;
            self.taken.remove(at);
        }
    }
}

/// Fill `order` with lane indices in the order they are offered the next publish:
/// highest priority first, then the one served longest ago. (A buffer the caller keeps:
/// in passthrough mode this runs once per message.)
pub fn order(lanes: &[Lane], order: &mut Vec<usize>) {
    order.clear();
    order.extend(0..lanes.len());
    order.sort_unstable_by_key(|&i| (lanes[i].priority, lanes[i].served));
}

#[cfg(test)]
mod tests;
