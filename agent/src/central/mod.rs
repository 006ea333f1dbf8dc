//! The central side: `unpack` subscribes to gateways' batches on the central broker,
//! decodes them, drops duplicates and hands the records on (JSON lines).
//!
//! `ranges` is the pure duplicate memory; `unpack` the MQTT consumer around it.

pub mod ranges;
pub mod unpack;
