//! The HTTP/2 clients: connections that each carry several stream slots, a slot
//! being a client of its own (closed or open loop) that shares its connection with
//! the other slots, and one request/response exchange on a stream.
//!
//! The streams are opened with the `h2` crate itself, not through hyper's
//! `client::conn::http2`: hyper hands each request through a channel to a dispatch
//! task, and when that task ends (the connection went away) at the same moment as a
//! slot queues a request, the request can stay in the channel, neither sent nor
//! handed back, and its slot waits until its timeout (seen as a rare 10 s stall right
//! after a restart, on a connection that had closed cleanly with every stream it
//! carried answered). `h2`'s `send_request` takes the connection's state under its
//! lock: a request either becomes a stream, which the connection always ends
//! (response, reset, GOAWAY or connection error), or is refused on the spot, which
//! is a request not sent.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use h2::Reason;
use h2::client::SendRequest;
use http::Request;
use http::header::USER_AGENT;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::MAX_ATTEMPTS;
use super::client::{CONNECT_BACKOFF, ClientReport, Shared, chain};
use super::report::H2Counts;
use super::tap::{ConnLog, Tap};

/// One HTTP/2 connection slot, shared by its stream slots: the connection in use,
/// replaced by a new one once it takes no more requests.
#[derive(Debug)]
pub(super) struct Connection {
    /// Its number among the load's HTTP/2 connections, for messages.
    id: usize,
    current: tokio::sync::Mutex<Option<Current>>,
    /// Connections opened so far in this slot.
    opened: AtomicU64,
}

/// The windows the client grants the server, as hyper's HTTP/2 client does: 2 MiB
/// per stream, 5 MiB per connection.
const STREAM_WINDOW: u32 = 2 << 20;
const CONNECTION_WINDOW: u32 = 5 << 20;

#[derive(Debug, Clone)]
struct Current {
    sender: SendRequest<Bytes>,
    /// Its number in this slot (1-based), for messages.
    number: u64,
    log: Arc<ConnLog>,
}

impl Connection {
    pub(super) fn new(id: usize) -> Connection {
        Connection {
            id,
            current: tokio::sync::Mutex::new(None),
            opened: AtomicU64::new(0),
        }
    }

    /// The connection to send on: the current one, or a new one when there is none
    /// or the current one closed (counted). One stream slot connects while the
    /// others wait for that connection, as a real client's pool does.
    async fn get(
        &self,
        shared: &Shared,
        report: &mut ClientReport,
    ) -> Result<Current, (&'static str, String)> {
        let mut current = self.current.lock().await;
        if let Some(c) = current.as_ref() {
            // After any GOAWAY a client opens no more streams on the connection (RFC
            // 9113 §6.8 "MUST NOT"): h2 itself still would after a GOAWAY with the
            // highest stream id, and those streams would be refused by the final one.
            if !c.log.closed() && !c.log.saw_goaway() {
                return Ok(c.clone());
            }
            report.h2.count_replaced(c.log.saw_goaway());
            *current = None;
        }
        let number = self.opened.fetch_add(1, Ordering::Relaxed) + 1;
        let log = Arc::new(ConnLog::default());
        let sender = connect(shared, log.clone())
            .await
            .map_err(|(kind, message)| {
                (
                    kind,
                    format!("HTTP/2 connection {} #{number}: {message}", self.id),
                )
            })?;
        let c = Current {
            sender,
            number,
            log,
        };
        *current = Some(c.clone());
        Ok(c)
    }

    /// Connection `number` takes no more requests (GOAWAY, a close, a refused
    /// stream): the next request opens a new one. Counted once, by the slot that
    /// retires it.
    async fn retire(&self, number: u64, report: &mut ClientReport) {
        let mut current = self.current.lock().await;
        if let Some(c) = current.take_if(|c| c.number == number) {
            report.h2.count_replaced(c.log.saw_goaway());
        }
    }
}

/// One stream slot: sends a request on its connection, waits for the whole
/// response, then the next.
pub(super) async fn stream_client(
    shared: Arc<Shared>,
    conn: Arc<Connection>,
    slot: usize,
    pacer_index: usize,
) -> ClientReport {
    let mut report = ClientReport::default();
    let mut pacer = shared.pacer(pacer_index);
    while let Some(start) = shared.next_request(&mut pacer).await {
        let deadline = Instant::now() + shared.options.request_timeout;
        let mut attempts = 0;
        let failure =
            loop {
                attempts += 1;
                let where_ = |number: u64| {
                    format!(
                        "HTTP/2 connection {} #{number}, stream slot {slot}",
                        conn.id
                    )
                };
                let current =
                    match tokio::time::timeout_at(deadline.into(), conn.get(&shared, &mut report))
                        .await
                    {
                        Ok(Ok(c)) => c,
                        Ok(Err(failure)) => {
                            tokio::time::sleep(CONNECT_BACKOFF).await;
                            break Some(failure);
                        }
                        Err(_) => {
                            break Some((
                                "timeout",
                                format!("HTTP/2 connection {}: connect timed out", conn.id),
                            ));
                        }
                    };
                let req = request(&shared);
                let outcome =
                    tokio::time::timeout_at(deadline.into(), exchange(current.sender.clone(), req))
                        .await;
                // Where and when, and what the connection saw (GOAWAY, resets): the
                // context a failure under a restart needs.
                let context = || {
                    format!(
                        "{} at {:.1}ms into the load ({})",
                        where_(current.number),
                        shared.started.elapsed().as_secs_f64() * 1e3,
                        current.log.describe(shared.started)
                    )
                };
                match outcome {
                    Err(_) => {
                        break Some((
                            "timeout",
                            format!(
                                "{}: no complete response within {:?}",
                                context(),
                                shared.options.request_timeout
                            ),
                        ));
                    }
                    Ok(Outcome::Ok) => break None,
                    Ok(Outcome::Failed { kind, message }) => {
                        break Some((kind, format!("{}: {message}", context())));
                    }
                    Ok(Outcome::Resend(why)) => {
                        // The server did not take this request on this connection, and
                        // the connection takes no more: the next attempt opens a new one.
                        conn.retire(current.number, &mut report).await;
                        match report.h2_resend(why, attempts, deadline) {
                            None => continue,
                            Some((kind, message)) => {
                                break Some((kind, format!("{}: {message}", context())));
                            }
                        }
                    }
                }
            };
        report.records.push(shared.done(start, attempts, failure));
    }
    report
}

impl ClientReport {
    /// The one rule for a request the server did not process: count it by kind,
    /// then re-send on a new connection while the request has attempts and time
    /// left. Unlike HTTP/1.1's close before the write, a stopping load still re-sends
    /// it: a GOAWAY arrives with many streams in flight, so the requests the server
    /// declined while the load stops would otherwise show as failures the server
    /// did not cause. Returns the failure when it may not be re-sent.
    fn h2_resend(
        &mut self,
        why: Resend,
        attempts: u32,
        deadline: Instant,
    ) -> Option<(&'static str, String)> {
        let (kind, what) = match why {
            Resend::NotSent => (
                "not-sent",
                "the connection took no more requests before this one was sent",
            ),
            Resend::RefusedStream => (
                "refused-stream",
                "the server refused the stream (RST_STREAM REFUSED_STREAM)",
            ),
            Resend::AboveGoaway => (
                "above-goaway",
                "the stream was above the last stream id of the server's GOAWAY",
            ),
        };
        let why_not = if attempts >= MAX_ATTEMPTS {
            format!("after {attempts} attempts")
        } else if Instant::now() >= deadline {
            "and the request ran out of time".to_string()
        } else {
            self.h2.count_resend(why);
            return None;
        };
        Some((kind, format!("{what}, {why_not}")))
    }
}

/// Why a request may go out again on a new connection (the one rule).
#[derive(Debug, Clone, Copy)]
pub(super) enum Resend {
    /// The connection took no more streams (it went away or closed) before the
    /// request became one.
    NotSent,
    /// RST_STREAM with REFUSED_STREAM before any response.
    RefusedStream,
    /// The stream was above a GOAWAY's last stream id, or could not be opened
    /// after a GOAWAY.
    AboveGoaway,
}

impl H2Counts {
    fn count_resend(&mut self, why: Resend) {
        match why {
            Resend::NotSent => self.not_sent += 1,
            Resend::RefusedStream => self.refused_stream += 1,
            Resend::AboveGoaway => self.above_goaway += 1,
        }
    }

    fn count_replaced(&mut self, after_goaway: bool) {
        if after_goaway {
            self.after_goaway += 1;
        } else {
            self.after_close += 1;
        }
    }
}

/// How one exchange ended.
pub(super) enum Outcome {
    Ok,
    /// The server did not process the request: it may go out again (the rule).
    Resend(Resend),
    Failed {
        kind: &'static str,
        message: String,
    },
}

fn request(shared: &Shared) -> Request<()> {
    // The :scheme and :authority pseudo-headers come from the absolute URI.
    let (scheme, host) = match &shared.spec.tls {
        Some(tls) => ("https", tls.server_name.clone()),
        None => ("http", shared.spec.target.ip().to_string()),
    };
    let uri = format!(
        "{scheme}://{host}:{}{}",
        shared.spec.target.port(),
        shared.spec.path
    );
    Request::get(uri)
        .header(USER_AGENT, "fleet-loadgen")
        .body(())
        .expect("valid request")
}

/// Open a stream for one request (no body) and read the whole response. The request
/// is either refused before it becomes a stream (not sent: it may go out again) or
/// sent, and then the connection ends the stream one way or another.
pub(super) async fn exchange(sender: SendRequest<Bytes>, req: Request<()>) -> Outcome {
    // Waits while the connection is at the server's limit of concurrent streams.
    let mut sender = match sender.ready().await {
        Ok(sender) => sender,
        Err(err) => return not_opened(&err),
    };
    let response = match sender.send_request(req, true) {
        // The request has no body: its stream's send half is already closed.
        Ok((response, _send)) => response,
        Err(err) => return not_opened(&err),
    };
    let response = match response.await {
        Ok(response) => response,
        Err(err) => return classify(&err, "before the response", true),
    };
    let status = response.status();
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        match chunk {
            // Give the window back, as a client that reads its responses does.
            Ok(chunk) => {
                let _ = body.flow_control().release_capacity(chunk.len());
            }
            Err(err) => return classify(&err, &format!("status {status}, body cut short"), false),
        }
    }
    if !status.is_success() {
        return Outcome::Failed {
            kind: "status",
            message: format!("status {status}"),
        };
    }
    Outcome::Ok
}

/// The connection would not open the stream: it went away (GOAWAY received) or
/// closed, so the request was not sent. Anything else (a request h2 rejects) is a
/// failure of the client.
fn not_opened(err: &h2::Error) -> Outcome {
    if err.is_go_away() || err.is_io() || err.reason().is_some() {
        return Outcome::Resend(Resend::NotSent);
    }
    Outcome::Failed {
        kind: "other",
        message: format!("the request could not be sent: {}", chain(err)),
    }
}

/// Sort an error into a re-send (only before a response head arrived: a server
/// that answered has processed the request, whatever it says next) or a failure.
fn classify(h2: &h2::Error, what: &str, before_head: bool) -> Outcome {
    if before_head {
        // RFC 9113 §8.7: REFUSED_STREAM and streams above a GOAWAY's last stream id
        // were not processed, and may be retried.
        if h2.is_remote() && h2.is_reset() && h2.reason() == Some(Reason::REFUSED_STREAM) {
            return Outcome::Resend(Resend::RefusedStream);
        }
        if h2.is_remote() && h2.is_go_away() {
            return Outcome::Resend(Resend::AboveGoaway);
        }
    }
    let (kind, description) = if h2.is_reset() && h2.is_remote() {
        (
            "stream-reset",
            format!(
                "the server reset the stream with {:?}",
                h2.reason().unwrap_or(Reason::NO_ERROR)
            ),
        )
    } else if h2.is_go_away() && h2.is_remote() {
        (
            "stream-reset",
            format!(
                "the stream was ended by the server's GOAWAY {:?} after the response began",
                h2.reason().unwrap_or(Reason::NO_ERROR)
            ),
        )
    } else if h2.is_io() {
        (
            "reset",
            "the connection closed or was reset after the request was sent".to_string(),
        )
    } else {
        ("other", "HTTP/2 error".to_string())
    };
    Outcome::Failed {
        kind,
        message: format!("{what}: {description}: {}", chain(h2)),
    }
}

/// Open a TCP connection (TCP_NODELAY), over TLS with ALPN "h2" when the spec says
/// so, and do the HTTP/2 handshake (prior knowledge on cleartext).
async fn connect(
    shared: &Shared,
    log: Arc<ConnLog>,
) -> Result<SendRequest<Bytes>, (&'static str, String)> {
    let target = shared.spec.target;
    let tcp = TcpStream::connect(target)
        .await
        .map_err(|e| ("connect", format!("connect to {target}: {e}")))?;
    tcp.set_nodelay(true)
        .map_err(|e| ("connect", format!("set TCP_NODELAY: {e}")))?;
    let (Some(tls), Some(config)) = (&shared.spec.tls, &shared.tls) else {
        return handshake(tcp, log, target).await;
    };
    let name = ServerName::try_from(tls.server_name.clone())
        .map_err(|e| ("tls", format!("server name {:?}: {e}", tls.server_name)))?;
    let stream = tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| ("tls", format!("TLS handshake with {target}: {e}")))?;
    let alpn = stream.get_ref().1.alpn_protocol();
    if alpn != Some(b"h2".as_slice()) {
        return Err((
            "tls",
            format!(
                "{target} negotiated ALPN {:?}, not \"h2\"",
                alpn.map(String::from_utf8_lossy)
            ),
        ));
    }
    handshake(stream, log, target).await
}

pub(super) async fn handshake<T>(
    io: T,
    log: Arc<ConnLog>,
    target: SocketAddr,
) -> Result<SendRequest<Bytes>, (&'static str, String)>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .handshake::<_, Bytes>(Tap::new(io, log.clone()))
        .await
        .map_err(|e| ("connect", format!("HTTP/2 handshake with {target}: {e}")))?;
    // The connection task ends when the connection closes; its error (if any) shows
    // up on the streams that were in flight, which is where it is counted.
    tokio::spawn(async move {
        let _ = connection.await;
        log.set_closed();
    });
    Ok(sender)
}
