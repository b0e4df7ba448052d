//! Closing a connection without throwing away what was already written to it.
//!
//! `close()` on a TCP socket whose receive buffer still holds unread bytes makes the
//! kernel answer with a reset at once and discard everything still queued for
//! sending (Linux counts these as `TCPAbortOnData`). After a drain that is exactly
//! the state of a busy HTTP/2 connection: the last responses sit in the send queue
//! while the client's WINDOW_UPDATE, PING acks or its own GOAWAY sit unread, and the
//! client loses every stream whose answer had not reached it yet. HTTP/1 has the
//! same hazard when a client sends its next request while its last response is
//! marked `Connection: close`.
//!
//! So the connection task keeps a duplicate of the socket's descriptor while hyper
//! owns the stream. When hyper is done (and has dropped its descriptor, which no
//! longer closes the socket), [`linger`] shuts the write side down — a FIN queued
//! behind every byte already written — and reads and discards until the client
//! closes its side or [`LINGER_IDLE`]/[`LINGER_MAX`] pass. Only then is the socket
//! closed.

use std::io::ErrorKind;
use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::time::Duration;

/// How long the client may stay silent before the socket is closed anyway.
pub const LINGER_IDLE: Duration = Duration::from_secs(1);
/// How long a closing connection may linger in all.
pub const LINGER_MAX: Duration = Duration::from_secs(5);
/// Bytes discarded in one go before other tasks get their turn.
const DISCARD_BATCH: usize = 64 * 1024;

/// Shuts down the write side of `socket`, waits for the peer to close (reading and
/// discarding what it still sends), then closes it.
pub async fn linger(socket: OwnedFd) {
    let socket = std::net::TcpStream::from(socket);
    // An error (ENOTCONN): the peer reset it already; nothing left to protect.
    if socket.shutdown(Shutdown::Write).is_err() {
        return;
    }
    // Most clients closed first or close as soon as they see the FIN: one read
    // settles those without registering the descriptor with the reactor.
    if let Drained::Closed = discard(&socket) {
        return;
    }
    let Ok(socket) = tokio::net::TcpStream::from_std(socket) else {
        return;
    };
    let _ = tokio::time::timeout(LINGER_MAX, async {
        loop {
            match tokio::time::timeout(LINGER_IDLE, socket.readable()).await {
                Ok(Ok(())) => {}
                _ => return,
            }
            match discard(&socket) {
                Drained::Closed => return,
                Drained::WouldBlock => {}
                Drained::Busy => tokio::task::yield_now().await,
            }
        }
    })
    .await;
}

enum Drained {
    /// End of stream or an error: the socket can be closed.
    Closed,
    /// Nothing more to read right now.
    WouldBlock,
    /// The peer keeps sending: look again after other tasks had their turn.
    Busy,
}

/// A socket both std's (not registered, already non-blocking) and tokio's can be
/// read from without blocking.
trait TryRead {
    fn try_read_now(&self, buf: &mut [u8]) -> std::io::Result<usize>;
}

impl TryRead for std::net::TcpStream {
    fn try_read_now(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        std::io::Read::read(&mut &*self, buf)
    }
}

impl TryRead for tokio::net::TcpStream {
    fn try_read_now(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.try_read(buf)
    }
}

/// Reads and throws away whatever the peer sent.
fn discard(socket: &impl TryRead) -> Drained {
    let mut buf = [0u8; 4096];
    let mut read = 0;
    while read < DISCARD_BATCH {
        match socket.try_read_now(&mut buf) {
            Ok(0) => return Drained::Closed,
            Ok(n) => read += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Drained::WouldBlock,
            Err(_) => return Drained::Closed,
        }
    }
    Drained::Busy
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::linger;

    /// The server writes 4 MiB and closes while the client's last bytes sit unread in
    /// its receive buffer: a plain close would reset the connection and the client
    /// would miss the tail; lingering delivers all of it, then an orderly EOF.
    #[tokio::test]
    async fn everything_written_reaches_a_client_whose_bytes_were_never_read() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        client
            .write_all(b"a request the server never reads")
            .await
            .unwrap();
        let body = vec![7u8; 4 << 20];
        let writer = {
            let body = body.clone();
            tokio::spawn(async move {
                server.write_all(&body).await.unwrap();
                let keep = server.as_fd().try_clone_to_owned().unwrap();
                drop(server);
                linger(keep).await;
            })
        };
        let mut got = Vec::new();
        client
            .read_to_end(&mut got)
            .await
            .expect("an orderly end, not a reset");
        assert_eq!(got.len(), body.len());
        drop(client);
        writer.await.unwrap();
    }
}
