//! The accept loop and, per connection, hyper's auto builder (HTTP/1.1, and HTTP/2
//! with prior knowledge as gRPC clients speak it) plus a watchdog that closes the
//! connection when it has sent no request head in time, stays idle too long, or is
//! evicted to make room at the cap.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tower::ServiceExt as _;

use crate::conns::{Admission, Conn, Connections, Registered};
use crate::limits::{Cap, Limits};
use crate::tls::PeerCertificate;

/// The server's TLS config as it is now (`None`: none yet); a sender swaps it (a
/// renewed certificate) without a restart.
pub type TlsConfig = watch::Receiver<Option<Arc<rustls::ServerConfig>>>;

/// After a graceful close starts (HTTP/2 `GOAWAY`), how long an idle connection may
/// take to finish before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// How long the accept loop waits after `EMFILE`/`ENFILE` before it tries again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// How long the accept loop waits for an evicted connection to close.
const EVICTION_WAIT: Duration = Duration::from_millis(100);
/// Warnings that could repeat for every connection come at most this often.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Serves `router` on `listener` within `limits` until the process exits.
pub async fn serve(listener: TcpListener, router: Router, limits: Limits) {
    Server::new(listener, router, limits).run().await
}

/// A bound listener with its router and limits, not yet serving.
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    router: Router,
    limits: Limits,
    cap: Cap,
    conns: Connections,
    tls: Option<TlsConfig>,
}

impl Server {
    pub fn new(listener: TcpListener, router: Router, limits: Limits) -> Self {
        let cap = limits.cap();
        Self {
            listener,
            router,
            limits,
            cap,
            conns: Connections::new(),
            tls: None,
        }
    }

    /// Speaks TLS with `config` (the client's first byte tells a TLS handshake from
    /// plain HTTP). Plain HTTP is then served to loopback peers only (a local operator's
    /// `curl`); anyone else gets a `400` that says to use `https://`. Each request of a
    /// connection whose client sent a certificate the config verified carries a
    /// [`PeerCertificate`] extension.
    pub fn with_tls(mut self, config: TlsConfig) -> Self {
        self.tls = Some(config);
        self
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The cap in force (read from `RLIMIT_NOFILE` when the server was made).
    pub fn cap(&self) -> Cap {
        self.cap
    }

    /// A handle on the open connections, valid after `run` starts.
    pub fn connections(&self) -> Connections {
        self.conns.clone()
    }

    /// Accepts and serves until the process exits.
    pub async fn run(self) {
        let addr = self
            .listener
            .local_addr()
            .map_or_else(|e| format!("(unknown address: {e})"), |a| a.to_string());
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.header_timeout);
        builder.http2().timer(TokioTimer::new());
        let shared = Arc::new(Shared {
            router: self.router,
            limits: self.limits,
            builder,
        });
        let mut warn_full = Warner::default();
        let mut warn_fds = Warner::default();
        loop {
            let (stream, peer) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) if out_of_descriptors(&e) => {
                    // Not a spin: the pending connection stays in the backlog while we
                    // wait. An idle connection of ours is the one descriptor we can free.
                    let freed = self.conns.evict_idle();
                    warn_fds.warn(|n| {
                        tracing::warn!(
                            "accept on {addr} failed: {e} ({n} times): out of file descriptors; \
                             closing idle connections and retrying (raise LimitNOFILE / ulimit -n, \
                             or lower max_connections)"
                        )
                    });
                    if !freed {
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    } else {
                        tokio::task::yield_now().await;
                    }
                    continue;
                }
                Err(e) => {
                    // ECONNABORTED and friends: that one connection is gone.
                    tracing::debug!("accept on {addr}: {e}");
                    continue;
                }
            };
            match self.conns.admit(self.cap.connections) {
                Admission::Room => {}
                Admission::Evicted => warn_full.warn(|n| {
                    tracing::warn!(
                        "{addr}: {}: closed the oldest idle connection to let a new one in \
                         ({n} since the last such warning)",
                        self.cap
                    )
                }),
                Admission::Full => {
                    warn_full.warn(|n| {
                        tracing::warn!(
                            "{addr}: {} and every one has a request in progress: \
                             closed a new connection from {peer} ({n} since the last such warning)",
                            self.cap
                        )
                    });
                    drop(stream);
                    continue;
                }
            }
            let _ = stream.set_nodelay(true);
            let registered = self.conns.register();
            tokio::spawn(accepted(
                stream,
                peer,
                self.tls.clone(),
                shared.clone(),
                registered,
                self.conns.clone(),
            ));
            // An evicted connection holds its descriptor until its task runs. Under a
            // flood of new connections, accepting on would outrun those tasks and use
            // up the descriptors the cap is there to keep free: wait for it to go
            // (briefly: one that just took a request finishes it first).
            if self.conns.open() > self.cap.connections {
                let mut open = self.conns.subscribe();
                let cap = self.cap.connections;
                let _ = tokio::time::timeout(EVICTION_WAIT, open.wait_for(|n| *n <= cap)).await;
            }
        }
    }
}

#[derive(Debug)]
struct Shared {
    router: Router,
    limits: Limits,
    builder: auto::Builder<TokioExecutor>,
}

fn out_of_descriptors(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(code) if code == nix::libc::EMFILE || code == nix::libc::ENFILE)
}

/// Logs the first of a burst of events at once, then at most every [`WARN_EVERY`]
/// with how many happened.
#[derive(Debug, Default)]
struct Warner {
    last: Option<Instant>,
    since: u64,
}

impl Warner {
    fn warn(&mut self, log: impl FnOnce(u64)) {
        self.since += 1;
        if self.last.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
            log(self.since);
            self.last = Some(Instant::now());
            self.since = 0;
        }
    }
}

/// Why the watchdog closes a connection.
enum Close {
    Idle,
    Header,
}

static HANDSHAKE_WARNINGS: std::sync::Mutex<Warner> = std::sync::Mutex::new(Warner {
    last: None,
    since: 0,
});

/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// What a plain-HTTP client beyond loopback gets from a TLS server.
const PLAIN_REFUSED: &[u8] = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\n\
content-type: text/plain; charset=utf-8\r\ncontent-length: 51\r\n\r\n\
this port speaks TLS beyond loopback: use https://\n";

/// A new connection: the TLS handshake where there is one, then [`connection`].
async fn accepted(
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsConfig>,
    shared: Arc<Shared>,
    registered: Registered,
    conns: Connections,
) {
    match tls {
        None => connection(TokioIo::new(stream), peer, None, shared, registered, conns).await,
        // Boxed: the handshake's and rustls's state make a TLS connection's future
        // several KB larger than a plain one's, and inline they would size the task of
        // every connection (a controller holds one per agent) as a TLS one's.
        Some(tls) => Box::pin(tls_accepted(stream, peer, tls, shared, registered, conns)).await,
    }
}

/// A new connection to a server with TLS: the handshake (or, from loopback, plain
/// HTTP), then [`connection`].
async fn tls_accepted(
    stream: TcpStream,
    peer: SocketAddr,
    tls: TlsConfig,
    shared: Arc<Shared>,
    registered: Registered,
    conns: Connections,
) {
    let timeout = shared.limits.header_timeout;
    let mut first = [0u8; 1];
    match tokio::time::timeout(timeout, stream.peek(&mut first)).await {
        Ok(Ok(1)) => {}
        _ => return,
    }
    if first[0] != TLS_HANDSHAKE {
        if peer.ip().is_loopback() {
            return connection(TokioIo::new(stream), peer, None, shared, registered, conns).await;
        }
        let mut stream = stream;
        let _ = tokio::time::timeout(timeout, stream.write_all(PLAIN_REFUSED)).await;
        return;
    }
    let config = tls.borrow().clone();
    let Some(config) = config else {
        tracing::debug!("TLS handshake from {peer} before this server has a certificate");
        return;
    };
    let handshake = tokio_rustls::TlsAcceptor::from(config).accept(stream);
    let stream = match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            // Who was refused and why (an expired or foreign client certificate), at
            // most every WARN_EVERY: a scanner must not flood the log.
            HANDSHAKE_WARNINGS.lock().expect("warner lock").warn(|n| {
                tracing::warn!(
                    "TLS handshake with {peer} failed: {e} ({n} failures since the last such line)"
                )
            });
            return;
        }
        Err(_) => {
            tracing::debug!("TLS handshake with {peer} took longer than {timeout:?}");
            return;
        }
    };
    let cert = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|der| PeerCertificate::new(der.clone()));
    connection(TokioIo::new(stream), peer, cert, shared, registered, conns).await
}

async fn connection<I>(
    io: TokioIo<I>,
    peer: SocketAddr,
    cert: Option<PeerCertificate>,
    shared: Arc<Shared>,
    registered: Registered,
    conns: Connections,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn_state = registered.conn.clone();
    let held_paths = shared.limits.held_paths;
    let service = {
        let router = shared.router.clone();
        let conn_state = conn_state.clone();
        hyper::service::service_fn(move |request: Request<Incoming>| {
            // Boxed: hyper keeps a request's task, sized for this future, for as long
            // as its response streams, and a long-lived call (an agent's heartbeat
            // stream) would hold the router's whole future inline for its life.
            Box::pin(call(
                router.clone(),
                conn_state.clone(),
                peer,
                cert.clone(),
                held_paths,
                request,
            ))
        })
    };
    let conn = shared.builder.serve_connection(io, service);
    tokio::pin!(conn);
    let limits = &shared.limits;

    let why = loop {
        let wait = match watch(&conn_state, limits) {
            Ok(wait) => wait,
            Err(why) => break why,
        };
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = conn_state.evict.notified() => {
                if !conn_state.busy() || conn_state.only_held() {
                    // Idle, or holding calls its client opens again (a heartbeat
                    // stream): no answer is lost, and the descriptor is needed now.
                    return;
                }
                // A request started the moment it was chosen: let it finish.
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
                return;
            }
            _ = conn_state.ended.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    };
    match why {
        Close::Idle => conns.count_idle_close(),
        Close::Header => {
            conns.count_header_timeout();
            tracing::debug!(
                "closing the connection from {peer}: no request head within {:?}",
                limits.header_timeout
            );
        }
    }
    // HTTP/1 idle: closed at once. HTTP/2: GOAWAY first, so the client knows no
    // request was lost. A request that started meanwhile is let finish.
    conn.as_mut().graceful_shutdown();
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = tokio::time::sleep(CLOSE_GRACE) => if !conn_state.busy() { return },
        }
    }
}

/// `Ok(d)`: look again in `d`. `Err(why)`: close now.
fn watch(conn: &Conn, limits: &Limits) -> Result<Duration, Close> {
    let Some(idle) = conn.idle_for() else {
        // A request in progress is never cut; look again when the last one ends
        // (`Conn::ended`), or after a while in any case.
        return Ok(limits.idle_timeout);
    };
    let mut wait = limits.idle_timeout.checked_sub(idle).ok_or(Close::Idle)?;
    if wait.is_zero() {
        return Err(Close::Idle);
    }
    if !conn.has_had_a_request() {
        // Covers what hyper's own header timeout does not: the bytes read before
        // hyper knows whether it is HTTP/1 or HTTP/2, and HTTP/2 connections.
        let left = limits
            .header_timeout
            .checked_sub(conn.age())
            .filter(|d| !d.is_zero())
            .ok_or(Close::Header)?;
        wait = wait.min(left);
    }
    Ok(wait)
}

/// One request: the peer's address for the handlers, and the connection counted busy
/// until the response body has ended.
async fn call(
    router: Router,
    conn: Arc<Conn>,
    peer: SocketAddr,
    cert: Option<PeerCertificate>,
    held_paths: &'static [&'static str],
    mut request: Request<Incoming>,
) -> Result<Response<Guarded<InProgress>>, Infallible> {
    let held = held_paths.contains(&request.uri().path());
    conn.request_started(held);
    let guard = InProgress { conn, held };
    request.extensions_mut().insert(ConnectInfo(peer));
    if let Some(cert) = cert {
        request.extensions_mut().insert(cert);
    }
    let Ok(response) = router.oneshot(request.map(Body::new)).await;
    Ok(response.map(|body| Guarded::new(body, guard)))
}

/// A request in progress until dropped (with its response body, or with the handler
/// future when the client goes away first).
#[derive(Debug)]
pub(crate) struct InProgress {
    conn: Arc<Conn>,
    /// On a `Limits::held_paths` path.
    held: bool,
}

impl Drop for InProgress {
    fn drop(&mut self) {
        self.conn.request_ended(self.held);
    }
}

/// A response body that holds `G` until the body has ended (or is dropped): a
/// request counted as in progress for as long as its response streams.
#[derive(Debug)]
pub struct Guarded<G> {
    body: Body,
    _guard: G,
}

impl<G> Guarded<G> {
    pub fn new(body: Body, guard: G) -> Self {
        Self {
            body,
            _guard: guard,
        }
    }
}

impl<G: Unpin> http_body::Body for Guarded<G> {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A controller keeps a connection's task for each agent: a plain connection's
    /// must not be sized for the TLS path it does not take.
    #[tokio::test]
    async fn a_plain_connections_task_is_not_sized_for_tls() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        let shared = Arc::new(Shared {
            router: Router::new(),
            limits: Limits::default(),
            builder: auto::Builder::new(TokioExecutor::new()),
        });
        let conns = Connections::new();
        let task = accepted(stream, peer, None, shared, conns.register(), conns.clone());
        let size = std::mem::size_of_val(&task);
        assert!(size <= 3 * 1024, "{size} bytes");
    }
}
