//! What the forwarder does when the broker says no (MQTT 5 PUBACK reason ≥ 0x80) or
//! a publish would exceed the broker's maximum packet size: the records are not
//! deleted, and not allowed to hold back the rest. A refused publish of several
//! records is split: each is sent again on its own, so one bad record does not take
//! its batch down with it; a record refused `[upstream] max_attempts` times (or too
//! large for the broker on its own) moves to the dead letters (store/dead.rs).
//!
//! Invariants: a refused record is either queued again in its lane or buried, never
//! dropped; its attempts are counted across publishes and sessions, and forgotten once
//! it is acknowledged or buried.

use super::{Forwarder, Seqs, Unit, UplinkError};
use crate::store::dead::Burial;
use crate::store::StreamId;
use crate::uplink::conn::InFlight;
use crate::uplink::session::Refusal;

impl Forwarder {
    /// The broker refused the publish that carried `what`.
    pub(super) async fn refused(
        &mut self,
        what: InFlight,
        bytes: usize,
        r: Refusal,
    ) -> Result<(), UplinkError> {
        match what {
            InFlight::Records(lane, seqs, _) => {
                self.pacer.acked(bytes);
                let seqs = match seqs {
                    Seqs::One(s) => vec![s],
                    Seqs::Many(v) => v,
                };
                self.refused_records(lane, seqs, &r.reason).await
            }
            InFlight::Gap(g) => {
                tracing::warn!(reason = %r.reason, stream = g.stream.0, first = g.first, "the broker refused a gap notice; it is sent again by the next session");
                self.refused_gaps.insert((g.stream, g.first));
                Ok(())
            }
            InFlight::Announcement(_) => {
                tracing::warn!(reason = %r.reason, "the broker refused a dictionary announcement; batches go without it");
                Ok(())
            }
        }
    }

    /// Records of `lane` the broker refused: count the attempt; queue them again one
    /// per publish, or bury those refused too often.
    async fn refused_records(
        &mut self,
        lane: usize,
        seqs: Vec<u64>,
        reason: &str,
    ) -> Result<(), UplinkError> {
        let Some(stream) = self.lanes.get(lane).map(|l| l.id) else {
            return Ok(());
        };
        let max = u32::from(self.cfg.max_attempts.get());
        let alone = seqs.len() == 1;
        let mut bury = Vec::new();
        let mut again = Vec::new();
        for seq in seqs {
            let n = self.attempts.entry((stream, seq)).or_insert(0);
            *n += 1;
            if alone && *n >= max {
                bury.push(Burial {
                    stream,
                    seq,
                    reason: reason.to_owned(),
                    attempts: *n,
                });
            } else {
                again.push(seq);
            }
        }
        if !again.is_empty() {
            tracing::warn!(
                records = again.len(),
                reason,
                "the broker refused a publish; sending its records again one at a time"
            );
            self.requeue_alone(lane, stream, &again).await?;
        }
        self.bury(bury).await
    }

    /// A publish larger than the broker's maximum packet size (`limit`): several
    /// records go again one per publish; a single one is buried.
    pub(super) async fn too_large(
        &mut self,
        lane: usize,
        unit: Unit,
        limit: usize,
    ) -> Result<(), UplinkError> {
        let Some(stream) = self.lanes.get(lane).map(|l| l.id) else {
            return Ok(());
        };
        match unit.seqs {
            Seqs::Many(v) if v.len() > 1 => {
                tracing::info!(records = v.len(), limit, "a batch over the broker's maximum packet size: sending its records one at a time");
                self.requeue_alone(lane, stream, &v).await
            }
            seqs => {
                let seq = match seqs {
                    Seqs::One(s) => Some(s),
                    Seqs::Many(v) => v.first().copied(),
                };
                let reason = format!(
                    "larger than the broker's maximum packet size ({limit} bytes) on its own"
                );
                let attempts = seq.map_or(1, |s| {
                    self.attempts.get(&(stream, s)).copied().unwrap_or(0) + 1
                });
                self.bury(
                    seq.into_iter()
                        .map(|seq| Burial {
                            stream,
                            seq,
                            reason: reason.clone(),
                            attempts,
                        })
                        .collect(),
                )
                .await
            }
        }
    }

    /// Read `seqs` of `stream` again (the packer took them) into `lane`'s retry queue.
    async fn requeue_alone(
        &mut self,
        lane: usize,
        stream: StreamId,
        seqs: &[u64],
    ) -> Result<(), UplinkError> {
        let (Some(&first), Some(&last)) = (seqs.iter().min(), seqs.iter().max()) else {
            return Ok(());
        };
        let span = usize::try_from(last - first + 1).unwrap_or(usize::MAX);
        let records = self
            .store
            .read(stream, first.checked_sub(1), span, usize::MAX)
            .await?;
        if let Some(l) = self.lanes.get_mut(lane) {
            l.retry
                .extend(records.into_iter().filter(|r| seqs.contains(&r.seq)));
        }
        Ok(())
    }

    /// Move `burials` to the dead letters, and say so once they are there.
    async fn bury(&mut self, burials: Vec<Burial>) -> Result<(), UplinkError> {
        if burials.is_empty() {
            return Ok(());
        }
        for b in &burials {
            self.attempts.remove(&(b.stream, b.seq));
        }
        let said: Vec<(u16, u64, u32, String)> = burials
            .iter()
            .map(|b| (b.stream.0, b.seq, b.attempts, b.reason.clone()))
            .collect();
        match self.store.bury(burials).await {
            Ok(n) => {
                crate::telemetry::metrics().dead_lettered.inc_by(n);
                for (stream, seq, attempts, reason) in said {
                    tracing::warn!(stream, seq, attempts, reason = %reason, "record moved to the dead letters (edgerelay dead-letters list | retry | purge)");
                }
            }
            // Still stored: it is read again by the next session and judged again.
            Err(e) => {
                tracing::error!(error = %e, "could not move refused records to the dead letters");
            }
        }
        Ok(())
    }
}
