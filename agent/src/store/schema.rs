//! The redb tables of the buffer file, and opening/creating it safely.
//!
//! Invariants: an existing file is only ever opened, never re-created, so a corrupt or
//! foreign file is an error that names the path rather than an empty buffer silently
//! replacing acknowledged data; a new file gets its format marker and a random epoch in
//! the same transaction that creates its tables. Only `repair`, asked for by an
//! operator (`run --repair`), replaces a file, and it never deletes one: the old file is
//! renamed beside it and the loss is recorded in the new file as a gap notice, which
//! the uplink reports upstream like any other.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, TableDefinition};

use super::codec::{GapReason, GapValue, StreamState};
use super::StoreError;

pub const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
pub const STREAMS: TableDefinition<&str, u16> = TableDefinition::new("streams");
pub const STREAM_STATE: TableDefinition<u16, &[u8]> = TableDefinition::new("stream_state");
pub const RECORDS: TableDefinition<(u16, u64), &[u8]> = TableDefinition::new("records");
pub const GAPS: TableDefinition<(u16, u64), &[u8]> = TableDefinition::new("gaps");
/// Records the broker refused too often (store/dead.rs); created by the first write of
/// a file from before it existed.
pub const DEAD_LETTERS: TableDefinition<(u16, u64), &[u8]> = TableDefinition::new("dead_letters");

/// Written once at creation; checked at every open.
pub const FORMAT: &[u8] = b"edgerelay-buffer/1";
const KEY_FORMAT: &str = "format";
const KEY_EPOCH: &str = "epoch";

pub struct Opened {
    pub db: Database,
    pub epoch: u64,
    pub created: bool,
}

pub fn open(path: &Path, cache_size: usize) -> Result<Opened, StoreError> {
    let exists = path.exists();
    let mut builder = Database::builder();
    builder.set_cache_size(cache_size);
    let result = if exists {
        builder.open(path)
    } else {
        builder.create(path)
    };
    let db = result.map_err(|e| map_open_error(path, e))?;
    if exists {
        let epoch = read_meta(&db, path)?;
        Ok(Opened {
            db,
            epoch,
            created: false,
        })
    } else {
        let epoch = init(&db).map_err(|e| StoreError::Storage {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        Ok(Opened {
            db,
            epoch,
            created: true,
        })
    }
}

fn map_open_error(path: &Path, e: redb::DatabaseError) -> StoreError {
    let path = path.to_path_buf();
    match e {
        redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Locked { path },
        // A file shorter than its header says (truncated) reads as UnexpectedEof:
        // corruption, not an I/O problem of the system.
        redb::DatabaseError::Storage(redb::StorageError::Io(io))
            if !matches!(
                io.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
            ) =>
        {
            StoreError::Io { path, source: io }
        }
        other => StoreError::Corrupt {
            path,
            detail: other.to_string(),
        },
    }
}

fn init(db: &Database) -> Result<u64, redb::Error> {
    let epoch: u64 = rand::random::<u64>() | 1; // never 0, so 0 can mean "unknown" on the wire
    let txn = db.begin_write()?;
    {
        let mut meta = txn.open_table(META)?;
        meta.insert(KEY_FORMAT, FORMAT)?;
        meta.insert(KEY_EPOCH, epoch.to_le_bytes().as_slice())?;
        txn.open_table(STREAMS)?;
        txn.open_table(STREAM_STATE)?;
        txn.open_table(RECORDS)?;
        txn.open_table(GAPS)?;
        txn.open_table(DEAD_LETTERS)?;
    }
    txn.commit()?;
    Ok(epoch)
}

fn read_meta(db: &Database, path: &Path) -> Result<u64, StoreError> {
    let foreign = |detail: &str| StoreError::Foreign {
        path: PathBuf::from(path),
        detail: detail.to_owned(),
    };
    let txn = db.begin_read().map_err(|e| foreign(&e.to_string()))?;
    let meta = match txn.open_table(META) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => {
            return Err(foreign("no edgerelay meta table"))
        }
        Err(e) => return Err(foreign(&e.to_string())),
    };
    let format = meta
        .get(KEY_FORMAT)
        .map_err(|e| foreign(&e.to_string()))?
        .ok_or_else(|| foreign("no format marker"))?;
    if format.value() != FORMAT {
        return Err(foreign(&format!(
            "format marker {:?}, expected {:?}",
            String::from_utf8_lossy(format.value()),
            String::from_utf8_lossy(FORMAT)
        )));
    }
    let epoch = meta
        .get(KEY_EPOCH)
        .map_err(|e| foreign(&e.to_string()))?
        .ok_or_else(|| foreign("no epoch"))?;
    let bytes: [u8; 8] = epoch
        .value()
        .try_into()
        .map_err(|_| foreign("epoch is not 8 bytes"))?;
    Ok(u64::from_le_bytes(bytes))
}

/// What `repair` did.
#[derive(Debug, PartialEq, Eq)]
pub enum Repair {
    /// The file opened (or did not exist): nothing to do.
    Healthy,
    /// The file was unreadable: renamed to `moved_to`, replaced by an empty one holding
    /// a `buffer_lost` gap notice.
    Replaced { moved_to: PathBuf, detail: String },
}

/// The stream name of the `buffer_lost` notice: all streams of the lost file.
pub const LOST_STREAM: &str = "*";

/// Open `path`; if it is corrupt or not an edgerelay buffer, move it aside (to
/// `{path}.corrupt-{unix seconds}`), create a fresh one, and record the loss in it.
/// A locked file or an I/O error (permissions, a missing directory) is returned as is:
/// moving the file would not mend those.
pub fn repair(path: &Path, cache_size: usize) -> Result<Repair, StoreError> {
    if !path.exists() {
        return Ok(Repair::Healthy);
    }
    let detail = match open(path, cache_size) {
        Ok(_) => return Ok(Repair::Healthy),
        Err(e @ (StoreError::Corrupt { .. } | StoreError::Foreign { .. })) => e.to_string(),
        Err(e) => return Err(e),
    };
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut moved_to = PathBuf::from(format!("{}.corrupt-{secs}", path.display()));
    let mut n = 1;
    while moved_to.exists() {
        moved_to = PathBuf::from(format!("{}.corrupt-{secs}-{n}", path.display()));
        n += 1;
    }
    let io = |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    };
    std::fs::rename(path, &moved_to).map_err(io)?;
    let opened = open(path, cache_size)?;
    record_loss(&opened.db).map_err(|e| StoreError::Storage {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    Ok(Repair::Replaced { moved_to, detail })
}

/// A `buffer_lost` gap on stream "*" (id 0 of the fresh file), committed at once.
fn record_loss(db: &Database) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    {
        let id = 0u16;
        txn.open_table(STREAMS)?.insert(LOST_STREAM, id)?;
        let state = StreamState {
            next_seq: 1,
            ..StreamState::default()
        };
        txn.open_table(STREAM_STATE)?
            .insert(id, state.encode().as_slice())?;
        let gap = GapValue {
            last: 0,
            count: 0,
            reason: GapReason::BufferLost,
        };
        txn.open_table(GAPS)?
            .insert((id, 0), gap.encode().as_slice())?;
    }
    txn.commit()?;
    Ok(())
}
