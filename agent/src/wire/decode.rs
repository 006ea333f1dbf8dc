//! Decoding batches: every batch is untrusted input. Each length and count is checked
//! against the bytes present before it is used; the uncompressed size is bounded before
//! allocation; errors name what was wrong and never panic.

use bytes::Bytes;

use super::{
    unzigzag, Batch, Codec, Dictionary, Header, WireError, WireRecord, FIXED_HEADER_LEN, MAGIC,
    MAX_BODY, MAX_RECORDS, VERSION,
};
use crate::record::OriginKind;

struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Truncated(what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.take(1, what)?[0])
    }

    fn varint(&mut self, what: &'static str) -> Result<u64, WireError> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.u8(what)?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(WireError::Invalid(format!(
            "{what}: varint longer than 10 bytes"
        )))
    }

    /// A length that must fit in what is left.
    fn len(&mut self, what: &'static str) -> Result<usize, WireError> {
        let n = self.varint(what)?;
        if n > self.buf.len() as u64 {
            return Err(WireError::Truncated(what));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &'static str) -> Result<String, WireError> {
        let n = self.len(what)?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| WireError::Invalid(format!("{what} is not UTF-8")))
    }
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

/// The header, and where the body starts.
pub fn peek_header(bytes: &[u8]) -> Result<(Header, usize), WireError> {
    if bytes.len() < 4 || bytes[..4] != MAGIC {
        return Err(if bytes.len() < 4 {
            WireError::Truncated("magic")
        } else {
            WireError::BadMagic
        });
    }
    if bytes.len() < FIXED_HEADER_LEN {
        return Err(WireError::Truncated("header"));
    }
    if bytes[4] != VERSION {
        return Err(WireError::UnsupportedVersion(bytes[4]));
    }
    let codec = match bytes[5] {
        0 => Codec::None,
        1 => Codec::Zstd,
        other => return Err(WireError::UnknownCodec(other)),
    };
    let count = le_u32(&bytes[32..36]);
    if count == 0 {
        return Err(WireError::Invalid(
            "a batch holds at least one record".into(),
        ));
    }
    if count > MAX_RECORDS {
        return Err(WireError::TooManyRecords(u64::from(count)));
    }
    let body_len = le_u32(&bytes[44..48]);
    if body_len as usize > MAX_BODY {
        return Err(WireError::TooLarge(u64::from(body_len)));
    }
    let mut c = Cursor {
        buf: &bytes[FIXED_HEADER_LEN..],
    };
    let n = usize::from(c.u8("stream name length")?);
    let stream = String::from_utf8(c.take(n, "stream name")?.to_vec())
        .map_err(|_| WireError::Invalid("stream name is not UTF-8".into()))?;
    let n = usize::from(c.u8("gateway name length")?);
    let gateway = String::from_utf8(c.take(n, "gateway name")?.to_vec())
        .map_err(|_| WireError::Invalid("gateway name is not UTF-8".into()))?;
    let body_start = bytes.len() - c.buf.len();
    Ok((
        Header {
            codec,
            dictionary: le_u64(&bytes[8..16]),
            epoch: le_u64(&bytes[16..24]),
            first_seq: le_u64(&bytes[24..32]),
            count,
            base_ts_ms: le_u64(&bytes[36..44]),
            body_len,
            stream,
            gateway,
        },
        body_start,
    ))
}

/// Decode a whole batch. `dictionary` looks a dictionary up by id.
pub fn decode(
    bytes: &[u8],
    dictionary: &dyn Fn(u64) -> Option<Dictionary>,
) -> Result<Batch, WireError> {
    let (header, start) = peek_header(bytes)?;
    let raw = &bytes[start..];
    let decompressed;
    let body: &[u8] = match header.codec {
        Codec::None => {
            if raw.len() != header.body_len as usize {
                return Err(WireError::Invalid(format!(
                    "body is {} bytes, header says {}",
                    raw.len(),
                    header.body_len
                )));
            }
            raw
        }
        Codec::Zstd => {
            let capacity = header.body_len as usize;
            decompressed = match header.dictionary {
                0 => zstd::bulk::decompress(raw, capacity),
                id => {
                    let d = dictionary(id).ok_or(WireError::UnknownDictionary(id))?;
                    zstd::bulk::Decompressor::with_dictionary(&d.bytes)
                        .and_then(|mut z| z.decompress(raw, capacity))
                }
            }
            .map_err(|e| WireError::Decompress(e.to_string()))?;
            if decompressed.len() != capacity {
                return Err(WireError::Invalid(format!(
                    "body is {} bytes, header says {capacity}",
                    decompressed.len()
                )));
            }
            &decompressed
        }
    };
    let records = decode_body(&header, body)?;
    Ok(Batch { header, records })
}

fn decode_body(h: &Header, body: &[u8]) -> Result<Vec<WireRecord>, WireError> {
    let mut c = Cursor { buf: body };
    // Each table entry takes at least one byte, so a count beyond the bytes left is a lie.
    let n_topics = c.len("topic count")?;
    let mut topics = Vec::with_capacity(n_topics);
    for _ in 0..n_topics {
        topics.push(c.string("topic")?);
    }
    let n_origins = c.len("origin count")?;
    let mut origins = Vec::with_capacity(n_origins);
    for _ in 0..n_origins {
        let kind = OriginKind::from_u8(c.u8("origin kind")?)
            .ok_or_else(|| WireError::Invalid("unknown origin kind".into()))?;
        origins.push((kind, c.string("origin name")?));
    }
    // A record takes at least 5 bytes; bound the allocation by what is present.
    let mut records = Vec::with_capacity((h.count as usize).min(c.buf.len() / 5 + 1));
    let mut seq = h.first_seq;
    for i in 0..h.count {
        let delta = c.varint("seq delta")?;
        if i > 0 && delta == 0 {
            return Err(WireError::Invalid("seqs must be strictly ascending".into()));
        }
        seq = seq
            .checked_add(delta)
            .ok_or_else(|| WireError::Invalid("seq overflows".into()))?;
        let ts_delta = unzigzag(c.varint("timestamp")?);
        let ts_ms = h
            .base_ts_ms
            .checked_add_signed(ts_delta)
            .ok_or_else(|| WireError::Invalid("timestamp overflows".into()))?;
        let topic = topics
            .get(c.varint("topic index")? as usize)
            .ok_or_else(|| WireError::Invalid("topic index out of range".into()))?
            .clone();
        let flags = c.u8("flags")?;
        if flags & !0b111 != 0 || flags & 0b11 == 3 {
            return Err(WireError::Invalid(format!("bad flags {flags:#04x}")));
        }
        let (origin_kind, origin) = origins
            .get(c.varint("origin index")? as usize)
            .ok_or_else(|| WireError::Invalid("origin index out of range".into()))?
            .clone();
        let n = c.len("payload length")?;
        let payload = Bytes::copy_from_slice(c.take(n, "payload")?);
        records.push(WireRecord {
            seq,
            ts_ms,
            topic,
            qos: flags & 0b11,
            retain: flags & 0b100 != 0,
            origin_kind,
            origin,
            payload,
        });
    }
    if !c.buf.is_empty() {
        return Err(WireError::Invalid(format!(
            "{} bytes after the last record",
            c.buf.len()
        )));
    }
    Ok(records)
}
