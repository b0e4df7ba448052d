//! What the unit tests of several modules share.

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, Request, StatusCode};
use tower::ServiceExt as _;

/// Sends one request to `app` as if from a loopback peer; the status, headers and body.
pub async fn oneshot(
    app: &axum::Router,
    request: Request<Body>,
) -> (StatusCode, HeaderMap, String) {
    let mut request = request;
    let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
    request.extensions_mut().insert(ConnectInfo(peer));
    let response = app.clone().oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = axum::body::to_bytes(body, 1 << 20).await.unwrap();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}
