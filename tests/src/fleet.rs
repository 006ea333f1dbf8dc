//! A simulated fleet: many real MQTT clients (rumqttc), one per device, publishing QoS 1
//! telemetry to the agent's local endpoint at a fixed interval each.
//!
//! Every payload says who sent it, which message it is and when it was published
//! (`{"device":…,"n":…,"t":<unix ms>,…}`), so a test can check what arrived upstream
//! against what was published, and measure publish→delivery latency. A random token in
//! each payload keeps batches from compressing to nothing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use crate::unix_ms;

/// One simulated device.
#[derive(Debug, Clone)]
pub struct Device {
    pub topic: String,
    pub interval: Duration,
}

/// What one device published and had acknowledged.
#[derive(Debug, Clone, Default)]
pub struct DeviceLog {
    pub topic: String,
    /// Publish time (unix ms) of message n, for n = 0, 1, …
    pub sent: Vec<u64>,
    /// PUBACKs received (in order: the first `acked` messages are acknowledged).
    pub acked: usize,
}

#[allow(missing_debug_implementations)]
pub struct Fleet {
    rt: Option<tokio::runtime::Runtime>,
    stop: Arc<AtomicBool>,
    logs: Vec<Arc<Mutex<DeviceLog>>>,
}

/// The payload of message `n` of device `i`.
pub fn payload(i: usize, n: usize, t: u64) -> String {
    let token = rand::random::<u64>();
    format!(
        "{{\"device\":{i},\"n\":{n},\"t\":{t},\"id\":\"{token:016x}\",\"temp_c\":{:.2},\"humidity\":{:.1},\"status\":\"ok\"}}",
        20.0 + ((i * 7 + n) % 97) as f64 * 0.05,
        40.0 + ((i + n) % 53) as f64 * 0.3
    )
}

/// (device, n, t) of a payload made by [`payload`].
pub fn parse(payload: &str) -> Option<(usize, usize, u64)> {
    let v: serde_json::Value = serde_json::from_str(payload).ok()?;
    Some((
        v["device"].as_u64()? as usize,
        v["n"].as_u64()? as usize,
        v["t"].as_u64()?,
    ))
}

impl Fleet {
    /// Connect every device to the MQTT endpoint at 127.0.0.1:`port` (of the network
    /// namespace of the calling thread) and start publishing; returns once all are
    /// connected.
    pub fn start(port: u16, devices: Vec<Device>) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("fleet runtime");
        let stop = Arc::new(AtomicBool::new(false));
        let mut logs = Vec::with_capacity(devices.len());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        for (i, d) in devices.into_iter().enumerate() {
            let log = Arc::new(Mutex::new(DeviceLog {
                topic: d.topic.clone(),
                ..Default::default()
            }));
            logs.push(log.clone());
            let stop = stop.clone();
            let ready = ready_tx.clone();
            rt.spawn(async move {
                let mut opts = MqttOptions::new(
                    format!("dev-{i}-{}", rand::random::<u32>()),
                    "127.0.0.1",
                    port,
                );
                opts.set_keep_alive(Duration::from_secs(30));
                let (client, mut events) = AsyncClient::new(opts, 64);
                let acks = log.clone();
                tokio::spawn(async move {
                    let mut ready = Some(ready);
                    loop {
                        match events.poll().await {
                            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                                if let Some(r) = ready.take() {
                                    let _ = r.send(());
                                }
                            }
                            Ok(Event::Incoming(Packet::PubAck(_))) => {
                                acks.lock().expect("lock").acked += 1;
                            }
                            Ok(_) => {}
                            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                        }
                    }
                });
                // Devices start out of phase, as real ones do.
                let phase = d.interval.mul_f64(rand::random::<f64>());
                let mut tick =
                    tokio::time::interval_at(tokio::time::Instant::now() + phase, d.interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                let mut n = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let t = unix_ms();
                    log.lock().expect("lock").sent.push(t);
                    if client
                        .publish(&d.topic, QoS::AtLeastOnce, false, payload(i, n, t))
                        .await
                        .is_err()
                    {
                        break;
                    }
                    n += 1;
                }
            });
        }
        drop(ready_tx);
        let n = logs.len();
        let deadline = Instant::now() + Duration::from_secs(30);
        for k in 0..n {
            let left = deadline.saturating_duration_since(Instant::now());
            ready_rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("only {k} of {n} devices connected within 30 s"));
        }
        Self {
            rt: Some(rt),
            stop,
            logs,
        }
    }

    /// Stop publishing, and wait until every publish was acknowledged.
    pub fn stop(&self, timeout: Duration) {
        self.stop.store(true, Ordering::Relaxed);
        crate::wait_until("every device publish acknowledged", timeout, || {
            self.logs
                .iter()
                .all(|l| {
                    let l = l.lock().expect("lock");
                    l.acked >= l.sent.len()
                })
                .then_some(())
        });
    }

    /// What each device published so far (index = device).
    pub fn logs(&self) -> Vec<DeviceLog> {
        self.logs
            .iter()
            .map(|l| l.lock().expect("lock").clone())
            .collect()
    }

    /// Messages published so far, all devices.
    pub fn published(&self) -> usize {
        self.logs
            .iter()
            .map(|l| l.lock().expect("lock").sent.len())
            .sum()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// A bulk feed: lines of [`payload`] into the TCP line socket at 127.0.0.1:`port` of
/// `lab`'s gateway side, ~20,000 msg/s offered (far more than a slow link carries),
/// until the returned flag is set.
pub fn bulk_feed(lab: &linklab::Lab, port: u16) -> Arc<AtomicBool> {
    use std::io::Write as _;
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = stop.clone();
    let mut conn = lab
        .run_in(linklab::Side::Gateway, move || {
            std::net::TcpStream::connect(("127.0.0.1", port))
        })
        .expect("in the lab")
        .expect("connect to the agent's socket");
    std::thread::spawn(move || {
        let mut n = 0usize;
        while !stopping.load(Ordering::Relaxed) {
            let mut chunk = String::new();
            for _ in 0..100 {
                chunk.push_str(&payload(n % 200, n, unix_ms()));
                chunk.push('\n');
                n += 1;
            }
            if conn.write_all(chunk.as_bytes()).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    stop
}
