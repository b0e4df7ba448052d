//! The two kinds of HTTP/1.1 client (keep-alive, fresh connection per request), the
//! pacing that hands out requests to every client (HTTP/2 stream slots too), and one
//! HTTP/1.1 request/response exchange.

use std::error::Error as StdError;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONNECTION, HOST, USER_AGENT};
use http::{Request, Response};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::report::{ClosedBeforeWrite, Failure, H2Counts, RequestRecord};
use super::{LoadOptions, LoadSpec, MAX_ATTEMPTS, Pacing};

/// Keep at most this many failure samples in a report (the counts by kind come
/// from every record, not from these).
const MAX_FAILURE_SAMPLES: usize = 100;

/// A refused connection is retried by the next request after this pause, so that a
/// closed port does not make the client spin hot (it is still bounded either way).
pub(super) const CONNECT_BACKOFF: Duration = Duration::from_millis(5);

/// Longest single sleep while pacing, so that a stop is seen promptly.
const PACING_STEP: Duration = Duration::from_millis(10);

#[derive(Debug)]
pub(super) struct Shared {
    pub(super) spec: LoadSpec,
    pub(super) options: LoadOptions,
    pub(super) started: Instant,
    pub(super) stop: AtomicBool,
    /// Requests handed out so far (bounded by `max_requests`).
    pub(super) issued: AtomicU64,
    /// Requests finished so far, ok or not.
    pub(super) completed: AtomicU64,
    /// Failure samples, shared so that they keep their order across clients.
    pub(super) failures: Mutex<Vec<Failure>>,
    /// The TLS client for the HTTP/2 clients, when the spec says TLS.
    pub(super) tls: Option<Arc<rustls::ClientConfig>>,
}

impl Shared {
    /// Stopped by the caller, or past the time bound: start nothing new, re-send nothing.
    pub(super) fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || self.started.elapsed() >= self.spec.max_duration
    }

    /// The next request a client may make, as the instant its latency counts from;
    /// `None` once the load is over. Open loop: waits until the scheduled time.
    pub(super) async fn next_request(&self, pacer: &mut Pacer) -> Option<Instant> {
        let start = match pacer {
            Pacer::Closed => Instant::now(),
            Pacer::Open { next, interval } => {
                let at = *next;
                *next += *interval;
                if at >= self.started + self.spec.max_duration {
                    return None;
                }
                while Instant::now() < at {
                    if self.stopping() {
                        return None;
                    }
                    let left = at.saturating_duration_since(Instant::now());
                    tokio::time::sleep(left.min(PACING_STEP)).await;
                }
                at
            }
        };
        if self.stopping() {
            return None;
        }
        (self.issued.fetch_add(1, Ordering::Relaxed) < self.spec.max_requests).then_some(start)
    }

    pub(super) fn pacer(&self, client: usize) -> Pacer {
        match self.options.pacing {
            Pacing::Closed => Pacer::Closed,
            Pacing::Open { per_second } => {
                let clients = self.spec.clients().max(1);
                let interval = Duration::from_secs_f64(clients as f64 / per_second);
                // Staggered, so that the clients together send at an even rate.
                let offset = interval.mul_f64(client as f64 / clients as f64);
                Pacer::Open {
                    next: self.started + offset,
                    interval,
                }
            }
        }
    }

    /// Record a finished request (and its failure, if any).
    pub(super) fn done(
        &self,
        start: Instant,
        attempts: u32,
        failure: Option<(&'static str, String)>,
    ) -> RequestRecord {
        self.completed.fetch_add(1, Ordering::Relaxed);
        let kind = failure.map(|(kind, message)| {
            let mut failures = self.failures.lock().unwrap();
            if failures.len() < MAX_FAILURE_SAMPLES {
                failures.push(Failure { kind, message });
            }
            kind
        });
        RequestRecord {
            start,
            latency: start.elapsed(),
            ok: kind.is_none(),
            failure: kind,
            attempts,
        }
    }
}

/// When a client's requests go out.
pub(super) enum Pacer {
    Closed,
    Open { next: Instant, interval: Duration },
}

#[derive(Debug, Default)]
pub(super) struct ClientReport {
    pub(super) records: Vec<RequestRecord>,
    pub(super) announced_closes: u64,
    pub(super) closed_before_write: ClosedBeforeWrite,
    pub(super) unsent_retries: u64,
    pub(super) h2: H2Counts,
}

impl ClientReport {
    /// The one rule for a connection found closed before the request was written,
    /// on any client: count it by kind, then re-send on a new connection while the
    /// request has attempts and time left and the load is not stopping. Returns the
    /// failure when it may not be re-sent.
    fn closed_before_write(
        &mut self,
        shared: &Shared,
        reused: bool,
        attempts: u32,
        deadline: Instant,
    ) -> Option<(&'static str, String)> {
        if reused {
            self.closed_before_write.reused += 1;
        } else {
            self.closed_before_write.new += 1;
        }
        let what = if reused { "a reused" } else { "a new" };
        let why = if attempts >= MAX_ATTEMPTS {
            format!("after {attempts} attempts")
        } else if shared.stopping() {
            "and the load was stopping".to_string()
        } else if Instant::now() >= deadline {
            "and the request ran out of time".to_string()
        } else {
            self.unsent_retries += 1;
            return None;
        };
        Some((
            "closed-before-write",
            format!("{what} connection was closed before the request could be written, {why}"),
        ))
    }
}

/// One connection of a keep-alive client.
struct Conn {
    sender: SendRequest<Empty<Bytes>>,
    /// Its number among the client's connections (1-based), for messages.
    number: u64,
    /// Responses read on it so far.
    served: u64,
}

/// A client that keeps one connection open and sends requests on it back to back.
pub(super) async fn keepalive_client(shared: Arc<Shared>, id: usize) -> ClientReport {
    let mut report = ClientReport::default();
    let mut conn: Option<Conn> = None;
    let mut connections = 0u64;
    let mut pacer = shared.pacer(id);
    while let Some(start) = shared.next_request(&mut pacer).await {
        let deadline = Instant::now() + shared.options.request_timeout;
        let mut attempts = 0;
        let failure = loop {
            attempts += 1;
            // A connection the server closed while it was idle: nothing is written
            // on it, the request goes out on a new one (the one rule, above).
            if let Some(c) = conn.as_mut() {
                let ready = tokio::time::timeout_at(deadline.into(), c.sender.ready()).await;
                match ready {
                    Err(_) => {
                        let message = format!(
                            "keep-alive client {id}, connection #{}: not ready to send within {:?}",
                            c.number, shared.options.request_timeout
                        );
                        conn = None;
                        break Some(("timeout", message));
                    }
                    Ok(Ok(())) if !c.sender.is_closed() => {}
                    Ok(_) => {
                        let reused = c.served > 0;
                        conn = None;
                        match report.closed_before_write(&shared, reused, attempts, deadline) {
                            Some(failure) => break Some(tag_keepalive(id, connections, failure)),
                            None => continue,
                        }
                    }
                }
            }
            let c = match conn.as_mut() {
                Some(c) => c,
                None => match tokio::time::timeout_at(deadline.into(), connect(shared.spec.target))
                    .await
                {
                    Ok(Ok(sender)) => {
                        connections += 1;
                        conn.insert(Conn {
                            sender,
                            number: connections,
                            served: 0,
                        })
                    }
                    Ok(Err(message)) => {
                        tokio::time::sleep(CONNECT_BACKOFF).await;
                        break Some(("connect", format!("keep-alive client {id}: {message}")));
                    }
                    Err(_) => {
                        break Some((
                            "timeout",
                            format!("keep-alive client {id}: connect timed out"),
                        ));
                    }
                },
            };
            let reused = c.served > 0;
            let req = request(&shared.spec, false);
            let outcome =
                tokio::time::timeout_at(deadline.into(), exchange(&mut c.sender, req, reused))
                    .await;
            let context = format!(
                "keep-alive client {id}, connection #{}, request #{} on it",
                c.number,
                c.served + 1
            );
            match outcome {
                Err(_) => {
                    conn = None;
                    break Some((
                        "timeout",
                        format!(
                            "{context}: no complete response within {:?}",
                            shared.options.request_timeout
                        ),
                    ));
                }
                Ok(Outcome::Unsent) => {
                    conn = None;
                    match report.closed_before_write(&shared, reused, attempts, deadline) {
                        Some(failure) => break Some(tag_keepalive(id, connections, failure)),
                        None => continue,
                    }
                }
                Ok(Outcome::Failed { kind, message }) => {
                    // A bad status leaves the connection in sync; anything else ends it.
                    if kind == "status" {
                        c.served += 1;
                    } else {
                        conn = None;
                    }
                    break Some((kind, format!("{context}: {message}")));
                }
                Ok(Outcome::Ok { close }) => {
                    c.served += 1;
                    if close {
                        conn = None;
                        report.announced_closes += 1;
                    }
                    break None;
                }
            }
        };
        report.records.push(shared.done(start, attempts, failure));
    }
    report
}

fn tag_keepalive(
    id: usize,
    connections: u64,
    (kind, message): (&'static str, String),
) -> (&'static str, String) {
    (
        kind,
        format!("keep-alive client {id}, connection #{connections}: {message}"),
    )
}

/// A client that opens a new connection for every request.
pub(super) async fn fresh_client(shared: Arc<Shared>, id: usize) -> ClientReport {
    let mut report = ClientReport::default();
    let mut pacer = shared.pacer(shared.spec.keepalive_connections + id);
    while let Some(start) = shared.next_request(&mut pacer).await {
        let deadline = Instant::now() + shared.options.request_timeout;
        let mut attempts = 0;
        let failure = loop {
            attempts += 1;
            let attempt = async {
                let mut sender = connect(shared.spec.target)
                    .await
                    .map_err(|m| ("connect", m))?;
                Ok::<_, (&'static str, String)>(
                    exchange(&mut sender, request(&shared.spec, true), false).await,
                )
            };
            match tokio::time::timeout_at(deadline.into(), attempt).await {
                Err(_) => {
                    break Some((
                        "timeout",
                        format!(
                            "fresh-connection client {id}: no complete response within {:?}",
                            shared.options.request_timeout
                        ),
                    ));
                }
                Ok(Err((kind, message))) => {
                    tokio::time::sleep(CONNECT_BACKOFF).await;
                    break Some((kind, format!("fresh-connection client {id}: {message}")));
                }
                Ok(Ok(Outcome::Unsent)) => {
                    match report.closed_before_write(&shared, false, attempts, deadline) {
                        Some((kind, message)) => {
                            break Some((kind, format!("fresh-connection client {id}: {message}")));
                        }
                        None => continue,
                    }
                }
                Ok(Ok(Outcome::Failed { kind, message })) => {
                    break Some((kind, format!("fresh-connection client {id}: {message}")));
                }
                // The server answers a `Connection: close` request with a close: the
                // client asked for it, so it is not an announced close.
                Ok(Ok(Outcome::Ok { .. })) => break None,
            }
        };
        report.records.push(shared.done(start, attempts, failure));
    }
    report
}

/// How one exchange ended.
enum Outcome {
    Ok {
        close: bool,
    },
    Failed {
        kind: &'static str,
        message: String,
    },
    /// hyper gave the request back unsent: the connection was closed before the write.
    Unsent,
}

fn request(spec: &LoadSpec, close: bool) -> Request<Empty<Bytes>> {
    let mut builder = Request::get(spec.path.as_str())
        .header(HOST, spec.target.to_string())
        .header(USER_AGENT, "fleet-loadgen");
    if close {
        builder = builder.header(CONNECTION, "close");
    }
    builder.body(Empty::new()).expect("valid request")
}

/// Open a TCP connection (TCP_NODELAY) and do the HTTP/1.1 handshake.
async fn connect(target: SocketAddr) -> Result<SendRequest<Empty<Bytes>>, String> {
    let stream = TcpStream::connect(target)
        .await
        .map_err(|e| format!("connect to {target}: {e}"))?;
    stream
        .set_nodelay(true)
        .map_err(|e| format!("set TCP_NODELAY: {e}"))?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP/1.1 handshake with {target}: {e}"))?;
    // The connection task ends when the connection closes; its error (if any) shows
    // up on the request that was in flight, which is where it is counted.
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// Send one request and read the whole response.
async fn exchange(
    sender: &mut SendRequest<Empty<Bytes>>,
    req: Request<Empty<Bytes>>,
    reused: bool,
) -> Outcome {
    let response: Response<Incoming> = match sender.try_send_request(req).await {
        Ok(response) => response,
        Err(mut err) => {
            if err.take_message().is_some() {
                return Outcome::Unsent;
            }
            let err = err.into_error();
            let (kind, what) = classify(&err, reused);
            return Outcome::Failed {
                kind,
                message: format!("{what}: {}", chain(&err)),
            };
        }
    };
    let status = response.status();
    let close = response.headers().get_all(CONNECTION).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.to_ascii_lowercase().contains("close"))
    });
    // Read the whole body even for a bad status, so the connection stays in sync.
    match response.into_body().collect().await {
        Err(err) => Outcome::Failed {
            kind: classify(&err, false).0,
            message: format!("status {status}, body cut short: {}", chain(&err)),
        },
        Ok(_) if !status.is_success() => Outcome::Failed {
            kind: "status",
            message: format!("status {status}"),
        },
        Ok(_) => Outcome::Ok { close },
    }
}

/// Sort a hyper error into a failure kind, with a short description.
fn classify(err: &hyper::Error, reused: bool) -> (&'static str, &'static str) {
    let closed = err.is_incomplete_message() || err.is_closed() || err.is_canceled();
    let reset = matches!(
        io_error_kind(err),
        Some(
            std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::ConnectionAborted
                | std::io::ErrorKind::UnexpectedEof
        )
    );
    if reused && (closed || reset) {
        (
            "reused-conn-closed",
            "request written on a reused keep-alive connection was answered by EOF/reset",
        )
    } else if closed || reset {
        ("reset", "connection closed or reset before the response")
    } else if err.is_timeout() {
        ("timeout", "timed out")
    } else {
        ("other", "request failed")
    }
}

pub(super) fn io_error_kind(err: &(dyn StdError + 'static)) -> Option<std::io::ErrorKind> {
    let mut source: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        source = e.source();
    }
    None
}

/// An error and all its sources on one line.
pub(super) fn chain(err: &(dyn StdError + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}
