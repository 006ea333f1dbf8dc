//! The forwarder: moves stored records upstream over one MQTT session at a time and
//! deletes them from the store only after the broker's PUBACK.
//!
//! What one publish carries is the `Packer`'s business (passthrough: one record as it
//! came; batch: many records in the wire format); everything else lives here once.
//!
//! Invariants:
//! - A record is deleted only for a PUBACK whose packet id this session assigned to the
//!   publish carrying it.
//! - At most `inflight` publishes await PUBACK; the store is read in bounded chunks, so
//!   memory does not depend on the backlog.
//! - After any disconnect the next session starts again from the head of the stream:
//!   whatever was not acknowledged is sent again (duplicates possible, loss not).
//! - The socket is always read while writes are pending, so PUBACKs and keep-alive are
//!   handled even when the link is slow.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use rumqttc::mqttbytes::v4::Packet;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use super::backoff::Backoff;
use super::lanes::{self, Lane};
use super::pace::{Adapter, Pacer};
pub use super::packer::{
    upstream_topic, Announcement, MetaWrite, Packer, PassthroughPacker, Seqs, Unit,
};
use super::session::{Session, SessionError};
use crate::config::UpstreamConfig;
use crate::control::{ControlSettings, Degradation, Plan};
use crate::link::{LinkEvent, LinkFeed, LinkQuality};
use crate::policy::{Policies, Priority, StreamPolicy};
use crate::sleep_until_opt;
use crate::store::{AppendError, Gap, Store, StoreError, StreamId};
use tokio::sync::watch;

/// Ack (delete) transactions in flight to the store writer at once.
const MAX_ACK_COMMITS: usize = 4;
/// Record publishes are queued only while less than this waits to be written to the
/// socket: what a high-priority publish may find ahead of it here (8 KiB is 65 ms at
/// 1 Mbit/s; 16 KiB, with the kernel's as much again, put its p99 near 2 s).
const OUT_LIMIT: usize = 8 << 10;
/// On shutdown, wait this long for outstanding PUBACKs before disconnecting.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("reading the buffer: {0}")]
    Store(#[from] StoreError),
    #[error("encoding a batch: {0}")]
    Encode(#[from] crate::wire::WireError),
}

type AckFuture = Pin<Box<dyn Future<Output = Result<(), AppendError>> + Send>>;

#[derive(Debug)]
pub struct Forwarder {
    cfg: UpstreamConfig,
    gateway: String,
    store: Store,
    /// One per stream, in the order of the policies' streams.
    lanes: Vec<Lane>,
    policies: Arc<Policies>,
    /// Priorities whose degradable topics are dropped from now on (the plan's).
    degraded: Degradation,
    /// Publishes sent so far (orders lanes of one priority: round robin).
    served: u64,
    /// Lane order for the next publish (kept to avoid an allocation per publish).
    order: Vec<usize>,
    packer: Box<dyn Packer>,
    link: LinkFeed,
    /// Link-adaptive pacing (batch mode): the controller's inputs and the link quality.
    adapt: Option<(Adapter, watch::Receiver<LinkQuality>)>,
    pacer: Pacer,
}

/// Gap notices published at once, at most.
const GAP_BATCH: usize = 16;

/// The JSON gap notice for `g`, published at `{topic_prefix}/gap`: loss is never silent.
pub fn gap_notice(gateway: &str, epoch: u64, stream: &str, g: &Gap) -> String {
    serde_json::json!({
        "gateway": gateway,
        "epoch": epoch,
        "stream": stream,
        "first": g.first,
        "last": g.last,
        "count": g.count,
        "reason": g.reason.as_str(),
    })
    .to_string()
}

/// What a publish awaiting PUBACK carries.
enum InFlight {
    /// Records of lane `.0`.
    Records(usize, Seqs),
    Gap(Gap),
    Announcement(u64),
}

/// A publish awaiting PUBACK: what it carries, when it was queued, its payload size
/// (for the link monitor's PUBACK round trips and goodput).
struct Pending {
    what: InFlight,
    queued: Instant,
    bytes: usize,
}

impl Pending {
    fn new(what: InFlight, bytes: usize) -> Self {
        Self {
            what,
            queued: Instant::now(),
            bytes,
        }
    }
}

/// PUBACKs since the last report to the link monitor.
#[derive(Default)]
struct PubackTally {
    count: u32,
    rtt_sum: Duration,
    bytes: usize,
}

/// How a session ended.
enum End {
    Shutdown(Session),
    Lost(UplinkError),
}

impl Forwarder {
    pub fn new(
        cfg: UpstreamConfig,
        gateway: String,
        store: Store,
        streams: Vec<(StreamId, StreamPolicy)>,
        policies: Arc<Policies>,
        packer: Box<dyn Packer>,
    ) -> Self {
        let lanes = streams
            .into_iter()
            .map(|(id, p)| Lane::new(id, p.name, p.priority, p.drain))
            .collect();
        Self {
            cfg,
            gateway,
            store,
            lanes,
            policies,
            degraded: Degradation::default(),
            served: 0,
            order: Vec::new(),
            packer,
            link: LinkFeed::detached(),
            adapt: None,
            pacer: Pacer::new(Plan {
                paused: false,
                rate: u64::MAX,
                window: u64::MAX,
                batch_size: 1,
                linger: Duration::ZERO,
                level: 0,
                degraded: Degradation::default(),
            }),
        }
    }

    /// Pace and shape uploads by the rate controller, fed by `quality` once a second.
    pub fn with_control(
        mut self,
        settings: ControlSettings,
        quality: watch::Receiver<LinkQuality>,
    ) -> Self {
        let mut adapter = Adapter::new(settings);
        adapter.set_low_streams(
            self.lanes
                .iter()
                .filter(|l| l.priority == Priority::Low)
                .map(|l| l.id)
                .collect(),
        );
        let plan = adapter.initial();
        self.pacer = Pacer::new(plan);
        self.packer.set_plan(&plan);
        self.adapt = Some((adapter, quality));
        self
    }

    /// Report connections, TCP_INFO and PUBACK round trips to the link monitor.
    pub fn with_link_feed(mut self, link: LinkFeed) -> Self {
        self.link = link;
        self
    }

    pub async fn run(mut self, cancel: CancellationToken) {
        let mut backoff = Backoff::new(self.cfg.reconnect_min, self.cfg.reconnect_max);
        let addr = format!("{}:{}", self.cfg.host, self.cfg.port);
        loop {
            let connected = tokio::select! {
                _ = cancel.cancelled() => break,
                r = Session::connect(&self.cfg) => r,
            };
            match connected {
                Ok(session) => {
                    tracing::info!(broker = %addr, client_id = %self.cfg.client_id, "connected upstream");
                    self.link.send(LinkEvent::Connected);
                    let mut productive = false;
                    match self.serve(session, &cancel, &mut productive).await {
                        End::Shutdown(session) => {
                            session.disconnect(Duration::from_secs(1)).await;
                            self.link.send(LinkEvent::Disconnected { reset: false });
                            tracing::info!(broker = %addr, "disconnected upstream");
                            break;
                        }
                        End::Lost(e) => {
                            self.link.send(LinkEvent::Disconnected {
                                reset: is_reset(&e),
                            });
                            tracing::warn!(broker = %addr, error = %e, "upstream connection lost")
                        }
                    }
                    if productive {
                        backoff.reset();
                    }
                }
                Err(e) => {
                    self.link.send(LinkEvent::ConnectFailed {
                        refused: matches!(&e, SessionError::Connect { source, .. } if source.kind() == std::io::ErrorKind::ConnectionRefused),
                    });
                    tracing::warn!(broker = %addr, error = %e, "cannot connect upstream")
                }
            }
            let delay = backoff.next_delay(rand::random::<f64>());
            tracing::debug!(?delay, "reconnecting after backoff");
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn serve(
        &mut self,
        mut s: Session,
        cancel: &CancellationToken,
        productive: &mut bool,
    ) -> End {
        let window = usize::from(self.cfg.inflight.get());
        let keep_alive = self.cfg.keep_alive;
        // Every publish awaiting PUBACK; only record publishes count against the window.
        let mut inflight: HashMap<u16, Pending> = HashMap::with_capacity(window);
        let mut pubacks = PubackTally::default();
        self.pacer.reset();
        let mut pace_deadline: Option<tokio::time::Instant> = None;
        // Tags TCP_INFO samples: the counters restart with every connection.
        let connection = s
            .writer
            .as_ref()
            .local_addr()
            .map_or(0, |a| u64::from(a.port()));
        let mut record_publishes = 0usize;
        for lane in &mut self.lanes {
            lane.reset();
        }
        let mut committed = self.store.committed();
        committed.borrow_and_update();
        // Whether to look for gaps to report (at start, then every tick: evictions are
        // rare, a read per second is plenty).
        let mut gaps_reporting = 0usize;
        let mut look_for_gaps = true;
        let mut ack_commits: FuturesUnordered<AckFuture> = FuturesUnordered::new();
        let mut last_rx = Instant::now();
        let mut last_tx = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut drain_deadline: Option<tokio::time::Instant> = None;

        let end = 'session: loop {
            if drain_deadline.is_none() {
                while let Some(a) = self.packer.announcement() {
                    let pkid = s.alloc_pkid(|id| inflight.contains_key(&id));
                    let bytes = a.payload.len();
                    if let Err(e) = s.queue_publish(a.topic, a.payload, true, pkid) {
                        break 'session End::Lost(e.into());
                    }
                    inflight.insert(pkid, Pending::new(InFlight::Announcement(a.token), bytes));
                }
            }
            if drain_deadline.is_none() && look_for_gaps && gaps_reporting == 0 {
                look_for_gaps = false;
                match self.store.gaps(GAP_BATCH).await {
                    Ok(gaps) => {
                        let names = self.store.stats();
                        for g in gaps {
                            let stream = names
                                .streams
                                .iter()
                                .find(|st| st.id == g.stream)
                                .map_or("?", |st| st.name.as_str());
                            let body = gap_notice(&self.gateway, self.store.epoch(), stream, &g);
                            tracing::warn!(
                                stream,
                                first = g.first,
                                last = g.last,
                                count = g.count,
                                reason = g.reason.as_str(),
                                "reporting records dropped unsent"
                            );
                            let pkid = s.alloc_pkid(|id| inflight.contains_key(&id));
                            let topic = upstream_topic(&self.cfg.topic_prefix, "gap");
                            let bytes = body.len();
                            if let Err(e) = s.queue_publish(topic, Bytes::from(body), false, pkid) {
                                break 'session End::Lost(e.into());
                            }
                            inflight.insert(pkid, Pending::new(InFlight::Gap(g), bytes));
                            gaps_reporting += 1;
                        }
                    }
                    Err(e) => break 'session End::Lost(e.into()),
                }
            }
            if drain_deadline.is_none() {
                // New records only while the socket takes what is queued: with
                // TCP_NOTSENT_LOWAT it is writable only when little is unsent, so data
                // waits here, where a high-priority publish can still overtake it,
                // not in a socket buffer in front of it.
                // High priority is not held back by the pacer or the window, only by
                // the socket: it is what the link must carry first (its bytes still
                // count, so the rest yields to it). A publish beyond the window is
                // never more than the socket takes.
                // While the link is down nothing is sent.
                while record_publishes < window
                    && s.out.len() < OUT_LIMIT
                    && !self.pacer.plan().paused
                {
                    let only_high = pace_deadline.is_some()
                        || match self.pacer.may_send(Instant::now()) {
                            Ok(()) => false,
                            Err(until) => {
                                pace_deadline = until.map(tokio::time::Instant::from_std);
                                true
                            }
                        };
                    let unit = match self.next_unit(only_high).await {
                        Ok(Some(unit)) => unit,
                        Ok(None) => break,
                        Err(e) => break 'session End::Lost(e),
                    };
                    let (lane, unit) = unit;
                    let pkid = s.alloc_pkid(|id| inflight.contains_key(&id));
                    let bytes = unit.payload.len();
                    let records = match &unit.seqs {
                        Seqs::One(_) => 1,
                        Seqs::Many(v) => v.len(),
                    };
                    if let Err(e) = s.queue_publish(unit.topic, unit.payload, unit.retain, pkid) {
                        break 'session End::Lost(e.into());
                    }
                    self.pacer.sent(bytes);
                    if let Some((adapter, _)) = self.adapt.as_mut() {
                        adapter.sent(records, unit.stored_bytes, bytes);
                    }
                    inflight.insert(
                        pkid,
                        Pending::new(InFlight::Records(lane, unit.seqs), bytes),
                    );
                    record_publishes += 1;
                }
            } else if inflight.is_empty() && s.out.is_empty() {
                break 'session End::Shutdown(s);
            }
            for lane in &mut self.lanes {
                if !lane.acked.is_empty() && ack_commits.len() < MAX_ACK_COMMITS {
                    ack_commits.push(ack_future(&self.store, lane));
                }
            }
            let linger_deadline = self
                .lanes
                .iter()
                .filter(|l| !l.linger_expired)
                .filter_map(|l| l.linger_deadline)
                .min();

            tokio::select! {
                biased;
                _ = cancel.cancelled(), if drain_deadline.is_none() => {
                    drain_deadline = Some(tokio::time::Instant::now() + DRAIN_TIMEOUT);
                }
                _ = sleep_until_opt(drain_deadline) => break 'session End::Shutdown(s),
                _ = sleep_until_opt(linger_deadline) => {
                    let now = tokio::time::Instant::now();
                    for lane in &mut self.lanes {
                        if lane.linger_deadline.is_some_and(|d| d <= now) {
                            lane.linger_expired = true;
                        }
                    }
                }
                _ = sleep_until_opt(pace_deadline) => pace_deadline = None,
                packet = s.reader.next() => {
                    last_rx = Instant::now();
                    match packet {
                        Some(Ok(Packet::PubAck(ack))) => match inflight.remove(&ack.pkid).map(|p| {
                            pubacks.count += 1;
                            pubacks.rtt_sum += p.queued.elapsed();
                            pubacks.bytes += p.bytes;
                            if matches!(p.what, InFlight::Records(..)) {
                                self.pacer.acked(p.bytes);
                                if let Some((adapter, _)) = self.adapt.as_mut() {
                                    adapter.acked(p.bytes);
                                }
                            }
                            p.what
                        }) {
                            Some(InFlight::Records(lane, seqs)) => {
                                record_publishes -= 1;
                                if let Some(lane) = self.lanes.get_mut(lane) {
                                    match seqs {
                                        Seqs::One(seq) => lane.acked.push(seq),
                                        Seqs::Many(seqs) => lane.acked.extend(seqs),
                                    }
                                }
                                *productive = true;
                            }
                            Some(InFlight::Gap(g)) => {
                                gaps_reporting -= 1;
                                // Forgotten before anything else happens, so the next
                                // look for gaps cannot report it twice. Gaps are rare:
                                // waiting for this one commit here costs nothing.
                                if let Err(e) = self.store.ack_gaps(vec![g]).await {
                                    tracing::error!(error = %e, "could not forget a reported gap; it will be reported again");
                                }
                            }
                            Some(InFlight::Announcement(token)) => {
                                // Rare too (a new dictionary); if keeping it fails, the
                                // next run merely trains again.
                                if let Some(w) = self.packer.announced(token) {
                                    if let Err(e) = self.store.put_meta(w.key, w.value).await {
                                        tracing::warn!(error = %e, key = w.key, "could not keep uplink state with the buffer");
                                    }
                                }
                            }
                            None => tracing::debug!(pkid = ack.pkid, "PUBACK for an unknown packet id ignored"),
                        },
                        Some(Ok(Packet::PingResp)) => *productive = true,
                        Some(Ok(other)) => tracing::debug!(packet = ?other, "ignoring packet from broker"),
                        Some(Err(e)) => break 'session End::Lost(SessionError::from(e).into()),
                        None => break 'session End::Lost(SessionError::Closed.into()),
                    }
                }
                written = s.writer.write_buf(&mut s.out), if !s.out.is_empty() => match written {
                    Ok(0) => break 'session End::Lost(SessionError::Closed.into()),
                    Ok(_) => last_tx = Instant::now(),
                    Err(e) => break 'session End::Lost(SessionError::Io(e).into()),
                },
                Some(done) = ack_commits.next(), if !ack_commits.is_empty() => {
                    if let Err(e) = done {
                        // The records stay stored and will be sent again: a duplicate, not a loss.
                        tracing::error!(error = %e, "could not delete acknowledged records");
                    }
                }
                // Only a lane that read everything needs telling (as before lanes: no
                // wake-up per commit while there is still a backlog to read).
                changed = committed.changed(), if drain_deadline.is_none() && self.lanes.iter().any(|l| l.caught_up) => {
                    if changed.is_err() {
                        drain_deadline = Some(tokio::time::Instant::now() + DRAIN_TIMEOUT);
                    }
                    for lane in &mut self.lanes {
                        lane.caught_up = false;
                    }
                }
                _ = tick.tick() => {
                    look_for_gaps = true;
                    for lane in &mut self.lanes {
                        lane.flush_dropped(&self.store, false).await;
                    }
                    self.report_link(&s, connection, &mut pubacks);
                    if let Some((adapter, quality)) = self.adapt.as_mut() {
                        let q = *quality.borrow();
                        let stats = self.store.stats();
                        let plan = adapter.tick(q, &stats);
                        self.pacer.set_plan(plan);
                        self.packer.set_plan(&plan);
                        tracing::debug!(
                            paused = plan.paused,
                            rate = plan.rate,
                            window = plan.window,
                            in_flight = self.pacer.in_flight(),
                            batch_size = plan.batch_size,
                            level = plan.level,
                            backlog_bytes = stats.streams.iter().map(|s| s.state.bytes).sum::<u64>(),
                            "uplink plan"
                        );
                        if plan.degraded != self.degraded {
                            tracing::info!(normal = plan.degraded.normal, low = plan.degraded.low, "degradation changed (the link cannot keep up with what arrives)");
                            self.degraded = plan.degraded;
                        }
                    }
                    if last_rx.elapsed() > keep_alive + keep_alive / 2 {
                        break 'session End::Lost(SessionError::KeepAliveTimeout(last_rx.elapsed()).into());
                    }
                    if last_tx.elapsed() >= keep_alive && s.out.is_empty() {
                        if let Err(e) = s.queue(&Packet::PingReq) {
                            break 'session End::Lost(e.into());
                        }
                    }
                }
            }
        };

        for lane in &mut self.lanes {
            lane.flush_dropped(&self.store, true).await;
        }
        // Whatever was acknowledged must be deleted before the next session re-reads the
        // head, or it would be sent again.
        for lane in &mut self.lanes {
            if !lane.acked.is_empty() {
                ack_commits.push(ack_future(&self.store, lane));
            }
        }
        while let Some(done) = ack_commits.next().await {
            if let Err(e) = done {
                tracing::error!(error = %e, "could not delete acknowledged records");
            }
        }
        self.packer.session_lost();
        if record_publishes > 0 {
            tracing::info!(
                unacknowledged = record_publishes,
                "records in flight stay buffered and will be sent again"
            );
        }
        if let End::Shutdown(mut session) = end {
            let _ = session.writer.flush().await;
            return End::Shutdown(session);
        }
        end
    }

    /// Once a second: TCP_INFO of the upstream socket and the PUBACKs since last time.
    fn report_link(&self, s: &Session, connection: u64, pubacks: &mut PubackTally) {
        if self.link.wants_tcp_info() {
            match crate::link::sys::read(s.writer.as_ref(), connection) {
                Ok(t) => self.link.send(LinkEvent::Transport(t)),
                Err(e) => tracing::debug!(error = %e, "TCP_INFO of the upstream socket"),
            }
        }
        let p = std::mem::take(pubacks);
        if p.count > 0 {
            self.link.send(LinkEvent::Pubacks {
                count: p.count,
                mean_rtt: p.rtt_sum / p.count,
                bytes: p.bytes,
            });
        }
    }

    /// The next publish and the lane it comes from: lanes in priority order (round
    /// robin within one), each read ahead until it has a full batch or nothing more;
    /// a lane whose partial batch waits for its linger lets the next one send. High
    /// priority never lingers.
    /// `only_high`: high-priority lanes only (the pacer holds the rest back).
    async fn next_unit(&mut self, only_high: bool) -> Result<Option<(usize, Unit)>, UplinkError> {
        lanes::order(&self.lanes, &mut self.order);
        for k in 0..self.order.len() {
            let i = self.order[k];
            if only_high && self.lanes[i].priority != Priority::High {
                break;
            }
            let wants = self.packer.wants();
            let degraded = self.degraded.of(self.lanes[i].priority);
            let lane = &mut self.lanes[i];
            while lane.queue.len() < wants && !lane.caught_up {
                lane.fill(&self.store, &self.policies, degraded).await?;
            }
            let no_linger = lane.priority == Priority::High || self.packer.linger().is_zero();
            let flush = lane.caught_up && (lane.linger_expired || no_linger);
            match self.packer.pack(&lane.name, &mut lane.queue, flush)? {
                Some(unit) => {
                    lane.linger_deadline = None;
                    lane.linger_expired = false;
                    self.served += 1;
                    lane.served = self.served;
                    return Ok(Some((i, unit)));
                }
                None => {
                    if lane.caught_up && !lane.queue.is_empty() && lane.linger_deadline.is_none() {
                        lane.linger_deadline =
                            Some(tokio::time::Instant::now() + self.packer.linger());
                    }
                }
            }
        }
        Ok(None)
    }
}

/// Delete what `lane`'s acknowledged publishes carried (taking them from the lane).
fn ack_future(store: &Store, lane: &mut Lane) -> AckFuture {
    let (store, id, seqs) = (store.clone(), lane.id, std::mem::take(&mut lane.acked));
    Box::pin(async move { store.ack(id, seqs).await })
}

/// Whether a lost session was reset by the peer.
fn is_reset(e: &UplinkError) -> bool {
    matches!(e, UplinkError::Session(SessionError::Io(io))
        if matches!(io.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted))
}

#[cfg(test)]
mod tests {
    use super::upstream_topic;

    #[test]
    fn topics() {
        assert_eq!(upstream_topic("", "a/b"), "a/b");
        assert_eq!(upstream_topic("edgerelay/gw1", "a/b"), "edgerelay/gw1/a/b");
    }
}
