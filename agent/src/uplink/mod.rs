//! Uplink: moves committed records from the store to the central broker and deletes
//! them only once the broker has acknowledged them.
//!
//! `session` is the MQTT connection (on rumqttc's packet codec), `backoff` the reconnect
//! policy, `passthrough` the one-publish-per-record mode.

pub mod backoff;
pub mod passthrough;
pub mod session;

pub use passthrough::Passthrough;
