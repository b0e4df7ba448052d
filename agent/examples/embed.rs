//! Run with: cargo run --example embed -- --listen 127.0.0.1:8080 --control 127.0.0.1:7102
//!
//! Your own axum app with zero-downtime restarts: build it, run it, then
//! `kill -USR1 <pid>` or `curl -X POST 127.0.0.1:7102/debug/admin/restart` and watch
//! the worker PID change while the supervisor PID stays.
//!
//! The app can also restart or stop its own node, as `Server.Restart(newExeFilePath)`
//! and `Shutdown()` do in GoFrame: with `EMBED_OPS_TOKEN` set, it serves
//!
//! ```text
//! curl -X POST -H "x-ops-token: $EMBED_OPS_TOKEN" '127.0.0.1:8080/ops/upgrade?exe=/opt/app/app-v2'
//! curl -X POST -H "x-ops-token: $EMBED_OPS_TOKEN" 127.0.0.1:8080/ops/shutdown
//! ```
//!
//! The first answers with the restart's report (new PID, generation, timings) once the
//! new generation is ready; the worker that answers is drained right after, and its
//! request finishes first. These routes are the app's own: guard them as the app
//! guards anything that changes state (here, a token from the environment).

use axum::Router;
use axum::extract::Query;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use fleet_agent::{Node, NodeError, RestartRequest};
use serde::Deserialize;

fn app() -> Router {
    let router = Router::new()
        .route(
            "/",
            get(|| async { "hello from an embedded fleet-agent app\n" }),
        )
        .route(
            "/pid",
            get(|| async { format!("{}\n", std::process::id()) }),
        );
    match std::env::var("EMBED_OPS_TOKEN") {
        Ok(token) if !token.is_empty() => router
            .route("/ops/upgrade", post(upgrade))
            .route("/ops/shutdown", post(shutdown))
            .layer(axum::middleware::from_fn(move |request, next| {
                ops_guard(token.clone(), request, next)
            })),
        _ => router,
    }
}

/// Only `/ops/*` needs the token; everything else passes.
async fn ops_guard(
    token: String,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let ops = request.uri().path().starts_with("/ops/");
    if ops && !authorized(request.headers(), &token) {
        return (StatusCode::UNAUTHORIZED, "send the header x-ops-token\n").into_response();
    }
    next.run(request).await
}

fn authorized(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get("x-ops-token")
        .is_some_and(|v| v.as_bytes() == token.as_bytes())
}

#[derive(Deserialize)]
struct Upgrade {
    exe: Option<String>,
    sha256: Option<String>,
}

async fn upgrade(Query(q): Query<Upgrade>) -> Response {
    let request = RestartRequest {
        exe: q.exe.map(Into::into),
        sha256: q.sha256,
        reason: "requested through /ops/upgrade".into(),
        ..Default::default()
    };
    match Node::current() {
        Ok(node) => match node.restart(request).await {
            Ok(report) => Json(report).into_response(),
            Err(e) => node_error(e),
        },
        Err(e) => node_error(e),
    }
}

async fn shutdown() -> Response {
    match Node::current() {
        Ok(node) => match node.shutdown("requested through /ops/shutdown").await {
            Ok(()) => "shutting down\n".into_response(),
            Err(e) => node_error(e),
        },
        Err(e) => node_error(e),
    }
}

fn node_error(e: NodeError) -> Response {
    let status = match &e {
        NodeError::Refused { status, .. } => {
            StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_REQUEST)
        }
        _ => StatusCode::BAD_GATEWAY,
    };
    (status, format!("{e}\n")).into_response()
}

fn main() -> std::process::ExitCode {
    fleet_agent::run(app)
}
