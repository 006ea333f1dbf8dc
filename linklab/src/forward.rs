//! The user-space link: frames read from one veth end (AF_PACKET), judged by the
//! `LinkModel`, and written to the other end when their time comes.
//!
//! Per direction, a receiver thread admits frames and a sender thread releases them;
//! the two share a FIFO "delay line" ordered by release time (the model never reorders).
//! Invariants: a frame is sent at most once and never before its release time; the
//! threads stop when the lab's stop flag is set (the receiver's socket timeout bounds how
//! long that takes); counters are updated before a frame is dropped or sent.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::model::{Conditions, Drop, LinkModel, Verdict};
use crate::sys::{self, PacketSocket};

const ETHERTYPE_ARP: [u8; 2] = [0x08, 0x06];
/// How often an idle thread looks at the stop flag.
const IDLE: Duration = Duration::from_millis(50);

/// What crossed (or did not cross) one direction of the link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub frames_in: u64,
    pub bytes_in: u64,
    pub lost: u64,
    pub outage_dropped: u64,
    pub queue_dropped: u64,
    pub frames_out: u64,
    pub bytes_out: u64,
    pub send_errors: u64,
    /// Queueing delay of the delivered frames, summed (µs): over an interval, divided
    /// by the frames admitted, the mean standing queue.
    pub queue_wait_us: u64,
}

impl Stats {
    /// Mean queueing delay of the frames admitted between `earlier` and `self` (zero if
    /// `earlier` is not earlier).
    pub fn mean_queue_wait_since(&self, earlier: &Stats) -> std::time::Duration {
        let d = |now: u64, then: u64| now.saturating_sub(then);
        let admitted = d(self.frames_in, earlier.frames_in)
            .saturating_sub(d(self.lost, earlier.lost))
            .saturating_sub(d(self.outage_dropped, earlier.outage_dropped))
            .saturating_sub(d(self.queue_dropped, earlier.queue_dropped));
        let us = d(self.queue_wait_us, earlier.queue_wait_us) / admitted.max(1);
        std::time::Duration::from_micros(us)
    }
}

#[derive(Debug, Default)]
struct Counters {
    frames_in: AtomicU64,
    bytes_in: AtomicU64,
    lost: AtomicU64,
    outage_dropped: AtomicU64,
    queue_dropped: AtomicU64,
    frames_out: AtomicU64,
    bytes_out: AtomicU64,
    send_errors: AtomicU64,
    queue_wait_us: AtomicU64,
}

/// One direction: its model, its delay line and its counters.
#[derive(Debug)]
pub struct Direction {
    model: Mutex<LinkModel>,
    line: Mutex<VecDeque<(Instant, Vec<u8>)>>,
    changed: Condvar,
    counters: Counters,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking forwarder thread must not take the lab's control API down with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Direction {
    pub fn new(cond: Conditions, seed: u64) -> Self {
        Self {
            model: Mutex::new(LinkModel::new(cond, seed)),
            line: Mutex::new(VecDeque::new()),
            changed: Condvar::new(),
            counters: Counters::default(),
        }
    }

    pub fn conditions(&self) -> Conditions {
        lock(&self.model).conditions().clone()
    }

    pub fn set(&self, cond: Conditions) {
        lock(&self.model).set(cond);
    }

    pub fn stats(&self) -> Stats {
        let c = &self.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            frames_in: g(&c.frames_in),
            bytes_in: g(&c.bytes_in),
            lost: g(&c.lost),
            outage_dropped: g(&c.outage_dropped),
            queue_dropped: g(&c.queue_dropped),
            frames_out: g(&c.frames_out),
            bytes_out: g(&c.bytes_out),
            send_errors: g(&c.send_errors),
            queue_wait_us: g(&c.queue_wait_us),
        }
    }

    fn wake(&self) {
        self.changed.notify_all();
    }
}

/// Start the two threads of one direction: frames from `rx` go, judged by `dir`, to `tx`.
pub fn spawn(
    name: &str,
    rx: Arc<PacketSocket>,
    tx: Arc<PacketSocket>,
    dir: Arc<Direction>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<Vec<JoinHandle<()>>> {
    let receiver = {
        let (dir, stop) = (dir.clone(), stop.clone());
        std::thread::Builder::new()
            .name(format!("{name}-rx"))
            .spawn(move || receive(&rx, &dir, &stop))?
    };
    let sender = std::thread::Builder::new()
        .name(format!("{name}-tx"))
        .spawn(move || release(&tx, &dir, &stop))?;
    Ok(vec![receiver, sender])
}

fn receive(rx: &PacketSocket, dir: &Direction, stop: &AtomicBool) {
    let mut buf = vec![0u8; 65536];
    let c = &dir.counters;
    while !stop.load(Ordering::Relaxed) {
        let n = match rx.recv(&mut buf) {
            Ok(Some(n)) => n,
            Ok(None) => continue,
            Err(e) => {
                if !stop.load(Ordering::Relaxed) {
                    eprintln!("linklab: receive failed, this direction stops: {e}");
                }
                return;
            }
        };
        let now = Instant::now();
        c.frames_in.fetch_add(1, Ordering::Relaxed);
        c.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
        // ARP is not part of the emulated IP path (the lab also installs static
        // neighbours, so normally there is none).
        let verdict = if buf.get(12..14) == Some(&ETHERTYPE_ARP[..]) {
            Verdict::Deliver(now)
        } else {
            let mut model = lock(&dir.model);
            let verdict = model.admit(now, n);
            if matches!(verdict, Verdict::Deliver(_)) {
                let wait = u64::try_from(model.last_wait().as_micros()).unwrap_or(u64::MAX);
                c.queue_wait_us.fetch_add(wait, Ordering::Relaxed);
            }
            verdict
        };
        match verdict {
            Verdict::Drop(Drop::Loss) => c.lost.fetch_add(1, Ordering::Relaxed),
            Verdict::Drop(Drop::Outage) => c.outage_dropped.fetch_add(1, Ordering::Relaxed),
            Verdict::Drop(Drop::QueueFull) => c.queue_dropped.fetch_add(1, Ordering::Relaxed),
            Verdict::Deliver(at) => {
                lock(&dir.line).push_back((at, buf[..n].to_vec()));
                dir.wake();
                0
            }
        };
    }
    dir.wake();
}

fn release(tx: &PacketSocket, dir: &Direction, stop: &AtomicBool) {
    sys::tight_timer_slack();
    let c = &dir.counters;
    let mut line = lock(&dir.line);
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let wait = match line.front() {
            None => IDLE,
            Some((at, _)) if *at <= now => {
                let Some((_, frame)) = line.pop_front() else {
                    continue;
                };
                drop(line);
                match tx.send(&frame) {
                    Ok(()) => {
                        c.frames_out.fetch_add(1, Ordering::Relaxed);
                        c.bytes_out.fetch_add(frame.len() as u64, Ordering::Relaxed);
                    }
                    Err(_) => {
                        c.send_errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                line = lock(&dir.line);
                continue;
            }
            Some((at, _)) => (*at - now).min(IDLE),
        };
        line = dir
            .changed
            .wait_timeout(line, wait)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}
