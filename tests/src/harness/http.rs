//! One-shot HTTP clients for tests: HTTP/1.1 on a fresh connection, HTTPS with
//! HTTP/2 (ALPN h2), and a streaming GET that is held in flight across a restart.
//! Each opens its own connection, so nothing is pooled or retried.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{AUTHORIZATION, HOST};
use http::{HeaderMap, Method, Request, StatusCode, Version};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// How long a one-shot request may take.
const TIMEOUT: Duration = Duration::from_secs(60);

/// A whole response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl HttpResponse {
    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics with the body if it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "expected a JSON body (status {}), got {:?}: {e}",
                self.status,
                self.text()
            )
        })
    }
}

/// `GET path` on a fresh HTTP/1.1 connection.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<HttpResponse, String> {
    http_request(addr, Method::GET, path, None).await
}

/// `METHOD path` on a fresh HTTP/1.1 connection, with `Authorization: Bearer TOKEN`
/// when a token is given.
pub async fn http_request(
    addr: SocketAddr,
    method: Method,
    path: &str,
    token: Option<&str>,
) -> Result<HttpResponse, String> {
    let headers: Vec<(&str, String)> = token
        .map(|t| ("authorization", format!("Bearer {t}")))
        .into_iter()
        .collect();
    http_send(addr, method, path, &headers, Bytes::new()).await
}

/// `METHOD path` with these headers and body on a fresh HTTP/1.1 connection; `Host` is
/// the address unless `headers` name one.
pub async fn http_send(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, String)],
    body: impl Into<Bytes>,
) -> Result<HttpResponse, String> {
    let what = format!("{method} http://{addr}{path}");
    let mut request = Request::builder().method(method).uri(path);
    // A test may name another Host (a DNS-rebinding attempt); otherwise the address.
    if !headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("host"))
    {
        request = request.header(HOST, addr.to_string());
    }
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let request = request
        .body(Full::new(body.into()))
        .map_err(|e| format!("{what}: bad request: {e}"))?;
    tokio::time::timeout(TIMEOUT, async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("sending the request: {e}"))?;
        read_whole(response).await
    })
    .await
    .unwrap_or_else(|_| Err(format!("no response within {TIMEOUT:?}")))
    .map_err(|e: String| format!("{what}: {e}"))
}

fn build(
    method: Method,
    uri: String,
    addr: SocketAddr,
    token: Option<&str>,
) -> Request<Empty<Bytes>> {
    let mut builder = Request::builder()
        .method(method)
        .uri(uri)
        .header(HOST, addr.to_string());
    if let Some(token) = token {
        builder = builder.header(AUTHORIZATION, format!("Bearer {token}"));
    }
    builder.body(Empty::new()).expect("valid request")
}

async fn connect_http1(
    addr: SocketAddr,
) -> Result<hyper::client::conn::http1::SendRequest<Empty<Bytes>>, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_nodelay(true)
        .map_err(|e| format!("nodelay: {e}"))?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// `GET path` on a fresh HTTP/1.1 connection (with `Authorization: Bearer TOKEN` when a
/// token is given), answered with its head only: the body is read as it comes (an
/// event stream), and the connection lives as long as it.
pub async fn http_open(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
) -> Result<http::Response<hyper::body::Incoming>, String> {
    let what = format!("GET http://{addr}{path}");
    tokio::time::timeout(TIMEOUT, async {
        let mut sender = connect_http1(addr).await?;
        let request = build(Method::GET, path.to_string(), addr, token);
        sender
            .send_request(request)
            .await
            .map_err(|e| format!("sending the request: {e}"))
    })
    .await
    .unwrap_or_else(|_| Err(format!("no response head within {TIMEOUT:?}")))
    .map_err(|e| format!("{what}: {e}"))
}

/// `GET path` over TLS to `addr`, which must negotiate HTTP/2 by ALPN and present a
/// certificate for "localhost" signed by (or equal to) `ca_der`.
pub async fn https_h2_get(
    addr: SocketAddr,
    path: &str,
    ca_der: &[u8],
) -> Result<HttpResponse, String> {
    let what = format!("GET https://{addr}{path} (HTTP/2)");
    tokio::time::timeout(TIMEOUT, async {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(ca_der.to_vec()))
            .map_err(|e| format!("trusting the test certificate: {e}"))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        tcp.set_nodelay(true).map_err(|e| format!("nodelay: {e}"))?;
        let name = ServerName::try_from("localhost").expect("valid name");
        let tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake: {e}"))?;
        let alpn = tls.get_ref().1.alpn_protocol().map(|p| p.to_vec());
        if alpn.as_deref() != Some(b"h2".as_slice()) {
            return Err(format!(
                "ALPN negotiated {:?}, expected \"h2\"",
                alpn.map(|p| String::from_utf8_lossy(&p).into_owned())
            ));
        }
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let uri = format!("https://localhost:{}{path}", addr.port());
        let request = Request::get(uri)
            .body(Empty::<Bytes>::new())
            .expect("valid request");
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("sending the request: {e}"))?;
        read_whole(response).await
    })
    .await
    .unwrap_or_else(|_| Err(format!("no response within {TIMEOUT:?}")))
    .map_err(|e: String| format!("{what}: {e}"))
}

/// A streaming GET whose response has started (status and first line received)
/// and whose body is still being read in the background.
#[derive(Debug)]
pub struct InFlight {
    /// The response status.
    pub status: StatusCode,
    /// The first line of the body, without the newline.
    pub first_line: String,
    rest: JoinHandle<Finished>,
}

/// How an [`InFlight`] request ended.
#[derive(Debug, Clone)]
pub struct Finished {
    pub status: StatusCode,
    /// The whole body received, including the first line.
    pub body: String,
    /// Why the body ended early, if it did (reset, EOF before the end).
    pub error: Option<String>,
    /// When the body ended (completely or not).
    pub ended: Instant,
}

impl InFlight {
    /// Send `GET path` on a fresh connection and return once the status and the
    /// first body line arrived, so the request is known to be held by a worker.
    pub async fn start(addr: SocketAddr, path: &str) -> Result<InFlight, String> {
        let what = format!("GET http://{addr}{path}");
        let mut sender = connect_http1(addr)
            .await
            .map_err(|e| format!("{what}: {e}"))?;
        let response = tokio::time::timeout(
            TIMEOUT,
            sender.send_request(build(Method::GET, path.to_string(), addr, None)),
        )
        .await
        .map_err(|_| format!("{what}: no response head within {TIMEOUT:?}"))?
        .map_err(|e| format!("{what}: {e}"))?;
        let status = response.status();
        let mut body = response.into_body();
        let mut received = Vec::new();
        while !received.contains(&b'\n') {
            match tokio::time::timeout(TIMEOUT, body.frame()).await {
                Err(_) => return Err(format!("{what}: no first line within {TIMEOUT:?}")),
                Ok(None) => {
                    return Err(format!(
                        "{what}: body ended before the first line: {:?}",
                        String::from_utf8_lossy(&received)
                    ));
                }
                Ok(Some(Err(e))) => return Err(format!("{what}: reading the first line: {e}")),
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        received.extend_from_slice(&data);
                    }
                }
            }
        }
        let text = String::from_utf8_lossy(&received).into_owned();
        let first_line = text.lines().next().unwrap_or_default().to_string();
        let rest = tokio::spawn(async move {
            // Keep the sender alive so the connection is not torn down early.
            let _sender = sender;
            let mut received = received;
            let mut error = None;
            loop {
                match body.frame().await {
                    None => break,
                    Some(Err(e)) => {
                        error = Some(e.to_string());
                        break;
                    }
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            received.extend_from_slice(&data);
                        }
                    }
                }
            }
            Finished {
                status,
                body: String::from_utf8_lossy(&received).into_owned(),
                error,
                ended: Instant::now(),
            }
        });
        Ok(InFlight {
            status,
            first_line,
            rest,
        })
    }

    /// The first line parsed as a pid (the demo app's `/sleep` starts with one).
    pub fn pid(&self) -> u32 {
        self.first_line.trim().parse().unwrap_or_else(|_| {
            panic!(
                "first line of the response is not a pid: {:?}",
                self.first_line
            )
        })
    }

    /// Wait until the body ended (at most `timeout`).
    pub async fn finish(self, timeout: Duration) -> Finished {
        match tokio::time::timeout(timeout, self.rest).await {
            Ok(finished) => finished.expect("body reader task panicked"),
            Err(_) => panic!("the in-flight request did not end within {timeout:?}"),
        }
    }
}

/// The whole response: status, version, headers and every byte of the body.
async fn read_whole(
    response: hyper::Response<hyper::body::Incoming>,
) -> Result<HttpResponse, String> {
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| format!("reading the body (status {}): {e}", parts.status))?
        .to_bytes();
    Ok(HttpResponse {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        body,
    })
}
