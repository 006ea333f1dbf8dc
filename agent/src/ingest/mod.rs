//! Ingest: everything that accepts messages from local producers and hands them to the
//! store. A producer is acknowledged only after the store has committed its message.
//!
//! Invariants: bad input from one client (oversize frames, garbage, slow reads) closes
//! that client only and never loses messages already committed; listeners are bound
//! before `run` returns so configuration mistakes fail at start-up, not later.

pub mod bridge;
pub mod framing;
pub mod mqtt;
pub mod socket;

use std::sync::atomic::{AtomicU64, Ordering};

use tokio_util::sync::CancellationToken;

use std::sync::Arc;

use crate::policy::Policies;
use crate::record::Record;
use crate::store::{AppendError, Refused, Store, StoreError, StreamId};

/// Which buffered stream a message goes to, by its topic (`[[policy]]`): resolved
/// once to store ids at start-up, then a lookup per message. A reload may replace the
/// policies (topics, priorities, degradation) but not the streams: every clone sees
/// the new ones at its next message.
#[derive(Debug, Clone)]
pub struct Routes {
    policies: Arc<std::sync::RwLock<Arc<Policies>>>,
    ids: Arc<[StreamId]>,
}

impl Routes {
    /// Create (durably) every stream the policies name.
    pub async fn open(store: &Store, policies: Policies) -> Result<Self, StoreError> {
        let mut ids = Vec::with_capacity(policies.streams().len());
        for (i, s) in policies.streams().iter().enumerate() {
            let id = store.stream(&s.name).await?;
            if policies.conflates(i) {
                store.track_latest(id);
            }
            ids.push(id);
        }
        Ok(Self {
            policies: Arc::new(std::sync::RwLock::new(Arc::new(policies))),
            ids: ids.into(),
        })
    }

    /// The stream of a message published to `topic`.
    pub fn stream(&self, topic: &str) -> StreamId {
        self.ids[self.policies().stream_of(topic)]
    }

    /// The policies in force.
    pub fn policies(&self) -> Arc<Policies> {
        self.policies
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Put `new` policies in force; they must name the same streams, in the same order
    /// (checked by the caller: `config::reload`).
    pub fn replace(&self, store: &Store, new: Arc<Policies>) {
        for (i, id) in self.ids.iter().enumerate() {
            if new.conflates(i) {
                store.track_latest(*id);
            }
        }
        *self.policies.write().unwrap_or_else(|e| e.into_inner()) = new;
    }

    /// Store ids, in the order of `policies().streams()`.
    pub fn ids(&self) -> &[StreamId] {
        &self.ids
    }
}

/// Counters for one ingest source (exported as metrics later; logged at shutdown).
#[derive(Debug, Default)]
pub struct IngestStats {
    pub accepted: AtomicU64,
    pub oversize: AtomicU64,
    pub rejected: AtomicU64,
    pub connections: AtomicU64,
    pub refused_connections: AtomicU64,
}

impl IngestStats {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("cannot listen on {listen}: {source}")]
    Bind {
        listen: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {listen}: {reason}")]
    UnixPath { listen: String, reason: String },
    #[error("local MQTT endpoint: {0}")]
    Auth(#[from] mqtt::auth::AuthError),
}

/// Append `record` and wait for its commit; while the buffer is full (reject-new), wait
/// for space to free and try again. This is how producers without a negative
/// acknowledgement (stream sockets, MQTT 3.1.1) get back-pressure instead of loss.
pub async fn append_waiting_for_space(
    store: &Store,
    stream: StreamId,
    record: Record,
    cancel: &CancellationToken,
    source: &str,
) -> Result<u64, AppendError> {
    let mut record = record;
    let mut freed: Option<tokio::sync::watch::Receiver<u64>> = None;
    let mut warned = false;
    loop {
        match store.append_or_return(stream, record).await {
            Ok(seq) => return Ok(seq),
            Err(Refused {
                error: AppendError::Full,
                record: Some(back),
            }) => {
                record = back;
                // Subscribe on the first refusal, then try again before waiting: space
                // freed between the refusal and the subscription is not missed.
                let Some(rx) = freed.as_mut() else {
                    let mut rx = store.freed();
                    rx.borrow_and_update();
                    freed = Some(rx);
                    continue;
                };
                if !warned {
                    tracing::warn!(%source, "buffer full (reject-new): holding this producer until space frees");
                    warned = true;
                }
                tokio::select! {
                    _ = cancel.cancelled() => return Err(AppendError::Closed),
                    changed = rx.changed() => if changed.is_err() { return Err(AppendError::Closed) },
                }
            }
            Err(refused) => return Err(refused.error),
        }
    }
}
