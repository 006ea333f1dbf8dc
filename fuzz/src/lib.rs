//! Fuzz harness bodies; see harness.rs.
pub mod harness;
