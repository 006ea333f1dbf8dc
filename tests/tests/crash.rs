//! SIGKILL the agent while it accepts and uploads: nothing it acknowledged is lost.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use edgerelay_tests::*;

/// Send numbered frames as fast as acks allow; `acked` counts acknowledgements (acks
/// come back in order, so messages 0..acked are exactly the acknowledged ones).
fn pump(port: u16, round: u32, acked: Arc<AtomicU32>) {
    let Ok(mut conn) = TcpStream::connect(("127.0.0.1", port)) else {
        return;
    };
    let mut reader = conn.try_clone().expect("clone");
    let counter = acked.clone();
    let reader_thread = std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        loop {
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    assert!(buf[..n].iter().all(|b| *b == 0x06));
                    counter.fetch_add(n as u32, Ordering::SeqCst);
                }
            }
        }
    });
    for i in 0u32.. {
        if conn
            .write_all(&frame(format!("r{round}-{i}").as_bytes()))
            .is_err()
        {
            break;
        }
        // Keep a bounded number in flight so the test's own memory stays small.
        while i.saturating_sub(acked.load(Ordering::SeqCst)) > 200 {
            if reader_thread.is_finished() {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let _ = reader_thread.join();
}

#[test]
fn sigkill_loses_nothing_acknowledged() {
    let broker = Mosquitto::start();
    let mut sub = Subscriber::start(broker.port, "up/#");
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let extra = format!("[[socket]]\nkind = \"tcp\"\nlisten = \"127.0.0.1:{port}\"\nframing = \"length-prefixed\"\ntopic = \"k\"\nack = true\n");
    let config = agent_config(&dir.path().join("data"), &broker.url(), &extra);

    let mut expected: HashSet<Vec<u8>> = HashSet::new();
    for round in 0..4u32 {
        let mut agent = Agent::start(dir.path(), &config);
        let acked = Arc::new(AtomicU32::new(0));
        let counter = acked.clone();
        let pumper = std::thread::spawn(move || pump(port, round, counter));
        // Kill at a random point after some messages were acknowledged.
        let target = 200 + rand::random::<u32>() % 2000;
        wait_until("acknowledgements before the kill", SOON, || {
            (acked.load(Ordering::SeqCst) >= target).then_some(())
        });
        agent.kill9();
        pumper.join().expect("pump thread");
        let n = acked.load(Ordering::SeqCst);
        assert!(n >= target);
        expected.extend((0..n).map(|i| format!("r{round}-{i}").into_bytes()));
    }
    // A final agent uploads whatever the killed ones left in the buffer.
    let _agent = Agent::start(dir.path(), &config);
    sub.wait_for(
        "every acknowledged message",
        Duration::from_secs(60),
        |got| {
            let have: HashSet<&[u8]> = got.iter().map(|r| r.payload.as_slice()).collect();
            expected.iter().all(|e| have.contains(e.as_slice()))
        },
    );
    let dups = sub.received.len() - sub.counts().len();
    eprintln!(
        "acknowledged {} messages, received {} ({} duplicates)",
        expected.len(),
        sub.received.len(),
        dups
    );
}
