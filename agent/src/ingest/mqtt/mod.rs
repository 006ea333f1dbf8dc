//! The local MQTT endpoint: an embedded MQTT 3.1.1 / 5.0 server that devices on the
//! gateway publish to, so a gateway needs no separate broker.
//!
//! What it is and is not (docs/local-mqtt.md has the full account):
//! - PUBACK (QoS 1) / PUBREC (QoS 2) only after the message is committed to the store,
//!   for topics matching `topics` (relayed upstream); other topics stay local.
//! - Local fan-out to local subscribers at QoS 0/1 (`router`).
//! - No persistent sessions: CONNACK always says session-present = 0, and nothing of a
//!   client is kept after it disconnects. Retained messages are relayed upstream with
//!   their retain flag but not kept for local subscribers.
//!
//! `proto` decodes/encodes packets (rumqttc's codecs), `session` runs one connection,
//! `auth` checks passwords, `router` fans out.

pub mod auth;
pub mod proto;
pub mod router;
pub mod session;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::IngestError;
use crate::config::LocalMqttConfig;
use crate::store::Store;

/// Counters of the endpoint.
#[derive(Debug, Clone, Copy)]
pub enum Stat {
    Connections,
    RefusedConnections,
    AuthFailures,
    ProtocolErrors,
    PublishesReceived,
    Acknowledged,
    RejectedFull,
}

#[derive(Debug, Default)]
pub struct MqttStats {
    counters: [AtomicU64; 7],
}

impl MqttStats {
    pub fn get(&self, s: Stat) -> u64 {
        self.counters[s as usize].load(Ordering::Relaxed)
    }
}

/// What every connection of the endpoint shares.
#[derive(Debug)]
pub struct Shared {
    pub cfg: LocalMqttConfig,
    pub store: Store,
    /// Which stream each published topic is buffered in.
    pub routes: crate::ingest::Routes,
    pub router: router::Router,
    pub auth: Option<Arc<auth::PasswordFile>>,
    pub stats: MqttStats,
    /// client id → (connection id, token that closes it): session takeover.
    clients: Mutex<HashMap<String, (u64, CancellationToken)>>,
    next_conn: AtomicU64,
}

impl Shared {
    pub fn count(&self, s: Stat) {
        self.stats.counters[s as usize].fetch_add(1, Ordering::Relaxed);
    }

    fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Register `client_id` for `conn`, closing an older connection with the same id.
    fn register_client(&self, client_id: &str, conn: u64) -> CancellationToken {
        let token = CancellationToken::new();
        if let Ok(mut m) = self.clients.lock() {
            if let Some((_, old)) = m.insert(client_id.to_owned(), (conn, token.clone())) {
                old.cancel();
            }
        }
        token
    }

    fn unregister_client(&self, client_id: &str, conn: u64) {
        if let Ok(mut m) = self.clients.lock() {
            if m.get(client_id).is_some_and(|(c, _)| *c == conn) {
                m.remove(client_id);
            }
        }
    }
}

/// The bound endpoint.
#[derive(Debug)]
pub struct LocalMqtt {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl LocalMqtt {
    pub async fn bind(
        cfg: LocalMqttConfig,
        store: Store,
        routes: crate::ingest::Routes,
    ) -> Result<Self, IngestError> {
        let listen = format!("mqtt://{}", cfg.listen);
        let auth = match &cfg.password_file {
            Some(p) => Some(Arc::new(auth::PasswordFile::load(p)?)),
            None => None,
        };
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| IngestError::Bind { listen, source })?;
        Ok(Self {
            listener,
            shared: Arc::new(Shared {
                cfg,
                store,
                routes,
                router: router::Router::default(),
                auth,
                stats: MqttStats::default(),
                clients: Mutex::new(HashMap::new()),
                next_conn: AtomicU64::new(1),
            }),
        })
    }

    pub async fn run(self, tracker: TaskTracker, cancel: CancellationToken) {
        let shared = self.shared;
        let limit = Arc::new(Semaphore::new(shared.cfg.max_connections.get()));
        tracing::info!(listen = %shared.cfg.listen, "local MQTT endpoint listening");
        loop {
            let (stream, peer) = tokio::select! {
                _ = cancel.cancelled() => break,
                r = self.listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "MQTT accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = limit.clone().try_acquire_owned() else {
                shared.count(Stat::RefusedConnections);
                crate::telemetry::metrics()
                    .rejected
                    .get_or_create(&crate::telemetry::labels(&[
                        ("source", "mqtt"),
                        ("reason", "max_connections"),
                    ]))
                    .inc();
                tracing::warn!(%peer, max = shared.cfg.max_connections.get(), "MQTT connection refused: max_connections reached");
                continue;
            };
            shared.count(Stat::Connections);
            let (s, c) = (shared.clone(), cancel.clone());
            let connected = &crate::telemetry::metrics().local_connections;
            connected.inc();
            tracker.spawn(async move {
                session::serve(s, stream, peer, c).await;
                crate::telemetry::metrics().local_connections.dec();
                drop(permit);
            });
        }
        tracing::info!(
            publishes = shared.stats.get(Stat::PublishesReceived),
            acknowledged = shared.stats.get(Stat::Acknowledged),
            protocol_errors = shared.stats.get(Stat::ProtocolErrors),
            auth_failures = shared.stats.get(Stat::AuthFailures),
            "local MQTT endpoint stopped"
        );
    }
}
