//! Dead letters: records the central broker refused (MQTT 5 PUBACK reason ≥ 0x80, or
//! larger than its maximum packet size) as many times as `[upstream] max_attempts`
//! allows. They leave the queue — one record must not hold back the rest — and wait in
//! their own table until an operator retries (they are queued again, as new records)
//! or purges them (recorded as a gap, reason `purged`, and reported upstream like any
//! other loss).
//!
//! Invariants: a record is in the records table or the dead-letter table, never both
//! (moves happen in one transaction); dead letters count against the buffer's budget
//! (they are on disk) but not in any stream's backlog; a dead letter keeps its stream
//! and seq, so a purge's gap names exactly what never arrived.

use std::collections::HashMap;

use redb::{ReadableDatabase, ReadableTable};
use tokio::sync::oneshot;

use super::codec::{self, CorruptValue, GapValue};
use super::retention;
use super::state::State;
use super::{call, schema, AppendError, GapReason, Request, Store, StoreError, StreamId};
use crate::record::Record;

const DEAD_VERSION: u8 = 1;

/// A dead letter as `edgerelay dead-letters list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeadLetter {
    pub stream: String,
    pub seq: u64,
    pub topic: String,
    pub payload_bytes: usize,
    /// Why the broker refused it (the last refusal).
    pub reason: String,
    pub attempts: u32,
    /// When it was buried, Unix ms; when it was accepted at the gateway.
    pub dead_at_ms: u64,
    pub ts_ms: u64,
}

/// Which dead letters an operator command applies to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Which {
    All,
    Some(Vec<(String, u64)>),
}

/// The value of a dead-letter row: version, attempts, when, the reason, then the record
/// as the records table stores it.
pub(super) fn encode(attempts: u32, dead_at_ms: u64, reason: &str, record: &[u8]) -> Vec<u8> {
    let reason = &reason.as_bytes()[..reason.len().min(u16::MAX as usize)];
    let mut v = Vec::with_capacity(1 + 4 + 8 + 2 + reason.len() + record.len());
    v.push(DEAD_VERSION);
    v.extend_from_slice(&attempts.to_le_bytes());
    v.extend_from_slice(&dead_at_ms.to_le_bytes());
    v.extend_from_slice(&(reason.len() as u16).to_le_bytes());
    v.extend_from_slice(reason);
    v.extend_from_slice(record);
    v
}

/// (attempts, dead_at_ms, reason, the record's stored bytes).
pub(super) fn decode(v: &[u8]) -> Result<(u32, u64, String, &[u8]), CorruptValue> {
    let bad = |what| CorruptValue { what };
    if v.first() != Some(&DEAD_VERSION) || v.len() < 15 {
        return Err(bad("dead letter header"));
    }
    let attempts = u32::from_le_bytes([v[1], v[2], v[3], v[4]]);
    let mut at = [0u8; 8];
    at.copy_from_slice(&v[5..13]);
    let len = usize::from(u16::from_le_bytes([v[13], v[14]]));
    let reason = v.get(15..15 + len).ok_or(bad("dead letter reason"))?;
    Ok((
        attempts,
        u64::from_le_bytes(at),
        String::from_utf8_lossy(reason).into_owned(),
        &v[15 + len..],
    ))
}

/// A row of the table for listing.
pub(super) fn describe(stream: String, seq: u64, value: &[u8]) -> Result<DeadLetter, CorruptValue> {
    let (attempts, dead_at_ms, reason, stored) = decode(value)?;
    let r = codec::decode_record(stored)?;
    Ok(DeadLetter {
        stream,
        seq,
        topic: r.topic,
        payload_bytes: r.payload.len(),
        reason,
        attempts,
        dead_at_ms,
        ts_ms: r.ts_ms,
    })
}

/// Account a row of `value_len` bytes added to (or, `added = false`, removed from) the
/// dead letters.
pub(super) fn account(work: &mut State, value_len: usize, added: bool) {
    let cost = retention::entry_cost(value_len);
    if added {
        work.dead += 1;
        work.used += cost;
    } else {
        work.dead = work.dead.saturating_sub(1);
        work.used = work.used.saturating_sub(cost);
    }
}

/// The gap rows that purging `seqs` (sorted) of a stream leaves: contiguous runs.
pub(super) fn purge_gaps(seqs: &[u64]) -> Vec<(u64, GapValue)> {
    let mut out: Vec<(u64, GapValue)> = Vec::new();
    for &seq in seqs {
        match out.last_mut() {
            Some((_, g)) if g.last + 1 == seq => {
                g.last = seq;
                g.count += 1;
            }
            _ => out.push((
                seq,
                GapValue {
                    last: seq,
                    count: 1,
                    reason: GapReason::Purged,
                },
            )),
        }
    }
    out
}

/// The record a dead-letter row holds (for a retry).
pub(super) fn record_of(value: &[u8]) -> Result<Record, CorruptValue> {
    let (_, _, _, stored) = decode(value)?;
    codec::decode_record(stored)
}

/// Whether `which` selects the row `(stream name, seq)`.
pub(super) fn selects(which: &Which, stream: &str, seq: u64) -> bool {
    match which {
        Which::All => true,
        Which::Some(list) => list.iter().any(|(s, q)| s == stream && *q == seq),
    }
}

/// A dead letter on its way into the table.
#[derive(Debug)]
pub struct Burial {
    pub stream: StreamId,
    pub seq: u64,
    pub reason: String,
    pub attempts: u32,
}

/// The dead-letter operations, through the writer like every change.
impl Store {
    /// Move refused records to the dead letters (returns how many were still stored).
    pub async fn bury(&self, burials: Vec<Burial>) -> Result<u64, AppendError> {
        self.counted(|reply| Request::Bury { burials, reply }).await
    }

    /// Queue the dead letters `which` selects again, as new records at the end of
    /// their streams (returns how many; stops early when the buffer is full).
    pub async fn retry_dead_letters(&self, which: Which) -> Result<u64, AppendError> {
        self.counted(|reply| Request::DeadRetry { which, reply })
            .await
    }

    /// Delete the dead letters `which` selects, recording them as gaps (`purged`).
    pub async fn purge_dead_letters(&self, which: Which) -> Result<u64, AppendError> {
        self.counted(|reply| Request::DeadPurge { which, reply })
            .await
    }

    /// The same, for callers outside the async runtime (the CLI without an agent).
    pub fn retry_dead_letters_blocking(&self, which: Which) -> Result<u64, AppendError> {
        let (req, rx) = call(|reply| Request::DeadRetry { which, reply });
        self.tx
            .blocking_send(req)
            .map_err(|_| AppendError::Closed)?;
        rx.blocking_recv().unwrap_or(Err(AppendError::Closed))
    }

    pub fn purge_dead_letters_blocking(&self, which: Which) -> Result<u64, AppendError> {
        let (req, rx) = call(|reply| Request::DeadPurge { which, reply });
        self.tx
            .blocking_send(req)
            .map_err(|_| AppendError::Closed)?;
        rx.blocking_recv().unwrap_or(Err(AppendError::Closed))
    }

    async fn counted(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<u64, AppendError>>) -> Request,
    ) -> Result<u64, AppendError> {
        let (req, rx) = call(make);
        self.tx.send(req).await.map_err(|_| AppendError::Closed)?;
        rx.await.unwrap_or(Err(AppendError::Closed))
    }

    /// Up to `limit` dead letters, by stream and seq.
    pub fn dead_letters_blocking(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        let storage = |e: &dyn std::fmt::Display| StoreError::Storage {
            path: (*self.path).clone(),
            detail: e.to_string(),
        };
        let names: HashMap<u16, String> = self
            .stats()
            .streams
            .iter()
            .map(|s| (s.id.0, s.name.clone()))
            .collect();
        let txn = self.db()?.begin_read().map_err(|e| storage(&e))?;
        let table = match txn.open_table(schema::DEAD_LETTERS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(storage(&e)),
        };
        let mut out = Vec::new();
        for row in table.iter().map_err(|e| storage(&e))?.take(limit) {
            let (k, v) = row.map_err(|e| storage(&e))?;
            let (stream, seq) = k.value();
            let name = names
                .get(&stream)
                .cloned()
                .unwrap_or_else(|| format!("#{stream}"));
            match describe(name, seq, v.value()) {
                Ok(d) => out.push(d),
                Err(e) => tracing::warn!(stream, seq, error = %e, "unreadable dead letter skipped"),
            }
        }
        Ok(out)
    }

    pub async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.dead_letters_blocking(limit))
            .await
            .map_err(|_| StoreError::Closed)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip_and_runs_become_gaps() {
        let v = encode(3, 1_700_000_000_000, "packet too large (0x95)", b"stored");
        let (a, at, reason, stored) = decode(&v).expect("decodes");
        assert_eq!(
            (a, at, reason.as_str(), stored),
            (
                3,
                1_700_000_000_000,
                "packet too large (0x95)",
                &b"stored"[..]
            )
        );
        assert!(decode(&v[..10]).is_err(), "truncated");
        assert!(decode(&[9; 20]).is_err(), "unknown version");
        let gaps = purge_gaps(&[4, 5, 6, 9, 11, 12]);
        let runs: Vec<(u64, u64, u64)> = gaps.iter().map(|(f, g)| (*f, g.last, g.count)).collect();
        assert_eq!(runs, [(4, 6, 3), (9, 9, 1), (11, 12, 2)]);
        assert!(gaps.iter().all(|(_, g)| g.reason == GapReason::Purged));
        assert!(selects(&Which::All, "a", 1));
        let some = Which::Some(vec![("a".into(), 1)]);
        assert!(selects(&some, "a", 1) && !selects(&some, "a", 2) && !selects(&some, "b", 1));
    }
}
