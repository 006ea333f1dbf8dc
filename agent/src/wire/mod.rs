//! The batch wire format: how records travel from a gateway to the central side.
//!
//! A batch is a fixed header (magic, version, codec, dictionary id, gateway epoch,
//! first seq, count, base timestamp, uncompressed body length, stream, gateway) and a body
//! (topic table, origin table, records with delta-encoded seq and timestamp), the body
//! optionally zstd-compressed with a dictionary. docs/wire-format.md specifies it byte by
//! byte; `tests/vectors/` holds test vectors that the tests decode.
//!
//! Pure: no I/O. Invariants: `decode` never panics and never allocates more than the
//! limits allow — the uncompressed size is declared in the header, checked against
//! `MAX_BODY` before anything is allocated, and decompression cannot produce more than it
//! (decompression bombs); every count and length is checked against the bytes present.

mod decode;

use std::collections::HashMap;

use bytes::Bytes;

pub use decode::{decode, peek_header};

use crate::record::{OriginKind, StoredRecord};

pub const MAGIC: [u8; 4] = *b"ERB1";
pub const VERSION: u8 = 1;
/// Fixed part of the header, before the stream and gateway names.
pub const FIXED_HEADER_LEN: usize = 48;
/// Largest uncompressed body accepted (and produced).
pub const MAX_BODY: usize = 64 << 20;
/// Largest dictionary a gateway uses or the central side accepts (zstd's trained ones
/// are ~100 KiB at most; edgerelay trains 32 KiB ones).
pub const MAX_DICTIONARY: usize = 1 << 20;
/// Most records in one batch.
pub const MAX_RECORDS: u32 = 1_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Codec {
    None = 0,
    Zstd = 1,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("not an edgerelay batch (bad magic)")]
    BadMagic,
    #[error("unsupported batch version {0}")]
    UnsupportedVersion(u8),
    #[error("unknown codec {0}")]
    UnknownCodec(u8),
    #[error("truncated batch: {0}")]
    Truncated(&'static str),
    #[error("batch body of {0} bytes exceeds the limit of {MAX_BODY}")]
    TooLarge(u64),
    #[error("batch declares {0} records, more than {MAX_RECORDS}")]
    TooManyRecords(u64),
    #[error("dictionary {0:016x} is not known here")]
    UnknownDictionary(u64),
    #[error("decompression failed: {0}")]
    Decompress(String),
    #[error("compression failed: {0}")]
    Compress(String),
    #[error("invalid batch: {0}")]
    Invalid(String),
}

/// A zstd dictionary, identified by a hash of its content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dictionary {
    pub id: u64,
    pub bytes: Vec<u8>,
}

impl Dictionary {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self {
            id: content_id(&bytes),
            bytes,
        }
    }
}

/// Train a zstd dictionary of at most `max_size` bytes from sample payloads.
pub fn train_dictionary(samples: &[&[u8]], max_size: usize) -> Result<Dictionary, WireError> {
    let bytes = zstd::dict::from_samples(samples, max_size)
        .map_err(|e| WireError::Compress(format!("dictionary training: {e}")))?;
    Ok(Dictionary::new(bytes))
}

/// 64-bit FNV-1a of `bytes`, never 0 (0 means "no dictionary" on the wire). An
/// identifier, not a security measure: the central side fetches the dictionary with
/// that id from the broker the gateway published it to.
pub fn content_id(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h.max(1)
}

/// How to compress a batch body.
#[derive(Debug, Clone, Copy)]
pub enum Compression<'a> {
    None,
    Zstd {
        level: i32,
        dictionary: Option<&'a Dictionary>,
    },
}

/// Where the records of a batch come from.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    pub gateway: &'a str,
    pub stream: &'a str,
    pub epoch: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub codec: Codec,
    pub dictionary: u64,
    pub epoch: u64,
    pub first_seq: u64,
    pub count: u32,
    pub base_ts_ms: u64,
    pub body_len: u32,
    pub stream: String,
    pub gateway: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireRecord {
    pub seq: u64,
    pub ts_ms: u64,
    pub topic: String,
    pub qos: u8,
    pub retain: bool,
    pub origin_kind: OriginKind,
    pub origin: String,
    pub payload: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub header: Header,
    pub records: Vec<WireRecord>,
}

pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

pub(crate) fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// Encodes batches with one compression setting; the zstd context (and dictionary) is
/// prepared once and reused, which matters for small batches with a dictionary.
pub struct Encoder {
    compressor: Option<zstd::bulk::Compressor<'static>>,
    dictionary: u64,
    level: i32,
    /// Set by `probe_next`: the next body is also compressed without the dictionary.
    probe_next: bool,
    last_probe: Option<(usize, usize)>,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("zstd", &self.compressor.is_some())
            .field("dictionary", &format_args!("{:016x}", self.dictionary))
            .finish()
    }
}

impl Encoder {
    pub fn new(compression: Compression<'_>) -> Result<Self, WireError> {
        let err = |e: std::io::Error| WireError::Compress(e.to_string());
        Ok(match compression {
            Compression::None => Self {
                level: 0,
                compressor: None,
                dictionary: 0,
                probe_next: false,
                last_probe: None,
            },
            Compression::Zstd {
                level,
                dictionary: None,
            } => Self {
                level,
                compressor: Some(zstd::bulk::Compressor::new(level).map_err(err)?),
                dictionary: 0,
                probe_next: false,
                last_probe: None,
            },
            Compression::Zstd {
                level,
                dictionary: Some(d),
            } => Self {
                level,
                compressor: Some(
                    zstd::bulk::Compressor::with_dictionary(level, &d.bytes).map_err(err)?,
                ),
                dictionary: d.id,
                probe_next: false,
                last_probe: None,
            },
        })
    }

    /// Encode `records` (ascending seq, at least one) into one batch.
    pub fn encode(
        &mut self,
        src: Source<'_>,
        records: &[StoredRecord],
    ) -> Result<Vec<u8>, WireError> {
        encode_with(self, src, records)
    }

    /// Also compress the next body without the dictionary, to measure what the
    /// dictionary saves (see `last_probe`). No effect without a dictionary.
    pub fn probe_next(&mut self) {
        self.probe_next = self.dictionary != 0;
    }

    /// (compressed with the dictionary, compressed without) of the last batch, if it
    /// was probed.
    pub fn last_probe(&self) -> Option<(usize, usize)> {
        self.last_probe
    }
}

/// Encode `records` (ascending seq, at least one) into one batch (one-off; keep an
/// [`Encoder`] to encode many).
pub fn encode(
    src: Source<'_>,
    records: &[StoredRecord],
    compression: Compression<'_>,
) -> Result<Vec<u8>, WireError> {
    Encoder::new(compression)?.encode(src, records)
}

fn encode_with(
    enc: &mut Encoder,
    src: Source<'_>,
    records: &[StoredRecord],
) -> Result<Vec<u8>, WireError> {
    let (Some(first), Some(last)) = (records.first(), records.last()) else {
        return Err(WireError::Invalid(
            "a batch holds at least one record".into(),
        ));
    };
    if records.len() as u64 > u64::from(MAX_RECORDS) {
        return Err(WireError::TooManyRecords(records.len() as u64));
    }
    if src.stream.len() > 255 || src.gateway.len() > 255 {
        return Err(WireError::Invalid(
            "stream and gateway names are at most 255 bytes".into(),
        ));
    }
    if records.windows(2).any(|w| w[1].seq <= w[0].seq) || last.seq < first.seq {
        return Err(WireError::Invalid(
            "records must have strictly ascending seqs".into(),
        ));
    }
    let base_ts = records.iter().map(|r| r.record.ts_ms).min().unwrap_or(0);

    // Topic and origin tables: telemetry repeats both, so each is written once.
    let mut topics: HashMap<&str, u64> = HashMap::new();
    let mut topic_list: Vec<&str> = Vec::new();
    let mut origins: HashMap<(u8, &str), u64> = HashMap::new();
    let mut origin_list: Vec<(u8, &str)> = Vec::new();
    for r in records {
        let t = r.record.topic.as_str();
        topics.entry(t).or_insert_with(|| {
            topic_list.push(t);
            topic_list.len() as u64 - 1
        });
        let o = (r.record.origin.kind as u8, &*r.record.origin.name);
        origins.entry(o).or_insert_with(|| {
            origin_list.push(o);
            origin_list.len() as u64 - 1
        });
    }
    let mut body = Vec::with_capacity(
        records
            .iter()
            .map(|r| r.record.payload.len() + 8)
            .sum::<usize>()
            + 64,
    );
    put_varint(&mut body, topic_list.len() as u64);
    for t in &topic_list {
        put_str(&mut body, t);
    }
    put_varint(&mut body, origin_list.len() as u64);
    for (kind, name) in &origin_list {
        body.push(*kind);
        put_str(&mut body, name);
    }
    let mut prev = first.seq;
    for (i, r) in records.iter().enumerate() {
        let delta = if i == 0 { 0 } else { r.seq - prev };
        prev = r.seq;
        put_varint(&mut body, delta);
        put_varint(
            &mut body,
            zigzag(r.record.ts_ms.wrapping_sub(base_ts) as i64),
        );
        put_varint(&mut body, topics[r.record.topic.as_str()]);
        body.push((r.record.qos & 0b11) | if r.record.retain { 0b100 } else { 0 });
        put_varint(
            &mut body,
            origins[&(r.record.origin.kind as u8, &*r.record.origin.name)],
        );
        put_varint(&mut body, r.record.payload.len() as u64);
        body.extend_from_slice(&r.record.payload);
    }
    if body.len() > MAX_BODY {
        return Err(WireError::TooLarge(body.len() as u64));
    }
    let body_len = body.len() as u32;

    let (codec, dictionary, payload) = match enc.compressor.as_mut() {
        None => (Codec::None, 0, body),
        Some(c) => {
            let compressed = c
                .compress(&body)
                .map_err(|e| WireError::Compress(e.to_string()))?;
            enc.last_probe = None;
            if std::mem::take(&mut enc.probe_next) {
                // Rare (one batch in many): a one-off context is cheaper than keeping a
                // second one allocated for it.
                let plain = zstd::bulk::compress(&body, enc.level)
                    .map_err(|e| WireError::Compress(e.to_string()))?;
                enc.last_probe = Some((compressed.len(), plain.len()));
            }
            (Codec::Zstd, enc.dictionary, compressed)
        }
    };

    let mut out = Vec::with_capacity(
        FIXED_HEADER_LEN + 2 + src.stream.len() + src.gateway.len() + payload.len(),
    );
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(codec as u8);
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&dictionary.to_le_bytes());
    out.extend_from_slice(&src.epoch.to_le_bytes());
    out.extend_from_slice(&first.seq.to_le_bytes());
    out.extend_from_slice(&(records.len() as u32).to_le_bytes());
    out.extend_from_slice(&base_ts.to_le_bytes());
    out.extend_from_slice(&body_len.to_le_bytes());
    debug_assert_eq!(out.len(), FIXED_HEADER_LEN);
    out.push(src.stream.len() as u8);
    out.extend_from_slice(src.stream.as_bytes());
    out.push(src.gateway.len() as u8);
    out.extend_from_slice(src.gateway.as_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

#[cfg(test)]
mod tests;

/// One JSON object per record (the output of `edgerelay decode` and `unpack --jsonl`):
/// the payload as text when it is UTF-8, else base64 under `payload_b64`.
pub fn record_json(h: &Header, r: &WireRecord) -> serde_json::Value {
    use base64::Engine as _;
    let mut v = serde_json::json!({
        "gateway": h.gateway,
        "epoch": h.epoch,
        "stream": h.stream,
        "seq": r.seq,
        "ts": r.ts_ms,
        "topic": r.topic,
        "qos": r.qos,
        "retain": r.retain,
        "origin": r.origin,
    });
    match std::str::from_utf8(&r.payload) {
        Ok(text) => v["payload"] = serde_json::Value::String(text.to_owned()),
        Err(_) => {
            v["payload_b64"] = serde_json::Value::String(
                base64::engine::general_purpose::STANDARD.encode(&r.payload),
            )
        }
    }
    v
}
