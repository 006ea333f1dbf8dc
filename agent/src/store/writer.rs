//! The writer thread: the only place that opens redb write transactions.
//!
//! It takes requests from a bounded channel and commits them in groups (up to
//! `commit_max_records` requests; while several producers are active it waits up to
//! `commit_linger` for more, see linger.rs) in one fsynced transaction; only after the
//! commit succeeds are the replies sent.
//! Working state (per-stream counters) is copied per transaction and replaced only on a
//! successful commit, so a failed commit (e.g. ENOSPC) leaves memory and disk agreeing.

use std::sync::Arc;
use std::time::Instant;

use redb::{ReadableTable, Table, WriteTransaction};
use tokio::sync::watch;

use super::codec::{self, GapReason, GapValue, StreamState};
use super::disk::DiskRoom;
use super::handle::DbHandle;
use super::inbox::{Inbox, Recv};
use super::latest::LatestIndex;
use super::retention::{self, Admission};
use super::schema::{DEAD_LETTERS, GAPS, META, RECORDS, STREAMS, STREAM_STATE};
use super::state::{State, StreamEntry};
use super::{AppendError, Refused, Request, StoreError, StoreOptions, StoreStats, StreamId};

mod dead;
mod evict;
mod linger;
mod reply;

use linger::Linger;
use reply::{refuse_while_broken, Reply};

/// At most this many records are evicted by age in one transaction, so a huge expired
/// backlog does not make one commit (and every producer waiting on it) arbitrarily slow.
const AGE_EVICT_CHUNK: usize = 10_000;

pub struct Signals {
    pub committed: watch::Sender<u64>,
    pub freed: watch::Sender<u64>,
    pub stats: watch::Sender<Arc<StoreStats>>,
}

pub struct Writer {
    db: Arc<DbHandle>,
    /// A commit failed with an I/O error: redb refuses everything until the file is
    /// opened again (store/handle.rs), which the next commit tries first.
    broken: bool,
    disk: DiskRoom,
    opts: StoreOptions,
    state: State,
    rx: Inbox,
    signals: Signals,
    scratch: Vec<u8>,
    latest: Arc<std::sync::Mutex<LatestIndex>>,
    linger: Linger,
}

/// What one transaction changed, to decide which signals to raise.
#[derive(Default)]
struct Effects {
    appended: bool,
    freed: bool,
    touched: Vec<u16>,
    /// A meta value was written (no stream touched, but still a change to commit).
    meta_written: bool,
    more_age_work: bool,
    /// Appends to streams that track their newest message per topic.
    latest: Vec<(u16, String, u64)>,
}

impl Writer {
    pub fn new(
        db: Arc<DbHandle>,
        opts: StoreOptions,
        state: State,
        rx: Inbox,
        latest: Arc<std::sync::Mutex<LatestIndex>>,
        signals: Signals,
    ) -> Self {
        let linger = Linger::new(opts.commit_linger);
        Self {
            db,
            broken: false,
            disk: DiskRoom::new(opts.path.clone()),
            opts,
            state,
            rx,
            signals,
            scratch: Vec::with_capacity(1024),
            latest,
            linger,
        }
    }

    pub fn run(mut self) {
        let mut next_maintenance = Instant::now() + self.opts.maintenance_interval;
        let mut shutting_down = false;
        loop {
            let first = if shutting_down {
                match self.rx.try_recv() {
                    Some(r) => r,
                    None => break,
                }
            } else {
                match self.rx.recv_until(next_maintenance) {
                    Recv::Got(r) => r,
                    Recv::Timeout => {
                        let more = self.commit(Vec::new(), true);
                        next_maintenance = if more {
                            Instant::now()
                        } else {
                            Instant::now() + self.opts.maintenance_interval
                        };
                        continue;
                    }
                    Recv::Closed => break,
                }
            };
            let mut batch = Vec::with_capacity(64);
            match first {
                Request::Shutdown => {
                    shutting_down = true;
                    continue;
                }
                r => batch.push(r),
            }
            let started = Instant::now();
            let full = self.opts.commit_max_records;
            self.gather(&mut batch, &mut shutting_down);
            if !shutting_down && self.linger.start(batch.len(), full) {
                let mut sleep = self.linger.first_sleep();
                loop {
                    std::thread::sleep(sleep);
                    let before = batch.len();
                    self.gather(&mut batch, &mut shutting_down);
                    match self
                        .linger
                        .next(started.elapsed(), before, batch.len(), full)
                    {
                        _ if shutting_down => break,
                        linger::Next::Commit => break,
                        linger::Next::Sleep(d) => sleep = d,
                    }
                }
            }
            self.linger.committed(batch.len());
            let age_now = batch.iter().any(|r| matches!(r, Request::Maintain { .. }));
            self.commit(batch, age_now);
        }
        tracing::debug!("store writer stopped");
    }

    /// Takes what is queued now, without waiting, until the group is full.
    fn gather(&mut self, batch: &mut Vec<Request>, shutting_down: &mut bool) {
        while batch.len() < self.opts.commit_max_records {
            match self.rx.try_recv() {
                Some(Request::Shutdown) => *shutting_down = true,
                Some(r) => batch.push(r),
                None => break,
            }
        }
    }

    /// Test builds only: while the file named by EDGERELAY_TEST_HOLD_COMMITS exists,
    /// commits that append records wait — so a test can observe that nothing is
    /// acknowledged before its commit.
    #[cfg(feature = "test-hooks")]
    fn test_hold(&self, batch: &[Request]) {
        let Some(path) = std::env::var_os("EDGERELAY_TEST_HOLD_COMMITS") else {
            return;
        };
        let appends = batch
            .iter()
            .filter(|r| matches!(r, Request::Append { .. }))
            .count();
        if appends == 0 || !std::path::Path::new(&path).exists() {
            return;
        }
        tracing::info!(appends, "test hook: holding commit");
        while std::path::Path::new(&path).exists() {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        tracing::info!("test hook: commit released");
    }

    /// Apply `batch` (and age retention when `age` is set) in one transaction.
    /// Returns whether more expired records remain.
    fn commit(&mut self, batch: Vec<Request>, age: bool) -> bool {
        #[cfg(feature = "test-hooks")]
        self.test_hold(&batch);
        if self.broken {
            match self.db.reopen(&self.opts.path, self.opts.cache_size) {
                Ok(()) => {
                    self.broken = false;
                    tracing::warn!(path = %self.opts.path.display(), "buffer file reopened after the write error; committing again");
                }
                Err(e) => {
                    tracing::debug!(error = %e, "buffer file not reopened yet");
                    refuse_while_broken(batch);
                    return false;
                }
            }
            // Producers held by the failure try again.
            self.signals.freed.send_modify(|g| *g += 1);
        }
        let Some(db) = self.db.get() else {
            self.broken = true;
            refuse_while_broken(batch);
            return false;
        };
        let mut work = self.state.clone();
        let mut replies = Vec::with_capacity(batch.len());
        let mut effects = Effects::default();
        // What an error inside the transaction leaves unapplied is answered below.
        let mut pending = batch.into_iter();
        let result = (|| -> Result<WriteTransaction, redb::Error> {
            let txn = db.begin_write()?;
            {
                let mut tables = Tables {
                    records: txn.open_table(RECORDS)?,
                    gaps: txn.open_table(GAPS)?,
                    dead: txn.open_table(DEAD_LETTERS)?,
                    streams: txn.open_table(STREAMS)?,
                    meta: txn.open_table(META)?,
                };
                for req in pending.by_ref() {
                    let reply = self.apply(&mut work, &mut tables, req, &mut effects)?;
                    replies.push(reply);
                }
                if age {
                    effects.more_age_work =
                        self.evict_by_age(&mut work, &mut tables, &mut effects)?;
                }
                let mut states = txn.open_table(STREAM_STATE)?;
                effects.touched.sort_unstable();
                effects.touched.dedup();
                for id in &effects.touched {
                    if let Some(s) = work.streams.get(id) {
                        states.insert(*id, s.state.encode().as_slice())?;
                    }
                }
            }
            Ok(txn)
        })()
        .and_then(|txn| {
            if effects.touched.is_empty() && !effects.meta_written {
                // Nothing changed: skip the fsync.
                txn.abort()?;
            } else {
                txn.commit()?;
            }
            Ok(())
        });
        match result {
            Ok(()) => {
                work.commits += u64::from(!effects.touched.is_empty() || effects.meta_written);
                self.state = work;
                if !effects.latest.is_empty() {
                    if let Ok(mut l) = self.latest.lock() {
                        for (stream, topic, seq) in effects.latest.drain(..) {
                            l.committed(stream, &topic, seq);
                        }
                    }
                }
                if effects.appended {
                    self.signals.committed.send_modify(|g| *g += 1);
                }
                if effects.freed {
                    self.signals.freed.send_modify(|g| *g += 1);
                }
                if !effects.touched.is_empty() {
                    let _ = self
                        .signals
                        .stats
                        .send(Arc::new(self.state.stats(self.opts.budget.data_bytes)));
                }
                // Signals first, so a producer that sees its reply also sees the new stats.
                for r in replies {
                    r.send();
                }
                effects.more_age_work
            }
            Err(e) => {
                let detail = e.to_string();
                if matches!(e, redb::Error::Io(_) | redb::Error::PreviousIo) {
                    // ENOSPC, EIO: redb latches it; the file must be opened again.
                    self.broken = true;
                    self.disk.invalidate();
                }
                tracing::error!(error = %detail, path = %self.opts.path.display(), "buffer commit failed; nothing in it was acknowledged");
                for r in replies {
                    r.fail(&detail, self.broken);
                }
                if self.broken {
                    refuse_while_broken(pending.collect());
                }
                false
            }
        }
    }

    fn apply(
        &mut self,
        work: &mut State,
        t: &mut Tables<'_>,
        req: Request,
        fx: &mut Effects,
    ) -> Result<Reply, redb::Error> {
        Ok(match req {
            Request::Stream { name, reply } => {
                let existing = t.streams.get(name.as_str())?.map(|v| v.value());
                let res = match existing {
                    Some(id) => Ok(StreamId(id)),
                    None => {
                        let next = work
                            .streams
                            .keys()
                            .next_back()
                            .map_or(Some(0), |k| k.checked_add(1));
                        match next {
                            None => Err(StoreError::TooManyStreams),
                            Some(id) => {
                                t.streams.insert(name.as_str(), id)?;
                                work.streams.insert(
                                    id,
                                    StreamEntry {
                                        name,
                                        state: StreamState::default(),
                                        open_gap: None,
                                    },
                                );
                                fx.touched.push(id);
                                Ok(StreamId(id))
                            }
                        }
                    }
                };
                Reply::Stream(reply, res)
            }
            Request::Append {
                stream,
                record,
                reply,
            } => {
                let res = self.append(work, t, stream, &record, fx)?;
                if let Ok(seq) = res {
                    let tracked = self.latest.lock().is_ok_and(|l| l.is_tracked(stream.0));
                    if tracked {
                        fx.latest.push((stream.0, record.topic.clone(), seq));
                    }
                }
                // A refused record goes back to its producer, which may retry it
                // without having kept a copy.
                let source = record.origin.kind;
                match res {
                    Ok(seq) => Reply::Append(reply, Ok(seq), source, Some(record)),
                    Err(error) => Reply::Append(
                        reply,
                        Err(Refused {
                            error,
                            record: Some(record),
                        }),
                        source,
                        None,
                    ),
                }
            }
            Request::Ack {
                stream,
                seqs,
                reply,
            } => {
                for seq in seqs {
                    remove_record(work, t, stream.0, seq, fx)?;
                }
                Reply::Ack(reply)
            }
            Request::Maintain { reply } => Reply::Maintain(reply),
            Request::AckGaps { gaps, reply } => {
                for g in gaps {
                    self.ack_gap(work, t, g, fx)?;
                }
                Reply::Ack(Some(reply))
            }
            Request::Discard {
                stream,
                seqs,
                reason,
                reply,
            } => {
                let n = self.discard(work, t, stream.0, &seqs, reason, fx)?;
                Reply::Discard(reply, n)
            }
            Request::Bury { burials, reply } => {
                let n = self.bury(work, t, burials, fx)?;
                Reply::Discard(reply, n)
            }
            Request::DeadRetry { which, reply } => {
                let n = self.retry_dead(work, t, &which, fx)?;
                Reply::Discard(reply, n)
            }
            Request::DeadPurge { which, reply } => {
                let n = dead::purge_dead(work, t, &which, fx)?;
                Reply::Discard(reply, n)
            }
            Request::PutMeta { key, value, reply } => {
                t.meta.insert(key.as_str(), value.as_slice())?;
                fx.meta_written = true;
                Reply::Ack(Some(reply))
            }
            // Handled by the loop; never reaches a batch.
            Request::Shutdown => Reply::Ack(None),
        })
    }

    fn append(
        &mut self,
        work: &mut State,
        t: &mut Tables<'_>,
        stream: StreamId,
        record: &crate::record::Record,
        fx: &mut Effects,
    ) -> Result<Result<u64, AppendError>, redb::Error> {
        if !work.streams.contains_key(&stream.0) {
            return Ok(Err(AppendError::Storage(format!(
                "unknown stream id {}",
                stream.0
            ))));
        }
        let cost = retention::entry_cost(codec::encoded_len(record));
        // The disk may hold less than max_size allows: the budget is what both allow.
        let when_full = self.opts.budget.when_full;
        let disk_cap = self.disk.data_cap();
        let budget = retention::Budget {
            data_bytes: disk_cap.map_or(self.opts.budget.data_bytes, |c| {
                c.min(self.opts.budget.data_bytes)
            }),
            when_full,
        };
        let disk_bound = budget.data_bytes < self.opts.budget.data_bytes;
        match retention::admit(work.used, cost, &budget) {
            Admission::Fits => {}
            Admission::EvictThenFits(n) => {
                let reason = if disk_bound {
                    GapReason::DiskFull
                } else {
                    GapReason::MaxSize
                };
                self.evict_bytes(work, t, n, reason, fx)?
            }
            Admission::RejectFull => {
                work.rejected_full += 1;
                return Ok(Err(AppendError::Full));
            }
            // Too large for what the disk has left, not for max_size: full, for now.
            Admission::RejectTooLarge if disk_bound && cost <= self.opts.budget.data_bytes => {
                work.rejected_full += 1;
                return Ok(Err(AppendError::Full));
            }
            Admission::RejectTooLarge => {
                return Ok(Err(AppendError::TooLarge {
                    cost,
                    budget: self.opts.budget.data_bytes,
                }))
            }
        }
        codec::encode_record(record, &mut self.scratch);
        let Some(s) = work.streams.get_mut(&stream.0) else {
            return Ok(Err(AppendError::Storage(format!(
                "unknown stream id {}",
                stream.0
            ))));
        };
        let seq = s.state.next_seq;
        t.records.insert((stream.0, seq), self.scratch.as_slice())?;
        s.state.next_seq += 1;
        s.state.count += 1;
        s.state.bytes += cost;
        work.used += cost;
        fx.appended = true;
        fx.touched.push(stream.0);
        Ok(Ok(seq))
    }

    /// Delete the records of `seqs` still stored and record them as one gap.
    fn discard(
        &mut self,
        work: &mut State,
        t: &mut Tables<'_>,
        stream: u16,
        seqs: &[u64],
        reason: GapReason,
        fx: &mut Effects,
    ) -> Result<u64, redb::Error> {
        let (mut first, mut last, mut count) = (u64::MAX, 0u64, 0u64);
        for &seq in seqs {
            if !remove_record(work, t, stream, seq, fx)? {
                continue;
            }
            first = first.min(seq);
            last = last.max(seq);
            count += 1;
        }
        if count > 0 {
            // No gap can start at `first`: it was a stored record until now.
            t.gaps.insert(
                (stream, first),
                GapValue {
                    last,
                    count,
                    reason,
                }
                .encode()
                .as_slice(),
            )?;
        }
        Ok(count)
    }

    /// Forget a reported gap. If eviction extended it after it was read, keep the
    /// unreported tail as a gap of its own.
    fn ack_gap(
        &mut self,
        work: &mut State,
        t: &mut Tables<'_>,
        g: super::Gap,
        fx: &mut Effects,
    ) -> Result<(), redb::Error> {
        let key = (g.stream.0, g.first);
        let current = t
            .gaps
            .get(key)?
            .and_then(|v| GapValue::decode(v.value()).ok());
        let Some(current) = current else {
            return Ok(());
        };
        t.gaps.remove(key)?;
        fx.touched.push(g.stream.0);
        let rest = (current.last > g.last).then(|| {
            (
                g.last + 1,
                GapValue {
                    last: current.last,
                    count: current.count.saturating_sub(g.count),
                    reason: current.reason,
                },
            )
        });
        if let Some((first, v)) = rest {
            t.gaps.insert((g.stream.0, first), v.encode().as_slice())?;
        }
        if let Some(s) = work.streams.get_mut(&g.stream.0) {
            if s.open_gap.is_some_and(|(first, _)| first == g.first) {
                // Further contiguous evictions extend the unreported remainder, if any,
                // else start a new gap.
                s.open_gap = rest;
            }
        }
        Ok(())
    }
}

/// Delete one stored record (if still there) and account for it; true if it was.
fn remove_record(
    work: &mut State,
    t: &mut Tables<'_>,
    stream: u16,
    seq: u64,
    fx: &mut Effects,
) -> Result<bool, redb::Error> {
    let Some(len) = t.records.remove((stream, seq))?.map(|v| v.value().len()) else {
        return Ok(false);
    };
    let cost = retention::entry_cost(len);
    if let Some(s) = work.streams.get_mut(&stream) {
        s.state.count = s.state.count.saturating_sub(1);
        s.state.bytes = s.state.bytes.saturating_sub(cost);
    }
    work.used = work.used.saturating_sub(cost);
    fx.freed = true;
    fx.touched.push(stream);
    Ok(true)
}

struct Tables<'txn> {
    records: Table<'txn, (u16, u64), &'static [u8]>,
    gaps: Table<'txn, (u16, u64), &'static [u8]>,
    dead: Table<'txn, (u16, u64), &'static [u8]>,
    streams: Table<'txn, &'static str, u16>,
    meta: Table<'txn, &'static str, &'static [u8]>,
}
