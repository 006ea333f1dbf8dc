//! Batch encoding benchmark: bytes per message and encode+compress throughput on one
//! core, by batch size, zstd level and dictionary, with the per-message MQTT PUBLISH
//! (passthrough) computed on the same messages as the baseline.
//!
//!     cargo bench -p edgerelay --bench wire_encode
//!
//! Messages: realistic ~190-byte telemetry JSON from 200 simulated devices (seeded
//! random walks), interleaved as they would arrive at a gateway. Sizes here are MQTT
//! payload bytes of the batch PUBLISH plus its topic and header; TCP/IP overhead on the
//! wire is measured separately once batch mode uploads.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use edgerelay::record::{Origin, OriginKind, Record, StoredRecord};
use edgerelay::wire::{train_dictionary, Compression, Dictionary, Encoder, Source};
use rand::{Rng, SeedableRng};

const DEVICES: usize = 200;
const MESSAGES: usize = 200_000;

fn fleet(n: usize) -> Vec<StoredRecord> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut temp: Vec<f64> = (0..DEVICES).map(|_| rng.random_range(15.0..30.0)).collect();
    let mut hum: Vec<f64> = (0..DEVICES).map(|_| rng.random_range(30.0..70.0)).collect();
    let mut batt: Vec<f64> = (0..DEVICES).map(|_| rng.random_range(3.4..4.1)).collect();
    let origins: Vec<Arc<str>> = (0..DEVICES)
        .map(|d| Arc::from(format!("dev-{d:04}").as_str()))
        .collect();
    (0..n)
        .map(|i| {
            let d = i % DEVICES;
            temp[d] += rng.random_range(-0.2..0.2);
            hum[d] = (hum[d] + rng.random_range(-0.5..0.5)).clamp(0.0, 100.0);
            batt[d] -= rng.random_range(0.0..0.0005);
            let ts = 1_795_000_000_000u64 + (i / DEVICES) as u64 * 1000 + rng.random_range(0..900);
            let payload = format!(
                "{{\"device\":\"dev-{d:04}\",\"ts\":{ts},\"temp_c\":{:.2},\"humidity\":{:.1},\"pressure_hpa\":{:.1},\"battery_v\":{:.3},\"rssi_dbm\":{},\"status\":\"ok\",\"fw\":\"2.4.1\"}}",
                temp[d],
                hum[d],
                1013.0 + rng.random_range(-3.0..3.0),
                batt[d],
                -55 - rng.random_range(0..30),
            );
            StoredRecord {
                seq: i as u64,
                record: Record {
                    topic: format!("sensors/dev-{d:04}/telemetry"),
                    payload: Bytes::from(payload),
                    qos: 1,
                    retain: false,
                    origin: Origin {
                        kind: OriginKind::Mqtt,
                        name: origins[d].clone(),
                    },
                    ts_ms: ts,
                },
            }
        })
        .collect()
}

/// Bytes of one QoS 1 MQTT PUBLISH packet carrying `payload` to `topic`, plus the
/// 4-byte PUBACK that comes back.
fn mqtt_publish_bytes(topic_len: usize, payload_len: usize) -> usize {
    let remaining = 2 + topic_len + 2 + payload_len;
    let len_len = match remaining {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    };
    1 + len_len + remaining + 4
}

fn main() {
    let records = fleet(MESSAGES);
    let src = Source {
        gateway: "gw-bench",
        stream: "default",
        epoch: 42,
    };
    let avg_payload = records
        .iter()
        .map(|r| r.record.payload.len())
        .sum::<usize>() as f64
        / MESSAGES as f64;
    let prefix = "edgerelay/gw-bench/";
    let passthrough: usize = records
        .iter()
        .map(|r| mqtt_publish_bytes(prefix.len() + r.record.topic.len(), r.record.payload.len()))
        .sum();
    // Train on the first 10% of traffic, as the agent would on recent payloads.
    let samples: Vec<&[u8]> = records[..MESSAGES / 10]
        .iter()
        .map(|r| &r.record.payload[..])
        .collect();
    let t = Instant::now();
    let dict: Dictionary = train_dictionary(&samples, 32 * 1024).expect("train");
    let train_ms = t.elapsed().as_secs_f64() * 1000.0;
    println!(
        "wire_encode: {MESSAGES} messages from {DEVICES} devices, avg payload {avg_payload:.0} B"
    );
    println!(
        "dictionary: {} bytes trained from {} payloads in {train_ms:.0} ms",
        dict.bytes.len(),
        samples.len()
    );
    println!();
    println!("| mode | batch | level | dictionary | bytes/msg | vs passthrough | encode+compress msgs/s (1 core) |");
    println!("| --- | ---: | ---: | --- | ---: | ---: | ---: |");
    println!(
        "| passthrough (PUBLISH + PUBACK per message) | 1 | - | - | {:.1} | 1.00 | - |",
        passthrough as f64 / MESSAGES as f64
    );
    for batch in [10usize, 100, 1000] {
        for level in [1, 3, 9, 19] {
            for with_dict in [false, true] {
                let compression = Compression::Zstd {
                    level,
                    dictionary: with_dict.then_some(&dict),
                };
                let start = Instant::now();
                let mut encoder = Encoder::new(compression).expect("encoder");
                let mut bytes = 0usize;
                for chunk in records.chunks(batch) {
                    let b = encoder.encode(src, chunk).expect("encode");
                    // The batch travels as one QoS 1 PUBLISH on {prefix}batch/default.
                    bytes += mqtt_publish_bytes(prefix.len() + "batch/default".len(), b.len());
                }
                let secs = start.elapsed().as_secs_f64();
                let per_msg = bytes as f64 / MESSAGES as f64;
                println!(
                    "| batch | {batch} | {level} | {} | {per_msg:.1} | {:.3} | {:.0} |",
                    if with_dict { "32 KiB trained" } else { "none" },
                    bytes as f64 / passthrough as f64,
                    MESSAGES as f64 / secs
                );
            }
        }
    }
}
