//! The writer's dead-letter transactions: burying refused records, queueing dead
//! letters again, purging them. Each runs inside the writer's commit like any other
//! change, so a record is in exactly one of the records and dead-letter tables.

use redb::ReadableTable;

use super::super::dead;
use super::super::state::State;
use super::super::StreamId;
use super::{remove_record, Effects, Tables, Writer};

impl Writer {
    /// Move the records of `burials` still stored to the dead letters.
    pub(super) fn bury(
        &mut self,
        work: &mut State,
        t: &mut Tables<'_>,
        burials: Vec<dead::Burial>,
        fx: &mut Effects,
    ) -> Result<u64, redb::Error> {
        let mut n = 0;
        let now = crate::record::now_ms();
        for b in burials {
            let key = (b.stream.0, b.seq);
            let Some(stored) = t.records.get(key)?.map(|v| v.value().to_vec()) else {
                continue;
            };
            remove_record(work, t, b.stream.0, b.seq, fx)?;
            let value = dead::encode(b.attempts, now, &b.reason, &stored);
            t.dead.insert(key, value.as_slice())?;
            dead::account(work, value.len(), true);
            n += 1;
        }
        Ok(n)
    }

    /// Queue the dead letters `which` selects again as new records; stops at the first
    /// the buffer refuses (it stays a dead letter).
    pub(super) fn retry_dead(
        &mut self,
        work: &mut State,
        t: &mut Tables<'_>,
        which: &dead::Which,
        fx: &mut Effects,
    ) -> Result<u64, redb::Error> {
        let mut n = 0;
        for ((stream, seq), value) in dead_rows(work, t, which)? {
            let Ok(record) = dead::record_of(&value) else {
                tracing::warn!(stream, seq, "unreadable dead letter left in place");
                continue;
            };
            match self.append(work, t, StreamId(stream), &record, fx)? {
                Ok(_) => {
                    t.dead.remove((stream, seq))?;
                    dead::account(work, value.len(), false);
                    n += 1;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "retrying dead letters stopped: the buffer refused one");
                    break;
                }
            }
        }
        Ok(n)
    }
}

/// A dead-letter row: ((stream, seq), value).
type DeadRow = ((u16, u64), Vec<u8>);

/// The dead-letter rows `which` selects.
fn dead_rows(
    work: &State,
    t: &Tables<'_>,
    which: &dead::Which,
) -> Result<Vec<DeadRow>, redb::Error> {
    let mut rows = Vec::new();
    for row in t.dead.iter()? {
        let (k, v) = row?;
        let (stream, seq) = k.value();
        let name = work.streams.get(&stream).map_or("", |s| s.name.as_str());
        if dead::selects(which, name, seq) {
            rows.push(((stream, seq), v.value().to_vec()));
        }
    }
    Ok(rows)
}

/// Delete the dead letters `which` selects, recording each run of them as a gap
/// (`purged`): what is purged is reported upstream like any other loss.
pub(super) fn purge_dead(
    work: &mut State,
    t: &mut Tables<'_>,
    which: &dead::Which,
    fx: &mut Effects,
) -> Result<u64, redb::Error> {
    let rows = dead_rows(work, t, which)?;
    let mut by_stream: std::collections::BTreeMap<u16, Vec<u64>> = Default::default();
    for ((stream, seq), value) in &rows {
        t.dead.remove((*stream, *seq))?;
        dead::account(work, value.len(), false);
        by_stream.entry(*stream).or_default().push(*seq);
    }
    for (stream, mut seqs) in by_stream {
        seqs.sort_unstable();
        for (first, gap) in dead::purge_gaps(&seqs) {
            t.gaps.insert((stream, first), gap.encode().as_slice())?;
        }
        // The transaction must commit (and the uplink look for gaps).
        fx.touched.push(stream);
    }
    Ok(rows.len() as u64)
}
