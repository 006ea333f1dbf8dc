//! Configuration: one TOML file → a validated, typed `Config`.
//!
//! Why two layers: `raw` mirrors the file (serde, unknown keys rejected), `validate`
//! turns it into typed sections (durations, byte sizes, enums, non-zero numbers) and
//! collects *every* problem with its key and line, so an operator fixes a broken file in
//! one pass. Invariants: a `Config` that exists is valid; each part of the agent receives
//! only its own section.

mod local;
mod ops;
mod policy;
mod raw;
pub mod reload;
mod render;
mod sections;
mod tls;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::num::{NonZeroU16, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use tls::{ListenerTls, UpstreamTls};

pub use crate::store::WhenFull;

#[derive(Debug, Clone)]
pub struct Config {
    pub agent: AgentConfig,
    pub compression: CompressionConfig,
    pub link: LinkConfig,
    pub rate: RateConfig,
    /// `[[policy]]`: streams, priorities, degradation, drain order.
    pub policies: crate::policy::Policies,
    pub buffer: BufferConfig,
    pub sockets: Vec<SocketConfig>,
    pub local_mqtt: Option<LocalMqttConfig>,
    pub local_broker: Option<LocalBrokerConfig>,
    pub upstream: UpstreamConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
}

pub use ops::DEFAULT_METRICS_LISTEN;

/// The HTTP endpoint for Prometheus, health checks and `edgerelay status` (`[metrics]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    /// None: `listen = "off"`.
    pub listen: Option<SocketAddr>,
    /// A backlog with the link up and nothing acknowledged for this long is "stuck":
    /// not ready, a warning, a metric.
    pub stuck_after: Duration,
}

/// Logging (`[log]`); `EDGERELAY_LOG` overrides the level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// A tracing filter ("info", "edgerelay=debug,info").
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    /// One JSON object a line, for log shippers.
    Json,
}

/// How fast the uplink may send (`[rate]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateConfig {
    /// Adapt rate, window, batches and level to the measured link.
    pub adapt: bool,
    /// Hard cap in bit/s (metered links), whatever the link could do.
    pub max_rate_bps: Option<u64>,
}

/// How the link to the central broker is measured (`[link]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkConfig {
    pub probe: ProbeSetting,
}

/// `[link] probe`: where link measurements come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeSetting {
    /// eBPF when it loads, else TCP_INFO.
    Auto,
    /// eBPF only; if it cannot load, the agent says why and uses TCP_INFO anyway.
    Ebpf,
    TcpInfo,
    /// No transport measurements (PUBACK round trips only).
    Off,
}

impl ProbeSetting {
    pub fn as_str(self) -> &'static str {
        match self {
            ProbeSetting::Auto => "auto",
            ProbeSetting::Ebpf => "ebpf",
            ProbeSetting::TcpInfo => "tcp-info",
            ProbeSetting::Off => "off",
        }
    }
}

/// How batches are compressed (`[compression]`).
#[derive(Debug, Clone)]
pub struct CompressionConfig {
    /// zstd level; "auto" is 3 until the rate controller drives it.
    pub level: i32,
    pub auto_level: bool,
    pub dictionary: DictionarySetting,
}

/// `[compression] dictionary`: which zstd dictionary batches are compressed with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DictionarySetting {
    /// Batches are compressed without a dictionary.
    Off,
    /// Trained from recent payloads, retrained when it stops saving bytes.
    Auto,
    /// A fixed dictionary file, loaded at start.
    File(PathBuf),
}

/// The embedded MQTT endpoint devices connect to.
#[derive(Debug, Clone)]
pub struct LocalMqttConfig {
    pub listen: SocketAddr,
    pub max_connections: NonZeroUsize,
    pub max_packet_size: NonZeroUsize,
    /// QoS 1/2 publishes a client may have unacknowledged (MQTT 5 receive maximum).
    pub receive_maximum: NonZeroU16,
    /// Filters of what is relayed upstream; other topics stay local.
    pub topics: Vec<String>,
    pub password_file: Option<PathBuf>,
    pub allow_anonymous: bool,
    /// Time allowed between TCP accept and CONNECT.
    pub connect_timeout: Duration,
    /// TLS on the listener (cert_file + key_file); None: plain TCP.
    pub tls: Option<ListenerTls>,
}

/// Client mode: subscribe to a broker already running on the gateway.
#[derive(Debug, Clone)]
pub struct LocalBrokerConfig {
    pub host: String,
    pub port: u16,
    pub url: String,
    pub topics: Vec<String>,
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub keep_alive: Duration,
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub gateway_id: String,
    pub data_dir: PathBuf,
    /// Async runtime threads (the store writer and the compressor have their own).
    pub worker_threads: NonZeroUsize,
}

#[derive(Debug, Clone)]
pub struct BufferConfig {
    pub max_size: u64,
    pub max_age: Duration,
    pub when_full: WhenFull,
    pub commit_max_records: NonZeroUsize,
    pub commit_linger: Duration,
    pub cache_size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Tcp(SocketAddr),
    Udp(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::Tcp(a) => write!(f, "tcp://{a}"),
            Listen::Udp(a) => write!(f, "udp://{a}"),
            Listen::Unix(p) => write!(f, "unix://{}", p.display()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Newline-delimited (the newline is not part of the message).
    Lines,
    /// u32 big-endian length, then that many bytes.
    LengthPrefixed,
    /// UDP: one datagram is one message.
    Datagram,
}

#[derive(Debug, Clone)]
pub struct SocketConfig {
    pub listen: Listen,
    pub framing: Framing,
    pub topic: String,
    pub max_message_size: NonZeroUsize,
    /// Stream sockets: write one 0x06 byte back per committed message.
    pub ack: bool,
    pub max_connections: NonZeroUsize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamMode {
    /// One publish per record, unchanged.
    Passthrough,
    /// Many records per publish in the wire format, zstd-compressed.
    Batch,
}

/// A secret that never appears in logs or printed config.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: String) -> Self {
        Self(s)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub host: String,
    pub port: u16,
    pub url: String,
    pub client_id: String,
    pub topic_prefix: String,
    pub mode: UpstreamMode,
    /// Batch mode: records per batch at most...
    pub batch_size: NonZeroUsize,
    /// ...and how long a partial batch may wait for more once the buffer is drained.
    pub batch_linger: Duration,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// `mqtts://`: TLS, with the server verified (see crate::tls).
    pub tls: Option<UpstreamTls>,
    pub keep_alive: Duration,
    pub inflight: NonZeroU16,
    /// The MQTT version of the upstream sessions.
    pub protocol: MqttVersion,
    /// Refusals of a record (MQTT 5) before it moves to the dead letters.
    pub max_attempts: NonZeroU16,
    /// High-priority streams go on a second connection (client id `{client_id}-hi`),
    /// so they never wait behind the rest's loss recovery on a lossy link.
    pub priority_connection: bool,
    /// The kernel congestion control asked for on the upstream sockets (None: the
    /// system's default). BBR keeps its throughput under random loss, where loss-based
    /// ones (CUBIC, Reno) fall to a fraction of a lossy link.
    pub congestion: Option<String>,
    pub connect_timeout: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
}

/// `[upstream] protocol`: MQTT 5 (refusals are seen, the broker's packet size limit
/// is honoured) or 3.1.1 (for brokers without 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MqttVersion {
    V311,
    V5,
}

/// Parse an `mqtt://host[:port]` URL (as in `[upstream] url`) into host and port.
pub fn parse_mqtt_url(url: &str) -> Result<(String, u16), String> {
    validate::parse_url(url)
}

/// One problem in a config file, located by its key (and line when known).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "line {l}: {}: {}", self.key, self.message),
            None => write!(f, "{}: {}", self.key, self.message),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", render_problems(.path, .problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

fn render_problems(path: &Path, problems: &[Problem]) -> String {
    let mut s = format!(
        "{} has {} error{}:",
        path.display(),
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    for p in problems {
        s.push_str("\n  ");
        s.push_str(&p.to_string());
    }
    s
}

impl Config {
    /// Read and validate a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Validate config text; `path` is used in messages and to resolve relative files.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        validate::parse(text, path).map_err(|problems| ConfigError::Invalid {
            path: path.to_path_buf(),
            problems,
        })
    }

    /// The effective configuration (defaults filled in, secrets masked) as TOML.
    pub fn render(&self) -> String {
        render::render(self)
    }
}

#[cfg(test)]
mod tests;
