//! The `Record`: one message as it flows from ingest through the store to the uplink.
//!
//! Invariants: a record is immutable once built; `payload` is shared (`Bytes`) so the
//! store, uplink and retries never copy it; `ts_ms` is the gateway's wall-clock time at
//! ingest (Unix milliseconds) and is what retention ages against.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

/// Where a record entered the agent. Short, because it is stored with every record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub kind: OriginKind,
    /// Source name, e.g. the socket's listen address or an MQTT client id (≤ 255 bytes).
    pub name: Arc<str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum OriginKind {
    Socket = 1,
    Mqtt = 2,
    LocalBroker = 3,
}

impl OriginKind {
    /// The `source` label of the ingest metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Socket => "socket",
            Self::Mqtt => "mqtt",
            Self::LocalBroker => "local_broker",
        }
    }

    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Socket),
            2 => Some(Self::Mqtt),
            3 => Some(Self::LocalBroker),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub topic: String,
    pub payload: Bytes,
    /// QoS the message arrived with (0..=2); upstream publishes use their own QoS.
    pub qos: u8,
    pub retain: bool,
    pub origin: Origin,
    pub ts_ms: u64,
}

impl Record {
    pub fn new(topic: impl Into<String>, payload: Bytes, origin: Origin) -> Self {
        Self {
            topic: topic.into(),
            payload,
            qos: 1,
            retain: false,
            origin,
            ts_ms: now_ms(),
        }
    }
}

/// A record read back from the store with its per-stream sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    pub seq: u64,
    pub record: Record,
}

/// Wall-clock Unix milliseconds; a clock before 1970 reads as 0 rather than failing.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
