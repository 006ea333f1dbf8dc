//! The shared handle to the open redb database, which the writer may replace.
//!
//! Why: after an I/O error — ENOSPC in the middle of a commit, say — redb refuses every
//! later operation (`PreviousIo`) until the file is opened again. The writer takes the
//! database out of this handle, waits for readers to let go, and opens the file again
//! (redb recovers it to the last committed transaction), so the agent resumes when
//! space returns, without a restart.
//!
//! Invariants: a reader holds the database for one read only; while it is out, reads
//! fail with a storage error (their callers retry) and nothing is committed, so nothing
//! is acknowledged.

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use redb::Database;

/// How long the writer waits for readers to drop the old database.
const READERS_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct DbHandle {
    slot: RwLock<Option<Arc<Database>>>,
}

impl DbHandle {
    pub fn new(db: Database) -> Self {
        Self {
            slot: RwLock::new(Some(Arc::new(db))),
        }
    }

    /// The open database; None while the writer reopens it.
    pub fn get(&self) -> Option<Arc<Database>> {
        self.slot.read().ok().and_then(|s| s.clone())
    }

    /// Close the database and open the file again. On failure (the disk still full,
    /// say) the handle stays empty and the next call tries again.
    pub fn reopen(&self, path: &Path, cache_size: usize) -> Result<(), String> {
        let old = match self.slot.write() {
            Ok(mut s) => s.take(),
            Err(_) => return Err("database handle poisoned".into()),
        };
        if let Some(old) = old {
            let deadline = Instant::now() + READERS_GRACE;
            while Arc::strong_count(&old) > 1 {
                if Instant::now() > deadline {
                    if let Ok(mut s) = self.slot.write() {
                        *s = Some(old);
                    }
                    return Err("readers still hold the buffer file".into());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            drop(old);
        }
        let mut builder = Database::builder();
        builder.set_cache_size(cache_size);
        let db = builder.open(path).map_err(|e| e.to_string())?;
        if let Ok(mut s) = self.slot.write() {
            *s = Some(Arc::new(db));
        }
        Ok(())
    }
}
