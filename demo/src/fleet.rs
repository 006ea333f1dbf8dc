//! The demo's simulated fleet: telemetry devices and an alarm panel over MQTT (QoS 1,
//! one rumqttc client each), a PLC writing log lines over TCP and an application
//! writing length-prefixed events over a Unix socket (both with the agent's ack byte).
//!
//! Every message is JSON that names its sender and its number (`"device"`, `"n"`)
//! and its publish time (`"ts"`, unix ms), so the central side can check that each
//! acknowledged message arrived and how late. Invariants: a sender's messages are
//! numbered 0, 1, … without holes; `acked` counts acknowledgements, which come in
//! order, so messages 0..acked are exactly the acknowledged ones.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// How a sender reaches the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Telemetry,
    Alarms,
    Tcp,
    Unix,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Telemetry, Kind::Alarms, Kind::Tcp, Kind::Unix];

    pub fn label(self) -> &'static str {
        match self {
            Kind::Telemetry => "mqtt telemetry",
            Kind::Alarms => "mqtt alarms (high)",
            Kind::Tcp => "tcp plc log (low)",
            Kind::Unix => "unix app events",
        }
    }
}

/// One sender's count of what it published and had acknowledged.
#[derive(Debug)]
pub struct Sender {
    pub id: String,
    pub kind: Kind,
    pub published: AtomicU64,
    pub acked: AtomicU64,
}

impl Sender {
    fn new(id: String, kind: Kind) -> Arc<Self> {
        Arc::new(Self {
            id,
            kind,
            published: AtomicU64::new(0),
            acked: AtomicU64::new(0),
        })
    }
}

/// Where the agent listens.
#[derive(Debug, Clone)]
pub struct Targets {
    pub mqtt_port: u16,
    pub tcp_port: u16,
    pub unix_path: PathBuf,
}

#[derive(Debug, Clone, Copy)]
pub struct FleetSize {
    pub devices: usize,
    /// Each telemetry device's interval between messages.
    pub interval: Duration,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Slowly drifting sensor values, as real telemetry has (and as compresses like it).
struct Sensor {
    temp: f64,
    humidity: f64,
    pressure: f64,
    battery: f64,
    rssi: i32,
}

impl Sensor {
    fn new(rng: &mut StdRng) -> Self {
        Self {
            temp: rng.random_range(18.0..26.0),
            humidity: rng.random_range(35.0..60.0),
            pressure: rng.random_range(1005.0..1020.0),
            battery: rng.random_range(3.6..4.1),
            rssi: rng.random_range(-90..-55),
        }
    }

    fn step(&mut self, rng: &mut StdRng) {
        self.temp += rng.random_range(-0.05..0.05);
        self.humidity = (self.humidity + rng.random_range(-0.2..0.2)).clamp(5.0, 95.0);
        self.pressure += rng.random_range(-0.1..0.1);
        self.battery -= rng.random_range(0.0..0.0005);
        self.rssi = (self.rssi + rng.random_range(-2..=2)).clamp(-110, -40);
    }
}

/// A running fleet; `stop` ends it.
#[derive(Debug)]
pub struct Fleet {
    pub senders: Vec<Arc<Sender>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    stop: CancellationToken,
}

impl Fleet {
    /// Start every sender; each waits a random part of its interval first, so the
    /// fleet does not publish in lockstep.
    pub fn start(targets: &Targets, size: FleetSize, seed: u64) -> Fleet {
        let stop = CancellationToken::new();
        let mut senders = Vec::new();
        let mut tasks = Vec::new();
        let sites = ["plant-1", "plant-2", "depot-north"];
        for i in 0..size.devices {
            let s = Sender::new(format!("dev-{i:03}"), Kind::Telemetry);
            let topic = format!("sites/{}/{}/telemetry", sites[i % sites.len()], s.id);
            senders.push(s.clone());
            let rng = StdRng::seed_from_u64(seed.wrapping_add(i as u64));
            tasks.push(tokio::spawn(mqtt_sender(
                s,
                targets.mqtt_port,
                topic,
                size.interval,
                rng,
                stop.clone(),
            )));
        }
        let panel = Sender::new("alarm-panel".to_owned(), Kind::Alarms);
        senders.push(panel.clone());
        tasks.push(tokio::spawn(mqtt_sender(
            panel,
            targets.mqtt_port,
            "alarms/plant-1/panel".to_owned(),
            Duration::from_millis(1500),
            StdRng::seed_from_u64(seed ^ 0xa1a2),
            stop.clone(),
        )));
        let plc = Sender::new("plc-1".to_owned(), Kind::Tcp);
        senders.push(plc.clone());
        tasks.push(tokio::spawn(socket_sender(
            plc,
            SocketTarget::Tcp(targets.tcp_port),
            Duration::from_millis(50),
            StdRng::seed_from_u64(seed ^ 0x71c),
            stop.clone(),
        )));
        let app = Sender::new("app-1".to_owned(), Kind::Unix);
        senders.push(app.clone());
        tasks.push(tokio::spawn(socket_sender(
            app,
            SocketTarget::Unix(targets.unix_path.clone()),
            Duration::from_millis(200),
            StdRng::seed_from_u64(seed ^ 0xa99),
            stop.clone(),
        )));
        Fleet {
            senders,
            tasks,
            stop,
        }
    }

    pub fn published(&self) -> u64 {
        self.senders
            .iter()
            .map(|s| s.published.load(Ordering::Relaxed))
            .sum()
    }

    pub fn acked(&self) -> u64 {
        self.senders
            .iter()
            .map(|s| s.acked.load(Ordering::Relaxed))
            .sum()
    }

    /// Stop publishing; wait (up to `grace`) for the acknowledgements still due.
    pub async fn stop(self, grace: Duration) {
        self.stop.cancel();
        let handles: Vec<_> = self.tasks.iter().map(|t| t.abort_handle()).collect();
        if tokio::time::timeout(grace, join_all(self.tasks))
            .await
            .is_err()
        {
            for h in handles {
                h.abort();
            }
        }
    }
}

async fn join_all(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for t in tasks {
        let _ = t.await;
    }
}

async fn mqtt_sender(
    me: Arc<Sender>,
    port: u16,
    topic: String,
    interval: Duration,
    mut rng: StdRng,
    stop: CancellationToken,
) {
    let mut opts = MqttOptions::new(me.id.clone(), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = AsyncClient::new(opts, 64);
    let acks = {
        let me = me.clone();
        tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        me.acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        })
    };
    let mut sensor = Sensor::new(&mut rng);
    let alarms = ["temp_high", "door_open", "pressure_low", "vibration"];
    let first = interval.mul_f64(rng.random_range(0.0..1.0));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + first, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        sensor.step(&mut rng);
        let payload = match me.kind {
            Kind::Alarms => serde_json::json!({
                "device": me.id, "n": n, "ts": unix_ms(),
                "alarm": alarms[rng.random_range(0..alarms.len())],
                "severity": if rng.random_bool(0.2) { "critical" } else { "warning" },
                "value": (sensor.temp * 100.0).round() / 100.0,
            }),
            _ => serde_json::json!({
                "device": me.id, "n": n, "ts": unix_ms(),
                "temp_c": (sensor.temp * 100.0).round() / 100.0,
                "humidity_pct": (sensor.humidity * 10.0).round() / 10.0,
                "pressure_hpa": (sensor.pressure * 10.0).round() / 10.0,
                "battery_v": (sensor.battery * 1000.0).round() / 1000.0,
                "rssi_dbm": sensor.rssi,
                "status": "ok",
                "fw": "2.4.1",
            }),
        }
        .to_string();
        // Counted before the publish is queued: an acknowledgement can come back
        // before `publish` returns.
        me.published.fetch_add(1, Ordering::Relaxed);
        if client
            .publish(topic.clone(), QoS::AtLeastOnce, false, payload)
            .await
            .is_err()
        {
            me.published.fetch_sub(1, Ordering::Relaxed);
            break;
        }
        n += 1;
    }
    // The acknowledgements still due (the fleet's stop bounds the wait).
    while me.acked.load(Ordering::Relaxed) < me.published.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = client.try_disconnect();
    acks.abort();
}

enum SocketTarget {
    Tcp(u16),
    Unix(PathBuf),
}

trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Stream for T {}

async fn connect(target: &SocketTarget) -> std::io::Result<Box<dyn Stream>> {
    Ok(match target {
        SocketTarget::Tcp(port) => {
            Box::new(tokio::net::TcpStream::connect(("127.0.0.1", *port)).await?)
        }
        SocketTarget::Unix(path) => Box::new(tokio::net::UnixStream::connect(path).await?),
    })
}

/// A PLC's log over TCP (lines) or an application's events over a Unix socket
/// (length-prefixed), one connection, reading the agent's ack byte per message.
async fn socket_sender(
    me: Arc<Sender>,
    target: SocketTarget,
    interval: Duration,
    mut rng: StdRng,
    stop: CancellationToken,
) {
    let conn = match connect(&target).await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(sender = %me.id, error = %e, "demo: cannot connect to the agent's socket");
            return;
        }
    };
    let (mut rd, mut wr) = tokio::io::split(conn);
    let reader = {
        let me = me.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 256];
            loop {
                if stop.is_cancelled()
                    && me.acked.load(Ordering::Relaxed) >= me.published.load(Ordering::Relaxed)
                {
                    return;
                }
                let n = tokio::select! {
                    r = rd.read(&mut buf) => match r { Ok(0) | Err(_) => return, Ok(n) => n },
                    // Wake now and then to see whether everything is in.
                    _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                };
                let acks = buf[..n].iter().filter(|b| **b == 0x06).count() as u64;
                me.acked.fetch_add(acks, Ordering::Relaxed);
            }
        })
    };
    let units = ["conveyor", "press", "oven", "packer"];
    let mut tick = tokio::time::interval(interval);
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let payload = match target {
            SocketTarget::Tcp(_) => serde_json::json!({
                "device": me.id, "n": n, "ts": unix_ms(),
                "level": if rng.random_bool(0.05) { "WARN" } else { "INFO" },
                "line": format!(
                    "{} {} speed={:.2} m/s load={}%",
                    units[rng.random_range(0..units.len())],
                    rng.random_range(1..5),
                    rng.random_range(0.8..1.4),
                    rng.random_range(40..95)
                ),
            }),
            SocketTarget::Unix(_) => serde_json::json!({
                "device": me.id, "n": n, "ts": unix_ms(),
                "event": if rng.random_bool(0.5) { "batch_done" } else { "order_picked" },
                "order": rng.random_range(100_000..999_999),
                "items": rng.random_range(1..40),
            }),
        }
        .to_string();
        let mut frame = Vec::with_capacity(payload.len() + 4);
        match target {
            SocketTarget::Tcp(_) => {
                frame.extend_from_slice(payload.as_bytes());
                frame.push(b'\n');
            }
            SocketTarget::Unix(_) => {
                frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
                frame.extend_from_slice(payload.as_bytes());
            }
        }
        me.published.fetch_add(1, Ordering::Relaxed);
        if wr.write_all(&frame).await.is_err() {
            me.published.fetch_sub(1, Ordering::Relaxed);
            break;
        }
        n += 1;
    }
    let _ = reader.await;
}
