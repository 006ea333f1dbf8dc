//! The forwarder: moves stored records upstream over one session at a time and
//! deletes them from the store only after the broker's PUBACK. A session is one MQTT
//! connection, or two where high-priority streams get their own (`conn`): they are
//! opened together and end together.
//!
//! What one publish carries is the `Packer`'s business (passthrough: one record as it
//! came; batch: many records in the wire format); everything else lives here once.
//!
//! Invariants:
//! - A record is deleted only for a PUBACK whose packet id this session assigned, on
//!   the connection it came on, to the publish carrying it.
//! - High priority goes first: with a connection of its own, nothing else is sent
//!   while that connection is full (a high-priority backlog).
//! - At most `inflight` publishes await PUBACK per connection; the store is read in bounded chunks, so
//!   memory does not depend on the backlog.
//! - After any disconnect the next session starts again from the head of the stream:
//!   whatever was not acknowledged is sent again (duplicates possible, loss not).
//! - The socket is always read while writes are pending, so PUBACKs and keep-alive are
//!   handled even when the link is slow.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use super::backoff::Backoff;
use super::conn::{self, Conn, InFlight, PubackTally};
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
/// What high priority on its own connection may send ahead of the pacer, bytes: a
/// live alarm never waits for the batches before it to be paid for (16 KiB is 130 ms
/// at 1 Mbit/s); a backlog of alarms is paced once it has used this up.
const HIGH_DEBT: f64 = 16_384.0;
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
    /// What the operator's endpoint shows of the uplink.
    telemetry: Arc<crate::telemetry::UplinkShared>,
    /// Refusals so far of records the broker refused (MQTT 5), by stream and seq.
    attempts: std::collections::HashMap<(StreamId, u64), u32>,
    /// Gap notices the broker refused this session (sent again by the next one).
    refused_gaps: std::collections::HashSet<(StreamId, u64)>,
    /// What a reload may change while running.
    live: Option<Live>,
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

mod broker;
mod refusal;
mod reload;

pub use reload::Live;

/// How a session ended.
enum End {
    // Boxed: the session's connections are large and a session ends once.
    Shutdown(Box<(Conn, Option<Conn>)>),
    Lost(UplinkError),
}

/// Which lanes a publish may come from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pick {
    All,
    /// High priority only (the pacer holds the rest back, or it is the priority
    /// connection's turn).
    High,
    /// All but high priority (which has a connection of its own).
    NotHigh,
}

/// Why the high-priority connection stopped taking records.
enum Flow {
    /// Nothing more is ready: the rest may go.
    Dry,
    /// Its window or unwritten bytes are full.
    Full,
    /// The pacer holds it back (until then, or until the plan changes).
    Paced(Option<Instant>),
}

/// The session's progress, shared by its connections' PUBACK handling.
#[derive(Default)]
struct Progress {
    pubacks: PubackTally,
    /// Gap notices awaiting PUBACK.
    gaps_reporting: usize,
    /// Something was acknowledged (the reconnect backoff starts over).
    productive: bool,
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
            telemetry: Arc::default(),
            attempts: Default::default(),
            refused_gaps: Default::default(),
            live: None,
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

    /// Follow reloaded policies and rate cap.
    pub fn with_live(mut self, live: Live) -> Self {
        self.live = Some(live);
        self
    }

    /// Publish the uplink's state for the operator's endpoint to `shared`.
    pub fn with_telemetry(mut self, shared: Arc<crate::telemetry::UplinkShared>) -> Self {
        self.telemetry = shared;
        self
    }

    /// Report connections, TCP_INFO and PUBACK round trips to the link monitor.
    pub fn with_link_feed(mut self, link: LinkFeed) -> Self {
        self.link = link;
        self
    }

    pub async fn run(mut self, cancel: CancellationToken) {
        // The plan in force from the start, not only from the first tick: operators
        // (and /metrics) see the pace before anything was sent.
        let plan = *self.pacer.plan();
        self.telemetry.update(|s| s.plan = Some(plan));
        let mut backoff = Backoff::new(self.cfg.reconnect_min, self.cfg.reconnect_max);
        let addr = format!("{}:{}", self.cfg.host, self.cfg.port);
        loop {
            let connected = tokio::select! {
                _ = cancel.cancelled() => break,
                r = Session::connect(&self.cfg, &self.cfg.client_id) => r,
            };
            match connected {
                Ok(session) => {
                    tracing::info!(broker = %addr, client_id = %self.cfg.client_id, "connected upstream");
                    crate::telemetry::metrics().upstream_connects.inc();
                    self.telemetry.update(|s| s.connected = true);
                    let wanted = self.cfg.priority_connection
                        && self.lanes.iter().any(|l| l.priority == Priority::High);
                    let express = if wanted {
                        tokio::select! {
                            _ = cancel.cancelled() => None,
                            e = connect_priority(&self.cfg) => e,
                        }
                    } else {
                        None
                    };
                    self.link.send(LinkEvent::Connected {
                        local_port: session.local_port(),
                    });
                    let mut productive = false;
                    match self.serve(session, express, &cancel, &mut productive).await {
                        End::Shutdown(conns) => {
                            let (bulk, express) = *conns;
                            if let Some(c) = express {
                                c.s.disconnect(Duration::from_secs(1)).await;
                            }
                            bulk.s.disconnect(Duration::from_secs(1)).await;
                            self.link.send(LinkEvent::Disconnected { reset: false });
                            tracing::info!(broker = %addr, "disconnected upstream");
                            break;
                        }
                        End::Lost(e) => {
                            self.link.send(LinkEvent::Disconnected {
                                reset: is_reset(&e),
                            });
                            self.lost(format!("connection lost: {e}"));
                            tracing::warn!(broker = %addr, error = %e, "upstream connection lost")
                        }
                    }
                    if productive {
                        backoff.reset();
                    }
                }
                Err(e) => {
                    self.lost(format!("cannot connect: {e}"));
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

    /// The session ended, or none could be made: say so on the operator's endpoint.
    fn lost(&self, why: String) {
        crate::telemetry::metrics().upstream_errors.inc();
        self.telemetry.update(|s| {
            s.connected = false;
            s.last_error = Some(why);
        });
    }

    async fn serve(
        &mut self,
        s: Session,
        express: Option<Session>,
        cancel: &CancellationToken,
        productive: &mut bool,
    ) -> End {
        let window = usize::from(self.cfg.inflight.get());
        let keep_alive = self.cfg.keep_alive;
        // Gap notices and dictionaries go on the first connection, with the records
        // that need them; high priority on its own connection where there is one.
        let mut bulk = Conn::new(s, window);
        let mut express = express.map(|s| Conn::new(s, window));
        let mut progress = Progress::default();
        self.pacer.reset();
        self.refused_gaps.clear();
        let mut pace_deadline: Option<tokio::time::Instant> = None;
        // Tags TCP_INFO samples: the counters restart with every connection.
        let connection = u64::from(bulk.s.local_port());
        // Whether the kernel says what its pipe holds (not under an emulator that
        // passes TCP_INFO through short): then the window applies to that.
        let windowed = crate::link::sys::pipe_bytes(&bulk.s.writer).is_ok();
        for lane in &mut self.lanes {
            lane.reset();
        }
        let mut committed = self.store.committed();
        committed.borrow_and_update();
        // Whether to look for gaps to report (at start, then every tick: evictions are
        // rare, a read per second is plenty).
        let mut look_for_gaps = true;
        let mut ack_commits: FuturesUnordered<AckFuture> = FuturesUnordered::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut drain_deadline: Option<tokio::time::Instant> = None;

        let end = 'session: loop {
            if drain_deadline.is_none() {
                while let Some(a) = self.packer.announcement() {
                    let what = InFlight::Announcement(a.token);
                    if let Err(e) = bulk.publish(a.topic, a.payload, true, what) {
                        break 'session Err(e.into());
                    }
                }
            }
            if drain_deadline.is_none() && look_for_gaps && progress.gaps_reporting == 0 {
                look_for_gaps = false;
                if let Err(e) = self.report_gaps(&mut bulk, &mut progress).await {
                    break 'session Err(e);
                }
            }
            if drain_deadline.is_none() {
                // New records only while the socket takes what is queued: with
                // TCP_NOTSENT_LOWAT it is writable only when little is unsent, so data
                // waits here, where a high-priority publish can still overtake it,
                // not in a socket buffer in front of it.
                // High priority is not held back by the window, only by the socket:
                // it is what the link must carry first (its bytes still count, so the
                // rest yields to it). A publish beyond the window is never more than
                // the socket takes. While the link is down nothing is sent.
                // With a connection of its own it goes first — the rest waits while
                // it is full or waits for the pacer (a backlog after an outage) and
                // shares the link once it runs dry — and it is paced: alone on the
                // link it would otherwise fill the bottleneck's buffer. Sharing the
                // connection it bypasses the pacer too (it would queue behind the
                // batches the pacer lets through).
                let high_waiting = match express.as_mut() {
                    Some(hi) => match self.send_records(hi, window).await {
                        Ok(Flow::Dry) => false,
                        Ok(Flow::Full) => true,
                        Ok(Flow::Paced(until)) => {
                            if let Some(t) = until {
                                pace_deadline = Some(tokio::time::Instant::from_std(t));
                            }
                            true
                        }
                        Err(e) => break 'session Err(e),
                    },
                    None => false,
                };
                while !high_waiting
                    && bulk.records < window
                    && bulk.s.out.len() < OUT_LIMIT
                    && !self.pacer.plan().paused
                {
                    let held = pace_deadline.is_some()
                        || match self.pacer.may_send(Instant::now(), windowed) {
                            Ok(()) => false,
                            Err(until) => {
                                pace_deadline = until.map(tokio::time::Instant::from_std);
                                true
                            }
                        };
                    let pick = match (held, express.is_some()) {
                        (true, true) => break,
                        (true, false) => Pick::High,
                        (false, true) => Pick::NotHigh,
                        (false, false) => Pick::All,
                    };
                    match self.send_one(&mut bulk, pick).await {
                        Ok(true) => {}
                        Ok(false) => break,
                        Err(e) => break 'session Err(e),
                    }
                }
            } else if bulk.idle() && express.as_ref().is_none_or(Conn::idle) {
                break 'session Ok(());
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
            let shallow = self.pacer.shallow();
            // The bulk connection's writes fill the window; high priority's are
            // counted in it (the bottleneck is shared) but never held back by it.
            let window = self
                .pacer
                .window()
                .filter(|_| windowed)
                .map(|bytes| conn::Window {
                    bytes,
                    elsewhere: express.as_ref().map_or(0, |c| {
                        crate::link::sys::pipe_bytes(&c.s.writer).unwrap_or(0)
                    }),
                    rate: self.pacer.plan().rate,
                });
            let (hi_reader, hi_writer) = conn::halves(express.as_mut());

            tokio::select! {
                biased;
                _ = cancel.cancelled(), if drain_deadline.is_none() => {
                    drain_deadline = Some(tokio::time::Instant::now() + DRAIN_TIMEOUT);
                }
                _ = sleep_until_opt(drain_deadline) => break 'session Ok(()),
                _ = sleep_until_opt(linger_deadline) => {
                    let now = tokio::time::Instant::now();
                    for lane in &mut self.lanes {
                        if lane.linger_deadline.is_some_and(|d| d <= now) {
                            lane.linger_expired = true;
                        }
                    }
                }
                _ = sleep_until_opt(pace_deadline) => pace_deadline = None,
                packet = conn::next_packet(hi_reader) => {
                    if let Some(hi) = express.as_mut() {
                        if let Err(e) = self.on_packet(hi, packet, &mut progress).await {
                            break 'session Err(e);
                        }
                    }
                }
                packet = bulk.s.reader.next() => {
                    if let Err(e) = self.on_packet(&mut bulk, packet, &mut progress).await {
                        break 'session Err(e);
                    }
                }
                written = conn::write_some(hi_writer, shallow, None) => match written {
                    Ok(None) => {}
                    Ok(Some(0)) => break 'session Err(SessionError::Closed.into()),
                    Ok(Some(_)) => {
                        if let Some(hi) = express.as_mut() {
                            hi.last_tx = Instant::now();
                        }
                    }
                    Err(e) => break 'session Err(SessionError::Io(e).into()),
                },
                written = conn::write_some(Some((&mut bulk.s.writer, &mut bulk.s.out)), shallow, window), if !bulk.s.out.is_empty() || bulk.s.writer.unflushed() => match written {
                    Ok(None) => {}
                    Ok(Some(0)) => break 'session Err(SessionError::Closed.into()),
                    Ok(Some(_)) => bulk.last_tx = Instant::now(),
                    Err(e) => break 'session Err(SessionError::Io(e).into()),
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
                    self.apply_reload();
                    look_for_gaps = true;
                    for lane in &mut self.lanes {
                        lane.flush_dropped(&self.store, false).await;
                    }
                    self.report_link(&bulk.s, express.as_ref().map(|c| &c.s), connection, &mut progress.pubacks);
                    self.replan();
                    for c in std::iter::once(&mut bulk).chain(express.as_mut()) {
                        if let Err(e) = c.keep_alive(keep_alive) {
                            break 'session Err(e.into());
                        }
                    }
                }
            }
        };
        *productive = progress.productive;

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
        let unacknowledged = bulk.records + express.as_ref().map_or(0, |c| c.records);
        if unacknowledged > 0 {
            tracing::info!(
                unacknowledged,
                "records in flight stay buffered and will be sent again"
            );
        }
        if let Err(e) = end {
            return End::Lost(e);
        }
        if let Some(c) = express.as_mut() {
            let _ = c.s.writer.flush().await;
        }
        let _ = bulk.s.writer.flush().await;
        End::Shutdown(Box::new((bulk, express)))
    }

    /// Publish high-priority records on `c` while it takes them: at most `window`
    /// awaiting PUBACK, less than `OUT_LIMIT` unwritten, at the pacer's rate, nothing
    /// while the link is down.
    async fn send_records(&mut self, c: &mut Conn, window: usize) -> Result<Flow, UplinkError> {
        while c.records < window && c.s.out.len() < OUT_LIMIT {
            if let Err(until) = self.pacer.may_send_rate(Instant::now(), HIGH_DEBT) {
                return Ok(Flow::Paced(until));
            }
            if !self.send_one(c, Pick::High).await? {
                return Ok(Flow::Dry);
            }
        }
        Ok(Flow::Full)
    }

    /// Publish the next unit of the lanes `pick` allows on `c`; false: none is ready.
    async fn send_one(&mut self, c: &mut Conn, pick: Pick) -> Result<bool, UplinkError> {
        let Some((lane, unit)) = self.next_unit(pick).await? else {
            return Ok(false);
        };
        let limit = c.s.max_packet().map(|m| m as usize);
        if limit.is_some_and(|m| c.s.publish_size(&unit.topic, unit.payload.len()) > m) {
            // Larger than the broker takes: never sent as it is.
            self.too_large(lane, unit, limit.unwrap_or_default())
                .await?;
            return Ok(true);
        }
        let records = match &unit.seqs {
            Seqs::One(_) => 1,
            Seqs::Many(v) => v.len(),
        };
        let what = InFlight::Records(lane, unit.seqs, unit.stored_bytes);
        let bytes = c.publish(unit.topic, unit.payload, unit.retain, what)?;
        self.pacer.sent(bytes);
        if let Some((adapter, _)) = self.adapt.as_mut() {
            adapter.sent(records, unit.stored_bytes, bytes);
        }
        Ok(true)
    }

    /// The next publish and the lane it comes from: lanes in priority order (round
    /// robin within one), each read ahead until it has a full batch or nothing more;
    /// a lane whose partial batch waits for its linger lets the next one send. High
    /// priority never lingers. `pick`: which lanes may send.
    async fn next_unit(&mut self, pick: Pick) -> Result<Option<(usize, Unit)>, UplinkError> {
        lanes::order(&self.lanes, &mut self.order);
        for k in 0..self.order.len() {
            let i = self.order[k];
            let high = self.lanes[i].priority == Priority::High;
            match pick {
                // Lanes are in priority order: no high one follows.
                Pick::High if !high => break,
                Pick::NotHigh if high => continue,
                _ => {}
            }
            if let Some(r) = self.lanes[i].retry.pop_front() {
                let lane = &self.lanes[i];
                let mut one = std::collections::VecDeque::from([r]);
                if let Some(unit) = self.packer.pack(&lane.name, &mut one, true)? {
                    return Ok(Some((i, unit)));
                }
            }
            let wants = self.packer.wants();
            let degraded = self.degraded.of(self.lanes[i].priority);
            let lane = &mut self.lanes[i];
            while lane.queue.len() < wants && !lane.caught_up {
                lane.fill(&self.store, &self.policies, degraded).await?;
            }
            // Records the broker refused before (this session or an earlier one: some
            // brokers close the connection after refusing) go one per publish.
            if !self.attempts.is_empty() {
                let (id, attempts) = (lane.id, &self.attempts);
                let mut k = 0;
                while k < lane.queue.len() {
                    if attempts.contains_key(&(id, lane.queue[k].seq)) {
                        if let Some(r) = lane.queue.remove(k) {
                            lane.retry.push_back(r);
                        }
                    } else {
                        k += 1;
                    }
                }
                if let Some(r) = lane.retry.pop_front() {
                    let mut one = std::collections::VecDeque::from([r]);
                    if let Some(unit) = self.packer.pack(&lane.name, &mut one, true)? {
                        return Ok(Some((i, unit)));
                    }
                }
            }
            let no_linger = high || self.packer.linger().is_zero();
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

/// The second connection, for high-priority streams, where configured and there
/// are any. Without it they share the first: slower on a lossy link, not broken,
/// so a refusal (say, a broker ACL on the client id) is a warning, not an outage.
async fn connect_priority(cfg: &UpstreamConfig) -> Option<Session> {
    let client_id = format!("{}-hi", cfg.client_id);
    match Session::connect(cfg, &client_id).await {
        Ok(s) => {
            tracing::info!(%client_id, "connected upstream for high priority");
            Some(s)
        }
        Err(e) => {
            tracing::warn!(%client_id, error = %e, "no connection of its own for high priority; it shares the first");
            None
        }
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
