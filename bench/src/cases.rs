//! One case = one system × one workload × one link condition, on a fresh link lab.
//!
//! Why each case gets its own lab, brokers and data directories: nothing one system
//! leaves behind (a queue, a session, a trained dictionary) may help or hurt the next.
//!
//! Steady cases: warm up, then measure a window; the figures count only what was
//! generated and delivered in it (goodput, interface bytes per delivered message, CPU
//! per generated message). Latency is over every message generated in the window,
//! waiting a grace period for late ones: a message still missing then counts as later
//! than the grace period, so a system that falls behind shows it instead of reporting
//! only the lucky messages.
//!
//! The outage case: the link goes down for `outage`, the edge is SIGKILLed half-way and
//! restarted, the link comes back, and every message the edge acknowledged is looked
//! for at the central broker.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use edgerelay_tests::{unix_ms, LabCentral};
use linklab::{spec, Lab, Side};

use crate::collector::{Arrival, Collector};
use crate::edge::{Edge, System, EDGE_PORT};
use crate::loadgen::{LoadGen, Track, LOADGEN_THREAD};
use crate::workload::Kind;

/// A link condition and the load offered on it.
#[derive(Debug, Clone)]
pub struct Link {
    pub name: &'static str,
    /// Link lab spec, applied both ways.
    pub spec: &'static str,
    /// Messages per second offered by the devices.
    pub rate: f64,
    /// Some: the outage case, with this outage.
    pub outage: Option<Duration>,
}

/// How long the phases last.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub warm_up: Duration,
    pub window: Duration,
    pub grace: Duration,
    /// Outage case: the link's state before and after the outage.
    pub around_outage: Duration,
    /// Outage case: longest wait for the backlog after the link returns.
    pub drain_limit: Duration,
}

/// What one case measured.
#[derive(Debug, Clone)]
pub struct Figures {
    pub system: System,
    pub kind: Kind,
    pub link: String,
    pub offered: f64,
    /// First deliveries per second (steady: in the window; outage: backlog drain rate).
    pub goodput: f64,
    pub up_bytes_per_msg: f64,
    pub down_bytes_per_msg: f64,
    /// Latency percentiles in ms; None: later than the grace period (not delivered).
    pub p50_ms: Option<u64>,
    pub p99_ms: Option<u64>,
    pub cpu_per_100k: f64,
    pub peak_rss_mib: f64,
    /// The load generator's CPU in the window, in cores (steady cases; 0 otherwise).
    pub loadgen_cores: f64,
    pub outage: Option<OutageFigures>,
}

#[derive(Debug, Clone, Copy)]
pub struct OutageFigures {
    pub acked: u64,
    pub lost: u64,
    pub duplicated: u64,
    /// From the link's return until the last message of the backlog arrived.
    pub drain_s: f64,
}

/// Phases are timed by the benchmark's clock: the systems' readiness was awaited by
/// `Edge::start` and `Collector::start` (log line, SUBACK) before any phase begins.
fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

struct Rig {
    lab: Lab,
    _central: LabCentral,
    collector: Collector,
    edge: Edge,
}

impl Rig {
    fn start(system: System, link: &Link) -> Self {
        let cond = spec::parse(link.spec).expect("link spec");
        let lab = Lab::builder()
            .both(cond)
            .seed(17)
            .start()
            .unwrap_or_else(|e| panic!("link lab: {e}"));
        let central = LabCentral::start(&lab);
        let host = lab.addr(Side::Central).to_string();
        let filter = system.delivery_filter();
        let collector = lab
            .run_in(Side::Central, move || Collector::start(&host, filter))
            .expect("collector in the central namespace");
        let edge = Edge::start(system, &lab, &central);
        Self {
            lab,
            _central: central,
            collector,
            edge,
        }
    }

    fn loadgen(&self, kind: Kind, rate: f64) -> LoadGen {
        self.lab
            .run_in(Side::Gateway, move || {
                LoadGen::start(kind, 42, EDGE_PORT, rate)
            })
            .expect("load generator in the gateway namespace")
    }

    fn link_bytes(&self) -> (u64, u64) {
        let c = self
            .lab
            .counters(Side::Gateway)
            .expect("interface counters");
        (c.tx_bytes, c.rx_bytes)
    }
}

/// First arrival time of every (source, seq), and how many arrivals were repeats.
fn first_arrivals(arrivals: &[Arrival]) -> (HashMap<(usize, u64), u64>, u64) {
    let mut first = HashMap::with_capacity(arrivals.len());
    let mut dups = 0;
    for a in arrivals {
        match first.entry((a.source, a.seq)) {
            std::collections::hash_map::Entry::Occupied(_) => dups += 1,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(a.at_ms);
            }
        }
    }
    (first, dups)
}

/// Latencies of the messages generated in [from_ms, to_ms): Some(ms) if delivered.
fn latencies(
    tracks: &[Track],
    first: &HashMap<(usize, u64), u64>,
    from_ms: u64,
    to_ms: u64,
) -> Vec<Option<u64>> {
    let mut v = Vec::new();
    for (source, t) in tracks.iter().enumerate() {
        for (seq, &sent) in t.sent_at.iter().enumerate() {
            if (from_ms..to_ms).contains(&sent) {
                v.push(
                    first
                        .get(&(source, seq as u64))
                        .map(|&at| at.saturating_sub(sent)),
                );
            }
        }
    }
    v
}

/// The `q` quantile, undelivered messages sorting last (None).
pub fn quantile(lat: &[Option<u64>], q: f64) -> Option<u64> {
    if lat.is_empty() {
        return None;
    }
    let mut v: Vec<u64> = lat.iter().map(|l| l.unwrap_or(u64::MAX)).collect();
    v.sort_unstable();
    let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
    (v[i] != u64::MAX).then_some(v[i])
}

/// A steady case: warm-up, measured window, grace for the window's late messages.
pub fn steady(system: System, kind: Kind, link: &Link, t: Timing) -> Figures {
    let rig = Rig::start(system, link);
    let gen = rig.loadgen(kind, link.rate);
    let start = Instant::now();
    sleep_until(start + t.warm_up);
    let (cpu0, bytes0, gen0, from_ms) = (
        rig.edge.cpu_seconds(),
        rig.link_bytes(),
        gen.totals().generated,
        unix_ms(),
    );
    let gen_cpu0 = crate::edge::own_threads_cpu_seconds(LOADGEN_THREAD);
    sleep_until(start + t.warm_up + t.window);
    let (cpu1, bytes1, gen1, to_ms) = (
        rig.edge.cpu_seconds(),
        rig.link_bytes(),
        gen.totals().generated,
        unix_ms(),
    );
    let gen_cpu = crate::edge::own_threads_cpu_seconds(LOADGEN_THREAD) - gen_cpu0;
    let arrivals = rig.collector.arrivals();
    let (first_all, _) = first_arrivals(&arrivals);
    // Goodput and bytes: messages whose first arrival fell in the window.
    let delivered = first_all
        .values()
        .filter(|&&at| (from_ms..to_ms).contains(&at))
        .count();
    // Latency: wait (bounded) for what the window generated.
    gen.stop_generating();
    let deadline = Instant::now() + t.grace;
    let window_msgs = (gen1 - gen0) as usize;
    loop {
        let (first, _) = first_arrivals(&rig.collector.arrivals());
        let lat = latencies(&gen.tracks(), &first, from_ms, to_ms);
        let done = lat.iter().filter(|l| l.is_some()).count() >= window_msgs.min(lat.len());
        if done || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let (first, _) = first_arrivals(&rig.collector.arrivals());
    let lat = latencies(&gen.tracks(), &first, from_ms, to_ms);
    let secs = (to_ms - from_ms) as f64 / 1000.0;
    let per = |b: u64| b as f64 / (delivered.max(1)) as f64;
    Figures {
        system,
        kind,
        link: link.name.to_owned(),
        offered: link.rate,
        goodput: delivered as f64 / secs,
        up_bytes_per_msg: per(bytes1.0 - bytes0.0),
        down_bytes_per_msg: per(bytes1.1 - bytes0.1),
        p50_ms: quantile(&lat, 0.5),
        p99_ms: quantile(&lat, 0.99),
        cpu_per_100k: (cpu1 - cpu0) * 100_000.0 / window_msgs.max(1) as f64,
        peak_rss_mib: rig.edge.peak_rss_kib() as f64 / 1024.0,
        // Both systems' cases may run at once: each generator's thread is named
        // alike, so this is the sum of those running (an upper bound for one).
        loadgen_cores: gen_cpu / secs,
        outage: None,
    }
}

/// The outage case: link down for `outage`, the edge SIGKILLed and restarted half-way.
pub fn outage(system: System, kind: Kind, link: &Link, t: Timing) -> Figures {
    let outage = link.outage.expect("an outage case");
    let mut rig = Rig::start(system, link);
    let gen = rig.loadgen(kind, link.rate);
    let start = Instant::now();
    let (cpu0, bytes0, from_ms) = (rig.edge.cpu_seconds(), rig.link_bytes(), unix_ms());
    sleep_until(start + t.around_outage);
    rig.lab.outage(true);
    let (down, down_ms) = (Instant::now(), unix_ms());
    sleep_until(down + outage / 2);
    rig.edge.kill9_and_restart();
    sleep_until(down + outage);
    rig.lab.outage(false);
    let back_ms = unix_ms();
    sleep_until(Instant::now() + t.around_outage);
    gen.stop_generating();
    // Wait for everything acknowledged, or until arrivals stop for 15 s.
    let deadline = Instant::now() + t.drain_limit;
    let mut last = (rig.collector.count(), Instant::now());
    loop {
        let tracks = gen.tracks();
        let (first, _) = first_arrivals(&rig.collector.arrivals());
        let missing = tracks.iter().enumerate().any(|(s, tr)| {
            tr.acked
                .iter()
                .enumerate()
                .any(|(seq, &a)| a && !first.contains_key(&(s, seq as u64)))
        });
        let n = rig.collector.count();
        if n != last.0 {
            last = (n, Instant::now());
        }
        if !missing || Instant::now() >= deadline || last.1.elapsed() > Duration::from_secs(15) {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let (cpu1, bytes1, to_ms) = (rig.edge.cpu_seconds(), rig.link_bytes(), unix_ms());
    let tracks = gen.tracks();
    let arrivals = rig.collector.arrivals();
    let (first, dups) = first_arrivals(&arrivals);
    let mut acked = 0u64;
    let mut lost = 0u64;
    let (mut backlog, mut drain_end) = (0u64, back_ms);
    for (s, tr) in tracks.iter().enumerate() {
        for (seq, (&a, &sent)) in tr.acked.iter().zip(&tr.sent_at).enumerate() {
            let got = first.get(&(s, seq as u64)).copied();
            if a {
                acked += 1;
                if got.is_none() {
                    lost += 1;
                    if lost <= 5 {
                        eprintln!(
                            "   {}: lost source {s} seq {seq}, generated {} ms after the start (outage {}..{} ms)",
                            system.name(),
                            sent.saturating_sub(from_ms),
                            down_ms - from_ms,
                            back_ms - from_ms
                        );
                    }
                }
            }
            if let Some(at) = got {
                if sent < back_ms && at >= back_ms {
                    backlog += 1;
                    drain_end = drain_end.max(at);
                }
            }
        }
    }
    if lost > 0 && system == System::Relay {
        eprintln!("{}", rig.edge.diagnostics());
    }
    let drain_s = (drain_end - back_ms) as f64 / 1000.0;
    let lat = latencies(&tracks, &first, from_ms, to_ms);
    let generated = gen.totals().generated;
    Figures {
        system,
        kind,
        link: link.name.to_owned(),
        offered: link.rate,
        goodput: backlog as f64 / drain_s.max(0.001),
        up_bytes_per_msg: (bytes1.0 - bytes0.0) as f64 / first.len().max(1) as f64,
        down_bytes_per_msg: (bytes1.1 - bytes0.1) as f64 / first.len().max(1) as f64,
        p50_ms: quantile(&lat, 0.5),
        p99_ms: quantile(&lat, 0.99),
        cpu_per_100k: (cpu1 - cpu0) * 100_000.0 / generated.max(1) as f64,
        peak_rss_mib: rig.edge.peak_rss_kib() as f64 / 1024.0,
        loadgen_cores: 0.0,
        outage: Some(OutageFigures {
            acked,
            lost,
            duplicated: dups,
            drain_s,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn undelivered_messages_sort_last() {
        let lat = [Some(10), Some(20), None, Some(30)];
        assert_eq!(quantile(&lat, 0.5), Some(20));
        assert_eq!(quantile(&lat, 0.75), Some(30));
        assert_eq!(quantile(&lat, 0.99), None);
        assert_eq!(quantile(&[], 0.5), None);
    }

    #[test]
    fn first_arrival_wins_and_repeats_are_counted() {
        let a = |source, seq, at_ms| Arrival { source, seq, at_ms };
        let (first, dups) = first_arrivals(&[a(1, 1, 10), a(1, 2, 11), a(1, 1, 50), a(1, 1, 60)]);
        assert_eq!(first[&(1, 1)], 10);
        assert_eq!(first[&(1, 2)], 11);
        assert_eq!(dups, 2);
    }
}
