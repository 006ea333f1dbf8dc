//! Client mode (`[local_broker]`): where a broker already runs on the gateway, subscribe
//! to it instead of being the devices' endpoint.
//!
//! Invariants:
//! - The subscription is QoS 1 on a persistent session (clean_session = false, a fixed
//!   client id) with manual acknowledgements; the PUBACK to the local broker is sent only
//!   after the message is committed — so a crash of the agent leaves unacknowledged
//!   messages with the local broker, which redelivers them. PUBACKs go out in arrival
//!   order (MQTT 4.6).
//! - rumqttc's event loop runs in its own task and keeps being polled until the final
//!   acknowledgements and DISCONNECT are sent.
//! - No deadlock between the two tasks: the committer holds at most `MAX_PENDING`
//!   messages and the hand-off at most `HANDOFF`, so acknowledgements outstanding never
//!   exceed `HANDOFF + MAX_PENDING` < `ACK_CHANNEL`, and queueing a PUBACK never waits
//!   on the event loop (which may itself be waiting to hand over a message).

use std::sync::Arc;
use std::time::Duration;

use futures::stream::FuturesOrdered;
use futures::StreamExt;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, Publish, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::LocalBrokerConfig;
use crate::ingest::Routes;
use crate::record::{Origin, OriginKind, Record};
use crate::store::Store;
use crate::uplink::backoff::Backoff;

const HANDOFF: usize = 256;
const MAX_PENDING: usize = 256;
const ACK_CHANNEL: usize = 1024;
/// On shutdown, time allowed for the last PUBACKs and the DISCONNECT to go out.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug)]
pub struct Bridge {
    cfg: LocalBrokerConfig,
    store: Store,
    routes: Routes,
}

impl Bridge {
    pub fn new(cfg: LocalBrokerConfig, store: Store, routes: Routes) -> Self {
        Self { cfg, store, routes }
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
        let (client, eventloop) = AsyncClient::new(opts, ACK_CHANNEL);
        let (tx, rx) = mpsc::channel(HANDOFF);
        let stop = CancellationToken::new();
        let mut poller = tokio::spawn(poll(
            eventloop,
            client.clone(),
            self.cfg.clone(),
            tx,
            stop.clone(),
        ));
        self.commit_and_ack(&client, rx, &cancel).await;
        // Queued after the last PUBACK: once the event loop has sent it, all is flushed.
        let _ = client.try_disconnect();
        if tokio::time::timeout(FLUSH_TIMEOUT, &mut poller)
            .await
            .is_err()
        {
            stop.cancel();
            let _ = poller.await;
        }
    }

    /// Commit each message, then acknowledge it to the local broker, in arrival order,
    /// until `cancel`; then finish what is pending.
    async fn commit_and_ack(
        &self,
        client: &AsyncClient,
        rx: mpsc::Receiver<Publish>,
        cancel: &CancellationToken,
    ) {
        let origin = Origin {
            kind: OriginKind::LocalBroker,
            name: Arc::from(self.cfg.url.as_str()),
        };
        let mut rx = Some(rx);
        let mut pending = FuturesOrdered::new();
        loop {
            if rx.is_none() && pending.is_empty() {
                break;
            }
            tokio::select! {
                // Stop taking messages; dropping the receiver tells the event loop so.
                _ = cancel.cancelled(), if rx.is_some() => rx = None,
                msg = recv(&mut rx), if rx.is_some() && pending.len() < MAX_PENDING => match msg {
                    None => rx = None,
                    Some(p) => {
                        let record = Record {
                            topic: p.topic.clone(),
                            payload: p.payload.clone(),
                            qos: p.qos as u8,
                            retain: p.retain,
                            origin: origin.clone(),
                            ts_ms: crate::record::now_ms(),
                        };
                        let (store, stream, cancel) = (self.store.clone(), self.routes.stream(&p.topic), cancel.clone());
                        pending.push_back(async move {
                            let r = crate::ingest::append_waiting_for_space(&store, stream, record, &cancel, "local broker").await;
                            (p, r)
                        });
                    }
                },
                Some((p, result)) = pending.next(), if !pending.is_empty() => match result {
                    Ok(_) => {
                        if p.qos != QoS::AtMostOnce {
                            // Cannot block: see the module invariants.
                            if let Err(e) = client.try_ack(&p) {
                                tracing::warn!(error = %e, "cannot queue PUBACK to the local broker; it will redeliver");
                            }
                        }
                    }
                    // Not acknowledged: the local broker keeps it and redelivers it.
                    Err(e) => tracing::debug!(topic = %p.topic, error = %e, "message from the local broker not stored"),
                },
            }
        }
    }
}

async fn recv(rx: &mut Option<mpsc::Receiver<Publish>>) -> Option<Publish> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn poll(
    mut eventloop: rumqttc::EventLoop,
    client: AsyncClient,
    cfg: LocalBrokerConfig,
    tx: mpsc::Sender<Publish>,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let broker = format!("{}:{}", cfg.host, cfg.port);
    loop {
        let ev = tokio::select! {
            _ = stop.cancelled() => break,
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
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                tracing::info!(%broker, topics = ?cfg.topics, "subscribed on the local broker")
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if p.qos == QoS::AtMostOnce {
                    if tx.try_send(p).is_err() {
                        tracing::debug!(
                            "QoS 0 message from the local broker dropped: committer busy"
                        );
                    }
                    continue;
                }
                // Waiting here is back-pressure on the local broker; a closed hand-off
                // means shutdown: the message stays unacknowledged and is redelivered.
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tx.send(p) => {}
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(%broker, error = %e, "local broker connection error");
                let delay = backoff.next_delay(rand::random::<f64>());
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}
