//! One MQTT session to the central broker — MQTT 5 by default, 3.1.1 where configured —
//! on rumqttc's packet codecs.
//!
//! Why not rumqttc's `EventLoop`: the uplink must map every PUBACK to the stored record it
//! confirms, across reconnects. rumqttc assigns packet ids inside its event loop and
//! replays requests still queued in its channel after a reconnect, so an order-based
//! mapping can shift and delete the wrong record. Owning the session also gives the
//! uplink the socket itself (TCP_INFO, TCP_NOTSENT_LOWAT for the link monitor and rate
//! control). See docs/design-decisions.md.
//!
//! Why MQTT 5: a 3.1.1 PUBACK cannot say no. A broker refusing a publish (too large,
//! not authorised, quota) acknowledges it all the same — mosquitto's
//! `message_size_limit` drops the message and PUBACKs it — so the agent would delete
//! records that never arrived. MQTT 5's PUBACK carries a reason code (≥ 0x80: refused)
//! and its CONNACK the broker's maximum packet size, which the uplink honours.
//!
//! Invariants: packet ids are allocated here and never reused while in flight; a
//! session is used by one task; reading and writing are separate halves so a blocked
//! write never stops PUBACKs from being read; what the broker sends reaches the uplink
//! as `Incoming`, the same for both protocol versions.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use rumqttc::mqttbytes::v4;
use rumqttc::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_util::codec::FramedRead;

use crate::config::UpstreamConfig;

/// Largest packet accepted from the broker (we only expect acks and pings).
const MAX_INCOMING: usize = 1 << 20;
/// Unsent bytes the kernel may hold for the upstream socket before it stops reporting
/// it writable.
const NOTSENT_LOWAT: u32 = 8 << 10;
/// MQTT's own limit for an outgoing packet.
const MAX_OUTGOING: usize = 268_435_455;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS with {addr}: {source}")]
    Tls {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no CONNACK from {addr} within {timeout:?}")]
    ConnectTimeout { addr: String, timeout: Duration },
    #[error("broker {addr} refused the connection: {code}")]
    Refused { addr: String, code: String },
    #[error("broker {addr} sent {got} instead of CONNACK")]
    UnexpectedPacket { addr: String, got: String },
    #[error("broker closed the connection")]
    Closed,
    #[error("protocol error from broker: {0}")]
    Protocol(String),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("no packet from the broker for {0:?} (keep-alive expired)")]
    KeepAliveTimeout(Duration),
    #[error("the broker disconnected: {0}")]
    Disconnected(String),
}

impl From<rumqttc::mqttbytes::Error> for SessionError {
    fn from(e: rumqttc::mqttbytes::Error) -> Self {
        match e {
            rumqttc::mqttbytes::Error::Io(io) => SessionError::Io(io),
            other => SessionError::Protocol(other.to_string()),
        }
    }
}

impl From<rumqttc::v5::mqttbytes::Error> for SessionError {
    fn from(e: rumqttc::v5::mqttbytes::Error) -> Self {
        SessionError::Protocol(e.to_string())
    }
}

pub use crate::config::MqttVersion as Protocol;

/// The broker refused a publish (MQTT 5 PUBACK reason code ≥ 0x80).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: u8,
    /// The reason code's name, and the broker's reason string if it sent one.
    pub reason: String,
}

/// What the broker sends that the uplink acts on, whatever the protocol version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A PUBACK; `refused` when its reason code says the broker did not take it.
    PubAck {
        pkid: u16,
        refused: Option<Refusal>,
    },
    PingResp,
    /// MQTT 5 DISCONNECT from the broker, with its reason.
    Disconnect(String),
    /// Anything else (ignored, logged at debug).
    Other(String),
}

/// The read half, decoding the session's protocol version.
pub enum Reader {
    V4(FramedRead<ReadHalf<Stream>, v4::Codec>),
    V5(FramedRead<ReadHalf<Stream>, Codec5>),
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Reader::V4(_) => "Reader(3.1.1)",
            Reader::V5(_) => "Reader(5)",
        })
    }
}

impl Reader {
    /// The next packet; None when the broker closed the connection.
    pub async fn next(&mut self) -> Option<Result<Incoming, SessionError>> {
        match self {
            Reader::V4(r) => Some(match r.next().await? {
                Ok(v4::Packet::PubAck(a)) => Ok(Incoming::PubAck {
                    pkid: a.pkid,
                    refused: None,
                }),
                Ok(v4::Packet::PingResp) => Ok(Incoming::PingResp),
                Ok(other) => Ok(Incoming::Other(format!("{other:?}"))),
                Err(e) => Err(e.into()),
            }),
            Reader::V5(r) => Some(match r.next().await? {
                Ok(Packet5::Incoming(i)) => Ok(i),
                Ok(Packet5::ConnAck(ack)) => Ok(Incoming::Other(format!("{ack:?}"))),
                Err(e) => Err(e),
            }),
        }
    }
}

/// What the MQTT 5 decoder yields.
#[derive(Debug)]
pub enum Packet5 {
    Incoming(Incoming),
    ConnAck(v5::ConnAck),
}

/// MQTT 5 packets from the broker: rumqttc's codec, except PUBACKs, decoded here —
/// rumqttc refuses reason codes outside the standard's PUBACK list, and mosquitto
/// answers an over-size publish with 0x95 (packet too large) in its PUBACK: decoded by
/// rumqttc, that refusal would end the session, and the next would send it again.
#[derive(Debug)]
pub struct Codec5 {
    inner: v5::Codec,
}

impl tokio_util::codec::Decoder for Codec5 {
    type Item = Packet5;
    type Error = SessionError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Packet5>, SessionError> {
        if src.first() == Some(&0x40) {
            return decode_puback5(src);
        }
        Ok(
            tokio_util::codec::Decoder::decode(&mut self.inner, src)?.map(|p| match p {
                v5::Packet::ConnAck(ack) => Packet5::ConnAck(ack),
                v5::Packet::PingResp(_) => Packet5::Incoming(Incoming::PingResp),
                v5::Packet::Disconnect(d) => Packet5::Incoming(Incoming::Disconnect(format!(
                    "{:?}{}",
                    d.reason_code,
                    d.properties
                        .and_then(|p| p.reason_string)
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default()
                ))),
                other => Packet5::Incoming(Incoming::Other(format!("{other:?}"))),
            }),
        )
    }
}

/// A variable byte integer at the start of `b`: (value, bytes it took); None: more
/// bytes needed; Err: malformed.
fn varint(b: &[u8]) -> Result<Option<(usize, usize)>, SessionError> {
    let mut value = 0usize;
    for (i, byte) in b.iter().enumerate().take(4) {
        value |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    if b.len() >= 4 {
        return Err(SessionError::Protocol("malformed remaining length".into()));
    }
    Ok(None)
}

/// An MQTT 5 PUBACK (first byte 0x40) at the start of `src`, any reason code.
fn decode_puback5(src: &mut BytesMut) -> Result<Option<Packet5>, SessionError> {
    let Some((len, n)) = varint(&src[1..])? else {
        return Ok(None);
    };
    let total = 1 + n + len;
    if src.len() < total {
        src.reserve(total - src.len());
        return Ok(None);
    }
    let packet = src.split_to(total);
    let body = &packet[1 + n..];
    if body.len() < 2 {
        return Err(SessionError::Protocol(
            "PUBACK shorter than its packet id".into(),
        ));
    }
    let pkid = u16::from_be_bytes([body[0], body[1]]);
    let code = body.get(2).copied().unwrap_or(0);
    // Properties: only the reason string (0x1F) is of use; anything before it ends
    // the search.
    let mut reason_string = None;
    if body.len() > 3 {
        if let Some((plen, pn)) = varint(&body[3..])? {
            let props = body.get(3 + pn..3 + pn + plen).unwrap_or(&[]);
            if props.first() == Some(&0x1f) && props.len() >= 3 {
                let l = usize::from(u16::from_be_bytes([props[1], props[2]]));
                reason_string = props
                    .get(3..3 + l)
                    .map(|s| String::from_utf8_lossy(s).into_owned());
            }
        }
    }
    let refused = (code >= 0x80).then(|| Refusal {
        code,
        reason: format!(
            "{} (0x{code:02x}){}",
            reason_name(code),
            reason_string.map(|r| format!(": {r}")).unwrap_or_default()
        ),
    });
    Ok(Some(Packet5::Incoming(Incoming::PubAck { pkid, refused })))
}

/// MQTT 5 reason codes a broker may put in a PUBACK (0x95 is not in the standard's
/// list for PUBACK, but mosquitto sends it).
fn reason_name(code: u8) -> &'static str {
    match code {
        0x80 => "unspecified error",
        0x83 => "implementation specific error",
        0x87 => "not authorized",
        0x90 => "topic name invalid",
        0x91 => "packet identifier in use",
        0x95 => "packet too large",
        0x97 => "quota exceeded",
        0x99 => "payload format invalid",
        _ => "refused",
    }
}

/// The connection's bytes: plain TCP, or TLS over it (`mqtts://`).
#[derive(Debug)]
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The write half of a session's stream, with the socket beneath it for TCP_INFO and
/// the send-queue ioctls (a duplicate descriptor of the same socket).
///
/// Why `unflushed`: TLS encrypts a write into records that may not all reach the
/// socket when it is full; they wait in rustls until the next write or a flush. The
/// uplink writes only while it has bytes queued, so without a flush the tail of its
/// last publish could wait for the next keep-alive. `unflushed` says a flush is owed.
#[derive(Debug)]
pub struct Writer {
    half: WriteHalf<Stream>,
    socket: OwnedFd,
    tls: bool,
    unflushed: bool,
}

impl Writer {
    /// Whether bytes written may still wait above the socket (TLS records).
    pub fn unflushed(&self) -> bool {
        self.unflushed
    }
}

impl AsFd for Writer {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

impl AsyncWrite for Writer {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.half).poll_write(cx, buf);
        if this.tls && matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.unflushed = true;
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.half).poll_flush(cx);
        if matches!(r, Poll::Ready(Ok(()))) {
            this.unflushed = false;
        }
        r
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().half).poll_shutdown(cx)
    }
}

/// An established session. Fields are public so a `select!` can borrow the read half
/// and the write half (with its output buffer) at the same time.
pub struct Session {
    pub reader: Reader,
    pub writer: Writer,
    /// Encoded packets not yet written to the socket.
    pub out: BytesMut,
    next_pkid: u16,
    protocol: Protocol,
    /// The largest packet the broker takes (MQTT 5 CONNACK; None: no limit said).
    max_packet: Option<u32>,
    local_port: u16,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("pending_out", &self.out.len())
            .finish_non_exhaustive()
    }
}

/// Ask for congestion control `name` on the upstream socket; say once per process what
/// the connections run (and why, when it is not what was asked for).
fn choose_congestion(stream: &TcpStream, name: &str) {
    static SAID: std::sync::Once = std::sync::Once::new();
    let asked = crate::link::sys::set_congestion(stream, name);
    let running = crate::link::sys::congestion(stream).unwrap_or_else(|_| "unknown".into());
    SAID.call_once(|| match asked {
        Ok(()) => tracing::info!(congestion = %running, "upstream congestion control"),
        Err(e) => tracing::warn!(
            asked = name,
            congestion = %running,
            error = %e,
            "upstream congestion control not available; the system's is used (on a lossy link BBR carries far more: modprobe tcp_bbr, or give the agent CAP_NET_ADMIN)"
        ),
    });
}

impl Session {
    /// TCP connect, CONNECT as `client_id`, and wait for a successful CONNACK, within
    /// `connect_timeout`.
    pub async fn connect(cfg: &UpstreamConfig, client_id: &str) -> Result<Session, SessionError> {
        let addr = format!("{}:{}", cfg.host, cfg.port);
        match tokio::time::timeout(cfg.connect_timeout, Self::handshake(cfg, client_id, &addr))
            .await
        {
            Ok(r) => r,
            Err(_) => Err(SessionError::ConnectTimeout {
                addr,
                timeout: cfg.connect_timeout,
            }),
        }
    }

    async fn handshake(
        cfg: &UpstreamConfig,
        client_id: &str,
        addr: &str,
    ) -> Result<Session, SessionError> {
        let stream = TcpStream::connect((cfg.host.as_str(), cfg.port))
            .await
            .map_err(|source| SessionError::Connect {
                addr: addr.to_owned(),
                source,
            })?;
        stream.set_nodelay(true)?;
        if let Some(name) = &cfg.congestion {
            choose_congestion(&stream, name);
        }
        // Keep the kernel's unsent queue shallow: what waits, waits in the agent, where
        // the next publish is chosen. Not fatal where unsupported.
        if let Err(e) = crate::link::sys::set_notsent_lowat(&stream, NOTSENT_LOWAT) {
            tracing::debug!(error = %e, "TCP_NOTSENT_LOWAT not set");
        }
        let socket = stream.as_fd().try_clone_to_owned()?;
        let local_port = stream.local_addr().map_or(0, |a| a.port());
        let stream = match &cfg.tls {
            None => Stream::Plain(stream),
            Some(tls) => {
                let name = tokio_rustls::rustls::pki_types::ServerName::try_from(cfg.host.clone())
                    .map_err(|e| SessionError::Tls {
                        addr: addr.to_owned(),
                        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
                    })?;
                let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
                let s =
                    connector
                        .connect(name, stream)
                        .await
                        .map_err(|source| SessionError::Tls {
                            addr: addr.to_owned(),
                            source,
                        })?;
                Stream::Tls(Box::new(s))
            }
        };
        let tls = matches!(stream, Stream::Tls(_));
        let (rd, wr) = tokio::io::split(stream);
        let wr = Writer {
            half: wr,
            socket,
            tls,
            unflushed: false,
        };
        let keep_alive = u16::try_from(cfg.keep_alive.as_secs()).unwrap_or(u16::MAX);
        let reader = match cfg.protocol {
            Protocol::V311 => Reader::V4(FramedRead::new(
                rd,
                v4::Codec {
                    max_incoming_size: MAX_INCOMING,
                    max_outgoing_size: MAX_OUTGOING,
                },
            )),
            Protocol::V5 => Reader::V5(FramedRead::new(
                rd,
                Codec5 {
                    inner: v5::Codec {
                        max_incoming_size: Some(MAX_INCOMING as u32),
                        max_outgoing_size: None,
                    },
                },
            )),
        };
        let mut session = Session {
            reader,
            writer: wr,
            out: BytesMut::with_capacity(16 * 1024),
            next_pkid: 0,
            protocol: cfg.protocol,
            max_packet: None,
            local_port,
        };
        let password = cfg
            .password
            .as_ref()
            .map(|p| p.expose().to_owned())
            .unwrap_or_default();
        // Clean session: unacknowledged records are resent from the store, which is the
        // source of truth; a broker-side session would only add a second copy of them.
        match cfg.protocol {
            Protocol::V311 => {
                let mut connect = v4::Connect::new(client_id);
                connect.keep_alive = keep_alive;
                connect.clean_session = true;
                connect.login = cfg
                    .username
                    .as_ref()
                    .map(|user| v4::Login::new(user.clone(), password));
                v4::Packet::Connect(connect).write(&mut session.out, MAX_OUTGOING)?;
            }
            Protocol::V5 => {
                let connect = v5::Connect {
                    keep_alive,
                    client_id: client_id.to_owned(),
                    clean_start: true,
                    properties: Some(v5::ConnectProperties {
                        max_packet_size: Some(MAX_INCOMING as u32),
                        ..Default::default()
                    }),
                };
                let login = cfg
                    .username
                    .as_ref()
                    .map(|user| v5::Login::new(user.clone(), password));
                v5::Packet::Connect(connect, None, login).write(&mut session.out, None)?;
            }
        }
        session.writer.write_all_buf(&mut session.out).await?;
        session.writer.flush().await?;
        session.await_connack(addr).await?;
        Ok(session)
    }

    async fn await_connack(&mut self, addr: &str) -> Result<(), SessionError> {
        let unexpected = |got: String| SessionError::UnexpectedPacket {
            addr: addr.to_owned(),
            got,
        };
        match &mut self.reader {
            Reader::V4(r) => match r.next().await {
                Some(Ok(v4::Packet::ConnAck(v4::ConnAck { code, .. }))) => {
                    if code != v4::ConnectReturnCode::Success {
                        return Err(SessionError::Refused {
                            addr: addr.to_owned(),
                            code: format!("{code:?}"),
                        });
                    }
                }
                Some(Ok(other)) => return Err(unexpected(format!("{other:?}"))),
                Some(Err(e)) => return Err(e.into()),
                None => return Err(SessionError::Closed),
            },
            Reader::V5(r) => match r.next().await {
                Some(Ok(Packet5::ConnAck(ack))) => {
                    if ack.code != v5::ConnectReturnCode::Success {
                        return Err(SessionError::Refused {
                            addr: addr.to_owned(),
                            code: format!("{:?}", ack.code),
                        });
                    }
                    self.max_packet = ack.properties.and_then(|p| p.max_packet_size);
                }
                Some(Ok(other)) => return Err(unexpected(format!("{other:?}"))),
                Some(Err(e)) => return Err(e),
                None => return Err(SessionError::Closed),
            },
        }
        Ok(())
    }

    /// The largest packet the broker said it takes (MQTT 5; None: no limit said).
    pub fn max_packet(&self) -> Option<u32> {
        self.max_packet
    }

    /// The bytes a QoS 1 publish of `payload_len` on `topic` takes on the wire, at most
    /// (what the broker's maximum packet size is compared with).
    pub fn publish_size(&self, topic: &str, payload_len: usize) -> usize {
        // Fixed header (≤ 5), topic length + topic, packet id, and in MQTT 5 the
        // properties length (1: none).
        5 + 2 + topic.len() + 2 + usize::from(self.protocol == Protocol::V5) + payload_len
    }

    /// Queue a PINGREQ.
    pub fn queue_ping(&mut self) -> Result<(), SessionError> {
        match self.protocol {
            Protocol::V311 => {
                v4::Packet::PingReq.write(&mut self.out, MAX_OUTGOING)?;
            }
            Protocol::V5 => {
                v5::Packet::PingReq(v5::PingReq).write(&mut self.out, None)?;
            }
        }
        Ok(())
    }

    /// Next packet id that is not in flight (`in_use` tells).
    pub fn alloc_pkid(&mut self, in_use: impl Fn(u16) -> bool) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.wrapping_add(1);
            if self.next_pkid == 0 {
                self.next_pkid = 1;
            }
            if !in_use(self.next_pkid) {
                return self.next_pkid;
            }
        }
    }

    /// Encode a QoS 1 publish.
    pub fn queue_publish(
        &mut self,
        topic: String,
        payload: Bytes,
        retain: bool,
        pkid: u16,
    ) -> Result<(), SessionError> {
        match self.protocol {
            Protocol::V311 => {
                v4::Packet::Publish(v4::Publish {
                    dup: false,
                    qos: QoS::AtLeastOnce,
                    retain,
                    topic,
                    pkid,
                    payload,
                })
                .write(&mut self.out, MAX_OUTGOING)?;
            }
            Protocol::V5 => {
                let mut p = v5::Publish::new(
                    topic,
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    payload,
                    None,
                );
                p.retain = retain;
                p.pkid = pkid;
                v5::Packet::Publish(p).write(&mut self.out, None)?;
            }
        }
        Ok(())
    }

    /// The local port of the connection: what the link monitor knows it by.
    pub fn local_port(&self) -> u16 {
        self.local_port
    }

    /// Write what is buffered, send DISCONNECT and close, giving up after `timeout`.
    pub async fn disconnect(mut self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, async {
            let queued = match self.protocol {
                Protocol::V311 => v4::Packet::Disconnect
                    .write(&mut self.out, MAX_OUTGOING)
                    .is_ok(),
                Protocol::V5 => v5::Packet::Disconnect(v5::Disconnect::new(
                    v5::DisconnectReasonCode::NormalDisconnection,
                ))
                .write(&mut self.out, None)
                .is_ok(),
            };
            if queued {
                let _ = self.writer.write_all_buf(&mut self.out).await;
                let _ = self.writer.flush().await;
            }
            let _ = self.writer.shutdown().await;
        })
        .await;
    }
}
