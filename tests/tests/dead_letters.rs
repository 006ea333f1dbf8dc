//! Records the central broker refuses must not block the queue: against a real
//! mosquitto with `message_size_limit` (it answers an over-size publish with a PUBACK
//! whose reason code is 0x95 over MQTT 5 — and silently acknowledges it over 3.1.1),
//! the rest arrives, the refused record moves to the dead letters after
//! `max_attempts`, shows in `dead-letters list`, status and metrics, and can be retried
//! or purged (a gap notice, reason "purged"), with the agent running or not.

use std::io::Write;
use std::net::TcpStream;
use std::process::Command;

use edgerelay_tests::*;

/// Random-looking, incompressible text of `n` bytes (so a batch holding it stays big).
fn noise(n: usize, seed: u64) -> String {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect()
}

fn cli(agent_config: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(agent_bin())
        .arg("dead-letters")
        .arg("--config")
        .arg(agent_config)
        .args(args)
        .output()
        .expect("edgerelay dead-letters");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Payloads of every record received upstream (batches decoded, passthrough as is).
fn payloads(got: &[Received]) -> Vec<String> {
    got.iter()
        .flat_map(|r| match edgerelay::wire::decode(&r.payload, &|_| None) {
            Ok(b) => b
                .records
                .into_iter()
                .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
                .collect(),
            Err(_) if r.topic.starts_with("up/t") => {
                vec![String::from_utf8_lossy(&r.payload).into_owned()]
            }
            Err(_) => Vec::new(),
        })
        .collect()
}

fn refused_records_go_to_the_dead_letters(mode: &str) {
    let mut broker = Mosquitto::start_with("message_size_limit 2000\n");
    let mut sub = Subscriber::start(broker.port, "up/#");
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let cfg = agent_config(
        &dir.path().join("data"),
        &broker.url(),
        &format!(
            "[compression]\ndictionary = \"off\"\n\n[[socket]]\nkind = \"tcp\"\nlisten = \"127.0.0.1:{port}\"\nframing = \"lines\"\ntopic = \"t\"\n"
        ),
    )
    .replace(
        "mode = \"passthrough\"\n",
        &format!("mode = \"{mode}\"\nbatch_linger = \"300ms\"\n"),
    );
    let agent = Agent::start(dir.path(), &cfg);
    let big = noise(5000, 7);
    let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    for i in 0..5 {
        writeln!(c, "small-{i}").expect("write");
    }
    writeln!(c, "{big}").expect("write");
    for i in 5..10 {
        writeln!(c, "small-{i}").expect("write");
    }
    // The rest is not held back by the refused record.
    sub.wait_for("the ten small records upstream", SOON, |r| {
        let got = payloads(r);
        (0..10).all(|i| got.contains(&format!("small-{i}")))
    });
    agent.wait_for_log("record moved to the dead letters", SOON);
    let (ok, list, err) = cli(&agent.config_path, &["list"]);
    assert!(ok, "{err}");
    assert!(
        list.contains("default:") && list.contains("5000 bytes"),
        "{list}"
    );
    assert!(list.contains("packet too large (0x95)"), "{list}");
    assert!(
        list.contains("3 attempts"),
        "max_attempts = 3 by default: {list}"
    );
    assert!(
        !payloads(&sub.received).contains(&big),
        "the broker never took it"
    );

    let addr = agent.endpoint();
    let samples = wait_until("the dead letter in /metrics", SOON, || {
        let s = prometheus_samples(&http(addr, "GET", "/metrics", "").1);
        s.iter()
            .any(|(n, v)| n == "edgerelay_dead_letters" && *v == 1.0)
            .then_some(s)
    });
    assert!(samples
        .iter()
        .any(|(n, v)| n == "edgerelay_dead_lettered_records_total" && *v == 1.0));
    let status: serde_json::Value =
        serde_json::from_str(&http(addr, "GET", "/status", "").1).expect("status");
    assert_eq!(status["dead_letters"], 1);
    assert_eq!(status["streams"][0]["records"], 0, "the queue is empty");

    // Retry: queued again, refused again, back among the dead letters.
    let (ok, out, err) = cli(&agent.config_path, &["retry", "--all"]);
    assert!(ok, "{err}");
    assert!(out.contains("\"retried\":1"), "{out}");
    agent.wait_for_logs("buried again", SOON, |l| {
        l.iter()
            .filter(|l| l.contains("record moved to the dead letters"))
            .count()
            >= 2
    });

    // With the agent stopped, the command works on the buffer file; purge reports the
    // loss upstream when the agent runs again.
    drop(agent);
    let (ok, list, err) = cli(&dir.path().join("edgerelay.toml"), &["list", "--json"]);
    assert!(ok, "{err}");
    let dead: serde_json::Value = serde_json::from_str(&list).expect("JSON");
    let seq = dead[0]["seq"].as_u64().expect("a seq");
    let (ok, out, err) = cli(
        &dir.path().join("edgerelay.toml"),
        &["purge", &format!("default:{seq}")],
    );
    assert!(ok, "{err}");
    assert!(out.contains("\"purged\":1"), "{out}");
    let (_, list, _) = cli(&dir.path().join("edgerelay.toml"), &["list"]);
    assert!(list.contains("no dead letters"), "{list}");
    let _agent = Agent::start(dir.path(), &cfg);
    sub.wait_for("the purge's gap notice", SOON, |r| {
        r.iter().any(|m| {
            m.topic == "up/gap"
                && serde_json::from_slice::<serde_json::Value>(&m.payload)
                    .is_ok_and(|g| g["reason"] == "purged" && g["first"] == seq && g["count"] == 1)
        })
    });
    broker.stop();
}

#[test]
fn refused_records_go_to_the_dead_letters_in_batch_mode() {
    refused_records_go_to_the_dead_letters("batch");
}

#[test]
fn refused_records_go_to_the_dead_letters_in_passthrough_mode() {
    refused_records_go_to_the_dead_letters("passthrough");
}

#[test]
fn a_record_over_the_brokers_maximum_packet_size_is_never_sent() {
    // The broker announces its limit in CONNACK (MQTT 5): a record over it alone goes
    // straight to the dead letters; the rest goes on.
    let broker = Mosquitto::start_with("max_packet_size 3000\n");
    let mut sub = Subscriber::start(broker.port, "up/#");
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let cfg = agent_config(
        &dir.path().join("data"),
        &broker.url(),
        &format!("[[socket]]\nkind = \"tcp\"\nlisten = \"127.0.0.1:{port}\"\nframing = \"lines\"\ntopic = \"t\"\n"),
    );
    let agent = Agent::start(dir.path(), &cfg);
    let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    writeln!(c, "before").expect("write");
    writeln!(c, "{}", noise(4000, 3)).expect("write");
    writeln!(c, "after").expect("write");
    sub.wait_for("the others upstream", SOON, |r| {
        let got = payloads(r);
        got.contains(&"before".to_owned()) && got.contains(&"after".to_owned())
    });
    agent.wait_for_log("record moved to the dead letters", SOON);
    let (ok, list, err) = cli(&agent.config_path, &["list"]);
    assert!(ok, "{err}");
    assert!(list.contains("maximum packet size (3000 bytes)"), "{list}");
    assert!(list.contains("1 attempts"), "buried at once: {list}");
    assert_eq!(payloads(&sub.received).len(), 2);
}
