//! The limits of one server, and the connection cap derived from `RLIMIT_NOFILE`.

use std::fmt;
use std::time::Duration;

/// Descriptors left free below `RLIMIT_NOFILE` for everything that is not a client
/// connection: listeners, a new worker's pipes and notify socket, files, logs, the
/// agent's own outgoing connections. A restart or a shutdown must never find none.
pub const DEFAULT_RESERVED_FDS: u64 = 128;
/// The cap never goes below this, however low `RLIMIT_NOFILE` is.
const MIN_CAP: usize = 16;

/// How many connections a server keeps and for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Most connections open at once; the cap is lower where `RLIMIT_NOFILE` is.
    pub max_connections: usize,
    /// A connection with no request in progress for this long is closed. A request is
    /// in progress until its response body has ended, so a gRPC stream or a
    /// Server-Sent Events response is never cut.
    pub idle_timeout: Duration,
    /// A connection must send its first request head within this long after it is
    /// accepted, and each later HTTP/1 request head within this long once the
    /// connection waits for it (hyper's `header_read_timeout`, which therefore also
    /// bounds how long an idle HTTP/1 keep-alive connection stays open).
    pub header_timeout: Duration,
    /// Descriptors kept free below the soft `RLIMIT_NOFILE`.
    pub reserved_fds: u64,
    /// Paths of calls that stay open for as long as their client is there (an agent's
    /// heartbeat stream). Such a call keeps its connection from the idle timeout, but
    /// not from being closed to let a new connection in at `max_connections`: a
    /// connection holding nothing else is evicted after the idle ones (its client
    /// connects again), so that a server full of them still lets an operator in.
    pub held_paths: &'static [&'static str],
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            idle_timeout: Duration::from_secs(60),
            header_timeout: Duration::from_secs(10),
            reserved_fds: DEFAULT_RESERVED_FDS,
            held_paths: &[],
        }
    }
}

/// The connection cap in force, and where it comes from (for the log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cap {
    pub connections: usize,
    /// The soft `RLIMIT_NOFILE` (`None`: unlimited or unknown).
    pub nofile: Option<u64>,
    pub reserved_fds: u64,
    pub max_connections: usize,
}

impl Limits {
    /// The cap: `max_connections`, or fewer where the soft `RLIMIT_NOFILE` minus the
    /// reserve is lower. Read once when a server starts; raise the limit
    /// (`LimitNOFILE=` in a systemd unit, `ulimit -n`) and restart to change it.
    pub fn cap(&self) -> Cap {
        let nofile = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .ok()
            .map(|(soft, _hard)| soft)
            .filter(|&soft| soft != nix::sys::resource::RLIM_INFINITY);
        let by_fds = nofile.map_or(usize::MAX, |soft| {
            usize::try_from(soft.saturating_sub(self.reserved_fds)).unwrap_or(usize::MAX)
        });
        Cap {
            connections: self.max_connections.min(by_fds).max(MIN_CAP),
            nofile,
            reserved_fds: self.reserved_fds,
            max_connections: self.max_connections,
        }
    }
}

impl fmt::Display for Cap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at most {} connections", self.connections)?;
        match self.nofile {
            Some(soft) if self.connections < self.max_connections => write!(
                f,
                " (RLIMIT_NOFILE {soft} minus {} descriptors kept free; max_connections {} \
                 needs a limit of {})",
                self.reserved_fds,
                self.max_connections,
                (self.max_connections as u64).saturating_add(self.reserved_fds)
            ),
            _ => write!(f, " (max_connections)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_is_the_smaller_of_the_maximum_and_the_descriptor_limit() {
        let (soft, _) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
        let few = Limits {
            max_connections: 20,
            ..Limits::default()
        };
        assert_eq!(few.cap().connections, 20);
        let many = Limits {
            max_connections: usize::MAX,
            ..Limits::default()
        };
        let cap = many.cap();
        if soft != nix::sys::resource::RLIM_INFINITY {
            assert_eq!(
                cap.connections as u64,
                (soft - DEFAULT_RESERVED_FDS).max(16)
            );
            assert!(cap.to_string().contains("RLIMIT_NOFILE"), "{cap}");
        }
    }
}
