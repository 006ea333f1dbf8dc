//! CPU cost of the eBPF link probe: the real agent (release build) relays 10,000
//! messages/s in passthrough mode (one publish, one ACK-clocked exchange per message:
//! the most sock_ops callbacks per message) to a real mosquitto, with `[link] probe`
//! set to "off", "tcp-info" and "ebpf", interleaved over several rounds in one run.
//!
//!     sudo cargo run --release -p edgerelay-tests --bin probe_cpu_bench [-- SECONDS ROUNDS]
//!
//! Two measures: the whole machine's busy time (/proc/stat) over the feeding window —
//! noisy on a shared VM — and, exactly, the time the kernel spent running the probe's
//! programs (BPF run-time statistics, enabled for the run: `run_time_ns` of each
//! `edgerelay_*` program) set against the agent's own CPU time (/proc/PID/stat) and
//! the machine's.

use std::io::Write;
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use edgerelay_tests::*;

const RATE: u64 = 10_000;

/// Busy and total jiffies of the whole machine.
fn machine_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    let cpu: Vec<u64> = stat
        .lines()
        .next()
        .expect("cpu line")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy = cpu[0] + cpu[1] + cpu[2] + cpu[5] + cpu[6] + cpu.get(7).copied().unwrap_or(0);
    (busy, cpu.iter().take(8).sum())
}

/// utime + stime of a process, in jiffies.
fn process_jiffies(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<u64> = after
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    // Fields after the comm: state(skipped as non-numeric) ppid … utime is field 14 overall.
    f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0)
}

struct Sample {
    machine_cpu_s: f64,
    agent_cpu_s: f64,
    /// Kernel time in the probe's programs during the window, and their runs.
    probe_s: f64,
    probe_runs: u64,
    source: String,
}

/// Total run time and run count of the loaded programs named edgerelay_* (the kernel
/// keeps 15 characters of a name).
fn probe_runtime() -> (std::time::Duration, u64) {
    let mut t = std::time::Duration::ZERO;
    let mut n = 0;
    for p in aya::programs::loaded_programs().flatten() {
        if p.name_as_str()
            .is_some_and(|name| name.starts_with("edgerelay_"))
        {
            t += p.run_time();
            n += p.run_count();
        }
    }
    (t, n)
}

fn run(probe: &str, seconds: u64, broker: &Mosquitto) -> Sample {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = agent_config(
        &dir.path().join("data"),
        &broker.url(),
        &format!("[link]\nprobe = \"{probe}\"\n\n[[socket]]\nkind = \"tcp\"\nlisten = \"127.0.0.1:{port}\"\nframing = \"lines\"\ntopic = \"sensors/t\"\n"),
    );
    let (mut agent, rx) = spawn_release_agent(dir.path(), &config);
    let mut source = String::new();
    let deadline = Instant::now() + SOON;
    while source.is_empty() {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the agent starts its link monitor");
        if line.contains("link monitor") {
            source = line
                .split("source=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or("none")
                .to_owned();
        }
    }
    wait_for_port(std::net::SocketAddr::from(([127, 0, 0, 1], port)), SOON);
    let mut conn = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let payload =
        br#"{"device":"dev-0042","temp_c":21.53,"humidity":48.1,"battery_v":3.71,"status":"ok"}"#;
    let (m0, _) = machine_jiffies();
    let a0 = process_jiffies(agent.id());
    let (p0, r0) = probe_runtime();
    let start = Instant::now();
    let per_tick = RATE / 100;
    for tick in 0..seconds * 100 {
        let mut batch = Vec::with_capacity(per_tick as usize * (payload.len() + 1));
        for _ in 0..per_tick {
            batch.extend_from_slice(payload);
            batch.push(b'\n');
        }
        conn.write_all(&batch).expect("write");
        let next = start + Duration::from_millis((tick + 1) * 10);
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    let (m1, _) = machine_jiffies();
    let a1 = process_jiffies(agent.id());
    let (p1, r1) = probe_runtime();
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(agent.id().to_string())
        .status();
    let _ = agent.wait();
    let hz = 100.0;
    Sample {
        machine_cpu_s: (m1 - m0) as f64 / hz,
        agent_cpu_s: (a1 - a0) as f64 / hz,
        probe_s: (p1.saturating_sub(p0)).as_secs_f64(),
        probe_runs: r1.saturating_sub(r0),
        source,
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let seconds: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(3);
    // Run-time statistics cost a little per program run; on only for this process's life.
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .expect("enable BPF run-time statistics (run as root)");
    let broker = Mosquitto::start();
    println!(
        "probe_cpu_bench: {RATE} msg/s for {seconds} s, passthrough, {rounds} rounds interleaved"
    );
    let modes = ["off", "tcp-info", "ebpf"];
    let mut totals = [(0.0f64, 0.0f64); 3];
    let mut sources = [String::new(), String::new(), String::new()];
    // eBPF runs: probe seconds, probe runs, machine CPU-s, agent CPU-s.
    let mut probe = (0.0f64, 0u64, 0.0f64, 0.0f64);
    for round in 0..rounds {
        for (i, m) in modes.iter().enumerate() {
            let s = run(m, seconds, &broker);
            println!(
                "round {round} probe={m:<8} (source {:<8}) machine CPU {:.2} s, agent CPU {:.2} s, probe programs {:.4} s in {} runs",
                s.source, s.machine_cpu_s, s.agent_cpu_s, s.probe_s, s.probe_runs
            );
            totals[i].0 += s.machine_cpu_s;
            totals[i].1 += s.agent_cpu_s;
            if *m == "ebpf" {
                probe.0 += s.probe_s;
                probe.1 += s.probe_runs;
                probe.2 += s.machine_cpu_s;
                probe.3 += s.agent_cpu_s;
            }
            sources[i] = s.source;
        }
    }
    println!();
    println!(
        "| probe | source | machine CPU-s per run | agent CPU-s per run | machine CPU vs off |"
    );
    println!("| --- | --- | ---: | ---: | ---: |");
    let base = totals[0].0 / rounds as f64;
    for (i, m) in modes.iter().enumerate() {
        let machine = totals[i].0 / rounds as f64;
        let agent = totals[i].1 / rounds as f64;
        println!(
            "| {m} | {} | {machine:.2} | {agent:.2} | {:+.1} % |",
            sources[i],
            (machine / base - 1.0) * 100.0
        );
    }
    println!();
    println!(
        "probe programs: {:.1} ms per run of {seconds} s ({} program runs, {:.0} ns each) = {:.2} % of the agent's CPU, {:.2} % of the machine's",
        probe.0 / rounds as f64 * 1e3,
        probe.1 / rounds as u64,
        probe.0 * 1e9 / probe.1.max(1) as f64,
        probe.0 / probe.3 * 100.0,
        probe.0 / probe.2 * 100.0
    );
}
