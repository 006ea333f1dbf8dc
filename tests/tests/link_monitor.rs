//! The link monitor on the link lab: what it reports matches the emulated link — RTT
//! and loss as configured, `up` false during an outage, refused connections counted as
//! resets.

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgerelay_tests::*;
use linklab::{spec, Lab, Side};
use rand::RngCore;

const FEED_PORT: u16 = 7100;

fn config(data: &std::path::Path, lab: &Lab, probe: &str, mode: &str) -> String {
    agent_config(
        data,
        &format!("mqtt://{}:1883", lab.addr(Side::Central)),
        &format!(
            "[link]\nprobe = \"{probe}\"\n\n[compression]\ndictionary = \"off\"\nlevel = 1\n\n[[socket]]\nkind = \"tcp\"\nlisten = \"127.0.0.1:{FEED_PORT}\"\nframing = \"length-prefixed\"\ntopic = \"bulk\"\n"
        ),
    )
    .replace("mode = \"passthrough\"\n", &format!("mode = \"{mode}\"\nbatch_size = 100\nbatch_linger = \"20ms\"\n"))
}

/// The monitor started with `probe` as its source, or the test fails with its reason.
fn assert_source(agent: &Agent, probe: &str) {
    agent.wait_for_log("link monitor", SOON);
    let logs = agent.logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("link monitor started") && l.contains(&format!("source=\"{probe}\""))),
        "the link monitor did not start with source {probe} (the eBPF tests need root and kernel BTF):\n{logs}"
    );
}

/// Feed the agent (inside the gateway namespace) with `size`-byte random payloads until
/// the returned flag is set.
fn feed(lab: &Lab, size: usize) -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = stop.clone();
    let conn = lab
        .run_in(Side::Gateway, || {
            TcpStream::connect(("127.0.0.1", FEED_PORT))
        })
        .expect("in the lab")
        .expect("connect to the agent's socket");
    std::thread::spawn(move || {
        let mut conn = conn;
        let mut rng = rand::rng();
        let mut payload = vec![0u8; size];
        while !stopping.load(Ordering::Relaxed) {
            rng.fill_bytes(&mut payload);
            if conn.write_all(&frame(&payload)).is_err() {
                break;
            }
        }
    });
    stop
}

/// The value of `name=` in a log line.
fn field(line: &str, name: &str) -> Option<String> {
    let start = line.find(&format!(" {name}="))? + name.len() + 2;
    let rest = &line[start..];
    Some(rest.split_whitespace().next()?.trim_matches('"').to_owned())
}

fn quality_lines(agent: &Agent) -> Vec<String> {
    agent
        .log_lines()
        .into_iter()
        .filter(|l| l.contains("link quality"))
        .collect()
}

/// 100 ms one way, 2 % loss both ways: the monitor, fed by `probe`, reports an RTT
/// within 15 % of 200 ms and a retransmit rate within 1 point of 2 %.
fn measures_rtt_and_loss_of_a_lossy_link(probe: &str) {
    let lab = Lab::builder()
        .both(spec::parse("delay=100ms,loss=2%").expect("spec"))
        .seed(11)
        .start()
        .expect("lab");
    let _broker = Mosquitto::start_in(lab.namespace(Side::Central), lab.addr(Side::Central));
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = Agent::start_in_netns(
        lab.namespace(Side::Gateway),
        dir.path(),
        &config(&dir.path().join("data"), &lab, probe, "batch"),
    );
    assert_source(&agent, probe);
    let stop = feed(&lab, 1024);
    // ~30 s of bulk upload: the loss rate needs a few thousand segments.
    agent.wait_for_logs(
        "30 s of link quality while uploading",
        Duration::from_secs(120),
        |lines| {
            lines
                .iter()
                .filter(|l| {
                    l.contains("link quality") && l.contains("up=true") && !l.contains("loss=0 ")
                })
                .count()
                >= 30
        },
    );
    stop.store(true, Ordering::Relaxed);
    let last = quality_lines(&agent).pop().expect("a quality line");
    eprintln!("{last}");
    assert_eq!(field(&last, "source").as_deref(), Some(probe));
    let srtt: f64 = field(&last, "srtt_ms")
        .and_then(|v| v.parse().ok())
        .expect("srtt");
    let loss: f64 = field(&last, "loss")
        .and_then(|v| v.parse().ok())
        .expect("loss");
    assert!(
        (srtt - 200.0).abs() <= 30.0,
        "srtt {srtt} ms not within 15 % of 200 ms"
    );
    assert!(
        (loss - 0.02).abs() <= 0.01,
        "loss {loss} not within 1 point of 2 %"
    );
}

#[test]
fn tcp_info_measures_rtt_and_loss_of_a_lossy_link() {
    measures_rtt_and_loss_of_a_lossy_link("tcp-info");
}

#[test]
fn ebpf_measures_rtt_and_loss_of_a_lossy_link() {
    measures_rtt_and_loss_of_a_lossy_link("ebpf");
}

#[test]
fn tcp_info_sees_an_outage_and_refused_connects() {
    outage_is_down_within_seconds_and_a_refused_connect_is_a_reset("tcp-info");
}

#[test]
fn ebpf_sees_an_outage_and_refused_connects() {
    outage_is_down_within_seconds_and_a_refused_connect_is_a_reset("ebpf");
}

/// Without CAP_BPF the monitor says so once, uses TCP_INFO, and the agent relays on.
#[test]
fn unprivileged_the_monitor_falls_back_to_tcp_info() {
    let broker = Mosquitto::start();
    let mut sub = Subscriber::start(broker.port, "up/#");
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let cfg = agent_config(
        &dir.path().join("data"),
        &broker.url(),
        &format!("[link]\nprobe = \"auto\"\n\n[[socket]]\nkind = \"tcp\"\nlisten = \"127.0.0.1:{port}\"\nframing = \"lines\"\ntopic = \"t\"\n"),
    );
    let agent = Agent::start_wrapped(
        &[
            "setpriv",
            "--bounding-set=-all",
            "--inh-caps=-all",
            "--ambient-caps=-all",
        ],
        dir.path(),
        &cfg,
    );
    agent.wait_for_log("link monitor", SOON);
    let mut conn = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    conn.write_all(b"still relaying\n").expect("write");
    sub.wait_for("the message upstream", SOON, |got| {
        got.iter().any(|r| r.payload == b"still relaying")
    });
    agent.wait_for_logs("a quality line from TCP_INFO", SOON, |lines| {
        lines
            .iter()
            .any(|l| l.contains("link quality") && l.contains("source=\"tcp-info\""))
    });
    let logs = agent.log_lines();
    let why: Vec<&String> = logs
        .iter()
        .filter(|l| l.contains("eBPF probe cannot be used"))
        .collect();
    assert_eq!(why.len(), 1, "one clear line: {why:?}");
    assert!(
        why[0].contains("CAP_BPF") && why[0].contains("reason="),
        "{}",
        why[0]
    );
}

fn outage_is_down_within_seconds_and_a_refused_connect_is_a_reset(probe: &str) {
    let lab = Lab::builder()
        .both(spec::parse("delay=20ms").expect("spec"))
        .start()
        .expect("lab");
    let mut broker = Mosquitto::start_in(lab.namespace(Side::Central), lab.addr(Side::Central));
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = Agent::start_in_netns(
        lab.namespace(Side::Gateway),
        dir.path(),
        &config(&dir.path().join("data"), &lab, probe, "passthrough"),
    );
    assert_source(&agent, probe);
    let stop = feed(&lab, 200);
    agent.wait_for_log("link up", SOON);

    lab.outage(true);
    let t0 = Instant::now();
    agent.wait_for_log("link down", SOON);
    let took = t0.elapsed();
    eprintln!("outage seen as down after {took:?}");
    assert!(took < Duration::from_secs(8), "down only after {took:?}");

    lab.outage(false);
    agent.wait_for_logs("link up again", Duration::from_secs(60), |lines| {
        lines.iter().filter(|l| l.contains("link up")).count() >= 2
    });

    // The broker goes away: reconnects are refused (RST), each a reset.
    broker.stop();
    agent.wait_for_logs("a refused connection counted", SOON, |lines| {
        lines.iter().any(|l| {
            l.contains("link quality")
                && field(l, "source").as_deref() == Some(probe)
                && field(l, "resets").is_some_and(|r| r != "0")
        })
    });
    stop.store(true, Ordering::Relaxed);
}
