//! Socket ingest end to end: TCP, UDP and Unix sockets → the real agent → a real
//! mosquitto → a real subscriber, byte for byte.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use edgerelay_tests::*;

fn read_acks(s: &mut impl Read, n: usize) {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).expect("read acks");
    assert!(buf.iter().all(|b| *b == 0x06), "ack bytes");
}

#[test]
fn every_socket_kind_delivers_byte_for_byte() {
    let broker = Mosquitto::start();
    let mut sub = Subscriber::start(broker.port, "up/#");
    let dir = tempfile::tempdir().expect("tempdir");
    let (tcp_lines, tcp_lp, udp) = (free_port(), free_port(), free_udp_port());
    let unix_path = dir.path().join("in.sock");
    let extra = format!(
        r#"
[[socket]]
kind = "tcp"
listen = "127.0.0.1:{tcp_lines}"
topic = "lines"

[[socket]]
kind = "tcp"
listen = "127.0.0.1:{tcp_lp}"
framing = "length-prefixed"
topic = "binary"
ack = true

[[socket]]
kind = "udp"
listen = "127.0.0.1:{udp}"
topic = "dgram"

[[socket]]
kind = "unix"
listen = "{}"
framing = "length-prefixed"
topic = "unix/app"
ack = true
"#,
        unix_path.display()
    );
    let _agent = Agent::start(
        dir.path(),
        &agent_config(&dir.path().join("data"), &broker.url(), &extra),
    );

    let mut expected: HashSet<(String, Vec<u8>)> = HashSet::new();

    let mut lines = TcpStream::connect(("127.0.0.1", tcp_lines)).expect("connect lines");
    for i in 0..100 {
        let msg = format!("{{\"sensor\":\"t{i}\",\"value\":{}.5}}", i * 3);
        lines.write_all(msg.as_bytes()).expect("write");
        lines.write_all(b"\n").expect("write");
        expected.insert(("up/lines".into(), msg.into_bytes()));
    }

    // Binary payloads, including newlines, NULs and invalid UTF-8, must survive exactly.
    let mut lp = TcpStream::connect(("127.0.0.1", tcp_lp)).expect("connect lp");
    for i in 0..100u32 {
        let mut payload: Vec<u8> = vec![0, b'\n', 0xff, 0xfe];
        payload.extend_from_slice(&i.to_le_bytes());
        payload.extend((0..(i % 50)).map(|b| b as u8));
        lp.write_all(&frame(&payload)).expect("write");
        expected.insert(("up/binary".into(), payload));
    }
    read_acks(&mut lp, 100);

    let u = UdpSocket::bind("127.0.0.1:0").expect("udp");
    for i in 0..50 {
        let msg = format!("dgram-{i}");
        u.send_to(msg.as_bytes(), ("127.0.0.1", udp)).expect("send");
        expected.insert(("up/dgram".into(), msg.into_bytes()));
    }

    let mut ux = UnixStream::connect(&unix_path).expect("connect unix");
    for i in 0..50 {
        let msg = format!("unix-{i}");
        ux.write_all(&frame(msg.as_bytes())).expect("write");
        expected.insert(("up/unix/app".into(), msg.into_bytes()));
    }
    read_acks(&mut ux, 50);

    sub.wait_for("all messages upstream", SOON, |got| {
        let got: HashSet<(String, Vec<u8>)> = got
            .iter()
            .map(|r| (r.topic.clone(), r.payload.clone()))
            .collect();
        expected.is_subset(&got)
    });
    let got: HashSet<(String, Vec<u8>)> = sub
        .received
        .iter()
        .map(|r| (r.topic.clone(), r.payload.clone()))
        .collect();
    assert_eq!(got, expected, "nothing extra arrived either");
}

#[test]
fn oversize_frame_closes_only_that_connection() {
    let broker = Mosquitto::start();
    let mut sub = Subscriber::start(broker.port, "up/#");
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let extra = format!(
        "[[socket]]\nkind = \"tcp\"\nlisten = \"127.0.0.1:{port}\"\nframing = \"length-prefixed\"\ntopic = \"t\"\nmax_message_size = \"1KiB\"\nack = true\n"
    );
    let agent = Agent::start(
        dir.path(),
        &agent_config(&dir.path().join("data"), &broker.url(), &extra),
    );

    let mut good = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let mut bad = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    bad.write_all(&frame(b"before")).expect("write");
    read_acks(&mut bad, 1);
    // Header announcing 1 MiB: rejected before the body is read.
    bad.write_all(&(1u32 << 20).to_be_bytes()).expect("write");
    bad.write_all(&[b'x'; 2048]).ok();
    bad.set_read_timeout(Some(SOON)).expect("timeout");
    let mut rest = Vec::new();
    let n = bad.read_to_end(&mut rest).unwrap_or(0);
    assert_eq!(n, 0, "the offending connection is closed without an ack");

    for i in 0..20 {
        good.write_all(&frame(format!("good-{i}").as_bytes()))
            .expect("write");
    }
    read_acks(&mut good, 20);
    sub.wait_for(
        "good messages and the one before the oversize frame",
        SOON,
        |got| {
            let payloads: HashSet<&[u8]> = got.iter().map(|r| r.payload.as_slice()).collect();
            payloads.contains(&b"before"[..])
                && (0..20).all(|i| payloads.contains(format!("good-{i}").as_bytes()))
        },
    );
    assert!(
        sub.received.iter().all(|r| r.payload.len() < 1024),
        "oversize message never forwarded"
    );
    agent.wait_for_log(
        "message larger than max_message_size",
        Duration::from_secs(5),
    );
}

#[test]
fn garbage_on_a_lines_socket_is_just_data_and_agent_keeps_running() {
    let broker = Mosquitto::start();
    let mut sub = Subscriber::start(broker.port, "up/#");
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let extra = format!("[[socket]]\nkind = \"tcp\"\nlisten = \"127.0.0.1:{port}\"\ntopic = \"t\"\nmax_message_size = \"256B\"\n");
    let _agent = Agent::start(
        dir.path(),
        &agent_config(&dir.path().join("data"), &broker.url(), &extra),
    );
    // A client that sends random bytes without newlines past the limit, then vanishes.
    let mut noisy = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let junk: Vec<u8> = (0..4096).map(|_| rand::random::<u8>() | 0x80).collect();
    let _ = noisy.write_all(&junk);
    drop(noisy);
    let mut ok = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    ok.write_all(b"still-alive\n").expect("write");
    sub.wait_for("a message after the garbage", SOON, |got| {
        got.iter().any(|r| r.payload == b"still-alive")
    });
}
