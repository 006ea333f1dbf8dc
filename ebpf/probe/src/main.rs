//! edgerelay's link probe, kernel side: measures the agent's own upstream TCP
//! connection.
//!
//! - `edgerelay_sockops` (cgroup sock_ops, attached to the agent's cgroup): when a
//!   connection to the target (`TARGET`: remote address, port, network namespace) starts,
//!   it is registered in `CONNS` under its socket cookie and asks for the RTT,
//!   retransmit, RTO and state callbacks; each callback updates its `ConnStats`.
//! - `tp_btf` programs on tcp_receive_reset, tcp_send_reset and tcp_retransmit_skb count
//!   those events for registered connections only (looked up by cookie), so the probe
//!   never reports on the rest of the host.
//!
//! Invariants: nothing is recorded for a socket that did not match the target when it
//! connected; every program returns "continue" (1 for sock_ops): the probe observes,
//! it never changes what TCP does.

#![no_std]
#![no_main]

use aya_ebpf::bindings::{
    BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RETRANS_CB, BPF_SOCK_OPS_RETRANS_CB_FLAG,
    BPF_SOCK_OPS_RTO_CB, BPF_SOCK_OPS_RTO_CB_FLAG, BPF_SOCK_OPS_RTT_CB, BPF_SOCK_OPS_RTT_CB_FLAG,
    BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
};
use aya_ebpf::helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns};
use aya_ebpf::macros::{btf_tracepoint, map, sock_ops};
use aya_ebpf::maps::{Array, LruHashMap};
use aya_ebpf::programs::{BtfTracePointContext, SockOpsContext};
use edgerelay_probe_common::{ConnStats, Target, RTT_MIN_WINDOW_NS};

#[map(name = "TARGET")]
static TARGET: Array<Target> = Array::with_max_entries(1, 0);

#[map(name = "CONNS")]
static CONNS: LruHashMap<u64, ConnStats> = LruHashMap::with_max_entries(64, 0);

/// The port of a sock_ops context in host order: the kernel stores the remote port in
/// network order, shifted into the upper half on little-endian machines.
fn remote_port(raw: u32) -> u32 {
    let be = if raw > 0xffff { raw >> 16 } else { raw };
    u32::from(u16::from_be(be as u16))
}

fn matches_target(ctx: &SockOpsContext) -> bool {
    let Some(t) = TARGET.get(0) else {
        return false;
    };
    if t.remote_port == 0 || remote_port(ctx.remote_port()) != t.remote_port {
        return false;
    }
    if t.remote_ip4 != 0 && ctx.remote_ip4() != t.remote_ip4 {
        return false;
    }
    if t.netns_cookie != 0 {
        // SAFETY: the helper reads the context's socket namespace.
        let ns = unsafe { bpf_get_netns_cookie(ctx.ops.cast()) };
        if ns != t.netns_cookie {
            return false;
        }
    }
    true
}

/// Copy the kernel's counters for this socket into `s`.
fn refresh(ctx: &SockOpsContext, s: &mut ConnStats, now: u64) {
    // SAFETY: `ops` is the program's context pointer; these are readable fields.
    unsafe {
        let o = &*ctx.ops;
        s.state = u64::from(o.state);
        s.srtt_us = u64::from(o.srtt_us >> 3);
        s.total_retrans = u64::from(o.total_retrans);
        s.data_segs_out = u64::from(o.data_segs_out);
        s.bytes_acked = o.bytes_acked;
        s.packets_out = u64::from(o.packets_out);
    }
    s.updated_ns = now;
}

#[sock_ops]
pub fn edgerelay_sockops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    // SAFETY: helper calls on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // SAFETY: no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        if matches_target(&ctx) {
            let s = ConnStats {
                local_port: u64::from(ctx.local_port()),
                updated_ns: now,
                ..ConnStats::default()
            };
            let _ = CONNS.insert(&cookie, &s, 0);
            let _ = ctx.set_cb_flags(
                (BPF_SOCK_OPS_RTT_CB_FLAG
                    | BPF_SOCK_OPS_RETRANS_CB_FLAG
                    | BPF_SOCK_OPS_RTO_CB_FLAG
                    | BPF_SOCK_OPS_STATE_CB_FLAG) as i32,
            );
        }
        return 1;
    }
    let Some(s) = CONNS.get_ptr_mut(&cookie) else {
        return 1;
    };
    // SAFETY: a map value pointer, valid for this program run.
    let s = unsafe { &mut *s };
    match op {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            s.established = 1;
            s.local_port = u64::from(ctx.local_port());
            s.last_ack_ns = now;
            refresh(&ctx, s, now);
        }
        BPF_SOCK_OPS_RTT_CB => {
            // args: the RTT sample (µs) and the smoothed RTT (scaled by 8).
            let sample = u64::from(ctx.arg(0));
            let srtt = u64::from(ctx.arg(1) >> 3);
            let dev = sample.abs_diff(srtt);
            // Mean deviation, gain 1/4, like the kernel's mdev.
            s.rttvar_us = if s.rtt_samples == 0 {
                dev
            } else {
                s.rttvar_us - s.rttvar_us / 4 + dev / 4
            };
            s.rtt_samples += 1;
            let age = now.saturating_sub(s.rtt_min_start_ns);
            if age >= RTT_MIN_WINDOW_NS {
                // The window before counts only if it just ended: after a pause in the
                // samples it says nothing of now.
                s.rtt_min_prev_us = if age < 2 * RTT_MIN_WINDOW_NS {
                    s.rtt_min_us
                } else {
                    0
                };
                s.rtt_min_us = sample;
                s.rtt_min_start_ns = now;
            } else if sample < s.rtt_min_us {
                s.rtt_min_us = sample;
            }
            s.last_ack_ns = now;
            refresh(&ctx, s, now);
        }
        BPF_SOCK_OPS_RETRANS_CB => {
            s.retrans += 1;
            refresh(&ctx, s, now);
        }
        BPF_SOCK_OPS_RTO_CB => {
            s.rto += 1;
            s.updated_ns = now;
        }
        BPF_SOCK_OPS_STATE_CB => {
            // args: old state, new state.
            s.state = u64::from(ctx.arg(1));
            s.updated_ns = now;
        }
        _ => {}
    }
    1
}

/// The registered connection `sk` (a `struct sock *` from a BTF tracepoint), if any.
fn registered(sk: *mut core::ffi::c_void) -> Option<*mut ConnStats> {
    if sk.is_null() {
        return None;
    }
    // SAFETY: the tracing variant of the helper accepts a BTF socket pointer.
    let cookie = unsafe { bpf_get_socket_cookie(sk) };
    CONNS.get_ptr_mut(&cookie)
}

#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn edgerelay_receive_reset(ctx: BtfTracePointContext) -> i32 {
    if let Some(s) = registered(ctx.arg(0)) {
        // SAFETY: a map value pointer, valid for this program run.
        unsafe { (*s).resets_in += 1 };
    }
    0
}

#[btf_tracepoint(function = "tcp_send_reset")]
pub fn edgerelay_send_reset(ctx: BtfTracePointContext) -> i32 {
    if let Some(s) = registered(ctx.arg(0)) {
        // SAFETY: as above.
        unsafe { (*s).resets_out += 1 };
    }
    0
}

#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn edgerelay_retransmit(ctx: BtfTracePointContext) -> i32 {
    if let Some(s) = registered(ctx.arg(0)) {
        // SAFETY: as above.
        unsafe { (*s).retransmit_skb += 1 };
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
