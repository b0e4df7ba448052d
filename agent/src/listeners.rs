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

/// Binds every port of every server (port 0 picks a free one; the real address is kept).
pub fn bind_all(config: &Config) -> Result<Vec<BoundListener>, BindError> {
    let mut out = Vec::new();
    for server in &config.servers {
        for addr in &server.listen {
            let socket = TcpListener::bind(addr).map_err(|source| BindError {
                server: server.name.clone(),
                addr: *addr,
                source,
            })?;
            let addr = socket.local_addr().map_err(|source| BindError {
                server: server.name.clone(),
                addr: *addr,
                source,
            })?;
            out.push(BoundListener {
                server: server.name.clone(),
                addr,
                tls: server.tls.is_some(),
                socket,
            });
        }
    }
    Ok(out)
}

/// `http server 'web' <verb> listening on [127.0.0.1:8199, 127.0.0.1:8200]`, one line per server.
pub fn describe(listeners: &[BoundListener], verb: &str) -> Vec<String> {
    let mut servers: Vec<(&str, bool, Vec<String>)> = Vec::new();
    for l in listeners {
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
