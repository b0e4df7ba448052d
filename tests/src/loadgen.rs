//! A strict, closed-loop HTTP/1.1 load generator.
//!
//! Every client sends one request, reads the whole response, and only then sends
//! the next. Nothing is retried behind the caller's back, so a request that a
//! restart loses shows up as a failure. That is why this uses hyper's low-level
//! `client::conn::http1` API and not a pooled client: pooled clients (reqwest,
//! `hyper_util::client::legacy`) quietly retry a request that died on a reused
//! connection, which is exactly the failure a zero-downtime restart must not cause.
//!
//! What a correct client may still do without counting a failure:
//! - open a new connection after a response that carried `Connection: close`;
//! - open a new connection when the old one is already known to be closed before
//!   the request is written (`SendRequest::ready()` fails, `is_closed()` is true, or
//!   hyper hands the request back unsent). These are counted in
//!   [`LoadReport::reconnects`] and [`LoadReport::unsent_retries`].
//!
//! Everything else is a [`Failure`]: connection refused, a request written on a
//! reused connection that is answered by EOF or a reset, a reset or EOF on a fresh
//! connection, a timeout, a non-2xx status, or a body that ends early.

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
use tokio::task::JoinHandle;

/// How long one request (connect + write + whole response) may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Keep at most this many failure samples in a report.
const MAX_FAILURE_SAMPLES: usize = 100;

/// What to run: where, how many clients of each kind, and the hard bounds.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Loopback address of the server under test.
    pub target: SocketAddr,
    /// Request path, e.g. "/".
    pub path: String,
    /// Clients that reuse one HTTP/1.1 keep-alive connection for many requests.
    pub keepalive_connections: usize,
    /// Clients that open a new connection for every request (`Connection: close`).
    pub fresh_connections: usize,
    /// Hard bound on the number of requests, over all clients.
    pub max_requests: u64,
    /// Hard bound on the time the load runs.
    pub max_duration: Duration,
}

impl Default for LoadSpec {
    fn default() -> Self {
        LoadSpec {
            // No default server: every test names the port it bound (0 is refused).
            target: SocketAddr::from(([127, 0, 0, 1], 0)),
            path: "/".to_string(),
            keepalive_connections: 8,
            fresh_connections: 8,
            max_requests: 1_000_000,
            max_duration: Duration::from_secs(10),
        }
    }
}

/// One request as the client saw it.
#[derive(Debug, Clone, Copy)]
pub struct RequestRecord {
    /// When the client started the request (before connecting, for fresh clients).
    pub start: Instant,
    /// Until the whole body was read, or until the request failed.
    pub latency: Duration,
    /// 2xx status and the whole body read.
    pub ok: bool,
    /// How it failed (a [`Failure::kind`]); `None` when it succeeded.
    pub failure: Option<&'static str>,
}

/// A failed request: what kind of failure and the error as text.
#[derive(Debug, Clone)]
pub struct Failure {
    /// One of "connect", "reused-conn-closed", "reset", "timeout", "status", "other".
    pub kind: &'static str,
    /// The error, with the client and connection it happened on.
    pub message: String,
}

/// The result of a load run.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Requests that were attempted and ended (ok + failed).
    pub requests: u64,
    /// Requests answered with 2xx and a complete body.
    pub ok: u64,
    /// Every other request.
    pub failed: u64,
    /// The first [`MAX_FAILURE_SAMPLES`] failures, in the order they happened.
    pub failures: Vec<Failure>,
    /// Every request, in start order (bounded by `max_requests`).
    pub records: Vec<RequestRecord>,
    /// From [`Load::start`] until every client stopped.
    pub elapsed: Duration,
    /// New connections opened by keep-alive clients because the server closed the
    /// old one politely (`Connection: close`, or closed before a request was written).
    pub reconnects: u64,
    /// Requests hyper handed back unsent because the connection closed before it
    /// wrote them; they were sent again on a new connection (not failures).
    pub unsent_retries: u64,
}

impl LoadReport {
    /// The `p`-th percentile (`p` in 0..=100, e.g. 50.0, 99.0, 99.9) of the latency
    /// of the records that `keep` selects; `None` when none is selected.
    pub fn percentile(&self, p: f64, keep: impl Fn(&RequestRecord) -> bool) -> Option<Duration> {
        let mut latencies: Vec<Duration> = self
            .records
            .iter()
            .filter(|r| keep(r))
            .map(|r| r.latency)
            .collect();
        if latencies.is_empty() {
            return None;
        }
        latencies.sort_unstable();
        let p = p.clamp(0.0, 100.0);
        // Nearest-rank: the smallest value with at least p% of the samples at or below it.
        let rank = ((p / 100.0) * latencies.len() as f64).ceil() as usize;
        Some(latencies[rank.clamp(1, latencies.len()) - 1])
    }

    /// The largest latency among the records that `keep` selects.
    pub fn max(&self, keep: impl Fn(&RequestRecord) -> bool) -> Option<Duration> {
        self.records
            .iter()
            .filter(|r| keep(r))
            .map(|r| r.latency)
            .max()
    }

    /// Completed requests per second over the whole run.
    pub fn rps(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.requests as f64 / secs
        } else {
            0.0
        }
    }

    /// Panic, listing the first failures, unless every request succeeded and at
    /// least `min_requests` ran.
    pub fn assert_no_failures(&self, min_requests: u64) {
        let samples: Vec<String> = self
            .failures
            .iter()
            .take(20)
            .map(|f| format!("  [{}] {}", f.kind, f.message))
            .collect();
        assert_eq!(
            self.failed,
            0,
            "{} of {} requests failed; first failures:\n{}",
            self.failed,
            self.requests,
            samples.join("\n")
        );
        assert!(
            self.requests >= min_requests,
            "the load ran only {} requests (expected at least {min_requests}): {}",
            self.requests,
            self.summary()
        );
    }

    /// A one-line summary for test output.
    pub fn summary(&self) -> String {
        let p = |q| {
            self.percentile(q, |_| true)
                .map(|d| format!("{:.1}ms", d.as_secs_f64() * 1e3))
                .unwrap_or_else(|| "-".into())
        };
        format!(
            "{} requests ({} ok, {} failed) in {:.1}s = {:.0} req/s; p50 {} p99 {} max {}; \
             {} polite reconnects, {} unsent retries",
            self.requests,
            self.ok,
            self.failed,
            self.elapsed.as_secs_f64(),
            self.rps(),
            p(50.0),
            p(99.0),
            p(100.0),
            self.reconnects,
            self.unsent_retries
        )
    }
}

/// A running load: clients on the current tokio runtime.
#[derive(Debug)]
pub struct Load {
    shared: Arc<Shared>,
    clients: Vec<JoinHandle<ClientReport>>,
}

#[derive(Debug)]
struct Shared {
    spec: LoadSpec,
    started: Instant,
    stop: AtomicBool,
    /// Requests handed out so far (bounded by `max_requests`).
    issued: AtomicU64,
    /// Requests finished so far, ok or not.
    completed: AtomicU64,
    /// Failure samples, shared so that they keep their order across clients.
    failures: Mutex<Vec<Failure>>,
}

impl Shared {
    /// Whether a client may start one more request; takes a ticket if so.
    fn next_ticket(&self) -> bool {
        if self.stop.load(Ordering::Relaxed) || self.started.elapsed() >= self.spec.max_duration {
            return false;
        }
        self.issued.fetch_add(1, Ordering::Relaxed) < self.spec.max_requests
    }

    fn record_failure(&self, kind: &'static str, message: String) {
        let mut failures = self.failures.lock().unwrap();
        if failures.len() < MAX_FAILURE_SAMPLES {
            failures.push(Failure { kind, message });
        }
    }
}

#[derive(Debug, Default)]
struct ClientReport {
    records: Vec<RequestRecord>,
    reconnects: u64,
    unsent_retries: u64,
}

impl Load {
    /// Start the clients as tasks on the current tokio runtime. Panics outside one.
    pub fn start(spec: LoadSpec) -> Load {
        let shared = Arc::new(Shared {
            spec,
            started: Instant::now(),
            stop: AtomicBool::new(false),
            issued: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            failures: Mutex::new(Vec::new()),
        });
        let mut clients = Vec::new();
        for id in 0..shared.spec.keepalive_connections {
            clients.push(tokio::spawn(keepalive_client(shared.clone(), id)));
        }
        for id in 0..shared.spec.fresh_connections {
            clients.push(tokio::spawn(fresh_client(shared.clone(), id)));
        }
        Load { shared, clients }
    }

    /// Ask every client to stop after its current request.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }

    /// Requests finished so far (ok or failed): for waiting on progress.
    pub fn snapshot_requests(&self) -> u64 {
        self.shared.completed.load(Ordering::Relaxed)
    }

    /// Wait until `more` further requests have finished (ok or not), e.g. to be sure
    /// the load runs before a restart and still runs after it. Panics after `timeout`.
    pub async fn wait_progress(&self, more: u64, timeout: Duration) {
        let base = self.snapshot_requests();
        let start = Instant::now();
        while self.snapshot_requests() < base + more {
            assert!(
                start.elapsed() < timeout,
                "the load made only {} of {more} more requests in {timeout:?}",
                self.snapshot_requests() - base
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stop, wait for every client, and report.
    pub async fn finish(self) -> LoadReport {
        self.stop();
        let mut report = LoadReport::default();
        for client in self.clients {
            // A client task only ends by returning; a panic in one is a bug here.
            let client = client.await.expect("load client task panicked");
            report.records.extend(client.records);
            report.reconnects += client.reconnects;
            report.unsent_retries += client.unsent_retries;
        }
        report.elapsed = self.shared.started.elapsed();
        report.records.sort_by_key(|r| r.start);
        report.requests = report.records.len() as u64;
        report.ok = report.records.iter().filter(|r| r.ok).count() as u64;
        report.failed = report.requests - report.ok;
        report.failures = std::mem::take(&mut *self.shared.failures.lock().unwrap());
        report
    }
}

/// How one request ended, before it is recorded.
enum Outcome {
    Ok {
        close: bool,
    },
    Failed {
        kind: &'static str,
        message: String,
    },
    /// hyper gave the request back unsent: the connection was already closing.
    Unsent,
}

/// A client that keeps one connection open and sends requests on it back to back.
async fn keepalive_client(shared: Arc<Shared>, id: usize) -> ClientReport {
    let mut report = ClientReport::default();
    let mut conn: Option<(SendRequest<Empty<Bytes>>, u64)> = None;
    let mut connections = 0u64;
    let mut ticket = false;
    loop {
        if !ticket {
            if !shared.next_ticket() {
                break;
            }
            ticket = true;
        }
        let start = Instant::now();
        // Politely reconnect when the server already closed the connection, before
        // anything is written on it: that is not a failure.
        if let Some((sender, _)) = conn.as_mut() {
            let usable = !sender.is_closed()
                && tokio::time::timeout(REQUEST_TIMEOUT, sender.ready())
                    .await
                    .is_ok_and(|r| r.is_ok());
            if !usable {
                conn = None;
                report.reconnects += 1;
            }
        }
        if conn.is_none() {
            match connect(shared.spec.target).await {
                Ok(sender) => {
                    connections += 1;
                    conn = Some((sender, 0));
                }
                Err(message) => {
                    shared.record_failure("connect", format!("keep-alive client {id}: {message}"));
                    report.records.push(done(start, Some("connect"), &shared));
                    ticket = false;
                    // Bounded by max_requests/max_duration either way; don't spin hot.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
            }
        }
        let (sender, served) = conn.as_mut().expect("connected above");
        let reused = *served > 0;
        let req = request(&shared.spec, false);
        match tokio::time::timeout(REQUEST_TIMEOUT, exchange(sender, req, reused)).await {
            Err(_) => {
                let message = format!(
                    "keep-alive client {id}, connection #{connections}, request #{}: no complete response within {REQUEST_TIMEOUT:?}",
                    *served + 1
                );
                shared.record_failure("timeout", message);
                report.records.push(done(start, Some("timeout"), &shared));
                conn = None;
                ticket = false;
            }
            Ok(Outcome::Unsent) => {
                // Keep the ticket: the same request goes out again on a new connection.
                report.unsent_retries += 1;
                conn = None;
            }
            Ok(Outcome::Failed { kind, message }) => {
                let message = format!(
                    "keep-alive client {id}, connection #{connections}, request #{} on it: {message}",
                    *served + 1
                );
                shared.record_failure(kind, message);
                report.records.push(done(start, Some(kind), &shared));
                if kind != "status" {
                    conn = None;
                } else {
                    *served += 1;
                }
                ticket = false;
            }
            Ok(Outcome::Ok { close }) => {
                *served += 1;
                report.records.push(done(start, None, &shared));
                if close {
                    conn = None;
                    report.reconnects += 1;
                }
                ticket = false;
            }
        }
    }
    report
}

/// A client that opens a new connection for every request.
async fn fresh_client(shared: Arc<Shared>, id: usize) -> ClientReport {
    let mut report = ClientReport::default();
    while shared.next_ticket() {
        let start = Instant::now();
        let attempt = async {
            let mut sender = connect(shared.spec.target)
                .await
                .map_err(|message| ("connect", message))?;
            match exchange(&mut sender, request(&shared.spec, true), false).await {
                Outcome::Ok { .. } => Ok(()),
                Outcome::Failed { kind, message } => Err((kind, message)),
                Outcome::Unsent => Err((
                    "reset",
                    "a new connection was closed before the request could be written".to_string(),
                )),
            }
        };
        let failure = match tokio::time::timeout(REQUEST_TIMEOUT, attempt).await {
            Ok(Ok(())) => None,
            Ok(Err((kind, message))) => {
                shared.record_failure(kind, format!("fresh-connection client {id}: {message}"));
                if kind == "connect" {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Some(kind)
            }
            Err(_) => {
                shared.record_failure(
                    "timeout",
                    format!(
                        "fresh-connection client {id}: no complete response within {REQUEST_TIMEOUT:?}"
                    ),
                );
                Some("timeout")
            }
        };
        report.records.push(done(start, failure, &shared));
    }
    report
}

fn done(start: Instant, failure: Option<&'static str>, shared: &Shared) -> RequestRecord {
    shared.completed.fetch_add(1, Ordering::Relaxed);
    RequestRecord {
        start,
        latency: start.elapsed(),
        ok: failure.is_none(),
        failure,
    }
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
    let body = response.into_body().collect().await;
    match body {
        Err(err) => {
            let (kind, _) = classify(&err, false);
            Outcome::Failed {
                kind,
                message: format!("status {status}, body cut short: {}", chain(&err)),
            }
        }
        Ok(_) if !status.is_success() => Outcome::Failed {
            kind: "status",
            message: format!("status {status}"),
        },
        Ok(_) => Outcome::Ok { close },
    }
}

/// Sort a hyper error into a failure kind, with a short description.
fn classify(err: &hyper::Error, reused: bool) -> (&'static str, &'static str) {
    let io_kind = io_error_kind(err);
    let closed = err.is_incomplete_message() || err.is_closed() || err.is_canceled();
    let reset = matches!(
        io_kind,
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

fn io_error_kind(err: &(dyn StdError + 'static)) -> Option<std::io::ErrorKind> {
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
fn chain(err: &(dyn StdError + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    //! The load generator must see every failure a restart can cause, and must not
    //! count a server's polite `Connection: close` as one.

    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// What a scripted server does with the n-th request (1-based) on a connection.
    #[derive(Clone, Copy)]
    enum Answer {
        Ok,
        OkAndClose,
        Status503,
        /// Read the request, then close without answering.
        Drop,
    }

    async fn scripted_server(script: fn(u64) -> Answer) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    for n in 1.. {
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            let mut chunk = [0u8; 4096];
                            match stream.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(k) => buf.extend_from_slice(&chunk[..k]),
                            }
                        }
                        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                        buf.drain(..end);
                        let response: &[u8] = match script(n) {
                            Answer::Ok => b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n",
                            Answer::OkAndClose => {
                                b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n"
                            }
                            Answer::Status503 => {
                                b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n"
                            }
                            Answer::Drop => return,
                        };
                        if stream.write_all(response).await.is_err() {
                            return;
                        }
                        if matches!(script(n), Answer::OkAndClose) {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    fn spec(target: SocketAddr, keepalive: usize, fresh: usize) -> LoadSpec {
        LoadSpec {
            target,
            keepalive_connections: keepalive,
            fresh_connections: fresh,
            max_requests: 200,
            max_duration: Duration::from_secs(10),
            ..Default::default()
        }
    }

    fn kinds(report: &LoadReport) -> Vec<&'static str> {
        let mut kinds: Vec<_> = report.failures.iter().map(|f| f.kind).collect();
        kinds.dedup();
        kinds
    }

    #[tokio::test]
    async fn a_request_on_a_reused_connection_answered_by_eof_is_a_failure() {
        let addr = scripted_server(|n| if n == 3 { Answer::Drop } else { Answer::Ok }).await;
        let report = Load::start(spec(addr, 1, 0)).finish_when_done().await;
        assert_eq!(report.requests, 200);
        assert!(report.failed > 0, "{}", report.summary());
        assert_eq!(kinds(&report), vec!["reused-conn-closed"]);
    }

    #[tokio::test]
    async fn connection_close_is_honoured_without_a_failure() {
        let addr = scripted_server(|n| {
            if n == 2 {
                Answer::OkAndClose
            } else {
                Answer::Ok
            }
        })
        .await;
        let report = Load::start(spec(addr, 2, 2)).finish_when_done().await;
        assert_eq!(
            (report.requests, report.failed),
            (200, 0),
            "{:?}",
            report.failures
        );
        assert!(report.reconnects > 0, "{}", report.summary());
    }

    #[tokio::test]
    async fn a_non_2xx_status_is_a_failure() {
        let addr = scripted_server(|_| Answer::Status503).await;
        let report = Load::start(spec(addr, 1, 1)).finish_when_done().await;
        assert_eq!(report.failed, report.requests);
        assert_eq!(kinds(&report), vec!["status"]);
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_failure() {
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let report = Load::start(spec(addr, 1, 1)).finish_when_done().await;
        assert!(report.failed > 0 && report.ok == 0, "{}", report.summary());
        assert_eq!(kinds(&report), vec!["connect"]);
    }

    impl Load {
        /// Wait until the clients ran out of requests, then report.
        async fn finish_when_done(self) -> LoadReport {
            for client in &self.clients {
                while !client.is_finished() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            self.finish().await
        }
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let start = Instant::now();
        let report = LoadReport {
            records: (1..=100)
                .map(|ms| RequestRecord {
                    start,
                    latency: Duration::from_millis(ms),
                    ok: ms % 2 == 0,
                    failure: (ms % 2 != 0).then_some("status"),
                })
                .collect(),
            ..Default::default()
        };
        assert_eq!(
            report.percentile(50.0, |_| true),
            Some(Duration::from_millis(50))
        );
        assert_eq!(
            report.percentile(99.0, |_| true),
            Some(Duration::from_millis(99))
        );
        assert_eq!(
            report.percentile(100.0, |_| true),
            Some(Duration::from_millis(100))
        );
        assert_eq!(report.max(|r| !r.ok), Some(Duration::from_millis(99)));
        assert_eq!(report.percentile(50.0, |_| false), None);
    }
}
