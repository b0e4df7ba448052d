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
    Other(String),
}

/// Parses one datagram: newline-separated `KEY=VALUE` assignments.
pub fn parse(datagram: &[u8]) -> Vec<Notice> {
    String::from_utf8_lossy(datagram)
        .lines()
        .filter(|l| !l.is_empty())
        .map(|line| match line.split_once('=') {
            Some(("READY", "1")) => Notice::Ready,
            Some(("STOPPING", "1")) => Notice::Stopping,
            Some(("STATUS", s)) => Notice::Status(s.to_string()),
            _ => Notice::Other(line.to_string()),
        })
        .collect()
}

/// Sends `state` (e.g. `"READY=1"`) to `$NOTIFY_SOCKET`. Returns `Ok(false)` when the
/// variable is unset (not supervised), like `sd_notify(3)`.
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let socket = std::os::unix::net::UnixDatagram::unbound()?;
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
            parse(b"READY=1\nSTATUS=serving 2 ports\nMAINPID=4"),
            vec![
                Notice::Ready,
                Notice::Status("serving 2 ports".into()),
                Notice::Other("MAINPID=4".into())
            ]
        );
    }
}
