//! The writer's in-memory view of the buffer (per-stream counters, accounted bytes),
//! loaded from the file at open and replaced only after a successful commit.

use std::collections::BTreeMap;
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable};

use super::codec::{GapValue, StreamState};
use super::schema::{DEAD_LETTERS, GAPS, STREAMS, STREAM_STATE};
use super::{StoreError, StoreStats, StreamId, StreamStats};

#[derive(Debug, Clone)]
pub struct StreamEntry {
    pub name: String,
    pub state: StreamState,
    /// The newest gap row of this stream, extended while evictions stay contiguous.
    pub open_gap: Option<(u64, GapValue)>,
}

#[derive(Debug, Clone, Default)]
pub struct State {
    pub streams: BTreeMap<u16, StreamEntry>,
    pub used: u64,
    pub commits: u64,
    pub rejected_full: u64,
    /// Rows of the dead-letter table.
    pub dead: u64,
}

impl State {
    pub fn stats(&self, budget: u64) -> StoreStats {
        StoreStats {
            streams: self
                .streams
                .iter()
                .map(|(id, s)| StreamStats {
                    id: StreamId(*id),
                    name: s.name.clone(),
                    state: s.state,
                })
                .collect(),
            used_bytes: self.used,
            budget_bytes: budget,
            commits: self.commits,
            rejected_full: self.rejected_full,
            dead_letters: self.dead,
        }
    }
}

pub fn load_state(db: &Database, path: &Path) -> Result<State, StoreError> {
    let err = |e: &dyn std::fmt::Display| StoreError::Corrupt {
        path: path.to_path_buf(),
        detail: e.to_string(),
    };
    let txn = db.begin_read().map_err(|e| err(&e))?;
    let names = txn.open_table(STREAMS).map_err(|e| err(&e))?;
    let states = txn.open_table(STREAM_STATE).map_err(|e| err(&e))?;
    let gaps = txn.open_table(GAPS).map_err(|e| err(&e))?;
    let mut state = State::default();
    for entry in names.iter().map_err(|e| err(&e))? {
        let (name, id) = entry.map_err(|e| err(&e))?;
        let id = id.value();
        let st = match states.get(id).map_err(|e| err(&e))? {
            Some(v) => StreamState::decode(v.value()).map_err(|e| err(&e))?,
            None => StreamState::default(),
        };
        let open_gap = match gaps
            .range((id, 0)..=(id, u64::MAX))
            .map_err(|e| err(&e))?
            .next_back()
        {
            Some(g) => {
                let (k, v) = g.map_err(|e| err(&e))?;
                Some((
                    k.value().1,
                    GapValue::decode(v.value()).map_err(|e| err(&e))?,
                ))
            }
            None => None,
        };
        state.used += st.bytes;
        state.streams.insert(
            id,
            StreamEntry {
                name: name.value().to_owned(),
                state: st,
                open_gap,
            },
        );
    }
    // A file from before dead letters has no such table: none.
    match txn.open_table(DEAD_LETTERS) {
        Ok(dead) => {
            for row in dead.iter().map_err(|e| err(&e))? {
                let (_, v) = row.map_err(|e| err(&e))?;
                super::dead::account(&mut state, v.value().len(), true);
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(err(&e)),
    }
    Ok(state)
}
