//! Local fan-out: devices on a gateway often talk to each other, so a PUBLISH from one
//! local client is delivered to the other local clients subscribed to its topic.
//!
//! Invariants: delivery never blocks the publisher — each subscriber has a bounded
//! queue, and a message that does not fit is dropped for that subscriber and counted
//! (a slow or stuck subscriber cannot hold up ingest or grow memory); delivered QoS is
//! min(publish QoS, granted QoS) and never above 1; no state survives a disconnect.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::RwLock;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::proto::SubFilter;
use crate::topic;

/// Messages queued per subscriber before further ones are dropped.
pub const QUEUE_DEPTH: usize = 256;

#[derive(Debug, Clone)]
pub struct Delivery {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
}

#[derive(Debug)]
struct Subscriber {
    filters: Vec<SubFilter>,
    tx: mpsc::Sender<Delivery>,
}

#[derive(Debug, Default)]
pub struct Router {
    subs: RwLock<HashMap<u64, Subscriber>>,
    /// Connections with at least one filter: lets publishes skip the lock when zero.
    active: AtomicUsize,
    pub dropped: AtomicU64,
    pub delivered: AtomicU64,
}

impl Router {
    /// A queue for connection `conn` (call once, before subscribing).
    pub fn register(&self, conn: u64) -> mpsc::Receiver<Delivery> {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        if let Ok(mut subs) = self.subs.write() {
            subs.insert(
                conn,
                Subscriber {
                    filters: Vec::new(),
                    tx,
                },
            );
        }
        rx
    }

    pub fn unregister(&self, conn: u64) {
        if let Ok(mut subs) = self.subs.write() {
            if let Some(s) = subs.remove(&conn) {
                if !s.filters.is_empty() {
                    self.active.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Add (or replace, same filter) subscriptions; `filters` are already validated.
    pub fn subscribe(&self, conn: u64, filters: &[SubFilter]) {
        if let Ok(mut subs) = self.subs.write() {
            if let Some(s) = subs.get_mut(&conn) {
                let was_empty = s.filters.is_empty();
                for f in filters {
                    s.filters.retain(|old| old.filter != f.filter);
                    s.filters.push(f.clone());
                }
                if was_empty && !s.filters.is_empty() {
                    self.active.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    pub fn unsubscribe(&self, conn: u64, filters: &[String]) {
        if let Ok(mut subs) = self.subs.write() {
            if let Some(s) = subs.get_mut(&conn) {
                let was_empty = s.filters.is_empty();
                s.filters.retain(|f| !filters.contains(&f.filter));
                if !was_empty && s.filters.is_empty() {
                    self.active.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Deliver to every matching local subscriber (except `from` where it asked for
    /// no-local).
    pub fn publish(&self, from: u64, topic_name: &str, payload: &Bytes, qos: u8) {
        if self.active.load(Ordering::Relaxed) == 0 {
            return;
        }
        let Ok(subs) = self.subs.read() else { return };
        for (conn, s) in subs.iter() {
            let granted = s
                .filters
                .iter()
                .filter(|f| !(f.no_local && *conn == from) && topic::matches(topic_name, &f.filter))
                .map(|f| f.qos)
                .max();
            let Some(granted) = granted else { continue };
            let d = Delivery {
                topic: topic_name.to_owned(),
                payload: payload.clone(),
                qos: qos.min(granted).min(1),
                // MQTT: retain is cleared on delivery to an existing subscription.
                retain: false,
            };
            match s.tx.try_send(d) {
                Ok(()) => self.delivered.fetch_add(1, Ordering::Relaxed),
                Err(_) => self.dropped.fetch_add(1, Ordering::Relaxed),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(filter: &str, qos: u8, no_local: bool) -> SubFilter {
        SubFilter {
            filter: filter.into(),
            qos,
            no_local,
        }
    }

    #[test]
    fn fans_out_with_qos_and_no_local() {
        let r = Router::default();
        let mut a = r.register(1);
        let mut b = r.register(2);
        r.subscribe(1, &[f("x/#", 1, true)]);
        r.subscribe(2, &[f("x/+", 0, false), f("x/y", 1, false)]);
        r.publish(1, "x/y", &Bytes::from_static(b"p"), 2);
        assert!(a.try_recv().is_err(), "no-local");
        let d = b.try_recv().expect("delivered");
        assert_eq!((d.topic.as_str(), d.qos, d.retain), ("x/y", 1, false));
        r.publish(2, "x/z", &Bytes::from_static(b"q"), 1);
        assert_eq!(a.try_recv().expect("a gets it").qos, 1);
        assert_eq!(b.try_recv().expect("b gets it").qos, 0);
        r.unsubscribe(2, &["x/+".into(), "x/y".into()]);
        r.publish(1, "x/z", &Bytes::new(), 1);
        assert!(b.try_recv().is_err());
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let r = Router::default();
        let _rx = r.register(1);
        r.subscribe(1, &[f("#", 1, false)]);
        for _ in 0..QUEUE_DEPTH + 10 {
            r.publish(2, "t", &Bytes::new(), 1);
        }
        assert_eq!(r.dropped.load(Ordering::Relaxed), 10);
        r.unregister(1);
        assert_eq!(r.active.load(Ordering::Relaxed), 0);
    }
}
