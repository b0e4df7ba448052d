//! `fleet_net::Server` on a real loopback socket: idle and header timeouts, eviction
//! at the cap, long responses never cut, the peer's address for handlers.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::routing::get;
use bytes::Bytes;
use fleet_net::{Connections, Limits, Server};
use http_body_util::BodyExt as _;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bound on every wait of these tests.
const WAIT: Duration = Duration::from_secs(10);

fn app() -> Router {
    Router::new()
        .route("/", get(|| async { "hello" }))
        .route(
            "/peer",
            get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.to_string() }),
        )
        // Five chunks 400 ms apart: each gap is longer than the idle timeouts below.
        .route(
            "/stream",
            get(|| async {
                let chunks = futures_util::stream::unfold(0, |i| async move {
                    if i == 5 {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(400)).await;
                    Some((
                        Ok::<_, std::io::Error>(Bytes::from(format!("chunk {i}\n"))),
                        i + 1,
                    ))
                });
                Body::from_stream(chunks)
            }),
        )
}

async fn start(limits: Limits) -> (SocketAddr, Connections) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = Server::new(listener, app(), limits);
    let (addr, conns) = (server.local_addr().unwrap(), server.connections());
    tokio::spawn(server.run());
    (addr, conns)
}

fn limits(idle: u64, header: u64) -> Limits {
    Limits {
        idle_timeout: Duration::from_millis(idle),
        header_timeout: Duration::from_millis(header),
        ..Limits::default()
    }
}

/// Waits until `open` connections are registered.
async fn wait_open(conns: &Connections, open: usize) {
    let mut rx = conns.subscribe();
    tokio::time::timeout(WAIT, rx.wait_for(|n| *n == open))
        .await
        .unwrap_or_else(|_| panic!("{open} connections open: have {}", conns.open()))
        .unwrap();
}

/// Reads until EOF (or a reset); panics after [`WAIT`]. Returns what was read.
async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(WAIT, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return String::from_utf8_lossy(&all).into_owned(),
            Ok(Ok(n)) => all.extend_from_slice(&buf[..n]),
            Err(_) => panic!("not closed within {WAIT:?}; read so far: {all:?}"),
        }
    }
}

/// One HTTP/1.1 keep-alive `GET`, read up to its (short, sized) body.
async fn get_keep_alive(stream: &mut TcpStream, path: &str) -> String {
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&all).contains("\r\n\r\n") || !all.ends_with(b"hello") {
        let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        assert!(n > 0, "closed before the answer: {all:?}");
        all.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&all).into_owned()
}

/// Whether the server still holds the connection open (nothing to read, no EOF).
fn still_open(stream: &TcpStream) -> bool {
    let mut buf = [0u8; 1];
    matches!(stream.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let (addr, conns) = start(limits(500, 10_000)).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    assert!(
        get_keep_alive(&mut stream, "/")
            .await
            .starts_with("HTTP/1.1 200")
    );
    let idle = Instant::now();
    assert_eq!(read_to_close(&mut stream).await, "");
    let took = idle.elapsed();
    eprintln!("idle HTTP/1 connection closed after {took:?}");
    assert!(took >= Duration::from_millis(400), "{took:?}");
    wait_open(&conns, 0).await;
    assert_eq!(conns.stats().idle_closed, 1);
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_after_the_idle_timeout() {
    let (addr, conns) = start(limits(500, 10_000)).await;
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut client, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let connection = tokio::spawn(connection);
    let request = http::Request::get(format!("http://{addr}/"))
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let response = client.send_request(request).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"hello");
    let idle = Instant::now();
    tokio::time::timeout(WAIT, connection)
        .await
        .expect("the server closes the idle HTTP/2 connection")
        .unwrap()
        .unwrap();
    let took = idle.elapsed();
    eprintln!("idle HTTP/2 connection closed after {took:?}");
    assert!(took >= Duration::from_millis(400), "{took:?}");
    wait_open(&conns, 0).await;
}

#[tokio::test]
async fn a_connection_that_sends_no_whole_request_head_in_time_is_closed() {
    let (addr, conns) = start(limits(60_000, 300)).await;
    // Silent, and a head that never ends: both closed by the header timeout, long
    // before the idle timeout.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let mut partial = TcpStream::connect(addr).await.unwrap();
    partial
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let opened = Instant::now();
    read_to_close(&mut silent).await;
    read_to_close(&mut partial).await;
    let took = opened.elapsed();
    eprintln!("connections without a request head closed after {took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    wait_open(&conns, 0).await;
    assert!(conns.stats().header_timeouts >= 1, "{:?}", conns.stats());
}

#[tokio::test]
async fn at_the_cap_the_oldest_idle_connection_makes_room_for_a_new_one() {
    // 16 is the lowest cap there is.
    let (addr, conns) = start(Limits {
        max_connections: 16,
        ..limits(60_000, 60_000)
    })
    .await;
    let mut idle = Vec::new();
    for n in 1..=16 {
        idle.push(TcpStream::connect(addr).await.unwrap());
        wait_open(&conns, n).await; // so that their order is known
    }
    let started = Instant::now();
    let mut newcomer = TcpStream::connect(addr).await.unwrap();
    let answer = get_keep_alive(&mut newcomer, "/").await;
    eprintln!("answered at the cap in {:?}", started.elapsed());
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(
        read_to_close(&mut idle[0]).await,
        "",
        "the oldest idle one is closed"
    );
    for (i, stream) in idle.iter().enumerate().skip(1) {
        assert!(
            still_open(stream),
            "connection {i} was not the oldest: kept"
        );
    }
    assert_eq!(conns.stats().evicted, 1);
    assert_eq!(conns.open(), 16);
}

#[tokio::test]
async fn at_the_cap_with_every_connection_busy_the_new_one_is_closed() {
    let (addr, conns) = start(Limits {
        max_connections: 16,
        ..limits(60_000, 60_000)
    })
    .await;
    let mut busy = Vec::new();
    for n in 1..=16 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        busy.push(stream);
        wait_open(&conns, n).await;
    }
    let mut newcomer = TcpStream::connect(addr).await.unwrap();
    assert_eq!(read_to_close(&mut newcomer).await, "", "closed unanswered");
    assert_eq!(conns.stats().refused, 1);
    // The busy ones were not touched: each gets its whole response.
    for stream in &mut busy {
        assert!(read_to_close(stream).await.contains("chunk 4"));
    }
}

#[tokio::test]
async fn a_long_response_is_not_cut_by_the_idle_timeout() {
    // 2 s of response with 400 ms gaps, against 200 ms idle and header timeouts.
    let (addr, _conns) = start(limits(200, 200)).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let all = read_to_close(&mut stream).await;
    assert!(all.contains("chunk 0") && all.contains("chunk 4"), "{all}");
    // ...and the connection closes once idle after it.
    assert!(
        all.ends_with("0\r\n\r\n"),
        "the chunked body ended: {all:?}"
    );

    // HTTP/2 (as gRPC streams are served).
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut client, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let request = http::Request::get(format!("http://{addr}/stream"))
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let response = client.send_request(request).await.unwrap();
    let body = tokio::time::timeout(WAIT, response.into_body().collect())
        .await
        .expect("the stream ends")
        .expect("and is not cut")
        .to_bytes();
    assert_eq!(body.split(|b| *b == b'\n').count(), 6, "{body:?}");
}

#[tokio::test]
async fn handlers_get_the_peer_address() {
    let (addr, _conns) = start(Limits::default()).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let local = stream.local_addr().unwrap();
    stream
        .write_all(b"GET /peer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let answer = read_to_close(&mut stream).await;
    assert!(answer.ends_with(&local.to_string()), "{answer}");
}
