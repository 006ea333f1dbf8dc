//! Local MQTT ingest benchmark: the same load against a plain mosquitto and against
//! edgerelay's endpoint (durable per message, uploading to a central mosquitto), in one
//! run on one machine.
//!
//!     cargo run --release -p edgerelay-tests --bin mqtt_ingest_bench [-- CLIENTS MESSAGES_PER_CLIENT]
//!
//! Load: CLIENTS concurrent rumqttc clients, each publishing ~200-byte JSON telemetry at
//! QoS 1 with up to 64 publishes in flight. Figures: msgs/s, PUBACK latency p50/p99,
//! server CPU-seconds per 100k messages (utime+stime from /proc), peak RSS (VmHWM).
//!
//! Knobs used for the measurements in docs/benchmarks.md: `--offline` (the agent's
//! upstream is unreachable), BENCH_AGENT_CONFIG (TOML prepended to the agent's config,
//! `\n` for newlines, e.g. `[buffer]\ncache_size = "4MiB"`), BENCH_AGENT_ENV (one
//! `NAME=value` for the agent, e.g. `MALLOC_ARENA_MAX=1`).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use edgerelay_tests::*;

const INFLIGHT: u16 = 64;

#[derive(Debug)]
struct Figures {
    msgs_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_s_per_100k: f64,
    peak_rss_mb: f64,
}

fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("proc stat");
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().expect("utime") + f[12].parse::<f64>().expect("stime");
    ticks / clk_tck()
}

fn peak_rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("VmHWM");
    kb / 1024.0
}

fn telemetry(device: usize, i: usize) -> Vec<u8> {
    format!(
        "{{\"device\":\"dev-{device:04}\",\"ts\":{},\"temp_c\":{:.2},\"humidity\":{:.1},\"pressure_hpa\":{:.1},\"battery_v\":{:.3},\"rssi_dbm\":{},\"status\":\"ok\",\"fw\":\"2.4.1\",\"site\":\"plant-7/line-3\",\"seq\":{i}}}",
        1_795_000_000_000u64 + i as u64 * 1000,
        20.0 + (i % 97) as f64 / 10.0,
        40.0 + (i % 53) as f64 / 3.0,
        1000.0 + (i % 41) as f64 / 2.0,
        3.3 + (i % 11) as f64 / 100.0,
        -60 - (i % 30) as i64,
    )
    .into_bytes()
}

/// Run the load against `port`; returns (elapsed, all PUBACK latencies).
async fn load(port: u16, clients: usize, per_client: usize) -> (Duration, Vec<Duration>) {
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(clients);
    for c in 0..clients {
        tasks.push(tokio::spawn(async move {
            let mut opts = rumqttc::MqttOptions::new(
                format!("bench-{c}-{}", rand::random::<u32>()),
                "127.0.0.1",
                port,
            );
            opts.set_keep_alive(Duration::from_secs(60));
            opts.set_inflight(INFLIGHT);
            let (client, mut events) = rumqttc::AsyncClient::new(opts, 256);
            let topic = format!("sensors/dev-{c:04}/telemetry");
            let producer = {
                let client = client.clone();
                tokio::spawn(async move {
                    for i in 0..per_client {
                        client
                            .publish(
                                topic.clone(),
                                rumqttc::QoS::AtLeastOnce,
                                false,
                                telemetry(c, i),
                            )
                            .await
                            .expect("publish");
                    }
                })
            };
            let mut sent_at = std::collections::HashMap::with_capacity(INFLIGHT as usize * 2);
            let mut latencies = Vec::with_capacity(per_client);
            while latencies.len() < per_client {
                match events.poll().await.expect("bench connection") {
                    rumqttc::Event::Outgoing(rumqttc::Outgoing::Publish(pkid)) => {
                        sent_at.insert(pkid, Instant::now());
                    }
                    rumqttc::Event::Incoming(rumqttc::Packet::PubAck(a)) => {
                        if let Some(t) = sent_at.remove(&a.pkid) {
                            latencies.push(t.elapsed());
                        }
                    }
                    _ => {}
                }
            }
            producer.await.expect("producer");
            let _ = client.disconnect().await;
            latencies
        }));
    }
    let mut all = Vec::with_capacity(clients * per_client);
    for t in tasks {
        all.extend(t.await.expect("client"));
    }
    (start.elapsed(), all)
}

fn measure(
    pid: u32,
    port: u16,
    clients: usize,
    per_client: usize,
    rt: &tokio::runtime::Runtime,
) -> Figures {
    // Warm-up so both servers have their connections' code paths hot.
    rt.block_on(load(port, 4, 200));
    let cpu0 = cpu_seconds(pid);
    let (elapsed, mut lat) = rt.block_on(load(port, clients, per_client));
    let cpu = cpu_seconds(pid) - cpu0;
    lat.sort();
    let n = lat.len();
    let pct = |p: f64| lat[((n as f64 * p) as usize).min(n - 1)].as_secs_f64() * 1000.0;
    Figures {
        msgs_per_s: n as f64 / elapsed.as_secs_f64(),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        cpu_s_per_100k: cpu / n as f64 * 100_000.0,
        peak_rss_mb: peak_rss_mb(pid),
    }
}

fn plain_mosquitto(dir: &Path, port: u16) -> Child {
    let conf = dir.join("plain.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\n"),
    )
    .expect("conf");
    let child = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto");
    wait_for_port(std::net::SocketAddr::from(([127, 0, 0, 1], port)), SOON);
    child
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    // --offline: the agent's upstream is unreachable, so it only buffers (the outage case).
    let offline = std::env::args().any(|a| a == "--offline");
    let clients = args.first().copied().unwrap_or(50);
    let per_client = args.get(1).copied().unwrap_or(2000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    println!("mqtt_ingest_bench: {clients} clients x {per_client} QoS 1 messages (~{} B JSON), {INFLIGHT} in flight per client", telemetry(0, 0).len());

    let port = free_port();
    let mut mosq = plain_mosquitto(dir.path(), port);
    let m = measure(mosq.id(), port, clients, per_client, &rt);
    let _ = mosq.kill();
    let _ = mosq.wait();

    let central = Mosquitto::start();
    let bin = build_agent(&[]);
    let agent_port = free_port();
    let upstream = if offline {
        format!("mqtt://127.0.0.1:{}", free_port())
    } else {
        central.url()
    };
    let config = agent_config(
        &dir.path().join("data"),
        &upstream,
        &format!(
            "{}\n{}",
            std::env::var("BENCH_AGENT_CONFIG")
                .unwrap_or_default()
                .replace("\\n", "\n"),
            local_mqtt_section(agent_port, r##"["#"]"##, "max_connections = 4096\n")
        ),
    );
    std::fs::write(dir.path().join("edgerelay.toml"), &config).expect("config");
    let mut agent = Command::new(&bin)
        .args(["run", "--config"])
        .arg(dir.path().join("edgerelay.toml"))
        .env("EDGERELAY_LOG", "warn")
        .envs(
            std::env::var("BENCH_AGENT_ENV")
                .ok()
                .and_then(|v| v.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned()))),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("edgerelay");
    wait_for_port(
        std::net::SocketAddr::from(([127, 0, 0, 1], agent_port)),
        SOON,
    );
    let e = measure(agent.id(), agent_port, clients, per_client, &rt);
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(agent.id().to_string())
        .status();
    let _ = agent.wait();

    println!();
    println!("| server | msgs/s | PUBACK p50 (ms) | PUBACK p99 (ms) | CPU-s / 100k msgs | peak RSS (MB) |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for (name, f) in [
        ("mosquitto 2 (in memory, acks on receipt)", &m),
        (
            if offline {
                "edgerelay (fsync before PUBACK, upstream offline)"
            } else {
                "edgerelay (fsync before PUBACK, uploading)"
            },
            &e,
        ),
    ] {
        println!(
            "| {name} | {:.0} | {:.2} | {:.2} | {:.2} | {:.1} |",
            f.msgs_per_s, f.p50_ms, f.p99_ms, f.cpu_s_per_100k, f.peak_rss_mb
        );
    }
    println!();
    println!(
        "edgerelay / mosquitto throughput: {:.2}x",
        e.msgs_per_s / m.msgs_per_s
    );
}
