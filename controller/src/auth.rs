//! The token check in front of every controller API route (gRPC and HTTP) but
//! `/healthz` and gRPC health. A browser logged in to the dashboard may also read the
//! HTTP API (`GET`) with its session cookie instead.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::dashboard::session::Sessions;

#[derive(Debug, Clone)]
pub struct Token {
    pub token: Option<Arc<String>>,
    pub sessions: Arc<Sessions>,
}

pub use fleet_net::browser::same_secret as same;

pub async fn require_token(State(token): State<Token>, request: Request, next: Next) -> Response {
    // Routes that authenticate their caller themselves: a join token, or the node's
    // own certificate (checked against the node the message is about).
    if crate::join::authenticates_itself(&request) {
        return next.run(request).await;
    }
    let Token { token, sessions } = token;
    let Some(token) = token else {
        return next.run(request).await;
    };
    let path = request.uri().path();
    if path == "/healthz" || path.starts_with("/grpc.health.v1.Health/") {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    if given.is_some_and(|g| same(g, &token)) {
        return next.run(request).await;
    }
    if request.method() == Method::GET && sessions.authenticated(request.headers()) {
        return next.run(request).await;
    }
    let grpc = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    let msg = "missing or wrong token: send `authorization: Bearer <token>` (fleetctl --token / FLEET_TOKEN)";
    if grpc {
        return tonic::Status::unauthenticated(msg).into_http();
    }
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        format!("{msg}\n"),
    )
        .into_response()
}
