//! edgerelay in one command, no root, nothing to install beyond Rust:
//!
//!     cargo run --release --example demo [-- --duration 60s --devices 40]
//!
//! An embedded central broker, the real agent on a temporary data dir, a simulated
//! fleet over MQTT and sockets, and an emulated link that degrades and drops out on a
//! schedule; a live view while it runs, and a summary proving that every message the
//! agent acknowledged arrived upstream exactly once (exit status 1 if not).

use std::time::Duration;

use anyhow::Context;
use clap::Parser;

#[derive(Parser)]
#[command(name = "demo", about = "edgerelay on an emulated bad link, end to end")]
struct Args {
    /// How long the fleet publishes; the link's schedule (good, degraded, outage,
    /// recovered) is scaled to it.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Telemetry devices publishing over MQTT (plus an alarm panel, a PLC over TCP and
    /// an application over a Unix socket).
    #[arg(long, default_value_t = 40)]
    devices: usize,
    /// Each device's interval between messages.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// How long to wait for the backlog after the fleet stops.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    drain_limit: Duration,
    /// Keep the temporary directory (config, buffer, log) instead of removing it.
    #[arg(long)]
    keep: bool,
    /// Seed of the simulated sensors.
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

fn main() -> anyhow::Result<std::process::ExitCode> {
    let args = Args::parse();
    let dir = tempfile::Builder::new()
        .prefix("edgerelay-demo-")
        .tempdir()
        .context("creating the demo's temporary directory")?;
    // Logs (the agent's, the broker's, unpack's) go to a file: the terminal shows
    // the live view.
    let log = std::fs::File::create(dir.path().join("demo.log")).context("creating the log")?;
    tracing_subscriber::fmt()
        .with_writer(std::sync::Mutex::new(log))
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rumqttd=warn".into()),
        )
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let summary = rt.block_on(edgerelay_demo::run::run(edgerelay_demo::run::Options {
        duration: args.duration,
        devices: args.devices,
        interval: args.interval,
        drain_limit: args.drain_limit,
        dir: dir.path().to_path_buf(),
        seed: args.seed,
    }))?;
    print!("{}", summary.render());
    if args.keep {
        println!("kept {}", dir.keep().display());
    }
    rt.shutdown_timeout(Duration::from_secs(2));
    Ok(if summary.ok() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}
