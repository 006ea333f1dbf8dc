//! Link-adaptive upload on the link lab, end to end with a real mosquitto: on a slow,
//! lossy, long link the agent fills the link with compressed batches without keeping
//! its queue full. Priorities, degradation and outages have their own files
//! (priority_latency.rs, degradation.rs, outage_sync.rs).

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgerelay_tests::*;
use linklab::{spec, Dir, Lab, Side};

const FEED_PORT: u16 = 7200;

/// The lab tests here measure goodput: one at a time, not competing for the CPU.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn start(lab: &Lab, dir: &std::path::Path) -> (LabCentral, Subscriber, Agent) {
    let central = LabCentral::start(lab);
    let sub = central.subscriber(lab, "up/batch/#");
    let cfg = central.batch_config(
        &dir.join("data"),
        &format!("[compression]\ndictionary = \"off\"\n\n[[socket]]\nkind = \"tcp\"\nlisten = \"127.0.0.1:{FEED_PORT}\"\nframing = \"lines\"\ntopic = \"telemetry\"\n"),
    );
    let agent = Agent::start_in_netns(lab.namespace(Side::Gateway), dir, &cfg);
    (central, sub, agent)
}

/// Telemetry from 200 devices, faster than the link can carry, until stopped.
fn feed(lab: &Lab) -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = stop.clone();
    let mut conn = lab
        .run_in(Side::Gateway, || {
            TcpStream::connect(("127.0.0.1", FEED_PORT))
        })
        .expect("in the lab")
        .expect("connect to the agent");
    std::thread::spawn(move || {
        let mut i: u64 = 0;
        while !stopping.load(Ordering::Relaxed) {
            let mut chunk = String::new();
            for _ in 0..100 {
                // A random-looking token per message keeps batches from compressing
                // to nothing, so the link, not the feeder, is the bottleneck.
                let token = i.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(17);
                chunk.push_str(&format!(
                    "{{\"device\":\"dev-{:04}\",\"seq\":{i},\"id\":\"{token:016x}\",\"temp_c\":{:.2},\"humidity\":{:.1},\"battery_v\":{:.3},\"status\":\"ok\"}}\n",
                    i % 200,
                    20.0 + (i % 97) as f64 * 0.05,
                    40.0 + (i % 53) as f64 * 0.3,
                    3.3 + (i % 11) as f64 * 0.05
                ));
                i += 1;
            }
            if conn.write_all(chunk.as_bytes()).is_err() {
                break;
            }
            // ~20,000 msg/s offered: far more than 1 Mbit/s carries compressed.
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    stop
}

/// Records and batch payload bytes received so far.
fn tally(sub: &mut Subscriber) -> (u64, u64) {
    sub.drain();
    let mut records = 0;
    let mut bytes = 0;
    for r in &sub.received {
        if let Ok((h, _)) = edgerelay::wire::peek_header(&r.payload) {
            records += u64::from(h.count);
            bytes += r.payload.len() as u64;
        }
    }
    (records, bytes)
}

/// Goodput over `window` as (records/s, payload bytes per record).
fn goodput(sub: &mut Subscriber, window: Duration) -> (f64, f64) {
    let (r0, b0) = tally(sub);
    let t0 = Instant::now();
    wait_until("the measuring window", window + SOON, || {
        (t0.elapsed() >= window).then_some(())
    });
    let (r1, b1) = tally(sub);
    let secs = t0.elapsed().as_secs_f64();
    let records = (r1 - r0) as f64;
    (records / secs, (b1 - b0) as f64 / records.max(1.0))
}

#[test]
fn fills_a_slow_lossy_link_without_keeping_its_queue_full() {
    let _serial = serial();
    let lab = Lab::builder()
        .up(spec::parse("rate=1mbit,delay=150ms,loss=3%").expect("spec"))
        .down(spec::parse("delay=150ms,loss=3%").expect("spec"))
        .seed(5)
        .start()
        .expect("lab");
    let dir = tempfile::tempdir().expect("tempdir");
    let (_broker, mut sub, agent) = start(&lab, dir.path());
    let stop = feed(&lab);
    // Let the controller find the link.
    wait_until("records upstream", SOON, || {
        (tally(&mut sub).0 > 0).then_some(())
    });
    let settle = Instant::now();
    wait_until("20 s of adaptation", Duration::from_secs(60), || {
        (settle.elapsed() >= Duration::from_secs(20)).then_some(())
    });
    // "Compressed bytes per message" as the link carries them: the central side's
    // interface bytes (batches with their MQTT, TCP/IP and Ethernet headers, and the
    // retransmissions 3 % loss costs) per record delivered. Goodput at 90 % of link
    // rate ÷ that is the link kept 90 % busy with useful work.
    let c0 = lab.counters(Side::Central).expect("counters");
    let s0 = lab.stats(Dir::Up);
    let tracing = AtomicBool::new(false);
    let (rate, per_record) = std::thread::scope(|scope| {
        scope.spawn(|| trace_bottleneck(&lab, Dir::Up, 1e6, &tracing));
        let g = goodput(&mut sub, Duration::from_secs(20));
        tracing.store(true, Ordering::Relaxed);
        g
    });
    let c1 = lab.counters(Side::Central).expect("counters");
    let s1 = lab.stats(Dir::Up);
    stop.store(true, Ordering::Relaxed);
    if std::env::var_os("EDGERELAY_TEST_TRACE").is_some() {
        print_control_trace(&agent, usize::MAX);
    }
    let link_per_record = (c1.rx_bytes - c0.rx_bytes) as f64 / (rate * 20.0).max(1.0);
    let capacity = 125_000.0 / link_per_record;
    let quality = agent
        .log_lines()
        .into_iter()
        .rfind(|l| l.contains("link quality"))
        .unwrap_or_default();
    let queue = s1.mean_queue_wait_since(&s0);
    eprintln!(
        "goodput {rate:.0} records/s, {per_record:.1} B/record in batches, {link_per_record:.1} B/record on the link: {:.0} % of the link's {capacity:.0} records/s; mean bottleneck queue {} ms; {quality}",
        rate / capacity * 100.0,
        queue.as_millis()
    );
    // The acceptance: 90 %. Measured 93–98 % over 11 runs on 2026-12-07 (the
    // rest is BBR's ProbeRTT, ~0.45 s in 10 s, and loss recoveries).
    assert!(
        rate >= 0.9 * capacity,
        "goodput {rate:.0}/s < 90 % of {capacity:.0}/s"
    );
    // RTT inflation bounded: the controller does not keep the bottleneck queue full.
    // The lab's queue holds 64 KiB = 0.5 s at 1 Mbit/s; what a frame waited in it is
    // the RTT inflation, measured where it happens. The window aims for 66 ms here;
    // measured 21–111 ms.
    assert!(
        queue < Duration::from_millis(150),
        "frames waited {} ms on average at the bottleneck: the queue is kept full",
        queue.as_millis()
    );
    let srtt = srtt_of(&quality).expect("srtt in the quality line");
    assert!(srtt > 0.0, "the agent measured its RTT");
    // Once adapted, the bottleneck's queue does not overflow: the window holds at most
    // its target queue there (no tail drop in any run on 2026-12-07). 1 % allows for a
    // startup that ends inside the window; a controller that keeps the buffer full
    // drops its whole excess, tens of percent.
    let dropped = s1.queue_dropped - s0.queue_dropped;
    let frames = s1.frames_in - s0.frames_in;
    assert!(
        dropped * 100 < frames,
        "{dropped} of {frames} frames tail-dropped"
    );
}

/// The smoothed RTT (ms) a link quality line reports.
fn srtt_of(line: &str) -> Option<f64> {
    line.split(" srtt_ms=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Smoothed RTT (ms) in the agent's latest link quality line.
fn srtt_ms(agent: &Agent) -> f64 {
    agent
        .log_lines()
        .into_iter()
        .rfind(|l| l.contains("link quality"))
        .and_then(|l| srtt_of(&l))
        .unwrap_or(f64::NAN)
}

/// Goodput as a share of what the link carries: records/s over `window` ÷ (link rate
/// ÷ link bytes per record), like the 1 Mbit/s test.
/// Also the mean time frames waited in the bottleneck's queue meanwhile.
fn utilisation(lab: &Lab, sub: &mut Subscriber, window: Duration, bits: f64) -> (f64, Duration) {
    let c0 = lab.counters(Side::Central).expect("counters");
    let s0 = lab.stats(Dir::Up);
    let (rate, _) = goodput(sub, window);
    let c1 = lab.counters(Side::Central).expect("counters");
    let queue = lab.stats(Dir::Up).mean_queue_wait_since(&s0);
    let per_record = (c1.rx_bytes - c0.rx_bytes) as f64 / (rate * window.as_secs_f64()).max(1.0);
    (rate / (bits / 8.0 / per_record), queue)
}

/// Issue 7 (b): rate steps 2 Mbit/s → 256 kbit/s → 2 Mbit/s, adapted within 10 s each
/// way: the 5 s after the first 10 use the new link, without a standing queue.
#[test]
fn follows_rate_steps_within_ten_seconds_each_way() {
    let _serial = serial();
    let at = |rate: &str| spec::parse(&format!("rate={rate},delay=50ms")).expect("spec");
    let lab = Lab::builder()
        .up(at("2mbit"))
        .down(spec::parse("delay=50ms").expect("spec"))
        .seed(9)
        .start()
        .expect("lab");
    let dir = tempfile::tempdir().expect("tempdir");
    let (_broker, mut sub, agent) = start(&lab, dir.path());
    let stop = feed(&lab);
    wait_until("records upstream", SOON, || {
        (tally(&mut sub).0 > 0).then_some(())
    });
    let settle = Instant::now();
    wait_until("15 s at 2 Mbit/s", Duration::from_secs(30), || {
        (settle.elapsed() >= Duration::from_secs(15)).then_some(())
    });
    let mut report = Vec::new();
    for (rate, bits) in [("256kbit", 256e3), ("2mbit", 2e6)] {
        lab.set(Dir::Up, at(rate));
        let step = Instant::now();
        wait_until("10 s after the step", Duration::from_secs(20), || {
            (step.elapsed() >= Duration::from_secs(10)).then_some(())
        });
        let (used, queue) = utilisation(&lab, &mut sub, Duration::from_secs(5), bits);
        let srtt = srtt_ms(&agent);
        eprintln!(
            "after the step to {rate}: {:.0} % of the link, mean bottleneck queue {} ms, srtt {srtt:.0} ms",
            used * 100.0,
            queue.as_millis()
        );
        report.push((rate, used, queue));
    }
    stop.store(true, Ordering::Relaxed);
    if std::env::var_os("EDGERELAY_TEST_TRACE").is_some() {
        print_control_trace(&agent, usize::MAX);
    }
    // Adapted: ≥ 90 % of the new link carries records in the 5 s after the first 10
    // (measured 99–101 % down, 95 % up, 6 runs on 2026-12-07), and frames no longer
    // wait in a standing queue: the lab's buffer holds 2 s at 256 kbit/s (64 KiB, what
    // data in flight at 2 Mbit/s fills at the step) and 260 ms at 2 Mbit/s.
    for ((rate, used, queue), max_queue) in report.into_iter().zip([400, 100]) {
        assert!(
            used >= 0.9,
            "{rate}: only {:.0} % of the link used 10 s after the step",
            used * 100.0
        );
        assert!(
            queue < Duration::from_millis(max_queue),
            "{rate}: frames waited {} ms at the bottleneck 10 s after the step: a standing queue",
            queue.as_millis()
        );
    }
}
