use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use proptest::prelude::*;

use super::*;
use crate::record::{Origin, Record};

fn rec(
    seq: u64,
    ts: u64,
    topic: &str,
    payload: &[u8],
    qos: u8,
    retain: bool,
    origin: &str,
) -> StoredRecord {
    StoredRecord {
        seq,
        record: Record {
            topic: topic.to_owned(),
            payload: Bytes::copy_from_slice(payload),
            qos,
            retain,
            origin: Origin {
                kind: OriginKind::Mqtt,
                name: Arc::from(origin),
            },
            ts_ms: ts,
        },
    }
}

const SRC: Source<'static> = Source {
    gateway: "gw-vectors",
    stream: "default",
    epoch: 0x0102_0304_0506_0708,
};

fn no_dict(_: u64) -> Option<Dictionary> {
    None
}

fn check_round_trip(records: &[StoredRecord], batch: &Batch) {
    assert_eq!(batch.records.len(), records.len());
    for (w, r) in batch.records.iter().zip(records) {
        assert_eq!(w.seq, r.seq);
        assert_eq!(w.ts_ms, r.record.ts_ms);
        assert_eq!(w.topic, r.record.topic);
        assert_eq!(w.payload, r.record.payload);
        assert_eq!((w.qos, w.retain), (r.record.qos, r.record.retain));
        assert_eq!(w.origin, &*r.record.origin.name);
    }
}

fn sample() -> Vec<StoredRecord> {
    vec![
        rec(
            41,
            1_795_000_000_000,
            "sensors/t1",
            br#"{"temp":21.5}"#,
            1,
            false,
            "dev-1",
        ),
        rec(
            42,
            1_795_000_000_250,
            "sensors/t2",
            br#"{"temp":19.0}"#,
            0,
            false,
            "dev-2",
        ),
        rec(
            44,
            1_794_999_999_900,
            "sensors/t1",
            b"\x00\xff\xfebinary",
            2,
            true,
            "dev-1",
        ),
    ]
}

fn dictionary() -> Dictionary {
    Dictionary::new(br#"{"temp":sensors/t1sensors/t2dev-1dev-2"#.repeat(8))
}

proptest! {
    #[test]
    fn round_trips(
        items in proptest::collection::vec((1u64..1000, 0u64..100_000, "[a-z]{1,3}(/[a-z0-9]{1,4}){0,3}", proptest::collection::vec(any::<u8>(), 0..200), 0u8..3, any::<bool>(), "[a-z0-9-]{0,12}"), 1..40),
        first in 0u64..(u64::MAX / 2),
        level in 1i32..10,
        codec in 0u8..3,
    ) {
        let mut seq = first;
        let records: Vec<StoredRecord> = items.iter().map(|(d, ts, topic, payload, qos, retain, origin)| {
            seq += d;
            rec(seq, 1_700_000_000_000 + ts, topic, payload, *qos, *retain, origin)
        }).collect();
        let dict = dictionary();
        let compression = match codec {
            0 => Compression::None,
            1 => Compression::Zstd { level, dictionary: None },
            _ => Compression::Zstd { level, dictionary: Some(&dict) },
        };
        let bytes = encode(SRC, &records, compression).expect("encode");
        let lookup = |id: u64| (id == dict.id).then(|| dict.clone());
        let batch = decode(&bytes, &lookup).expect("decode");
        prop_assert_eq!(batch.header.first_seq, records[0].seq);
        prop_assert_eq!(batch.header.count as usize, records.len());
        check_round_trip(&records, &batch);
    }

    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600), keep_header: bool) {
        let mut input = bytes.clone();
        if keep_header {
            let good = encode(SRC, &sample(), Compression::None).expect("encode");
            input = good[..FIXED_HEADER_LEN.min(good.len())].to_vec();
            input.extend_from_slice(&bytes);
        }
        let _ = decode(&input, &no_dict);
    }
}

#[test]
fn every_truncation_is_an_error() {
    for compression in [
        Compression::None,
        Compression::Zstd {
            level: 3,
            dictionary: None,
        },
    ] {
        let bytes = encode(SRC, &sample(), compression).expect("encode");
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut], &no_dict).is_err(), "cut at {cut}");
        }
        assert!(decode(&bytes, &no_dict).is_ok());
    }
}

#[test]
fn decompression_bombs_are_refused() {
    // A zstd frame of 10 MiB of zeros under a header that promises 100 bytes.
    let mut bytes = encode(
        SRC,
        &sample(),
        Compression::Zstd {
            level: 3,
            dictionary: None,
        },
    )
    .expect("encode");
    let (_, start) = peek_header(&bytes).expect("header");
    bytes.truncate(start);
    bytes.extend(zstd::bulk::compress(&vec![0u8; 10 << 20], 3).expect("compress"));
    let err = decode(&bytes, &no_dict).expect_err("bomb");
    assert!(
        matches!(err, WireError::Decompress(_) | WireError::Invalid(_)),
        "{err}"
    );

    // A header that declares more than MAX_BODY is refused before anything is allocated.
    let mut big = encode(SRC, &sample(), Compression::None).expect("encode");
    big[44..48].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        decode(&big, &no_dict),
        Err(WireError::TooLarge(_))
    ));
    let mut many = encode(SRC, &sample(), Compression::None).expect("encode");
    many[32..36].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        decode(&many, &no_dict),
        Err(WireError::TooManyRecords(_))
    ));
}

#[test]
fn wrong_magic_version_codec_and_dictionary() {
    let good = encode(SRC, &sample(), Compression::None).expect("encode");
    let mut b = good.clone();
    b[0] = b'X';
    assert_eq!(decode(&b, &no_dict), Err(WireError::BadMagic));
    let mut b = good.clone();
    b[4] = 9;
    assert_eq!(decode(&b, &no_dict), Err(WireError::UnsupportedVersion(9)));
    let mut b = good;
    b[5] = 7;
    assert_eq!(decode(&b, &no_dict), Err(WireError::UnknownCodec(7)));
    let dict = dictionary();
    let b = encode(
        SRC,
        &sample(),
        Compression::Zstd {
            level: 3,
            dictionary: Some(&dict),
        },
    )
    .expect("encode");
    assert_eq!(
        decode(&b, &no_dict),
        Err(WireError::UnknownDictionary(dict.id))
    );
}

#[test]
fn encode_rejects_unordered_or_empty() {
    assert!(encode(SRC, &[], Compression::None).is_err());
    let mut s = sample();
    s.swap(0, 1);
    assert!(encode(SRC, &s, Compression::None).is_err());
}

fn vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/vectors")
}

fn vector_cases() -> Vec<(&'static str, Vec<u8>)> {
    let dict = dictionary();
    vec![
        (
            "batch-v1-none",
            encode(SRC, &sample(), Compression::None).expect("encode"),
        ),
        (
            "batch-v1-zstd",
            encode(
                SRC,
                &sample(),
                Compression::Zstd {
                    level: 3,
                    dictionary: None,
                },
            )
            .expect("encode"),
        ),
        (
            "batch-v1-zstd-dict",
            encode(
                SRC,
                &sample(),
                Compression::Zstd {
                    level: 3,
                    dictionary: Some(&dict),
                },
            )
            .expect("encode"),
        ),
    ]
}

fn json_lines(batch: &Batch) -> String {
    batch
        .records
        .iter()
        .map(|r| format!("{}\n", record_json(&batch.header, r)))
        .collect()
}

/// The committed vectors decode to the committed JSON lines. The uncompressed vector is
/// also byte-for-byte what the encoder writes today (zstd's output may legitimately
/// differ between library versions, so compressed vectors are checked by decoding).
#[test]
fn committed_vectors_decode() {
    let dir = vectors_dir();
    let dict = dictionary();
    assert_eq!(
        std::fs::read(dir.join(format!("dict-{:016x}", dict.id))).expect("dictionary vector"),
        dict.bytes
    );
    let lookup = |id: u64| (id == dict.id).then(|| dict.clone());
    for (name, fresh) in vector_cases() {
        let bytes = std::fs::read(dir.join(format!("{name}.bin")))
            .unwrap_or_else(|e| panic!("{name}.bin: {e}"));
        let expected = std::fs::read_to_string(dir.join(format!("{name}.jsonl"))).expect("jsonl");
        let batch = decode(&bytes, &lookup).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(json_lines(&batch), expected, "{name}");
        if name == "batch-v1-none" {
            assert_eq!(
                bytes, fresh,
                "the encoder still writes the committed uncompressed vector"
            );
        }
    }
}

/// `cargo test -p edgerelay --lib regenerate_vectors -- --ignored` rewrites them.
#[test]
#[ignore]
fn regenerate_vectors() {
    let dir = vectors_dir();
    std::fs::create_dir_all(&dir).expect("mkdir");
    let dict = dictionary();
    std::fs::write(dir.join(format!("dict-{:016x}", dict.id)), &dict.bytes).expect("dict");
    let lookup = |id: u64| (id == dict.id).then(|| dict.clone());
    for (name, bytes) in vector_cases() {
        std::fs::write(dir.join(format!("{name}.bin")), &bytes).expect("bin");
        let batch = decode(&bytes, &lookup).expect("decode");
        std::fs::write(dir.join(format!("{name}.jsonl")), json_lines(&batch)).expect("jsonl");
    }
}
