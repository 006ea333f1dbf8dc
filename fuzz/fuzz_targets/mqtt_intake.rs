//! Fuzz the local MQTT endpoint's intake path: protocol sniffing, rumqttc's v4/v5
//! parsers, normalisation, and encoding of the responses a session would send. The
//! first byte sets the read size, so partial packets are exercised too.
#![no_main]

use bytes::BytesMut;
use edgerelay::ingest::mqtt::proto::{encode, Decoder, In, Out, Version};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder as _;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else { return };
    let step = usize::from(first % 64) + 1;
    let mut decoder = Decoder::new(4096);
    let mut buf = BytesMut::new();
    let mut out = BytesMut::new();
    for chunk in rest.chunks(step) {
        buf.extend_from_slice(chunk);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(packet)) => respond(&packet, decoder.version().unwrap_or(Version::V311), &mut out),
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});

fn respond(packet: &In, version: Version, out: &mut BytesMut) {
    let reply = match packet {
        In::Publish(p) => Out::PubAck { pkid: p.pkid, quota_exceeded: false },
        In::Subscribe { pkid, filters } => Out::SubAck {
            pkid: *pkid,
            granted: filters.iter().map(|f| Some(f.qos.min(1))).collect(),
        },
        In::Unsubscribe { pkid, filters } => Out::UnsubAck { pkid: *pkid, count: filters.len() },
        In::PubRel(pkid) => Out::PubComp { pkid: *pkid },
        _ => Out::PingResp,
    };
    let _ = encode(&reply, version, out);
    out.clear();
}
