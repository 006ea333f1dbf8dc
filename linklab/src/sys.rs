//! The little the lab needs from the kernel that std does not offer: entering a network
//! namespace (setns) and AF_PACKET sockets bound to one interface. All of the crate's
//! unsafe code is here, each call with why it is sound.

#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// Not in every libc release: since Linux 4.20, a packet socket does not see the frames
/// sent through it (we forward them; we must not read them back).
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;

/// Whether this process runs as root (namespaces, veth pairs and package installs need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Move the calling thread into network namespace `name` (/run/netns/NAME).
pub fn enter_netns(name: &str) -> io::Result<()> {
    let file = std::fs::File::open(format!("/run/netns/{name}"))?;
    // SAFETY: the fd is valid for the duration of the call (owned by `file`); setns
    // only changes this thread's namespace.
    let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn set_opt<T>(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` points to a live T of the size passed.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// An AF_PACKET raw socket bound to one interface: reads every frame arriving on it,
/// writes frames out of it unchanged.
#[derive(Debug)]
pub struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    /// Open on `ifname` in the calling thread's network namespace. `rx_timeout` bounds a
    /// `recv`, so a reader can notice it should stop.
    pub fn open(ifname: &str, rx_timeout: Duration) -> io::Result<Self> {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2) call; the result is checked before use.
        let raw = check(unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::c_int::from(proto),
            )
        })?;
        // SAFETY: `raw` is a fresh, valid descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let name = CString::new(ifname).map_err(|_| io::Error::other("bad interface name"))?;
        // SAFETY: `name` is a valid NUL-terminated string.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if index == 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = index as i32;
        // SAFETY: `addr` is a valid sockaddr_ll of the length passed.
        check(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        })?;
        set_opt(&fd, libc::SOL_PACKET, PACKET_IGNORE_OUTGOING, &1i32)?;
        // Bursts arrive faster than a rate-limited link drains: the kernel buffer, not
        // the emulated queue, must never be what drops them.
        set_opt(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &(8i32 << 20))?;
        set_opt(&fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, &(8i32 << 20))?;
        let tv = libc::timeval {
            tv_sec: rx_timeout.as_secs() as libc::time_t,
            tv_usec: rx_timeout.subsec_micros() as libc::suseconds_t,
        };
        set_opt(&fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv)?;
        Ok(Self { fd })
    }

    /// One frame into `buf`; `Ok(None)` when the receive timeout passed.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
                _ => Err(e),
            };
        }
        Ok(Some(n as usize))
    }

    /// Send one frame out of the bound interface.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: `frame` is valid for reads of `frame.len()` bytes.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Let this thread's timed waits wake when asked, not up to 50 µs later (the default
/// timer slack): the forwarder releases frames on a schedule.
pub fn tight_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes an integer argument and affects only this thread;
    // failure is harmless (the default slack stays).
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
}

/// The kernel's view of a TCP connection (a few fields of TCP_INFO).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpInfo {
    /// Smoothed round-trip time.
    pub rtt: Duration,
    pub rttvar: Duration,
    /// Segments retransmitted over the connection's life.
    pub total_retrans: u32,
    /// Segments sent and not yet acknowledged.
    pub unacked: u32,
}

/// TCP_INFO of a connected TCP socket.
pub fn tcp_info(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<TcpInfo> {
    // SAFETY: tcp_info is plain old data; all-zero is valid.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is writable for `len` bytes; the kernel writes at most `len`.
    check(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    })?;
    Ok(TcpInfo {
        rtt: Duration::from_micros(u64::from(info.tcpi_rtt)),
        rttvar: Duration::from_micros(u64::from(info.tcpi_rttvar)),
        total_retrans: info.tcpi_total_retrans,
        unacked: info.tcpi_unacked,
    })
}
