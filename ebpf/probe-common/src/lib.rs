//! The maps' key and value types, shared by the probe (kernel side) and the agent.
//!
//! `#[repr(C)]`, fixed-width, no padding the two sides could disagree on: this layout
//! is the contract between the committed BPF object and the agent that loads it.

#![no_std]

/// Name of the map holding the `Target`, the `ConnStats` map, and the programs.
pub const TARGET_MAP: &str = "TARGET";
pub const CONNS_MAP: &str = "CONNS";
pub const SOCKOPS_PROG: &str = "edgerelay_sockops";
pub const RECEIVE_RESET_PROG: &str = "edgerelay_receive_reset";
pub const SEND_RESET_PROG: &str = "edgerelay_send_reset";
pub const RETRANSMIT_PROG: &str = "edgerelay_retransmit";

/// Which connections to watch: outgoing TCP connections to `remote_ip4`:`remote_port`
/// made in network namespace `netns_cookie` (0: any), written by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Target {
    pub netns_cookie: u64,
    /// IPv4 address as the kernel stores it (network byte order); 0: any address.
    pub remote_ip4: u32,
    /// Port in host byte order.
    pub remote_port: u32,
}

/// What the probe saw of one watched connection (keyed by its socket cookie).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnStats {
    pub local_port: u64,
    /// 1 once the connection is established.
    pub established: u64,
    /// TCP state (TCP_ESTABLISHED = 1 … TCP_CLOSE = 7).
    pub state: u64,
    /// The kernel's smoothed RTT, µs.
    pub srtt_us: u64,
    /// Mean deviation of RTT samples from the smoothed RTT, µs.
    pub rttvar_us: u64,
    pub rtt_samples: u64,
    /// Retransmission callbacks (segments retransmitted).
    pub retrans: u64,
    /// Retransmission timeouts.
    pub rto: u64,
    /// tcp_retransmit_skb tracepoint hits.
    pub retransmit_skb: u64,
    /// The kernel's totals at the last callback.
    pub total_retrans: u64,
    pub data_segs_out: u64,
    pub bytes_acked: u64,
    pub packets_out: u64,
    /// RSTs received (tcp_receive_reset), including for a refused connect.
    pub resets_in: u64,
    /// RSTs sent (tcp_send_reset).
    pub resets_out: u64,
    /// bpf_ktime_get_ns() of the last ACK (RTT sample) and of the last update.
    pub last_ack_ns: u64,
    pub updated_ns: u64,
    /// The smallest RTT sample (µs) of the current window of `RTT_MIN_WINDOW_NS`, which
    /// began at `rtt_min_start_ns`, and of the window before it. The smoothed RTT lags a
    /// queue that has gone by seconds on a slow link; the minimum of the last samples
    /// does not (a queue delays every packet, so its minimum is the queue's floor).
    pub rtt_min_us: u64,
    pub rtt_min_prev_us: u64,
    pub rtt_min_start_ns: u64,
}

/// Length of one RTT-minimum window (ConnStats::rtt_min_us).
pub const RTT_MIN_WINDOW_NS: u64 = 500_000_000;

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data: repr(C), only integer fields, no padding.
    unsafe impl aya::Pod for super::Target {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnStats {}
}
