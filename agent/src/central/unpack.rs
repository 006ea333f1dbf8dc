//! `edgerelay unpack`: consume batches from the central broker and print each record
//! once, as a JSON line.
//!
//! Invariants:
//! - A batch is acknowledged to the broker (persistent session, manual acks) only after
//!   its records were written out and the duplicate memory was committed — so a crash
//!   of unpack re-delivers, never skips (at-least-once); the committed memory then drops
//!   what was already written, so a restart does not print a record twice.
//! - Duplicates are identified by (gateway, epoch, stream, seq); the memory is a range
//!   set per (gateway, epoch, stream) in a small redb file.
//! - Every message is untrusted: a bad batch or notice is counted and logged, never
//!   fatal.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio_util::sync::CancellationToken;

use super::ranges::RangeSet;
use crate::uplink::backoff::Backoff;
use crate::wire::{self, Dictionary};

const SEEN: TableDefinition<&str, &[u8]> = TableDefinition::new("seen");
/// Dictionaries received, so a restarted unpack decodes batches still queued for it
/// even after the gateway cleared their retained dictionary.
const DICTS: TableDefinition<u64, &[u8]> = TableDefinition::new("dictionaries");
/// Dictionaries come from the broker (untrusted): each is bounded in size
/// (`wire::MAX_DICTIONARY`) and at most this many are kept, oldest dropped.
const MAX_DICTIONARIES: usize = 64;

/// Known dictionaries by id, bounded (see `MAX_DICTIONARIES`).
#[derive(Default)]
struct Dictionaries {
    by_id: HashMap<u64, Dictionary>,
    order: std::collections::VecDeque<u64>,
}

impl Dictionaries {
    fn get(&self, id: u64) -> Option<Dictionary> {
        self.by_id.get(&id).cloned()
    }

    /// Keep `d`; false when it was known. `evicted` gets the id dropped to make room.
    fn insert(&mut self, d: Dictionary, evicted: &mut Option<u64>) -> bool {
        if self.by_id.contains_key(&d.id) {
            return false;
        }
        if self.order.len() == MAX_DICTIONARIES {
            if let Some(old) = self.order.pop_front() {
                self.by_id.remove(&old);
                *evicted = Some(old);
            }
        }
        self.order.push_back(d.id);
        self.by_id.insert(d.id, d);
        true
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("cannot open the duplicate memory {path}: {detail}")]
    State { path: PathBuf, detail: String },
}

/// Where decoded records go.
#[derive(Debug, Clone)]
pub enum Output {
    /// One JSON line per record on the writer `run` is given.
    JsonLines,
    /// Each record published at QoS 1 to this prefix + its original topic.
    Republish(String),
}

#[derive(Debug, Clone)]
pub struct UnpackOptions {
    pub host: String,
    pub port: u16,
    pub output: Output,
    /// Topic filter of the gateways' prefixes, e.g. "edgerelay/+".
    pub prefix: String,
    pub state: PathBuf,
    pub client_id: String,
}

#[derive(Debug, Default)]
struct Counts {
    batches: u64,
    records: u64,
    duplicates: u64,
    bad: u64,
    gaps: u64,
}

/// The duplicate memory: a range set per (gateway, epoch, stream), persisted, and the
/// dictionaries received.
struct Seen {
    db: Arc<Database>,
    sets: HashMap<String, RangeSet>,
    dicts: Dictionaries,
}

impl Seen {
    fn open(path: &PathBuf) -> Result<Self, UnpackError> {
        let err = |e: &dyn std::fmt::Display| UnpackError::State {
            path: path.clone(),
            detail: e.to_string(),
        };
        let db = Database::create(path).map_err(|e| err(&e))?;
        let txn = db.begin_write().map_err(|e| err(&e))?;
        txn.open_table(SEEN).map_err(|e| err(&e))?;
        txn.open_table(DICTS).map_err(|e| err(&e))?;
        txn.commit().map_err(|e| err(&e))?;
        let mut sets = HashMap::new();
        let mut dicts = Dictionaries::default();
        {
            let read = db.begin_read().map_err(|e| err(&e))?;
            let table = read.open_table(SEEN).map_err(|e| err(&e))?;
            for entry in table.iter().map_err(|e| err(&e))? {
                let (k, v) = entry.map_err(|e| err(&e))?;
                let set = RangeSet::decode(v.value())
                    .ok_or_else(|| err(&format!("corrupt entry {}", k.value())))?;
                sets.insert(k.value().to_owned(), set);
            }
            let table = read.open_table(DICTS).map_err(|e| err(&e))?;
            for entry in table.iter().map_err(|e| err(&e))? {
                let (_, v) = entry.map_err(|e| err(&e))?;
                dicts.insert(Dictionary::new(v.value().to_vec()), &mut None);
            }
        }
        Ok(Self {
            db: Arc::new(db),
            sets,
            dicts,
        })
    }

    /// Keep a received dictionary (memory and file); false if it was known.
    async fn learn(&mut self, d: Dictionary) -> Result<bool, String> {
        let mut evicted = None;
        if !self.dicts.insert(d.clone(), &mut evicted) {
            return Ok(false);
        }
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || -> Result<(), redb::Error> {
            let txn = db.begin_write()?;
            {
                let mut t = txn.open_table(DICTS)?;
                t.insert(d.id, d.bytes.as_slice())?;
                if let Some(old) = evicted {
                    t.remove(old)?;
                }
            }
            txn.commit()?;
            Ok(())
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        Ok(true)
    }

    async fn persist(&self, key: &str) -> Result<(), String> {
        let Some(set) = self.sets.get(key) else {
            return Ok(());
        };
        let (db, key, bytes) = (self.db.clone(), key.to_owned(), set.encode());
        tokio::task::spawn_blocking(move || -> Result<(), redb::Error> {
            let txn = db.begin_write()?;
            txn.open_table(SEEN)?
                .insert(key.as_str(), bytes.as_slice())?;
            txn.commit()?;
            Ok(())
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
    }
}

/// Publishes records back to the broker under a prefix over its own MQTT session (the
/// uplink's, with exact packet-id → PUBACK mapping): `publish_all` returns only when the
/// broker acknowledged every one of them.
struct Republisher {
    cfg: crate::config::UpstreamConfig,
    session: Option<crate::uplink::session::Session>,
}

impl Republisher {
    fn new(host: &str, port: u16, client_id: &str) -> Self {
        Self {
            cfg: crate::config::UpstreamConfig {
                host: host.to_owned(),
                port,
                url: format!("mqtt://{host}:{port}"),
                client_id: format!("{client_id}-republish"),
                topic_prefix: String::new(),
                mode: crate::config::UpstreamMode::Passthrough,
                batch_size: std::num::NonZeroUsize::MIN,
                batch_linger: Duration::ZERO,
                username: None,
                password: None,
                tls: None,
                keep_alive: Duration::from_secs(30),
                inflight: std::num::NonZeroU16::MIN,
                priority_connection: false,
                // The central side's LAN: whatever the system runs.
                congestion: None,
                protocol: crate::config::MqttVersion::V5,
                max_attempts: std::num::NonZeroU16::MIN,
                connect_timeout: Duration::from_secs(10),
                reconnect_min: Duration::from_millis(200),
                reconnect_max: Duration::from_secs(10),
            },
            session: None,
        }
    }

    async fn publish_all(
        &mut self,
        items: Vec<(String, bytes::Bytes, bool)>,
    ) -> Result<(), String> {
        // A session kept from an earlier batch may have gone stale while idle (this
        // connection sends no keep-alive of its own between batches; the broker drops
        // it after 1.5 × keep_alive): one failure on it is retried on a fresh one.
        let reused = self.session.is_some();
        match self.try_publish_all(items.clone()).await {
            Err(e) if reused => {
                tracing::info!(error = %e, "republish connection was stale; reconnecting");
                self.try_publish_all(items).await
            }
            result => result,
        }
    }

    async fn try_publish_all(
        &mut self,
        items: Vec<(String, bytes::Bytes, bool)>,
    ) -> Result<(), String> {
        use tokio::io::AsyncWriteExt;
        const WINDOW: usize = 256;
        if self.session.is_none() {
            self.session = Some(
                crate::uplink::session::Session::connect(&self.cfg, &self.cfg.client_id)
                    .await
                    .map_err(|e| e.to_string())?,
            );
        }
        let result = async {
            let s = self.session.as_mut().ok_or("no session")?;
            let mut items = items.into_iter().peekable();
            while items.peek().is_some() {
                let mut waiting = std::collections::HashSet::new();
                for (topic, payload, retain) in items.by_ref().take(WINDOW) {
                    let pkid = s.alloc_pkid(|id| waiting.contains(&id));
                    s.queue_publish(topic, payload, retain, pkid)
                        .map_err(|e| e.to_string())?;
                    waiting.insert(pkid);
                }
                s.writer
                    .write_all_buf(&mut s.out)
                    .await
                    .map_err(|e| e.to_string())?;
                s.writer.flush().await.map_err(|e| e.to_string())?;
                while !waiting.is_empty() {
                    match tokio::time::timeout(Duration::from_secs(30), s.reader.next()).await {
                        Ok(Some(Ok(crate::uplink::session::Incoming::PubAck { pkid, refused }))) => {
                            if let Some(r) = refused {
                                tracing::warn!(reason = %r.reason, "the broker refused a republished record");
                            }
                            waiting.remove(&pkid);
                        }
                        Ok(Some(Ok(_))) => {}
                        Ok(Some(Err(e))) => return Err(e.to_string()),
                        Ok(None) => return Err("broker closed the republish connection".to_owned()),
                        Err(_) => {
                            return Err("no PUBACK for republished records within 30 s".to_owned())
                        }
                    }
                }
            }
            Ok(())
        }
        .await;
        if result.is_err() {
            self.session = None;
        }
        result
    }
}

/// Run until `cancel`; JSON lines go to `out`.
pub async fn run(
    opts: UnpackOptions,
    out: &mut (dyn Write + Send),
    cancel: CancellationToken,
) -> Result<(), UnpackError> {
    let mut seen = Seen::open(&opts.state)?;
    let mut republisher = match &opts.output {
        Output::Republish(prefix) => Some((
            prefix.clone(),
            Republisher::new(&opts.host, opts.port, &opts.client_id),
        )),
        Output::JsonLines => None,
    };
    let mut counts = Counts::default();
    let mut mqtt = MqttOptions::new(opts.client_id.clone(), opts.host.clone(), opts.port);
    mqtt.set_clean_session(false);
    mqtt.set_manual_acks(true);
    mqtt.set_keep_alive(Duration::from_secs(30));
    mqtt.set_max_packet_size(wire::MAX_BODY + (1 << 20), 1 << 20);
    // Room for every acknowledgement the broker's in-flight window can need: queueing
    // one never waits on the event loop this task itself polls.
    let (client, mut events) = AsyncClient::new(mqtt, 1024);
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let filters = [
        format!("{}/batch/+", opts.prefix),
        format!("{}/dict/+", opts.prefix),
        format!("{}/gap", opts.prefix),
    ];
    loop {
        let ev = tokio::select! {
            _ = cancel.cancelled() => break,
            ev = events.poll() => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff.reset();
                tracing::info!(broker = %format!("{}:{}", opts.host, opts.port), "unpack connected");
                let subs = filters
                    .iter()
                    .map(|f| rumqttc::SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
                if let Err(e) = client.try_subscribe_many(subs) {
                    tracing::error!(error = %e, "cannot subscribe");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                tracing::info!(filters = ?filters, "unpack subscribed")
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let done = handle(
                    &p.topic,
                    &p.payload,
                    &mut seen,
                    &mut counts,
                    out,
                    republisher.as_mut(),
                )
                .await;
                if p.qos == QoS::AtMostOnce {
                    // Nothing to acknowledge, nothing the broker would send again.
                } else if done {
                    if let Err(e) = client.try_ack(&p) {
                        tracing::warn!(error = %e, "cannot queue PUBACK; the broker will redeliver");
                    }
                } else {
                    // A broker sends an unacknowledged message again only on a new
                    // connection of the session: reconnect (after the back-off) rather
                    // than leave it unacknowledged, and unprocessed, for as long as
                    // this connection lasts.
                    tracing::info!(topic = %p.topic, "reconnecting so that the broker delivers the message again");
                    if let Err(e) = client.try_disconnect() {
                        tracing::warn!(error = %e, "cannot queue DISCONNECT");
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "central broker connection error");
                let delay = backoff.next_delay(rand::random::<f64>());
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    let _ = client.try_disconnect();
    tracing::info!(
        batches = counts.batches,
        records = counts.records,
        duplicates = counts.duplicates,
        bad = counts.bad,
        gaps = counts.gaps,
        "unpack stopped"
    );
    Ok(())
}

/// Process one message; true when it may be acknowledged (false: a local failure that
/// a redelivery may cure, e.g. the duplicate memory could not be written).
async fn handle(
    topic: &str,
    payload: &[u8],
    seen: &mut Seen,
    counts: &mut Counts,
    out: &mut (dyn Write + Send),
    republisher: Option<&mut (String, Republisher)>,
) -> bool {
    if let Some((_, id)) = topic.rsplit_once("/dict/") {
        if payload.is_empty() {
            // The gateway cleared a dictionary it no longer uses.
            tracing::debug!(%topic, "dictionary cleared");
            return true;
        }
        if payload.len() > wire::MAX_DICTIONARY {
            counts.bad += 1;
            tracing::warn!(%topic, bytes = payload.len(), "dictionary larger than {} bytes; ignored", wire::MAX_DICTIONARY);
            return true;
        }
        let d = Dictionary::new(payload.to_vec());
        if u64::from_str_radix(id, 16).ok() == Some(d.id) {
            match seen.learn(d).await {
                Ok(true) => tracing::info!(id = %id, bytes = payload.len(), "dictionary received"),
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(error = %e, "cannot keep a dictionary; it will be redelivered");
                    return false;
                }
            }
        } else {
            counts.bad += 1;
            tracing::warn!(%topic, "dictionary content does not match its id; ignored");
        }
        return true;
    }
    if topic.ends_with("/gap") {
        counts.gaps += 1;
        tracing::warn!(%topic, notice = %String::from_utf8_lossy(payload), "gateway reports records dropped unsent");
        return true;
    }
    let batch = match wire::decode(payload, &|id| seen.dicts.get(id)) {
        Ok(b) => b,
        // Not the batch's fault: its dictionary (published retained before the gateway
        // used it) has not reached us yet. Never acknowledge what was not written out.
        Err(e @ wire::WireError::UnknownDictionary(_)) => {
            tracing::warn!(%topic, error = %e, "batch not acknowledged: the broker will deliver it again");
            return false;
        }
        Err(e) => {
            counts.bad += 1;
            tracing::warn!(%topic, error = %e, "bad batch skipped");
            return true;
        }
    };
    counts.batches += 1;
    let key = format!(
        "{}/{:016x}/{}",
        batch.header.gateway, batch.header.epoch, batch.header.stream
    );
    let set = seen.sets.entry(key.clone()).or_default();
    let fresh: Vec<&wire::WireRecord> = batch
        .records
        .iter()
        .filter(|r| !set.contains(r.seq))
        .collect();
    counts.duplicates += (batch.records.len() - fresh.len()) as u64;
    match republisher {
        // Marked seen only once the broker acknowledged every republished record: a
        // failure leaves the batch unacknowledged, so it comes again.
        Some((prefix, publisher)) => {
            let items = fresh
                .iter()
                .map(|r| (format!("{prefix}{}", r.topic), r.payload.clone(), r.retain))
                .collect();
            if let Err(e) = publisher.publish_all(items).await {
                tracing::warn!(error = %e, "republishing failed; the batch will be redelivered");
                return false;
            }
        }
        None => {
            for r in &fresh {
                if writeln!(out, "{}", wire::record_json(&batch.header, r)).is_err() {
                    tracing::error!("cannot write output");
                    return false;
                }
            }
            if out.flush().is_err() {
                return false;
            }
        }
    }
    let fresh = fresh.len() as u64;
    for r in &batch.records {
        set.insert(r.seq);
    }
    counts.records += fresh;
    if let Err(e) = seen.persist(&key).await {
        tracing::error!(error = %e, "cannot record what was written; the batch will be redelivered");
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dictionaries_are_bounded_oldest_first() {
        let mut d = Dictionaries::default();
        let all: Vec<Dictionary> = (0..=MAX_DICTIONARIES)
            .map(|i| Dictionary::new(vec![i as u8; 16]))
            .collect();
        for x in &all {
            d.insert(x.clone(), &mut None);
        }
        assert_eq!(d.by_id.len(), MAX_DICTIONARIES);
        assert!(d.get(all[0].id).is_none(), "the oldest went");
        assert!(d.get(all[MAX_DICTIONARIES].id).is_some());
    }
}
