//! Raw serde mirror of the TOML file: every section is its own struct with unknown keys
//! rejected. Leaf values are kept loosely typed (strings for sizes, durations and enums)
//! and wrapped in `Spanned`, so validation can report every bad value with its line
//! instead of stopping at serde's first error.

use serde::Deserialize;
use toml::Spanned;

pub type Field<T> = Option<Spanned<T>>;

/// A size may be written as a byte count or as text like "512MiB".
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum SizeValue {
    Bytes(i64),
    Text(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAgent {
    pub gateway_id: Field<String>,
    pub data_dir: Field<String>,
    pub worker_threads: Field<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBuffer {
    pub max_size: Field<SizeValue>,
    pub max_age: Field<String>,
    pub when_full: Field<String>,
    pub commit_max_records: Field<i64>,
    pub commit_linger: Field<String>,
    pub cache_size: Field<SizeValue>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSocket {
    pub kind: Field<String>,
    pub listen: Field<String>,
    pub framing: Field<String>,
    pub topic: Field<String>,
    pub max_message_size: Field<SizeValue>,
    pub ack: Field<bool>,
    pub max_connections: Field<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub url: Field<String>,
    pub client_id: Field<String>,
    pub topic_prefix: Field<String>,
    pub mode: Field<String>,
    pub batch_size: Field<i64>,
    pub batch_linger: Field<String>,
    pub username: Field<String>,
    pub password: Field<String>,
    pub password_file: Field<String>,
    pub ca_file: Field<String>,
    pub cert_file: Field<String>,
    pub key_file: Field<String>,
    pub keep_alive: Field<String>,
    pub inflight: Field<i64>,
    pub priority_connection: Field<bool>,
    pub congestion: Field<String>,
    pub protocol: Field<String>,
    pub max_attempts: Field<i64>,
    pub connect_timeout: Field<String>,
    pub reconnect_min: Field<String>,
    pub reconnect_max: Field<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLocalMqtt {
    pub listen: Field<String>,
    pub max_connections: Field<i64>,
    pub max_packet_size: Field<SizeValue>,
    pub receive_maximum: Field<i64>,
    pub topics: Field<Vec<String>>,
    pub password_file: Field<String>,
    pub allow_anonymous: Field<bool>,
    pub connect_timeout: Field<String>,
    pub cert_file: Field<String>,
    pub key_file: Field<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLocalBroker {
    pub url: Field<String>,
    pub topics: Field<Vec<String>>,
    pub client_id: Field<String>,
    pub username: Field<String>,
    pub password: Field<String>,
    pub password_file: Field<String>,
    pub keep_alive: Field<String>,
}

/// A zstd level: a number, or "auto".
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum LevelValue {
    Number(i64),
    Text(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCompression {
    pub level: Field<LevelValue>,
    pub dictionary: Field<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLink {
    pub probe: Field<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    pub listen: Field<String>,
    pub stuck_after: Field<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub level: Field<String>,
    pub format: Field<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRate {
    pub adapt: Field<bool>,
    pub max_rate: Field<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    pub topics: Field<Vec<String>>,
    pub stream: Field<String>,
    pub priority: Field<String>,
    pub degrade: Field<String>,
    pub drain: Field<String>,
}
