//! The demo from start to summary: wire the parts up, show the live view while the
//! fleet publishes and the link goes through its phases, then wait for the backlog to
//! arrive and judge the run.
//!
//! Readiness is waited on, never slept for: the broker's ports accepting, the agent's
//! /ready answering 200. The drain after the fleet stops ends when every acknowledged
//! message arrived, or at `drain_limit` (then the summary says what is missing).

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgerelay::telemetry::Status;
use tokio_util::sync::CancellationToken;

use crate::central::{free_port, Central, CentralError, Tally};
use crate::fleet::{Fleet, FleetSize, Targets};
use crate::link::{Link, Schedule};
use crate::view::{self, Snapshot, Summary};

#[derive(Debug, Clone)]
pub struct Options {
    /// How long the fleet publishes (the link's schedule is scaled to it).
    pub duration: Duration,
    pub devices: usize,
    pub interval: Duration,
    /// How long to wait for the backlog after the fleet stopped.
    pub drain_limit: Duration,
    /// Where the agent's data, config and the demo's log go.
    pub dir: PathBuf,
    pub seed: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Central(#[from] CentralError),
    #[error("cannot {what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("the demo's agent configuration is invalid: {0}")]
    Config(String),
    #[error("the agent stopped: {0}")]
    Agent(String),
    #[error("the agent was not ready within 30 s (see {0})")]
    NotReady(PathBuf),
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> DemoError {
    move |source| DemoError::Io { what, source }
}

/// The agent's configuration for the demo: every input kind, priorities, batches
/// with automatic level and dictionary, rate control on, a short keep-alive so the
/// outage is noticed within it.
fn agent_config(dir: &Path, link: SocketAddr, mqtt: u16, tcp: u16, unix: &Path) -> String {
    format!(
        r#"# Written by the edgerelay demo.
[agent]
gateway_id = "demo-gw"
data_dir = "{data}"

[buffer]
max_size = "64MiB"
max_age = "2h"

[[socket]]
kind = "tcp"
listen = "127.0.0.1:{tcp}"
framing = "lines"
topic = "plc/log"
ack = true

[[socket]]
kind = "unix"
listen = "{unix}"
framing = "length-prefixed"
topic = "apps/events"
ack = true

[compression]
level = "auto"
dictionary = "auto"

[link]
# The demo's link is a relay on loopback: the eBPF probe would measure loopback too.
probe = "tcp-info"

[rate]
adapt = true

[[policy]]
topics = ["alarms/#"]
priority = "high"

[[policy]]
topics = ["plc/#"]
priority = "low"

[local_mqtt]
listen = "127.0.0.1:{mqtt}"

[upstream]
url = "mqtt://{link}"
mode = "batch"
keep_alive = "5s"
connect_timeout = "5s"
reconnect_max = "2s"

[metrics]
listen = "127.0.0.1:0"
"#,
        data = dir.join("data").display(),
        unix = unix.display(),
    )
}

/// The agent's endpoint once it answers /ready.
async fn wait_ready(data_dir: &Path, log: &Path) -> Result<SocketAddr, DemoError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let addr = std::fs::read_to_string(data_dir.join(edgerelay::ENDPOINT_FILE))
            .ok()
            .and_then(|s| s.trim().parse::<SocketAddr>().ok());
        if let Some(addr) = addr {
            if let Ok((200, _)) =
                edgerelay::telemetry::http::request(addr, "GET", "/ready", "").await
            {
                return Ok(addr);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(DemoError::NotReady(log.to_path_buf()))
}

async fn status(addr: SocketAddr) -> Option<Status> {
    match edgerelay::telemetry::http::request(addr, "GET", "/status", "").await {
        Ok((200, body)) => serde_json::from_str(&body).ok(),
        _ => None,
    }
}

/// Draws the live view: on a terminal the screen is cleared and the frame drawn from
/// the top (robust to lines a narrow terminal wraps), under a fixed header; otherwise
/// a line per second, for logs and tests.
struct Screen {
    tty: bool,
    header: Vec<String>,
}

impl Screen {
    fn draw(&mut self, lines: &[String]) {
        let mut out = std::io::stdout().lock();
        if self.tty {
            let _ = write!(out, "\x1b[H\x1b[2J");
            for l in self.header.iter().chain(lines) {
                let _ = writeln!(out, "{l}");
            }
        } else {
            let _ = writeln!(out, "{}", lines.join(" | "));
        }
        let _ = out.flush();
    }
}

/// Run the demo; the summary says whether every acknowledged message arrived.
pub async fn run(opts: Options) -> Result<Summary, DemoError> {
    let log = opts.dir.join("demo.log");
    let central = Central::start()?;
    let stop = CancellationToken::new();
    let schedule = Schedule::standard(opts.duration);
    let phases: Vec<String> = schedule
        .phases()
        .iter()
        .map(|p| format!("{} ({})", p.name, p.conditions.describe()))
        .collect();
    let link = Link::start(central.v5, schedule, stop.clone())
        .await
        .map_err(io("start the emulated link"))?;

    let (mqtt, tcp) = (
        free_port().map_err(io("find a free port"))?,
        free_port().map_err(io("find a free port"))?,
    );
    let unix = opts.dir.join("ingest.sock");
    let text = agent_config(&opts.dir, link.addr(), mqtt, tcp, &unix);
    let config_path = opts.dir.join("edgerelay.toml");
    std::fs::write(&config_path, &text).map_err(io("write the agent's config"))?;
    let config = edgerelay::config::Config::parse(&text, &config_path)
        .map_err(|e| DemoError::Config(e.to_string()))?;
    let data_dir = config.agent.data_dir.clone();

    let tally = Arc::new(Tally::default());
    let unpack_stop = CancellationToken::new();
    let unpack = central.unpack(&opts.dir, tally.clone(), unpack_stop.clone());

    let agent_stop = CancellationToken::new();
    let mut agent = tokio::spawn(edgerelay::run(config, agent_stop.clone()));
    let endpoint = tokio::select! {
        r = wait_ready(&data_dir, &log) => r?,
        done = &mut agent => {
            return Err(DemoError::Agent(match done {
                Ok(Ok(())) => "it ended on its own".to_owned(),
                Ok(Err(e)) => e.to_string(),
                Err(e) => e.to_string(),
            }))
        }
    };
    let header = vec![
        format!("agent config: {}", config_path.display()),
        format!("logs (agent, broker, unpack): {}", log.display()),
        format!(
            "link schedule over {}: {}",
            humantime::format_duration(opts.duration),
            phases.join(" → ")
        ),
        String::new(),
    ];
    for l in &header {
        println!("{l}");
    }

    let fleet = Fleet::start(
        &Targets {
            mqtt_port: mqtt,
            tcp_port: tcp,
            unix_path: unix,
        },
        FleetSize {
            devices: opts.devices,
            interval: opts.interval,
        },
        opts.seed,
    );
    let mut screen = Screen {
        tty: std::io::stdout().is_terminal(),
        header,
    };
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_published = 0u64;
    let snapshot = |draining: bool, published: u64, acked: u64, rate: f64| {
        let elapsed = started.elapsed();
        let t = link.elapsed();
        let phase = link.schedule().at(t);
        let s = Snapshot {
            elapsed,
            duration: opts.duration,
            draining,
            phase: phase.map_or("", |p| p.name).to_owned(),
            conditions: phase.map_or(String::new(), |p| p.conditions.describe()),
            next: link
                .schedule()
                .next(t)
                .map(|p| (p.name.to_owned(), p.start)),
            published,
            acked,
            ingest_rate: rate,
            payload_bytes: 0,
            publish_bytes: 0,
            link_up_bytes: link.counters().up.load(Ordering::Relaxed),
            link_down_bytes: link.counters().down.load(Ordering::Relaxed),
            arrived: 0,
            status: None,
        };
        let a = tally.lock();
        Snapshot {
            arrived: a.by_sender.values().map(|s| s.len() as u64).sum(),
            payload_bytes: a.payload_bytes,
            publish_bytes: a.publish_bytes,
            ..s
        }
    };

    while started.elapsed() < opts.duration {
        tokio::select! {
            _ = tick.tick() => {}
            done = &mut agent => return Err(DemoError::Agent(format!("{done:?}"))),
        }
        let published = fleet.published();
        let mut s = snapshot(
            false,
            published,
            fleet.acked(),
            (published - last_published) as f64,
        );
        last_published = published;
        s.status = status(endpoint).await;
        screen.draw(&view::render(&s));
    }

    // The fleet stops; what it had acknowledged must now arrive.
    let senders = fleet.senders.clone();
    fleet.stop(Duration::from_secs(10)).await;
    let stopped = Instant::now();
    let acked_of = |id: &str| {
        senders
            .iter()
            .find(|s| s.id == id)
            .map_or(0, |s| s.acked.load(Ordering::Relaxed))
    };
    let all_in = || {
        let a = tally.lock();
        senders.iter().all(|s| {
            let acked = s.acked.load(Ordering::Relaxed);
            let got = a.by_sender.get(&s.id);
            (0..acked).all(|n| got.is_some_and(|g| g.contains(&n)))
        })
    };
    let published: u64 = senders
        .iter()
        .map(|s| s.published.load(Ordering::Relaxed))
        .sum();
    let acked: u64 = senders
        .iter()
        .map(|s| s.acked.load(Ordering::Relaxed))
        .sum();
    let mut checks = 0u32;
    while !all_in() && stopped.elapsed() < opts.drain_limit {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            done = &mut agent => return Err(DemoError::Agent(format!("{done:?}"))),
        }
        checks += 1;
        if checks.is_multiple_of(4) {
            let mut s = snapshot(true, published, acked, 0.0);
            s.status = status(endpoint).await;
            screen.draw(&view::render(&s));
        }
    }
    let drained_in = stopped.elapsed();
    let mut s = snapshot(true, published, acked, 0.0);
    s.status = status(endpoint).await;
    screen.draw(&view::render(&s));

    agent_stop.cancel();
    let _ = agent.await;
    unpack_stop.cancel();
    let _ = unpack.await;
    stop.cancel();

    let a = tally.lock();
    Ok(Summary {
        ran: opts.duration,
        drained_in,
        devices: opts.devices,
        senders: senders
            .iter()
            .map(|s| {
                (
                    s.id.clone(),
                    view::SenderResult {
                        kind: s.kind,
                        published: s.published.load(Ordering::Relaxed),
                        acked: acked_of(&s.id),
                    },
                )
            })
            .collect(),
        arrivals: a.by_sender.clone(),
        duplicate_records: a.duplicate_records,
        duplicate_messages: a.duplicate_messages,
        foreign: a.foreign,
        payload_bytes: a.payload_bytes,
        publish_bytes: a.publish_bytes,
        link_bytes: link.counters().up.load(Ordering::Relaxed)
            + link.counters().down.load(Ordering::Relaxed),
        connections: link.counters().connections.load(Ordering::Relaxed),
        phases,
        latency_ms: a.latency_ms.clone(),
    })
}
