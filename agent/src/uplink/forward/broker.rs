//! The forwarder's side of what flows back: PUBACKs (and the deletes, gap and
//! dictionary bookkeeping they release), gap notices going out, and the once-a-second
//! reports — TCP_INFO and PUBACK round trips to the link monitor, the controller's new
//! plan to the pacer and packer.
//!
//! Invariants: a PUBACK releases only the publish its connection assigned that packet
//! id to; a gap is forgotten only after its notice's PUBACK, before the next look for
//! gaps; bytes delivered are summed over the session's connections.

use std::time::Instant;

use bytes::Bytes;

use super::{gap_notice, upstream_topic, Forwarder, Progress, Seqs, UplinkError, GAP_BATCH};
use crate::link::LinkEvent;
use crate::uplink::conn::{Conn, InFlight, PubackTally};
use crate::uplink::session::{Incoming, Session, SessionError};

impl Forwarder {
    /// Publish notices of the gaps the store holds (at most `GAP_BATCH`) on `c`.
    pub(super) async fn report_gaps(
        &mut self,
        c: &mut Conn,
        progress: &mut Progress,
    ) -> Result<(), UplinkError> {
        let gaps = self.store.gaps(GAP_BATCH).await?;
        let names = self.store.stats();
        for g in gaps {
            if self.refused_gaps.contains(&(g.stream, g.first)) {
                continue;
            }
            let stream = names
                .streams
                .iter()
                .find(|st| st.id == g.stream)
                .map_or("?", |st| st.name.as_str());
            let body = gap_notice(&self.gateway, self.store.epoch(), stream, &g);
            tracing::warn!(
                stream,
                first = g.first,
                last = g.last,
                count = g.count,
                reason = g.reason.as_str(),
                "reporting records dropped unsent"
            );
            let topic = upstream_topic(&self.cfg.topic_prefix, "gap");
            c.publish(topic, Bytes::from(body), false, InFlight::Gap(g))?;
            crate::telemetry::metrics()
                .gap_notices
                .get_or_create(&crate::telemetry::labels(&[("reason", g.reason.as_str())]))
                .inc();
            progress.gaps_reporting += 1;
        }
        Ok(())
    }

    /// A packet from the broker on `c`.
    pub(super) async fn on_packet(
        &mut self,
        c: &mut Conn,
        packet: Option<Result<Incoming, SessionError>>,
        progress: &mut Progress,
    ) -> Result<(), UplinkError> {
        c.last_rx = Instant::now();
        let (pkid, refused) = match packet {
            Some(Ok(Incoming::PubAck { pkid, refused })) => (pkid, refused),
            Some(Ok(Incoming::PingResp)) => {
                progress.productive = true;
                return Ok(());
            }
            Some(Ok(Incoming::Disconnect(why))) => {
                return Err(SessionError::Disconnected(why).into())
            }
            Some(Ok(Incoming::Other(other))) => {
                tracing::debug!(packet = %other, "ignoring packet from broker");
                return Ok(());
            }
            Some(Err(e)) => return Err(e.into()),
            None => return Err(SessionError::Closed.into()),
        };
        let Some(p) = c.acked(pkid) else {
            tracing::debug!(pkid, "PUBACK for an unknown packet id ignored");
            return Ok(());
        };
        if let Some(r) = refused {
            // The broker answered: the link works, whatever it thinks of the publish.
            progress.productive = true;
            return self.refused(p.what, p.bytes, r).await;
        }
        progress.pubacks.count += 1;
        progress.pubacks.rtt_sum += p.queued.elapsed();
        progress.pubacks.bytes += p.bytes;
        crate::telemetry::metrics()
            .puback_latency
            .observe(p.queued.elapsed().as_secs_f64());
        match p.what {
            InFlight::Records(lane, seqs, stored) => {
                let records = match &seqs {
                    Seqs::One(_) => 1,
                    Seqs::Many(v) => v.len(),
                };
                self.count_upload(lane, records, stored, p.bytes);
                if !self.attempts.is_empty() {
                    if let Some(id) = self.lanes.get(lane).map(|l| l.id) {
                        match &seqs {
                            Seqs::One(s) => {
                                self.attempts.remove(&(id, *s));
                            }
                            Seqs::Many(v) => v.iter().for_each(|s| {
                                self.attempts.remove(&(id, *s));
                            }),
                        }
                    }
                }
                self.pacer.acked(p.bytes);
                if let Some((adapter, _)) = self.adapt.as_mut() {
                    adapter.acked(p.bytes);
                }
                if let Some(lane) = self.lanes.get_mut(lane) {
                    match seqs {
                        Seqs::One(seq) => lane.acked.push(seq),
                        Seqs::Many(seqs) => lane.acked.extend(seqs),
                    }
                }
                progress.productive = true;
            }
            InFlight::Gap(g) => {
                progress.gaps_reporting -= 1;
                // Forgotten before anything else happens, so the next look for gaps
                // cannot report it twice. Gaps are rare: waiting for this one commit
                // here costs nothing.
                if let Err(e) = self.store.ack_gaps(vec![g]).await {
                    tracing::error!(error = %e, "could not forget a reported gap; it will be reported again");
                }
            }
            InFlight::Announcement(token) => {
                // Rare too (a new dictionary); if keeping it fails, the next run merely
                // trains again.
                if let Some(w) = self.packer.announced(token) {
                    if let Err(e) = self.store.put_meta(w.key, w.value).await {
                        tracing::warn!(error = %e, key = w.key, "could not keep uplink state with the buffer");
                    }
                }
            }
        }
        Ok(())
    }

    /// The broker acknowledged `records` records of `lane`, `stored` bytes as buffered,
    /// `wire` as published.
    fn count_upload(&self, lane: usize, records: usize, stored: usize, wire: usize) {
        let m = crate::telemetry::metrics();
        if let Some(l) = self.lanes.get(lane) {
            m.uploaded_records
                .get_or_create(&crate::telemetry::labels(&[("stream", &l.name)]))
                .inc_by(records as u64);
        }
        for (kind, n) in [("stored", stored), ("wire", wire)] {
            m.uploaded_bytes
                .get_or_create(&crate::telemetry::labels(&[("kind", kind)]))
                .inc_by(n as u64);
        }
        self.telemetry.update(|s| {
            s.last_ack = Some(Instant::now());
            s.uploaded_records += records as u64;
            s.stored_bytes += stored as u64;
            s.wire_bytes += wire as u64;
        });
    }

    /// Once a second: the controller's next plan from the link quality and the store.
    pub(super) fn replan(&mut self) {
        let Some((adapter, quality)) = self.adapt.as_mut() else {
            // Fixed behaviour: the plan never changes, but operators still see it.
            let plan = *self.pacer.plan();
            self.telemetry.update(|s| s.plan = Some(plan));
            return;
        };
        let q = *quality.borrow();
        let stats = self.store.stats();
        let plan = adapter.tick(q, &stats);
        self.pacer.set_plan(plan);
        self.packer.set_plan(&plan);
        let c = adapter.controller();
        let (phase, bandwidth) = (c.phase(), c.bandwidth());
        self.telemetry.update(|s| {
            s.plan = Some(plan);
            s.phase = phase;
            s.bandwidth = bandwidth;
        });
        tracing::debug!(
            phase = c.phase(),
            bandwidth = c.bandwidth() as u64,
            base_rtt_ms = c.base_rtt().as_secs_f64() * 1e3,
            paused = plan.paused,
            rate = plan.rate,
            window = plan.window,
            in_flight = self.pacer.in_flight(),
            batch_size = plan.batch_size,
            level = plan.level,
            backlog_bytes = stats.streams.iter().map(|s| s.state.bytes).sum::<u64>(),
            "uplink plan"
        );
        if plan.degraded != self.degraded {
            tracing::info!(
                normal = plan.degraded.normal,
                low = plan.degraded.low,
                "degradation changed (the link cannot keep up with what arrives)"
            );
            self.degraded = plan.degraded;
        }
    }

    /// Once a second: TCP_INFO of the measured connection and the PUBACKs since last
    /// time. Bytes delivered count both connections: both cross the bottleneck.
    pub(super) fn report_link(
        &self,
        s: &Session,
        express: Option<&Session>,
        connection: u64,
        pubacks: &mut PubackTally,
    ) {
        if self.link.wants_tcp_info() {
            match crate::link::sys::read(&s.writer, connection) {
                Ok(mut t) => {
                    if let Some(e) = express {
                        match crate::link::sys::read(&e.writer, 0) {
                            Ok(x) => t.bytes_acked = t.bytes_acked.saturating_add(x.bytes_acked),
                            Err(e) => {
                                tracing::debug!(error = %e, "TCP_INFO of the high-priority socket")
                            }
                        }
                    }
                    self.link.send(LinkEvent::Transport(t))
                }
                Err(e) => tracing::debug!(error = %e, "TCP_INFO of the upstream socket"),
            }
        }
        let p = std::mem::take(pubacks);
        if p.count > 0 {
            self.link.send(LinkEvent::Pubacks {
                count: p.count,
                mean_rtt: p.rtt_sum / p.count,
                bytes: p.bytes,
            });
        }
    }
}
