//! The sd_notify protocol, both ends: the supervisor receives `READY=1` (and
//! `STATUS=...`) on a Unix datagram socket it owns; a worker sends them.

use std::io;
use std::path::Path;

/// What a worker said on its notify socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    Ready,
    Stopping,
    Status(String),
    /// `X_FLEET_IN_FLIGHT=N`: requests the worker is serving (an application-specific
    /// variable, named with the `X_` prefix sd_notify(3) asks for; systemd ignores it).
    InFlight(u64),
    Other(String),
}

/// The variable a worker reports its requests in flight with.
pub const IN_FLIGHT: &str = "X_FLEET_IN_FLIGHT";

/// Parses one datagram: newline-separated `KEY=VALUE` assignments.
pub fn parse(datagram: &[u8]) -> Vec<Notice> {
    String::from_utf8_lossy(datagram)
        .lines()
        .filter(|l| !l.is_empty())
        .map(|line| match line.split_once('=') {
            Some(("READY", "1")) => Notice::Ready,
            Some(("STOPPING", "1")) => Notice::Stopping,
            Some(("STATUS", s)) => Notice::Status(s.to_string()),
            Some((IN_FLIGHT, n)) => match n.parse() {
                Ok(n) => Notice::InFlight(n),
                Err(_) => Notice::Other(line.to_string()),
            },
            _ => Notice::Other(line.to_string()),
        })
        .collect()
}

/// Sends `state` (e.g. `"READY=1"`) to `$NOTIFY_SOCKET`. Returns `Ok(false)` when the
/// variable is unset (not supervised), like `sd_notify(3)`.
pub fn notify(state: &str) -> io::Result<bool> {
    send(state, true)
}

/// Like [`notify`], but fails with `WouldBlock` instead of waiting when the
/// receiver's queue is full: for reports that may be dropped, sent from async code.
pub fn notify_nowait(state: &str) -> io::Result<bool> {
    send(state, false)
}

fn send(state: &str, wait: bool) -> io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let socket = std::os::unix::net::UnixDatagram::unbound()?;
    socket.set_nonblocking(!wait)?;
    let bytes = path.as_encoded_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        socket.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        socket.send_to(state.as_bytes(), Path::new(&path))?;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_several_assignments() {
        assert_eq!(
            parse(b"READY=1\nSTATUS=serving 2 ports\nMAINPID=4\nX_FLEET_IN_FLIGHT=12"),
            vec![
                Notice::Ready,
                Notice::Status("serving 2 ports".into()),
                Notice::Other("MAINPID=4".into()),
                Notice::InFlight(12),
            ]
        );
        assert_eq!(
            parse(b"X_FLEET_IN_FLIGHT=many"),
            vec![Notice::Other("X_FLEET_IN_FLIGHT=many".into())]
        );
    }
}
