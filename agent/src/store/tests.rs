//! Store tests: a model-based property test against an in-memory model, and the
//! open-time safety checks (locked, corrupt, foreign files).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;

use super::codec::{encoded_len, GapReason};
use super::retention::entry_cost;
use super::*;
use crate::record::{Origin, OriginKind, Record};

fn record(topic: &str, payload_len: usize, ts: u64, fill: u8) -> Record {
    Record {
        topic: topic.to_owned(),
        payload: Bytes::from(vec![fill; payload_len]),
        qos: 1,
        retain: false,
        origin: Origin {
            kind: OriginKind::Socket,
            name: Arc::from("test"),
        },
        ts_ms: ts,
    }
}

fn options(
    dir: &std::path::Path,
    max_size: u64,
    when_full: WhenFull,
    clock: Arc<AtomicU64>,
) -> StoreOptions {
    let mut o = StoreOptions::new(dir.join("buffer.redb"), max_size, when_full);
    o.max_age = Duration::from_millis(1_000);
    o.commit_linger = Duration::ZERO;
    o.maintenance_interval = Duration::from_secs(3600);
    o.clock = Arc::new(move || clock.load(Ordering::SeqCst));
    o
}

/// 1 MiB, drop-oldest, a clock stopped at 0.
fn small_options(dir: &std::path::Path) -> StoreOptions {
    options(
        dir,
        1 << 20,
        WhenFull::DropOldest,
        Arc::new(AtomicU64::new(0)),
    )
}

#[derive(Debug, Clone)]
enum Op {
    Append {
        stream: usize,
        len: usize,
        dt: u64,
    },
    Read {
        stream: usize,
        skip: usize,
    },
    Ack {
        stream: usize,
        picks: Vec<usize>,
        bogus: bool,
    },
    Age {
        advance: u64,
    },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0usize..3, 0usize..220, 0u64..40).prop_map(|(stream, len, dt)| Op::Append { stream, len, dt }),
        2 => (0usize..3, 0usize..5).prop_map(|(stream, skip)| Op::Read { stream, skip }),
        3 => (0usize..3, proptest::collection::vec(0usize..8, 0..5), any::<bool>())
            .prop_map(|(stream, picks, bogus)| Op::Ack { stream, picks, bogus }),
        1 => (0u64..600).prop_map(|advance| Op::Age { advance }),
        1 => Just(Op::Reopen),
    ]
}

#[derive(Default)]
struct Model {
    streams: [BTreeMap<u64, Record>; 3],
    next_seq: [u64; 3],
    evicted: [Vec<(u64, GapReason)>; 3],
    used: u64,
}

impl Model {
    fn cost(r: &Record) -> u64 {
        entry_cost(encoded_len(r))
    }

    fn evict_head(&mut self, s: usize, reason: GapReason) -> u64 {
        let Some((&seq, _)) = self.streams[s].iter().next() else {
            return 0;
        };
        let r = self.streams[s].remove(&seq).expect("head exists");
        let c = Self::cost(&r);
        self.used -= c;
        self.evicted[s].push((seq, reason));
        c
    }

    fn append(&mut self, s: usize, r: Record, budget: &Budget) -> Result<u64, AppendError> {
        let c = Self::cost(&r);
        if c > budget.data_bytes {
            return Err(AppendError::TooLarge {
                cost: c,
                budget: budget.data_bytes,
            });
        }
        if self.used + c > budget.data_bytes {
            if budget.when_full == WhenFull::RejectNew {
                return Err(AppendError::Full);
            }
            let need = self.used + c - budget.data_bytes;
            let mut freed = 0;
            while freed < need {
                let victim = (0..3)
                    .filter_map(|i| self.streams[i].values().next().map(|r| (r.ts_ms, i)))
                    .min();
                let Some((_, v)) = victim else { break };
                freed += self.evict_head(v, GapReason::MaxSize);
            }
        }
        let seq = self.next_seq[s];
        self.next_seq[s] += 1;
        self.used += c;
        self.streams[s].insert(seq, r);
        Ok(seq)
    }
}

fn check_against_model(store: &Store, ids: &[StreamId; 3], model: &Model) {
    for (i, id) in ids.iter().enumerate() {
        let got = store
            .read_blocking(*id, None, usize::MAX, usize::MAX)
            .expect("read");
        let want: Vec<(u64, Record)> = model.streams[i]
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        let got: Vec<(u64, Record)> = got.into_iter().map(|r| (r.seq, r.record)).collect();
        assert_eq!(got, want, "stream {i} contents");
    }
    let stats = store.stats();
    assert_eq!(stats.used_bytes, model.used, "accounted bytes");
    // Every evicted seq is covered by exactly one gap of the right reason.
    let gaps = store.gaps_blocking(usize::MAX).expect("gaps");
    for (i, id) in ids.iter().enumerate() {
        let mut covered = Vec::new();
        for g in gaps.iter().filter(|g| g.stream == *id) {
            assert_eq!(g.count, g.last - g.first + 1, "gap count matches its range");
            for seq in g.first..=g.last {
                covered.push((seq, g.reason));
            }
        }
        covered.sort();
        let mut want = model.evicted[i].clone();
        want.sort();
        assert_eq!(covered, want, "gaps of stream {i}");
        let st = stats
            .streams
            .iter()
            .find(|s| s.id == *id)
            .expect("stream stats");
        assert_eq!(st.state.evicted, model.evicted[i].len() as u64);
        assert_eq!(st.state.count, model.streams[i].len() as u64);
        assert_eq!(st.state.next_seq, model.next_seq[i]);
    }
}

fn run_model(ops: Vec<Op>, max_size: u64, when_full: WhenFull) {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(AtomicU64::new(1_000_000));
    let opts = options(dir.path(), max_size, when_full, clock.clone());
    let budget = opts.budget;
    let (mut store, mut thread) = Store::open(opts.clone()).expect("open");
    let epoch = store.epoch();
    let ids = [0, 1, 2].map(|i| store.stream_blocking(&format!("s{i}")).expect("stream"));
    let mut model = Model::default();
    let mut ts = 1_000_000u64;
    for (n, op) in ops.into_iter().enumerate() {
        match op {
            Op::Append { stream, len, dt } => {
                ts += dt;
                let r = record(&format!("t/{stream}/{n}"), len, ts, n as u8);
                let want = model.append(stream, r.clone(), &budget);
                let got = store
                    .submit_blocking(ids[stream], r)
                    .expect("submit")
                    .blocking_wait();
                assert_eq!(got, want, "append #{n}");
            }
            Op::Read { stream, skip } => {
                let after = model.streams[stream].keys().nth(skip).copied();
                let got = store
                    .read_blocking(ids[stream], after, 3, usize::MAX)
                    .expect("read");
                let want: Vec<u64> = model.streams[stream]
                    .keys()
                    .filter(|k| after.is_none_or(|a| **k > a))
                    .take(3)
                    .copied()
                    .collect();
                assert_eq!(got.iter().map(|r| r.seq).collect::<Vec<_>>(), want);
            }
            Op::Ack {
                stream,
                picks,
                bogus,
            } => {
                let keys: Vec<u64> = model.streams[stream].keys().copied().collect();
                let mut seqs: Vec<u64> =
                    picks.iter().filter_map(|p| keys.get(*p).copied()).collect();
                if bogus {
                    seqs.push(model.next_seq[stream] + 1000);
                }
                for s in &seqs {
                    if let Some(r) = model.streams[stream].remove(s) {
                        model.used -= Model::cost(&r);
                    }
                }
                store.ack_blocking(ids[stream], seqs).expect("ack");
            }
            Op::Age { advance } => {
                let now = clock.fetch_add(advance, Ordering::SeqCst) + advance;
                let cutoff = now.saturating_sub(1_000);
                for s in 0..3 {
                    while model.streams[s]
                        .values()
                        .next()
                        .is_some_and(|r| r.ts_ms < cutoff)
                    {
                        model.evict_head(s, GapReason::MaxAge);
                    }
                }
                store.maintain_blocking().expect("maintain");
            }
            Op::Reopen => {
                drop(store);
                thread.close();
                let (s, t) = Store::open(opts.clone()).expect("reopen");
                assert_eq!(s.epoch(), epoch, "epoch survives reopen");
                store = s;
                thread = t;
                let again =
                    [0, 1, 2].map(|i| store.stream_blocking(&format!("s{i}")).expect("stream"));
                assert_eq!(again, ids, "stream ids survive reopen");
            }
        }
        check_against_model(&store, &ids, &model);
    }
    drop(store);
    thread.close();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_model_drop_oldest(ops in proptest::collection::vec(op(), 1..40)) {
        // Small budget (accounted data = half of it) so size eviction happens often.
        run_model(ops, 4_000, WhenFull::DropOldest);
    }

    #[test]
    fn store_matches_model_reject_new(ops in proptest::collection::vec(op(), 1..40)) {
        run_model(ops, 4_000, WhenFull::RejectNew);
    }
}

#[test]
fn second_open_is_refused_with_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(AtomicU64::new(0));
    let opts = options(dir.path(), 1 << 20, WhenFull::DropOldest, clock);
    let (_store, _thread) = Store::open(opts.clone()).expect("open");
    let err = Store::open(opts).expect_err("second open must fail");
    assert!(matches!(err, StoreError::Locked { .. }), "{err:?}");
    assert!(err.to_string().contains("buffer.redb"), "{err}");
}

#[test]
fn garbage_file_is_corrupt_not_replaced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("buffer.redb");
    let garbage = vec![0x5Au8; 64 * 1024];
    std::fs::write(&path, &garbage).expect("write");
    let opts = small_options(dir.path());
    let err = Store::open(opts).expect_err("garbage must not open");
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&path).expect("read"),
        garbage,
        "file left untouched"
    );
}

/// A buffer with a few records, then damaged by `damage`: every way must give a clear
/// error that names the file and says what to do, and `repair` must move it aside and
/// start an empty buffer holding the `buffer_lost` notice.
fn damaged_file_is_refused_then_repaired(damage: impl Fn(&std::path::Path)) {
    damaged_file_is_refused_then_repaired_after(false, damage)
}

/// `unclean`: the file as a crash leaves it (copied while the store was open), which
/// redb must recover on open — so a truncation is met while reading the whole file.
fn damaged_file_is_refused_then_repaired_after(unclean: bool, damage: impl Fn(&std::path::Path)) {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = small_options(dir.path());
    {
        let (store, thread) = Store::open(opts.clone()).expect("open");
        let s = store.stream_blocking("a").expect("stream");
        for i in 0..50 {
            store
                .submit_blocking(s, record("t", 500, i, 7))
                .expect("append");
        }
        let snapshot = dir.path().join("snapshot");
        if unclean {
            std::fs::copy(&opts.path, &snapshot).expect("copy the open file");
        }
        drop(store);
        thread.close();
        if unclean {
            std::fs::rename(&snapshot, &opts.path).expect("the crashed file back");
        }
    }
    damage(&opts.path);
    let damaged = std::fs::read(&opts.path).expect("read");
    let err = Store::open(opts.clone()).expect_err("a damaged file must not open");
    assert!(
        matches!(err, StoreError::Corrupt { .. } | StoreError::Foreign { .. }),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("buffer.redb") && text.contains("--repair"),
        "{text}"
    );
    // A crashed file may get redb's recovery header written before it gives up.
    if !unclean {
        assert!(
            std::fs::read(&opts.path).expect("read") == damaged,
            "touched"
        );
    }
    let damaged = std::fs::read(&opts.path).expect("read");

    let Repair::Replaced { moved_to, .. } = Store::repair(&opts).expect("repair") else {
        panic!("repair did nothing");
    };
    assert_eq!(
        std::fs::read(&moved_to).expect("moved"),
        damaged,
        "moved, not kept whole"
    );
    let (store, thread) = Store::open(opts.clone()).expect("open the fresh file");
    let gaps = store.gaps_blocking(10).expect("gaps");
    let lost = store.stream_blocking(LOST_STREAM).expect("stream *");
    assert_eq!(gaps.len(), 1, "{gaps:?}");
    assert_eq!(gaps[0].stream, lost);
    assert_eq!(gaps[0].reason, GapReason::BufferLost);
    drop(store);
    thread.close();
    assert_eq!(Store::repair(&opts).expect("repair"), Repair::Healthy);
}

#[test]
fn truncated_buffer_file_is_refused_then_repaired() {
    damaged_file_is_refused_then_repaired(|p| {
        let len = std::fs::metadata(p).expect("meta").len();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(p)
            .expect("open");
        f.set_len(len / 3).expect("truncate");
    });
}

#[test]
fn buffer_file_truncated_anywhere_is_refused_then_repaired() {
    // Where the cut falls decides which read fails first (seen: UnexpectedEof at half
    // of a small file, and right after the header).
    for (num, den) in [(1, 2), (3, 4), (1, 5), (7, 8), (99, 100)] {
        damaged_file_is_refused_then_repaired_after(true, |p| {
            let len = std::fs::metadata(p).expect("meta").len();
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(p)
                .expect("open");
            f.set_len(len * num / den).expect("truncate");
        });
    }
}

#[test]
fn emptied_buffer_file_is_refused_then_repaired() {
    damaged_file_is_refused_then_repaired(|p| std::fs::write(p, b"").expect("empty"));
}

#[test]
fn overwritten_buffer_file_is_refused_then_repaired() {
    damaged_file_is_refused_then_repaired(|p| {
        let mut bytes = std::fs::read(p).expect("read");
        for b in bytes.iter_mut().take(8192) {
            *b ^= 0xA5;
        }
        std::fs::write(p, bytes).expect("write");
    });
}

#[test]
fn foreign_redb_file_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("buffer.redb");
    {
        let db = redb::Database::create(&path).expect("create");
        let txn = db.begin_write().expect("txn");
        {
            let def: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("other");
            let mut t = txn.open_table(def).expect("table");
            t.insert("x", 1).expect("insert");
        }
        txn.commit().expect("commit");
    }
    let opts = small_options(dir.path());
    let err = Store::open(opts).expect_err("foreign must not open");
    assert!(matches!(err, StoreError::Foreign { .. }), "{err:?}");
}

#[test]
fn seqs_never_repeat_after_everything_is_acked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = small_options(dir.path());
    let (store, thread) = Store::open(opts.clone()).expect("open");
    let s = store.stream_blocking("a").expect("stream");
    let seqs: Vec<u64> = (0..5)
        .map(|i| {
            store
                .submit_blocking(s, record("t", 10, i, 0))
                .expect("submit")
                .blocking_wait()
                .expect("append")
        })
        .collect();
    store.ack_blocking(s, seqs).expect("ack");
    drop(store);
    thread.close();
    let (store, thread) = Store::open(opts).expect("reopen");
    let s = store.stream_blocking("a").expect("stream");
    let next = store
        .submit_blocking(s, record("t", 10, 9, 0))
        .expect("submit")
        .blocking_wait()
        .expect("append");
    assert_eq!(next, 5);
    drop(store);
    thread.close();
}

/// The disk budget holds for the file itself, not only for the accounted bytes:
/// sustained appends with drop-oldest, and a consumer acking behind them.
#[test]
fn file_stays_within_max_size() {
    let dir = tempfile::tempdir().expect("tempdir");
    // redb allocates in regions, so below ~32 MiB its fixed overhead dominates; config
    // enforces MIN_MAX_SIZE for that reason.
    let max_size = super::MIN_MAX_SIZE;
    let mut opts = options(
        dir.path(),
        max_size,
        WhenFull::DropOldest,
        Arc::new(AtomicU64::new(0)),
    );
    opts.commit_linger = Duration::from_millis(1);
    let (store, thread) = Store::open(opts.clone()).expect("open");
    let s = store.stream_blocking("a").expect("stream");
    let total = 2 * max_size / 220;
    let mut pending = Vec::new();
    let mut max_len = 0;
    for i in 0..total {
        pending.push(
            store
                .submit_blocking(s, record("sensors/x", 200, i, 1))
                .expect("submit"),
        );
        if pending.len() == 1024 {
            let seqs: Vec<u64> = pending
                .drain(..)
                .map(|p| p.blocking_wait().expect("append"))
                .collect();
            if i % 3 == 0 {
                store.ack_blocking(s, seqs[..256].to_vec()).expect("ack");
            }
            max_len = max_len.max(std::fs::metadata(&opts.path).expect("meta").len());
        }
    }
    for p in pending {
        p.blocking_wait().expect("append");
    }
    let stats = store.stats();
    assert!(
        stats.streams[0].state.evicted > 0,
        "budget was exceeded, so records were evicted"
    );
    max_len = max_len.max(std::fs::metadata(&opts.path).expect("meta").len());
    assert!(
        max_len <= max_size,
        "file grew to {max_len} > max_size {max_size}"
    );
    drop(store);
    thread.close();
}

/// Reported gaps are forgotten; a gap that grew after it was read keeps its unreported
/// tail, and later evictions extend that tail rather than the forgotten part.
#[test]
fn acknowledged_gaps_are_forgotten_and_growth_is_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(AtomicU64::new(10_000));
    let opts = options(dir.path(), 1 << 25, WhenFull::DropOldest, clock.clone());
    let (store, thread) = Store::open(opts).expect("open");
    let s = store.stream_blocking("a").expect("stream");
    for i in 0..10 {
        store
            .submit_blocking(s, record("t", 10, 10_000 + i * 100, 0))
            .expect("submit")
            .blocking_wait()
            .expect("append");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("rt");
    // Age out seqs 0..=2 (ts < cutoff = now - 1000).
    clock.store(10_250 + 1_000, Ordering::SeqCst);
    store.maintain_blocking().expect("maintain");
    let gaps = store.gaps_blocking(10).expect("gaps");
    assert_eq!(gaps.len(), 1);
    assert_eq!((gaps[0].first, gaps[0].last, gaps[0].count), (0, 2, 3));
    // It grows before it is acknowledged: seqs 3..=4 too.
    clock.store(10_450 + 1_000, Ordering::SeqCst);
    store.maintain_blocking().expect("maintain");
    rt.block_on(store.ack_gaps(gaps)).expect("ack");
    let left = store.gaps_blocking(10).expect("gaps");
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!((left[0].first, left[0].last, left[0].count), (3, 4, 2));
    // More contiguous evictions extend the remainder.
    clock.store(10_550 + 1_000, Ordering::SeqCst);
    store.maintain_blocking().expect("maintain");
    let left = store.gaps_blocking(10).expect("gaps");
    assert_eq!((left[0].first, left[0].last, left[0].count), (3, 5, 3));
    rt.block_on(store.ack_gaps(left)).expect("ack");
    assert!(store.gaps_blocking(10).expect("gaps").is_empty());
    // And after everything was reported, a new eviction starts a new gap.
    clock.store(10_650 + 1_000, Ordering::SeqCst);
    store.maintain_blocking().expect("maintain");
    let fresh = store.gaps_blocking(10).expect("gaps");
    assert_eq!((fresh[0].first, fresh[0].last, fresh[0].count), (6, 6, 1));
    drop(store);
    thread.close();
}

/// Values kept with the buffer survive a reopen, and cannot touch the buffer's own
/// format marker or epoch.
#[test]
fn meta_values_persist_apart_from_the_buffers_own() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = small_options(dir.path());
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let (store, thread) = Store::open(opts.clone()).expect("open");
    let epoch = store.epoch();
    assert_eq!(store.meta_blocking("k").expect("read"), None);
    rt.block_on(store.put_meta("k", b"v1".to_vec()))
        .expect("put");
    rt.block_on(store.put_meta("k", b"v2".to_vec()))
        .expect("overwrite");
    rt.block_on(store.put_meta("epoch", b"junk".to_vec()))
        .expect("a key of the same name");
    rt.block_on(store.put_meta("format", b"junk".to_vec()))
        .expect("a key of the same name");
    drop(store);
    thread.close();
    let (store, thread) = Store::open(opts).expect("the buffer's own keys are intact");
    assert_eq!(store.epoch(), epoch);
    assert_eq!(
        store.meta_blocking("k").expect("read"),
        Some(b"v2".to_vec())
    );
    drop(store);
    thread.close();
}
