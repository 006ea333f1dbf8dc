//! Upstream bytes per message, measured on the wire: the real agent, in passthrough and
//! in batch mode, forwards the same telemetry to a real mosquitto; the kernel's counters
//! of the agent's upstream TCP connection (`ss -ti`: bytes and segments, both ways) give
//! what crossed the link, TCP/IP headers included.
//!
//!     cargo run --release -p edgerelay-tests --bin upstream_bytes_bench [-- MESSAGES]
//!
//! Batch sizes and levels are the configured ones (`[rate] adapt = false`): this
//! measures what each setting costs, not what the controller would pick.
//!
//! Every case first sends a warm-up, so that with `dictionary = "auto"` the agent has
//! trained (and announced) its dictionary; then the counters are read before and after
//! the measured messages.
//!
//! Wire bytes = payload bytes sent + received + 52 per segment (IPv4 20 + TCP 32 with
//! timestamps), the overhead a real link carries for every segment.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use edgerelay_tests::*;
use rand::{Rng, SeedableRng};

const HEADER_PER_SEGMENT: u64 = 52;
/// Messages sent before measuring: enough for the agent to train a dictionary.
const WARMUP: usize = 3000;

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

/// One configuration to measure.
struct Case {
    mode: &'static str,
    batch: usize,
    level: u32,
    dictionary: &'static str,
}

/// Settle and read the agent's upstream counters (the last PUBACKs may be in flight).
fn settled_counters(broker_port: u16) -> (u64, u64, u64, u64) {
    let mut last = socket_counters(broker_port).expect("agent's upstream connection");
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = socket_counters(broker_port).expect("agent's upstream connection");
        if now == last {
            return last;
        }
        last = now;
    }
}

/// What the subscriber received so far, decoded once per message.
#[derive(Default)]
struct Tally {
    dicts: HashMap<u64, edgerelay::wire::Dictionary>,
    seen: HashSet<Vec<u8>>,
    next: usize,
}

impl Tally {
    fn update(&mut self, sub: &mut Subscriber, mode: &str) {
        sub.drain();
        for r in &sub.received[self.next..] {
            if r.topic.contains("/dict/") {
                let d = edgerelay::wire::Dictionary::new(r.payload.clone());
                self.dicts.insert(d.id, d);
            } else if mode == "passthrough" {
                self.seen.insert(r.payload.clone());
            } else {
                let b = edgerelay::wire::decode(&r.payload, &|id| self.dicts.get(&id).cloned())
                    .expect("every batch decodes (its dictionary came first)");
                self.seen
                    .extend(b.records.into_iter().map(|r| r.payload.to_vec()));
            }
        }
        self.next = sub.received.len();
    }
}

/// Send `messages` and wait until every one of them is upstream.
fn push(
    conn: &mut TcpStream,
    sub: &mut Subscriber,
    tally: &mut Tally,
    mode: &str,
    messages: &[Vec<u8>],
) {
    for m in messages {
        conn.write_all(&frame(m)).expect("write");
    }
    let mut acks = vec![0u8; messages.len()];
    conn.read_exact(&mut acks).expect("acks");
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    loop {
        tally.update(sub, mode);
        if messages.iter().all(|m| tally.seen.contains(m)) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "messages missing upstream"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Wire bytes per message of `messages`, measured after `warmup` went through (so a
/// trained dictionary is in use, and every case is measured in the same steady state);
/// and whether the measured batches used a dictionary.
fn run(case: &Case, warmup: &[Vec<u8>], messages: &[Vec<u8>]) -> (f64, bool) {
    let broker = Mosquitto::start();
    let mut sub = Subscriber::start(broker.port, "up/#");
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = agent_config(
        &dir.path().join("data"),
        &broker.url(),
        &format!(
            "[rate]\nadapt = false\n\n[compression]\nlevel = {}\ndictionary = \"{}\"\n\n[[socket]]\nkind = \"tcp\"\nlisten = \"127.0.0.1:{port}\"\nframing = \"length-prefixed\"\ntopic = \"sensors/telemetry\"\nack = true\n",
            case.level, case.dictionary
        ),
    )
    .replace(
        "mode = \"passthrough\"\n",
        &format!(
            "mode = \"{}\"\nbatch_size = {}\nbatch_linger = \"100ms\"\n",
            case.mode, case.batch
        ),
    );
    let (mut agent, log) = spawn_release_agent(dir.path(), &config);
    wait_for_port(std::net::SocketAddr::from(([127, 0, 0, 1], port)), SOON);
    let mut conn = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let mut tally = Tally::default();
    push(&mut conn, &mut sub, &mut tally, case.mode, warmup);
    if case.dictionary == "auto" {
        // Wait for the agent's decision: a dictionary adopted, or none worth it.
        let deadline = std::time::Instant::now() + SOON;
        loop {
            let line = log
                .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
                .expect("the agent decides about a dictionary after the warm-up");
            if line.contains("batches now use this compression dictionary")
                || line.contains("would not make batches smaller")
                || line.contains("dictionary training failed")
            {
                break;
            }
        }
    }
    let before = settled_counters(broker.port);
    tally.update(&mut sub, case.mode);
    let skip = sub.received.len();
    push(&mut conn, &mut sub, &mut tally, case.mode, messages);
    let after = settled_counters(broker.port);
    let used_dict = sub.received[skip..].iter().any(|r| {
        r.topic.contains("/batch/")
            && edgerelay::wire::peek_header(&r.payload).is_ok_and(|(h, _)| h.dictionary != 0)
    });
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(agent.id().to_string())
        .status();
    let _ = agent.wait();
    let bytes = (after.0 - before.0)
        + (after.1 - before.1)
        + (after.2 - before.2 + after.3 - before.3) * HEADER_PER_SEGMENT;
    (bytes as f64 / messages.len() as f64, used_dict)
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20_000);
    // The warm-up (enough payloads to train a dictionary) comes from the same generator.
    let all = telemetry(WARMUP + n);
    let (warmup, messages) = all.split_at(WARMUP);
    let avg = messages.iter().map(Vec::len).sum::<usize>() as f64 / n as f64;
    println!("upstream_bytes_bench: {n} messages of {avg:.0} B JSON from 200 devices after a {WARMUP}-message warm-up, socket ingest, real mosquitto");
    println!();
    println!("| mode | batch | level | dictionary | wire bytes/msg (both directions, headers incl.) | vs passthrough |");
    println!("| --- | ---: | ---: | --- | ---: | ---: |");
    let passthrough = Case {
        mode: "passthrough",
        batch: 1,
        level: 3,
        dictionary: "off",
    };
    let (base, _) = run(&passthrough, warmup, messages);
    println!("| passthrough | 1 | - | - | {base:.1} | 1.000 |");
    for batch in [10, 100, 1000] {
        for level in [1, 3, 9, 19] {
            for dictionary in ["off", "auto"] {
                let case = Case {
                    mode: "batch",
                    batch,
                    level,
                    dictionary,
                };
                let (b, used) = run(&case, warmup, messages);
                let dict = match (dictionary, used) {
                    ("off", _) => "off",
                    (_, true) => "auto: trained, in use",
                    (_, false) => "auto: none worth it",
                };
                println!(
                    "| batch | {batch} | {level} | {dict} | {b:.1} | {:.3} |",
                    b / base
                );
            }
        }
    }
}
