//! edgerelay's one-command demo (`cargo run --release --example demo`), as a library
//! so its parts are tested like the agent's.
//!
//! ```text
//!  fleet (MQTT, TCP, Unix) ──► edgerelay (in-process, temp data dir)
//!        ──► emulated link (relay: rate, delay, outage on a schedule)
//!        ──► embedded broker (rumqttd) ──► unpack (in-process) ──► tally
//! ```
//!
//! Nothing here is part of the agent: the agent binary never links this package.

pub mod central;
pub mod fleet;
pub mod link;
pub mod run;
pub mod view;
