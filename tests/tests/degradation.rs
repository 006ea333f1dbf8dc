//! Degradation on the link lab, end to end with a real mosquitto and `unpack`: a fleet
//! publishes far more than a 128 kbit/s link carries; the agent samples one stream and
//! conflates another, and the gap notices it sends upstream account exactly for every
//! message that did not arrive.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use edgerelay_tests::fleet::{Device, Fleet};
use edgerelay_tests::*;
use linklab::{spec, Lab, Side};

const MQTT_PORT: u16 = 7301;

#[test]
fn gap_notices_match_exactly_what_sampling_and_conflation_dropped() {
    let lab = Lab::builder()
        .up(spec::parse("rate=128kbit,delay=50ms").expect("spec"))
        .down(spec::parse("delay=50ms").expect("spec"))
        .seed(11)
        .start()
        .expect("lab");
    let dir = tempfile::tempdir().expect("tempdir");
    let central = LabCentral::start(&lab);
    let mut gaps = central.subscriber(&lab, "up/gap");
    let unpack = central.unpack(&dir.path().join("unpack.state"));
    let cfg = central.batch_config(
        &dir.path().join("data"),
        &format!(
            "{}\n[compression]\ndictionary = \"off\"\n\n\
             [[policy]]\ntopics = [\"sensors/#\"]\nstream = \"sampled\"\npriority = \"low\"\ndegrade = \"sample:2s\"\n\n\
             [[policy]]\ntopics = [\"status/#\"]\nstream = \"latest\"\npriority = \"low\"\ndegrade = \"latest\"\n",
            local_mqtt_section(MQTT_PORT, "[\"#\"]", "")
        ),
    );
    let agent = Agent::start_in_netns(lab.namespace(Side::Gateway), dir.path(), &cfg);

    // 1,000 msg/s of ~150-byte payloads: several times what 128 kbit/s carries even
    // compressed.
    let mut devices = Vec::new();
    for i in 0..100 {
        for class in ["sensors", "status"] {
            devices.push(Device {
                topic: format!("{class}/dev-{i:03}"),
                interval: Duration::from_millis(200),
            });
        }
    }
    let fleet = lab
        .run_in(Side::Gateway, move || Fleet::start(MQTT_PORT, devices))
        .expect("in the lab");
    agent.wait_for_log("degradation changed", Duration::from_secs(30));
    // Degraded for a while, then the fleet stops and the rest drains.
    let degraded_at = std::time::Instant::now();
    wait_until("30 s degraded", Duration::from_secs(40), || {
        (degraded_at.elapsed() >= Duration::from_secs(30)).then_some(())
    });
    fleet.stop(Duration::from_secs(30));
    let logs = fleet.logs();
    let published = |class: &str| -> u64 {
        logs.iter()
            .filter(|l| l.topic.starts_with(class))
            .map(|l| l.sent.len() as u64)
            .sum()
    };
    let expected: HashMap<&str, u64> = [
        ("sampled", published("sensors/")),
        ("latest", published("status/")),
    ]
    .into();

    // Delivered (unpack's JSON lines) and reported (gap notices), per stream.
    let delivered = |lines: &[String]| -> HashMap<String, BTreeSet<u64>> {
        let mut m: HashMap<String, BTreeSet<u64>> = HashMap::new();
        for l in lines {
            let v: serde_json::Value = serde_json::from_str(l).expect("unpack JSON line");
            let stream = v["stream"].as_str().expect("stream").to_owned();
            m.entry(stream)
                .or_default()
                .insert(v["seq"].as_u64().expect("seq"));
        }
        m
    };
    let notices = |sub: &mut Subscriber| -> Vec<serde_json::Value> {
        sub.drain();
        sub.received
            .iter()
            .map(|r| serde_json::from_slice(&r.payload).expect("gap notice JSON"))
            .collect()
    };
    let accounted = |stream: &str, d: &HashMap<String, BTreeSet<u64>>, g: &[serde_json::Value]| {
        let got = d.get(stream).map_or(0, |s| s.len() as u64);
        let dropped: u64 = g
            .iter()
            .filter(|n| n["stream"] == stream)
            .map(|n| n["count"].as_u64().unwrap_or(0))
            .sum();
        got + dropped
    };
    wait_until(
        "every message delivered or reported dropped",
        Duration::from_secs(120),
        || {
            let d = delivered(&unpack.lines());
            let g = notices(&mut gaps);
            expected
                .iter()
                .all(|(s, n)| accounted(s, &d, &g) >= *n)
                .then_some(())
        },
    );
    let d = delivered(&unpack.lines());
    let g = notices(&mut gaps);
    for (stream, reason) in [("sampled", "sampled"), ("latest", "conflated")] {
        let n = expected[stream];
        let got = &d[stream];
        let mine: Vec<&serde_json::Value> = g.iter().filter(|x| x["stream"] == stream).collect();
        let dropped: u64 = mine.iter().map(|x| x["count"].as_u64().unwrap_or(0)).sum();
        eprintln!(
            "{stream}: {n} published, {} delivered, {dropped} reported {reason} in {} notices",
            got.len(),
            mine.len()
        );
        assert!(dropped > 0, "{stream}: degradation dropped nothing");
        assert_eq!(
            got.len() as u64 + dropped,
            n,
            "{stream}: delivered + reported dropped must be exactly what was published"
        );
        assert!(
            got.iter().all(|s| *s < n),
            "{stream}: unknown seqs delivered"
        );
        for x in &mine {
            assert_eq!(x["reason"], reason, "{stream}: {x}");
            let (first, last) = (
                x["first"].as_u64().expect("first"),
                x["last"].as_u64().expect("last"),
            );
            let missing = (first..=last).filter(|s| !got.contains(s)).count() as u64;
            assert_eq!(
                missing,
                x["count"].as_u64().expect("count"),
                "{stream}: notice {x} must count exactly the messages of its range that did not arrive"
            );
        }
        // And every message that did not arrive is inside a notice.
        for seq in (0..n).filter(|s| !got.contains(s)) {
            assert!(
                mine.iter()
                    .any(|x| x["first"].as_u64() <= Some(seq) && Some(seq) <= x["last"].as_u64()),
                "{stream}: seq {seq} neither delivered nor reported"
            );
        }
    }
    drop(central);
}
