//! edgerelay: a store-and-forward relay agent for edge gateways.
//!
//! Data flow (the module tree follows it):
//! `ingest` (sockets, MQTT) → `store` (redb, group commit) → `uplink` (MQTT to the
//! central broker), configured by `config`. `record` is the unit that flows through.

pub mod record;
pub mod store;
