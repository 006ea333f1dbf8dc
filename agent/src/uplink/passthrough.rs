//! Passthrough uplink: every stored record is published unchanged at QoS 1 to
//! `{topic_prefix}/{topic}` and deleted from the store only after the broker's PUBACK.
//!
//! Invariants:
//! - A record is deleted only for a PUBACK whose packet id this session assigned to it.
//! - At most `inflight` publishes await PUBACK; the store is read in bounded chunks, so
//!   memory does not depend on the backlog.
//! - After any disconnect the next session starts again from the head of the stream:
//!   whatever was not acknowledged is sent again (duplicates possible, loss not).
//! - The socket is always read while writes are pending, so PUBACKs and keep-alive are
//!   handled even when the link is slow.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use rumqttc::mqttbytes::v4::Packet;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use super::backoff::Backoff;
use super::session::{Session, SessionError};
use crate::config::UpstreamConfig;
use crate::record::StoredRecord;
use crate::store::{AppendError, Store, StoreError, StreamId};

/// The store is read ahead in chunks of at most this many records and bytes: one read
/// transaction (and one blocking-pool hop) serves many publishes, and memory held for
/// read-ahead stays small whatever the backlog.
const READ_CHUNK_RECORDS: usize = 512;
const READ_CHUNK_BYTES: usize = 256 << 10;
/// Ack (delete) transactions in flight to the store writer at once.
const MAX_ACK_COMMITS: usize = 4;
/// On shutdown, wait this long for outstanding PUBACKs before disconnecting.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("reading the buffer: {0}")]
    Store(#[from] StoreError),
}

type AckFuture = Pin<Box<dyn Future<Output = Result<(), AppendError>> + Send>>;

/// The upstream topic of a record.
pub fn upstream_topic(prefix: &str, topic: &str) -> String {
    if prefix.is_empty() {
        topic.to_owned()
    } else {
        format!("{prefix}/{topic}")
    }
}

#[derive(Debug)]
pub struct Passthrough {
    cfg: UpstreamConfig,
    store: Store,
    stream: StreamId,
}

/// How a session ended.
enum End {
    Shutdown(Session),
    Lost(UplinkError),
}

impl Passthrough {
    pub fn new(cfg: UpstreamConfig, store: Store, stream: StreamId) -> Self {
        Self { cfg, store, stream }
    }

    pub async fn run(self, cancel: CancellationToken) {
        let mut backoff = Backoff::new(self.cfg.reconnect_min, self.cfg.reconnect_max);
        let addr = format!("{}:{}", self.cfg.host, self.cfg.port);
        loop {
            let connected = tokio::select! {
                _ = cancel.cancelled() => break,
                r = Session::connect(&self.cfg) => r,
            };
            match connected {
                Ok(session) => {
                    tracing::info!(broker = %addr, client_id = %self.cfg.client_id, "connected upstream");
                    let mut productive = false;
                    match self.serve(session, &cancel, &mut productive).await {
                        End::Shutdown(session) => {
                            session.disconnect(Duration::from_secs(1)).await;
                            tracing::info!(broker = %addr, "disconnected upstream");
                            break;
                        }
                        End::Lost(e) => {
                            tracing::warn!(broker = %addr, error = %e, "upstream connection lost")
                        }
                    }
                    if productive {
                        backoff.reset();
                    }
                }
                Err(e) => tracing::warn!(broker = %addr, error = %e, "cannot connect upstream"),
            }
            let delay = backoff.next_delay(rand::random::<f64>());
            tracing::debug!(?delay, "reconnecting after backoff");
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn serve(
        &self,
        mut s: Session,
        cancel: &CancellationToken,
        productive: &mut bool,
    ) -> End {
        let window = usize::from(self.cfg.inflight.get());
        let keep_alive = self.cfg.keep_alive;
        let mut inflight: HashMap<u16, u64> = HashMap::with_capacity(window);
        let mut queue: VecDeque<StoredRecord> = VecDeque::new();
        let mut cursor: Option<u64> = None;
        let mut caught_up = false;
        let mut committed = self.store.committed();
        committed.borrow_and_update();
        let mut acked: Vec<u64> = Vec::new();
        let mut ack_commits: FuturesUnordered<AckFuture> = FuturesUnordered::new();
        let mut last_rx = Instant::now();
        let mut last_tx = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut drain_deadline: Option<tokio::time::Instant> = None;

        let end = 'session: loop {
            if drain_deadline.is_none() {
                while inflight.len() < window {
                    if queue.is_empty() {
                        if caught_up {
                            break;
                        }
                        match self
                            .store
                            .read(self.stream, cursor, READ_CHUNK_RECORDS, READ_CHUNK_BYTES)
                            .await
                        {
                            Ok(chunk) if chunk.is_empty() => {
                                caught_up = true;
                                break;
                            }
                            Ok(chunk) => queue.extend(chunk),
                            Err(e) => break 'session End::Lost(e.into()),
                        }
                    }
                    let Some(r) = queue.pop_front() else { break };
                    cursor = Some(r.seq);
                    let pkid = s.alloc_pkid(|id| inflight.contains_key(&id));
                    let topic = upstream_topic(&self.cfg.topic_prefix, &r.record.topic);
                    if let Err(e) = s.queue_publish(topic, r.record.payload, r.record.retain, pkid)
                    {
                        break 'session End::Lost(e.into());
                    }
                    inflight.insert(pkid, r.seq);
                }
            } else if inflight.is_empty() && s.out.is_empty() {
                break 'session End::Shutdown(s);
            }
            if !acked.is_empty() && ack_commits.len() < MAX_ACK_COMMITS {
                ack_commits.push(self.ack_future(std::mem::take(&mut acked)));
            }

            tokio::select! {
                biased;
                _ = cancel.cancelled(), if drain_deadline.is_none() => {
                    drain_deadline = Some(tokio::time::Instant::now() + DRAIN_TIMEOUT);
                }
                _ = sleep_until_opt(drain_deadline) => break 'session End::Shutdown(s),
                packet = s.reader.next() => {
                    last_rx = Instant::now();
                    match packet {
                        Some(Ok(Packet::PubAck(ack))) => {
                            if let Some(seq) = inflight.remove(&ack.pkid) {
                                acked.push(seq);
                                *productive = true;
                            } else {
                                tracing::debug!(pkid = ack.pkid, "PUBACK for an unknown packet id ignored");
                            }
                        }
                        Some(Ok(Packet::PingResp)) => *productive = true,
                        Some(Ok(other)) => tracing::debug!(packet = ?other, "ignoring packet from broker"),
                        Some(Err(e)) => break 'session End::Lost(SessionError::from(e).into()),
                        None => break 'session End::Lost(SessionError::Closed.into()),
                    }
                }
                written = s.writer.write_buf(&mut s.out), if !s.out.is_empty() => match written {
                    Ok(0) => break 'session End::Lost(SessionError::Closed.into()),
                    Ok(_) => last_tx = Instant::now(),
                    Err(e) => break 'session End::Lost(SessionError::Io(e).into()),
                },
                Some(done) = ack_commits.next(), if !ack_commits.is_empty() => {
                    if let Err(e) = done {
                        // The records stay stored and will be sent again: a duplicate, not a loss.
                        tracing::error!(error = %e, "could not delete acknowledged records");
                    }
                }
                changed = committed.changed(), if caught_up && drain_deadline.is_none() => {
                    if changed.is_err() {
                        drain_deadline = Some(tokio::time::Instant::now() + DRAIN_TIMEOUT);
                    }
                    caught_up = false;
                }
                _ = tick.tick() => {
                    if last_rx.elapsed() > keep_alive + keep_alive / 2 {
                        break 'session End::Lost(SessionError::KeepAliveTimeout(last_rx.elapsed()).into());
                    }
                    if last_tx.elapsed() >= keep_alive && s.out.is_empty() {
                        if let Err(e) = s.queue(&Packet::PingReq) {
                            break 'session End::Lost(e.into());
                        }
                    }
                }
            }
        };

        // Whatever was acknowledged must be deleted before the next session re-reads the
        // head, or it would be sent again.
        if !acked.is_empty() {
            ack_commits.push(self.ack_future(acked));
        }
        while let Some(done) = ack_commits.next().await {
            if let Err(e) = done {
                tracing::error!(error = %e, "could not delete acknowledged records");
            }
        }
        if !inflight.is_empty() {
            tracing::info!(
                unacknowledged = inflight.len(),
                "records in flight stay buffered and will be sent again"
            );
        }
        if let End::Shutdown(mut session) = end {
            let _ = session.writer.flush().await;
            return End::Shutdown(session);
        }
        end
    }

    fn ack_future(&self, seqs: Vec<u64>) -> AckFuture {
        let store = self.store.clone();
        let stream = self.stream;
        Box::pin(async move { store.ack(stream, seqs).await })
    }
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::upstream_topic;

    #[test]
    fn topics() {
        assert_eq!(upstream_topic("", "a/b"), "a/b");
        assert_eq!(upstream_topic("edgerelay/gw1", "a/b"), "edgerelay/gw1/a/b");
    }
}
