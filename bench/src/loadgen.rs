//! The load generator: one async MQTT 3.1.1 client per source, QoS 1, paced.
//!
//! Why hand-driven packets (rumqttc's codec, not its event loop): the loss figure needs
//! to know exactly which message each PUBACK acknowledged, across reconnects; with our
//! own packet ids the mapping is exact. Each client behaves as a careful device does:
//! it keeps what it generated in its own queue while the edge is slow or gone, keeps a
//! bounded window of unacknowledged publishes, and resends them (DUP) after a reconnect.
//!
//! Invariants: a message's send time is when it was generated (so latency includes any
//! wait for the edge); `acked` holds exactly the messages the edge PUBACKed; the
//! generator runs on its own runtime, so it is never the bottleneck of a 2-core run
//! by waiting behind the systems under test's threads (it only needs a few % CPU).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Connect, Packet, PubAck, Publish};
use rumqttc::mqttbytes::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use edgerelay_tests::unix_ms;

use crate::workload::{Kind, Source};

/// The name of the generator's runtime thread (its CPU is reported).
pub const LOADGEN_THREAD: &str = "loadgen";

/// Unacknowledged publishes a client keeps on the wire.
const WINDOW: usize = 32;
const MAX_PACKET: usize = 1 << 20;

/// What one source generated and what the edge acknowledged.
#[derive(Debug, Default, Clone)]
pub struct Track {
    /// Generation time (Unix ms) of message `seq`, at index `seq`.
    pub sent_at: Vec<u64>,
    pub acked: Vec<bool>,
}

/// Totals over all sources.
#[derive(Debug, Default, Clone, Copy)]
pub struct Totals {
    pub generated: u64,
}

#[derive(Debug)]
struct Shared {
    generating: AtomicBool,
    stop: AtomicBool,
    generated: AtomicU64,
    tracks: Vec<Mutex<Track>>,
}

/// A running generator; dropping it stops it.
#[allow(missing_debug_implementations)]
pub struct LoadGen {
    shared: Arc<Shared>,
    rt: Option<tokio::runtime::Runtime>,
}

impl LoadGen {
    /// Start `kind`'s sources publishing to 127.0.0.1:`port` at `rate` messages/s in all.
    /// Call it on a thread inside the namespace the edge listens in: the runtime's
    /// threads inherit it.
    pub fn start(kind: Kind, seed: u64, port: u16, rate: f64) -> Self {
        let sources = kind.sources();
        let shared = Arc::new(Shared {
            generating: AtomicBool::new(true),
            stop: AtomicBool::new(false),
            generated: AtomicU64::new(0),
            tracks: (0..sources).map(|_| Mutex::default()).collect(),
        });
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .thread_name(LOADGEN_THREAD)
            .build()
            .expect("load generator runtime");
        let interval = Duration::from_secs_f64(sources as f64 / rate.max(0.001));
        for i in 0..sources {
            let shared = shared.clone();
            // Spread the sources' ticks over one interval, as real devices drift apart.
            let offset = interval.mul_f64(i as f64 / sources as f64);
            rt.spawn(async move {
                tokio::time::sleep(offset).await;
                client(kind, seed, i, port, interval, shared).await;
            });
        }
        Self {
            shared,
            rt: Some(rt),
        }
    }

    pub fn totals(&self) -> Totals {
        Totals {
            generated: self.shared.generated.load(Ordering::Relaxed),
        }
    }

    /// Stop generating new messages; the clients go on delivering what they hold.
    pub fn stop_generating(&self) {
        self.shared.generating.store(false, Ordering::Relaxed);
    }

    /// Every source's track so far.
    pub fn tracks(&self) -> Vec<Track> {
        self.shared
            .tracks
            .iter()
            .map(|t| t.lock().expect("track lock").clone())
            .collect()
    }
}

impl Drop for LoadGen {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// One device: generate on the tick, publish within the window, reconnect forever.
async fn client(
    kind: Kind,
    seed: u64,
    index: usize,
    port: u16,
    interval: Duration,
    shared: Arc<Shared>,
) {
    let mut source = Source::new(kind, seed, index);
    let topic = kind.topic(index);
    let mut queue: VecDeque<(u64, Publish)> = VecDeque::new();
    let mut inflight: HashMap<u16, (u64, Publish)> = HashMap::new();
    let mut next_seq = 0u64;
    let mut next_pkid = 1u16;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    while !shared.stop.load(Ordering::Relaxed) {
        let Ok(stream) = TcpStream::connect(("127.0.0.1", port)).await else {
            // The edge is restarting: keep generating into the device's queue.
            tokio::select! {
                _ = tick.tick() => generate(&mut source, &topic, &mut next_seq, &mut queue, &shared, index),
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let mut session = Session {
            stream,
            inbuf: BytesMut::with_capacity(4096),
            outbuf: BytesMut::with_capacity(8192),
        };
        let id = format!("bench-{}-{index}", kind.name());
        if session.connect(&id).await.is_err() {
            continue;
        }
        // Resend what the edge never acknowledged, with the same ids (QoS 1 redelivery).
        let mut resend: Vec<_> = inflight.values().map(|(_, p)| p.clone()).collect();
        resend.sort_by_key(|p| p.pkid);
        for mut p in resend {
            p.dup = true;
            let _ = p.write(&mut session.outbuf);
        }
        let result: std::io::Result<()> = async {
            loop {
                while inflight.len() < WINDOW {
                    let Some((seq, mut p)) = queue.pop_front() else { break };
                    while inflight.contains_key(&next_pkid) {
                        next_pkid = next_pkid.checked_add(1).unwrap_or(1);
                    }
                    p.pkid = next_pkid;
                    next_pkid = next_pkid.checked_add(1).unwrap_or(1);
                    p.write(&mut session.outbuf).map_err(std::io::Error::other)?;
                    inflight.insert(p.pkid, (seq, p));
                }
                if !session.outbuf.is_empty() {
                    session.stream.write_all_buf(&mut session.outbuf).await?;
                }
                if shared.stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                tokio::select! {
                    _ = tick.tick() => generate(&mut source, &topic, &mut next_seq, &mut queue, &shared, index),
                    n = session.stream.read_buf(&mut session.inbuf) => {
                        if n? == 0 {
                            return Err(std::io::ErrorKind::UnexpectedEof.into());
                        }
                        while let Some(packet) = session.packet()? {
                            if let Packet::PubAck(PubAck { pkid, .. }) = packet {
                                if let Some((seq, _)) = inflight.remove(&pkid) {
                                    let mut t = shared.tracks[index].lock().expect("track lock");
                                    if let Some(a) = t.acked.get_mut(seq as usize) {
                                        *a = true;
                                    }
                                }
                            }
                        }
                    }
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        }
        .await;
        if result.is_ok() {
            return;
        }
    }
}

fn generate(
    source: &mut Source,
    topic: &str,
    next_seq: &mut u64,
    queue: &mut VecDeque<(u64, Publish)>,
    shared: &Shared,
    index: usize,
) {
    if !shared.generating.load(Ordering::Relaxed) {
        return;
    }
    let now = unix_ms();
    let seq = *next_seq;
    *next_seq += 1;
    queue.push_back((
        seq,
        Publish::new(topic, QoS::AtLeastOnce, source.payload(seq, now)),
    ));
    let mut t = shared.tracks[index].lock().expect("track lock");
    t.sent_at.push(now);
    t.acked.push(false);
    shared.generated.fetch_add(1, Ordering::Relaxed);
}

struct Session {
    stream: TcpStream,
    inbuf: BytesMut,
    outbuf: BytesMut,
}

impl Session {
    async fn connect(&mut self, id: &str) -> std::io::Result<()> {
        let mut c = Connect::new(id);
        c.keep_alive = 60;
        c.clean_session = true;
        let mut buf = BytesMut::new();
        Packet::Connect(c)
            .write(&mut buf, MAX_PACKET)
            .map_err(std::io::Error::other)?;
        self.stream.write_all_buf(&mut buf).await?;
        let wait = async {
            loop {
                if let Some(p) = self.packet()? {
                    return match p {
                        Packet::ConnAck(a) if a.code == rumqttc::ConnectReturnCode::Success => {
                            Ok(())
                        }
                        other => Err(std::io::Error::other(format!("refused: {other:?}"))),
                    };
                }
                if self.stream.read_buf(&mut self.inbuf).await? == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), wait)
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
    }

    /// The next complete packet in the input buffer, if any.
    fn packet(&mut self) -> std::io::Result<Option<Packet>> {
        match Packet::read(&mut self.inbuf, MAX_PACKET) {
            Ok(p) => Ok(Some(p)),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(std::io::Error::other(format!("{e:?}"))),
        }
    }
}
