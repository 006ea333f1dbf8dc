//! Client mode (`[local_broker]`): where a broker already runs on the gateway, subscribe
//! to it instead of being the devices' endpoint.
//!
//! Invariants: the subscription is QoS 1 on a persistent session (clean_session = false,
//! a fixed client id) with manual acknowledgements, and the PUBACK to the local broker
//! is sent only after the message is committed to the store — so a crash of the agent
//! leaves unacknowledged messages with the local broker, which redelivers them. PUBACKs
//! go out in the order the messages arrived (MQTT 4.6). rumqttc's event loop runs in its
//! own task and is never cancelled mid-poll.

use std::sync::Arc;
use std::time::Duration;

use futures::stream::FuturesOrdered;
use futures::StreamExt;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::LocalBrokerConfig;
use crate::record::{Origin, OriginKind, Record};
use crate::store::{Store, StreamId};
use crate::uplink::backoff::Backoff;

/// Messages handed from the event loop to the committer; the local broker's own
/// in-flight limit keeps QoS 1/2 traffic far below this.
const HANDOFF: usize = 256;

#[derive(Debug)]
pub struct Bridge {
    cfg: LocalBrokerConfig,
    store: Store,
    stream: StreamId,
}

impl Bridge {
    pub fn new(cfg: LocalBrokerConfig, store: Store, stream: StreamId) -> Self {
        Self { cfg, store, stream }
    }

    pub async fn run(self, cancel: CancellationToken) {
        let mut opts = MqttOptions::new(
            self.cfg.client_id.clone(),
            self.cfg.host.clone(),
            self.cfg.port,
        );
        opts.set_clean_session(false);
        opts.set_manual_acks(true);
        opts.set_keep_alive(self.cfg.keep_alive);
        opts.set_max_packet_size(16 << 20, 16 << 20);
        if let Some(user) = &self.cfg.username {
            opts.set_credentials(
                user.clone(),
                self.cfg
                    .password
                    .as_ref()
                    .map(|p| p.expose().to_owned())
                    .unwrap_or_default(),
            );
        }
        let (client, eventloop) = AsyncClient::new(opts, 64);
        let (tx, rx) = mpsc::channel(HANDOFF);
        let poller = tokio::spawn(poll(
            eventloop,
            client.clone(),
            self.cfg.clone(),
            tx,
            cancel.clone(),
        ));
        self.commit_and_ack(client.clone(), rx, &cancel).await;
        let _ = poller.await;
        let _ = client.try_disconnect();
    }

    /// Commit each message, then acknowledge it to the local broker, in arrival order.
    async fn commit_and_ack(
        &self,
        client: AsyncClient,
        mut rx: mpsc::Receiver<Publish>,
        cancel: &CancellationToken,
    ) {
        let origin = Origin {
            kind: OriginKind::LocalBroker,
            name: Arc::from(self.cfg.url.as_str()),
        };
        let mut pending = FuturesOrdered::new();
        let mut open = true;
        while open || !pending.is_empty() {
            tokio::select! {
                msg = rx.recv(), if open => match msg {
                    None => open = false,
                    Some(p) => {
                        let record = Record {
                            topic: p.topic.clone(),
                            payload: p.payload.clone(),
                            qos: p.qos as u8,
                            retain: p.retain,
                            origin: origin.clone(),
                            ts_ms: crate::record::now_ms(),
                        };
                        let (store, stream, cancel) = (self.store.clone(), self.stream, cancel.clone());
                        pending.push_back(async move {
                            let r = crate::ingest::append_waiting_for_space(&store, stream, record, &cancel, "local broker").await;
                            (p, r)
                        });
                    }
                },
                Some((p, result)) = pending.next(), if !pending.is_empty() => match result {
                    Ok(_) => {
                        if p.qos != QoS::AtMostOnce {
                            if let Err(e) = client.ack(&p).await {
                                tracing::debug!(error = %e, "cannot queue PUBACK to the local broker");
                            }
                        }
                    }
                    // Not acknowledged: the local broker keeps it and redelivers it.
                    Err(e) => tracing::warn!(topic = %p.topic, error = %e, "message from the local broker not stored"),
                },
            }
        }
    }
}

async fn poll(
    mut eventloop: rumqttc::EventLoop,
    client: AsyncClient,
    cfg: LocalBrokerConfig,
    tx: mpsc::Sender<Publish>,
    cancel: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let broker = format!("{}:{}", cfg.host, cfg.port);
    loop {
        let ev = tokio::select! {
            _ = cancel.cancelled() => break,
            ev = eventloop.poll() => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                backoff.reset();
                tracing::info!(%broker, session_present = ack.session_present, "connected to the local broker");
                let subs = cfg
                    .topics
                    .iter()
                    .map(|t| rumqttc::SubscribeFilter::new(t.clone(), QoS::AtLeastOnce));
                if let Err(e) = client.try_subscribe_many(subs) {
                    tracing::error!(error = %e, "cannot subscribe on the local broker");
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if p.qos == QoS::AtMostOnce {
                    if tx.try_send(p).is_err() {
                        tracing::debug!(
                            "QoS 0 message from the local broker dropped: committer busy"
                        );
                    }
                } else if tx.send(p).await.is_err() {
                    break;
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(%broker, error = %e, "local broker connection error");
                let delay = backoff.next_delay(rand::random::<f64>());
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}
