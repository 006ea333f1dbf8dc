//! Lanes against a real store: newest-first reads every record exactly once while new
//! ones keep arriving; degradation drops exactly what it reports.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;

use super::*;
use crate::policy::Policy;
use crate::record::{Origin, OriginKind, Record};
use crate::store::{StoreOptions, WhenFull};

fn record(topic: &str, ts: u64) -> Record {
    Record {
        topic: topic.to_owned(),
        payload: Bytes::from_static(b"x"),
        qos: 1,
        retain: false,
        origin: Origin {
            kind: OriginKind::Socket,
            name: Arc::from("test"),
        },
        ts_ms: ts,
    }
}

fn open(dir: &std::path::Path) -> (Store, crate::store::StoreThread) {
    let mut o = StoreOptions::new(dir.join("buffer.redb"), 64 << 20, WhenFull::RejectNew);
    o.maintenance_interval = Duration::from_secs(3600);
    o.max_age = Duration::from_secs(1 << 30);
    Store::open(o).expect("open store")
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    /// Appends interleaved with newest-first fills: every record is read exactly once,
    /// and each fill returns records newer than anything still unread below them.
    #[test]
    fn newest_first_reads_everything_once(
        steps in proptest::collection::vec((0usize..1_200, any::<bool>()), 1..12)
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, thread) = open(dir.path());
        let policies = Arc::new(Policies::default());
        let read: BTreeSet<u64> = rt().block_on(async {
            let id = store.stream("s").await.expect("stream");
            let mut lane = Lane::new(id, "s".into(), Priority::Low, Drain::NewestFirst);
            let mut read = BTreeSet::new();
            let mut appended = 0u64;
            for (n, fill) in &steps {
                // Submitted together: one group commit, not one fsync each.
                let mut pending = Vec::with_capacity(*n);
                for _ in 0..*n {
                    pending.push(store.submit(id, record("t", 0)).await.expect("submit"));
                    appended += 1;
                }
                for p in pending {
                    p.await.expect("commit");
                }
                if *fill {
                    lane.caught_up = false;
                    lane.fill(&store, &policies, false).await.expect("fill");
                    let got: Vec<u64> = lane.queue.drain(..).map(|r| r.seq).collect();
                    prop_assert!(got.windows(2).all(|w| w[0] > w[1]), "descending within a chunk");
                    if let Some(&top) = got.first() {
                        // Nothing unread is newer than what this fill returned.
                        prop_assert!((top + 1..appended).all(|s| read.contains(&s)));
                    }
                    for s in got {
                        prop_assert!(read.insert(s), "seq {s} read twice");
                    }
                }
            }
            lane.caught_up = false;
            while !lane.caught_up {
                lane.fill(&store, &policies, false).await.expect("fill");
                for r in lane.queue.drain(..) {
                    prop_assert!(read.insert(r.seq), "seq {} read twice", r.seq);
                }
            }
            prop_assert!(lane.taken.len() <= 1, "ranges merged: {:?}", lane.taken);
            prop_assert_eq!(read.len() as u64, appended);
            Ok(read)
        })?;
        drop(store);
        thread.close();
        prop_assert!(read.iter().copied().eq(0..read.len() as u64));
    }
}

#[test]
fn degradation_drops_exactly_what_it_records_as_gaps() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, thread) = open(dir.path());
    let policies = Arc::new(Policies::new(vec![
        Policy {
            topics: vec!["latest/#".into()],
            stream: "low".into(),
            priority: Priority::Low,
            degrade: Degrade::Latest,
            drain: Drain::OldestFirst,
        },
        Policy {
            topics: vec!["sample/#".into()],
            stream: "low".into(),
            priority: Priority::Low,
            degrade: Degrade::Sample(Duration::from_secs(10)),
            drain: Drain::OldestFirst,
        },
    ]));
    rt().block_on(async {
        let id = store.stream("low").await.expect("stream");
        store.track_latest(id);
        // 3 topics × 30 s, one message a second each.
        for ts in 0..30u64 {
            for t in ["latest/a", "sample/a", "other"] {
                store
                    .append(id, record(t, ts * 1000))
                    .await
                    .expect("append");
            }
        }
        let mut lane = Lane::new(id, "low".into(), Priority::Low, Drain::OldestFirst);
        let mut kept = Vec::new();
        while !lane.caught_up {
            lane.fill(&store, &policies, true).await.expect("fill");
            kept.extend(lane.queue.drain(..));
        }
        lane.flush_dropped(&store, true).await;
        let count = |t: &str| kept.iter().filter(|r| r.record.topic == t).count();
        assert_eq!(count("latest/a"), 1, "only the newest of a conflated topic");
        assert_eq!(count("sample/a"), 3, "one per 10 s");
        assert_eq!(count("other"), 30, "no policy: never degraded");
        let gaps = store.gaps(100).await.expect("gaps");
        let by = |reason: GapReason| -> u64 {
            gaps.iter()
                .filter(|g| g.reason == reason)
                .map(|g| g.count)
                .sum()
        };
        assert_eq!(by(GapReason::Conflated), 29);
        assert_eq!(by(GapReason::Sampled), 27);
        // Each gap's range holds exactly `count` records of its kind that were not
        // kept (seq i was appended to topic i % 3).
        let kept_seqs: BTreeSet<u64> = kept.iter().map(|r| r.seq).collect();
        for g in &gaps {
            let kind = match g.reason {
                GapReason::Conflated => 0,
                GapReason::Sampled => 1,
                other => panic!("unexpected gap reason {other:?}"),
            };
            let not_kept = (g.first..=g.last)
                .filter(|s| s % 3 == kind && !kept_seqs.contains(s))
                .count();
            assert_eq!(not_kept as u64, g.count, "{g:?}");
        }
        let stored = store
            .read(id, None, 1_000, 1 << 20)
            .await
            .expect("read")
            .len();
        assert_eq!(stored, kept.len(), "dropped records are deleted");
    });
    drop(store);
    thread.close();
}
