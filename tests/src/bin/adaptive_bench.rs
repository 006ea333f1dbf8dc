//! Benchmark: link-adaptive batches vs fixed batches vs passthrough, on the same link
//! lab conditions (1 Mbit/s, 150 ms, 3 % loss each way), measured in one run.
//!
//! Each mode gets a fresh lab (same seed), a real mosquitto on the central side and the
//! agent on the gateway side, fed by a low-priority bulk feed far faster than the link
//! (so goodput is what the link carries) and 20 high-priority alarm devices at 2 msg/s
//! each (publish→delivery latency of those). Prints a Markdown table and writes an SVG
//! plot. Needs root (network namespaces).
//!
//! `sudo cargo run --release -p edgerelay-tests --bin adaptive_bench -- [SVG_PATH]`

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use edgerelay_tests::fleet::{self, Device, Fleet};
use edgerelay_tests::*;
use linklab::{spec, Lab, Side};

const FEED_PORT: u16 = 7601;
const MQTT_PORT: u16 = 7602;
const WARM_UP: Duration = Duration::from_secs(15);
const MEASURE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy)]
enum Mode {
    Adaptive,
    Fixed,
    Passthrough,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Adaptive => "adaptive (batch, [rate] adapt = true)",
            Mode::Fixed => "fixed (batch 1000, level 3, adapt = false)",
            Mode::Passthrough => "passthrough (one publish per message)",
        }
    }
    fn short(self) -> &'static str {
        match self {
            Mode::Adaptive => "adaptive",
            Mode::Fixed => "fixed",
            Mode::Passthrough => "passthrough",
        }
    }
    fn extra(self) -> &'static str {
        match self {
            Mode::Adaptive => "[rate]\nadapt = true\n",
            Mode::Fixed => "[rate]\nadapt = false\n",
            Mode::Passthrough => "",
        }
    }
}

#[derive(Debug)]
struct Outcome {
    goodput: f64,
    link_bytes_per_record: f64,
    alarms: usize,
    p50: u64,
    p99: u64,
}

/// (bulk records, alarm latencies in ms) in what arrived.
fn tally(received: &[Received]) -> (u64, Vec<u64>) {
    let mut bulk = 0;
    let mut lat = Vec::new();
    for m in received {
        if m.topic.starts_with("up/batch/") {
            let Ok(batch) = edgerelay::wire::decode(&m.payload, &|_| None) else {
                continue;
            };
            for r in &batch.records {
                if r.topic.starts_with("alarms/") {
                    if let Some((_, _, t)) =
                        std::str::from_utf8(&r.payload).ok().and_then(fleet::parse)
                    {
                        lat.push(m.at_ms.saturating_sub(t));
                    }
                } else {
                    bulk += 1;
                }
            }
        } else if m.topic.starts_with("up/alarms/") {
            if let Some((_, _, t)) = std::str::from_utf8(&m.payload).ok().and_then(fleet::parse) {
                lat.push(m.at_ms.saturating_sub(t));
            }
        } else if m.topic == "up/bulk" {
            bulk += 1;
        }
    }
    (bulk, lat)
}

fn run(mode: Mode) -> Outcome {
    let lab = Lab::builder()
        .up(spec::parse("rate=1mbit,delay=150ms,loss=3%").expect("spec"))
        .down(spec::parse("delay=150ms,loss=3%").expect("spec"))
        .seed(17)
        .start()
        .expect("lab (needs root)");
    let dir = tempfile::tempdir().expect("tempdir");
    let central = LabCentral::start(&lab);
    let mut sub = central.subscriber(&lab, "up/#");
    let mut cfg = agent_config(
        &dir.path().join("data"),
        &central.url,
        &format!(
            "{}\n[compression]\ndictionary = \"off\"\n{}\n\
             [[socket]]\nkind = \"tcp\"\nlisten = \"127.0.0.1:{FEED_PORT}\"\nframing = \"lines\"\ntopic = \"bulk\"\n\n\
             [[policy]]\ntopics = [\"alarms/#\"]\npriority = \"high\"\n\n\
             [[policy]]\ntopics = [\"bulk\"]\npriority = \"low\"\n",
            local_mqtt_section(MQTT_PORT, "[\"#\"]", ""),
            mode.extra()
        ),
    );
    if !matches!(mode, Mode::Passthrough) {
        cfg = cfg.replace("mode = \"passthrough\"\n", "mode = \"batch\"\n");
    }
    if matches!(mode, Mode::Fixed) {
        cfg = cfg.replace(
            "dictionary = \"off\"\n",
            "dictionary = \"off\"\nlevel = 3\n",
        );
    }
    let _agent = Agent::start_in_netns(lab.namespace(Side::Gateway), dir.path(), &cfg);
    let stop = fleet::bulk_feed(&lab, FEED_PORT);
    let devices = (0..20)
        .map(|i| Device {
            topic: format!("alarms/dev-{i:02}"),
            interval: Duration::from_millis(500),
        })
        .collect();
    let t = Instant::now();
    wait_until("the warm-up", WARM_UP + SOON, || {
        (t.elapsed() >= WARM_UP).then_some(())
    });
    sub.drain();
    let from = sub.received.len();
    let c0 = lab.counters(Side::Central).expect("counters");
    let alarms = lab
        .run_in(Side::Gateway, move || Fleet::start(MQTT_PORT, devices))
        .expect("in the lab");
    let t0 = Instant::now();
    wait_until("the measurement", MEASURE + SOON, || {
        (t0.elapsed() >= MEASURE).then_some(())
    });
    sub.drain();
    let c1 = lab.counters(Side::Central).expect("counters");
    let secs = t0.elapsed().as_secs_f64();
    let (bulk, _) = tally(&sub.received[from..]);
    // Alarms published in the window: wait (bounded) for the late ones, so slow modes
    // show their real latency rather than leaving it out.
    alarms.stop(Duration::from_secs(60));
    let published = alarms.published();
    let deadline = Instant::now() + Duration::from_secs(120);
    while tally(&sub.received[from..]).1.len() < published && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        sub.drain();
    }
    stop.store(true, Ordering::Relaxed);
    let (_, mut lat) = tally(&sub.received[from..]);
    lat.sort_unstable();
    let q = |f: f64| {
        if lat.is_empty() {
            0
        } else {
            lat[((lat.len() as f64 * f).ceil() as usize).clamp(1, lat.len()) - 1]
        }
    };
    let records = bulk + lat.len() as u64;
    Outcome {
        goodput: bulk as f64 / secs,
        link_bytes_per_record: (c1.rx_bytes - c0.rx_bytes) as f64 / records.max(1) as f64,
        alarms: lat.len(),
        p50: q(0.5),
        p99: q(0.99),
    }
}

/// Two horizontal bar charts (goodput, alarm p99) as a self-contained SVG.
fn svg(results: &[(Mode, Outcome)]) -> String {
    let mut s = String::new();
    let (w, row, top) = (760.0, 34.0, 40.0);
    let h = top * 2.0 + row * results.len() as f64 * 2.0 + 60.0;
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="13">"#
    );
    type Chart = (&'static str, Box<dyn Fn(&Outcome) -> f64>, &'static str);
    let charts: [Chart; 2] = [
        (
            "Goodput, messages/s (1 Mbit/s, 150 ms, 3 % loss)",
            Box::new(|o: &Outcome| o.goodput),
            "msg/s",
        ),
        (
            "High-priority publish→delivery latency p99, ms",
            Box::new(|o: &Outcome| o.p99 as f64),
            "ms",
        ),
    ];
    let mut y = 20.0;
    for (title, value, unit) in &charts {
        let _ = writeln!(
            s,
            r#"<text x="10" y="{y}" font-weight="bold">{title}</text>"#
        );
        y += 12.0;
        let max = results.iter().map(|(_, o)| value(o)).fold(1.0, f64::max);
        for (mode, o) in results {
            let v = value(o);
            let len = (v / max * 480.0).max(1.0);
            let _ = writeln!(
                s,
                r##"<text x="10" y="{}">{}</text><rect x="110" y="{}" width="{len:.1}" height="22" fill="#4a7ab5"/><text x="{:.1}" y="{}">{v:.0} {unit}</text>"##,
                y + 16.0,
                mode.short(),
                y + 2.0,
                115.0 + len,
                y + 16.0
            );
            y += row;
        }
        y += 30.0;
    }
    s.push_str("</svg>\n");
    s
}

fn main() {
    let out = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "docs/adaptive-bench.svg".into());
    let mut results = Vec::new();
    for mode in [Mode::Adaptive, Mode::Fixed, Mode::Passthrough] {
        eprintln!("running {} ...", mode.name());
        let o = run(mode);
        eprintln!("  {o:?}");
        results.push((mode, o));
    }
    let base = results
        .iter()
        .find(|(m, _)| matches!(m, Mode::Passthrough))
        .map_or(1.0, |(_, o)| o.goodput.max(1e-9));
    println!("| mode | goodput msg/s | × passthrough | link bytes/msg | alarms | alarm latency p50 / p99 ms |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (mode, o) in &results {
        println!(
            "| {} | {:.0} | {:.1}× | {:.1} | {} | {} / {} |",
            mode.name(),
            o.goodput,
            o.goodput / base,
            o.link_bytes_per_record,
            o.alarms,
            o.p50,
            o.p99
        );
    }
    match std::fs::write(&out, svg(&results)) {
        Ok(()) => eprintln!("plot written to {out}"),
        Err(e) => eprintln!("cannot write {out}: {e}"),
    }
}
