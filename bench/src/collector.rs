//! The central consumer: subscribes where each system delivers (the bridge's remote
//! prefix, or unpack's republish prefix) and notes every arrival.
//!
//! Why one consumer for both: "delivered" then means the same thing for both systems —
//! a message an application on the central broker can read — and latency is measured
//! to the same point.
//!
//! Invariants: every arrival is kept (source, seq, time), duplicates included, so
//! goodput counts first arrivals only and the duplicate figure counts the rest.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgerelay_tests::unix_ms;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use crate::workload::identify;

/// One message as it arrived.
#[derive(Debug, Clone, Copy)]
pub struct Arrival {
    pub source: usize,
    pub seq: u64,
    pub at_ms: u64,
}

/// A running consumer; dropping it stops it.
#[allow(missing_debug_implementations)]
pub struct Collector {
    arrivals: Arc<Mutex<Vec<Arrival>>>,
    stop: Arc<AtomicBool>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Collector {
    /// Subscribe to `filter` on `host`:1883 at QoS 1; returns once subscribed. Call it
    /// on a thread inside the broker's namespace.
    pub fn start(host: &str, filter: &str) -> Self {
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .thread_name("collector")
            .build()
            .expect("collector runtime");
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let mut opts = MqttOptions::new(
            format!("bench-collector-{}", std::process::id()),
            host,
            1883,
        );
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_max_packet_size(1 << 20, 1 << 20);
        opts.set_clean_session(true);
        let (client, mut eventloop) = AsyncClient::new(opts, 1024);
        let filter = filter.to_owned();
        let (sink, stopping) = (arrivals.clone(), stop.clone());
        rt.spawn(async move {
            let mut ready = Some(ready_tx);
            while !stopping.load(Ordering::Relaxed) {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = client.subscribe(filter.clone(), QoS::AtLeastOnce).await;
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = ready.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let at_ms = unix_ms();
                        if let Some((source, seq)) = identify(&p.topic, &p.payload) {
                            sink.lock().expect("arrivals lock").push(Arrival {
                                source,
                                seq,
                                at_ms,
                            });
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the collector subscribed to the central broker within 20 s");
        Self {
            arrivals,
            stop,
            rt: Some(rt),
        }
    }

    /// Arrivals so far.
    pub fn arrivals(&self) -> Vec<Arrival> {
        self.arrivals.lock().expect("arrivals lock").clone()
    }

    pub fn count(&self) -> usize {
        self.arrivals.lock().expect("arrivals lock").len()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}
