//! Ingest: everything that accepts messages from local producers and hands them to the
//! store. A producer is acknowledged only after the store has committed its message.
//!
//! Invariants: bad input from one client (oversize frames, garbage, slow reads) closes
//! that client only and never loses messages already committed; listeners are bound
//! before `run` returns so configuration mistakes fail at start-up, not later.

pub mod framing;
pub mod socket;

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters for one ingest source (exported as metrics later; logged at shutdown).
#[derive(Debug, Default)]
pub struct IngestStats {
    pub accepted: AtomicU64,
    pub oversize: AtomicU64,
    pub rejected: AtomicU64,
    pub connections: AtomicU64,
    pub refused_connections: AtomicU64,
}

impl IngestStats {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("cannot listen on {listen}: {source}")]
    Bind {
        listen: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {listen}: {reason}")]
    UnixPath { listen: String, reason: String },
}
