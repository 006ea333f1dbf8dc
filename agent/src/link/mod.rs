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

pub mod estimate;
pub mod tcp_info;

use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

pub use estimate::{LinkQuality, Source, Transport};

use crate::config::{LinkConfig, ProbeSetting};

/// What the uplink reports.
#[derive(Debug, Clone)]
pub enum LinkEvent {
    Connected,
    /// The session ended; `reset`: the broker reset it.
    Disconnected {
        reset: bool,
    },
    /// A connect attempt failed; `refused`: actively refused (a reset).
    ConnectFailed {
        refused: bool,
    },
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
    rx: mpsc::Receiver<LinkEvent>,
    tx: watch::Sender<LinkQuality>,
    estimator: estimate::Estimator,
}

impl Monitor {
    pub fn new(cfg: LinkConfig) -> (Self, LinkFeed, watch::Receiver<LinkQuality>) {
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
                rx,
                tx: qtx,
                estimator,
            },
            feed,
            qrx,
        )
    }

    pub async fn run(mut self, cancel: CancellationToken) {
        match self.cfg.probe {
            ProbeSetting::Off => {
                tracing::info!("link monitor: transport probe off; PUBACK round trips only")
            }
            ProbeSetting::TcpInfo => tracing::info!(source = "tcp-info", "link monitor started"),
            ProbeSetting::Auto | ProbeSetting::Ebpf => tracing::info!(
                source = "tcp-info",
                reason = "this build has no eBPF probe yet",
                "link monitor started"
            ),
        }
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

    fn apply(&mut self, ev: LinkEvent) {
        match ev {
            LinkEvent::Connected => self.estimator.connected(),
            LinkEvent::Disconnected { reset } => self.estimator.disconnected(reset),
            LinkEvent::ConnectFailed { refused } => self.estimator.disconnected(refused),
            LinkEvent::Transport(t) => {
                if self.cfg.probe != ProbeSetting::Off {
                    self.estimator.transport(t);
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
