//! One local MQTT client connection, from CONNECT to close.
//!
//! Invariants:
//! - A QoS 1 PUBLISH is acknowledged (PUBACK) and a QoS 2 PUBLISH is received (PUBREC)
//!   only after the store committed it, when its topic is relayed upstream.
//! - At most `receive_maximum` QoS 1/2 publishes of a client are unacknowledged: an
//!   MQTT 5 client that sends more is disconnected (0x93); a 3.1.1 client is simply not
//!   read until acknowledgements catch up, so TCP pushes back.
//! - Output to a client that does not read is bounded: past `OUT_HIGH_WATER` buffered
//!   bytes its packets are not read and fan-out to it is not taken (and is dropped by the
//!   router instead).
//! - A QoS 2 message is stored once per packet id, however often the client resends it.
//! - Any protocol violation ends this connection only, with the spec's response.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures::stream::FuturesOrdered;
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use super::proto::{
    self, ConnCode, ConnectInfo, DisconnectReason, In, InPublish, Out, ProtoError, Version,
};
use super::{Shared, Stat};
use crate::ingest::append_waiting_for_space;
use crate::record::{Origin, OriginKind, Record};
use crate::sleep_until_opt;
use crate::store::AppendError;
use crate::topic;

/// Buffered output above which the connection stops reading and taking fan-out.
const OUT_HIGH_WATER: usize = 256 * 1024;
/// QoS 1 deliveries to one local subscriber awaiting its PUBACK, at most.
const MAX_OUT_INFLIGHT: usize = 256;
/// After a shutdown request, wait this long for commits in flight to be acknowledged.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(2);

type Commit = Pin<Box<dyn Future<Output = (u16, u8, Result<u64, AppendError>)> + Send>>;

/// Why the main loop ended.
enum End {
    /// DISCONNECT from the client (`with_will`: MQTT 5 reason 0x04).
    Clean { with_will: bool },
    /// The client went away or broke the protocol (the will is published).
    Abrupt(String),
    /// We close it, telling an MQTT 5 client why.
    Close(DisconnectReason, String),
}

/// A client's bytes: TCP, or TLS over it where `[local_mqtt]` has a certificate.
pub trait ClientIo: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> ClientIo for T {}
type Io = Box<dyn ClientIo>;

/// How long a write to a client (TLS records included) may wait for it to read.
const WRITE_STALL: Duration = Duration::from_secs(30);

/// Write `buf` and flush it (TLS records too), giving up after `WRITE_STALL`.
async fn send_all(wr: &mut WriteHalf<Io>, buf: &[u8]) {
    let _ = tokio::time::timeout(WRITE_STALL, async {
        wr.write_all(buf).await?;
        wr.flush().await
    })
    .await;
}

pub async fn serve(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    cancel: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let io: Io = match &shared.cfg.tls {
        None => Box::new(stream),
        // The handshake counts against connect_timeout, in this connection's own task:
        // a client that stalls it holds only its own slot.
        Some(tls) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.config.clone());
            let handshake = tokio::select! {
                _ = cancel.cancelled() => return,
                r = tokio::time::timeout(shared.cfg.connect_timeout, acceptor.accept(stream)) => r,
            };
            match handshake {
                Ok(Ok(s)) => Box::new(s),
                Ok(Err(e)) => {
                    shared.count(Stat::ProtocolErrors);
                    tracing::warn!(%peer, error = %e, "TLS handshake failed; closing");
                    return;
                }
                Err(_) => {
                    shared.count(Stat::ProtocolErrors);
                    tracing::debug!(%peer, "no TLS handshake in time; closing");
                    return;
                }
            }
        }
    };
    let (rd, mut wr) = tokio::io::split(io);
    let mut frames = FramedRead::new(rd, proto::Decoder::new(shared.cfg.max_packet_size.get()));
    let mut out = BytesMut::with_capacity(1024);

    let first = tokio::select! {
        _ = cancel.cancelled() => return,
        r = tokio::time::timeout(shared.cfg.connect_timeout, frames.next()) => r,
    };
    let connect = match first {
        Err(_) => {
            shared.count(Stat::ProtocolErrors);
            tracing::debug!(%peer, "no CONNECT in time; closing");
            return;
        }
        Ok(None) => return,
        Ok(Some(Ok(In::Connect(c)))) => c,
        Ok(Some(Ok(_))) => return,
        Ok(Some(Err(ProtoError::UnsupportedProtocol { name, level }))) => {
            shared.count(Stat::ProtocolErrors);
            tracing::warn!(%peer, protocol = %name, level, "unsupported MQTT protocol version; refused");
            let _ = proto::encode(
                &connack(ConnCode::UnsupportedProtocol, None, &shared),
                Version::V311,
                &mut out,
            );
            send_all(&mut wr, &out).await;
            return;
        }
        Ok(Some(Err(e))) => {
            shared.count(Stat::ProtocolErrors);
            tracing::warn!(%peer, error = %e, "bad CONNECT; closing");
            return;
        }
    };
    let version = connect.version;
    let Some((client_id, assigned)) = accept_client_id(&connect, &shared) else {
        shared.count(Stat::ProtocolErrors);
        tracing::warn!(%peer, "empty client id with a persistent session; refused");
        let _ = proto::encode(
            &connack(ConnCode::BadClientId, None, &shared),
            version,
            &mut out,
        );
        send_all(&mut wr, &out).await;
        return;
    };
    if let Some(code) = authenticate(&shared, &connect).await {
        shared.count(Stat::AuthFailures);
        tracing::warn!(%peer, client_id = %client_id, user = connect.username.as_deref().unwrap_or(""), "authentication failed");
        let _ = proto::encode(&connack(code, None, &shared), version, &mut out);
        send_all(&mut wr, &out).await;
        return;
    }

    let conn_id = shared.next_conn_id();
    let taken_over = shared.register_client(&client_id, conn_id);
    let deliveries = shared.router.register(conn_id);
    let _ = proto::encode(
        &connack(ConnCode::Accepted, assigned, &shared),
        version,
        &mut out,
    );
    tracing::debug!(%peer, client_id = %client_id, ?version, keep_alive = connect.keep_alive, "client connected");

    let mut conn = Conn {
        shared: shared.clone(),
        version,
        conn_id,
        origin: Origin {
            kind: OriginKind::Mqtt,
            name: Arc::from(client_id.as_str()),
        },
        out,
        inflight_in: 0,
        commits: FuturesOrdered::new(),
        committing_qos2: HashSet::new(),
        awaiting_rel: HashSet::new(),
        inflight_out: HashMap::new(),
        next_pkid: 0,
        // Our own cap too: a subscriber that stops acknowledging holds at most this many
        // deliveries (and their packet ids); the router drops the rest for it.
        client_receive_max: usize::from(connect.receive_maximum.unwrap_or(u16::MAX))
            .min(MAX_OUT_INFLIGHT),
        cancel: cancel.clone(),
    };
    let end = conn
        .run(
            &mut frames,
            &mut wr,
            deliveries,
            &taken_over,
            connect.keep_alive,
        )
        .await;

    let publish_will = !matches!(end, End::Clean { with_will: false });
    match &end {
        End::Clean { .. } => tracing::debug!(client_id = %client_id, "client disconnected"),
        End::Abrupt(why) => {
            tracing::debug!(client_id = %client_id, reason = %why, "connection ended")
        }
        End::Close(reason, why) => {
            if matches!(
                reason,
                DisconnectReason::ShuttingDown | DisconnectReason::SessionTakenOver
            ) {
                tracing::debug!(client_id = %client_id, %peer, reason = %why, "closing client connection");
            } else {
                // A store failure was counted where it happened; the rest is the client's.
                if *reason != DisconnectReason::StoreFailed {
                    shared.count(Stat::ProtocolErrors);
                }
                tracing::warn!(client_id = %client_id, %peer, reason = %why, "closing client connection");
            }
            let _ = proto::encode(&Out::Disconnect(*reason), version, &mut conn.out);
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = wr.write_all(&conn.out).await;
        let _ = wr.flush().await;
        let _ = wr.shutdown().await;
    })
    .await;
    if publish_will {
        if let Some(will) = connect.will {
            conn.publish_will(will).await;
        }
    }
    shared.router.unregister(conn_id);
    shared.unregister_client(&client_id, conn_id);
}

fn connack(code: ConnCode, assigned: Option<String>, shared: &Shared) -> Out {
    Out::ConnAck {
        code,
        assigned_client_id: assigned,
        receive_maximum: shared.cfg.receive_maximum.get(),
        max_packet_size: u32::try_from(shared.cfg.max_packet_size.get()).unwrap_or(u32::MAX),
    }
}

/// The client id to use, and whether we assigned it. `None`: refuse (3.1.1 allows an
/// empty id only with a clean session).
fn accept_client_id(c: &ConnectInfo, shared: &Shared) -> Option<(String, Option<String>)> {
    if !c.client_id.is_empty() {
        return Some((c.client_id.clone(), None));
    }
    if c.version == Version::V311 && !c.clean {
        return None;
    }
    let id = format!("edgerelay-auto-{}", shared.next_conn_id());
    let assigned = (c.version == Version::V5).then(|| id.clone());
    Some((id, assigned))
}

/// `None` when the client may connect, else the refusal.
async fn authenticate(shared: &Shared, c: &ConnectInfo) -> Option<ConnCode> {
    match &shared.auth {
        None => None,
        Some(file) => {
            if c.username.is_none() && shared.cfg.allow_anonymous {
                return None;
            }
            if c.username.is_none() {
                return Some(ConnCode::NotAuthorized);
            }
            let ok = file
                .verify(c.username.as_deref(), c.password.as_deref())
                .await;
            (!ok).then_some(ConnCode::BadCredentials)
        }
    }
}

struct Conn {
    shared: Arc<Shared>,
    version: Version,
    conn_id: u64,
    origin: Origin,
    out: BytesMut,
    /// QoS 1/2 publishes received and not yet PUBACKed / PUBCOMPed.
    inflight_in: usize,
    /// QoS 1/2 publishes in arrival order, each resolving when it may be acknowledged:
    /// acknowledgements go out in the order the publishes came in (MQTT 4.6).
    commits: FuturesOrdered<Commit>,
    committing_qos2: HashSet<u16>,
    awaiting_rel: HashSet<u16>,
    /// QoS 1 deliveries to this client awaiting its PUBACK.
    inflight_out: HashMap<u16, ()>,
    next_pkid: u16,
    client_receive_max: usize,
    cancel: CancellationToken,
}

impl Conn {
    async fn run(
        &mut self,
        frames: &mut FramedRead<ReadHalf<Io>, proto::Decoder>,
        wr: &mut WriteHalf<Io>,
        mut deliveries: tokio::sync::mpsc::Receiver<super::router::Delivery>,
        taken_over: &CancellationToken,
        keep_alive: u16,
    ) -> End {
        let receive_max = usize::from(self.shared.cfg.receive_maximum.get());
        let tls = self.shared.cfg.tls.is_some();
        // MQTT: the server closes after 1.5 x keep-alive without a packet (0 = never).
        let idle_limit =
            (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
        let mut last_rx = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut drain_deadline: Option<tokio::time::Instant> = None;
        loop {
            if drain_deadline.is_some() && self.commits.is_empty() {
                return End::Close(DisconnectReason::ShuttingDown, "agent shutting down".into());
            }
            let can_read = drain_deadline.is_none()
                && self.out.len() < OUT_HIGH_WATER
                && (self.version == Version::V5 || self.inflight_in < receive_max);
            let can_deliver = drain_deadline.is_none()
                && self.out.len() < OUT_HIGH_WATER
                && self.inflight_out.len() < self.client_receive_max;
            tokio::select! {
                biased;
                _ = self.cancel.cancelled(), if drain_deadline.is_none() => {
                    drain_deadline = Some(tokio::time::Instant::now() + SHUTDOWN_DRAIN);
                }
                _ = sleep_until_opt(drain_deadline) => {
                    return End::Close(DisconnectReason::ShuttingDown, "agent shutting down".into());
                }
                _ = taken_over.cancelled() => {
                    return End::Close(DisconnectReason::SessionTakenOver, "another connection took over this client id".into());
                }
                Some((pkid, qos, result)) = self.commits.next(), if !self.commits.is_empty() => {
                    if let Err(end) = self.committed(pkid, qos, result) {
                        return end;
                    }
                }
                written = wr.write_buf(&mut self.out), if !self.out.is_empty() => match written {
                    Ok(0) | Err(_) => return End::Abrupt("write failed".into()),
                    Ok(_) if self.out.is_empty() && tls => {
                        // TLS records may wait above the socket until flushed.
                        match tokio::time::timeout(WRITE_STALL, wr.flush()).await {
                            Ok(Ok(())) => {}
                            _ => return End::Abrupt("the client does not read".into()),
                        }
                    }
                    Ok(_) => {}
                },
                frame = frames.next(), if can_read => {
                    last_rx = Instant::now();
                    match frame {
                        None => return End::Abrupt("client closed the connection".into()),
                        Some(Err(e)) => return protocol_end(e),
                        Some(Ok(packet)) => {
                            if let Err(end) = self.handle(packet, receive_max).await {
                                return end;
                            }
                        }
                    }
                }
                Some(d) = deliveries.recv(), if can_deliver => self.deliver(d),
                _ = tick.tick() => {
                    if let Some(limit) = idle_limit {
                        if last_rx.elapsed() > limit {
                            return End::Close(DisconnectReason::KeepAliveTimeout, format!("no packet for {:?} (keep-alive {keep_alive}s)", last_rx.elapsed()));
                        }
                    }
                }
            }
        }
    }

    fn queue(&mut self, out: Out) {
        if let Err(e) = proto::encode(&out, self.version, &mut self.out) {
            tracing::error!(error = %e, "cannot encode a packet for a local client");
        }
    }

    async fn handle(&mut self, packet: In, receive_max: usize) -> Result<(), End> {
        match packet {
            In::Publish(p) => self.publish(p, receive_max).await?,
            In::PubAck(pkid) => {
                self.inflight_out.remove(&pkid);
            }
            In::PubRel(pkid) => {
                if self.awaiting_rel.remove(&pkid) {
                    self.inflight_in = self.inflight_in.saturating_sub(1);
                }
                // Answer even for an unknown id: the client may be resending after our
                // PUBCOMP was lost.
                self.queue(Out::PubComp { pkid });
            }
            // We deliver at QoS 0/1 only, so these answer nothing of ours.
            In::PubRec(_) | In::PubComp(_) => {}
            In::Subscribe { pkid, filters } => {
                let mut granted = Vec::with_capacity(filters.len());
                let mut ok = Vec::with_capacity(filters.len());
                for mut f in filters {
                    if topic::check_filter(&f.filter).is_ok() && f.qos <= 2 {
                        f.qos = f.qos.min(1);
                        granted.push(Some(f.qos));
                        ok.push(f);
                    } else {
                        granted.push(None);
                    }
                }
                self.shared.router.subscribe(self.conn_id, &ok);
                self.queue(Out::SubAck { pkid, granted });
            }
            In::Unsubscribe { pkid, filters } => {
                self.shared.router.unsubscribe(self.conn_id, &filters);
                self.queue(Out::UnsubAck {
                    pkid,
                    count: filters.len(),
                });
            }
            In::PingReq => self.queue(Out::PingResp),
            In::Disconnect { with_will } => return Err(End::Clean { with_will }),
            In::Connect(_) => {
                return Err(End::Close(
                    DisconnectReason::ProtocolError,
                    "second CONNECT".into(),
                ))
            }
        }
        Ok(())
    }

    async fn publish(&mut self, p: InPublish, receive_max: usize) -> Result<(), End> {
        self.shared.count(Stat::PublishesReceived);
        if p.qos > 2 {
            return Err(End::Close(
                DisconnectReason::MalformedPacket,
                "QoS 3".into(),
            ));
        }
        if p.qos == 2
            && (self.awaiting_rel.contains(&p.pkid) || self.committing_qos2.contains(&p.pkid))
        {
            // A resend of a QoS 2 message we already have: never store it twice.
            if self.awaiting_rel.contains(&p.pkid) {
                self.queue(Out::PubRec {
                    pkid: p.pkid,
                    quota_exceeded: false,
                });
            }
            return Ok(());
        }
        if p.qos > 0 {
            self.inflight_in += 1;
            if self.inflight_in > receive_max {
                return Err(End::Close(
                    DisconnectReason::ReceiveMaximumExceeded,
                    format!("more than {receive_max} unacknowledged publishes"),
                ));
            }
        }
        self.shared
            .router
            .publish(self.conn_id, &p.topic, &p.payload, p.qos);
        let relayed = topic::matches_any(&p.topic, &self.shared.cfg.topics);
        if !relayed {
            if p.qos > 0 {
                // Local only: nothing to commit, but acknowledged in turn.
                let (pkid, qos) = (p.pkid, p.qos);
                if qos == 2 {
                    self.committing_qos2.insert(pkid);
                }
                self.commits
                    .push_back(Box::pin(async move { (pkid, qos, Ok(0)) }));
            }
            return Ok(());
        }
        let record = Record {
            topic: p.topic,
            payload: p.payload,
            qos: p.qos,
            retain: p.retain,
            origin: self.origin.clone(),
            ts_ms: crate::record::now_ms(),
        };
        let stream = self.shared.routes.stream(&record.topic);
        if p.qos == 0 {
            // At most once: stored (so it is relayed) but never waited for.
            if let Err(e) = self.shared.store.submit(stream, record).await {
                tracing::debug!(error = %e, "QoS 0 publish dropped");
            }
            return Ok(());
        }
        if p.qos == 2 {
            self.committing_qos2.insert(p.pkid);
        }
        let (pkid, qos) = (p.pkid, p.qos);
        let store = self.shared.store.clone();
        let commit: Commit = match self.version {
            // MQTT 5 can say "quota exceeded": one attempt, and the answer goes back.
            Version::V5 => Box::pin(async move { (pkid, qos, store.append(stream, record).await) }),
            // 3.1.1 has no negative acknowledgement: wait for space (the client's
            // in-flight window fills and it stops sending).
            Version::V311 => {
                let cancel = self.cancel.clone();
                Box::pin(async move {
                    (
                        pkid,
                        qos,
                        append_waiting_for_space(
                            &store,
                            stream,
                            record,
                            &cancel,
                            "local MQTT client",
                        )
                        .await,
                    )
                })
            }
        };
        self.commits.push_back(commit);
        Ok(())
    }

    fn acknowledge_local(&mut self, pkid: u16, qos: u8) {
        match qos {
            1 => {
                self.inflight_in = self.inflight_in.saturating_sub(1);
                self.queue(Out::PubAck {
                    pkid,
                    quota_exceeded: false,
                });
            }
            2 => {
                self.awaiting_rel.insert(pkid);
                self.queue(Out::PubRec {
                    pkid,
                    quota_exceeded: false,
                });
            }
            _ => {}
        }
    }

    fn committed(
        &mut self,
        pkid: u16,
        qos: u8,
        result: Result<u64, AppendError>,
    ) -> Result<(), End> {
        if qos == 2 {
            self.committing_qos2.remove(&pkid);
        }
        match result {
            Ok(_) => {
                self.shared.count(Stat::Acknowledged);
                self.acknowledge_local(pkid, qos);
                Ok(())
            }
            Err(AppendError::Full | AppendError::TooLarge { .. })
                if self.version == Version::V5 =>
            {
                self.shared.count(Stat::RejectedFull);
                self.inflight_in = self.inflight_in.saturating_sub(1);
                let out = if qos == 2 {
                    Out::PubRec {
                        pkid,
                        quota_exceeded: true,
                    }
                } else {
                    Out::PubAck {
                        pkid,
                        quota_exceeded: true,
                    }
                };
                self.queue(out);
                Ok(())
            }
            Err(e) => {
                self.shared.count(Stat::RejectedFull);
                Err(End::Close(
                    DisconnectReason::StoreFailed,
                    format!("cannot store the message: {e}"),
                ))
            }
        }
    }

    fn deliver(&mut self, d: super::router::Delivery) {
        let pkid = if d.qos > 0 {
            let mut id = self.next_pkid;
            loop {
                id = id.wrapping_add(1).max(1);
                if !self.inflight_out.contains_key(&id) {
                    break;
                }
            }
            self.next_pkid = id;
            self.inflight_out.insert(id, ());
            id
        } else {
            0
        };
        self.queue(Out::Publish {
            topic: d.topic,
            payload: d.payload,
            qos: d.qos,
            retain: d.retain,
            pkid,
        });
    }

    async fn publish_will(&mut self, will: proto::Will) {
        tracing::debug!(topic = %will.topic, "publishing will message");
        self.shared
            .router
            .publish(self.conn_id, &will.topic, &will.payload, will.qos);
        if topic::matches_any(&will.topic, &self.shared.cfg.topics) {
            let record = Record {
                topic: will.topic,
                payload: will.payload,
                qos: will.qos,
                retain: will.retain,
                origin: self.origin.clone(),
                ts_ms: crate::record::now_ms(),
            };
            let stream = self.shared.routes.stream(&record.topic);
            if let Err(e) = self.shared.store.append(stream, record).await {
                tracing::warn!(error = %e, "will message not stored");
            }
        }
    }
}

fn protocol_end(e: ProtoError) -> End {
    let reason = match &e {
        ProtoError::TooLarge { .. } => DisconnectReason::PacketTooLarge,
        ProtoError::TopicInvalid(_) => DisconnectReason::TopicNameInvalid,
        ProtoError::TopicAlias => DisconnectReason::TopicAliasInvalid,
        ProtoError::Unexpected(_) => DisconnectReason::ProtocolError,
        ProtoError::Io(_) => return End::Abrupt(e.to_string()),
        _ => DisconnectReason::MalformedPacket,
    };
    End::Close(reason, e.to_string())
}
