//! bridge_bench: edgerelay against a Mosquitto bridge, side by side, in one run.
//!
//! ```text
//!  gateway ns                                   │ link lab │ central ns
//!  loadgen ──MQTT──▶ edge (mosquitto bridge  ───┼─────────┼──▶ mosquitto ──▶ collector
//!  (200 devices /     or edgerelay)            │ (clean,  │      ▲ │
//!   20 log sources)                             │ 1 Mbit…) │  unpack (edgerelay only:
//!                                               │          │  decode, dedup, republish)
//! ```
//!
//! Why one binary that runs everything: ratios only mean something when both systems
//! ran the same seeded workload on the same machine in the same run.
//!
//!     sudo cargo run --release -p edgerelay-bench --bin bridge_bench            # ~9 min
//!     sudo cargo run -p edgerelay-bench --bin bridge_bench -- --quick --out DIR  # ~1 min
//!
//! Needs root (network namespaces) and mosquitto. `--quick` checks that the harness
//! works end to end (CI runs it through bench/tests/quick.rs); its figures mean little.

mod cases;
mod collector;
mod edge;
mod loadgen;
mod report;
mod workload;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use cases::{Figures, Link, Timing};
use edge::System;
use workload::Kind;

#[derive(Parser)]
#[command(about = "edgerelay vs a Mosquitto bridge on the same workloads and emulated links")]
struct Args {
    /// A short run that checks the harness end to end (one link, short phases).
    #[arg(long)]
    quick: bool,
    /// Where the SVG plots go.
    #[arg(long, default_value = "docs")]
    out: PathBuf,
    /// Run only the link conditions whose name contains this.
    #[arg(long)]
    only: Option<String>,
    /// Run only this workload (telemetry or logs).
    #[arg(long)]
    workload: Option<String>,
    /// TOML appended to edgerelay's config, for what-if runs (say so when quoting them).
    #[arg(long)]
    relay_toml: Option<String>,
}

/// The link the goodput target is about.
const GOODPUT_LINK: &str = "1 Mbit/s, 150 ms, 3 %";

fn links(quick: bool) -> Vec<(Link, bool)> {
    // (link, run the two systems at the same time): only the clean link is CPU-bound,
    // so only there would running side by side distort the figures.
    if quick {
        return vec![
            (
                Link {
                    name: "clean",
                    spec: "",
                    rate: 400.0,
                    outage: None,
                },
                true,
            ),
            (
                Link {
                    name: "4 s outage",
                    spec: "",
                    rate: 400.0,
                    outage: Some(Duration::from_secs(4)),
                },
                true,
            ),
        ];
    }
    vec![
        (
            Link {
                name: "clean",
                spec: "",
                rate: 5000.0,
                outage: None,
            },
            false,
        ),
        (
            Link {
                name: GOODPUT_LINK,
                spec: "rate=1mbit,delay=150ms,loss=3%",
                rate: 6000.0,
                outage: None,
            },
            true,
        ),
        (
            Link {
                name: "256 kbit/s, 600 ms, 5 %",
                spec: "rate=256kbit,delay=600ms,loss=5%",
                rate: 2000.0,
                outage: None,
            },
            true,
        ),
        (
            Link {
                name: "60 s outage",
                spec: "",
                rate: 500.0,
                outage: Some(Duration::from_secs(60)),
            },
            true,
        ),
    ]
}

fn timing(quick: bool) -> Timing {
    if quick {
        Timing {
            warm_up: Duration::from_secs(2),
            window: Duration::from_secs(3),
            grace: Duration::from_secs(5),
            around_outage: Duration::from_secs(2),
            drain_limit: Duration::from_secs(30),
        }
    } else {
        Timing {
            warm_up: Duration::from_secs(10),
            window: Duration::from_secs(20),
            grace: Duration::from_secs(10),
            around_outage: Duration::from_secs(10),
            drain_limit: Duration::from_secs(120),
        }
    }
}

/// (file, title, the figure plotted)
type Plot = (&'static str, &'static str, fn(&Figures) -> f64);

fn run_case(system: System, kind: Kind, link: &Link, t: Timing) -> Figures {
    if link.outage.is_some() {
        cases::outage(system, kind, link, t)
    } else {
        cases::steady(system, kind, link, t)
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !linklab::is_root() {
        eprintln!("bridge_bench needs root: it creates network namespaces (run it with sudo)");
        return ExitCode::from(2);
    }
    if !args.quick {
        // One optimised agent, without test hooks, for the agent and unpack alike.
        let bin = edgerelay_tests::build_agent(&[]);
        std::env::set_var("EDGERELAY_BIN", bin);
    }
    if let Some(extra) = &args.relay_toml {
        if let Err(e) = edge::set_relay_extra(&extra.replace("\\n", "\n")) {
            eprintln!("--relay-toml: {e}");
            return ExitCode::from(2);
        }
    }
    let t = timing(args.quick);
    let kinds: Vec<Kind> = if args.quick {
        vec![Kind::Telemetry]
    } else {
        [Kind::Telemetry, Kind::Logs]
            .into_iter()
            .filter(|k| args.workload.as_ref().is_none_or(|w| w == k.name()))
            .collect()
    };
    let started = std::time::Instant::now();
    let mut figures = Vec::new();
    let chosen = links(args.quick).into_iter().filter(|(l, _)| {
        args.only
            .as_ref()
            .is_none_or(|o| l.name.contains(o.as_str()))
    });
    for (link, side_by_side) in chosen {
        for &kind in &kinds {
            eprintln!(
                "== {} / {} ({:.0} msg/s offered)",
                kind.name(),
                link.name,
                link.rate
            );
            let pair: Vec<Figures> = if side_by_side {
                std::thread::scope(|s| {
                    let hs: Vec<_> = [System::Bridge, System::Relay]
                        .into_iter()
                        .map(|sys| {
                            let link = &link;
                            s.spawn(move || run_case(sys, kind, link, t))
                        })
                        .collect();
                    hs.into_iter()
                        .map(|h| h.join().expect("a case panicked"))
                        .collect()
                })
            } else {
                [System::Bridge, System::Relay]
                    .into_iter()
                    .map(|sys| run_case(sys, kind, &link, t))
                    .collect()
            };
            for f in &pair {
                eprintln!("   {f:?}");
            }
            figures.extend(pair);
        }
    }
    let grace = t.grace.as_secs();
    println!("{}", report::table(&figures, grace));
    println!("{}", report::targets(&figures, GOODPUT_LINK));
    println!("(all cases in {:.0} s)", started.elapsed().as_secs_f64());
    if let Err(e) = std::fs::create_dir_all(&args.out) {
        eprintln!("cannot create {}: {e}", args.out.display());
        return ExitCode::FAILURE;
    }
    let plots: [Plot; 2] = [
        (
            "bench-goodput.svg",
            "Goodput, messages/s delivered (log scale; outage: backlog drain rate)",
            |f| f.goodput,
        ),
        (
            "bench-bytes.svg",
            "Upstream bytes per delivered message (link interface counters; log scale)",
            |f| f.up_bytes_per_msg,
        ),
    ];
    for (file, title, value) in plots {
        let path = args.out.join(file);
        if let Err(e) = report::plot(&path, title, &figures, value) {
            eprintln!("cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        eprintln!("plot written to {}", path.display());
    }
    check(&figures)
}

/// What must hold in any run, quick or full: every case delivered and was measured,
/// and edgerelay lost nothing it acknowledged.
fn check(figures: &[Figures]) -> ExitCode {
    let mut ok = true;
    for f in figures {
        let case = format!("{} / {} / {}", f.system.name(), f.kind.name(), f.link);
        if !(f.goodput > 0.0 && f.up_bytes_per_msg > 0.0 && f.cpu_per_100k > 0.0) {
            eprintln!("harness check failed: {case} measured nothing: {f:?}");
            ok = false;
        }
        if let Some(o) = f.outage {
            if o.acked == 0 {
                eprintln!("harness check failed: {case}: the edge acknowledged nothing");
                ok = false;
            }
            if f.system == System::Relay && o.lost > 0 {
                eprintln!("edgerelay lost {} acknowledged messages: {case}", o.lost);
                ok = false;
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
