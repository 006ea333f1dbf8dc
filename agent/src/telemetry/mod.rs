//! What the agent tells its operators: Prometheus metrics, health and readiness, the
//! status `edgerelay status` shows, and the stuck detector — over one HTTP endpoint
//! (`[metrics] listen`).
//!
//! Why here and not in each part: a scrape or a status request must never wait on the
//! store or the uplink. Parts count their events into the process-wide metrics
//! (`metrics()`) and publish their state cheaply (`UplinkShared`); once a second the
//! `Hub` reads the store's statistics (kept in memory by its writer), the link quality
//! and the uplink's state, sets the gauges and builds the `Status` the endpoint serves.
//!
//! Invariants: the endpoint only reads snapshots; readiness is false until the agent is
//! listening and while the uplink is stuck; a stuck uplink is logged once per episode.

pub mod admin;
pub mod http;
pub mod metrics;
pub mod status;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use metrics::{labels, metrics};
pub use status::Status;

use crate::control::Plan;
use crate::link::LinkQuality;
use crate::store::Store;
use status::{DrainTracker, StuckDetector};

/// The uplink's state, as it publishes it for the hub.
#[derive(Debug, Default, Clone)]
pub struct UplinkState {
    pub connected: bool,
    pub plan: Option<Plan>,
    pub phase: &'static str,
    pub bandwidth: f64,
    pub last_error: Option<String>,
    pub last_ack: Option<Instant>,
    pub uploaded_records: u64,
    /// Stored and wire bytes acknowledged so far (their ratio: what compression saves).
    pub stored_bytes: u64,
    pub wire_bytes: u64,
}

/// Shared between the uplink (writer) and the hub (reader).
#[derive(Debug, Default)]
pub struct UplinkShared(Mutex<UplinkState>);

impl UplinkShared {
    pub fn update(&self, f: impl FnOnce(&mut UplinkState)) {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut s);
    }

    pub fn get(&self) -> UplinkState {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// What the hub needs to know of the configuration.
#[derive(Debug, Clone)]
pub struct HubSettings {
    pub gateway_id: String,
    pub mode: String,
    pub stuck_after: Duration,
    /// Stream name → priority, for the status.
    pub priorities: Vec<(String, String)>,
}

/// Gathers the state once a second; serves it through `snapshot`.
#[derive(Debug)]
pub struct Hub {
    settings: HubSettings,
    store: Store,
    link: watch::Receiver<LinkQuality>,
    uplink: Arc<UplinkShared>,
    started: Instant,
    drains: HashMap<String, DrainTracker>,
    stuck: StuckDetector,
    /// Evictions already counted into the metric, per stream.
    evicted_seen: HashMap<String, u64>,
    ready_from: watch::Receiver<bool>,
    tx: watch::Sender<Status>,
}

impl Hub {
    /// A hub publishing its snapshots to `tx` (the HTTP endpoint holds the receiver).
    /// `listening` turns true once the agent accepts messages.
    pub fn new(
        settings: HubSettings,
        store: Store,
        link: watch::Receiver<LinkQuality>,
        uplink: Arc<UplinkShared>,
        listening: watch::Receiver<bool>,
        tx: watch::Sender<Status>,
    ) -> Self {
        let stuck = StuckDetector::new(settings.stuck_after);
        Self {
            settings,
            store,
            link,
            uplink,
            started: Instant::now(),
            drains: HashMap::new(),
            stuck,
            evicted_seen: HashMap::new(),
            ready_from: listening,
            tx,
        }
    }

    pub async fn run(mut self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {}
                // Ready the moment the agent listens, not a tick later.
                changed = self.ready_from.changed() => if changed.is_err() {
                    break;
                },
            }
            let status = self.gather().await;
            self.tx.send_replace(status);
        }
    }

    /// The oldest record's age per stream, in seconds (None: empty or unreadable).
    async fn oldest_ages(&self, now_ms: u64) -> HashMap<String, f64> {
        let mut ages = HashMap::new();
        for s in &self.store.stats().streams {
            if s.state.count == 0 {
                continue;
            }
            if let Ok(head) = self.store.read(s.id, None, 1, usize::MAX).await {
                if let Some(r) = head.first() {
                    let age = now_ms.saturating_sub(r.record.ts_ms) as f64 / 1000.0;
                    ages.insert(s.name.clone(), age);
                }
            }
        }
        ages
    }

    async fn gather(&mut self) -> Status {
        let m = metrics();
        let now = Instant::now();
        let now_ms = crate::record::now_ms();
        let stats = self.store.stats();
        let ages = self.oldest_ages(now_ms).await;
        let link = *self.link.borrow();
        let up = self.uplink.get();

        let mut streams = Vec::new();
        let mut backlog = false;
        for s in &stats.streams {
            let l = labels(&[("stream", &s.name)]);
            m.buffer_records.get_or_create(&l).set(s.state.count as i64);
            m.buffer_bytes.get_or_create(&l).set(s.state.bytes as i64);
            m.buffer_oldest_age
                .get_or_create(&l)
                .set(ages.get(&s.name).copied().unwrap_or(0.0));
            let seen = self.evicted_seen.entry(s.name.clone()).or_insert(0);
            if s.state.evicted > *seen {
                m.evicted.get_or_create(&l).inc_by(s.state.evicted - *seen);
                *seen = s.state.evicted;
            }
            backlog |= s.state.count > 0;
            let drain = self
                .drains
                .entry(s.name.clone())
                .or_default()
                .update(now, s.state.bytes);
            streams.push(status::StreamStatus {
                name: s.name.clone(),
                priority: self
                    .settings
                    .priorities
                    .iter()
                    .find(|(n, _)| *n == s.name)
                    .map_or_else(|| "normal".to_owned(), |(_, p)| p.clone()),
                records: s.state.count,
                bytes: s.state.bytes,
                oldest_age_seconds: ages.get(&s.name).copied(),
                evicted: s.state.evicted,
                drain,
            });
        }
        m.buffer_used.set(stats.used_bytes as i64);
        m.buffer_budget.set(stats.budget_bytes as i64);

        m.link_up.set(i64::from(link.up));
        for source in ["ebpf", "tcp-info", "none"] {
            m.link_info
                .get_or_create(&labels(&[("source", source)]))
                .set(i64::from(link.source.as_str() == source));
        }
        m.link_rtt.set(link.srtt.as_secs_f64());
        m.link_rtt_var.set(link.rttvar.as_secs_f64());
        m.link_loss.set(link.loss);
        m.link_delivery_rate.set(link.delivery_rate as i64);

        let ratio = (up.wire_bytes > 0).then(|| up.stored_bytes as f64 / up.wire_bytes as f64);
        m.compression_ratio.set(ratio.unwrap_or(0.0));
        m.uplink_connected.set(i64::from(up.connected));
        m.bandwidth.set(up.bandwidth as i64);
        m.dead_letters.set(stats.dead_letters as i64);
        let mut degraded = Vec::new();
        if let Some(p) = &up.plan {
            // u64::MAX means "no limit": 0 on the gauge, as its help says.
            m.rate.set(i64::try_from(p.rate).unwrap_or(0));
            m.window.set(i64::try_from(p.window).unwrap_or(0));
            m.batch_records.set(p.batch_size as i64);
            m.zstd_level.set(i64::from(p.level));
            for (name, on) in [("normal", p.degraded.normal), ("low", p.degraded.low)] {
                m.degraded
                    .get_or_create(&labels(&[("priority", name)]))
                    .set(i64::from(on));
                if on {
                    degraded.push(name.to_owned());
                }
            }
        }

        let was_stuck = self.stuck.stuck();
        let stuck = self.stuck.update(now, backlog, link.up, up.last_ack);
        if stuck && !was_stuck {
            tracing::warn!(
                after = ?self.settings.stuck_after,
                "uplink stuck: records wait, the link is up, and the broker has acknowledged nothing; not ready until it does"
            );
        } else if was_stuck && !stuck {
            tracing::info!("uplink moving again");
        }
        m.stuck.set(i64::from(stuck));
        let listening = *self.ready_from.borrow();
        let not_ready = if !listening {
            Some("starting".to_owned())
        } else if stuck {
            Some(format!(
                "uplink stuck: records wait, the link is up, nothing acknowledged for {}",
                humantime::format_duration(self.settings.stuck_after)
            ))
        } else {
            None
        };
        m.ready.set(i64::from(not_ready.is_none()));

        let plan = up.plan;
        Status {
            gateway_id: self.settings.gateway_id.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_seconds: self.started.elapsed().as_secs(),
            ready: not_ready.is_none(),
            not_ready,
            stuck,
            buffer: status::BufferStatus {
                used_bytes: stats.used_bytes,
                budget_bytes: stats.budget_bytes,
            },
            streams,
            link: status::LinkStatus {
                source: link.source.as_str().to_owned(),
                up: link.up,
                rtt_ms: link.srtt.as_secs_f64() * 1e3,
                rtt_var_ms: link.rttvar.as_secs_f64() * 1e3,
                loss: link.loss,
                delivery_rate_bytes: link.delivery_rate,
            },
            uplink: status::UplinkStatus {
                connected: up.connected,
                mode: self.settings.mode.clone(),
                phase: up.phase.to_owned(),
                paused: plan.is_some_and(|p| p.paused),
                rate_bytes: plan.map(|p| p.rate).filter(|r| *r != u64::MAX),
                window_bytes: plan.map(|p| p.window).filter(|w| *w != u64::MAX),
                bandwidth_bytes: up.bandwidth as u64,
                batch_records: plan.map(|p| p.batch_size),
                zstd_level: plan.map(|p| p.level),
                degraded,
                uploaded_records: up.uploaded_records,
                compression_ratio: ratio,
                last_ack_seconds_ago: up.last_ack.map(|a| now.duration_since(a).as_secs_f64()),
                last_error: up.last_error,
            },
            dead_letters: stats.dead_letters,
        }
    }
}
