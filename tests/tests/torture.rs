//! SIGKILL torture (issue 10): 20 concurrent QoS 1 publishers on the local MQTT
//! endpoint, the central mosquitto stopped and started now and then, and the real agent
//! SIGKILLed at random moments — 10 times here, `EDGERELAY_TORTURE_KILLS` (50 in
//! scripts/torture.sh) by hand. Afterwards every message that got a PUBACK is in
//! `unpack`'s output exactly once; one that did not is there at most once (it may have
//! been committed just before the kill). Duplicates upstream before dedup are reported.
//!
//! The publishers speak MQTT themselves (`MiniMqtt`: rumqttc's packet codec), one
//! publish in flight each, and never resend: a client library's retransmission would make "acknowledged
//! once" ambiguous.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;

use edgerelay_tests::*;

const PUBLISHERS: usize = 20;

#[derive(Default)]
struct Outcome {
    acked: Vec<String>,
    unacked: Vec<String>,
}

/// Publish unique messages one at a time until `stop`, reconnecting whenever the agent
/// goes away; a message is acked when its PUBACK came.
fn publisher(id: usize, port: u16, stop: Arc<AtomicBool>, out: Arc<Mutex<Outcome>>) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let Some(mut client) = MiniMqtt::connect(port, &format!("torture-{id}")) else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        while !stop.load(Ordering::Relaxed) {
            let msg = format!("p{id}-{n}");
            n += 1;
            let acked = client.publish("torture/t", msg.as_bytes());
            {
                let mut o = out.lock().expect("lock");
                if !acked {
                    o.unacked.push(msg);
                    break;
                }
                o.acked.push(msg);
            }
            // Gentle on a 2-core CI machine where the 10-minute outage test runs beside
            // the suite: ~5,000 publishes/s in all is plenty to be mid-commit at a kill.
            std::thread::sleep(Duration::from_millis(3));
        }
    }
}

/// Records in the batches a raw subscriber saw (before unpack's dedup): payload → count.
fn raw_counts(got: &[Received]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for r in got.iter().filter(|r| r.topic.starts_with("up/batch/")) {
        if let Ok(b) = edgerelay::wire::decode(&r.payload, &|_| None) {
            for rec in b.records {
                *m.entry(String::from_utf8_lossy(&rec.payload).into_owned())
                    .or_insert(0) += 1;
            }
        }
    }
    m
}

#[test]
fn sigkill_torture_every_acknowledged_message_arrives_exactly_once() {
    let kills: usize = std::env::var("EDGERELAY_TORTURE_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let broker = Arc::new(Mutex::new(Mosquitto::start()));
    let port_central = broker.lock().expect("lock").port;
    let url = broker.lock().expect("lock").url();
    let mut raw = Subscriber::start(port_central, "up/#");
    let state = tempfile::tempdir().expect("tempdir");
    let unpack = Unpack::start(&url, "up", &state.path().join("unpack"));
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let extra = format!(
        "{}\n[compression]\ndictionary = \"off\"\n",
        local_mqtt_section(port, r#"["torture/#"]"#, "max_connections = 64")
    );
    let config = agent_config(&dir.path().join("data"), &url, &extra).replace(
        "mode = \"passthrough\"",
        "mode = \"batch\"\nbatch_linger = \"100ms\"",
    );
    let mut agent = Agent::start(dir.path(), &config);

    let stop = Arc::new(AtomicBool::new(false));
    let outcome = Arc::new(Mutex::new(Outcome::default()));
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|i| {
            let (stop, out) = (stop.clone(), outcome.clone());
            std::thread::spawn(move || publisher(i, port, stop, out))
        })
        .collect();
    // The upstream flaps while the agent is being killed.
    let flapping = Arc::new(AtomicBool::new(true));
    let flapper = {
        let (broker, flapping) = (broker.clone(), flapping.clone());
        std::thread::spawn(move || {
            let mut rng = rand::rng();
            let mut flaps = 0;
            while flapping.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(rng.random_range(500..2500)));
                broker.lock().expect("lock").restart();
                flaps += 1;
            }
            flaps
        })
    };

    let mut rng = rand::rng();
    let started = Instant::now();
    for k in 0..kills {
        // A random moment: while publishes are being committed, batches are in flight,
        // acknowledgements are being deleted.
        std::thread::sleep(Duration::from_millis(rng.random_range(100..1200)));
        agent.kill9();
        agent = Agent::start(dir.path(), &config);
        if k % 10 == 9 {
            eprintln!("{} kills after {:?}", k + 1, started.elapsed());
        }
    }
    std::thread::sleep(Duration::from_millis(rng.random_range(100..1200)));
    stop.store(true, Ordering::Relaxed);
    for p in publishers {
        p.join().expect("publisher");
    }
    flapping.store(false, Ordering::Relaxed);
    let flaps = flapper.join().expect("flapper");

    let (acked, unacked) = {
        let o = outcome.lock().expect("lock");
        (o.acked.clone(), o.unacked.clone())
    };
    assert!(
        acked.len() > 1000,
        "only {} publishes acknowledged",
        acked.len()
    );
    let printed = |lines: &[String]| -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for l in lines {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(l) {
                if let Some(p) = v["payload"].as_str() {
                    *m.entry(p.to_owned()).or_insert(0) += 1;
                }
            }
        }
        m
    };
    // Polled (not a predicate per printed line: the output runs to 100k lines).
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let m = printed(&unpack.lines());
        let missing: Vec<_> = acked.iter().filter(|a| !m.contains_key(*a)).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} acknowledged messages never reached unpack's output, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(10)]
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    agent.terminate(Duration::from_secs(20));
    let out = printed(&unpack.lines());
    let twice: Vec<_> = out.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "printed more than once by unpack: {twice:?}"
    );
    let acked_set: std::collections::HashSet<&String> = acked.iter().collect();
    let unacked_set: std::collections::HashSet<&String> = unacked.iter().collect();
    let foreign: Vec<_> = out
        .keys()
        .filter(|k| !acked_set.contains(k) && !unacked_set.contains(k))
        .collect();
    assert!(
        foreign.is_empty(),
        "unpack printed messages nobody sent: {foreign:?}"
    );
    raw.drain();
    let raw = raw_counts(&raw.received);
    let raw_total: usize = raw.values().sum();
    let dup = raw_total.saturating_sub(raw.len());
    let unacked_arrived = unacked.iter().filter(|u| out.contains_key(*u)).count();
    eprintln!(
        "torture: {kills} SIGKILLs, {flaps} upstream restarts, {} publishers: {} acknowledged, all in unpack's output once; {} unacknowledged attempts ({} of them arrived: committed before the kill); upstream saw {raw_total} records for {} distinct messages ({dup} duplicates removed by unpack)",
        PUBLISHERS,
        acked.len(),
        unacked.len(),
        unacked_arrived,
        raw.len()
    );
}
