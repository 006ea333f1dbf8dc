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

#[test]
fn tcp_info_measures_rtt_and_loss_of_a_lossy_link() {
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
        &config(&dir.path().join("data"), &lab, "tcp-info", "batch"),
    );
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
    assert_eq!(field(&last, "source").as_deref(), Some("tcp-info"));
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
fn an_outage_is_down_within_seconds_and_a_refused_connect_is_a_reset() {
    let lab = Lab::builder()
        .both(spec::parse("delay=20ms").expect("spec"))
        .start()
        .expect("lab");
    let mut broker = Mosquitto::start_in(lab.namespace(Side::Central), lab.addr(Side::Central));
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = Agent::start_in_netns(
        lab.namespace(Side::Gateway),
        dir.path(),
        &config(&dir.path().join("data"), &lab, "tcp-info", "passthrough"),
    );
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
        lines
            .iter()
            .any(|l| l.contains("link quality") && field(l, "resets").is_some_and(|r| r != "0"))
    });
    stop.store(true, Ordering::Relaxed);
}
