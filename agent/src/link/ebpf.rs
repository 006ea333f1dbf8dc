//! The eBPF source: loads the committed probe (ebpf/probe.bpf.o, built by
//! scripts/build-ebpf.sh), attaches its sock_ops program to the agent's own cgroup and
//! its tp_btf programs to the TCP reset/retransmit tracepoints, and reads its maps once
//! a second into transport samples.
//!
//! Invariants: loading never takes the agent down — every failure (no CAP_BPF, no BTF,
//! an old kernel, one program refused) is an `Err` or a warning with the reason, and the
//! monitor falls back to TCP_INFO; the sock_ops program is mandatory (it measures RTT and
//! retransmissions), the tracepoints are optional (their absence is reported once);
//! the probe only ever reports on connections matching the `Target` the agent set.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use aya::maps::{Array, HashMap as BpfHashMap, MapData};
use aya::programs::{BtfTracePoint, CgroupAttachMode, SockOps};
use aya::{Btf, Ebpf};
use edgerelay_probe_common::{
    ConnStats, Target, CONNS_MAP, RECEIVE_RESET_PROG, RETRANSMIT_PROG, RTT_MIN_WINDOW_NS,
    SEND_RESET_PROG, SOCKOPS_PROG, TARGET_MAP,
};

use super::estimate::{Source, Transport};

/// The probe, compiled once for all architectures (bpfel) and committed.
static OBJECT: &[u8] = aya::include_bytes_aligned!("../../../ebpf/probe.bpf.o");

/// TCP_CLOSE in the kernel's state numbering.
const TCP_CLOSE: u64 = 7;

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot find the agent's cgroup v2: {0}")]
    Cgroup(String),
    #[error("loading the probe: {0}")]
    Load(String),
    #[error("program {program}: {detail}")]
    Program {
        program: &'static str,
        detail: String,
    },
    #[error("map {map}: {detail}")]
    Map { map: &'static str, detail: String },
}

/// A loaded, attached probe.
pub struct Probe {
    bpf: Ebpf,
    /// Resets already reported, per connection (socket cookie).
    resets_seen: HashMap<u64, u64>,
    /// Which optional programs are missing, for the log.
    pub missing: Vec<String>,
    /// Whether refused connects are counted here (tcp_receive_reset attached).
    pub counts_resets: bool,
}

impl std::fmt::Debug for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probe")
            .field("missing", &self.missing)
            .finish_non_exhaustive()
    }
}

/// An error with its causes ("`bpf_link_create` failed: Operation not permitted").
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// The agent's cgroup v2 directory (where the sock_ops program attaches).
fn own_cgroup() -> Result<PathBuf, ProbeError> {
    let err = |e: &dyn std::fmt::Display| ProbeError::Cgroup(e.to_string());
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| err(&e))?;
    let rel = cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| err(&"no cgroup v2 entry in /proc/self/cgroup"))?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| err(&e))?;
    // mountinfo: "… mount-point … - fstype source options"
    let mount = mounts
        .lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| left.split_whitespace().nth(4).map(str::to_owned))?
        })
        .ok_or_else(|| err(&"cgroup2 is not mounted"))?;
    Ok(PathBuf::from(mount).join(rel.trim_start_matches('/')))
}

impl Probe {
    /// Load, attach and aim the probe at `target`.
    pub fn load(target: Target) -> Result<Probe, ProbeError> {
        let cgroup_path = own_cgroup()?;
        let cgroup = std::fs::File::open(&cgroup_path)
            .map_err(|e| ProbeError::Cgroup(format!("{}: {e}", cgroup_path.display())))?;
        let mut bpf = Ebpf::load(OBJECT).map_err(|e| ProbeError::Load(chain(&e)))?;
        {
            let prog: &mut SockOps = bpf
                .program_mut(SOCKOPS_PROG)
                .ok_or_else(|| ProbeError::Load(format!("no program {SOCKOPS_PROG}")))?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| ProbeError::Program {
                    program: SOCKOPS_PROG,
                    detail: e.to_string(),
                })?;
            let fail = |e: aya::programs::ProgramError| ProbeError::Program {
                program: SOCKOPS_PROG,
                detail: chain(&e),
            };
            prog.load().map_err(fail)?;
            // A BPF link (kernel ≥ 5.7) coexists with other links on the cgroup — several
            // agents (or tests) may share one — and takes no flags ("single" is 0).
            prog.attach(&cgroup, CgroupAttachMode::Single)
                .map_err(fail)?;
        }
        let mut probe = Probe {
            bpf,
            resets_seen: HashMap::new(),
            missing: Vec::new(),
            counts_resets: false,
        };
        probe.set_target(target)?;
        let btf = match Btf::from_sys_fs() {
            Ok(b) => Some(b),
            Err(e) => {
                probe
                    .missing
                    .push(format!("all tracepoints (no kernel BTF: {e})"));
                None
            }
        };
        if let Some(btf) = btf {
            for (prog_name, tracepoint) in [
                (RECEIVE_RESET_PROG, "tcp_receive_reset"),
                (SEND_RESET_PROG, "tcp_send_reset"),
                (RETRANSMIT_PROG, "tcp_retransmit_skb"),
            ] {
                match probe.attach_tracepoint(prog_name, tracepoint, &btf) {
                    Ok(()) => {
                        if prog_name == RECEIVE_RESET_PROG {
                            probe.counts_resets = true;
                        }
                    }
                    Err(e) => probe.missing.push(format!("{tracepoint} ({e})")),
                }
            }
        }
        Ok(probe)
    }

    fn attach_tracepoint(&mut self, name: &str, tracepoint: &str, btf: &Btf) -> Result<(), String> {
        let prog: &mut BtfTracePoint = self
            .bpf
            .program_mut(name)
            .ok_or("not in the object")?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| e.to_string())?;
        prog.load(tracepoint, btf).map_err(|e| chain(&e))?;
        prog.attach().map_err(|e| chain(&e))?;
        Ok(())
    }

    /// Aim the probe at another connection target.
    pub fn set_target(&mut self, target: Target) -> Result<(), ProbeError> {
        let map = self.bpf.map_mut(TARGET_MAP).ok_or(ProbeError::Map {
            map: "TARGET",
            detail: "not in the object".into(),
        })?;
        let mut array: Array<&mut MapData, Target> =
            Array::try_from(map).map_err(|e| ProbeError::Map {
                map: "TARGET",
                detail: e.to_string(),
            })?;
        array.set(0, target, 0).map_err(|e| ProbeError::Map {
            map: "TARGET",
            detail: e.to_string(),
        })
    }

    /// Read the maps: the current connection's sample (if any) and the resets seen
    /// since the last read. `now_ns` is CLOCK_MONOTONIC (the probe's clock).
    pub fn read(
        &mut self,
        now_ns: u64,
        measured_port: Option<u16>,
    ) -> Result<(Option<Transport>, u64), ProbeError> {
        let map = self.bpf.map_mut(CONNS_MAP).ok_or(ProbeError::Map {
            map: "CONNS",
            detail: "not in the object".into(),
        })?;
        let mut conns: BpfHashMap<&mut MapData, u64, ConnStats> = BpfHashMap::try_from(map)
            .map_err(|e| ProbeError::Map {
                map: "CONNS",
                detail: e.to_string(),
            })?;
        let entries: Vec<(u64, ConnStats)> = conns.iter().filter_map(Result::ok).collect();
        tracing::trace!(?entries, "eBPF probe connections");
        // Cookies the LRU map evicted are gone for good: forget them here too, or this
        // memory would grow with every reconnection.
        self.resets_seen
            .retain(|cookie, _| entries.iter().any(|(c, _)| c == cookie));
        let mut new_resets = 0;
        let mut current: Option<(u64, ConnStats)> = None;
        for (cookie, s) in &entries {
            let seen = self.resets_seen.entry(*cookie).or_insert(0);
            new_resets += s.resets_in.saturating_sub(*seen);
            *seen = s.resets_in;
            // The session's measured connection; without one known, the latest.
            let measured = measured_port.is_none_or(|p| s.local_port == u64::from(p));
            if s.established == 1
                && s.state != TCP_CLOSE
                && measured
                && current.is_none_or(|(_, c)| s.updated_ns > c.updated_ns)
            {
                current = Some((*cookie, *s));
            }
        }
        // Closed connections are accounted for: forget them (the LRU map would evict
        // them anyway, possibly before their resets were read).
        for (cookie, s) in &entries {
            if s.state == TCP_CLOSE || (s.established == 0 && s.resets_in > 0) {
                let _ = conns.remove(cookie);
                self.resets_seen.remove(cookie);
            }
        }
        let sample = current.map(|(cookie, s)| {
            Transport {
                source: Source::Ebpf,
                connection: cookie,
                srtt: Duration::from_micros(s.srtt_us),
                rttvar: Duration::from_micros(s.rttvar_us),
                rtt_recent: recent_min_rtt(&s, now_ns),
                segs_out: s.data_segs_out,
                retrans: s.total_retrans,
                // The delivery rate comes from TCP_INFO's counter (the monitor): the
                // map's moves only with RTT samples, which a loss recovery starves, and
                // counts no SACKed bytes.
                delivery_rate: 0,
                bytes_acked: 0,
                unacked: u32::try_from(s.packets_out).unwrap_or(u32::MAX),
                since_last_ack: Some(Duration::from_nanos(now_ns.saturating_sub(s.last_ack_ns))),
            }
        });
        Ok((sample, new_resets))
    }
}

/// The smallest RTT sample of the last one to two windows (about a second), or zero
/// when no sample came in the last second (idle, or stalled: nothing to judge by).
fn recent_min_rtt(s: &ConnStats, now_ns: u64) -> Duration {
    if s.rtt_min_us == 0 || now_ns.saturating_sub(s.last_ack_ns) > 2 * RTT_MIN_WINDOW_NS {
        return Duration::ZERO;
    }
    // The window before the current one counts while it ended less than a window ago.
    let min =
        if now_ns.saturating_sub(s.rtt_min_start_ns) < RTT_MIN_WINDOW_NS && s.rtt_min_prev_us > 0 {
            s.rtt_min_us.min(s.rtt_min_prev_us)
        } else {
            s.rtt_min_us
        };
    Duration::from_micros(min)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn stats(min_us: u64, prev_us: u64, start_ns: u64, last_ack_ns: u64) -> ConnStats {
        ConnStats {
            rtt_min_us: min_us,
            rtt_min_prev_us: prev_us,
            rtt_min_start_ns: start_ns,
            last_ack_ns,
            ..ConnStats::default()
        }
    }

    #[test]
    fn recent_rtt_is_the_minimum_of_the_last_windows() {
        // A window begun 100 ms ago: the one before it still counts.
        let s = stats(300_000, 120_000, 900 * MS, 990 * MS);
        assert_eq!(
            recent_min_rtt(&s, 1_000 * MS),
            Duration::from_micros(120_000)
        );
        // Begun 600 ms ago: only the current one.
        let s = stats(300_000, 120_000, 400 * MS, 990 * MS);
        assert_eq!(
            recent_min_rtt(&s, 1_000 * MS),
            Duration::from_micros(300_000)
        );
        // No window before (the probe cleared it after a pause in the samples).
        let s = stats(300_000, 0, 900 * MS, 990 * MS);
        assert_eq!(
            recent_min_rtt(&s, 1_000 * MS),
            Duration::from_micros(300_000)
        );
        // No sample for over a second: nothing to judge by.
        let s = stats(300_000, 120_000, 900 * MS, 900 * MS);
        assert_eq!(recent_min_rtt(&s, 2_000 * MS), Duration::ZERO);
        assert_eq!(
            recent_min_rtt(&ConnStats::default(), 1_000 * MS),
            Duration::ZERO
        );
    }
}
