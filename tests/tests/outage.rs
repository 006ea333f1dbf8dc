//! The central broker goes away: the agent keeps accepting (and acknowledging, since
//! messages are on disk), and delivers everything when the broker returns.

use std::io::{Read, Write};
use std::net::TcpStream;

use edgerelay_tests::*;

#[test]
fn everything_buffered_during_an_outage_arrives() {
    let mut broker = Mosquitto::start();
    let mut sub = Subscriber::start(broker.port, "up/#");
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let extra = format!("[[socket]]\nkind = \"tcp\"\nlisten = \"127.0.0.1:{port}\"\nframing = \"length-prefixed\"\ntopic = \"o\"\nack = true\n");
    let agent = Agent::start(
        dir.path(),
        &agent_config(&dir.path().join("data"), &broker.url(), &extra),
    );
    agent.wait_for_log("connected upstream", SOON);

    let mut conn = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let send = |conn: &mut TcpStream, range: std::ops::Range<u32>| {
        for i in range.clone() {
            conn.write_all(&frame(format!("m-{i}").as_bytes()))
                .expect("write");
        }
        let mut acks = vec![0u8; range.len()];
        conn.read_exact(&mut acks).expect("acks");
    };
    send(&mut conn, 0..50);
    sub.wait_for("messages before the outage", SOON, |got| got.len() >= 50);

    broker.stop();
    agent.wait_for_log("upstream connection lost", SOON);
    // Acknowledged while the broker is down: they are on the gateway's disk.
    send(&mut conn, 50..550);
    broker.restart();

    sub.wait_for("all 550 messages after the broker returned", SOON, |got| {
        let payloads: std::collections::HashSet<&[u8]> =
            got.iter().map(|r| r.payload.as_slice()).collect();
        (0..550).all(|i| payloads.contains(format!("m-{i}").as_bytes()))
    });
}
