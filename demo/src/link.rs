//! The demo's emulated link between the agent and the central broker: a TCP relay in
//! the demo's own process whose rate, delay and availability follow a `Schedule`.
//!
//! Why a relay and not the link lab: the lab shapes real frames between network
//! namespaces and needs root; the demo must run for anyone. A relay cannot lose
//! segments (it sits above TCP), so "bad" here means slow, late and gone — which is
//! what the agent's rate control and outage handling react to.
//!
//! Invariants: bytes cross in order, each once; a direction never moves faster than
//! its phase's rate (serialised chunk by chunk on a virtual clock) nor before its
//! delay has passed; during an outage nothing moves either way and nothing is
//! dropped (a stalled radio link: the agent notices by its keep-alive); what the
//! relay holds is bounded (`LINE_CHUNKS` chunks per direction, a small receive
//! buffer on the agent's side), so a slow phase pushes back on the agent's socket as
//! a real bottleneck would.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What the link does while a phase lasts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Conditions {
    /// Bytes per second each way; None: as fast as loopback.
    pub rate: Option<u64>,
    /// One-way delay.
    pub delay: Duration,
    /// False: an outage (nothing moves).
    pub up: bool,
}

impl Conditions {
    /// "1 Mbit/s, 40 ms" or "down".
    pub fn describe(&self) -> String {
        if !self.up {
            return "down".to_owned();
        }
        let rate = match self.rate {
            Some(r) if r * 8 >= 1_000_000 => format!("{:.1} Mbit/s", r as f64 * 8.0 / 1e6),
            Some(r) => format!("{} kbit/s", r * 8 / 1000),
            None => "unlimited".to_owned(),
        };
        format!("{rate}, {} ms", self.delay.as_millis())
    }
}

/// One step of the schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct Phase {
    pub name: &'static str,
    pub start: Duration,
    pub end: Duration,
    pub conditions: Conditions,
}

/// The link's conditions over the run: consecutive phases; the last one lasts past
/// the end (the drain after the fleet stops happens on it).
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    phases: Vec<Phase>,
}

#[derive(Debug, thiserror::Error)]
#[error("a schedule needs at least one phase and positive shares")]
pub struct ScheduleError;

impl Schedule {
    /// Phases as (name, share of `total`, conditions), in order.
    pub fn new(
        total: Duration,
        parts: &[(&'static str, f64, Conditions)],
    ) -> Result<Self, ScheduleError> {
        let sum: f64 = parts.iter().map(|(_, s, _)| *s).sum();
        if parts.is_empty() || parts.iter().any(|(_, s, _)| s.is_nan() || *s <= 0.0) {
            return Err(ScheduleError);
        }
        let mut at = Duration::ZERO;
        let mut phases = Vec::with_capacity(parts.len());
        for (i, (name, share, conditions)) in parts.iter().enumerate() {
            let end = if i + 1 == parts.len() {
                total
            } else {
                at + total.mul_f64(share / sum)
            };
            phases.push(Phase {
                name,
                start: at,
                end,
                conditions: *conditions,
            });
            at = end;
        }
        Ok(Self { phases })
    }

    /// A gateway's bad day, scaled to `total`: a good cellular link, a degraded one, an
    /// outage, then recovery.
    pub fn standard(total: Duration) -> Self {
        const KBIT: u64 = 1000 / 8;
        let parts = [
            (
                "good",
                0.25,
                Conditions {
                    rate: Some(1000 * KBIT),
                    delay: Duration::from_millis(40),
                    up: true,
                },
            ),
            (
                "degraded",
                0.25,
                Conditions {
                    rate: Some(32 * KBIT),
                    delay: Duration::from_millis(300),
                    up: true,
                },
            ),
            (
                "outage",
                0.2,
                Conditions {
                    rate: None,
                    delay: Duration::ZERO,
                    up: false,
                },
            ),
            (
                "recovered",
                0.3,
                Conditions {
                    rate: Some(500 * KBIT),
                    delay: Duration::from_millis(80),
                    up: true,
                },
            ),
        ];
        // Shares are positive and there are phases: cannot fail.
        Self::new(total, &parts).unwrap_or(Self { phases: Vec::new() })
    }

    pub fn phases(&self) -> &[Phase] {
        &self.phases
    }

    /// The phase in force `t` after the start (the last one once past the end).
    pub fn at(&self, t: Duration) -> Option<&Phase> {
        self.phases
            .iter()
            .find(|p| t < p.end)
            .or_else(|| self.phases.last())
    }

    /// The phase after the one in force at `t`, if any.
    pub fn next(&self, t: Duration) -> Option<&Phase> {
        self.phases.iter().find(|p| p.start > t)
    }
}

/// Bytes the link carried.
#[derive(Debug, Default)]
pub struct Counters {
    /// Agent → central, delivered.
    pub up: AtomicU64,
    /// Central → agent, delivered.
    pub down: AtomicU64,
    /// Connections the agent opened through the link.
    pub connections: AtomicU64,
}

/// The relay: the agent connects to `addr()`, the relay to the central broker.
#[derive(Debug)]
pub struct Link {
    addr: SocketAddr,
    started: Instant,
    schedule: Arc<Schedule>,
    counters: Arc<Counters>,
}

/// Largest chunk the relay moves at once, and how many it holds per direction.
const CHUNK: usize = 8 * 1024;
const LINE_CHUNKS: usize = 8;
/// The agent-side receive buffer: small, so a slow phase fills the agent's socket
/// instead of hiding megabytes in loopback buffers.
const RECV_BUFFER: u32 = 16 * 1024;
/// How often a stalled direction looks whether the link is back.
const POLL: Duration = Duration::from_millis(20);

impl Link {
    /// Listen on a loopback port and relay each connection to `central`.
    pub async fn start(
        central: SocketAddr,
        schedule: Schedule,
        stop: CancellationToken,
    ) -> std::io::Result<Link> {
        let socket = TcpSocket::new_v4()?;
        socket.set_recv_buffer_size(RECV_BUFFER)?;
        socket.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let listener = socket.listen(64)?;
        let link = Link {
            addr: listener.local_addr()?,
            started: Instant::now(),
            schedule: Arc::new(schedule),
            counters: Arc::new(Counters::default()),
        };
        let clock = Clock {
            started: link.started,
            schedule: link.schedule.clone(),
        };
        let counters = link.counters.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stop.cancelled() => return,
                    a = listener.accept() => a,
                };
                let Ok((agent, _)) = accepted else { continue };
                counters.connections.fetch_add(1, Ordering::Relaxed);
                let Ok(central) = TcpStream::connect(central).await else {
                    tracing::warn!("demo link: the central broker does not accept connections");
                    continue;
                };
                let (_, _) = (agent.set_nodelay(true), central.set_nodelay(true));
                let (ar, aw) = agent.into_split();
                let (cr, cw) = central.into_split();
                let up = Direction {
                    clock: clock.clone(),
                    counter: counters.clone(),
                    up: true,
                };
                let down = Direction {
                    clock: clock.clone(),
                    counter: counters.clone(),
                    up: false,
                };
                tokio::spawn(up.run(ar, cw, stop.clone()));
                tokio::spawn(down.run(cr, aw, stop.clone()));
            }
        });
        Ok(link)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }
}

#[derive(Debug, Clone)]
struct Clock {
    started: Instant,
    schedule: Arc<Schedule>,
}

impl Clock {
    fn conditions(&self) -> Conditions {
        self.schedule.at(self.started.elapsed()).map_or(
            Conditions {
                rate: None,
                delay: Duration::ZERO,
                up: true,
            },
            |p| p.conditions,
        )
    }

    /// Until the link is up; its conditions then.
    async fn up(&self) -> Conditions {
        loop {
            let c = self.conditions();
            if c.up {
                return c;
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// One direction of one relayed connection: a reader that serialises chunks at the
/// phase's rate into a bounded delay line, and a writer that releases them when their
/// delay has passed.
struct Direction {
    clock: Clock,
    counter: Arc<Counters>,
    up: bool,
}

impl Direction {
    async fn run(self, mut from: OwnedReadHalf, mut to: OwnedWriteHalf, stop: CancellationToken) {
        let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(LINE_CHUNKS);
        let clock = self.clock.clone();
        let writer = async move {
            while let Some((release, bytes)) = rx.recv().await {
                tokio::time::sleep_until(release).await;
                clock.up().await;
                if to.write_all(&bytes).await.is_err() {
                    return;
                }
                let c = if self.up {
                    &self.counter.up
                } else {
                    &self.counter.down
                };
                c.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            }
            let _ = to.shutdown().await;
        };
        let clock = self.clock;
        let reader = async move {
            // When the link is next free to start serialising a chunk.
            let mut free = Instant::now();
            let mut buf = vec![0u8; CHUNK];
            loop {
                let c = clock.up().await;
                // Chunks of ~10 ms at the phase's rate keep serialisation smooth.
                let chunk = c
                    .rate
                    .map_or(CHUNK, |r| (r as usize / 100).clamp(256, CHUNK));
                let n = match from.read(&mut buf[..chunk]).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let now = Instant::now();
                let sent = match c.rate {
                    Some(r) => {
                        let done = free.max(now) + Duration::from_secs_f64(n as f64 / r as f64);
                        free = done;
                        done
                    }
                    None => now,
                };
                tokio::time::sleep_until(sent).await;
                if tx.send((sent + c.delay, buf[..n].to_vec())).await.is_err() {
                    return;
                }
            }
        };
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = async { tokio::join!(reader, writer) } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(rate: u64) -> Conditions {
        Conditions {
            rate: Some(rate),
            delay: Duration::from_millis(10),
            up: true,
        }
    }

    #[test]
    fn phases_cover_the_run_in_order_and_the_last_lasts() {
        let s = Schedule::standard(Duration::from_secs(60));
        let names: Vec<_> = s.phases().iter().map(|p| p.name).collect();
        assert_eq!(names, ["good", "degraded", "outage", "recovered"]);
        assert_eq!(s.phases()[0].start, Duration::ZERO);
        for w in s.phases().windows(2) {
            assert_eq!(w[0].end, w[1].start);
        }
        assert_eq!(s.at(Duration::from_secs(14)).map(|p| p.name), Some("good"));
        assert_eq!(
            s.at(Duration::from_secs(15)).map(|p| p.name),
            Some("degraded")
        );
        assert_eq!(
            s.at(Duration::from_secs(35)).map(|p| p.name),
            Some("outage")
        );
        assert_eq!(
            s.at(Duration::from_secs(600)).map(|p| p.name),
            Some("recovered")
        );
        assert_eq!(
            s.next(Duration::from_secs(20)).map(|p| p.name),
            Some("outage")
        );
        assert!(s.next(Duration::from_secs(50)).is_none());
    }

    #[test]
    fn shares_scale_and_bad_schedules_are_refused() {
        let s = Schedule::new(
            Duration::from_secs(10),
            &[("a", 1.0, up(1000)), ("b", 3.0, up(10))],
        )
        .expect("valid");
        assert_eq!(s.phases()[0].end, Duration::from_millis(2500));
        assert_eq!(s.phases()[1].end, Duration::from_secs(10));
        assert!(Schedule::new(Duration::from_secs(1), &[]).is_err());
        assert!(Schedule::new(Duration::from_secs(1), &[("a", 0.0, up(1))]).is_err());
    }

    #[test]
    fn conditions_describe_themselves() {
        assert_eq!(up(125_000).describe(), "1.0 Mbit/s, 10 ms");
        assert_eq!(up(8_000).describe(), "64 kbit/s, 10 ms");
        let down = Conditions { up: false, ..up(1) };
        assert_eq!(down.describe(), "down");
    }

    /// Through a real relay on loopback: bytes arrive intact, in order, no faster than
    /// the rate and no earlier than the delay.
    #[tokio::test]
    async fn the_relay_delivers_in_order_at_the_rate_after_the_delay() {
        let server = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let central = server.local_addr().expect("addr");
        let rate = 100_000u64;
        let schedule = Schedule::new(
            Duration::from_secs(3600),
            &[(
                "only",
                1.0,
                Conditions {
                    rate: Some(rate),
                    delay: Duration::from_millis(200),
                    up: true,
                },
            )],
        )
        .expect("schedule");
        let stop = CancellationToken::new();
        let link = Link::start(central, schedule, stop.clone())
            .await
            .expect("link");
        let data: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let started = Instant::now();
        let client = tokio::spawn(async move {
            let mut s = TcpStream::connect(link.addr()).await.expect("connect");
            s.write_all(&sent).await.expect("write");
            s.shutdown().await.expect("shutdown");
            link
        });
        let (mut conn, _) = server.accept().await.expect("accept");
        let mut got = Vec::new();
        conn.read_to_end(&mut got).await.expect("read");
        let took = started.elapsed();
        let link = client.await.expect("client");
        assert_eq!(got, data);
        // 50 kB at 100 kB/s is 0.5 s, plus the 0.2 s delay.
        assert!(took >= Duration::from_millis(650), "{took:?}");
        assert_eq!(link.counters().up.load(Ordering::Relaxed), 50_000);
        stop.cancel();
    }
}
