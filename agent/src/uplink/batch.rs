//! Batch mode: many records per publish, in the versioned wire format (`wire`),
//! zstd-compressed, to `{topic_prefix}/batch/{stream}`.
//!
//! A batch goes when it is full (`batch_size` records) or, once the store is drained,
//! when its oldest record has waited `linger` — bigger batches compress better, the
//! linger bounds the latency that costs.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;

use super::forward::{upstream_topic, Packer, Seqs, Unit, UplinkError};
use crate::record::StoredRecord;
use crate::wire::{Compression, Encoder, Source};

pub struct BatchPacker {
    encoder: Encoder,
    gateway: String,
    stream: String,
    epoch: u64,
    topic: String,
    batch_size: usize,
    linger: Duration,
}

impl std::fmt::Debug for BatchPacker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchPacker")
            .field("topic", &self.topic)
            .field("batch_size", &self.batch_size)
            .field("linger", &self.linger)
            .finish_non_exhaustive()
    }
}

/// Where a packer's batches come from and how they are built.
#[derive(Debug, Clone)]
pub struct BatchSettings {
    pub prefix: String,
    pub gateway: String,
    pub stream: String,
    pub epoch: u64,
    pub batch_size: usize,
    pub linger: Duration,
    pub level: i32,
}

impl BatchPacker {
    pub fn new(s: BatchSettings) -> Result<Self, UplinkError> {
        let encoder = Encoder::new(Compression::Zstd {
            level: s.level,
            dictionary: None,
        })?;
        Ok(Self {
            encoder,
            topic: upstream_topic(&s.prefix, &format!("batch/{}", s.stream)),
            gateway: s.gateway,
            stream: s.stream,
            epoch: s.epoch,
            batch_size: s.batch_size.max(1),
            linger: s.linger,
        })
    }
}

impl Packer for BatchPacker {
    fn wants(&self) -> usize {
        self.batch_size
    }

    fn linger(&self) -> Duration {
        self.linger
    }

    fn pack(
        &mut self,
        queue: &mut VecDeque<StoredRecord>,
        flush: bool,
    ) -> Result<Option<Unit>, UplinkError> {
        if queue.is_empty() || (queue.len() < self.batch_size && !flush) {
            return Ok(None);
        }
        let n = queue.len().min(self.batch_size);
        let records: Vec<StoredRecord> = queue.drain(..n).collect();
        let src = Source {
            gateway: &self.gateway,
            stream: &self.stream,
            epoch: self.epoch,
        };
        let payload = self.encoder.encode(src, &records)?;
        Ok(Some(Unit {
            topic: self.topic.clone(),
            payload: Bytes::from(payload),
            retain: false,
            seqs: Seqs::Many(records.iter().map(|r| r.seq).collect()),
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::record::{Origin, OriginKind, Record};

    fn queue(n: u64) -> VecDeque<StoredRecord> {
        (0..n)
            .map(|seq| StoredRecord {
                seq,
                record: Record {
                    topic: format!("t/{}", seq % 3),
                    payload: Bytes::from(format!("p{seq}")),
                    qos: 1,
                    retain: false,
                    origin: Origin {
                        kind: OriginKind::Socket,
                        name: Arc::from("s"),
                    },
                    ts_ms: 1000 + seq,
                },
            })
            .collect()
    }

    #[test]
    fn full_batches_go_partial_ones_wait_for_flush() {
        let mut p = BatchPacker::new(BatchSettings {
            prefix: "up".into(),
            gateway: "gw".into(),
            stream: "default".into(),
            epoch: 9,
            batch_size: 4,
            linger: Duration::from_secs(1),
            level: 3,
        })
        .expect("packer");
        let mut q = queue(6);
        let unit = p.pack(&mut q, false).expect("pack").expect("a full batch");
        assert_eq!(unit.topic, "up/batch/default");
        assert_eq!(unit.seqs, Seqs::Many(vec![0, 1, 2, 3]));
        let batch = crate::wire::decode(&unit.payload, &|_| None).expect("decodes");
        assert_eq!(batch.records.len(), 4);
        assert_eq!(batch.header.epoch, 9);
        assert!(
            p.pack(&mut q, false).expect("pack").is_none(),
            "2 left: waits"
        );
        let unit = p.pack(&mut q, true).expect("pack").expect("flushed");
        assert_eq!(unit.seqs, Seqs::Many(vec![4, 5]));
        assert!(
            p.pack(&mut q, true).expect("pack").is_none(),
            "nothing left"
        );
    }
}
