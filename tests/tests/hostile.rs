//! Hostile clients on the local MQTT listener (issue 10): garbage bytes, half-open
//! connections, slowloris CONNECTs, 10 000 connection attempts, oversized packets and a
//! subscriber that never reads — all at once — while a well-behaved client publishes at
//! QoS 1. Its PUBACK latency is measured before and during the attack, and the agent's
//! RSS throughout: the good client keeps its service, memory stays bounded, the agent
//! keeps running.

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;

use edgerelay_tests::*;

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort_unstable();
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

/// Publish every 10 ms for `span` at least, and on until `more` says no (at most 2
/// minutes); PUBACK latencies.
fn good_client(port: u16, id: &str, span: Duration, more: impl Fn() -> bool) -> Vec<Duration> {
    let mut c = MiniMqtt::connect(port, id).expect("the good client connects");
    let mut lat = Vec::new();
    let start = Instant::now();
    let mut i = 0;
    while start.elapsed() < span || (more() && start.elapsed() < Duration::from_secs(120)) {
        let t = Instant::now();
        assert!(
            c.publish("sensors/good", format!("good-{id}-{i}").as_bytes()),
            "the good client lost its connection"
        );
        lat.push(t.elapsed());
        i += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
    lat
}

#[test]
fn hostile_clients_do_not_starve_a_good_one_and_memory_stays_bounded() {
    let broker = Mosquitto::start();
    let mut central = Subscriber::start(broker.port, "up/#");
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let extra = local_mqtt_section(
        port,
        r#"["sensors/#"]"#,
        "connect_timeout = \"2s\"\nmax_packet_size = \"64KiB\"",
    );
    let agent = Agent::start(
        dir.path(),
        &agent_config(&dir.path().join("data"), &broker.url(), &extra),
    );
    let pid = agent.pid();
    let rss_idle = rss_kib(pid).expect("agent RSS");

    let before = good_client(port, "good-before", Duration::from_secs(3), || false);

    let stop = Arc::new(AtomicBool::new(false));
    let attempts = Arc::new(AtomicUsize::new(0));
    let mut attackers = Vec::new();
    // Garbage bytes, again and again.
    for _ in 0..20 {
        let stop = stop.clone();
        attackers.push(std::thread::spawn(move || {
            let mut rng = rand::rng();
            while !stop.load(Ordering::Relaxed) {
                if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
                    let junk: Vec<u8> = (0..rng.random_range(1..4096))
                        .map(|_| rng.random())
                        .collect();
                    let _ = s.write_all(&junk);
                }
            }
        }));
    }
    // Half-open: a partial CONNECT, then silence (held open).
    let mut held = Vec::new();
    for _ in 0..200 {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.write_all(&[0x10, 0x20, 0x00]);
            held.push(s);
        }
    }
    // Slowloris: CONNECTs one byte per 300 ms.
    for i in 0..50 {
        let stop = stop.clone();
        attackers.push(std::thread::spawn(move || {
            let mut pkt = bytes::BytesMut::new();
            let c = rumqttc::mqttbytes::v4::Connect::new(format!("slow-{i}"));
            let _ = rumqttc::mqttbytes::v4::Packet::Connect(c).write(&mut pkt, 1 << 20);
            while !stop.load(Ordering::Relaxed) {
                let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
                    continue;
                };
                for b in pkt.iter() {
                    if stop.load(Ordering::Relaxed) || s.write_all(&[*b]).is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(300));
                }
            }
        }));
    }
    // 10 000 connection attempts.
    for _ in 0..4 {
        let attempts = attempts.clone();
        attackers.push(std::thread::spawn(move || {
            while attempts.load(Ordering::Relaxed) < 10_000 {
                let _ = TcpStream::connect(("127.0.0.1", port));
                attempts.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Oversized: a PUBLISH that says 200 MB follow (after a valid CONNECT), then a
    // stream of bytes.
    for i in 0..10 {
        let stop = stop.clone();
        attackers.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let Some(c) = MiniMqtt::connect(port, &format!("big-{i}")) else {
                    continue;
                };
                drop(c);
                let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
                    continue;
                };
                let mut pkt = bytes::BytesMut::new();
                let c = rumqttc::mqttbytes::v4::Connect::new(format!("big2-{i}"));
                let _ = rumqttc::mqttbytes::v4::Packet::Connect(c).write(&mut pkt, 1 << 20);
                let _ = s.write_all(&pkt);
                // PUBLISH QoS 0, remaining length 200 000 000 (varint).
                let _ = s.write_all(&[0x30, 0x80, 0x84, 0xAF, 0x5F]);
                let chunk = vec![b'x'; 64 * 1024];
                for _ in 0..64 {
                    if s.write_all(&chunk).is_err() {
                        break;
                    }
                }
            }
        }));
    }
    // A subscriber to everything that never reads.
    let mut never = MiniMqtt::connect(port, "never-reads").expect("connect");
    assert!(never.subscribe("#"));

    // RSS sampled while the good client publishes under attack.
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while sampling.load(Ordering::Relaxed) {
                peak = peak.max(rss_kib(pid).unwrap_or(0));
                std::thread::sleep(Duration::from_millis(50));
            }
            peak
        })
    };
    // Under attack for 10 s, and until the 10 000 connection attempts are made (a busy
    // machine makes them slower).
    let attack_started = Instant::now();
    let during = good_client(port, "good-during", Duration::from_secs(10), || {
        attempts.load(Ordering::Relaxed) < 10_000
    });
    let attack = attack_started.elapsed();
    sampling.store(false, Ordering::Relaxed);
    let rss_peak = sampler.join().expect("sampler");
    stop.store(true, Ordering::Relaxed);
    for a in attackers {
        a.join().expect("attacker");
    }
    drop(held);
    drop(never);

    let (mut b, mut d) = (before.clone(), during.clone());
    let (b50, b99) = (percentile(&mut b, 0.5), percentile(&mut b, 0.99));
    let (d50, d99) = (percentile(&mut d, 0.5), percentile(&mut d, 0.99));
    let dmax = percentile(&mut d, 1.0);
    eprintln!(
        "hostile: good client PUBACK p50/p99 {b50:?}/{b99:?} before, {d50:?}/{d99:?} (max {dmax:?}) during the attack ({} publishes in {:?}); {} connection attempts; RSS idle {} MiB, peak {} MiB",
        during.len(),
        attack,
        attempts.load(Ordering::Relaxed),
        rss_idle / 1024,
        rss_peak / 1024
    );
    assert!(
        d99 < Duration::from_millis(500),
        "p99 PUBACK latency {d99:?} under attack"
    );
    assert!(
        during.len() > 300,
        "only {} publishes in 10 s",
        during.len()
    );
    assert!(
        rss_peak < rss_idle + 128 * 1024,
        "RSS grew from {rss_idle} KiB to {rss_peak} KiB under attack"
    );
    assert!(attempts.load(Ordering::Relaxed) >= 10_000);
    // Still serving, and everything the good clients were acknowledged for went up.
    let total = before.len() + during.len();
    central.wait_for(
        "every good publish upstream",
        Duration::from_secs(30),
        |got| {
            got.iter()
                .filter(|r| r.payload.starts_with(b"good-"))
                .count()
                >= total
        },
    );
    assert!(rss_kib(pid).is_some(), "the agent died");
    assert!(!agent.logs().contains("panicked"), "{}", agent.logs());
}
