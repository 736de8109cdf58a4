//! systemd's readiness protocol (`sd_notify(3)`), for `Type=notify` units: one
//! datagram of `KEY=value` lines to the unix socket named by `$NOTIFY_SOCKET`.
//!
//! The controller says `READY=1` once the meter is attached and enforcing and the
//! client API and the admin socket listen, so `systemctl start bitmesh` returns (and
//! units ordered after it start) only then; `STOPPING=1` when it shuts down. Without
//! `$NOTIFY_SOCKET` (not started by systemd) nothing is sent.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;

/// The environment variable systemd sets for `Type=notify` services.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Why a notification could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// `$NOTIFY_SOCKET` names neither a path nor an abstract socket (`@name`).
    #[error("NOTIFY_SOCKET={0:?} is not a unix socket path or @abstract name")]
    BadAddress(String),
    /// The socket did not take the datagram.
    #[error("cannot notify systemd through {socket:?}: {source}")]
    Send { socket: String, source: io::Error },
}

/// Send `state` (e.g. `"READY=1\nSTATUS=enforcing"`) to the service manager named in
/// `$NOTIFY_SOCKET`. Returns `Ok(false)` when the variable is unset (nobody listens).
pub fn notify(state: &str) -> Result<bool, NotifyError> {
    match std::env::var(NOTIFY_SOCKET) {
        Ok(socket) if !socket.is_empty() => notify_to(&socket, state).map(|()| true),
        _ => Ok(false),
    }
}

/// Send `state` to `socket`: a filesystem path, or `@name` for an abstract socket.
pub fn notify_to(socket: &str, state: &str) -> Result<(), NotifyError> {
    let addr = if let Some(name) = socket.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        SocketAddr::from_abstract_name(name.as_bytes())
    } else if socket.starts_with('/') {
        SocketAddr::from_pathname(Path::new(socket))
    } else {
        return Err(NotifyError::BadAddress(socket.to_string()));
    }
    .map_err(|_| NotifyError::BadAddress(socket.to_string()))?;
    let send = |source| NotifyError::Send { socket: socket.to_string(), source };
    let sock = UnixDatagram::unbound().map_err(send)?;
    sock.send_to_addr(state.as_bytes(), &addr).map_err(send)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_arrives_as_one_datagram_on_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        notify_to(path.to_str().unwrap(), "READY=1\nSTATUS=enforcing").unwrap();
        let mut buf = [0u8; 256];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=enforcing");
    }

    #[test]
    fn an_abstract_socket_is_reached_by_its_at_name() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("bitmesh-notify-test-{}", std::process::id());
        let listener = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
        notify_to(&format!("@{name}"), "STOPPING=1").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
    }

    #[test]
    fn a_relative_name_or_a_missing_socket_is_an_error() {
        assert!(matches!(notify_to("relative/path", "READY=1"), Err(NotifyError::BadAddress(_))));
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("nobody-listens");
        assert!(matches!(notify_to(gone.to_str().unwrap(), "READY=1"), Err(NotifyError::Send { .. })));
    }
}
