//! The writer thread's end of the request queue.

use std::time::Instant;

use tokio::sync::mpsc;

use super::Request;

/// The writer's end of the request queue: tokio's mpsc (lock-free for the many async
/// producers) with blocking, deadline-bounded receives for this thread, driven by a tiny
/// current-thread runtime that only runs timers.
pub struct Inbox {
    rx: mpsc::Receiver<Request>,
    rt: tokio::runtime::Runtime,
}

pub(super) enum Recv {
    Got(Request),
    Timeout,
    Closed,
}

impl Inbox {
    pub fn new(rx: mpsc::Receiver<Request>) -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()?;
        Ok(Self { rx, rt })
    }

    pub(super) fn try_recv(&mut self) -> Option<Request> {
        self.rx.try_recv().ok()
    }

    pub(super) fn recv_until(&mut self, deadline: Instant) -> Recv {
        let rx = &mut self.rx;
        let deadline = tokio::time::Instant::from_std(deadline);
        match self
            .rt
            .block_on(async { tokio::time::timeout_at(deadline, rx.recv()).await })
        {
            Ok(Some(r)) => Recv::Got(r),
            Ok(None) => Recv::Closed,
            Err(_) => Recv::Timeout,
        }
    }
}
