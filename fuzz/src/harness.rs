//! The fuzz targets' bodies, shared by cargo-fuzz (fuzz/fuzz_targets) and the ordinary
//! test that replays every committed input (tests/tests/fuzz_regressions.rs), so a
//! past crasher is checked by `cargo test` on every run, without nightly.
//!
//! Invariant: each function takes untrusted bytes and must return without panicking,
//! whatever they are; the checks it makes beyond "no panic" are noted on it.

use bytes::BytesMut;
use edgerelay::ingest::mqtt::proto::{encode, Decoder, In, Out, Version};
use tokio_util::codec::Decoder as _;

/// A fuzz target's body.
pub type Target = fn(&[u8]);

/// The targets, by the name of their corpus directory.
pub const TARGETS: &[(&str, Target)] = &[
    ("mqtt_intake", mqtt_intake),
    ("socket_framing", socket_framing),
    ("batch_decode", batch_decode),
    ("config_load", config_load),
];

/// The local MQTT endpoint's intake path: protocol sniffing, rumqttc's v4/v5 parsers,
/// normalisation, and encoding of the responses a session would send. The first byte
/// sets the read size, so partial packets are exercised too.
pub fn mqtt_intake(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let step = usize::from(first % 64) + 1;
    let mut decoder = Decoder::new(4096);
    let mut buf = BytesMut::new();
    let mut out = BytesMut::new();
    for chunk in rest.chunks(step) {
        buf.extend_from_slice(chunk);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(packet)) => respond(
                    &packet,
                    decoder.version().unwrap_or(Version::V311),
                    &mut out,
                ),
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
}

fn respond(packet: &In, version: Version, out: &mut BytesMut) {
    let reply = match packet {
        In::Publish(p) => Out::PubAck {
            pkid: p.pkid,
            quota_exceeded: false,
        },
        In::Subscribe { pkid, filters } => Out::SubAck {
            pkid: *pkid,
            granted: filters.iter().map(|f| Some(f.qos.min(1))).collect(),
        },
        In::Unsubscribe { pkid, filters } => Out::UnsubAck {
            pkid: *pkid,
            count: filters.len(),
        },
        In::PubRel(pkid) => Out::PubComp { pkid: *pkid },
        _ => Out::PingResp,
    };
    let _ = encode(&reply, version, out);
    out.clear();
}

/// Stream socket framing (lines and 4-byte length prefix), fed in pieces whose size
/// the first byte sets, then closed. Checked: no frame is longer than the limit (the
/// decoder's invariant: an oversize frame is an error, never buffered whole).
pub fn socket_framing(data: &[u8]) {
    use edgerelay::config::Framing;
    use edgerelay::ingest::framing::FrameDecoder;
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let step = usize::from(first % 32) + 1;
    let max = 64 + usize::from(first % 4) * 256;
    for framing in [Framing::Lines, Framing::LengthPrefixed] {
        let mut decoder = FrameDecoder::new(framing, max);
        let mut buf = BytesMut::new();
        'feed: for chunk in rest.chunks(step) {
            buf.extend_from_slice(chunk);
            loop {
                match decoder.decode(&mut buf) {
                    Ok(Some(frame)) => assert!(frame.len() <= max, "frame over the limit"),
                    Ok(None) => break,
                    Err(_) => break 'feed,
                }
            }
        }
        while let Ok(Some(frame)) = decoder.decode_eof(&mut buf) {
            assert!(frame.len() <= max, "frame over the limit at close");
        }
    }
}

/// The batch decoder (central side): every batch is untrusted input. With and without
/// a known dictionary, so the dictionary path is reached too.
pub fn batch_decode(data: &[u8]) {
    use edgerelay::wire::{decode, Dictionary};
    let dict = Dictionary::new(br#"{"temp":sensors/t1sensors/t2dev-1dev-2"#.repeat(8));
    let lookup = |id: u64| (id == dict.id).then(|| dict.clone());
    if let Ok(batch) = decode(data, &lookup) {
        for r in &batch.records {
            let _ = edgerelay::wire::record_json(&batch.header, r);
        }
    }
}

/// The config loader: any text is parsed and validated. Checked: a config that loads
/// renders (`check-config --print`) to text that loads again to the same rendering.
pub fn config_load(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = std::path::Path::new("/nonexistent/edgerelay-fuzz/edgerelay.toml");
    if let Ok(config) = edgerelay::config::Config::parse(text, path) {
        let rendered = config.render();
        match edgerelay::config::Config::parse(&rendered, path) {
            Ok(again) => assert_eq!(again.render(), rendered, "rendering is not stable"),
            Err(e) => panic!("the rendered config does not load: {e}\n{rendered}"),
        }
    }
}
