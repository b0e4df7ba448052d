//! HTTP/2 through `fleet_net::Server` with the vendored h2 (vendor/README.md), whose
//! connections free their read and write buffers whenever they wait for the peer:
//! every round below starts on a connection that has just gone idle, so each one
//! allocates its buffers again, for big header blocks (CONTINUATION frames both
//! ways), big bodies (DATA frames past the flow-control windows) and many streams at
//! once.

use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::http::HeaderMap;
use axum::routing::{get, post};
use fleet_net::{Limits, Server};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

/// Bound on every wait of this test.
const WAIT: Duration = Duration::from_secs(20);

/// Echoes the body and answers the request's `x-big` header twice over, so that the
/// answer's header block is bigger than one frame.
async fn echo(headers: HeaderMap, body: Bytes) -> (HeaderMap, Bytes) {
    let mut answer = HeaderMap::new();
    if let Some(big) = headers.get("x-big") {
        answer.insert("x-big-1", big.clone());
        answer.insert("x-big-2", big.clone());
    }
    (answer, body)
}

fn app() -> Router {
    Router::new()
        .route("/", get(|| async { "hello" }))
        .route("/echo", post(echo))
        .layer(axum::extract::DefaultBodyLimit::max(4 << 20))
}

#[tokio::test]
async fn an_http2_connection_that_goes_idle_between_rounds_serves_every_round_whole() {
    // Both ends: the client's connection frees its buffers too.
    h2::release_idle_buffers(true);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = Server::new(listener, app(), Limits::default());
    let addr = server.local_addr().unwrap();
    tokio::spawn(server.run());

    let stream = TcpStream::connect(addr).await.unwrap();
    let (client, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .max_header_list_size(1 << 20)
        .handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let connection = tokio::spawn(connection);

    let small = |client: hyper::client::conn::http2::SendRequest<Full<Bytes>>| async move {
        let request = http::Request::get(format!("http://{addr}/"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = client.clone().send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"hello");
    };
    let big = |client: hyper::client::conn::http2::SendRequest<Full<Bytes>>, i: usize| async move {
        // 12 KiB of header (answered as 24 KiB: more than a 16 KiB frame) and 1 MiB
        // of body, different for each stream.
        let header = "h".repeat(12 * 1024 - i);
        let body: Vec<u8> = (0..1 << 20).map(|n: usize| (n * 31 + i) as u8).collect();
        let request = http::Request::post(format!("http://{addr}/echo"))
            .header("x-big", &header)
            .body(Full::new(Bytes::from(body.clone())))
            .unwrap();
        let response = client.clone().send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        for name in ["x-big-1", "x-big-2"] {
            assert_eq!(
                response.headers()[name],
                header.as_str(),
                "stream {i}: {name}"
            );
        }
        let echoed = response.into_body().collect().await.unwrap().to_bytes();
        assert!(
            echoed[..] == body[..],
            "stream {i}: the body came back changed"
        );
    };

    let rounds = async {
        for round in 0..3 {
            let mut all = tokio::task::JoinSet::new();
            for _ in 0..32 {
                all.spawn(small(client.clone()));
            }
            while let Some(done) = all.join_next().await {
                done.unwrap_or_else(|e| panic!("round {round}, a small request: {e}"));
            }
            for i in 0..6 {
                all.spawn(big(client.clone(), i));
            }
            while let Some(done) = all.join_next().await {
                done.unwrap_or_else(|e| panic!("round {round}, a big request: {e}"));
            }
        }
    };
    tokio::time::timeout(WAIT, rounds)
        .await
        .expect("three rounds within the bound");
    assert!(!connection.is_finished(), "the connection stays open");
}
