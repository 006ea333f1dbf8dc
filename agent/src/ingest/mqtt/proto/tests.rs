use bytes::BytesMut;
use proptest::prelude::*;
use rumqttc::mqttbytes::{v4, QoS};
use rumqttc::v5::mqttbytes::v5;
use tokio_util::codec::Decoder as _;

use super::*;

fn v4_bytes(packets: &[v4::Packet]) -> BytesMut {
    let mut b = BytesMut::new();
    for p in packets {
        p.write(&mut b, usize::MAX).expect("write");
    }
    b
}

fn v5_bytes(packets: &[v5::Packet]) -> BytesMut {
    let mut b = BytesMut::new();
    for p in packets {
        p.write(&mut b, None).expect("write");
    }
    b
}

fn decode_all(d: &mut Decoder, mut b: BytesMut) -> Result<Vec<In>, ProtoError> {
    let mut out = Vec::new();
    while let Some(p) = d.decode(&mut b)? {
        out.push(p);
    }
    Ok(out)
}

/// Feed one byte at a time: partial packets must never be mis-parsed.
fn decode_trickle(d: &mut Decoder, b: &[u8]) -> Result<Vec<In>, ProtoError> {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for byte in b {
        buf.extend_from_slice(&[*byte]);
        while let Some(p) = d.decode(&mut buf)? {
            out.push(p);
        }
    }
    Ok(out)
}

fn v4_connect() -> v4::Packet {
    let mut c = v4::Connect::new("dev-1");
    c.keep_alive = 30;
    c.login = Some(v4::Login::new("u", "p"));
    v4::Packet::Connect(c)
}

#[test]
fn v311_session_packets_normalise() {
    let mut publish = v4::Publish::new("a/b", QoS::AtLeastOnce, b"x".to_vec());
    publish.pkid = 7;
    let input = v4_bytes(&[
        v4_connect(),
        v4::Packet::Publish(publish),
        v4::Packet::Subscribe(v4::Subscribe::new("s/#", QoS::AtLeastOnce)),
        v4::Packet::PubRel(v4::PubRel::new(3)),
        v4::Packet::PingReq,
        v4::Packet::Disconnect,
    ]);
    for packets in [
        decode_all(&mut Decoder::new(1024), input.clone()).expect("decode"),
        decode_trickle(&mut Decoder::new(1024), &input).expect("trickle"),
    ] {
        assert_eq!(packets.len(), 6);
        let In::Connect(c) = &packets[0] else {
            panic!("{packets:?}")
        };
        assert_eq!(
            (c.version, c.client_id.as_str(), c.keep_alive),
            (Version::V311, "dev-1", 30)
        );
        assert_eq!(c.password.as_deref(), Some("p"));
        assert_eq!(
            packets[1],
            In::Publish(InPublish {
                topic: "a/b".into(),
                payload: Bytes::from_static(b"x"),
                qos: 1,
                retain: false,
                dup: false,
                pkid: 7
            })
        );
        assert!(
            matches!(&packets[2], In::Subscribe { filters, .. } if filters[0].filter == "s/#" && filters[0].qos == 1)
        );
        assert_eq!(packets[3], In::PubRel(3));
        assert_eq!(packets[4], In::PingReq);
        assert_eq!(packets[5], In::Disconnect { with_will: false });
    }
}

#[test]
fn v5_session_packets_normalise() {
    let mut connect = v5::Connect {
        keep_alive: 10,
        client_id: "dev-5".into(),
        clean_start: true,
        properties: None,
    };
    connect.properties = Some(v5::ConnectProperties {
        session_expiry_interval: None,
        receive_maximum: Some(5),
        max_packet_size: Some(4096),
        topic_alias_max: None,
        request_response_info: None,
        request_problem_info: None,
        user_properties: vec![],
        authentication_method: None,
        authentication_data: None,
    });
    let mut publish = v5::Publish::new(
        "t/1",
        rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
        b"y".to_vec(),
        None,
    );
    publish.pkid = 9;
    let mut input = v5_bytes(&[
        v5::Packet::Connect(connect, None, None),
        v5::Packet::Publish(publish),
    ]);
    input.extend_from_slice(&[0xE0, 0x00]); // DISCONNECT without reason code
    let packets = decode_trickle(&mut Decoder::new(1024), &input).expect("decode");
    let In::Connect(c) = &packets[0] else {
        panic!("{packets:?}")
    };
    assert_eq!(
        (c.version, c.receive_maximum, c.max_packet_size),
        (Version::V5, Some(5), Some(4096))
    );
    assert!(matches!(&packets[1], In::Publish(p) if p.qos == 2 && p.pkid == 9 && p.topic == "t/1"));
    assert_eq!(packets[2], In::Disconnect { with_will: false });
}

#[test]
fn bad_first_packets_and_protocols() {
    let mut publish = v4::Publish::new("a", QoS::AtMostOnce, b"x".to_vec());
    publish.pkid = 0;
    let err = decode_all(
        &mut Decoder::new(1024),
        v4_bytes(&[v4::Packet::Publish(publish)]),
    )
    .expect_err("not connect");
    assert!(matches!(err, ProtoError::NotConnect(0x30)), "{err}");

    // MQTT 3.1 ("MQIsdp", level 3).
    let mut b = BytesMut::from(
        &[
            0x10u8, 0x0c, 0x00, 0x06, b'M', b'Q', b'I', b's', b'd', b'p', 0x03, 0x02, 0x00, 0x3c,
        ][..],
    );
    let err = Decoder::new(1024).decode(&mut b).expect_err("3.1");
    assert!(
        matches!(err, ProtoError::UnsupportedProtocol { level: 3, .. }),
        "{err}"
    );

    // Level 6 does not exist.
    let mut b = BytesMut::from(
        &[
            0x10u8, 0x0a, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x06, 0x02, 0x00, 0x3c,
        ][..],
    );
    assert!(matches!(
        Decoder::new(1024).decode(&mut b),
        Err(ProtoError::UnsupportedProtocol { level: 6, .. })
    ));
}

#[test]
fn oversize_is_refused_before_the_body_arrives() {
    let mut d = Decoder::new(64);
    decode_all(&mut d, v4_bytes(&[v4_connect()])).expect("connect");
    // Header announcing a 1 MiB publish, without its body.
    let mut b = BytesMut::from(&[0x32u8, 0x80, 0x80, 0x40][..]);
    assert!(matches!(d.decode(&mut b), Err(ProtoError::TooLarge { .. })));
}

#[test]
fn wildcard_topics_and_aliases_are_refused() {
    let mut d = Decoder::new(1024);
    decode_all(&mut d, v4_bytes(&[v4_connect()])).expect("connect");
    let mut p = v4::Publish::new("a/+", QoS::AtLeastOnce, b"x".to_vec());
    p.pkid = 1;
    assert!(matches!(
        decode_all(&mut d, v4_bytes(&[v4::Packet::Publish(p)])),
        Err(ProtoError::TopicInvalid(_))
    ));

    let mut d = Decoder::new(1024);
    let connect = v5::Connect {
        keep_alive: 10,
        client_id: "x".into(),
        clean_start: true,
        properties: None,
    };
    decode_all(
        &mut d,
        v5_bytes(&[v5::Packet::Connect(connect, None, None)]),
    )
    .expect("connect");
    let props = v5::PublishProperties {
        topic_alias: Some(1),
        ..Default::default()
    };
    let mut p = v5::Publish::new(
        "a",
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        b"x".to_vec(),
        Some(props),
    );
    p.pkid = 1;
    assert!(matches!(
        decode_all(&mut d, v5_bytes(&[v5::Packet::Publish(p)])),
        Err(ProtoError::TopicAlias)
    ));
}

#[test]
fn server_packets_round_trip_through_rumqttc() {
    for version in [Version::V311, Version::V5] {
        let outs = [
            Out::ConnAck {
                code: ConnCode::Accepted,
                assigned_client_id: None,
                receive_maximum: 32,
                max_packet_size: 1024,
            },
            Out::PubAck {
                pkid: 1,
                quota_exceeded: false,
            },
            Out::PubRec {
                pkid: 2,
                quota_exceeded: false,
            },
            Out::PubComp { pkid: 3 },
            Out::SubAck {
                pkid: 4,
                granted: vec![Some(1), None],
            },
            Out::UnsubAck { pkid: 5, count: 1 },
            Out::PingResp,
            Out::PubAck {
                pkid: 7,
                quota_exceeded: true,
            },
            Out::PubRec {
                pkid: 8,
                quota_exceeded: true,
            },
            Out::Publish {
                topic: "a/b".into(),
                payload: Bytes::from_static(b"z"),
                qos: 1,
                retain: true,
                pkid: 6,
            },
        ];
        let mut buf = BytesMut::new();
        for o in &outs {
            encode(o, version, &mut buf).expect("encode");
        }
        encode(
            &Out::Disconnect(DisconnectReason::ReceiveMaximumExceeded),
            version,
            &mut buf,
        )
        .expect("encode");
        let outs_len = outs.len() + usize::from(version == Version::V5);
        let mut n = 0;
        match version {
            Version::V311 => {
                while !buf.is_empty() {
                    v4::Packet::read(&mut buf, 1 << 20).expect("rumqttc reads it");
                    n += 1;
                }
            }
            Version::V5 => {
                while !buf.is_empty() {
                    v5::Packet::read(&mut buf, None).expect("rumqttc reads it");
                    n += 1;
                }
            }
        }
        // Every byte belongs to a packet: nothing left over, nothing short.
        assert_eq!(n, outs_len);
    }
}

proptest! {
    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512), v5_first: bool) {
        let mut d = Decoder::new(256);
        let mut prefix = if v5_first {
            v5_bytes(&[v5::Packet::Connect(v5::Connect { keep_alive: 1, client_id: "c".into(), clean_start: true, properties: None }, None, None)])
        } else {
            v4_bytes(&[v4_connect()])
        };
        prefix.extend_from_slice(&bytes);
        let _ = decode_all(&mut d, prefix);
        let _ = decode_all(&mut Decoder::new(256), BytesMut::from(&bytes[..]));
    }
}
