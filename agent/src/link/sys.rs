//! The system calls the link monitor and the uplink need that std does not offer:
//! TCP_INFO and TCP_NOTSENT_LOWAT of the upstream socket, a socket's network namespace
//! cookie, the monotonic clock the eBPF probe's timestamps use, and statvfs for the
//! store's disk budget.
//!
//! The agent's only unsafe code is here: the crates that wrap TCP_INFO generate bindings
//! at build time (libclang), which ARM cross builds cannot afford. The struct below is
//! the kernel's `struct tcp_info` up to `tcpi_delivery_rate`; its layout is the same on
//! every architecture (u64 fields fall on 8-byte offsets). An older kernel fills less of
//! it: fields it did not write stay zero.

#![allow(unsafe_code)]

use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

use super::estimate::{Source, Transport};

/// Not in every libc release (Linux 5.14+).
const SO_NETNS_COOKIE: libc::c_int = 71;

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct RawTcpInfo {
    state: u8,
    ca_state: u8,
    retransmits: u8,
    probes: u8,
    backoff: u8,
    options: u8,
    wscale: u8,
    flags: u8,
    rto: u32,
    ato: u32,
    snd_mss: u32,
    rcv_mss: u32,
    unacked: u32,
    sacked: u32,
    lost: u32,
    retrans: u32,
    fackets: u32,
    last_data_sent: u32,
    last_ack_sent: u32,
    last_data_recv: u32,
    last_ack_recv: u32,
    pmtu: u32,
    rcv_ssthresh: u32,
    rtt: u32,
    rttvar: u32,
    snd_ssthresh: u32,
    snd_cwnd: u32,
    advmss: u32,
    reordering: u32,
    rcv_rtt: u32,
    rcv_space: u32,
    total_retrans: u32,
    pacing_rate: u64,
    max_pacing_rate: u64,
    bytes_acked: u64,
    bytes_received: u64,
    segs_out: u32,
    segs_in: u32,
    notsent_bytes: u32,
    min_rtt: u32,
    data_segs_in: u32,
    data_segs_out: u32,
    delivery_rate: u64,
}

/// Bytes of `struct tcp_info` up to and including `tcpi_total_retrans` (Linux 2.6).
const TCP_INFO_CLASSIC_LEN: usize = 104;

/// TCP_INFO of `socket`, and how many bytes of it the kernel filled.
fn tcp_info(socket: &impl AsFd) -> std::io::Result<(RawTcpInfo, usize)> {
    let mut info = RawTcpInfo::default();
    let mut len = std::mem::size_of::<RawTcpInfo>() as libc::socklen_t;
    // SAFETY: `info` is a plain-old-data struct writable for `len` bytes, and the
    // kernel writes at most `len` bytes into it; the fd is borrowed for the call.
    let r = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut RawTcpInfo).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // Every kernel since 2.6 fills at least the classic 104 bytes (through
    // total_retrans); less means something between us and the kernel (an emulator, a
    // sandbox) did not pass the struct through, and zeros would read as a perfect link.
    if (len as usize) < TCP_INFO_CLASSIC_LEN {
        return Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            format!("TCP_INFO returned {len} bytes, fewer than the {TCP_INFO_CLASSIC_LEN} every Linux kernel fills"),
        ));
    }
    Ok((info, len as usize))
}

/// Bytes `socket` holds that the peer has not received: in the pipe (sent, neither
/// acknowledged, SACKed nor lost — retransmissions included, as the kernel's own
/// congestion control counts it) plus those queued unsent. What the uplink's in-flight
/// window bounds. The kernel counts the pipe in segments; their bytes are the
/// unacknowledged bytes' share (segments are not all full: a high-priority
/// connection's are a publish each).
pub fn pipe_bytes(socket: &impl AsFd) -> std::io::Result<u64> {
    let (info, len) = tcp_info(socket)?;
    let notsent = if len >= std::mem::offset_of!(RawTcpInfo, min_rtt) {
        info.notsent_bytes as usize
    } else {
        notsent_bytes(socket)?
    };
    // Sent and not yet cumulatively acknowledged (SACKed and lost included).
    let unacked_bytes = queued_bytes(socket, libc::TIOCOUTQ)?.saturating_sub(notsent) as u64;
    let segments = (info.unacked + info.retrans).saturating_sub(info.sacked + info.lost);
    let in_pipe = if info.unacked == 0 {
        0
    } else {
        unacked_bytes * u64::from(segments) / u64::from(info.unacked)
    };
    Ok(in_pipe + notsent as u64)
}

/// Read TCP_INFO of `socket` (a connected TCP socket); `connection` tags the sample.
pub fn read(socket: &impl AsFd, connection: u64) -> std::io::Result<Transport> {
    let (info, _) = tcp_info(socket)?;
    Ok(Transport {
        source: Source::TcpInfo,
        connection,
        srtt: Duration::from_micros(u64::from(info.rtt)),
        rttvar: Duration::from_micros(u64::from(info.rttvar)),
        // TCP_INFO has no per-sample RTT: the kernel's smoothed one, unsmoothed here.
        rtt_recent: Duration::from_micros(u64::from(info.rtt)),
        // Data segments where the kernel has them (4.6+), else all segments.
        segs_out: u64::from(if info.data_segs_out > 0 {
            info.data_segs_out
        } else {
            info.segs_out
        }),
        retrans: u64::from(info.total_retrans),
        delivery_rate: info.delivery_rate,
        // Delivered, not just cumulatively acknowledged: with loss, data SACKed above
        // a hole is counted when it arrives, not seconds later in one jump when the
        // hole is filled (which made one-second rates swing 50-160 % of the link).
        bytes_acked: info
            .bytes_acked
            .saturating_add(u64::from(info.sacked) * u64::from(info.snd_mss)),
        unacked: info.unacked,
        since_last_ack: Some(Duration::from_millis(u64::from(info.last_ack_recv))),
    })
}

/// Let the kernel report the socket writable only while less than `bytes` are queued
/// unsent in it (TCP_NOTSENT_LOWAT), so the uplink's own queue — where priorities are
/// decided — holds what waits, not the socket.
pub fn set_notsent_lowat(socket: &impl AsFd, bytes: u32) -> std::io::Result<()> {
    let value = bytes as libc::c_int;
    // SAFETY: `value` is a live c_int of the size passed; the fd is borrowed.
    let r = unsafe {
        libc::setsockopt(
            socket.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Bytes queued in `socket` that the kernel has not sent yet (SIOCOUTQNSD): what a
/// write would wait behind.
pub fn notsent_bytes(socket: &impl AsFd) -> std::io::Result<usize> {
    queued_bytes(socket, libc::SIOCOUTQNSD as libc::Ioctl)
}

/// The send queue by `request`: SIOCOUTQ (= TIOCOUTQ: all bytes not yet acknowledged)
/// or SIOCOUTQNSD (those not yet sent).
fn queued_bytes(socket: &impl AsFd, request: libc::Ioctl) -> std::io::Result<usize> {
    let mut value: libc::c_int = 0;
    // SAFETY: both requests write one c_int to the pointer given, which is live and
    // writable; the fd is borrowed for the call.
    let r = unsafe {
        libc::ioctl(
            socket.as_fd().as_raw_fd(),
            request,
            &mut value as *mut libc::c_int,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(usize::try_from(value).unwrap_or(0))
}

/// Ask for congestion control `name` on `socket` (TCP_CONGESTION); the kernel refuses
/// one it does not have (ENOENT) or the process may not use (EPERM).
pub fn set_congestion(socket: &impl AsFd, name: &str) -> std::io::Result<()> {
    // SAFETY: the kernel reads `name.len()` bytes from the live string; the fd is
    // borrowed for the call.
    let r = unsafe {
        libc::setsockopt(
            socket.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The congestion control `socket` runs (TCP_CONGESTION).
pub fn congestion(socket: &impl AsFd) -> std::io::Result<String> {
    let mut name = [0u8; 16];
    let mut len = name.len() as libc::socklen_t;
    // SAFETY: `name` is writable for `len` bytes and the kernel writes at most that;
    // the fd is borrowed for the call.
    let r = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            name.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let bytes = &name[..(len as usize).min(name.len())];
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    Ok(String::from_utf8_lossy(&bytes[..end]).into_owned())
}

/// The cookie of the network namespace `socket` lives in (the agent's own).
pub fn netns_cookie(socket: &impl AsFd) -> std::io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` is writable for `len` bytes; the fd is borrowed for the call.
    let r = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of bpf_ktime_get_ns().
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000) + ts.tv_nsec as u64
}

/// statvfs(2) of `path`: bytes available to unprivileged users (the store's disk
/// budget, store/disk.rs). None where it cannot be asked.
pub fn statvfs_available(path: &std::ffi::CStr) -> Option<u64> {
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `path` is NUL-terminated; `st` is a valid out-pointer the call fills.
    let r = unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) };
    if r != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it initialised `st`.
    let st = unsafe { st.assume_init() };
    #[allow(clippy::unnecessary_cast)] // the field widths differ between targets
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    #[test]
    fn reads_a_live_connection() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut c = std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (mut s, _) = l.accept().expect("accept");
        for _ in 0..10 {
            c.write_all(b"ping").expect("write");
            let mut b = [0u8; 4];
            s.read_exact(&mut b).expect("read");
            s.write_all(&b).expect("echo");
            c.read_exact(&mut b).expect("read echo");
        }
        let t = super::read(&c, 7).expect("TCP_INFO");
        let a = super::monotonic_ns();
        assert!(super::monotonic_ns() >= a);
        assert_eq!(t.connection, 7);
        assert!(t.segs_out >= 10, "{t:?}");
        assert!(
            !t.srtt.is_zero(),
            "loopback RTT is small but measured: {t:?}"
        );
        assert!(t.srtt < std::time::Duration::from_millis(100));
        let err = super::read(&std::net::UdpSocket::bind("127.0.0.1:0").expect("udp"), 0);
        assert!(err.is_err(), "not a TCP socket");
    }

    #[test]
    fn the_classic_length_ends_at_total_retrans() {
        assert_eq!(
            std::mem::offset_of!(super::RawTcpInfo, total_retrans) + 4,
            super::TCP_INFO_CLASSIC_LEN
        );
    }

    // Apart from the TCP_INFO test, so each kernel interface fails on its own; qemu-user
    // passes neither through, and cross/build.sh skips both by name under emulation.
    #[test]
    fn reads_the_netns_cookie() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let c = std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let a = super::netns_cookie(&c).expect("netns cookie");
        assert!(a > 0);
        let b = super::netns_cookie(&l).expect("netns cookie");
        assert_eq!(a, b, "two sockets of one namespace share its cookie");
    }
}
