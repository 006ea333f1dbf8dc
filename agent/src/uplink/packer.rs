//! What one upstream publish carries, decided by a `Packer` per mode: passthrough (one
//! record as it came) or batch (`batch::BatchPacker`). The forwarder (`forward`) owns
//! everything else — sessions, PUBACKs, deletes — once for both.
//!
//! Invariants: a packer only takes records from the front of the queue it is given, in
//! order, and reports every record a publish carries in its `Seqs`, so the forwarder
//! deletes exactly what the broker acknowledged.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;

use super::forward::UplinkError;
use crate::control::Plan;
use crate::record::StoredRecord;

/// The stored records one publish carries. Passthrough sends one record per publish,
/// so it carries its seq inline: no allocation per message.
#[derive(Debug, PartialEq, Eq)]
pub enum Seqs {
    One(u64),
    Many(Vec<u64>),
}

/// One upstream publish and the stored records it carries.
#[derive(Debug)]
pub struct Unit {
    pub topic: String,
    pub payload: Bytes,
    pub retain: bool,
    pub seqs: Seqs,
    /// Stored size of the records it carries (for the controller's compression ratio).
    pub stored_bytes: usize,
}

/// A retained control publish (QoS 1) a packer needs the broker to acknowledge before it
/// relies on it — a compression dictionary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    pub token: u64,
    pub topic: String,
    pub payload: Bytes,
}

/// A value a packer keeps with the buffer (`Store::put_meta`).
#[derive(Debug)]
pub struct MetaWrite {
    pub key: &'static str,
    pub value: Vec<u8>,
}

/// Turns queued records into publishes.
pub trait Packer: Send + std::fmt::Debug {
    /// Records a full publish takes (the forwarder reads ahead until it has them).
    fn wants(&self) -> usize;
    /// How long a partial publish may wait for more records once the store is drained.
    fn linger(&self) -> Duration;
    /// Take records of `stream` from the front of `queue` for one publish. `flush`:
    /// the store is drained and the linger has passed, so a partial publish must go
    /// now. `None`: wait.
    fn pack(
        &mut self,
        stream: &str,
        queue: &mut VecDeque<StoredRecord>,
        flush: bool,
    ) -> Result<Option<Unit>, UplinkError>;
    /// The next control publish to send, before any further records.
    fn announcement(&mut self) -> Option<Announcement> {
        None
    }
    /// The broker acknowledged announcement `token`; what to keep with the buffer.
    fn announced(&mut self, _token: u64) -> Option<MetaWrite> {
        None
    }
    /// The session ended: announcements not acknowledged must be offered again.
    fn session_lost(&mut self) {}
    /// The rate controller's plan for batches (size, linger, zstd level).
    fn set_plan(&mut self, _plan: &Plan) {}
}

/// One record per publish, unchanged, to `{topic_prefix}/{topic}`.
#[derive(Debug)]
pub struct PassthroughPacker {
    pub prefix: String,
}

impl Packer for PassthroughPacker {
    fn wants(&self) -> usize {
        1
    }
    fn linger(&self) -> Duration {
        Duration::ZERO
    }
    fn pack(
        &mut self,
        _stream: &str,
        queue: &mut VecDeque<StoredRecord>,
        _flush: bool,
    ) -> Result<Option<Unit>, UplinkError> {
        Ok(queue.pop_front().map(|r| Unit {
            stored_bytes: r.record.payload.len() + r.record.topic.len(),
            topic: upstream_topic(&self.prefix, &r.record.topic),
            payload: r.record.payload,
            retain: r.record.retain,
            seqs: Seqs::One(r.seq),
        }))
    }
}

/// The upstream topic of a record.
pub fn upstream_topic(prefix: &str, topic: &str) -> String {
    if prefix.is_empty() {
        topic.to_owned()
    } else {
        format!("{prefix}/{topic}")
    }
}
