//! Serving an axum `Router` over HTTP/1.1 and HTTP/2 (and HTTPS) on inherited
//! listeners, and draining without losing a request.
//!
//! Why the drain is not simply hyper's `graceful_shutdown()`: on an HTTP/1 keep-alive
//! connection that looks idle between two requests it closes at once, but under load
//! the client's next request is usually already on the wire, and that request is lost
//! (the client sees EOF or a reset on a connection it was told it could reuse). So:
//! - when the drain starts, every HTTP/1 response from then on carries
//!   `Connection: close`, so each busy connection closes itself after its next
//!   response and the client reconnects (to the new generation);
//! - a connection that is idle is closed only after it has stayed idle for
//!   `idle_grace` (and never while request bytes sit unread in its socket);
//! - HTTP/2 connections get GOAWAY at once (hyper's graceful shutdown), which lets
//!   open streams finish and tells the client exactly which requests were taken;
//!   [`h2::GoawayFirst`] makes sure the client reads that GOAWAY before any response
//!   that follows it, so it never queues a request it then has to refuse;
//! - every connection is closed by [`linger::linger`]: write side first, then wait for
//!   the client to close, so a reset never throws away responses still in flight.

mod h2;
mod linger;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use fleet_net::Guarded;
use http::{HeaderValue, Request, Response, Version, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

/// How long a TLS handshake may take.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a draining connection that is busy is looked at again.
const DRAIN_POLL: Duration = Duration::from_millis(50);

/// Requests this process is serving, over every server and connection: what a
/// worker reports to its supervisor (`X_FLEET_IN_FLIGHT`).
static REQUESTS_IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// Requests this process is serving now (a response counts until its body ends).
pub fn requests_in_flight() -> usize {
    REQUESTS_IN_FLIGHT.load(Ordering::Relaxed)
}

/// One inherited listening socket, ready to serve.
pub struct Listener {
    pub server: String,
    pub addr: SocketAddr,
    pub socket: tokio::net::TcpListener,
    pub tls: Option<TlsAcceptor>,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("server", &self.server)
            .field("addr", &self.addr)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// Resolves once `flag` is true (or its sender is gone).
pub async fn until_true(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|d| *d).await;
}

#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// While draining, an idle HTTP/1 connection is closed after this long.
    pub idle_grace: Duration,
}

/// The running servers of one worker: accept loops plus every open connection.
#[derive(Debug)]
pub struct Server {
    draining: watch::Sender<bool>,
    draining_flag: Arc<AtomicBool>,
    /// Accept loops still running plus connections still open.
    open: watch::Sender<usize>,
}

impl Server {
    /// Starts an accept loop on every listener.
    pub fn start(listeners: Vec<Listener>, app: Router, options: ServeOptions) -> Self {
        let (draining, _) = watch::channel(false);
        let (open, _) = watch::channel(0usize);
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(30));
        builder.http2().timer(TokioTimer::new());
        let draining_flag = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared {
            app,
            draining: draining_flag.clone(),
            builder,
            options,
        });
        for listener in listeners {
            open.send_modify(|n| *n += 1);
            tokio::spawn(accept_loop(
                listener,
                shared.clone(),
                draining.subscribe(),
                Guard(open.clone()),
            ));
        }
        Self {
            draining,
            draining_flag,
            open,
        }
    }

    /// Stops accepting and starts closing connections safely.
    pub fn drain(&self) {
        self.draining_flag.store(true, Ordering::Relaxed);
        self.draining.send_replace(true);
    }

    /// Accept loops plus open connections.
    pub fn open(&self) -> usize {
        *self.open.borrow()
    }

    /// Resolves once every accept loop has stopped and every connection is closed.
    pub async fn drained(&self) {
        let mut rx = self.open.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }
}

#[derive(Debug)]
struct Shared {
    app: Router,
    /// The same as the `draining` channel, cheap to read on every response.
    draining: Arc<AtomicBool>,
    builder: auto::Builder<TokioExecutor>,
    options: ServeOptions,
}

/// Counts one accept loop or connection as open while it lives.
#[derive(Debug)]
struct Guard(watch::Sender<usize>);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

async fn accept_loop(
    listener: Listener,
    shared: Arc<Shared>,
    mut draining: watch::Receiver<bool>,
    open: Guard,
) {
    loop {
        let (stream, _peer) = tokio::select! {
            biased;
            _ = until_true(&mut draining) => break,
            res = listener.socket.accept() => match res {
                Ok(conn) => conn,
                Err(e) if is_transient(&e) => continue,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::error!("accept on {} failed: {e}", listener.addr);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let fd = stream.as_raw_fd();
        // A second descriptor for the closing handshake (see `linger`); without one
        // (out of descriptors) the connection is closed the plain way.
        let keep = stream.as_fd().try_clone_to_owned().ok();
        let guard = Guard(open.0.clone());
        guard.0.send_modify(|n| *n += 1);
        let shared = shared.clone();
        let draining = draining.clone();
        let tls = listener.tls.clone();
        tokio::spawn(async move {
            match tls {
                None => serve_connection(stream, fd, false, &shared, draining).await,
                Some(acceptor) => {
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                    {
                        Ok(Ok(tls)) => {
                            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                            serve_connection(tls, fd, h2, &shared, draining).await;
                        }
                        Ok(Err(e)) => tracing::debug!("TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                }
            }
            if let Some(keep) = keep {
                linger::linger(keep).await;
            }
            drop(guard);
        });
    }
    // Dropping the listener closes only this process's copy of the socket: the
    // supervisor keeps it open, so pending connections wait for the next generation.
}

fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    )
}

async fn serve_connection<IO>(
    io: IO,
    fd: RawFd,
    h2: bool,
    shared: &Shared,
    mut draining: watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let state = Arc::new(ConnState::new(h2));
    let service = ConnService {
        app: shared.app.clone(),
        state: state.clone(),
        draining: shared.draining.clone(),
    };
    let io = TokioIo::new(Tracked {
        inner: io,
        state: state.clone(),
        h2: h2::GoawayFirst::default(),
    });
    let conn = shared.builder.serve_connection_with_upgrades(
        io,
        hyper::service::service_fn(move |req| service.call(req)),
    );
    tokio::pin!(conn);

    tokio::select! {
        _ = conn.as_mut() => return,
        _ = until_true(&mut draining) => {}
    }
    loop {
        // An HTTP/2 connection that has not carried a request may still be in hyper's
        // handshake, where a graceful shutdown closes it without GOAWAY and the
        // client's first requests, already sent, are lost (seen with TLS, whose
        // handshake makes that window wider): it is left alone until its first
        // request, or closed as an idle one after `idle_grace`.
        let serving_h2 = state.h2.load(Ordering::Relaxed) && state.served.load(Ordering::Acquire);
        let next_look = if serving_h2 {
            None
        } else {
            state.idle_check(shared.options.idle_grace, fd)
        };
        match next_look {
            Some(wait) => tokio::select! {
                _ = conn.as_mut() => return,
                _ = tokio::time::sleep(wait) => {}
                _ = state.first_request.notified() => {}
            },
            None => {
                state.goaway.store(true, Ordering::Relaxed);
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
                return;
            }
        }
    }
}

/// What the drain needs to know about one connection.
#[derive(Debug)]
struct ConnState {
    epoch: Instant,
    /// Nanoseconds after `epoch` of the last byte read or response finished.
    last_activity: AtomicU64,
    in_flight: AtomicUsize,
    h2: AtomicBool,
    /// Set when the connection is to be told to go away (HTTP/2).
    goaway: AtomicBool,
    /// Set with the first request: the connection is past its handshake.
    served: AtomicBool,
    first_request: tokio::sync::Notify,
}

impl ConnState {
    fn new(h2: bool) -> Self {
        Self {
            epoch: Instant::now(),
            last_activity: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            h2: AtomicBool::new(h2),
            goaway: AtomicBool::new(false),
            served: AtomicBool::new(false),
            first_request: tokio::sync::Notify::new(),
        }
    }

    fn touch(&self) {
        self.last_activity
            .store(self.epoch.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    /// `None`: safe to close now. `Some(d)`: look again in `d`.
    fn idle_check(&self, grace: Duration, fd: RawFd) -> Option<Duration> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            // Its response will carry `Connection: close`; hyper closes after it.
            return Some(DRAIN_POLL);
        }
        let last = Duration::from_nanos(self.last_activity.load(Ordering::Relaxed));
        let idle = self.epoch.elapsed().saturating_sub(last);
        if idle < grace {
            return Some(grace - idle);
        }
        if bytes_pending(fd) {
            // A request is arriving: let hyper read it and answer with `Connection: close`.
            return Some(DRAIN_POLL);
        }
        None
    }
}

/// Whether the peer has sent bytes we haven't read yet.
fn bytes_pending(fd: RawFd) -> bool {
    use nix::sys::socket::{MsgFlags, recv};
    let mut byte = [0u8; 1];
    matches!(
        recv(fd, &mut byte, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT),
        Ok(n) if n > 0
    )
}

/// The per-connection service: the app, plus bookkeeping for the drain.
#[derive(Clone)]
struct ConnService {
    app: Router,
    state: Arc<ConnState>,
    draining: Arc<AtomicBool>,
}

impl ConnService {
    fn call(
        &self,
        req: Request<Incoming>,
    ) -> impl Future<Output = Result<Response<Guarded<InFlight>>, Infallible>> + Send + use<> {
        let http1 = req.version() < Version::HTTP_2;
        if !http1 {
            self.state.h2.store(true, Ordering::Relaxed);
        }
        if !self.state.served.swap(true, Ordering::AcqRel) {
            self.state.first_request.notify_one();
        }
        self.state.in_flight.fetch_add(1, Ordering::AcqRel);
        REQUESTS_IN_FLIGHT.fetch_add(1, Ordering::Relaxed);
        let guard = InFlight(self.state.clone());
        let app = self.app.clone();
        let draining = self.draining.clone();
        async move {
            let response = app.oneshot(req.map(Body::new)).await;
            let Ok(mut response) = response;
            if http1 && draining.load(Ordering::Relaxed) {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok(response.map(|body| Guarded::new(body, guard)))
        }
    }
}

/// One request in flight until its response body is finished (or dropped).
#[derive(Debug)]
struct InFlight(Arc<ConnState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        REQUESTS_IN_FLIGHT.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The connection's byte stream, noting when the peer last sent something, and
/// ordering the HTTP/2 drain ([`h2::GoawayFirst`]).
struct Tracked<IO> {
    inner: IO,
    state: Arc<ConnState>,
    h2: h2::GoawayFirst,
}

impl<IO> Tracked<IO> {
    fn check_drain(&mut self) {
        if self.state.goaway.load(Ordering::Relaxed) {
            self.h2.start();
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for Tracked<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        this.check_drain();
        let before = buf.filled().len();
        let poll = this.h2.poll_read(cx, &mut this.inner, buf);
        if buf.filled().len() > before {
            this.state.touch();
        }
        poll
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Tracked<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        this.check_drain();
        this.h2
            .poll_write(cx, &mut this.inner, &[std::io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        this.check_drain();
        this.h2.poll_write(cx, &mut this.inner, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        this.h2.poll_flush(cx, &mut this.inner)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
