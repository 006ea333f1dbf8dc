//! The link lab does what it claims, measured from the endpoints: RTT, loss, rate and
//! outages as configured, ≥ 20 Mbit/s when unimpaired, cleanup even after a panic, a
//! clear refusal without root, and real programs (mosquitto) inside its namespaces.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgerelay_tests::*;
use linklab::{spec, Dir, Lab, Side};

fn lab(both: &str) -> Lab {
    Lab::builder()
        .both(spec::parse(both).expect("spec"))
        .seed(42)
        .start()
        .expect("the link lab starts (the tests run as root)")
}

/// A TCP listener in the central namespace on `port`.
fn listen_central(lab: &Lab, port: u16) -> TcpListener {
    let addr = SocketAddr::from((lab.addr(Side::Central), port));
    lab.run_in(Side::Central, move || TcpListener::bind(addr))
        .expect("in the lab")
        .expect("bind in central")
}

fn connect_from_gateway(lab: &Lab, port: u16) -> TcpStream {
    let addr = SocketAddr::from((lab.addr(Side::Central), port));
    lab.run_in(Side::Gateway, move || {
        TcpStream::connect_timeout(&addr, SOON)
    })
    .expect("in the lab")
    .expect("connect across the lab")
}

/// Echo every byte back, until the peer closes.
fn echo(listener: TcpListener) {
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let mut buf = [0u8; 4096];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 || s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    });
}

#[test]
fn rtt_is_twice_the_one_way_delay() {
    let lab = lab("delay=40ms");
    echo(listen_central(&lab, 7000));
    let mut s = connect_from_gateway(&lab, 7000);
    let mut b = [0u8; 1];
    for i in 0..30u8 {
        s.write_all(&[i]).expect("write");
        s.read_exact(&mut b).expect("echo");
        assert_eq!(b[0], i);
    }
    let rtt = linklab::tcp_info(&s).expect("TCP_INFO").rtt;
    eprintln!("configured 2 × 40 ms, TCP_INFO rtt {rtt:?}");
    assert!(
        rtt >= Duration::from_millis(72) && rtt <= Duration::from_millis(88),
        "RTT {rtt:?} not within 10 % of 80 ms"
    );
}

#[test]
fn loss_matches_the_configured_rate() {
    let lab = Lab::builder()
        .up(spec::parse("loss=5%").expect("spec"))
        .seed(7)
        .start()
        .expect("lab");
    let central = lab.addr(Side::Central);
    let rx = lab
        .run_in(Side::Central, move || UdpSocket::bind((central, 9000)))
        .expect("in the lab")
        .expect("bind");
    let tx = lab
        .run_in(Side::Gateway, || UdpSocket::bind(("0.0.0.0", 0)))
        .expect("in the lab")
        .expect("bind");
    const N: u32 = 12_000;
    let done = Arc::new(AtomicBool::new(false));
    let seen_end = done.clone();
    let receiver = std::thread::spawn(move || {
        let mut got = HashSet::new();
        let mut buf = [0u8; 64];
        rx.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(n) = rx.recv(&mut buf) {
                if &buf[..n] == b"end" {
                    seen_end.store(true, Ordering::Relaxed);
                    break;
                }
                if n == 4 {
                    got.insert(u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]));
                }
            }
        }
        got.len()
    });
    let dest = (lab.addr(Side::Central), 9000);
    for i in 0..N {
        tx.send_to(&i.to_be_bytes(), dest).expect("send");
        if i % 50 == 49 {
            // Paced (~25k datagrams/s) so no socket buffer on the way drops any: only
            // the emulated loss may.
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    // The end marker can be lost too: repeat it until the receiver saw it.
    let deadline = Instant::now() + SOON;
    while !done.load(Ordering::Relaxed) && Instant::now() < deadline {
        tx.send_to(b"end", dest).expect("send");
        std::thread::sleep(Duration::from_millis(10));
    }
    let received = receiver.join().expect("receiver");
    let loss = 1.0 - f64::from(received as u32) / f64::from(N);
    eprintln!(
        "configured 5 %, measured {:.2} % over {N} datagrams",
        loss * 100.0
    );
    assert!(
        (loss - 0.05).abs() <= 0.01,
        "loss {loss} not within ±1 pp of 5 %"
    );
    assert!(lab.stats(Dir::Up).lost > 0);
    assert_eq!(lab.stats(Dir::Down).lost, 0, "loss was set one way only");
}

/// Bytes per second received by a sink in the central namespace while the gateway
/// sends `total` bytes as fast as TCP lets it.
fn bulk_goodput(lab: &Lab, port: u16, total: usize) -> f64 {
    let listener = listen_central(lab, port);
    let sink = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut buf = vec![0u8; 64 << 10];
        let mut got = 0usize;
        let mut first = None;
        while got < total {
            let n = s.read(&mut buf).expect("read");
            assert!(n > 0, "sender closed early");
            first.get_or_insert_with(Instant::now);
            got += n;
        }
        let elapsed = first.map(|f| f.elapsed()).unwrap_or_default();
        got as f64 / elapsed.as_secs_f64()
    });
    let mut s = connect_from_gateway(lab, port);
    let chunk = vec![0x5au8; 64 << 10];
    let mut sent = 0;
    while sent < total {
        let n = chunk.len().min(total - sent);
        s.write_all(&chunk[..n]).expect("write");
        sent += n;
    }
    sink.join().expect("sink")
}

#[test]
fn bulk_throughput_matches_the_rate() {
    let lab = Lab::builder()
        .up(spec::parse("rate=8mbit,delay=10ms").expect("spec"))
        .down(spec::parse("delay=10ms").expect("spec"))
        .start()
        .expect("lab");
    let before = lab.counters(Side::Central).expect("counters");
    let goodput = bulk_goodput(&lab, 7001, 3_000_000) * 8.0;
    let after = lab.counters(Side::Central).expect("counters");
    eprintln!(
        "configured 8 Mbit/s: TCP goodput {:.2} Mbit/s; central received {} bytes in {} frames",
        goodput / 1e6,
        after.rx_bytes - before.rx_bytes,
        after.rx_packets - before.rx_packets
    );
    assert!(
        (goodput - 8e6).abs() <= 0.8e6,
        "goodput {:.2} Mbit/s not within 10 % of 8",
        goodput / 1e6
    );
}

#[test]
fn unimpaired_lab_forwards_at_least_20_mbit() {
    let lab = lab("");
    let goodput = bulk_goodput(&lab, 7002, 20_000_000) * 8.0;
    let st = lab.stats(Dir::Up);
    eprintln!(
        "unimpaired lab: {:.0} Mbit/s, {} frames of {} B on average",
        goodput / 1e6,
        st.frames_out,
        st.bytes_out / st.frames_out.max(1)
    );
    assert!(
        st.bytes_out / st.frames_out.max(1) <= 1514,
        "real-sized frames (offloads off), not super-frames"
    );
    assert!(goodput >= 20e6, "only {:.1} Mbit/s", goodput / 1e6);
}

#[test]
fn an_outage_stalls_a_connection_which_recovers_after_it() {
    let lab = lab("delay=5ms");
    echo(listen_central(&lab, 7003));
    let mut s = connect_from_gateway(&lab, 7003);
    let mut b = [0u8; 5];
    s.write_all(b"hello").expect("write");
    s.read_exact(&mut b).expect("echo before the outage");

    lab.outage(true);
    s.write_all(b"stall").expect("write (buffered)");
    // The segment and its retransmissions are blackholed.
    wait_until("retransmissions dropped by the outage", SOON, || {
        let retrans = linklab::tcp_info(&s).expect("TCP_INFO").total_retrans;
        (retrans >= 2 && lab.stats(Dir::Up).outage_dropped >= 3).then_some(())
    });
    s.set_nonblocking(true).expect("nonblocking");
    let mut probe = [0u8; 5];
    assert!(
        matches!(s.read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "nothing comes back during the outage"
    );

    lab.outage(false);
    s.set_nonblocking(false).expect("blocking");
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    s.read_exact(&mut b).expect("the connection recovers");
    assert_eq!(&b, b"stall");
}

#[test]
fn labs_are_removed_even_when_a_test_panics_and_run_side_by_side() {
    let names = |l: &Lab| {
        [
            l.namespace(Side::Gateway).to_owned(),
            l.namespace(Side::Central).to_owned(),
        ]
    };
    let a = lab("");
    let b = lab("");
    assert_ne!(names(&a), names(&b), "unique per lab");
    let a_names = names(&a);
    drop(a);
    let b_names = names(&b);
    let panicked = std::thread::spawn(move || {
        let _b = b;
        panic!("a test fails with a lab up");
    })
    .join();
    assert!(panicked.is_err());
    let list = String::from_utf8(
        Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip netns list")
            .stdout,
    )
    .expect("utf8");
    for n in a_names.iter().chain(&b_names) {
        assert!(!list.contains(n.as_str()), "{n} left behind: {list}");
    }
}

#[test]
fn mosquitto_runs_in_the_central_namespace() {
    let lab = lab("delay=20ms");
    let _broker = Mosquitto::start_in(lab.namespace(Side::Central), lab.addr(Side::Central));
    // Retained, so the subscriber (in the central namespace) gets it whenever it is ready.
    let status = lab
        .command(Side::Gateway, "mosquitto_pub")
        .args([
            "-h",
            &lab.addr(Side::Central).to_string(),
            "-t",
            "lab/t",
            "-m",
            "across",
            "-q",
            "1",
            "-r",
        ])
        .status()
        .expect("mosquitto_pub");
    assert!(status.success());
    let sub = lab
        .command(Side::Central, "mosquitto_sub")
        .args([
            "-h",
            &lab.addr(Side::Central).to_string(),
            "-t",
            "lab/t",
            "-C",
            "1",
            "-W",
            "30",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub");
    let out = sub.wait_with_output().expect("subscriber output");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "across");
    assert!(lab.stats(Dir::Up).frames_out > 0, "it crossed the link");
}
