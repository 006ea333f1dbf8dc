//! One MQTT 3.1.1 session to the central broker, on rumqttc's packet codec.
//!
//! Why not rumqttc's `EventLoop`: the uplink must map every PUBACK to the stored record it
//! confirms, across reconnects. rumqttc assigns packet ids inside its event loop and
//! replays requests still queued in its channel after a reconnect, so an order-based
//! mapping can shift and delete the wrong record. Owning the session also gives the
//! uplink the socket itself (TCP_INFO, TCP_NOTSENT_LOWAT for the link monitor and rate
//! control). See docs/design-decisions.md.
//!
//! Invariants: packet ids are allocated here and never reused while in flight; a
//! session is used by one task; reading and writing are separate halves so a blocked
//! write never stops PUBACKs from being read.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use rumqttc::mqttbytes::v4::{Codec, ConnAck, Connect, ConnectReturnCode, Login, Packet, Publish};
use rumqttc::mqttbytes::QoS;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
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
    #[error("no CONNACK from {addr} within {timeout:?}")]
    ConnectTimeout { addr: String, timeout: Duration },
    #[error("broker {addr} refused the connection: {code:?}")]
    Refused {
        addr: String,
        code: ConnectReturnCode,
    },
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
}

impl From<rumqttc::mqttbytes::Error> for SessionError {
    fn from(e: rumqttc::mqttbytes::Error) -> Self {
        match e {
            rumqttc::mqttbytes::Error::Io(io) => SessionError::Io(io),
            other => SessionError::Protocol(other.to_string()),
        }
    }
}

/// An established session. Fields are public so a `select!` can borrow the read half
/// and the write half (with its output buffer) at the same time.
pub struct Session {
    pub reader: FramedRead<OwnedReadHalf, Codec>,
    pub writer: OwnedWriteHalf,
    /// Encoded packets not yet written to the socket.
    pub out: BytesMut,
    next_pkid: u16,
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
        let (rd, wr) = stream.into_split();
        let mut session = Session {
            reader: FramedRead::new(
                rd,
                Codec {
                    max_incoming_size: MAX_INCOMING,
                    max_outgoing_size: MAX_OUTGOING,
                },
            ),
            writer: wr,
            out: BytesMut::with_capacity(16 * 1024),
            next_pkid: 0,
        };
        let mut connect = Connect::new(client_id);
        connect.keep_alive = u16::try_from(cfg.keep_alive.as_secs()).unwrap_or(u16::MAX);
        // Clean session: unacknowledged records are resent from the store, which is the
        // source of truth; a broker-side session would only add a second copy of them.
        connect.clean_session = true;
        if let Some(user) = &cfg.username {
            connect.login = Some(Login::new(
                user.clone(),
                cfg.password
                    .as_ref()
                    .map(|p| p.expose().to_owned())
                    .unwrap_or_default(),
            ));
        }
        session.queue(&Packet::Connect(connect))?;
        session.writer.write_all_buf(&mut session.out).await?;
        match session.reader.next().await {
            Some(Ok(Packet::ConnAck(ConnAck { code, .. }))) => {
                if code != ConnectReturnCode::Success {
                    return Err(SessionError::Refused {
                        addr: addr.to_owned(),
                        code,
                    });
                }
            }
            Some(Ok(other)) => {
                return Err(SessionError::UnexpectedPacket {
                    addr: addr.to_owned(),
                    got: format!("{other:?}"),
                })
            }
            Some(Err(e)) => return Err(e.into()),
            None => return Err(SessionError::Closed),
        }
        Ok(session)
    }

    /// Encode a packet into the output buffer; written by the owner's write branch.
    pub fn queue(&mut self, packet: &Packet) -> Result<(), SessionError> {
        packet.write(&mut self.out, MAX_OUTGOING)?;
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
        self.queue(&Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain,
            topic,
            pkid,
            payload,
        }))
    }

    /// The local port of the connection: what the link monitor knows it by.
    pub fn local_port(&self) -> u16 {
        self.writer.as_ref().local_addr().map_or(0, |a| a.port())
    }

    /// Write what is buffered, send DISCONNECT and close, giving up after `timeout`.
    pub async fn disconnect(mut self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, async {
            if self.queue(&Packet::Disconnect).is_ok() {
                let _ = self.writer.write_all_buf(&mut self.out).await;
            }
            let _ = self.writer.shutdown().await;
        })
        .await;
    }
}
