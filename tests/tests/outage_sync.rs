//! A 10-minute outage on the link lab, end to end with a real mosquitto and `unpack`:
//! 200 devices keep publishing at 1 msg/s each (20 of them alarms, high priority; 180
//! telemetry, low). The agent notices the dead link, keeps ingesting, and after
//! recovery sends every alarm before any telemetry of the outage, drains the backlog
//! at the adapted rate, and loses nothing.
//!
//! The drain is asserted at the target, ≥ 90 % of the link.
//!
//! `EDGERELAY_OUTAGE_SECS` shortens the outage for local runs; the test command runs
//! the full 600 s.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use edgerelay_tests::fleet::{self, Device, Fleet};
use edgerelay_tests::*;
use linklab::{spec, Lab, Side};

const MQTT_PORT: u16 = 7501;

#[test]
fn ten_minute_outage_then_high_priority_first_and_nothing_lost() {
    let outage = Duration::from_secs(
        std::env::var("EDGERELAY_OUTAGE_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(600),
    );
    let lab = Lab::builder()
        .up(spec::parse("rate=1mbit,delay=150ms,loss=3%").expect("spec"))
        .down(spec::parse("delay=150ms,loss=3%").expect("spec"))
        .seed(3)
        .start()
        .expect("lab");
    let dir = tempfile::tempdir().expect("tempdir");
    let central = LabCentral::start(&lab);
    let mut sub = central.subscriber(&lab, "up/batch/#");
    let unpack = central.unpack(&dir.path().join("unpack.state"));
    let cfg = central.batch_config(
        &dir.path().join("data"),
        &format!(
            "{}\n[compression]\ndictionary = \"off\"\n\n\
             [[policy]]\ntopics = [\"alarms/#\"]\npriority = \"high\"\ndrain = \"newest-first\"\n\n\
             [[policy]]\ntopics = [\"telemetry/#\"]\npriority = \"low\"\n",
            local_mqtt_section(MQTT_PORT, "[\"#\"]", "")
        ),
    );
    let agent = Agent::start_in_netns(lab.namespace(Side::Gateway), dir.path(), &cfg);
    let devices = (0..200)
        .map(|i| Device {
            topic: if i < 20 {
                format!("alarms/dev-{i:03}")
            } else {
                format!("telemetry/dev-{i:03}")
            },
            interval: Duration::from_secs(1),
        })
        .collect();
    let fleet = lab
        .run_in(Side::Gateway, move || Fleet::start(MQTT_PORT, devices))
        .expect("in the lab");
    sub.wait_for("data flowing before the outage", SOON, |r| {
        r.iter().any(|m| m.topic == "up/batch/low") && r.iter().any(|m| m.topic == "up/batch/high")
    });

    // The outage: the agent must notice fast, and go on accepting.
    let down_from = unix_ms();
    lab.outage(true);
    let t0 = Instant::now();
    agent.wait_for_log("link down", Duration::from_secs(15));
    eprintln!(
        "link down noticed after {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let acked_at_start = fleet.logs().iter().map(|l| l.acked).sum::<usize>();
    wait_until("the outage", outage + SOON, || {
        (t0.elapsed() >= outage).then_some(())
    });
    let acked_during = fleet.logs().iter().map(|l| l.acked).sum::<usize>() - acked_at_start;
    assert!(
        acked_during as f64 >= 0.95 * 200.0 * outage.as_secs_f64(),
        "ingest must go on during the outage: {acked_during} messages acknowledged"
    );
    sub.drain();
    let before_recovery = sub.received.len();
    let up_from = unix_ms();
    lab.outage(false);

    // The drain, measured over 10 s after the first 3 s (reconnection and ramp-up).
    sub.wait_for("telemetry after the outage", Duration::from_secs(30), |r| {
        r[before_recovery..]
            .iter()
            .any(|m| m.topic == "up/batch/low")
    });
    let ramp = Instant::now();
    wait_until("3 s of ramp-up", SOON, || {
        (ramp.elapsed() >= Duration::from_secs(3)).then_some(())
    });
    let records = |sub: &mut Subscriber| -> u64 {
        sub.drain();
        sub.received
            .iter()
            .filter_map(|m| edgerelay::wire::peek_header(&m.payload).ok())
            .map(|(h, _)| u64::from(h.count))
            .sum()
    };
    // Records published during the outage, received so far.
    let backlog_received = |sub: &Subscriber| -> usize {
        sub.received
            .iter()
            .filter_map(|m| edgerelay::wire::decode(&m.payload, &|_| None).ok())
            .flat_map(|b| b.records)
            .filter_map(|r| fleet::parse(std::str::from_utf8(&r.payload).ok()?))
            .filter(|&(_, _, t)| t >= down_from && t < up_from)
            .count()
    };
    let (r0, c0, w0) = (
        records(&mut sub),
        lab.counters(Side::Central).expect("counters"),
        Instant::now(),
    );
    let tracing = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| trace_bottleneck(&lab, linklab::Dir::Up, 1e6, &tracing));
        wait_until("10 s of drain", Duration::from_secs(20), || {
            (w0.elapsed() >= Duration::from_secs(10)).then_some(())
        });
        tracing.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let (r1, c1, secs) = (
        records(&mut sub),
        lab.counters(Side::Central).expect("counters"),
        w0.elapsed().as_secs_f64(),
    );
    let drained_in_window = backlog_received(&sub);
    let per_record = (c1.rx_bytes - c0.rx_bytes) as f64 / (r1 - r0).max(1) as f64;
    let capacity = 125_000.0 / per_record;
    let rate = (r1 - r0) as f64 / secs;
    if rate < 0.9 * capacity || std::env::var_os("EDGERELAY_TEST_TRACE").is_some() {
        print_control_trace(&agent, 80);
    }
    fleet.stop(Duration::from_secs(60));
    let logs = fleet.logs();
    let published: usize = logs.iter().map(|l| l.sent.len()).sum();

    // Everything arrives, exactly once after unpack's dedup.
    unpack.wait_for(
        "every message published upstream",
        Duration::from_secs(300),
        |lines| lines.len() >= published,
    );
    let lines = unpack.lines();
    let mut seen: HashMap<(usize, usize), usize> = HashMap::new();
    // (device, publish time, position in unpack's output)
    let mut arrivals = Vec::with_capacity(lines.len());
    for (pos, l) in lines.iter().enumerate() {
        let v: serde_json::Value = serde_json::from_str(l).expect("unpack JSON line");
        let (device, n, t) =
            fleet::parse(v["payload"].as_str().expect("payload")).expect("fleet payload");
        *seen.entry((device, n)).or_default() += 1;
        arrivals.push((device, t, pos));
    }
    for (device, log) in logs.iter().enumerate() {
        for n in 0..log.sent.len() {
            assert_eq!(
                seen.get(&(device, n)).copied().unwrap_or(0),
                1,
                "device {device} message {n}: must arrive exactly once"
            );
        }
    }
    assert_eq!(lines.len(), published, "nothing unexpected arrived");
    // Of what was published during the outage, every alarm arrives before any telemetry.
    let during = |&&(_, t, _): &&(usize, u64, usize)| t >= down_from && t < up_from;
    let last_alarm = arrivals
        .iter()
        .filter(during)
        .filter(|a| a.0 < 20)
        .map(|a| a.2)
        .max()
        .expect("alarms during the outage");
    let first_telemetry = arrivals
        .iter()
        .filter(during)
        .filter(|a| a.0 >= 20)
        .map(|a| a.2)
        .min()
        .expect("telemetry during the outage");
    let backlog = arrivals.iter().filter(during).count();
    eprintln!(
        "{published} published, {backlog} during the {}-s outage; drain {rate:.0} records/s = {:.0} % of the link's {capacity:.0} records/s ({per_record:.1} link bytes/record)",
        outage.as_secs(),
        rate / capacity * 100.0
    );
    assert!(
        last_alarm < first_telemetry,
        "alarms of the outage must all arrive before its telemetry (last alarm at line {last_alarm}, first telemetry at {first_telemetry})"
    );
    assert!(
        drained_in_window < backlog,
        "the measuring window must lie within the drain ({drained_in_window} of {backlog} backlog records had arrived at its end)"
    );
    // The acceptance: 90 %. Measured 95 % after a 300-s outage on 2026-12-07
    // (the window resumes at the known bandwidth; before it, 66–94 %).
    assert!(
        rate >= 0.9 * capacity,
        "backlog drained at {rate:.0}/s < 90 % of {capacity:.0}/s"
    );
}
