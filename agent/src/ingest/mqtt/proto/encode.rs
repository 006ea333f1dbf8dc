//! Encoding the server's packets (`Out`) for the client's protocol version, with
//! rumqttc's packet writers — except the MQTT 5 DISCONNECT (see below).

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5;

use super::{ConnCode, DisconnectReason, Out, ProtoError, Version};

fn to_qos(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

fn to_qos5(q: u8) -> rumqttc::v5::mqttbytes::QoS {
    use rumqttc::v5::mqttbytes::QoS as Q;
    match q {
        0 => Q::AtMostOnce,
        1 => Q::AtLeastOnce,
        _ => Q::ExactlyOnce,
    }
}

/// Encode `out` for a client speaking `version` into `buf`.
pub fn encode(out: &Out, version: Version, buf: &mut BytesMut) -> Result<(), ProtoError> {
    let err = |e: String| ProtoError::Malformed(format!("cannot encode: {e}"));
    match version {
        Version::V311 => {
            let p = match out {
                Out::ConnAck { code, .. } => v4::Packet::ConnAck(v4::ConnAck::new(
                    match code {
                        ConnCode::Accepted => v4::ConnectReturnCode::Success,
                        ConnCode::UnsupportedProtocol => {
                            v4::ConnectReturnCode::RefusedProtocolVersion
                        }
                        ConnCode::BadClientId => v4::ConnectReturnCode::BadClientId,
                        ConnCode::ServerUnavailable => v4::ConnectReturnCode::ServiceUnavailable,
                        ConnCode::BadCredentials => v4::ConnectReturnCode::BadUserNamePassword,
                        ConnCode::NotAuthorized => v4::ConnectReturnCode::NotAuthorized,
                    },
                    false,
                )),
                Out::PubAck { pkid, .. } => v4::Packet::PubAck(v4::PubAck::new(*pkid)),
                Out::PubRec { pkid, .. } => v4::Packet::PubRec(v4::PubRec::new(*pkid)),
                Out::PubRel { pkid } => v4::Packet::PubRel(v4::PubRel::new(*pkid)),
                Out::PubComp { pkid } => v4::Packet::PubComp(v4::PubComp::new(*pkid)),
                Out::SubAck { pkid, granted } => v4::Packet::SubAck(v4::SubAck::new(
                    *pkid,
                    granted
                        .iter()
                        .map(|g| match g {
                            Some(q) => v4::SubscribeReasonCode::Success(to_qos(*q)),
                            None => v4::SubscribeReasonCode::Failure,
                        })
                        .collect(),
                )),
                Out::UnsubAck { pkid, .. } => v4::Packet::UnsubAck(v4::UnsubAck::new(*pkid)),
                Out::PingResp => v4::Packet::PingResp,
                Out::Publish {
                    topic,
                    payload,
                    qos,
                    retain,
                    pkid,
                } => v4::Packet::Publish(v4::Publish {
                    dup: false,
                    qos: to_qos(*qos),
                    retain: *retain,
                    topic: topic.clone(),
                    pkid: *pkid,
                    payload: payload.clone(),
                }),
                Out::Disconnect(_) => return Ok(()),
            };
            p.write(buf, usize::MAX).map_err(|e| err(e.to_string()))?;
        }
        Version::V5 => {
            let p = match out {
                Out::ConnAck {
                    code,
                    assigned_client_id,
                    receive_maximum,
                    max_packet_size,
                } => {
                    let accepted = *code == ConnCode::Accepted;
                    let props = v5::ConnAckProperties {
                        session_expiry_interval: None,
                        receive_max: accepted.then_some(*receive_maximum),
                        max_qos: None,
                        retain_available: None,
                        max_packet_size: accepted.then_some(*max_packet_size),
                        assigned_client_identifier: assigned_client_id.clone(),
                        topic_alias_max: accepted.then_some(0),
                        reason_string: None,
                        user_properties: Vec::new(),
                        wildcard_subscription_available: None,
                        subscription_identifiers_available: accepted.then_some(0),
                        shared_subscription_available: accepted.then_some(0),
                        server_keep_alive: None,
                        response_information: None,
                        server_reference: None,
                        authentication_method: None,
                        authentication_data: None,
                    };
                    v5::Packet::ConnAck(v5::ConnAck {
                        session_present: false,
                        code: match code {
                            ConnCode::Accepted => v5::ConnectReturnCode::Success,
                            ConnCode::UnsupportedProtocol => {
                                v5::ConnectReturnCode::UnsupportedProtocolVersion
                            }
                            ConnCode::BadClientId => {
                                v5::ConnectReturnCode::ClientIdentifierNotValid
                            }
                            ConnCode::ServerUnavailable => v5::ConnectReturnCode::ServerBusy,
                            ConnCode::BadCredentials => v5::ConnectReturnCode::BadUserNamePassword,
                            ConnCode::NotAuthorized => v5::ConnectReturnCode::NotAuthorized,
                        },
                        properties: Some(props),
                    })
                }
                Out::PubAck {
                    pkid,
                    quota_exceeded,
                } => v5::Packet::PubAck(v5::PubAck {
                    pkid: *pkid,
                    reason: if *quota_exceeded {
                        v5::PubAckReason::QuotaExceeded
                    } else {
                        v5::PubAckReason::Success
                    },
                    properties: None,
                }),
                Out::PubRec {
                    pkid,
                    quota_exceeded,
                } => v5::Packet::PubRec(v5::PubRec {
                    pkid: *pkid,
                    reason: if *quota_exceeded {
                        v5::PubRecReason::QuotaExceeded
                    } else {
                        v5::PubRecReason::Success
                    },
                    properties: None,
                }),
                Out::PubRel { pkid } => v5::Packet::PubRel(v5::PubRel {
                    pkid: *pkid,
                    reason: v5::PubRelReason::Success,
                    properties: None,
                }),
                Out::PubComp { pkid } => v5::Packet::PubComp(v5::PubComp {
                    pkid: *pkid,
                    reason: v5::PubCompReason::Success,
                    properties: None,
                }),
                Out::SubAck { pkid, granted } => v5::Packet::SubAck(v5::SubAck {
                    pkid: *pkid,
                    return_codes: granted
                        .iter()
                        .map(|g| match g {
                            Some(q) => v5::SubscribeReasonCode::Success(to_qos5(*q)),
                            None => v5::SubscribeReasonCode::TopicFilterInvalid,
                        })
                        .collect(),
                    properties: None,
                }),
                Out::UnsubAck { pkid, count } => v5::Packet::UnsubAck(v5::UnsubAck {
                    pkid: *pkid,
                    reasons: vec![v5::UnsubAckReason::Success; *count],
                    properties: None,
                }),
                Out::PingResp => v5::Packet::PingResp(v5::PingResp),
                Out::Publish {
                    topic,
                    payload,
                    qos,
                    retain,
                    pkid,
                } => v5::Packet::Publish(v5::Publish {
                    dup: false,
                    qos: to_qos5(*qos),
                    retain: *retain,
                    topic: Bytes::copy_from_slice(topic.as_bytes()),
                    pkid: *pkid,
                    payload: payload.clone(),
                    properties: None,
                }),
                Out::Disconnect(reason) => {
                    // Written by hand: rumqttc 0.25's v5 DISCONNECT encoder adds an
                    // uncounted byte without properties and, with empty ones, takes a
                    // shortcut that writes a *normal* disconnect and drops the reason.
                    // Reason code and an empty property list: the form every client
                    // parses (rumqttc's reader rejects the shorter reason-only form).
                    buf.extend_from_slice(&[0xE0, 0x02, v5_reason(*reason) as u8, 0x00]);
                    return Ok(());
                }
            };
            p.write(buf, None).map_err(|e| err(e.to_string()))?;
        }
    }
    Ok(())
}

fn v5_reason(reason: DisconnectReason) -> v5::DisconnectReasonCode {
    use v5::DisconnectReasonCode as C;
    match reason {
        DisconnectReason::SessionTakenOver => C::SessionTakenOver,
        DisconnectReason::KeepAliveTimeout => C::KeepAliveTimeout,
        DisconnectReason::PacketTooLarge => C::PacketTooLarge,
        DisconnectReason::ProtocolError => C::ProtocolError,
        DisconnectReason::MalformedPacket => C::MalformedPacket,
        DisconnectReason::ReceiveMaximumExceeded => C::ReceiveMaximumExceeded,
        DisconnectReason::TopicAliasInvalid => C::TopicAliasInvalid,
        DisconnectReason::TopicNameInvalid => C::TopicNameInvalid,
        DisconnectReason::ShuttingDown => C::ServerShuttingDown,
        DisconnectReason::StoreFailed => C::UnspecifiedError,
    }
}
