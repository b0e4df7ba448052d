//! A strict HTTP load generator (HTTP/1.1 and HTTP/2), closed-loop or open-loop
//! (constant rate).
//!
//! Closed loop (the default): every client sends one request, reads the whole
//! response, and only then sends the next. Open loop ([`Pacing::Open`]): requests are
//! scheduled at a fixed rate, and a request's latency counts from the time it was
//! *scheduled*, so a server that stalls shows it on every request that should have
//! gone out during the stall, not only on the one that was waiting (coordinated
//! omission). An HTTP/2 client is a stream slot: [`LoadSpec::h2_connections`]
//! connections carry [`LoadSpec::h2_streams`] slots each, every slot a closed- or
//! open-loop client of its own, so each connection has that many streams in flight.
//!
//! Nothing is retried behind the caller's back, so a request that a restart loses
//! shows up as a failure. That is why this uses hyper's low-level
//! `client::conn::http1` API for HTTP/1.1 and the `h2` crate itself for HTTP/2, and
//! not a pooled client: pooled clients (reqwest, `hyper_util::client::legacy`)
//! quietly retry a request that died on a reused connection, which is exactly the
//! failure a zero-downtime restart must not cause. (HTTP/2 does not go through
//! hyper's `client::conn::http2`: its hand-off of a request to the connection's
//! dispatch task could leave a request queued, neither sent nor handed back, when
//! that task ended at the same moment; see `http2`.)
//!
//! What a correct HTTP/1.1 client may still do without counting a failure, one rule
//! for every client and connection:
//! - open a new connection after a response that carried `Connection: close`
//!   (counted in [`LoadReport::announced_closes`]);
//! - send a request again on a new connection when the connection was found closed
//!   *before a byte of the request was written* (`is_closed()`, `ready()` failed, or
//!   hyper handed the request back unsent), whether that connection had served
//!   requests or was brand new: counted by kind in
//!   [`LoadReport::closed_before_write`], at most [`MAX_ATTEMPTS`] attempts per
//!   request, and never once the load is stopping or past its time bound. The
//!   request's latency counts from its first attempt.
//!
//! What a correct HTTP/2 client may do without counting a failure (RFC 9113 §6.8,
//! §8.7), counted in [`LoadReport::h2`]:
//! - open a new connection for new requests once the connection received GOAWAY
//!   or closed (counted by cause: after GOAWAY, after a close), as a real client's
//!   pool does; the streams already open on the old one finish there;
//! - send a request again on a new connection when the server did not process it:
//!   it was never sent (the connection would open no more streams: it had
//!   received GOAWAY or closed), its stream was refused with RST_STREAM `REFUSED_STREAM`, or its
//!   stream was above the last stream id of the server's GOAWAY (h2 reports that as
//!   the GOAWAY's error on the stream). Only before a response head arrived: a
//!   server that answered has processed the request, whatever it says next. Counted
//!   by kind (`not_sent`, `refused_stream`, `above_goaway`), at most
//!   [`MAX_ATTEMPTS`] attempts within the request's timeout, latency from the first
//!   attempt. Also while the load is stopping: a GOAWAY declines many streams at
//!   once, and those the load would drop as it stops were never failed by the
//!   server.
//!
//! Everything else is a [`Failure`]: connection refused, a request written and then
//! answered by EOF or a reset (on a reused connection or a fresh one; for HTTP/2 a
//! connection that closed after the request was sent), a stream reset with any
//! other reason (`stream-reset`), a timeout, a non-2xx status, a body that ends
//! early, or a request that kept finding its connection closed before the write or
//! kept being refused. An HTTP/2 failure message names the connection, the time
//! into the load, the highest stream id the client opened on it, and every GOAWAY
//! (last stream id, code, time) and RST_STREAM the server sent on it.
//!
//! An HTTP/2 request either becomes a stream, which its connection always ends (a
//! response, a reset, a GOAWAY or a connection error), or is refused by `h2` on the
//! spot (not sent); a slot whose connection is at the server's
//! `SETTINGS_MAX_CONCURRENT_STREAMS` waits for a free stream before it sends.

mod client;
mod http2;
mod report;
mod tap;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use client::{ClientReport, Shared};
pub use report::{ClosedBeforeWrite, Failure, H2Counts, LoadReport, RequestRecord, Span, ZeroLoss};

/// How long one request (connect + write + whole response, every attempt) may take
/// by default. Zero-loss tests bound latency far below this ([`ZeroLoss::max_latency`]).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How many times one request may be started: the first attempt, and a re-send
/// each time its connection was found closed before the request was written (for
/// HTTP/2: each time the server did not process it).
pub const MAX_ATTEMPTS: u32 = 3;

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
    /// HTTP/2 connections (cleartext with prior knowledge, or h2 by ALPN over TLS
    /// when `tls` is set), each carrying `h2_streams` stream slots.
    pub h2_connections: usize,
    /// Stream slots per HTTP/2 connection: each a client that sends its next
    /// request when its previous one ended (or when its schedule says, open loop).
    /// Keep it below the server's `SETTINGS_MAX_CONCURRENT_STREAMS` (module doc).
    pub h2_streams: usize,
    /// Speak TLS to the target (the HTTP/2 clients only).
    pub tls: Option<TlsTarget>,
    /// Hard bound on the number of requests, over all clients.
    pub max_requests: u64,
    /// Hard bound on the time the load runs.
    pub max_duration: Duration,
}

impl LoadSpec {
    /// Every client: HTTP/1.1 keep-alive and fresh-connection ones, HTTP/2 stream slots.
    pub fn clients(&self) -> usize {
        self.keepalive_connections + self.fresh_connections + self.h2_connections * self.h2_streams
    }
}

/// A TLS server to load: the certificate to trust and the name it is for.
#[derive(Clone)]
pub struct TlsTarget {
    /// The server's certificate (or its CA's), DER.
    pub ca_der: Vec<u8>,
    /// The name to ask for (SNI) and check the certificate against, e.g. "localhost".
    pub server_name: String,
}

impl std::fmt::Debug for TlsTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "TlsTarget {{ server_name: {:?}, ca_der: {} bytes }}",
            self.server_name,
            self.ca_der.len()
        )
    }
}

impl TlsTarget {
    /// A TLS client that trusts only this certificate and offers ALPN "h2" alone.
    fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls::pki_types::CertificateDer::from(self.ca_der.clone()))
            .expect("the TLS target's certificate is not a valid DER certificate");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    }
}

impl Default for LoadSpec {
    fn default() -> Self {
        LoadSpec {
            // No default server: every test names the port it bound (0 is refused).
            target: SocketAddr::from(([127, 0, 0, 1], 0)),
            path: "/".to_string(),
            keepalive_connections: 8,
            fresh_connections: 8,
            h2_connections: 0,
            h2_streams: 16,
            tls: None,
            max_requests: 1_000_000,
            max_duration: Duration::from_secs(10),
        }
    }
}

/// When requests are sent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pacing {
    /// Each client sends its next request as soon as the previous one ended.
    Closed,
    /// Requests are scheduled at `per_second` over all clients (each client takes an
    /// equal, staggered share); latency counts from the scheduled time. A client that
    /// falls behind sends at once, without skipping a scheduled request.
    Open { per_second: f64 },
}

/// How a load runs, beside what it targets ([`LoadSpec`]).
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    pub pacing: Pacing,
    /// Bound on one request, over all its attempts.
    pub request_timeout: Duration,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            pacing: Pacing::Closed,
            request_timeout: REQUEST_TIMEOUT,
        }
    }
}

/// A running load: clients on the current tokio runtime.
#[derive(Debug)]
pub struct Load {
    shared: Arc<Shared>,
    clients: Vec<JoinHandle<ClientReport>>,
}

impl Load {
    /// Start closed-loop clients with the default request timeout as tasks on the
    /// current tokio runtime. Panics outside one.
    pub fn start(spec: LoadSpec) -> Load {
        Load::start_with(spec, LoadOptions::default())
    }

    /// Start the clients with `options` (pacing, request timeout). Panics outside a
    /// tokio runtime, on an open-loop rate that is not a positive number, or on TLS
    /// asked of HTTP/1.1 clients.
    pub fn start_with(spec: LoadSpec, options: LoadOptions) -> Load {
        assert!(
            spec.tls.is_none() || spec.keepalive_connections + spec.fresh_connections == 0,
            "only the HTTP/2 clients speak TLS: set keepalive_connections and fresh_connections to 0"
        );
        if let Pacing::Open { per_second } = options.pacing {
            assert!(
                per_second.is_finite() && per_second > 0.0,
                "an open-loop rate must be a positive number of requests per second, not {per_second}"
            );
        }
        let shared = Arc::new(Shared {
            tls: spec.tls.as_ref().map(TlsTarget::client_config),
            spec,
            options,
            started: Instant::now(),
            stop: AtomicBool::new(false),
            issued: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            failures: Mutex::new(Vec::new()),
        });
        let mut clients = Vec::new();
        for id in 0..shared.spec.keepalive_connections {
            clients.push(tokio::spawn(client::keepalive_client(shared.clone(), id)));
        }
        for id in 0..shared.spec.fresh_connections {
            clients.push(tokio::spawn(client::fresh_client(shared.clone(), id)));
        }
        let h1 = shared.spec.keepalive_connections + shared.spec.fresh_connections;
        for id in 0..shared.spec.h2_connections {
            let conn = Arc::new(http2::Connection::new(id));
            for slot in 0..shared.spec.h2_streams {
                let pacer = h1 + id * shared.spec.h2_streams + slot;
                clients.push(tokio::spawn(http2::stream_client(
                    shared.clone(),
                    conn.clone(),
                    slot,
                    pacer,
                )));
            }
        }
        Load { shared, clients }
    }

    /// When the load started (the origin of every record's `start`).
    pub fn started(&self) -> Instant {
        self.shared.started
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
        self.collect().await
    }

    /// Wait for every client to end (stopped, or at its bounds), and report.
    pub(crate) async fn collect(self) -> LoadReport {
        let mut report = LoadReport {
            pacing: self.shared.options.pacing,
            ..LoadReport::default()
        };
        for client in self.clients {
            // A client task only ends by returning; a panic in one is a bug here.
            let client = client.await.expect("load client task panicked");
            report.records.extend(client.records);
            report.announced_closes += client.announced_closes;
            report.closed_before_write.reused += client.closed_before_write.reused;
            report.closed_before_write.new += client.closed_before_write.new;
            report.unsent_retries += client.unsent_retries;
            let h2 = &mut report.h2;
            h2.after_goaway += client.h2.after_goaway;
            h2.after_close += client.h2.after_close;
            h2.refused_stream += client.h2.refused_stream;
            h2.above_goaway += client.h2.above_goaway;
            h2.not_sent += client.h2.not_sent;
        }
        report.reconnects = report.announced_closes + report.closed_before_write.total();
        report.elapsed = self.shared.started.elapsed();
        report.records.sort_by_key(|r| r.start);
        report.requests = report.records.len() as u64;
        report.ok = report.records.iter().filter(|r| r.ok).count() as u64;
        report.failed = report.requests - report.ok;
        report.failures = std::mem::take(&mut *self.shared.failures.lock().unwrap());
        report
    }
}
