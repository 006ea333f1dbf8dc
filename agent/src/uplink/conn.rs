//! One MQTT connection of an upstream session and the publishes awaiting its PUBACKs.
//!
//! Why a session may hold two: on a lossy link every segment behind a lost one waits
//! for its retransmission (TCP delivers in order), so a high-priority publish sharing
//! a connection with a saturating backlog waits behind that backlog's loss recovery —
//! most of the time, since a full pipe almost always holds a hole. On a connection of
//! its own it waits only for its own losses. Both connections cross the same
//! bottleneck, so the rate controller still counts both (the forwarder's pacer).
//!
//! Invariants: packet ids are per connection, so a PUBACK is matched only against the
//! connection it came on; a connection is read whenever it is polled, so a blocked
//! write never stops its PUBACKs.

use std::collections::HashMap;
use std::future::pending;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::AsyncWriteExt;

use super::packer::Seqs;
use super::session::{Session, SessionError};
use crate::store::Gap;

/// What a publish awaiting PUBACK carries.
#[derive(Debug)]
pub enum InFlight {
    /// Records of lane `.0`, `.2` bytes of them as stored.
    Records(usize, Seqs, usize),
    Gap(Gap),
    Announcement(u64),
}

/// A publish awaiting PUBACK: what it carries, when it was queued, its payload size
/// (for the link monitor's PUBACK round trips and goodput).
#[derive(Debug)]
pub struct Pending {
    pub what: InFlight,
    pub queued: Instant,
    pub bytes: usize,
}

/// PUBACKs since the last report to the link monitor.
#[derive(Debug, Default)]
pub struct PubackTally {
    pub count: u32,
    pub rtt_sum: Duration,
    pub bytes: usize,
}

/// An established connection and its publishes awaiting PUBACK.
#[derive(Debug)]
pub struct Conn {
    pub s: Session,
    inflight: HashMap<u16, Pending>,
    /// Record publishes among them (what `[upstream] inflight` bounds).
    pub records: usize,
    pub last_rx: Instant,
    pub last_tx: Instant,
}

impl Conn {
    pub fn new(s: Session, capacity: usize) -> Self {
        Self {
            s,
            inflight: HashMap::with_capacity(capacity),
            records: 0,
            last_rx: Instant::now(),
            last_tx: Instant::now(),
        }
    }

    /// Queue a QoS 1 publish carrying `what`; returns the payload's size.
    pub fn publish(
        &mut self,
        topic: String,
        payload: Bytes,
        retain: bool,
        what: InFlight,
    ) -> Result<usize, SessionError> {
        let inflight = &self.inflight;
        let pkid = self.s.alloc_pkid(|id| inflight.contains_key(&id));
        let bytes = payload.len();
        self.s.queue_publish(topic, payload, retain, pkid)?;
        if matches!(what, InFlight::Records(..)) {
            self.records += 1;
        }
        self.inflight.insert(
            pkid,
            Pending {
                what,
                queued: Instant::now(),
                bytes,
            },
        );
        Ok(bytes)
    }

    /// The publish a PUBACK for `pkid` confirms (None: not one of ours).
    pub fn acked(&mut self, pkid: u16) -> Option<Pending> {
        let p = self.inflight.remove(&pkid)?;
        if matches!(p.what, InFlight::Records(..)) {
            self.records -= 1;
        }
        Some(p)
    }

    /// Nothing awaits a PUBACK and nothing waits to be written.
    pub fn idle(&self) -> bool {
        self.inflight.is_empty() && self.s.out.is_empty()
    }

    /// Once a tick: a keep-alive that expired ends the connection; a quiet one pings.
    pub fn keep_alive(&mut self, keep_alive: Duration) -> Result<(), SessionError> {
        if self.last_rx.elapsed() > keep_alive + keep_alive / 2 {
            return Err(SessionError::KeepAliveTimeout(self.last_rx.elapsed()));
        }
        if self.last_tx.elapsed() >= keep_alive && self.s.out.is_empty() {
            self.s.queue_ping()?;
        }
        Ok(())
    }
}

/// A connection's packet reader.
pub type Reader = super::session::Reader;
/// A connection's writer and the bytes it has yet to write.
pub type Writer<'a> = (&'a mut super::session::Writer, &'a mut BytesMut);

/// The halves of an optional connection, for one `select!` to poll both at once.
pub fn halves(c: Option<&mut Conn>) -> (Option<&mut Reader>, Option<Writer<'_>>) {
    match c {
        Some(c) => {
            let (reader, writer, out) = (&mut c.s.reader, &mut c.s.writer, &mut c.s.out);
            let write = (!out.is_empty() || writer.unflushed()).then_some((writer, out));
            (Some(reader), write)
        }
        None => (None, None),
    }
}

/// The next packet from `reader`; never ready without one.
pub async fn next_packet(
    reader: Option<&mut Reader>,
) -> Option<Result<super::session::Incoming, SessionError>> {
    match reader {
        Some(r) => r.next().await,
        None => pending().await,
    }
}

/// How much a connection's socket may hold unsent: `limit` bytes, looked at again
/// every `recheck` while it holds more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shallow {
    pub limit: usize,
    pub recheck: Duration,
}

/// The in-flight window as the writer applies it: `bytes` may be in the pipes and
/// unsent in the kernel, of which `elsewhere` already are (the session's other
/// connection); `rate` (bytes/s) times when to look again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub bytes: u64,
    pub elsewhere: u64,
    pub rate: u64,
}

/// A full segment: no write smaller than this (or than what waits) is worth a wake-up.
const SEGMENT: u64 = 1448;
/// How soon a full window is looked at again, at least and at most: what frees it, the
/// link delivering, sends the agent no event.
const RECHECK_MIN: Duration = Duration::from_millis(2);
const RECHECK_MAX: Duration = Duration::from_millis(20);

/// Write some of the buffered bytes; never ready with nothing to write. `Ok(None)`:
/// nothing was written — the socket or the window is full; it waited a moment, look
/// again (what else changed meanwhile may matter).
///
/// With `shallow`, only while the kernel holds less than its limit unsent, and at most
/// the limit at once. TCP_NOTSENT_LOWAT alone does not bound that: the kernel checks it
/// only when a write needs a new buffer, and appends to its last unsent one (up to
/// 64 KiB) regardless — measured: 60 KiB unsent, half a second at 1 Mbit/s, in front
/// of every publish and its PUBACK. With `window`, only while the pipes and unsent
/// bytes hold less than it (the kernel's count; where it cannot be read, the pacer
/// bounds what awaits PUBACK instead).
pub async fn write_some(
    w: Option<Writer<'_>>,
    shallow: Option<Shallow>,
    window: Option<Window>,
) -> std::io::Result<Option<usize>> {
    let Some((w, out)) = w else {
        return pending().await;
    };
    if out.is_empty() {
        // Only TLS records are owed (see session::Writer).
        w.flush().await?;
        return Ok(None);
    }
    let mut n = out.len();
    if let Some(s) = shallow {
        match crate::link::sys::notsent_bytes(&*w) {
            Ok(unsent) if unsent >= s.limit => {
                tokio::time::sleep(s.recheck).await;
                return Ok(None);
            }
            Ok(_) => n = n.min(s.limit),
            Err(_) => {} // unreadable (not Linux, say): as without a limit
        }
    }
    if let Some(win) = window {
        if let Ok(pipe) = crate::link::sys::pipe_bytes(&*w) {
            let used = pipe + win.elsewhere;
            let room = win.bytes.saturating_sub(used);
            if room < (n as u64).min(SEGMENT) {
                // About when the link will have delivered the excess and a segment.
                let excess = (used + SEGMENT).saturating_sub(win.bytes);
                let wait = Duration::from_secs_f64(excess as f64 / win.rate.max(1) as f64)
                    .clamp(RECHECK_MIN, RECHECK_MAX);
                tokio::time::sleep(wait).await;
                return Ok(None);
            }
            n = n.min(usize::try_from(room).unwrap_or(usize::MAX));
        }
    }
    let written = w.write(&out[..n]).await?;
    out.advance(written);
    Ok(Some(written))
}
