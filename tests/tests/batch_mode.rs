//! Batch mode end to end: records go upstream in the wire format, and every batch the
//! central broker receives decodes; a SIGKILL in the middle loses nothing acknowledged.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use edgerelay_tests::*;

fn batch_config(data: &std::path::Path, url: &str, port: u16) -> String {
    agent_config(
        data,
        url,
        &format!(
            "[[socket]]\nkind = \"tcp\"\nlisten = \"127.0.0.1:{port}\"\nframing = \"length-prefixed\"\ntopic = \"b\"\nack = true\n"
        ),
    )
    .replace("mode = \"passthrough\"\n", "mode = \"batch\"\nbatch_size = 100\nbatch_linger = \"200ms\"\n")
}

fn send(conn: &mut TcpStream, range: std::ops::Range<u32>) {
    for i in range.clone() {
        conn.write_all(&frame(format!("batched-{i}").as_bytes()))
            .expect("write");
    }
    let mut acks = vec![0u8; range.len()];
    conn.read_exact(&mut acks).expect("acks");
}

/// Payloads of every record in the batches received so far (undecodable ones skipped:
/// `decoded` asserts on those).
fn payloads(got: &[Received]) -> HashSet<Vec<u8>> {
    got.iter()
        .filter_map(|r| edgerelay::wire::decode(&r.payload, &|_| None).ok())
        .flat_map(|b| b.records.into_iter().map(|r| r.payload.to_vec()))
        .collect()
}

/// Decode every batch received so far: payload → times seen, and the batch count.
fn decoded(sub: &Subscriber) -> (HashMap<Vec<u8>, usize>, usize) {
    let mut seen = HashMap::new();
    let mut batches = 0;
    for r in &sub.received {
        assert_eq!(r.topic, "up/batch/default");
        let batch = edgerelay::wire::decode(&r.payload, &|_| None).expect("every batch decodes");
        assert_eq!(batch.header.gateway, "gw-test");
        assert_eq!(batch.header.stream, "default");
        batches += 1;
        for rec in batch.records {
            assert_eq!(rec.topic, "b");
            *seen.entry(rec.payload.to_vec()).or_insert(0) += 1;
        }
    }
    (seen, batches)
}

#[test]
fn batches_arrive_and_decode() {
    let broker = Mosquitto::start();
    let mut sub = Subscriber::start(broker.port, "up/#");
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let _agent = Agent::start(
        dir.path(),
        &batch_config(&dir.path().join("data"), &broker.url(), port),
    );
    let mut conn = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    send(&mut conn, 0..1050);
    let want: HashSet<Vec<u8>> = (0..1050)
        .map(|i| format!("batched-{i}").into_bytes())
        .collect();
    sub.wait_for("all 1050 records in batches", SOON, |got| {
        let have = payloads(got);
        want.is_subset(&have)
    });
    let (seen, batches) = decoded(&sub);
    assert_eq!(seen.len(), 1050);
    assert!(
        seen.values().all(|n| *n == 1),
        "no duplicates without a crash"
    );
    // At most 100 per batch: at least 11 publishes, far fewer than 1050.
    assert!((11..=1050 / 2).contains(&batches), "{batches} batches");
}

#[test]
fn sigkill_in_batch_mode_loses_nothing_acknowledged() {
    let broker = Mosquitto::start();
    let mut sub = Subscriber::start(broker.port, "up/#");
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = batch_config(&dir.path().join("data"), &broker.url(), port);
    let mut agent = Agent::start(dir.path(), &config);
    let mut conn = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    send(&mut conn, 0..3000);
    // Acknowledged means committed: kill while the upload is still going.
    agent.kill9();
    let _agent = Agent::start(dir.path(), &config);
    sub.wait_for(
        "all 3000 acknowledged records after the restart",
        Duration::from_secs(60),
        |got| {
            let have = payloads(got);
            (0..3000).all(|i| have.contains(format!("batched-{i}").as_bytes()))
        },
    );
    let (seen, _) = decoded(&sub);
    let dups: usize = seen.values().map(|n| n - 1).sum();
    eprintln!("3000 acknowledged, {dups} duplicates after the SIGKILL");
}

/// The whole path: socket → agent (batch mode) → mosquitto → `unpack --jsonl`. A SIGKILL
/// of the agent mid-upload causes duplicates upstream; unpack prints every acknowledged
/// record exactly once, and a restarted unpack does not print them again.
#[test]
fn unpack_prints_every_acknowledged_record_exactly_once() {
    let broker = Mosquitto::start();
    let state_dir = tempfile::tempdir().expect("tempdir");
    let state = state_dir.path().join("unpack.redb");
    let mut unpack = Unpack::start(&broker.url(), "up", &state);
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = batch_config(&dir.path().join("data"), &broker.url(), port);
    let mut agent = Agent::start(dir.path(), &config);
    let mut conn = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    send(&mut conn, 0..3000);
    agent.kill9();
    let _agent = Agent::start(dir.path(), &config);
    // payload → times printed (one pass over the lines; the predicates run per line).
    let tally = |lines: &[String]| {
        let mut m: HashMap<String, usize> = HashMap::new();
        for l in lines {
            *m.entry(serde_json_lite::field(l, "payload")).or_insert(0) += 1;
        }
        m
    };
    unpack.wait_for("every record once", Duration::from_secs(60), |lines| {
        let t = tally(lines);
        (0..3000).all(|i| t.contains_key(&format!("batched-{i}")))
    });
    let lines = unpack.lines();
    assert_eq!(
        lines.len(),
        3000,
        "exactly once: {} lines for 3000 records",
        lines.len()
    );
    let t = tally(&lines);
    assert!((0..3000).all(|i| t.get(&format!("batched-{i}")) == Some(&1)));
    let first: serde_json_lite::Line = serde_json_lite::parse(&lines[0]);
    assert_eq!(
        (
            first.gateway.as_str(),
            first.stream.as_str(),
            first.topic.as_str()
        ),
        ("gw-test", "default", "b")
    );

    // A restarted unpack (same state, same persistent session) prints nothing again,
    // even for batches the broker redelivers; new records still come through.
    unpack.stop();
    let unpack = Unpack::start(&broker.url(), "up", &state);
    let mut conn = TcpStream::connect(("127.0.0.1", port)).expect("connect to the restarted agent");
    send(&mut conn, 3000..3010);
    unpack.wait_for("the ten new records", SOON, |lines| {
        let t = tally(lines);
        (3000..3010).all(|i| t.get(&format!("batched-{i}")) == Some(&1))
    });
    let lines = unpack.lines();
    assert_eq!(lines.len(), 10, "only the new records: {lines:?}");
}

/// Just enough JSON reading for the assertions above.
mod serde_json_lite {
    pub struct Line {
        pub gateway: String,
        pub stream: String,
        pub topic: String,
    }

    pub fn field(line: &str, name: &str) -> String {
        let key = format!("\"{name}\":\"");
        let start = line
            .find(&key)
            .map(|i| i + key.len())
            .expect("field present");
        line[start..].split('"').next().expect("value").to_owned()
    }

    pub fn parse(line: &str) -> Line {
        Line {
            gateway: field(line, "gateway"),
            stream: field(line, "stream"),
            topic: field(line, "topic"),
        }
    }
}

/// `unpack --republish-prefix`: every record comes back out under the prefix + its
/// original topic, unchanged.
#[test]
fn unpack_republishes_under_a_prefix() {
    let broker = Mosquitto::start();
    let mut out = Subscriber::start(broker.port, "out/#");
    let state_dir = tempfile::tempdir().expect("tempdir");
    let _unpack = Unpack::start_with(
        &broker.url(),
        "up",
        &state_dir.path().join("s.redb"),
        &["--republish-prefix", "out/"],
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let _agent = Agent::start(
        dir.path(),
        &batch_config(&dir.path().join("data"), &broker.url(), port),
    );
    let mut conn = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    send(&mut conn, 0..250);
    out.wait_for("250 republished records", SOON, |got| {
        let have: HashSet<&[u8]> = got.iter().map(|r| r.payload.as_slice()).collect();
        (0..250).all(|i| have.contains(format!("batched-{i}").as_bytes()))
    });
    assert!(
        out.received.iter().all(|r| r.topic == "out/b"),
        "original topic under the prefix"
    );
    assert_eq!(out.received.len(), 250, "each once");

    // The republish connection goes stale between batches (here: another client takes
    // its client id over, so the broker closes it, as it does with an idle one after
    // 1.5 × keep-alive): the next batch must still come out, not sit unacknowledged.
    let imposter = MiniMqtt::connect(broker.port, "test-unpack-republish")
        .expect("take the republisher's client id over");
    drop(imposter);
    send(&mut conn, 250..500);
    out.wait_for(
        "the next 250 after the republish connection was closed",
        SOON,
        |got| {
            let have: HashSet<&[u8]> = got.iter().map(|r| r.payload.as_slice()).collect();
            (250..500).all(|i| have.contains(format!("batched-{i}").as_bytes()))
        },
    );
}
