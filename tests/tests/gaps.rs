//! Loss is never silent: records that leave the buffer unsent (here: older than
//! max_age while the broker is away) are reported upstream as a gap notice.

use std::io::{Read, Write};
use std::net::TcpStream;

use edgerelay_tests::*;

#[test]
fn records_past_max_age_are_reported_as_a_gap() {
    let mut broker = Mosquitto::start();
    let mut sub = Subscriber::start(broker.port, "up/#");
    broker.stop();
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let extra = format!(
        "[buffer]\nmax_age = \"1s\"\n\n[[socket]]\nkind = \"tcp\"\nlisten = \"127.0.0.1:{port}\"\nframing = \"length-prefixed\"\ntopic = \"old\"\nack = true\n"
    );
    let agent = Agent::start(
        dir.path(),
        &agent_config(&dir.path().join("data"), &broker.url(), &extra),
    );
    let mut conn = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    for i in 0..5 {
        conn.write_all(&frame(format!("stale-{i}").as_bytes()))
            .expect("write");
    }
    let mut acks = [0u8; 5];
    conn.read_exact(&mut acks).expect("acks");
    // Retention runs every second; wait for it to drop them.
    agent.wait_for_log("records older than max_age dropped unsent", SOON);
    broker.restart();
    sub.wait_for("the gap notice", SOON, |got| {
        got.iter().any(|r| r.topic == "up/gap")
    });
    let notices: Vec<&Received> = sub
        .received
        .iter()
        .filter(|r| r.topic == "up/gap")
        .collect();
    let text = String::from_utf8_lossy(&notices[0].payload);
    for field in [
        "\"gateway\":\"gw-test\"",
        "\"stream\":\"default\"",
        "\"first\":0",
        "\"last\":4",
        "\"count\":5",
        "\"reason\":\"max_age\"",
    ] {
        assert!(text.contains(field), "{field} missing in {text}");
    }
    assert!(
        sub.received
            .iter()
            .all(|r| !String::from_utf8_lossy(&r.payload).starts_with("stale-")),
        "evicted records are not sent"
    );
    agent.wait_for_log("reporting records dropped unsent", SOON);
}
