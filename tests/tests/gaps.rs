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
    // Retention may drop them over more than one pass, so the notices together must
    // cover exactly seqs 0..=4, each once.
    let covered = |got: &[Received]| -> Vec<u64> {
        let mut seqs = Vec::new();
        for r in got.iter().filter(|r| r.topic == "up/gap") {
            let text = String::from_utf8_lossy(&r.payload);
            assert!(text.contains("\"gateway\":\"gw-test\""), "{text}");
            assert!(text.contains("\"stream\":\"default\""), "{text}");
            assert!(text.contains("\"reason\":\"max_age\""), "{text}");
            let num = |k: &str| -> u64 {
                let key = format!("\"{k}\":");
                let at = text.find(&key).map(|i| i + key.len()).expect("field");
                text[at..]
                    .split(|c: char| !c.is_ascii_digit())
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("number")
            };
            let (first, last, count) = (num("first"), num("last"), num("count"));
            assert_eq!(count, last - first + 1, "{text}");
            seqs.extend(first..=last);
        }
        seqs.sort_unstable();
        seqs
    };
    sub.wait_for("gap notices covering the five records", SOON, |got| {
        covered(got).len() >= 5
    });
    assert_eq!(
        covered(&sub.received),
        vec![0, 1, 2, 3, 4],
        "each dropped record reported exactly once"
    );
    assert!(
        sub.received
            .iter()
            .all(|r| !String::from_utf8_lossy(&r.payload).starts_with("stale-")),
        "evicted records are not sent"
    );
    agent.wait_for_log("reporting records dropped unsent", SOON);
}
