//! MQTT 3.1.1 and 5.0 packets for the local endpoint, on rumqttc's codecs.
//!
//! rumqttc parses and writes the packets; this module picks the protocol version from
//! the first CONNECT, normalises both versions' packets into one `In` type the session
//! works with, and encodes `Out` for the client's version. Invariants: decoding never
//! panics and never buffers more than `max_packet_size` for one packet (rumqttc checks
//! the announced length before the body arrives); anything a server must not receive,
//! or that we do not support (topic aliases), is an error for that client.

use bytes::{Buf, Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5;

use crate::topic;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V311,
    V5,
}

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("first packet is not CONNECT (type byte {0:#04x})")]
    NotConnect(u8),
    #[error("unsupported protocol {name:?} level {level}")]
    UnsupportedProtocol { name: String, level: u8 },
    #[error("malformed packet: {0}")]
    Malformed(String),
    #[error("packet of {size} bytes exceeds max_packet_size {max}")]
    TooLarge { size: usize, max: usize },
    #[error("invalid topic: {0}")]
    TopicInvalid(String),
    #[error("topic alias used, but this server allows none")]
    TopicAlias,
    #[error("a server does not accept {0}")]
    Unexpected(&'static str),
    #[error("read error: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectInfo {
    pub version: Version,
    pub client_id: String,
    pub clean: bool,
    pub keep_alive: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    pub will: Option<Will>,
    /// MQTT 5: how many QoS 1/2 publishes the client accepts from us at once.
    pub receive_maximum: Option<u16>,
    /// MQTT 5: largest packet the client accepts.
    pub max_packet_size: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InPublish {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub dup: bool,
    pub pkid: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubFilter {
    pub filter: String,
    pub qos: u8,
    pub no_local: bool,
}

/// What a client can send, both versions alike.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum In {
    Connect(ConnectInfo),
    Publish(InPublish),
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    Subscribe { pkid: u16, filters: Vec<SubFilter> },
    Unsubscribe { pkid: u16, filters: Vec<String> },
    PingReq,
    Disconnect { with_will: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnCode {
    Accepted,
    UnsupportedProtocol,
    BadClientId,
    ServerUnavailable,
    BadCredentials,
    NotAuthorized,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisconnectReason {
    SessionTakenOver,
    KeepAliveTimeout,
    PacketTooLarge,
    ProtocolError,
    MalformedPacket,
    ReceiveMaximumExceeded,
    TopicAliasInvalid,
    TopicNameInvalid,
    ShuttingDown,
    /// The message could not be stored (e.g. a failed commit); MQTT 5 reason 0x80.
    StoreFailed,
}

/// What the server sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Out {
    ConnAck {
        code: ConnCode,
        assigned_client_id: Option<String>,
        receive_maximum: u16,
        max_packet_size: u32,
    },
    /// `quota_exceeded`: MQTT 5 negative acknowledgement (not used for 3.1.1).
    PubAck {
        pkid: u16,
        quota_exceeded: bool,
    },
    PubRec {
        pkid: u16,
        quota_exceeded: bool,
    },
    PubRel {
        pkid: u16,
    },
    PubComp {
        pkid: u16,
    },
    /// `None` = refused filter.
    SubAck {
        pkid: u16,
        granted: Vec<Option<u8>>,
    },
    UnsubAck {
        pkid: u16,
        count: usize,
    },
    PingResp,
    Publish {
        topic: String,
        payload: Bytes,
        qos: u8,
        retain: bool,
        pkid: u16,
    },
    /// MQTT 5 only; nothing is written for 3.1.1 (the server just closes).
    Disconnect(DisconnectReason),
}

fn qos(q: QoS) -> u8 {
    q as u8
}

fn qos5(q: rumqttc::v5::mqttbytes::QoS) -> u8 {
    q as u8
}

/// Stream decoder for one client connection.
#[derive(Debug)]
pub struct Decoder {
    version: Option<Version>,
    max: usize,
}

impl Decoder {
    pub fn new(max_packet_size: usize) -> Self {
        Self {
            version: None,
            max: max_packet_size,
        }
    }

    pub fn version(&self) -> Option<Version> {
        self.version
    }

    /// Read the protocol name and level of a CONNECT at the start of `src` without
    /// consuming it. `Ok(None)`: not enough bytes yet.
    fn sniff(&self, src: &[u8]) -> Result<Option<Version>, ProtoError> {
        let Some(&first) = src.first() else {
            return Ok(None);
        };
        if first != 0x10 {
            return Err(ProtoError::NotConnect(first));
        }
        // Remaining length: a 1-4 byte varint.
        let mut len_bytes = 0;
        loop {
            let Some(b) = src.get(1 + len_bytes) else {
                return Ok(None);
            };
            len_bytes += 1;
            if b & 0x80 == 0 {
                break;
            }
            if len_bytes == 4 {
                return Err(ProtoError::Malformed(
                    "remaining length longer than 4 bytes".into(),
                ));
            }
        }
        let at = 1 + len_bytes;
        let (Some(&hi), Some(&lo)) = (src.get(at), src.get(at + 1)) else {
            return Ok(None);
        };
        let name_len = usize::from(u16::from_be_bytes([hi, lo]));
        if name_len > 6 {
            return Err(ProtoError::UnsupportedProtocol {
                name: String::from_utf8_lossy(src.get(at + 2..at + 8).unwrap_or_default())
                    .into_owned(),
                level: 0,
            });
        }
        let Some(&level) = src.get(at + 2 + name_len) else {
            return Ok(None);
        };
        let name = String::from_utf8_lossy(&src[at + 2..at + 2 + name_len]).into_owned();
        match (name.as_str(), level) {
            ("MQTT", 4) => Ok(Some(Version::V311)),
            ("MQTT", 5) => Ok(Some(Version::V5)),
            _ => Err(ProtoError::UnsupportedProtocol { name, level }),
        }
    }
}

impl tokio_util::codec::Decoder for Decoder {
    type Item = In;
    type Error = ProtoError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, ProtoError> {
        let version = match self.version {
            Some(v) => v,
            None => match self.sniff(src)? {
                Some(v) => {
                    self.version = Some(v);
                    v
                }
                None => return Ok(None),
            },
        };
        match version {
            Version::V311 => match v4::Packet::read(src, self.max) {
                Ok(p) => from_v4(p).map(Some),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(n)) => {
                    src.reserve(n.min(self.max));
                    Ok(None)
                }
                Err(rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(size)) => {
                    Err(ProtoError::TooLarge {
                        size,
                        max: self.max,
                    })
                }
                Err(rumqttc::mqttbytes::Error::TopicNotUtf8) => {
                    Err(ProtoError::TopicInvalid("not UTF-8".into()))
                }
                Err(e) => Err(ProtoError::Malformed(e.to_string())),
            },
            Version::V5 => {
                // rumqttc rejects a v5 DISCONNECT without a reason code (remaining length 0),
                // which the spec allows and means "normal disconnection".
                if src.len() >= 2 && src[0] == 0xE0 && src[1] == 0 {
                    src.advance(2);
                    return Ok(Some(In::Disconnect { with_will: false }));
                }
                let max = u32::try_from(self.max).unwrap_or(u32::MAX);
                match v5::Packet::read(src, Some(max)) {
                    Ok(p) => from_v5(p).map(Some),
                    Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(n)) => {
                        src.reserve(n.min(self.max));
                        Ok(None)
                    }
                    Err(rumqttc::v5::mqttbytes::Error::PayloadSizeLimitExceeded {
                        pkt_size,
                        ..
                    }) => Err(ProtoError::TooLarge {
                        size: pkt_size,
                        max: self.max,
                    }),
                    Err(rumqttc::v5::mqttbytes::Error::TopicNotUtf8) => {
                        Err(ProtoError::TopicInvalid("not UTF-8".into()))
                    }
                    Err(e) => Err(ProtoError::Malformed(e.to_string())),
                }
            }
        }
    }
}

fn check_publish_topic(t: &str) -> Result<(), ProtoError> {
    topic::check_name(t).map_err(ProtoError::TopicInvalid)
}

fn from_v4(p: v4::Packet) -> Result<In, ProtoError> {
    Ok(match p {
        v4::Packet::Connect(c) => In::Connect(ConnectInfo {
            version: Version::V311,
            client_id: c.client_id,
            clean: c.clean_session,
            keep_alive: c.keep_alive,
            username: c.login.as_ref().map(|l| l.username.clone()),
            password: c.login.map(|l| l.password),
            will: c.last_will.map(|w| Will {
                topic: w.topic,
                payload: w.message,
                qos: qos(w.qos),
                retain: w.retain,
            }),
            receive_maximum: None,
            max_packet_size: None,
        }),
        v4::Packet::Publish(p) => {
            check_publish_topic(&p.topic)?;
            In::Publish(InPublish {
                topic: p.topic,
                payload: p.payload,
                qos: qos(p.qos),
                retain: p.retain,
                dup: p.dup,
                pkid: p.pkid,
            })
        }
        v4::Packet::PubAck(a) => In::PubAck(a.pkid),
        v4::Packet::PubRec(a) => In::PubRec(a.pkid),
        v4::Packet::PubRel(a) => In::PubRel(a.pkid),
        v4::Packet::PubComp(a) => In::PubComp(a.pkid),
        v4::Packet::Subscribe(s) => In::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| SubFilter {
                    filter: f.path,
                    qos: qos(f.qos),
                    no_local: false,
                })
                .collect(),
        },
        v4::Packet::Unsubscribe(u) => In::Unsubscribe {
            pkid: u.pkid,
            filters: u.topics,
        },
        v4::Packet::PingReq => In::PingReq,
        v4::Packet::Disconnect => In::Disconnect { with_will: false },
        v4::Packet::ConnAck(_) => return Err(ProtoError::Unexpected("CONNACK")),
        v4::Packet::SubAck(_) => return Err(ProtoError::Unexpected("SUBACK")),
        v4::Packet::UnsubAck(_) => return Err(ProtoError::Unexpected("UNSUBACK")),
        v4::Packet::PingResp => return Err(ProtoError::Unexpected("PINGRESP")),
    })
}

fn from_v5(p: v5::Packet) -> Result<In, ProtoError> {
    Ok(match p {
        v5::Packet::Connect(c, will, login) => {
            let will = match will {
                Some(w) => {
                    let topic = String::from_utf8(w.topic.to_vec())
                        .map_err(|_| ProtoError::TopicInvalid("will topic not UTF-8".into()))?;
                    check_publish_topic(&topic)?;
                    Some(Will {
                        topic,
                        payload: w.message,
                        qos: qos5(w.qos),
                        retain: w.retain,
                    })
                }
                None => None,
            };
            In::Connect(ConnectInfo {
                version: Version::V5,
                client_id: c.client_id,
                clean: c.clean_start,
                keep_alive: c.keep_alive,
                username: login.as_ref().map(|l| l.username.clone()),
                password: login.map(|l| l.password),
                will,
                receive_maximum: c.properties.as_ref().and_then(|p| p.receive_maximum),
                max_packet_size: c.properties.as_ref().and_then(|p| p.max_packet_size),
            })
        }
        v5::Packet::Publish(p) => {
            if p.properties
                .as_ref()
                .is_some_and(|pr| pr.topic_alias.is_some())
            {
                return Err(ProtoError::TopicAlias);
            }
            let topic = String::from_utf8(p.topic.to_vec())
                .map_err(|_| ProtoError::TopicInvalid("not UTF-8".into()))?;
            check_publish_topic(&topic)?;
            In::Publish(InPublish {
                topic,
                payload: p.payload,
                qos: qos5(p.qos),
                retain: p.retain,
                dup: p.dup,
                pkid: p.pkid,
            })
        }
        v5::Packet::PubAck(a) => In::PubAck(a.pkid),
        v5::Packet::PubRec(a) => In::PubRec(a.pkid),
        v5::Packet::PubRel(a) => In::PubRel(a.pkid),
        v5::Packet::PubComp(a) => In::PubComp(a.pkid),
        v5::Packet::Subscribe(s) => In::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| SubFilter {
                    filter: f.path,
                    qos: qos5(f.qos),
                    no_local: f.nolocal,
                })
                .collect(),
        },
        v5::Packet::Unsubscribe(u) => In::Unsubscribe {
            pkid: u.pkid,
            filters: u.filters,
        },
        v5::Packet::PingReq(_) => In::PingReq,
        v5::Packet::Disconnect(d) => In::Disconnect {
            with_will: d.reason_code == v5::DisconnectReasonCode::DisconnectWithWillMessage,
        },
        v5::Packet::Auth(_) => {
            return Err(ProtoError::Unexpected(
                "AUTH (enhanced authentication is not supported)",
            ))
        }
        v5::Packet::ConnAck(_) => return Err(ProtoError::Unexpected("CONNACK")),
        v5::Packet::SubAck(_) => return Err(ProtoError::Unexpected("SUBACK")),
        v5::Packet::UnsubAck(_) => return Err(ProtoError::Unexpected("UNSUBACK")),
        v5::Packet::PingResp(_) => return Err(ProtoError::Unexpected("PINGRESP")),
    })
}

mod encode;
pub use encode::encode;

#[cfg(test)]
mod tests;
