//! Upstream bytes per message, measured on the wire: the real agent, in passthrough and
//! in batch mode, forwards the same telemetry to a real mosquitto; the kernel's counters
//! of the agent's upstream TCP connection (`ss -ti`: bytes and segments, both ways) give
//! what crossed the link, TCP/IP headers included.
//!
//!     cargo run --release -p edgerelay-tests --bin upstream_bytes_bench [-- MESSAGES]
//!
//! Wire bytes = payload bytes sent + received + 52 per segment (IPv4 20 + TCP 32 with
//! timestamps), the overhead a real link carries for every segment.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use edgerelay_tests::*;
use rand::{Rng, SeedableRng};

const HEADER_PER_SEGMENT: u64 = 52;

fn telemetry(n: usize) -> Vec<Vec<u8>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut temp: Vec<f64> = (0..200).map(|_| rng.random_range(15.0..30.0)).collect();
    (0..n)
        .map(|i| {
            let d = i % 200;
            temp[d] += rng.random_range(-0.2..0.2);
            format!(
                "{{\"device\":\"dev-{d:04}\",\"ts\":{},\"temp_c\":{:.2},\"humidity\":{:.1},\"pressure_hpa\":{:.1},\"battery_v\":{:.3},\"rssi_dbm\":{},\"status\":\"ok\",\"fw\":\"2.4.1\"}}",
                1_795_000_000_000u64 + i as u64 * 5,
                temp[d],
                40.0 + rng.random_range(0.0..20.0),
                1013.0 + rng.random_range(-3.0..3.0),
                3.3 + rng.random_range(0.0..0.8),
                -55 - rng.random_range(0..30),
            )
            .into_bytes()
        })
        .collect()
}

/// (bytes_sent, bytes_received, segs_out, segs_in) of the established connection to
/// 127.0.0.1:`port` from the agent.
fn socket_counters(port: u16) -> Option<(u64, u64, u64, u64)> {
    let out = Command::new("ss")
        .args([
            "-tinH",
            "state",
            "established",
            "dst",
            &format!("127.0.0.1:{port}"),
        ])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| -> Option<u64> {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}:")))
            .and_then(|v| v.parse().ok())
    };
    Some((
        field("bytes_sent")?,
        field("bytes_received").unwrap_or(0),
        field("segs_out")?,
        field("segs_in")?,
    ))
}

fn run(mode: &str, batch_size: usize, level: u32, messages: &[Vec<u8>]) -> f64 {
    let broker = Mosquitto::start();
    let mut sub = Subscriber::start(broker.port, "up/#");
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = agent_config(
        &dir.path().join("data"),
        &broker.url(),
        &format!(
            "[compression]\nlevel = {level}\n\n[[socket]]\nkind = \"tcp\"\nlisten = \"127.0.0.1:{port}\"\nframing = \"length-prefixed\"\ntopic = \"sensors/telemetry\"\nack = true\n"
        ),
    )
    .replace("mode = \"passthrough\"\n", &format!("mode = \"{mode}\"\nbatch_size = {batch_size}\nbatch_linger = \"100ms\"\n"));
    std::fs::write(dir.path().join("edgerelay.toml"), &config).expect("config");
    let mut agent = Command::new(build_agent(&[]))
        .args(["run", "--config"])
        .arg(dir.path().join("edgerelay.toml"))
        .env("EDGERELAY_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("agent");
    wait_for_port(std::net::SocketAddr::from(([127, 0, 0, 1], port)), SOON);
    let mut conn = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    for m in messages {
        conn.write_all(&frame(m)).expect("write");
    }
    let mut acks = vec![0u8; messages.len()];
    conn.read_exact(&mut acks).expect("acks");
    let n = messages.len();
    sub.wait_for("every message upstream", Duration::from_secs(120), |got| {
        if mode == "passthrough" {
            got.len() >= n
        } else {
            let mut seen = HashSet::new();
            for r in got {
                if let Ok(b) = edgerelay::wire::decode(&r.payload, &|_| None) {
                    seen.extend(b.records.into_iter().map(|r| r.seq));
                }
            }
            seen.len() >= n
        }
    });
    // The last PUBACKs may still be in flight: let the counters settle.
    let mut last = socket_counters(broker.port).expect("agent's upstream connection");
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = socket_counters(broker.port).expect("agent's upstream connection");
        if now == last {
            break;
        }
        last = now;
    }
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(agent.id().to_string())
        .status();
    let _ = agent.wait();
    let (sent, received, segs_out, segs_in) = last;
    (sent + received + (segs_out + segs_in) * HEADER_PER_SEGMENT) as f64 / n as f64
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20_000);
    let messages = telemetry(n);
    let avg = messages.iter().map(Vec::len).sum::<usize>() as f64 / n as f64;
    println!("upstream_bytes_bench: {n} messages of {avg:.0} B JSON from 200 devices, socket ingest, real mosquitto");
    println!();
    println!("| mode | batch | level | wire bytes/msg (both directions, headers incl.) | vs passthrough |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    let base = run("passthrough", 1, 3, &messages);
    println!("| passthrough | 1 | - | {base:.1} | 1.000 |");
    for (batch, level) in [
        (10, 3),
        (100, 3),
        (1000, 1),
        (1000, 3),
        (1000, 9),
        (1000, 19),
    ] {
        let b = run("batch", batch, level, &messages);
        println!("| batch | {batch} | {level} | {b:.1} | {:.3} |", b / base);
    }
}
