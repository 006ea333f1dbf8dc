//! What operators use day to day, against the real binary and a real mosquitto: the
//! Prometheus endpoint (scraped and parsed), /health and /ready, `edgerelay status`
//! (human and JSON) while the agent runs, and the stuck detector against a broker
//! that takes the connection and never acknowledges anything.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use edgerelay_tests::*;

fn value(samples: &[(String, f64)], name: &str) -> Option<f64> {
    samples.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
}

#[test]
fn metrics_health_and_status_of_a_running_agent() {
    let broker = Mosquitto::start();
    let mut sub = Subscriber::start(broker.port, "up/#");
    let dir = tempfile::tempdir().expect("tempdir");
    let (mqtt_port, metrics_port) = (free_port(), free_port());
    let cfg = agent_config(
        &dir.path().join("data"),
        &broker.url(),
        &format!(
            "[local_mqtt]\nlisten = \"127.0.0.1:{mqtt_port}\"\n\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\n\
             [[policy]]\ntopics = [\"alarms/#\"]\npriority = \"high\"\n"
        ),
    )
    .replace("mode = \"passthrough\"\n", "mode = \"batch\"\nbatch_linger = \"100ms\"\n");
    let agent = Agent::start(dir.path(), &cfg);
    let addr = agent.endpoint();
    assert_eq!(addr.port(), metrics_port);

    for i in 0..20 {
        let topic = if i < 5 { "alarms/a" } else { "sensors/t" };
        let ok = mosquitto_client("mosquitto_pub")
            .args([
                "-p",
                &mqtt_port.to_string(),
                "-q",
                "1",
                "-t",
                topic,
                "-m",
                &format!("m{i}"),
            ])
            .status()
            .expect("mosquitto_pub");
        assert!(ok.success());
    }
    sub.wait_for("all 20 upstream in batches", SOON, |r| {
        r.iter()
            .filter_map(|m| edgerelay::wire::peek_header(&m.payload).ok())
            .map(|(h, _)| h.count as usize)
            .sum::<usize>()
            >= 20
    });

    assert_eq!(http(addr, "GET", "/health", ""), (200, "ok\n".to_owned()));
    // Gauges follow once a second: wait for the uploads to show.
    let samples = wait_until("the uploads in /metrics", SOON, || {
        let (code, text) = http(addr, "GET", "/metrics", "");
        assert_eq!(code, 200);
        let s = prometheus_samples(&text);
        let uploaded = value(&s, "edgerelay_uploaded_records_total{stream=\"default\"}")?
            + value(&s, "edgerelay_uploaded_records_total{stream=\"high\"}")?;
        (uploaded >= 20.0 && value(&s, "edgerelay_buffer_records{stream=\"default\"}") == Some(0.0))
            .then_some(s)
    });
    assert_eq!(
        value(
            &samples,
            "edgerelay_messages_accepted_total{source=\"mqtt\"}"
        ),
        Some(20.0)
    );
    assert_eq!(value(&samples, "edgerelay_uplink_connected"), Some(1.0));
    assert_eq!(value(&samples, "edgerelay_ready"), Some(1.0));
    assert_eq!(value(&samples, "edgerelay_uplink_stuck"), Some(0.0));
    assert_eq!(value(&samples, "edgerelay_local_connections"), Some(0.0));
    assert!(value(&samples, "edgerelay_uploaded_bytes_total{kind=\"wire\"}").unwrap_or(0.0) > 0.0);
    assert!(value(&samples, "edgerelay_puback_latency_seconds_count").unwrap_or(0.0) >= 2.0);
    assert!(value(&samples, "edgerelay_link_up").is_some());
    assert!(value(&samples, "edgerelay_buffer_budget_bytes").unwrap_or(0.0) > 0.0);
    assert!(value(&samples, "edgerelay_uplink_rate_bytes_per_second").unwrap_or(0.0) > 0.0);
    let sources: f64 = ["ebpf", "tcp-info", "none"]
        .iter()
        .filter_map(|s| {
            value(
                &samples,
                &format!("edgerelay_link_source{{source=\"{s}\"}}"),
            )
        })
        .sum();
    assert_eq!(sources, 1.0, "exactly one link source in use");
    for (name, _) in &samples {
        assert!(name.starts_with("edgerelay_"), "{name}");
    }

    assert_eq!(http(addr, "GET", "/ready", ""), (200, "ready\n".to_owned()));
    let (code, json) = http(addr, "GET", "/status", "");
    assert_eq!(code, 200);
    let st: serde_json::Value = serde_json::from_str(&json).expect("status JSON");
    assert_eq!(st["gateway_id"], "gw-test");
    assert_eq!(st["uplink"]["connected"], true);

    // The CLI, as an operator runs it, against the running agent.
    let out = Command::new(agent_bin())
        .args(["status", "--config"])
        .arg(&agent.config_path)
        .output()
        .expect("edgerelay status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "edgerelay gw-test",
        "ready",
        "link:",
        "uplink:  connected, batch mode",
        "default",
        "high",
        "dead letters: 0",
    ] {
        assert!(text.contains(want), "{want:?} in\n{text}");
    }
    // The status is a snapshot taken once a second (the counters in /metrics are
    // live): the uploads show in it by the next one.
    let st = wait_until("the uploads in status --json", SOON, || {
        let out = Command::new(agent_bin())
            .args(["status", "--json", "--config"])
            .arg(&agent.config_path)
            .output()
            .expect("edgerelay status --json");
        assert!(out.status.success());
        let st: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status --json");
        (st["uplink"]["uploaded_records"].as_u64().unwrap_or(0) >= 20).then_some(st)
    });
    let streams = st["streams"].as_array().expect("streams");
    assert!(streams
        .iter()
        .any(|s| s["name"] == "high" && s["priority"] == "high"));

    // Not running: status says so, and fails.
    drop(agent);
    let out = Command::new(agent_bin())
        .args(["status", "--config"])
        .arg(dir.path().join("edgerelay.toml"))
        .output()
        .expect("edgerelay status");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not running"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A "broker" that accepts MQTT connections, answers CONNACK and PINGREQ, and never
/// acknowledges a publish: connected, forwarding nothing.
fn silent_broker() -> (u16, std::thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    let h = std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            std::thread::spawn(move || serve_silently(conn));
        }
    });
    (port, h)
}

fn serve_silently(mut conn: TcpStream) {
    let mut buf = [0u8; 65536];
    let mut pending: Vec<u8> = Vec::new();
    let mut connacked = false;
    loop {
        let n = match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        // Only the first byte of each packet matters here: CONNECT and PINGREQ.
        while let Some((kind, len)) = packet(&pending) {
            match kind >> 4 {
                1 if !connacked => {
                    connacked = true;
                    // The protocol level follows the fixed header and "MQTT": 5 wants
                    // a CONNACK with (empty) properties.
                    let header = len - remaining_length(&pending);
                    let v5 = pending.get(header + 6) == Some(&5);
                    let ack: &[u8] = if v5 {
                        &[0x20, 3, 0, 0, 0]
                    } else {
                        &[0x20, 2, 0, 0]
                    };
                    let _ = conn.write_all(ack);
                }
                12 => {
                    let _ = conn.write_all(&[0xd0, 0]);
                }
                _ => {}
            }
            pending.drain(..len);
        }
    }
}

/// The remaining length of the packet at the start of `b` (complete: see `packet`).
fn remaining_length(b: &[u8]) -> usize {
    let (mut len, mut mult) = (0usize, 1usize);
    for byte in b.iter().skip(1).take(4) {
        len += usize::from(byte & 0x7f) * mult;
        if byte & 0x80 == 0 {
            break;
        }
        mult *= 128;
    }
    len
}

/// The first complete MQTT packet of `b`: its first byte and whole length.
fn packet(b: &[u8]) -> Option<(u8, usize)> {
    let (mut len, mut mult, mut i) = (0usize, 1usize, 1usize);
    loop {
        let byte = *b.get(i)?;
        len += usize::from(byte & 0x7f) * mult;
        i += 1;
        if byte & 0x80 == 0 {
            break;
        }
        mult *= 128;
    }
    (b.len() >= i + len).then_some((b[0], i + len))
}

#[test]
fn a_broker_that_never_acknowledges_is_reported_stuck() {
    let (port, _broker) = silent_broker();
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = free_port();
    let cfg = agent_config(
        &dir.path().join("data"),
        &format!("mqtt://127.0.0.1:{port}"),
        &format!(
            "[metrics]\nlisten = \"127.0.0.1:0\"\nstuck_after = \"5s\"\n\n[[socket]]\nkind = \"tcp\"\nlisten = \"127.0.0.1:{sock}\"\nframing = \"lines\"\ntopic = \"t\"\n"
        ),
    );
    let agent = Agent::start(dir.path(), &cfg);
    let addr = agent.endpoint();
    agent.wait_for_log("connected upstream", SOON);
    let mut c = TcpStream::connect(("127.0.0.1", sock)).expect("connect");
    c.write_all(b"one\ntwo\nthree\n").expect("write");
    // Before the 5 s: waiting, not stuck.
    let (code, _) = http(addr, "GET", "/ready", "");
    assert_eq!(code, 200, "not stuck before stuck_after");
    let (code, body) = wait_until("/ready to say stuck", SOON, || {
        let r = http(addr, "GET", "/ready", "");
        (r.0 == 503).then_some(r)
    });
    assert_eq!(code, 503);
    assert!(body.contains("stuck"), "{body}");
    agent.wait_for_log("uplink stuck", SOON);
    let samples = prometheus_samples(&http(addr, "GET", "/metrics", "").1);
    assert_eq!(value(&samples, "edgerelay_uplink_stuck"), Some(1.0));
    assert_eq!(value(&samples, "edgerelay_ready"), Some(0.0));
    assert_eq!(
        value(&samples, "edgerelay_uplink_connected"),
        Some(1.0),
        "connected, and forwarding nothing"
    );
    let st: serde_json::Value =
        serde_json::from_str(&http(addr, "GET", "/status", "").1).expect("status");
    assert_eq!(st["stuck"], true);
    assert_eq!(st["ready"], false);
}

#[test]
fn sighup_applies_what_can_change_live_and_names_what_needs_a_restart() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = free_port();
    let cfg = |cap: &str, degrade: &str, log: &str, max_size: &str| {
        agent_config(
            &dir.path().join("data"),
            &broker.url(),
            &format!(
                "[rate]\nmax_rate = \"{cap}\"\n\n[buffer]\nmax_size = \"{max_size}\"\n\n[log]\nlevel = \"{log}\"\n\n\
                 [[socket]]\nkind = \"tcp\"\nlisten = \"127.0.0.1:{sock}\"\nframing = \"lines\"\ntopic = \"t\"\n\n\
                 [[policy]]\ntopics = [\"alarms/#\"]\npriority = \"low\"\ndegrade = \"{degrade}\"\n"
            ),
        )
        .replace("mode = \"passthrough\"\n", "mode = \"batch\"\n")
    };
    let agent = Agent::start(dir.path(), &cfg("1mbit", "none", "info", "512MiB"));
    let addr = agent.endpoint();
    // The controller plans at most the cap: 1 Mbit/s = 125,000 bytes/s.
    wait_until("a plan under the first cap", SOON, || {
        let s = prometheus_samples(&http(addr, "GET", "/metrics", "").1);
        value(&s, "edgerelay_uplink_rate_bytes_per_second").filter(|r| *r > 0.0 && *r <= 125_000.0)
    });
    agent.wait_for_log("uplink plan", SOON);

    // A broken file: reported, nothing changes, the agent runs on.
    std::fs::write(&agent.config_path, "[agent\nbroken").expect("write");
    agent.signal(libc_sighup());
    agent.wait_for_log("config reload failed, nothing changed", SOON);
    assert_eq!(http(addr, "GET", "/health", "").0, 200);

    std::fs::write(
        &agent.config_path,
        cfg("256kbit", "latest", "info,edgerelay::uplink=info", "1GiB"),
    )
    .expect("write");
    agent.signal(libc_sighup());
    agent.wait_for_log("config reloaded", SOON);
    let line = agent
        .log_lines()
        .into_iter()
        .find(|l| l.contains("config reloaded") && l.contains("applied"))
        .expect("the reload's report");
    for key in ["log.level", "policy", "rate.max_rate"] {
        assert!(line.contains(key), "{key} applied: {line}");
    }
    assert!(line.contains("buffer.max_size"), "needs a restart: {line}");
    agent.wait_for_log("take effect only after a restart", SOON);
    agent.wait_for_log("policies reloaded", SOON);
    // The new cap (256 kbit/s = 32,000 bytes/s) within a tick or two.
    wait_until("a plan under the new cap", SOON, || {
        let s = prometheus_samples(&http(addr, "GET", "/metrics", "").1);
        value(&s, "edgerelay_uplink_rate_bytes_per_second").filter(|r| *r > 0.0 && *r <= 32_000.0)
    });
    // The uplink's debug lines (one plan a second) stop at the new level.
    let plans = || {
        agent
            .log_lines()
            .iter()
            .filter(|l| l.contains("uplink plan"))
            .count()
    };
    let before = plans();
    let t0 = std::time::Instant::now();
    wait_until("three seconds at the new level", SOON, || {
        (t0.elapsed() >= Duration::from_secs(3)).then_some(())
    });
    assert!(
        plans() <= before + 1,
        "debug lines went on after the reload"
    );
}

/// SIGHUP's number (1 on every Linux architecture).
fn libc_sighup() -> i32 {
    1
}

#[test]
fn json_logs_when_configured() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = agent_config(
        &dir.path().join("data"),
        &broker.url(),
        "[log]\nformat = \"json\"\n",
    );
    let agent = Agent::start(dir.path(), &cfg);
    agent.wait_for_log("connected upstream", SOON);
    let lines = agent.log_lines();
    let ready = lines
        .iter()
        .find(|l| l.contains("edgerelay ready"))
        .expect("the ready line");
    let v: serde_json::Value = serde_json::from_str(ready).expect("a JSON object a line");
    assert_eq!(v["level"], "INFO");
    assert_eq!(v["fields"]["message"], "edgerelay ready");
    assert_eq!(v["fields"]["gateway_id"], "gw-test");
    for l in &lines {
        serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("{l:?}: {e}"));
    }
}
