//! The link monitor: measures the upstream link (RTT, loss, resets, delivery rate,
//! up/down) and publishes a `LinkQuality` on a watch channel once a second.
//!
//! Sources (`[link] probe`): the eBPF probe on the agent's own upstream connection, or
//! TCP_INFO of the upstream socket (read by the uplink, which owns the socket, and sent
//! here), plus the uplink's PUBACK round trips and acknowledged bytes, which feed the
//! same estimator whatever the source. The scoring is `estimate::Estimator` (pure).
//!
//! Invariants: the monitor never blocks the uplink (events go through a bounded channel
//! with `try_send`: a lost sample is replaced a second later); it always produces a
//! quality, whatever fails to load; the source in use is logged once, with the reason
//! when it is not the one asked for.

pub mod ebpf;
pub mod estimate;
pub mod sys;

use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

pub use estimate::{LinkQuality, Source, Transport};

use crate::config::{LinkConfig, ProbeSetting};

/// What the uplink reports.
#[derive(Debug, Clone)]
pub enum LinkEvent {
    /// A session is up; the link is measured on its connection from `local_port` (a
    /// session may hold a second connection, for high priority, which is not).
    Connected { local_port: u16 },
    /// The session ended; `reset`: the broker reset it.
    Disconnected { reset: bool },
    /// A connect attempt failed; `refused`: actively refused (a reset).
    ConnectFailed { refused: bool },
    /// TCP_INFO of the upstream socket.
    Transport(Transport),
    /// PUBACKs since the last report: how many, their mean round trip, bytes acked.
    Pubacks {
        count: u32,
        mean_rtt: Duration,
        bytes: usize,
    },
}

/// The uplink's handle for reporting to the monitor.
#[derive(Debug, Clone)]
pub struct LinkFeed {
    tx: mpsc::Sender<LinkEvent>,
    wants_tcp_info: bool,
}

impl LinkFeed {
    /// Report without waiting; a full queue drops the event (the next replaces it).
    pub fn send(&self, e: LinkEvent) {
        let _ = self.tx.try_send(e);
    }

    /// Whether the uplink should read TCP_INFO for the monitor.
    pub fn wants_tcp_info(&self) -> bool {
        self.wants_tcp_info
    }

    /// A feed nobody listens to (tools and tests that run an uplink alone).
    pub fn detached() -> Self {
        let (tx, _) = mpsc::channel(1);
        Self {
            tx,
            wants_tcp_info: false,
        }
    }
}

#[derive(Debug)]
pub struct Monitor {
    cfg: LinkConfig,
    /// The upstream broker: what the eBPF probe watches connections to.
    upstream: (String, u16),
    rx: mpsc::Receiver<LinkEvent>,
    tx: watch::Sender<LinkQuality>,
    estimator: estimate::Estimator,
    probe: Option<ebpf::Probe>,
    /// Local port of the session's measured connection (the probe may see two).
    measured_port: Option<u16>,
}

impl Monitor {
    /// A monitor of the link to the broker at `host`:`port`.
    pub fn new(
        cfg: LinkConfig,
        host: &str,
        port: u16,
    ) -> (Self, LinkFeed, watch::Receiver<LinkQuality>) {
        let (tx, rx) = mpsc::channel(64);
        let estimator = estimate::Estimator::new();
        let (qtx, qrx) = watch::channel(estimator.quality());
        let feed = LinkFeed {
            tx,
            wants_tcp_info: cfg.probe != ProbeSetting::Off,
        };
        (
            Self {
                cfg,
                upstream: (host.to_owned(), port),
                rx,
                tx: qtx,
                estimator,
                probe: None,
                measured_port: None,
            },
            feed,
            qrx,
        )
    }

    /// Load the probe the config asks for. Call before the uplink connects: the eBPF
    /// probe sees connections from their start only.
    pub async fn start(&mut self) {
        match self.cfg.probe {
            ProbeSetting::Off => {
                tracing::info!("link monitor: transport probe off; PUBACK round trips only")
            }
            ProbeSetting::TcpInfo => tracing::info!(source = "tcp-info", "link monitor started"),
            ProbeSetting::Auto | ProbeSetting::Ebpf => self.start_probe().await,
        }
    }

    pub async fn run(mut self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut was_up = false;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                ev = self.rx.recv() => match ev {
                    Some(ev) => self.apply(ev),
                    None => break,
                },
                _ = tick.tick() => {
                    self.read_probe();
                    self.estimator.tick(Instant::now());
                    let q = self.estimator.quality();
                    if q.up != was_up {
                        if q.up {
                            tracing::info!(srtt_ms = q.srtt.as_millis() as u64, "link up");
                        } else {
                            tracing::warn!(resets = q.resets, "link down");
                        }
                        was_up = q.up;
                    }
                    tracing::debug!(
                        source = q.source.as_str(),
                        up = q.up,
                        srtt_ms = q.srtt.as_secs_f64() * 1e3,
                        rttvar_ms = q.rttvar.as_secs_f64() * 1e3,
                        rtt_recent_ms = q.rtt_recent.as_secs_f64() * 1e3,
                        loss = q.loss,
                        resets = q.resets,
                        delivery_rate = q.delivery_rate,
                        goodput = q.goodput,
                        app_rtt_ms = q.app_rtt.as_secs_f64() * 1e3,
                        "link quality"
                    );
                    self.tx.send_replace(q);
                }
            }
        }
    }

    /// Load the eBPF probe, or say once why not and carry on with TCP_INFO.
    async fn start_probe(&mut self) {
        let target = self.target().await;
        match ebpf::Probe::load(target) {
            Ok(p) => {
                tracing::info!(
                    source = "ebpf",
                    broker = %format_args!("{}:{}", self.upstream.0, self.upstream.1),
                    "link monitor started"
                );
                if !p.missing.is_empty() {
                    tracing::warn!(missing = ?p.missing, "eBPF probe: some tracepoints could not be attached; resets are then counted from the uplink's own connect errors");
                }
                self.probe = Some(p);
            }
            Err(e) => {
                let why = "needs CAP_BPF and CAP_NET_ADMIN (or root) and kernel BTF";
                if self.cfg.probe == ProbeSetting::Ebpf {
                    tracing::warn!(source = "tcp-info", reason = %e, "link monitor: the eBPF probe cannot be used ({why}); using TCP_INFO");
                } else {
                    tracing::info!(source = "tcp-info", reason = %e, "link monitor: the eBPF probe cannot be used ({why}); using TCP_INFO");
                }
            }
        }
    }

    /// What the probe watches: TCP connections to the broker's address and port from
    /// this network namespace.
    async fn target(&self) -> edgerelay_probe_common::Target {
        let (host, port) = (&self.upstream.0, self.upstream.1);
        let remote_ip4 = match tokio::net::lookup_host((host.as_str(), port)).await {
            Ok(mut addrs) => addrs
                .find_map(|a| match a.ip() {
                    std::net::IpAddr::V4(v4) => Some(u32::from_ne_bytes(v4.octets())),
                    std::net::IpAddr::V6(_) => None,
                })
                .unwrap_or(0),
            Err(_) => 0,
        };
        let netns_cookie = std::net::UdpSocket::bind(("0.0.0.0", 0))
            .and_then(|s| sys::netns_cookie(&s))
            .unwrap_or(0);
        edgerelay_probe_common::Target {
            netns_cookie,
            remote_ip4,
            remote_port: u32::from(port),
        }
    }

    fn read_probe(&mut self) {
        let Some(p) = self.probe.as_mut() else {
            return;
        };
        match p.read(sys::monotonic_ns(), self.measured_port) {
            Ok((sample, resets)) => {
                if let Some(t) = sample {
                    self.estimator.transport(t);
                }
                self.estimator.add_resets(resets);
            }
            Err(e) => {
                tracing::warn!(error = %e, "eBPF probe unreadable; using TCP_INFO from now on");
                self.probe = None;
            }
        }
    }

    fn apply(&mut self, ev: LinkEvent) {
        // With the probe counting resets itself, the uplink's view would count twice.
        let probe_counts_resets = self.probe.as_ref().is_some_and(|p| p.counts_resets);
        match ev {
            LinkEvent::Connected { local_port } => {
                self.measured_port = Some(local_port);
                self.estimator.connected()
            }
            LinkEvent::Disconnected { reset } => {
                self.estimator.disconnected(reset && !probe_counts_resets)
            }
            LinkEvent::ConnectFailed { refused } => {
                self.estimator.disconnected(refused && !probe_counts_resets)
            }
            LinkEvent::Transport(t) => {
                if self.cfg.probe != ProbeSetting::Off {
                    self.estimator
                        .acked_bytes(t.connection, t.bytes_acked, Instant::now());
                    if self.probe.is_none() {
                        self.estimator.transport(t);
                    }
                }
            }
            LinkEvent::Pubacks {
                count,
                mean_rtt,
                bytes,
            } => {
                if count > 0 {
                    self.estimator.puback(mean_rtt, bytes);
                }
            }
        }
    }
}
