//! Uplink: moves committed records from the store to the central broker and deletes
//! them only once the broker has acknowledged them.
//!
//! `session` is the MQTT connection (on rumqttc's packet codec), `backoff` the reconnect
//! policy, `forward` the loop that reads, publishes and acknowledges, with a packer per
//! mode: passthrough (`forward::PassthroughPacker`) or batch (`batch::BatchPacker`).

pub mod backoff;
pub mod batch;
pub mod dictionary;
pub mod forward;
pub mod pace;
pub mod session;

pub use forward::{Forwarder, PassthroughPacker};
