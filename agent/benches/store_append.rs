//! Store benchmark: the durable append path vs a raw redb group-commit baseline, measured
//! in the same run on the same disk (ratios hold on a noisy machine; absolute rates don't).
//!
//! Run: `cargo bench -p edgerelay --bench store_append` (add `-- --records N` to change
//! the size). Prints msgs/s for both and the ratio; docs/benchmarks.md records results.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use edgerelay::record::{Origin, OriginKind, Record};
use edgerelay::store::{Store, StoreOptions, WhenFull};
use redb::{Database, Durability, TableDefinition};

const RAW: TableDefinition<(u16, u64), &[u8]> = TableDefinition::new("records");

fn telemetry(i: u64) -> Vec<u8> {
    // ~200 bytes of realistic device JSON.
    format!(
        "{{\"device\":\"dev-{:04}\",\"ts\":{},\"temp_c\":{:.2},\"humidity\":{:.1},\"pressure_hpa\":{:.1},\"battery_v\":{:.3},\"rssi_dbm\":{},\"status\":\"ok\",\"fw\":\"2.4.1\",\"site\":\"plant-7/line-3\",\"seq\":{}}}",
        i % 200,
        1_795_000_000_000u64 + i * 1000,
        20.0 + (i % 97) as f64 / 10.0,
        40.0 + (i % 53) as f64 / 3.0,
        1000.0 + (i % 41) as f64 / 2.0,
        3.3 + (i % 11) as f64 / 100.0,
        -60 - (i % 30) as i64,
        i
    )
    .into_bytes()
}

fn record(i: u64) -> Record {
    Record {
        topic: format!("sensors/dev-{:04}/telemetry", i % 200),
        payload: Bytes::from(telemetry(i)),
        qos: 1,
        retain: false,
        origin: Origin {
            kind: OriginKind::Mqtt,
            name: Arc::from("dev-0001"),
        },
        ts_ms: 1_795_000_000_000 + i,
    }
}

/// The ceiling: one thread inserting pre-built values, `group` per fsynced transaction.
fn raw_redb(dir: &std::path::Path, n: u64, group: u64) -> f64 {
    let db = Database::builder()
        .set_cache_size(4 << 20)
        .create(dir.join("raw.redb"))
        .expect("create raw db");
    let values: Vec<Vec<u8>> = (0..group)
        .map(|i| {
            let r = record(i);
            let mut v = Vec::with_capacity(300);
            v.extend_from_slice(&r.ts_ms.to_le_bytes());
            v.extend_from_slice(r.topic.as_bytes());
            v.extend_from_slice(&r.payload);
            v
        })
        .collect();
    let start = Instant::now();
    let mut seq = 0u64;
    while seq < n {
        let mut txn = db.begin_write().expect("txn");
        txn.set_durability(Durability::Immediate)
            .expect("durability");
        {
            let mut t = txn.open_table(RAW).expect("table");
            for v in &values {
                t.insert((0u16, seq), v.as_slice()).expect("insert");
                seq += 1;
            }
        }
        txn.commit().expect("commit");
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// The store's durable append path: `producers` threads, each keeping `depth` appends
/// in flight and waiting for every commit (as the socket and MQTT ingest do).
fn store_append(dir: &std::path::Path, n: u64, producers: u64, depth: usize) -> (f64, u64) {
    let mut opts = StoreOptions::new(dir.join("buffer.redb"), 64 << 30, WhenFull::RejectNew);
    opts.max_age = Duration::from_secs(365 * 24 * 3600);
    let (store, thread) = Store::open(opts).expect("open store");
    let stream = store.stream_blocking("bench").expect("stream");
    let per = n / producers;
    // Records are built before the clock starts: this measures the store, not the
    // benchmark's JSON generator (the raw baseline's values are prebuilt too).
    let inputs: Vec<Vec<Record>> = (0..producers)
        .map(|p| (0..per).map(|i| record(p * per + i)).collect())
        .collect();
    let start = Instant::now();
    let handles: Vec<_> = inputs
        .into_iter()
        .map(|records| {
            let store = store.clone();
            std::thread::spawn(move || {
                let mut pending = std::collections::VecDeque::with_capacity(depth);
                for r in records {
                    if pending.len() == depth {
                        let done: edgerelay::store::PendingAppend =
                            pending.pop_front().expect("pending");
                        done.blocking_wait().expect("append");
                    }
                    pending.push_back(store.submit_blocking(stream, r).expect("submit"));
                }
                for done in pending {
                    done.blocking_wait().expect("append");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("producer");
    }
    let rate = (per * producers) as f64 / start.elapsed().as_secs_f64();
    let commits = store.stats().commits;
    drop(store);
    thread.close();
    (rate, commits)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: u64 = args
        .iter()
        .position(|a| a == "--records")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let base = std::env::var("BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir());
    let dir = tempfile::tempdir_in(base).expect("tempdir");
    println!(
        "store_append: {n} records of ~{} B payload, fsync on every commit, dir {}",
        telemetry(0).len(),
        dir.path().display()
    );
    let raw = raw_redb(dir.path(), n, 512);
    println!("  raw redb, 512 records per fsynced txn (ceiling): {raw:>10.0} msgs/s");
    let (store, commits) = store_append(dir.path(), n, 4, 256);
    println!("  edgerelay store, 4 producers x 256 in flight:   {store:>10.0} msgs/s  ({commits} commits, {:.0} records/commit)", n as f64 / commits as f64);
    println!("  ratio store/raw: {:.0}%", 100.0 * store / raw);
    let (single, commits1) = store_append(&dir.path().join("single"), n / 20, 1, 1);
    println!("  edgerelay store, 1 producer, 1 in flight (latency-bound): {single:>8.0} msgs/s ({commits1} commits)");
}
