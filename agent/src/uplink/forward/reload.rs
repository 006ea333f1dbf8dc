//! What a config reload (SIGHUP) changes in a running uplink: the policies (priority
//! per stream, degradation, drain order) and the rate cap, put in force at the next
//! once-a-second tick. Streams are never added or removed here: that needs a restart
//! (`config::reload` sorts the keys).

use std::sync::Arc;

use tokio::sync::watch;

use super::Forwarder;
use crate::policy::Policies;

/// Settings a reload changes in a running uplink (`config::reload`).
#[derive(Debug)]
pub struct Live {
    pub policies: watch::Receiver<Arc<Policies>>,
    /// `[rate] max_rate`, bytes/s.
    pub max_rate: watch::Receiver<Option<u64>>,
}

impl Forwarder {
    /// Once a second: what a reload changed, put in force.
    pub(super) fn apply_reload(&mut self) {
        let Some(live) = self.live.as_mut() else {
            return;
        };
        if live.policies.has_changed().unwrap_or(false) {
            let p = live.policies.borrow_and_update().clone();
            for lane in &mut self.lanes {
                if let Some(s) = p.streams().iter().find(|s| s.name == lane.name) {
                    lane.priority = s.priority;
                }
            }
            self.policies = p;
            tracing::info!("policies reloaded");
        }
        if live.max_rate.has_changed().unwrap_or(false) {
            let cap = *live.max_rate.borrow_and_update();
            if let Some((adapter, _)) = self.adapt.as_mut() {
                adapter.controller_mut().set_max_rate(cap);
            }
            tracing::info!(max_rate = ?cap, "rate cap reloaded (bytes/s)");
        }
    }
}
