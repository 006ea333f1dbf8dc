//! The durable buffer: a redb-backed queue of records per stream.
//!
//! Why: the agent's promise is "acknowledged means on disk". Every append goes to one
//! writer thread that commits groups of records in a single fsynced redb transaction and
//! only then completes each producer's acknowledgement.
//!
//! Invariants:
//! - redb never runs on the async executor: writes on the writer thread, reads through
//!   `spawn_blocking`.
//! - Sequence numbers are per stream, persisted, and never repeat (not even after the
//!   records holding them are deleted or evicted).
//! - The only ways a record leaves unsent are retention (`max_age`, `max_size` under
//!   drop-oldest); each such range is recorded in the gaps table.
//! - Memory is bounded: a fixed redb cache, bounded request channel, bounded reads.

mod codec;
pub mod dead;
mod disk;
mod handle;
mod inbox;
mod latest;
mod retention;
mod schema;
mod state;
mod writer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable};
use tokio::sync::{mpsc, oneshot, watch};

pub use codec::{GapReason, StreamState};
pub use retention::{Budget, WhenFull, DATA_FRACTION_PERCENT};
pub use schema::{Repair, LOST_STREAM};

use crate::record::{Record, StoredRecord};

/// Smallest `max_size` accepted: below it redb's region allocation overhead makes the
/// file size unpredictable relative to the data held (measured: 2.1× at 8 MiB, 1.06×
/// from 32 MiB up).
pub const MIN_MAX_SIZE: u64 = 32 << 20;

/// Identifies a stream inside the store file (assigned on first use, persisted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(pub u16);

/// The longest the writer waits for more requests while several producers are active
/// (writer/linger.rs): at 5,000 msg/s from 200 devices it cut the agent's CPU per
/// message by half; longer waits gained little more (docs/benchmarks.md).
pub const DEFAULT_COMMIT_LINGER: Duration = Duration::from_millis(20);

/// Milliseconds since the Unix epoch; injectable so tests control ageing.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

#[derive(Clone)]
pub struct StoreOptions {
    /// The buffer file (e.g. `{data_dir}/buffer.redb`).
    pub path: PathBuf,
    pub budget: Budget,
    pub max_age: Duration,
    /// Group commit: at most this many requests per transaction...
    pub commit_max_records: usize,
    /// ...and, while several producers are active, wait at most this long after the
    /// first one for more (never for a lone producer; writer/linger.rs).
    pub commit_linger: Duration,
    /// redb page cache; bounds the store's memory whatever the backlog.
    pub cache_size: usize,
    /// Capacity of the request channel (producers wait when it is full).
    pub queue_depth: usize,
    /// How often retention by age runs.
    pub maintenance_interval: Duration,
    pub clock: Clock,
}

impl std::fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreOptions")
            .field("path", &self.path)
            .field("budget", &self.budget)
            .field("max_age", &self.max_age)
            .field("commit_max_records", &self.commit_max_records)
            .field("commit_linger", &self.commit_linger)
            .field("cache_size", &self.cache_size)
            .finish_non_exhaustive()
    }
}

impl StoreOptions {
    pub fn new(path: impl Into<PathBuf>, max_size: u64, when_full: WhenFull) -> Self {
        Self {
            path: path.into(),
            budget: Budget::from_max_size(max_size, when_full),
            max_age: Duration::from_secs(2 * 3600),
            commit_max_records: 512,
            commit_linger: DEFAULT_COMMIT_LINGER,
            cache_size: 1 << 20,
            queue_depth: 4096,
            maintenance_interval: Duration::from_secs(1),
            clock: Arc::new(crate::record::now_ms),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("buffer file {path} is in use by another edgerelay process (only one agent may use a data_dir)")]
    Locked { path: PathBuf },
    #[error("buffer file {path} is corrupt or not a redb database: {detail}; `edgerelay run --repair` moves it aside and starts with an empty buffer (its unsent data is lost, and reported upstream as lost)")]
    Corrupt { path: PathBuf, detail: String },
    #[error("{path} is not an edgerelay buffer file ({detail}); refusing to use it (check [agent] data_dir; `edgerelay run --repair` moves it aside and starts an empty buffer)")]
    Foreign { path: PathBuf, detail: String },
    #[error("cannot open buffer file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("buffer file {path}: {detail}")]
    Storage { path: PathBuf, detail: String },
    #[error("corrupt record in buffer stream {stream} seq {seq}: {detail}")]
    CorruptRecord {
        stream: u16,
        seq: u64,
        detail: String,
    },
    #[error("the store is closed")]
    Closed,
    #[error("too many streams (at most 65535)")]
    TooManyStreams,
}

/// Why an append was not acknowledged. The producer must not acknowledge its sender.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AppendError {
    #[error("buffer full (when_full = reject-new)")]
    Full,
    #[error("record of {cost} bytes exceeds the whole buffer budget of {budget} bytes")]
    TooLarge { cost: u64, budget: u64 },
    #[error("commit failed: {0}")]
    Storage(String),
    #[error("the store is closed")]
    Closed,
}

impl AppendError {
    /// The `reason` label of the rejected-messages metric.
    pub fn reason(&self) -> &'static str {
        match self {
            AppendError::Full => "buffer_full",
            AppendError::TooLarge { .. } => "too_large",
            AppendError::Storage(_) => "storage",
            AppendError::Closed => "closed",
        }
    }
}

/// A refused append: why, and the record itself when the writer still had it, so a
/// producer can retry without keeping its own copy.
#[derive(Debug)]
pub struct Refused {
    pub error: AppendError,
    pub record: Option<Record>,
}

/// Per-stream figures after the latest commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStats {
    pub id: StreamId,
    pub name: String,
    pub state: StreamState,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub streams: Vec<StreamStats>,
    /// Accounted bytes stored, and the budget they are held to.
    pub used_bytes: u64,
    pub budget_bytes: u64,
    pub commits: u64,
    pub rejected_full: u64,
    /// Records in the dead-letter table.
    pub dead_letters: u64,
}

/// A stored range that left the buffer unsent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    pub stream: StreamId,
    pub first: u64,
    pub last: u64,
    pub count: u64,
    pub reason: GapReason,
}

pub(crate) enum Request {
    Stream {
        name: String,
        reply: oneshot::Sender<Result<StreamId, StoreError>>,
    },
    Append {
        stream: StreamId,
        record: Record,
        reply: oneshot::Sender<Result<u64, Refused>>,
    },
    Ack {
        stream: StreamId,
        seqs: Vec<u64>,
        reply: Option<oneshot::Sender<Result<(), AppendError>>>,
    },
    Maintain {
        reply: oneshot::Sender<()>,
    },
    /// Gaps reported upstream: delete them (or the reported part of one that grew).
    AckGaps {
        gaps: Vec<Gap>,
        reply: oneshot::Sender<Result<(), AppendError>>,
    },
    /// Records dropped by degradation (sampling, conflation): delete those still stored
    /// and record them as one gap with `reason`.
    Discard {
        stream: StreamId,
        seqs: Vec<u64>,
        reason: GapReason,
        reply: oneshot::Sender<Result<u64, AppendError>>,
    },
    /// Move records the broker refused too often to the dead letters.
    Bury {
        burials: Vec<dead::Burial>,
        reply: oneshot::Sender<Result<u64, AppendError>>,
    },
    /// Queue dead letters again (as new records), or purge them (as gaps).
    DeadRetry {
        which: dead::Which,
        reply: oneshot::Sender<Result<u64, AppendError>>,
    },
    DeadPurge {
        which: dead::Which,
        reply: oneshot::Sender<Result<u64, AppendError>>,
    },
    /// Set a value other parts keep with the buffer (see [`Store::put_meta`]).
    PutMeta {
        key: String,
        value: Vec<u8>,
        reply: oneshot::Sender<Result<(), AppendError>>,
    },
    Shutdown,
}

/// Keys other parts store in the meta table live under this prefix, apart from the
/// buffer's own (format, epoch), which they can then never overwrite.
const APP_META: &str = "app/";

/// Cheap, cloneable handle to the store.
#[derive(Clone)]
pub struct Store {
    tx: mpsc::Sender<Request>,
    db: Arc<handle::DbHandle>,
    path: Arc<PathBuf>,
    epoch: u64,
    committed: watch::Receiver<u64>,
    freed: watch::Receiver<u64>,
    stats: watch::Receiver<Arc<StoreStats>>,
    names: Arc<std::sync::Mutex<HashMap<String, StreamId>>>,
    latest: Arc<std::sync::Mutex<latest::LatestIndex>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

/// Owns the writer thread; `close` stops it after everything queued is committed.
#[derive(Debug)]
pub struct StoreThread {
    tx: Option<mpsc::Sender<Request>>,
    handle: Option<JoinHandle<()>>,
}

impl StoreThread {
    /// Commit what is queued, stop the writer and wait for it. Blocking: call from
    /// `spawn_blocking` or outside the runtime.
    pub fn close(mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.blocking_send(Request::Shutdown);
        }
        if let Some(h) = self.handle.take() {
            if h.join().is_err() {
                tracing::error!("store writer thread panicked");
            }
        }
    }
}

impl Drop for StoreThread {
    fn drop(&mut self) {
        // Only reached on early-exit paths; never block on a full queue here (this may
        // run inside the async runtime): our sender is dropped either way, so the writer
        // also stops once the last `Store` handle is gone.
        if let Some(tx) = self.tx.take() {
            let _ = tx.try_send(Request::Shutdown);
        }
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A submitted append; resolves once the record is committed (or refused).
#[derive(Debug)]
pub struct PendingAppend(oneshot::Receiver<Result<u64, Refused>>);

impl std::future::Future for PendingAppend {
    type Output = Result<u64, AppendError>;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx).map(|r| {
            r.unwrap_or(Err(Refused {
                error: AppendError::Closed,
                record: None,
            }))
            .map_err(|r| r.error)
        })
    }
}

impl PendingAppend {
    pub fn blocking_wait(self) -> Result<u64, AppendError> {
        self.0
            .blocking_recv()
            .unwrap_or(Err(Refused {
                error: AppendError::Closed,
                record: None,
            }))
            .map_err(|r| r.error)
    }
}

impl Store {
    /// The open database, or an error while the writer reopens it after an I/O error.
    fn db(&self) -> Result<Arc<Database>, StoreError> {
        self.db.get().ok_or_else(|| StoreError::Storage {
            path: self.path.to_path_buf(),
            detail: "the buffer file is being reopened after a write error".into(),
        })
    }

    /// `run --repair`: if the buffer file is corrupt or not an edgerelay buffer, move
    /// it aside and start an empty one that reports the loss upstream (schema::repair).
    pub fn repair(opts: &StoreOptions) -> Result<Repair, StoreError> {
        schema::repair(&opts.path, opts.cache_size)
    }

    /// Open (or create) the buffer file and start the writer thread.
    pub fn open(opts: StoreOptions) -> Result<(Store, StoreThread), StoreError> {
        if let Some(dir) = opts.path.parent() {
            create_private_dir(dir).map_err(|source| StoreError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let opened = schema::open(&opts.path, opts.cache_size)?;
        let state = state::load_state(&opened.db, &opts.path)?;
        let db = Arc::new(handle::DbHandle::new(opened.db));
        let (tx, rx) = mpsc::channel(opts.queue_depth.max(1));
        let inbox = inbox::Inbox::new(rx).map_err(|source| StoreError::Io {
            path: opts.path.clone(),
            source,
        })?;

        let names: HashMap<String, StreamId> = state
            .streams
            .iter()
            .map(|(id, s)| (s.name.clone(), StreamId(*id)))
            .collect();
        let (committed_tx, committed) = watch::channel(0u64);
        let (freed_tx, freed) = watch::channel(0u64);
        let (stats_tx, stats) = watch::channel(Arc::new(state.stats(opts.budget.data_bytes)));
        let path = Arc::new(opts.path.clone());
        let latest = Arc::new(std::sync::Mutex::new(latest::LatestIndex::default()));
        let w = writer::Writer::new(
            db.clone(),
            opts,
            state,
            inbox,
            latest.clone(),
            writer::Signals {
                committed: committed_tx,
                freed: freed_tx,
                stats: stats_tx,
            },
        );
        let handle = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || w.run())
            .map_err(|source| StoreError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        if opened.created {
            tracing::info!(path = %path.display(), epoch = opened.epoch, "created buffer");
        } else {
            tracing::info!(path = %path.display(), epoch = opened.epoch, "opened buffer");
        }
        let store = Store {
            tx: tx.clone(),
            db,
            path,
            epoch: opened.epoch,
            committed,
            freed,
            stats,
            names: Arc::new(std::sync::Mutex::new(names)),
            latest,
        };
        Ok((
            store,
            StoreThread {
                tx: Some(tx),
                handle: Some(handle),
            },
        ))
    }

    /// Random id of this buffer file, fixed at creation; with (stream, seq) it identifies
    /// a record uniquely even after the buffer is recreated.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The id of stream `name`, created (durably) on first use.
    pub async fn stream(&self, name: &str) -> Result<StreamId, StoreError> {
        if let Some(id) = self.lookup_stream(name) {
            return Ok(id);
        }
        let (req, rx) = call(|reply| Request::Stream {
            name: name.to_owned(),
            reply,
        });
        self.tx.send(req).await.map_err(|_| StoreError::Closed)?;
        let id = rx.await.map_err(|_| StoreError::Closed)??;
        self.remember_stream(name, id);
        Ok(id)
    }

    /// Blocking variant of [`Store::stream`] for threads outside the runtime.
    pub fn stream_blocking(&self, name: &str) -> Result<StreamId, StoreError> {
        if let Some(id) = self.lookup_stream(name) {
            return Ok(id);
        }
        let (req, rx) = call(|reply| Request::Stream {
            name: name.to_owned(),
            reply,
        });
        self.tx.blocking_send(req).map_err(|_| StoreError::Closed)?;
        let id = rx.blocking_recv().map_err(|_| StoreError::Closed)??;
        self.remember_stream(name, id);
        Ok(id)
    }

    fn lookup_stream(&self, name: &str) -> Option<StreamId> {
        self.names.lock().ok().and_then(|m| m.get(name).copied())
    }

    fn remember_stream(&self, name: &str, id: StreamId) {
        if let Ok(mut m) = self.names.lock() {
            m.insert(name.to_owned(), id);
        }
    }

    /// Queue an append; waits only for room in the request channel (back-pressure), not
    /// for the commit. Await the returned future for the commit.
    pub async fn submit(
        &self,
        stream: StreamId,
        record: Record,
    ) -> Result<PendingAppend, AppendError> {
        let (req, rx) = call(|reply| Request::Append {
            stream,
            record,
            reply,
        });
        self.tx.send(req).await.map_err(|_| AppendError::Closed)?;
        Ok(PendingAppend(rx))
    }

    /// Blocking submit for threads outside the runtime (benchmarks, tests).
    pub fn submit_blocking(
        &self,
        stream: StreamId,
        record: Record,
    ) -> Result<PendingAppend, AppendError> {
        let (req, rx) = call(|reply| Request::Append {
            stream,
            record,
            reply,
        });
        self.tx
            .blocking_send(req)
            .map_err(|_| AppendError::Closed)?;
        Ok(PendingAppend(rx))
    }

    /// Append and wait for the commit; returns the record's sequence number.
    pub async fn append(&self, stream: StreamId, record: Record) -> Result<u64, AppendError> {
        self.submit(stream, record).await?.await
    }

    /// Like [`Store::append`], but a refused record comes back with the refusal, so the
    /// caller can retry it without cloning it up front.
    pub async fn append_or_return(&self, stream: StreamId, record: Record) -> Result<u64, Refused> {
        let (req, rx) = call(|reply| Request::Append {
            stream,
            record,
            reply,
        });
        if let Err(mpsc::error::SendError(Request::Append { record, .. })) = self.tx.send(req).await
        {
            return Err(Refused {
                error: AppendError::Closed,
                record: Some(record),
            });
        }
        rx.await.unwrap_or(Err(Refused {
            error: AppendError::Closed,
            record: None,
        }))
    }

    /// Delete records confirmed upstream. Waits for the commit.
    pub async fn ack(&self, stream: StreamId, seqs: Vec<u64>) -> Result<(), AppendError> {
        if seqs.is_empty() {
            return Ok(());
        }
        let (req, rx) = call(|reply| Request::Ack {
            stream,
            seqs,
            reply: Some(reply),
        });
        self.tx.send(req).await.map_err(|_| AppendError::Closed)?;
        rx.await.unwrap_or(Err(AppendError::Closed))
    }

    pub fn ack_blocking(&self, stream: StreamId, seqs: Vec<u64>) -> Result<(), AppendError> {
        let (req, rx) = call(|reply| Request::Ack {
            stream,
            seqs,
            reply: Some(reply),
        });
        self.tx
            .blocking_send(req)
            .map_err(|_| AppendError::Closed)?;
        rx.blocking_recv().unwrap_or(Err(AppendError::Closed))
    }

    /// Run retention by age now (it also runs every `maintenance_interval`).
    pub fn maintain_blocking(&self) -> Result<(), StoreError> {
        let (req, rx) = call(|reply| Request::Maintain { reply });
        self.tx.blocking_send(req).map_err(|_| StoreError::Closed)?;
        rx.blocking_recv().map_err(|_| StoreError::Closed)
    }

    /// Up to `max_records` records (and roughly `max_bytes` of payload, at least one
    /// record) of `stream` with seq > `after`, oldest first.
    pub async fn read(
        &self,
        stream: StreamId,
        after: Option<u64>,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredRecord>, StoreError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            this.read_blocking(stream, after, max_records, max_bytes)
        })
        .await
        .map_err(|_| StoreError::Closed)?
    }

    pub fn read_blocking(
        &self,
        stream: StreamId,
        after: Option<u64>,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredRecord>, StoreError> {
        if after == Some(u64::MAX) {
            return Ok(Vec::new());
        }
        let start = after.map_or(0, |a| a.saturating_add(1));
        self.scan(stream, start, u64::MAX, false, max_records, max_bytes)
    }

    /// Up to `max_records` records (and roughly `max_bytes`, at least one record) of
    /// `stream` with `above < seq <= upto`, newest first (for `drain = "newest-first"`).
    pub async fn read_newest(
        &self,
        stream: StreamId,
        above: Option<u64>,
        upto: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredRecord>, StoreError> {
        if above.is_some_and(|a| a >= upto) {
            return Ok(Vec::new());
        }
        let start = above.map_or(0, |a| a.saturating_add(1));
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            this.scan(stream, start, upto, true, max_records, max_bytes)
        })
        .await
        .map_err(|_| StoreError::Closed)?
    }

    /// Records of `stream` with seq in `from..=to`, ascending or (`newest_first`)
    /// descending, bounded like [`Store::read`].
    fn scan(
        &self,
        stream: StreamId,
        from: u64,
        to: u64,
        newest_first: bool,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredRecord>, StoreError> {
        let storage = |e: &dyn std::fmt::Display| StoreError::Storage {
            path: self.path.to_path_buf(),
            detail: e.to_string(),
        };
        let txn = self.db()?.begin_read().map_err(|e| storage(&e))?;
        let table = txn.open_table(schema::RECORDS).map_err(|e| storage(&e))?;
        let range = table
            .range((stream.0, from)..=(stream.0, to))
            .map_err(|e| storage(&e))?;
        let entries: Box<dyn Iterator<Item = _>> = if newest_first {
            Box::new(range.rev())
        } else {
            Box::new(range)
        };
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for entry in entries {
            let (k, v) = entry.map_err(|e| storage(&e))?;
            let (_, seq) = k.value();
            let record =
                codec::decode_record(v.value()).map_err(|e| StoreError::CorruptRecord {
                    stream: stream.0,
                    seq,
                    detail: e.to_string(),
                })?;
            bytes += record.payload.len() + record.topic.len();
            out.push(StoredRecord { seq, record });
            if out.len() >= max_records || bytes >= max_bytes {
                break;
            }
        }
        Ok(out)
    }

    /// Drop records on purpose (degradation): those of `seqs` still stored are deleted
    /// and recorded as one gap of `reason` spanning them, in the same commit. Returns
    /// how many were dropped (records evicted meanwhile are already in a gap).
    pub async fn discard(
        &self,
        stream: StreamId,
        seqs: Vec<u64>,
        reason: GapReason,
    ) -> Result<u64, AppendError> {
        if seqs.is_empty() {
            return Ok(0);
        }
        let (req, rx) = call(|reply| Request::Discard {
            stream,
            seqs,
            reason,
            reply,
        });
        self.tx.send(req).await.map_err(|_| AppendError::Closed)?;
        rx.await.unwrap_or(Err(AppendError::Closed))
    }

    /// Keep track of the newest message per topic in `stream` from now on (for
    /// conflation, see [`Store::newest`]).
    pub fn track_latest(&self, stream: StreamId) {
        if let Ok(mut l) = self.latest.lock() {
            l.track(stream.0);
        }
    }

    /// The seq of the newest committed message of `topic` in a tracked `stream`.
    pub fn newest(&self, stream: StreamId, topic: &str) -> Option<u64> {
        self.latest.lock().ok()?.newest(stream.0, topic)
    }

    /// Gaps were reported upstream: forget them. A gap that grew since it was read keeps
    /// its unreported part.
    pub async fn ack_gaps(&self, gaps: Vec<Gap>) -> Result<(), AppendError> {
        if gaps.is_empty() {
            return Ok(());
        }
        let (req, rx) = call(|reply| Request::AckGaps { gaps, reply });
        self.tx.send(req).await.map_err(|_| AppendError::Closed)?;
        rx.await.unwrap_or(Err(AppendError::Closed))
    }

    /// Recorded gaps, oldest first (async; see [`Store::gaps_blocking`]).
    pub async fn gaps(&self, limit: usize) -> Result<Vec<Gap>, StoreError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.gaps_blocking(limit))
            .await
            .map_err(|_| StoreError::Closed)?
    }

    /// Recorded gaps (ranges that left the buffer unsent), oldest first.
    pub fn gaps_blocking(&self, limit: usize) -> Result<Vec<Gap>, StoreError> {
        let storage = |e: &dyn std::fmt::Display| StoreError::Storage {
            path: self.path.to_path_buf(),
            detail: e.to_string(),
        };
        let txn = self.db()?.begin_read().map_err(|e| storage(&e))?;
        let table = txn.open_table(schema::GAPS).map_err(|e| storage(&e))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| storage(&e))?.take(limit) {
            let (k, v) = entry.map_err(|e| storage(&e))?;
            let (stream, first) = k.value();
            let g = codec::GapValue::decode(v.value()).map_err(|e| StoreError::CorruptRecord {
                stream,
                seq: first,
                detail: e.to_string(),
            })?;
            out.push(Gap {
                stream: StreamId(stream),
                first,
                last: g.last,
                count: g.count,
                reason: g.reason,
            });
        }
        Ok(out)
    }

    /// Keep `value` under `key` with the buffer, durably (e.g. the uplink's dictionary
    /// in use, so a restart does not retrain).
    pub async fn put_meta(&self, key: &str, value: Vec<u8>) -> Result<(), AppendError> {
        let (req, rx) = call(|reply| Request::PutMeta {
            key: format!("{APP_META}{key}"),
            value,
            reply,
        });
        self.tx.send(req).await.map_err(|_| AppendError::Closed)?;
        rx.await.unwrap_or(Err(AppendError::Closed))
    }

    /// The value kept under `key`, if any.
    pub fn meta_blocking(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let storage = |e: &dyn std::fmt::Display| StoreError::Storage {
            path: self.path.to_path_buf(),
            detail: e.to_string(),
        };
        let txn = self.db()?.begin_read().map_err(|e| storage(&e))?;
        let table = txn.open_table(schema::META).map_err(|e| storage(&e))?;
        let value = table
            .get(format!("{APP_META}{key}").as_str())
            .map_err(|e| storage(&e))?
            .map(|v| v.value().to_vec());
        Ok(value)
    }

    /// Changes after every commit that appended records.
    pub fn committed(&self) -> watch::Receiver<u64> {
        self.committed.clone()
    }

    /// Changes after every commit that freed space (acks, evictions).
    pub fn freed(&self) -> watch::Receiver<u64> {
        self.freed.clone()
    }

    pub fn stats(&self) -> Arc<StoreStats> {
        self.stats.borrow().clone()
    }
}

/// A request for the writer and the receiver of its reply.
fn call<T>(make: impl FnOnce(oneshot::Sender<T>) -> Request) -> (Request, oneshot::Receiver<T>) {
    let (reply, rx) = oneshot::channel();
    (make(reply), rx)
}

/// The data directory holds unsent messages: owner-only access.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(test)]
mod tests;
