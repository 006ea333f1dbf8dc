//! Uplink: moves committed records from the store to the central broker and deletes
//! them only once the broker has acknowledged them.
//!
//! `session` is the MQTT connection (on rumqttc's packet codec), `backoff` the reconnect
//! policy, `forward` the loop that reads, publishes and acknowledges; `packer` decides
//! what one publish carries (passthrough: `packer::PassthroughPacker`; batch:
//! `batch::BatchPacker`, with `dictionary` for its zstd dictionaries); `pace` applies the
//! rate controller's plan (`crate::control`).

pub mod backoff;
pub mod batch;
pub mod conn;
pub mod dictionary;
pub mod forward;
pub mod lanes;
pub mod pace;
pub mod packer;
pub mod session;

pub use forward::{Forwarder, PassthroughPacker};
