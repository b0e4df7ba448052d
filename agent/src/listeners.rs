//! The node's listening sockets: bound once by the supervisor, never closed during a
//! restart, handed to each generation keyed by server name and address.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, RawFd};

use crate::config::Config;

/// One bound port of one server.
#[derive(Debug)]
pub struct BoundListener {
    pub server: String,
    pub addr: SocketAddr,
    pub tls: bool,
    pub socket: TcpListener,
}

impl BoundListener {
    pub fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

#[derive(Debug, thiserror::Error)]
#[error(
    "cannot listen on {addr} for server '{server}': {source} (is another process using the port?)"
)]
pub struct BindError {
    pub server: String,
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// Binds every port of every server (port 0 picks a free one; the real address is
/// kept): [`Config::sockets_per_port`] sockets per address, in one `SO_REUSEPORT`
/// group when there are several.
pub fn bind_all(config: &Config) -> Result<Vec<BoundListener>, BindError> {
    let per_port = config.sockets_per_port();
    let mut out = Vec::new();
    for server in &config.servers {
        for asked in &server.listen {
            let failed = |source| BindError {
                server: server.name.clone(),
                addr: *asked,
                source,
            };
            let first = bind(*asked, per_port > 1).map_err(failed)?;
            // The others join the first's port (the one the kernel picked for port 0).
            let addr = first.local_addr().map_err(failed)?;
            let mut group = vec![first];
            for _ in 1..per_port {
                group.push(bind(addr, true).map_err(failed)?);
            }
            out.extend(group.into_iter().map(|socket| BoundListener {
                server: server.name.clone(),
                addr,
                tls: server.tls.is_some(),
                socket,
            }));
        }
    }
    Ok(out)
}

/// A listening socket on `addr`; with `reuse_port`, one of a group on the same address
/// (`SO_REUSEPORT`: the kernel spreads connections over the group's sockets, and only
/// sockets of this user may join it).
fn bind(addr: SocketAddr, reuse_port: bool) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    if !reuse_port {
        return TcpListener::bind(addr);
    }
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // As std's TcpListener::bind: a restarted node binds again at once.
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(libc::SOMAXCONN)?;
    Ok(socket.into())
}

/// Each address once, in order (several sockets share one with `sockets_per_port`).
/// [`bind_all`] puts a group's sockets next to each other, so one look back is enough:
/// this runs for every status the supervisor reports (each heartbeat).
pub fn distinct(listeners: &[BoundListener]) -> impl Iterator<Item = &BoundListener> {
    listeners.iter().enumerate().filter_map(|(i, l)| {
        let same_group = i > 0 && {
            let before = &listeners[i - 1];
            before.addr == l.addr && before.server == l.server
        };
        (!same_group).then_some(l)
    })
}

/// `http server 'web' <verb> listening on [127.0.0.1:8199, 127.0.0.1:8200]`, one line per server.
pub fn describe(listeners: &[BoundListener], verb: &str) -> Vec<String> {
    let mut servers: Vec<(&str, bool, Vec<String>)> = Vec::new();
    for l in distinct(listeners) {
        match servers.iter_mut().find(|(name, _, _)| *name == l.server) {
            Some((_, _, addrs)) => addrs.push(l.addr.to_string()),
            None => servers.push((&l.server, l.tls, vec![l.addr.to_string()])),
        }
    }
    servers
        .into_iter()
        .map(|(name, tls, addrs)| {
            format!(
                "{} server '{name}' {verb} listening on [{}]",
                if tls { "https" } else { "http" },
                addrs.join(", ")
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::io::ErrorKind;

    use super::*;
    use crate::config::ServerConfig;

    fn config(per_port: usize) -> Config {
        Config {
            servers: vec![ServerConfig {
                name: "web".into(),
                listen: vec![
                    "127.0.0.1:0".parse().unwrap(),
                    "127.0.0.1:0".parse().unwrap(),
                ],
                ..Default::default()
            }],
            sockets_per_port: per_port,
            ..Default::default()
        }
    }

    #[test]
    fn one_plain_socket_per_address_by_default() {
        let bound = bind_all(&config(1)).unwrap();
        assert_eq!(bound.len(), 2);
        assert_ne!(bound[0].addr, bound[1].addr);
        let reuse = socket2::SockRef::from(&bound[0].socket)
            .reuse_port()
            .unwrap();
        assert!(!reuse, "no SO_REUSEPORT group unless asked");
    }

    #[test]
    fn a_reuseport_group_per_address_shares_the_connections() {
        let bound = bind_all(&config(3)).unwrap();
        assert_eq!(bound.len(), 6);
        let first = &bound[..3];
        assert!(
            first
                .iter()
                .all(|l| l.addr == bound[0].addr && l.addr.port() != 0)
        );
        assert!(bound[3..].iter().all(|l| l.addr == bound[3].addr));
        assert_ne!(bound[0].addr, bound[3].addr);
        for l in &bound {
            assert!(socket2::SockRef::from(&l.socket).reuse_port().unwrap());
        }
        // Each address is shown once.
        assert_eq!(distinct(&bound).count(), 2);
        assert_eq!(
            describe(&bound, "started"),
            [format!(
                "http server 'web' started listening on [{}, {}]",
                bound[0].addr, bound[3].addr
            )]
        );
        // The kernel spreads connections over the group (by the client's port): of 30,
        // more than one socket gets some, and every one is accepted by some socket.
        let clients: Vec<std::net::TcpStream> = (0..30)
            .map(|_| std::net::TcpStream::connect(bound[0].addr).unwrap())
            .collect();
        let mut per_socket = Vec::new();
        for l in first {
            l.socket.set_nonblocking(true).unwrap();
            let mut n = 0;
            loop {
                match l.socket.accept() {
                    Ok(_) => n += 1,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => panic!("{e}"),
                }
            }
            per_socket.push(n);
        }
        assert_eq!(per_socket.iter().sum::<i32>(), 30, "{per_socket:?}");
        assert!(
            per_socket.iter().filter(|&&n| n > 0).count() > 1,
            "{per_socket:?}"
        );
        drop(clients);
    }
}
