//! The token check in front of every control route.
//!
//! With a token configured a request needs `Authorization: Bearer TOKEN` (HTTP header
//! or gRPC metadata), or the admin page's session cookie — which is `SameSite=Strict`
//! and only accepted on POST for actions, so a plain cross-site link changes nothing.
//! `/healthz`, gRPC health checks and the login form are open.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use sha2::{Digest, Sha256};

use crate::supervisor::Supervisor;

pub const COOKIE: &str = "fleet_admin";

/// The cookie value for a token: a digest, so the cookie never carries the token itself.
pub fn session_value(token: &str) -> String {
    hex::encode(Sha256::digest(format!("fleet-admin-session:{token}")))
}

/// Compares digests, so the time taken says nothing about the token.
fn same(a: &str, b: &str) -> bool {
    Sha256::digest(a) == Sha256::digest(b)
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

pub async fn require_token(
    State(supervisor): State<Arc<Supervisor>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(token) = supervisor.token() else {
        return next.run(request).await;
    };
    let admin = &supervisor.config().admin.path;
    let path = request.uri().path();
    let open = path == "/healthz"
        || path.starts_with("/grpc.health.v1.Health/")
        || path == format!("{admin}/login");
    if open {
        return next.run(request).await;
    }
    if bearer(request.headers()).is_some_and(|given| same(given, token)) {
        return next.run(request).await;
    }
    let session = cookie(request.headers(), COOKIE).is_some_and(|v| same(v, &session_value(token)));
    let action = ["restart", "reload", "shutdown"]
        .iter()
        .any(|a| path == format!("{admin}/{a}"));
    if session && (!action || request.method() == Method::POST) {
        return next.run(request).await;
    }
    let grpc = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if grpc {
        return tonic::Status::unauthenticated(
            "missing or wrong token: send the metadata `authorization: Bearer <token>` (the token is in the agent's --token-file)",
        )
        .into_http();
    }
    if session {
        return (
            StatusCode::FORBIDDEN,
            "actions need POST (use the buttons of the admin page)\n",
        )
            .into_response();
    }
    if request.method() == Method::GET && path == admin.as_str() {
        return Redirect::to(&format!("{admin}/login")).into_response();
    }
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        "missing or wrong token: send the header `Authorization: Bearer <token>` (the token is in the agent's --token-file)\n",
    )
        .into_response()
}
