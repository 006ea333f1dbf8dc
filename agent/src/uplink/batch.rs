//! Batch mode: many records per publish, in the versioned wire format (`wire`),
//! zstd-compressed, to `{topic_prefix}/batch/{stream}`.
//!
//! A batch goes when it is full (`batch_size` records) or, once the store is drained,
//! when its oldest record has waited `linger` — bigger batches compress better, the
//! linger bounds the latency that costs.
//!
//! The dictionary batches use is `DictState`'s decision (announced and acknowledged
//! first); training runs on a short-lived thread so the uplink never stalls on it.

use std::collections::VecDeque;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::dictionary::{self, DictMode, DictPolicy, DictState, Persisted};
use super::forward::{upstream_topic, Announcement, MetaWrite, Packer, Seqs, Unit, UplinkError};
use crate::control::Plan;
use crate::record::StoredRecord;
use crate::wire::{Compression, Dictionary, Encoder, Source, WireError};

type Trained = Result<Option<Dictionary>, WireError>;

pub struct BatchPacker {
    encoder: Encoder,
    /// Id of the dictionary `encoder` was built with (0: none).
    encoder_dict: u64,
    level: i32,
    gateway: String,
    epoch: u64,
    /// `[upstream] topic_prefix`: batches go to `{prefix}/batch/{stream}`.
    prefix: String,
    batch_size: usize,
    linger: Duration,
    dicts: DictState,
    training: Option<mpsc::Receiver<Trained>>,
}

impl std::fmt::Debug for BatchPacker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchPacker")
            .field("prefix", &self.prefix)
            .field("batch_size", &self.batch_size)
            .field("linger", &self.linger)
            .field("dictionary", &format_args!("{:016x}", self.encoder_dict))
            .finish_non_exhaustive()
    }
}

/// Where a packer's batches come from and how they are built.
#[derive(Debug, Clone)]
pub struct BatchSettings {
    pub prefix: String,
    pub gateway: String,
    pub epoch: u64,
    pub batch_size: usize,
    pub linger: Duration,
    pub level: i32,
    pub dictionary: DictMode,
    pub dict_policy: DictPolicy,
    /// The dictionary an earlier run adopted.
    pub persisted: Option<Persisted>,
}

impl BatchPacker {
    pub fn new(s: BatchSettings) -> Result<Self, UplinkError> {
        let dicts = DictState::new(s.dictionary, s.dict_policy, &s.prefix, s.persisted);
        let mut p = Self {
            encoder: Encoder::new(Compression::Zstd {
                level: s.level,
                dictionary: None,
            })?,
            encoder_dict: 0,
            level: s.level,
            gateway: s.gateway,
            epoch: s.epoch,
            prefix: s.prefix,
            batch_size: s.batch_size.max(1),
            linger: s.linger,
            dicts,
            training: None,
        };
        p.sync_encoder()?;
        Ok(p)
    }

    /// Rebuild the encoder when the dictionary in use changed (its zstd context with the
    /// dictionary loaded is prepared once, not per batch).
    fn sync_encoder(&mut self) -> Result<(), UplinkError> {
        let want = self.dicts.in_use().map_or(0, |d| d.id);
        if want != self.encoder_dict {
            self.encoder = Encoder::new(Compression::Zstd {
                level: self.level,
                dictionary: self.dicts.in_use().map(|d| &**d),
            })?;
            self.encoder_dict = want;
            tracing::debug!(dictionary = %format_args!("{want:016x}"), "encoder rebuilt");
        }
        Ok(())
    }

    fn poll_training(&mut self) {
        let Some(rx) = &self.training else { return };
        match rx.try_recv() {
            Ok(outcome) => {
                self.training = None;
                self.dicts.trained(outcome);
            }
            Err(mpsc::TryRecvError::Empty) => {}
            Err(mpsc::TryRecvError::Disconnected) => {
                self.training = None;
                self.dicts.trained(Err(WireError::Compress(
                    "the training thread failed".into(),
                )));
            }
        }
    }

    fn start_training(&mut self, now: Instant) {
        if self.training.is_some() {
            return;
        }
        let Some(job) = self.dicts.take_training(now) else {
            return;
        };
        let (tx, rx) = mpsc::channel();
        let (level, batch) = (self.level, self.batch_size);
        tracing::info!(
            samples = job.samples.len(),
            "training a compression dictionary"
        );
        let spawned = std::thread::Builder::new()
            .name("dict-train".into())
            .spawn(move || {
                let _ = tx.send(dictionary::train(&job, level, batch));
            });
        match spawned {
            Ok(_) => self.training = Some(rx),
            Err(e) => self.dicts.trained(Err(WireError::Compress(format!(
                "cannot start training: {e}"
            )))),
        }
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
        stream: &str,
        queue: &mut VecDeque<StoredRecord>,
        flush: bool,
    ) -> Result<Option<Unit>, UplinkError> {
        if queue.is_empty() || (queue.len() < self.batch_size && !flush) {
            return Ok(None);
        }
        self.sync_encoder()?;
        let n = queue.len().min(self.batch_size);
        let mut records: Vec<StoredRecord> = queue.drain(..n).collect();
        // Newest-first lanes queue chunks newest first; a batch is in seq order.
        if records.windows(2).any(|w| w[1].seq < w[0].seq) {
            records.sort_unstable_by_key(|r| r.seq);
        }
        let now = Instant::now();
        self.dicts
            .observe(records.iter().map(|r| r.record.payload.as_ref()), now);
        self.start_training(now);
        let src = Source {
            gateway: &self.gateway,
            stream,
            epoch: self.epoch,
        };
        if self.dicts.probe_next() {
            self.encoder.probe_next();
        }
        let stored_bytes = records
            .iter()
            .map(|r| r.record.payload.len() + r.record.topic.len())
            .sum();
        let payload = self.encoder.encode(src, &records)?;
        if let Some((with, without)) = self.encoder.last_probe() {
            self.dicts.probed(self.encoder_dict, with, without);
        }
        Ok(Some(Unit {
            topic: upstream_topic(&self.prefix, &format!("batch/{stream}")),
            payload: Bytes::from(payload),
            retain: false,
            seqs: Seqs::Many(records.iter().map(|r| r.seq).collect()),
            stored_bytes,
        }))
    }

    fn announcement(&mut self) -> Option<Announcement> {
        self.poll_training();
        self.dicts.announcement()
    }

    fn announced(&mut self, token: u64) -> Option<MetaWrite> {
        self.dicts.acked(token).map(|p| MetaWrite {
            key: Persisted::KEY,
            value: p.encode(),
        })
    }

    fn session_lost(&mut self) {
        self.dicts.session_lost();
    }

    fn set_plan(&mut self, plan: &Plan) {
        self.batch_size = plan.batch_size.max(1);
        self.linger = plan.linger;
        if plan.level != self.level && (1..=19).contains(&plan.level) {
            self.level = plan.level;
            // Rebuilt at the next batch, with the dictionary in use.
            self.encoder_dict = u64::MAX;
        }
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
            epoch: 9,
            batch_size: 4,
            linger: Duration::from_secs(1),
            level: 3,
            dictionary: DictMode::Off,
            dict_policy: DictPolicy::default(),
            persisted: None,
        })
        .expect("packer");
        let mut q = queue(6);
        let unit = p
            .pack("default", &mut q, false)
            .expect("pack")
            .expect("a full batch");
        assert_eq!(unit.topic, "up/batch/default");
        assert_eq!(unit.seqs, Seqs::Many(vec![0, 1, 2, 3]));
        let batch = crate::wire::decode(&unit.payload, &|_| None).expect("decodes");
        assert_eq!(batch.records.len(), 4);
        assert_eq!(batch.header.epoch, 9);
        assert!(
            p.pack("default", &mut q, false).expect("pack").is_none(),
            "2 left: waits"
        );
        let unit = p
            .pack("default", &mut q, true)
            .expect("pack")
            .expect("flushed");
        assert_eq!(unit.seqs, Seqs::Many(vec![4, 5]));
        assert!(
            p.pack("default", &mut q, true).expect("pack").is_none(),
            "nothing left"
        );
    }

    /// Poll until the training thread's dictionary is announced.
    fn await_announcement(p: &mut BatchPacker) -> Announcement {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(a) = p.announcement() {
                return a;
            }
            assert!(Instant::now() < deadline, "no dictionary announced");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn records(from: u64, payloads: impl Iterator<Item = String>) -> VecDeque<StoredRecord> {
        let mut q = queue(0);
        for (i, p) in payloads.enumerate() {
            let mut r = queue(1).pop_front().expect("one");
            r.seq = from + i as u64;
            r.record.payload = Bytes::from(p);
            q.push_back(r);
        }
        q
    }

    /// The real thing, with zstd: trains from the traffic, switches after the PUBACK,
    /// and retrains when the payloads change so much that the dictionary stops helping.
    #[test]
    fn trains_adopts_and_retrains_when_the_traffic_changes() {
        let policy = DictPolicy {
            sample_records: 500,
            retrain_interval: Duration::ZERO,
            probe_every: 2,
            ..DictPolicy::default()
        };
        let mut p = BatchPacker::new(BatchSettings {
            prefix: "up".into(),
            gateway: "gw".into(),
            epoch: 1,
            batch_size: 10,
            linger: Duration::from_secs(1),
            level: 3,
            dictionary: DictMode::Auto,
            dict_policy: policy,
            persisted: None,
        })
        .expect("packer");
        let json = |i: u64| {
            format!(
                "{{\"device\":\"d-{:03}\",\"temp\":{}.{},\"status\":\"ok\",\"fw\":\"2.4.1\"}}",
                i % 200,
                20 + i % 7,
                i % 10
            )
        };
        let mut q = records(0, (0..600).map(json));
        while let Some(u) = p.pack("default", &mut q, true).expect("pack") {
            let b = crate::wire::decode(&u.payload, &|_| None).expect("no dictionary yet");
            assert_eq!(b.header.dictionary, 0);
        }
        let a = await_announcement(&mut p);
        let id = crate::wire::content_id(&a.payload);
        let mut q = records(600, (600..640).map(json));
        let u = p
            .pack("default", &mut q, true)
            .expect("pack")
            .expect("unit");
        assert_eq!(
            crate::wire::peek_header(&u.payload)
                .expect("header")
                .0
                .dictionary,
            0,
            "not before the PUBACK"
        );
        let kept = p
            .announced(a.token)
            .expect("persist the adopted dictionary");
        assert_eq!(kept.key, Persisted::KEY);
        let d = Dictionary::new(a.payload.to_vec());
        let lookup = |x: u64| (x == id).then(|| d.clone());
        while let Some(u) = p.pack("default", &mut q, true).expect("pack") {
            let b = crate::wire::decode(&u.payload, &lookup).expect("decodes with the dictionary");
            assert_eq!(b.header.dictionary, id);
        }
        // Log lines instead of telemetry: the dictionary stops helping, a new one comes.
        let log = |i: u64| {
            format!("2026-11-26T10:{:02}:{:02} kernel: eth0 link flap #{i} carrier lost, renegotiating {}", i % 60, i % 60, "x".repeat((i % 13) as usize))
        };
        let mut q = records(1000, (1000..2000).map(log));
        let deadline = Instant::now() + Duration::from_secs(30);
        let second = loop {
            if let Some(a) = p.announcement() {
                break a;
            }
            if p.pack("default", &mut q, true).expect("pack").is_none() {
                q = records(5000, (5000..5600).map(log));
            }
            assert!(
                Instant::now() < deadline,
                "no retraining after the traffic changed"
            );
        };
        assert_ne!(crate::wire::content_id(&second.payload), id);
    }
}
