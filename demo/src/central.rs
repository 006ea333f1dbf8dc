//! The demo's central side: an embedded broker (rumqttd) and edgerelay's own `unpack`
//! in-process, whose JSON lines are tallied to check what arrived.
//!
//! The broker has two listeners: MQTT 5 for the agent (its default protocol, whose
//! PUBACK reason codes the dead-letter path needs) and 3.1.1 for `unpack`. The tally
//! trusts nothing: a record it cannot attribute to a demo sender is counted as
//! foreign; a (stream, seq) seen twice in unpack's output is a duplicate (unpack's
//! job is that there are none); a sender's message number seen twice under different
//! records is a duplicate too (the agent ingested something twice).

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum CentralError {
    #[error("no free port on loopback: {0}")]
    Port(std::io::Error),
    #[error("broker configuration: {0}")]
    Config(String),
    #[error("the embedded broker did not start listening on {0} within 10 s")]
    NotListening(SocketAddr),
}

/// A free loopback port (bound and released: the caller binds it right away).
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The embedded central broker.
#[derive(Debug)]
pub struct Central {
    /// MQTT 5 listener (the agent's uplink, through the emulated link).
    pub v5: SocketAddr,
    /// MQTT 3.1.1 listener (unpack).
    pub v4: SocketAddr,
}

impl Central {
    /// Start rumqttd on two loopback ports, on a thread of its own; returns when both
    /// accept connections.
    pub fn start() -> Result<Central, CentralError> {
        let (p4, p5) = (
            free_port().map_err(CentralError::Port)?,
            free_port().map_err(CentralError::Port)?,
        );
        // Batches are at most a few hundred KiB; 4 MiB leaves room for any setting.
        let text = format!(
            r#"
id = 0
[router]
max_connections = 64
max_outgoing_packet_count = 512
max_segment_size = 104857600
max_segment_count = 10

[v4.unpack]
name = "unpack-v4"
listen = "127.0.0.1:{p4}"
next_connection_delay_ms = 0
[v4.unpack.connections]
connection_timeout_ms = 10000
max_payload_size = 4194304
max_inflight_count = 512
dynamic_filters = true

[v5.agents]
name = "agents-v5"
listen = "127.0.0.1:{p5}"
next_connection_delay_ms = 0
[v5.agents.connections]
connection_timeout_ms = 10000
max_payload_size = 4194304
max_inflight_count = 512
dynamic_filters = true
"#
        );
        let config: rumqttd::Config =
            toml::from_str(&text).map_err(|e| CentralError::Config(e.to_string()))?;
        std::thread::Builder::new()
            .name("central-broker".to_owned())
            .spawn(move || {
                let mut broker = rumqttd::Broker::new(config);
                if let Err(e) = broker.start() {
                    tracing::error!(error = %e, "demo: the embedded broker stopped");
                }
            })
            .map_err(CentralError::Port)?;
        let central = Central {
            v4: SocketAddr::from(([127, 0, 0, 1], p4)),
            v5: SocketAddr::from(([127, 0, 0, 1], p5)),
        };
        for addr in [central.v4, central.v5] {
            wait_listening(addr, Duration::from_secs(10))?;
        }
        Ok(central)
    }

    /// Run edgerelay's `unpack` against the broker until `stop`, tallying its output.
    pub fn unpack(
        &self,
        state_dir: &Path,
        tally: Arc<Tally>,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let opts = edgerelay::central::unpack::UnpackOptions {
            host: self.v4.ip().to_string(),
            port: self.v4.port(),
            output: edgerelay::central::unpack::Output::JsonLines,
            prefix: "edgerelay/+".to_owned(),
            state: state_dir.join("unpack.redb"),
            client_id: "demo-unpack".to_owned(),
        };
        tokio::spawn(async move {
            let mut sink = LineSink {
                pending: Vec::new(),
                tally,
            };
            if let Err(e) = edgerelay::central::unpack::run(opts, &mut sink, stop).await {
                tracing::error!(error = %e, "demo: unpack failed");
            }
        })
    }
}

fn wait_listening(addr: SocketAddr, within: Duration) -> Result<(), CentralError> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(CentralError::NotListening(addr))
}

/// What arrived centrally, per sender.
#[derive(Debug, Default)]
pub struct Arrivals {
    /// Message numbers received, by sender id.
    pub by_sender: HashMap<String, HashSet<u64>>,
    /// Publish → unpack latency (ms), by sender id prefix kind ("alarm", "other").
    pub latency_ms: HashMap<&'static str, Vec<u64>>,
    /// Records in unpack's output.
    pub records: u64,
    /// A (epoch, stream, seq) twice in unpack's output.
    pub duplicate_records: u64,
    /// A sender's message number twice (under different records).
    pub duplicate_messages: u64,
    /// Records that are not the demo's.
    pub foreign: u64,
    /// Payload bytes of the messages that arrived (each once).
    pub payload_bytes: u64,
    /// What the same messages would cost as one MQTT 3.1.1 QoS 1 publish each (fixed
    /// header, topic, packet id, payload, and the PUBACK back): the bytes a
    /// message-by-message bridge moves.
    pub publish_bytes: u64,
    seen: HashSet<(u64, String, u64)>,
}

/// Shared between unpack's sink and the view.
#[derive(Debug, Default)]
pub struct Tally {
    inner: Mutex<Arrivals>,
}

impl Tally {
    pub fn lock(&self) -> MutexGuard<'_, Arrivals> {
        // A panic elsewhere while holding it leaves counts that are still counts.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One JSON line of unpack's output.
    pub fn record(&self, line: &[u8], now_ms: u64) {
        let mut a = self.lock();
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else {
            a.foreign += 1;
            return;
        };
        a.records += 1;
        let key = (
            v["epoch"].as_u64().unwrap_or(0),
            v["stream"].as_str().unwrap_or("").to_owned(),
            v["seq"].as_u64().unwrap_or(u64::MAX),
        );
        if !a.seen.insert(key) {
            a.duplicate_records += 1;
            return;
        }
        let msg = v["payload"]
            .as_str()
            .and_then(|p| serde_json::from_str::<serde_json::Value>(p).ok());
        let Some((device, n, ts)) = msg
            .as_ref()
            .and_then(|m| Some((m["device"].as_str()?, m["n"].as_u64()?, m["ts"].as_u64()?)))
        else {
            a.foreign += 1;
            return;
        };
        let kind = if device == "alarm-panel" {
            "alarm"
        } else {
            "other"
        };
        if !a.by_sender.entry(device.to_owned()).or_default().insert(n) {
            a.duplicate_messages += 1;
            return;
        }
        let payload = v["payload"].as_str().map_or(0, str::len) as u64;
        let topic = v["topic"].as_str().map_or(0, str::len) as u64;
        let remaining = 2 + topic + 2 + payload;
        let length_bytes = if remaining < 128 {
            1
        } else if remaining < 16_384 {
            2
        } else {
            3
        };
        a.payload_bytes += payload;
        a.publish_bytes += 1 + length_bytes + remaining + 4;
        a.latency_ms
            .entry(kind)
            .or_default()
            .push(now_ms.saturating_sub(ts));
    }
}

/// unpack writes JSON lines here.
struct LineSink {
    pending: Vec<u8>,
    tally: Arc<Tally>,
}

impl Write for LineSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.pending.extend_from_slice(buf);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        while let Some(i) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=i).collect();
            self.tally.record(&line[..i], now);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(seq: u64, device: &str, n: u64) -> Vec<u8> {
        let payload = serde_json::json!({"device": device, "n": n, "ts": 1000}).to_string();
        serde_json::json!({"epoch": 1, "stream": "default", "seq": seq, "topic": "t/x", "payload": payload})
            .to_string()
            .into_bytes()
    }

    #[test]
    fn the_tally_counts_arrivals_duplicates_and_strangers() {
        let t = Tally::default();
        t.record(&line(1, "dev-000", 0), 1500);
        t.record(&line(2, "dev-000", 1), 1500);
        t.record(&line(2, "dev-000", 1), 1500); // the same record again
        t.record(&line(3, "dev-000", 1), 1500); // the same message, another record
        t.record(&line(4, "alarm-panel", 0), 1250);
        t.record(b"not json", 1500);
        t.record(
            br#"{"epoch":1,"stream":"default","seq":9,"payload":"plain"}"#,
            1500,
        );
        let a = t.lock();
        assert_eq!(a.records, 6);
        assert_eq!(a.duplicate_records, 1);
        assert_eq!(a.duplicate_messages, 1);
        assert_eq!(a.foreign, 2);
        assert_eq!(a.by_sender["dev-000"].len(), 2);
        assert_eq!(a.latency_ms["alarm"], vec![250]);
        // Three messages counted once each; a publish adds 1 + 1 + 2 + 3 + 2 bytes
        // around the payload and a 4-byte PUBACK.
        let payloads: u64 = [("dev-000", 0), ("dev-000", 1), ("alarm-panel", 0)]
            .iter()
            .map(|(d, n)| {
                serde_json::json!({"device": d, "n": n, "ts": 1000})
                    .to_string()
                    .len() as u64
            })
            .sum();
        assert_eq!(a.payload_bytes, payloads);
        assert_eq!(a.publish_bytes, payloads + 3 * 13);
    }

    #[test]
    fn the_sink_splits_lines_across_writes() {
        let tally = Arc::new(Tally::default());
        let mut sink = LineSink {
            pending: Vec::new(),
            tally: tally.clone(),
        };
        let mut all = line(1, "dev-001", 0);
        all.push(b'\n');
        all.extend(line(2, "dev-001", 1));
        all.push(b'\n');
        let (a, b) = all.split_at(17);
        sink.write_all(a).expect("write");
        assert_eq!(tally.lock().records, 0);
        sink.write_all(b).expect("write");
        assert_eq!(tally.lock().by_sender["dev-001"].len(), 2);
    }
}
