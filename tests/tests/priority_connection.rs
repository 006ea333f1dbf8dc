//! High priority on a connection of its own (`[upstream] priority_connection`, default
//! on): the agent opens a second session as `{client_id}-hi` for its high-priority
//! streams, and everything still arrives exactly once on its stream's topic; with the
//! setting off there is one session.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use edgerelay_tests::*;

/// Two length-prefixed TCP sockets: `alarm/x` (a high-priority policy) and `telemetry`
/// (low).
fn config(data: &std::path::Path, url: &str, alarm: u16, telemetry: u16, extra: &str) -> String {
    let sockets = format!(
        "[[socket]]\nkind = \"tcp\"\nlisten = \"127.0.0.1:{alarm}\"\nframing = \"length-prefixed\"\ntopic = \"alarm/x\"\nack = true\n\n\
         [[socket]]\nkind = \"tcp\"\nlisten = \"127.0.0.1:{telemetry}\"\nframing = \"length-prefixed\"\ntopic = \"telemetry\"\nack = true\n\n\
         [[policy]]\ntopics = [\"alarm/#\"]\npriority = \"high\"\n\n\
         [[policy]]\ntopics = [\"telemetry\"]\npriority = \"low\"\n"
    );
    agent_config(data, url, &sockets).replace(
        "mode = \"passthrough\"\n",
        &format!("mode = \"batch\"\nbatch_size = 50\nbatch_linger = \"100ms\"\n{extra}"),
    )
}

fn send(port: u16, prefix: &str, n: usize) {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    for i in 0..n {
        conn.write_all(&frame(format!("{prefix}-{i}").as_bytes()))
            .expect("write");
    }
    let mut acks = vec![0u8; n];
    conn.read_exact(&mut acks).expect("acks");
}

/// Payload → times received, per upstream topic, of every batch so far.
fn received(sub: &Subscriber) -> HashMap<String, HashMap<String, usize>> {
    let mut by_topic: HashMap<String, HashMap<String, usize>> = HashMap::new();
    for m in &sub.received {
        let batch = edgerelay::wire::decode(&m.payload, &|_| None).expect("every batch decodes");
        for r in batch.records {
            *by_topic
                .entry(m.topic.clone())
                .or_default()
                .entry(String::from_utf8_lossy(&r.payload).into_owned())
                .or_default() += 1;
        }
    }
    by_topic
}

/// Start the agent, check its log says `expect_log`, send 2,000 telemetry records and
/// 200 alarms, and wait until each arrived exactly once on its stream's topic.
fn run(broker: &Mosquitto, extra: &str, expect_log: &str) -> (Agent, tempfile::TempDir) {
    run_via(broker, &broker.url(), extra, expect_log)
}

/// As `run`, with the agent's upstream at `url` (the broker, or a proxy to it).
fn run_via(
    broker: &Mosquitto,
    url: &str,
    extra: &str,
    expect_log: &str,
) -> (Agent, tempfile::TempDir) {
    let mut sub = Subscriber::start(broker.port, "up/batch/#");
    let dir = tempfile::tempdir().expect("tempdir");
    let (alarm, telemetry) = (free_port(), free_port());
    let agent = Agent::start(
        dir.path(),
        &config(&dir.path().join("data"), url, alarm, telemetry, extra),
    );
    agent.wait_for_log(expect_log, SOON);
    send(telemetry, "t", 2000);
    send(alarm, "a", 200);
    let want = |prefix: &str, n: usize| -> HashMap<String, usize> {
        (0..n).map(|i| (format!("{prefix}-{i}"), 1)).collect()
    };
    let deadline = std::time::Instant::now() + SOON;
    loop {
        sub.drain();
        let got = received(&sub);
        let high = got.get("up/batch/high").cloned().unwrap_or_default();
        let low = got.get("up/batch/low").cloned().unwrap_or_default();
        if high.len() == 200 && low.len() == 2000 {
            assert_eq!(high, want("a", 200), "each alarm exactly once");
            assert_eq!(low, want("t", 2000), "each telemetry record exactly once");
            return (agent, dir);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "within {SOON:?}: {} of 200 alarms, {} of 2000 telemetry records",
            high.len(),
            low.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn high_priority_gets_a_connection_of_its_own() {
    let broker = Mosquitto::start();
    run(&broker, "", "connected upstream for high priority");
}

#[test]
fn priority_connection_off_opens_one_session() {
    let broker = Mosquitto::start();
    let (agent, _dir) = run(
        &broker,
        "priority_connection = false\n",
        "connected upstream",
    );
    assert!(
        !logged(&agent, "for high priority"),
        "no second session when priority_connection = false"
    );
}

/// Whether any line the agent logged contains `text`.
fn logged(agent: &Agent, text: &str) -> bool {
    agent.log_lines().iter().any(|l| l.contains(text))
}

/// A broker that takes one session and refuses every other one (CONNACK "not
/// authorized", as a broker whose ACL allows only the gateway's own client id): a TCP
/// relay to the real mosquitto for the first connection.
fn one_session_proxy(broker: &Mosquitto) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
    let port = listener.local_addr().expect("proxy addr").port();
    let upstream = broker.port;
    std::thread::spawn(move || {
        let mut first = true;
        for conn in listener.incoming() {
            let Ok(mut client) = conn else { continue };
            if !first {
                // Read the CONNECT, refuse it, close.
                let mut buf = [0u8; 512];
                let _ = client.read(&mut buf);
                let _ = client.write_all(&[0x20, 0x02, 0x00, 0x05]);
                continue;
            }
            first = false;
            let server = TcpStream::connect(("127.0.0.1", upstream)).expect("proxy upstream");
            let (mut c2, mut s2) = (
                client.try_clone().expect("clone"),
                server.try_clone().expect("clone"),
            );
            let (mut c1, mut s1) = (client, server);
            std::thread::spawn(move || std::io::copy(&mut c1, &mut s1));
            std::thread::spawn(move || std::io::copy(&mut s2, &mut c2));
        }
    });
    format!("mqtt://127.0.0.1:{port}")
}

#[test]
fn a_refused_second_connection_falls_back_to_one() {
    let broker = Mosquitto::start();
    let url = one_session_proxy(&broker);
    let (agent, _dir) = run_via(
        &broker,
        &url,
        "",
        "no connection of its own for high priority",
    );
    assert!(
        !logged(&agent, "connected upstream for high priority"),
        "the refused second session is not reported connected"
    );
}
