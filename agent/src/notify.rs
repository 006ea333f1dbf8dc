//! systemd readiness notification (`Type=notify`): tells the service manager the agent
//! is ready only once the buffer is open and every listener is bound, so units ordered
//! after edgerelay (and `systemctl start`) wait for a working relay, not a started one.
//!
//! The protocol is one datagram to the socket named by `$NOTIFY_SOCKET` (a path, or an
//! abstract name written `@name`). Without that variable this does nothing; a failure to
//! notify is logged, never fatal — the relay works the same either way.

use std::os::unix::net::UnixDatagram;

/// Send `state` (e.g. `READY=1`) to the service manager, if there is one.
pub fn notify(state: &str) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send(&target, state) {
        tracing::warn!(error = %e, socket = ?target, "cannot notify systemd");
    }
}

fn send(target: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let sock = UnixDatagram::unbound()?;
    let bytes = target.as_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        sock.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        sock.send_to(state.as_bytes(), target)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_to_a_path_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).expect("bind");
        send(path.as_os_str(), "READY=1").expect("send");
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"READY=1");
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("edgerelay-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .expect("abstract addr");
        let server = UnixDatagram::bind_addr(&addr).expect("bind");
        send(std::ffi::OsStr::new(&format!("@{name}")), "STOPPING=1").expect("send");
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"STOPPING=1");
    }

    #[test]
    fn a_missing_socket_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(send(dir.path().join("absent").as_os_str(), "READY=1").is_err());
    }
}
