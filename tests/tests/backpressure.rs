//! reject-new: with the buffer full and the broker away, a stream socket stops getting
//! acknowledgements (and the agent stops reading it); when space returns, everything
//! flows again and nothing is lost.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use edgerelay_tests::*;

const MSG: usize = 60 * 1024;
const TOTAL: usize = 400;

#[test]
fn full_buffer_under_reject_new_holds_the_sender_and_loses_nothing() {
    let mut broker = Mosquitto::start();
    let mut sub = Subscriber::start(broker.port, "up/#");
    broker.stop();
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let extra = format!(
        "[buffer]\nmax_size = \"32MiB\"\nwhen_full = \"reject-new\"\n\n[[socket]]\nkind = \"tcp\"\nlisten = \"127.0.0.1:{port}\"\nframing = \"length-prefixed\"\ntopic = \"bp\"\nack = true\nmax_message_size = \"64KiB\"\n"
    );
    let agent = Agent::start(
        dir.path(),
        &agent_config(&dir.path().join("data"), &broker.url(), &extra),
    );

    let mut conn = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let mut reader = conn.try_clone().expect("clone");
    let acked = Arc::new(AtomicUsize::new(0));
    let counter = acked.clone();
    let acks = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while counter.load(Ordering::SeqCst) < TOTAL {
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    counter.fetch_add(n, Ordering::SeqCst);
                }
            }
        }
    });
    let writer = std::thread::spawn(move || {
        for i in 0..TOTAL {
            let mut payload = format!("bp-{i}-").into_bytes();
            payload.resize(MSG, b'.');
            if conn.write_all(&frame(&payload)).is_err() {
                break;
            }
        }
    });

    agent.wait_for_log("buffer full (reject-new)", SOON);
    let at_full = acked.load(Ordering::SeqCst);
    // Half of 32 MiB holds data: about 270 of these messages; never all of them.
    assert!(
        at_full < TOTAL && at_full > 100,
        "acknowledged {at_full} before the buffer filled"
    );

    broker.restart();
    writer.join().expect("writer");
    acks.join().expect("ack reader");
    assert_eq!(
        acked.load(Ordering::SeqCst),
        TOTAL,
        "every message acknowledged once space returned"
    );
    sub.wait_for("every message upstream", Duration::from_secs(60), |got| {
        let have: std::collections::HashSet<&[u8]> = got
            .iter()
            .map(|r| &r.payload[..r.payload.iter().position(|b| *b == b'.').unwrap_or(0)])
            .collect();
        (0..TOTAL).all(|i| have.contains(format!("bp-{i}-").as_bytes()))
    });
}
