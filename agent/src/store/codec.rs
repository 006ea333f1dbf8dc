//! On-disk encoding of records and per-stream state inside redb values.
//!
//! Why hand-rolled: these are tiny fixed layouts read on every upload; a versioned byte
//! layout keeps the file format explicit (docs/on-disk-format.md) and independent of any
//! serialisation crate's evolution. Invariants: every decode is bounds-checked and returns
//! `CorruptValue` instead of panicking; encode(decode(x)) == x.

use std::sync::Arc;

use bytes::Bytes;

use crate::record::{Origin, OriginKind, Record};

pub const RECORD_VERSION: u8 = 1;
const FLAG_RETAIN: u8 = 0b100;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("corrupt stored value: {what}")]
pub struct CorruptValue {
    pub what: &'static str,
}

fn corrupt(what: &'static str) -> CorruptValue {
    CorruptValue { what }
}

/// Length of the encoded value for `r` (used for size accounting before encoding).
pub fn encoded_len(r: &Record) -> usize {
    1 + 8 + 1 + 1 + 1 + r.origin.name.len().min(255) + 2 + r.topic.len() + r.payload.len()
}

pub fn encode_record(r: &Record, out: &mut Vec<u8>) {
    out.clear();
    out.reserve(encoded_len(r));
    out.push(RECORD_VERSION);
    out.extend_from_slice(&r.ts_ms.to_le_bytes());
    let mut flags = r.qos & 0b11;
    if r.retain {
        flags |= FLAG_RETAIN;
    }
    out.push(flags);
    out.push(r.origin.kind as u8);
    let name = truncate_utf8(&r.origin.name, 255);
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
    // Topics are bounded by MQTT to 65535 bytes; ingest validates that before here.
    let topic = truncate_utf8(&r.topic, u16::MAX as usize);
    out.extend_from_slice(&(topic.len() as u16).to_le_bytes());
    out.extend_from_slice(topic.as_bytes());
    out.extend_from_slice(&r.payload);
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], CorruptValue> {
        if self.buf.len() < n {
            return Err(corrupt(what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, CorruptValue> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, CorruptValue> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, CorruptValue> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
}

pub fn decode_record(buf: &[u8]) -> Result<Record, CorruptValue> {
    let mut r = Reader { buf };
    if r.u8("record version")? != RECORD_VERSION {
        return Err(corrupt("unknown record version"));
    }
    let ts_ms = r.u64("timestamp")?;
    let flags = r.u8("flags")?;
    let kind = OriginKind::from_u8(r.u8("origin kind")?).ok_or(corrupt("origin kind"))?;
    let name_len = r.u8("origin length")? as usize;
    let name = std::str::from_utf8(r.take(name_len, "origin name")?)
        .map_err(|_| corrupt("origin name is not UTF-8"))?;
    let topic_len = r.u16("topic length")? as usize;
    let topic = std::str::from_utf8(r.take(topic_len, "topic")?)
        .map_err(|_| corrupt("topic is not UTF-8"))?;
    Ok(Record {
        topic: topic.to_owned(),
        payload: Bytes::copy_from_slice(r.buf),
        qos: flags & 0b11,
        retain: flags & FLAG_RETAIN != 0,
        origin: Origin {
            kind,
            name: Arc::from(name),
        },
        ts_ms,
    })
}

/// Persistent per-stream counters, updated in the same transaction as the records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamState {
    /// Next sequence number to assign; never decreases, so seqs never repeat.
    pub next_seq: u64,
    /// Records currently stored.
    pub count: u64,
    /// Accounted bytes currently stored (see `entry_cost`).
    pub bytes: u64,
    /// Records that left the buffer unsent through retention since the store was created.
    pub evicted: u64,
}

pub const STREAM_STATE_LEN: usize = 32;

impl StreamState {
    pub fn encode(&self) -> [u8; STREAM_STATE_LEN] {
        let mut out = [0u8; STREAM_STATE_LEN];
        for (i, v) in [self.next_seq, self.count, self.bytes, self.evicted]
            .iter()
            .enumerate()
        {
            out[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        out
    }
    pub fn decode(buf: &[u8]) -> Result<Self, CorruptValue> {
        let mut r = Reader { buf };
        let s = Self {
            next_seq: r.u64("next_seq")?,
            count: r.u64("count")?,
            bytes: r.u64("bytes")?,
            evicted: r.u64("evicted")?,
        };
        Ok(s)
    }
}

/// Why a range of records left the buffer without being sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum GapReason {
    MaxAge = 1,
    MaxSize = 2,
    /// Dropped by `degrade = "sample:…"` while the link could not keep up.
    Sampled = 3,
    /// Dropped by `degrade = "latest"`: a newer message of the same topic was kept.
    Conflated = 4,
    /// Refused by the broker, kept as a dead letter, and purged by an operator.
    Purged = 5,
    /// The whole buffer file was unreadable and `run --repair` moved it aside: what it
    /// held unsent is lost (stream "*": every stream of the previous epoch).
    BufferLost = 6,
    /// Dropped (`when_full = "drop-oldest"`) because the filesystem could not hold
    /// more, before `max_size` was reached.
    DiskFull = 7,
}

impl GapReason {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::MaxAge),
            2 => Some(Self::MaxSize),
            3 => Some(Self::Sampled),
            4 => Some(Self::Conflated),
            5 => Some(Self::Purged),
            6 => Some(Self::BufferLost),
            7 => Some(Self::DiskFull),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MaxAge => "max_age",
            Self::MaxSize => "max_size",
            Self::Sampled => "sampled",
            Self::Conflated => "conflated",
            Self::Purged => "purged",
            Self::BufferLost => "buffer_lost",
            Self::DiskFull => "disk_full",
        }
    }
}

/// A contiguous range of seqs dropped for one reason; keyed in redb by (stream, first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GapValue {
    pub last: u64,
    pub count: u64,
    pub reason: GapReason,
}

pub const GAP_LEN: usize = 17;

impl GapValue {
    pub fn encode(&self) -> [u8; GAP_LEN] {
        let mut out = [0u8; GAP_LEN];
        out[..8].copy_from_slice(&self.last.to_le_bytes());
        out[8..16].copy_from_slice(&self.count.to_le_bytes());
        out[16] = self.reason as u8;
        out
    }
    pub fn decode(buf: &[u8]) -> Result<Self, CorruptValue> {
        let mut r = Reader { buf };
        Ok(Self {
            last: r.u64("gap last")?,
            count: r.u64("gap count")?,
            reason: GapReason::from_u8(r.u8("gap reason")?).ok_or(corrupt("gap reason"))?,
        })
    }
}

/// The timestamp of an encoded record without decoding the rest (eviction scans heads).
pub fn peek_ts(buf: &[u8]) -> Result<u64, CorruptValue> {
    let mut r = Reader { buf };
    if r.u8("record version")? != RECORD_VERSION {
        return Err(corrupt("unknown record version"));
    }
    r.u64("timestamp")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rec(
        topic: String,
        payload: Vec<u8>,
        qos: u8,
        retain: bool,
        ts: u64,
        name: String,
    ) -> Record {
        Record {
            topic,
            payload: Bytes::from(payload),
            qos,
            retain,
            origin: Origin {
                kind: OriginKind::Mqtt,
                name: Arc::from(name.as_str()),
            },
            ts_ms: ts,
        }
    }

    proptest! {
        #[test]
        fn record_round_trips(topic in ".{0,40}", payload in proptest::collection::vec(any::<u8>(), 0..300),
                              qos in 0u8..3, retain: bool, ts: u64, name in "[a-z0-9:./]{0,30}") {
            let r = rec(topic, payload, qos, retain, ts, name);
            let mut buf = Vec::new();
            encode_record(&r, &mut buf);
            prop_assert_eq!(buf.len(), encoded_len(&r));
            prop_assert_eq!(decode_record(&buf), Ok(r));
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_record(&bytes);
            let _ = StreamState::decode(&bytes);
            let _ = GapValue::decode(&bytes);
        }
    }

    #[test]
    fn truncated_record_is_corrupt_not_panic() {
        let r = rec("a/b".into(), b"xyz".to_vec(), 1, false, 7, "n".into());
        let mut buf = Vec::new();
        encode_record(&r, &mut buf);
        for cut in 0..(buf.len() - 3) {
            assert!(decode_record(&buf[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn stream_state_and_gap_round_trip() {
        let s = StreamState {
            next_seq: 9,
            count: 3,
            bytes: 1234,
            evicted: 5,
        };
        assert_eq!(StreamState::decode(&s.encode()), Ok(s));
        let g = GapValue {
            last: 44,
            count: 10,
            reason: GapReason::MaxAge,
        };
        assert_eq!(GapValue::decode(&g.encode()), Ok(g));
    }
}
