//! Latency under load on the link lab, end to end with a real mosquitto: while a
//! low-priority backlog saturates a 1 Mbit/s, 150 ms, 3 % loss link, high-priority
//! messages published meanwhile arrive quickly (target p99 ≤ 2 s; see the assertion).
//! A Mosquitto bridge on the same link queued ~3,400 messages in its socket and took
//! 20 s (median).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use edgerelay_tests::fleet::{self, Device, Fleet};
use edgerelay_tests::*;
use linklab::{spec, Lab, Side};

const FEED_PORT: u16 = 7401;
const MQTT_PORT: u16 = 7402;

#[test]
fn high_priority_overtakes_a_saturating_low_priority_backlog() {
    let lab = Lab::builder()
        .up(spec::parse("rate=1mbit,delay=150ms,loss=3%").expect("spec"))
        .down(spec::parse("delay=150ms,loss=3%").expect("spec"))
        .seed(7)
        .start()
        .expect("lab");
    let dir = tempfile::tempdir().expect("tempdir");
    let central = LabCentral::start(&lab);
    let mut sub = central.subscriber(&lab, "up/batch/#");
    let cfg = central.batch_config(
        &dir.path().join("data"),
        &format!(
            "{}\n[compression]\ndictionary = \"off\"\n\n\
             [[socket]]\nkind = \"tcp\"\nlisten = \"127.0.0.1:{FEED_PORT}\"\nframing = \"lines\"\ntopic = \"bulk\"\n\n\
             [[policy]]\ntopics = [\"alarms/#\"]\npriority = \"high\"\n\n\
             [[policy]]\ntopics = [\"bulk\"]\npriority = \"low\"\n",
            local_mqtt_section(MQTT_PORT, "[\"#\"]", "")
        ),
    );
    let agent = Agent::start_in_netns(lab.namespace(Side::Gateway), dir.path(), &cfg);
    let stop = fleet::bulk_feed(&lab, FEED_PORT);
    // Let the backlog build and the controller find the link.
    sub.wait_for("low-priority batches upstream", SOON, |r| {
        r.iter().any(|m| m.topic == "up/batch/low")
    });
    let warm = Instant::now();
    wait_until("15 s of adaptation", Duration::from_secs(30), || {
        (warm.elapsed() >= Duration::from_secs(15)).then_some(())
    });
    // 20 alarm devices, one message every 500 ms each, for 40 s.
    let devices = (0..20)
        .map(|i| Device {
            topic: format!("alarms/dev-{i:02}"),
            interval: Duration::from_millis(500),
        })
        .collect();
    sub.drain();
    let seen_before = sub.received.len();
    let c0 = lab.counters(Side::Central).expect("counters");
    let t0 = Instant::now();
    let alarms = lab
        .run_in(Side::Gateway, move || Fleet::start(MQTT_PORT, devices))
        .expect("in the lab");
    let tracing = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| trace_bottleneck(&lab, linklab::Dir::Up, 1e6, &tracing));
        wait_until("40 s of alarms under load", Duration::from_secs(60), || {
            (t0.elapsed() >= Duration::from_secs(40)).then_some(())
        });
        tracing.store(true, Ordering::Relaxed);
    });
    alarms.stop(Duration::from_secs(30));
    let published = alarms.published();
    let c1 = lab.counters(Side::Central).expect("counters");
    let secs = t0.elapsed().as_secs_f64();
    // Every alarm arrives; latency = arrival at the central subscriber − publish time.
    let latencies = |received: &[Received]| -> Vec<u64> {
        let mut out = Vec::new();
        for m in received.iter().filter(|m| m.topic == "up/batch/high") {
            let batch = edgerelay::wire::decode(&m.payload, &|_| None).expect("decodable batch");
            for r in &batch.records {
                let text = std::str::from_utf8(&r.payload).expect("utf-8");
                let (_, _, t) = fleet::parse(text).expect("fleet payload");
                out.push(m.at_ms.saturating_sub(t));
            }
        }
        out
    };
    sub.wait_for("every alarm upstream", Duration::from_secs(30), |r| {
        latencies(r).len() >= published
    });
    stop.store(true, Ordering::Relaxed);
    let mut lat = latencies(&sub.received);
    lat.sort_unstable();
    let p = |q: f64| lat[((lat.len() as f64 * q).ceil() as usize).clamp(1, lat.len()) - 1];
    let low_records: u64 = sub.received[seen_before..]
        .iter()
        .filter(|m| m.topic == "up/batch/low")
        .filter_map(|m| edgerelay::wire::peek_header(&m.payload).ok())
        .map(|(h, _)| u64::from(h.count))
        .sum();
    let busy = (c1.rx_bytes - c0.rx_bytes) as f64 / secs / 125_000.0;
    eprintln!(
        "{} alarms: latency p50 {} ms, p99 {} ms, max {} ms; meanwhile {low_records} low-priority records, link {:.0} % busy",
        lat.len(),
        p(0.5),
        p(0.99),
        p(1.0),
        busy * 100.0
    );
    if std::env::var_os("EDGERELAY_TEST_TRACE").is_some() {
        print_control_trace(&agent, 100);
    }
    assert_eq!(lat.len(), published, "every alarm arrives exactly once");
    assert!(
        busy >= 0.8,
        "the low-priority backlog must keep the link busy ({:.0} %)",
        busy * 100.0
    );
    // The acceptance: p99 ≤ 2 s. Measured 0.70–0.91 s (p50 0.23–0.28 s) with
    // high priority on a connection of its own; 1.4–1.9 s when it shared the backlog's
    // (head-of-line blocking behind its retransmissions).
    assert!(p(0.99) <= 2_000, "p99 alarm latency {} ms > 2 s", p(0.99));
}
