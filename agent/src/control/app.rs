//! The app socket: how a worker's own code restarts or shuts down its node
//! ([`crate::Node`]). Owner-only, like the control socket, but it carries no outside
//! request: only processes of the agent's own user can connect, and those could signal
//! the supervisor anyway, so it asks for no token.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use crate::node::{AppError, AppRestart};
use crate::supervisor::{
    Outcome, RestartError, RestartReport, RestartRequest, Supervisor, Trigger,
};

pub fn router(supervisor: Arc<Supervisor>) -> Router {
    Router::new()
        .route("/restart", post(restart))
        .route("/shutdown", post(shutdown))
        .route("/status", get(status))
        .with_state(supervisor)
}

fn error(status: u16, message: String) -> Response {
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
        Json(AppError { error: message }),
    )
        .into_response()
}

async fn restart(
    State(supervisor): State<Arc<Supervisor>>,
    body: Result<Json<AppRestart>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(body) => body,
        Err(e) => return error(400, e.body_text()),
    };
    let millis = |ms: u64| (ms > 0).then(|| Duration::from_millis(ms));
    let request = RestartRequest {
        exe: body.exe,
        sha256: body.sha256.filter(|s| !s.trim().is_empty()),
        reason: body.reason,
        trigger: Trigger::App,
        ready_timeout: millis(body.ready_timeout_ms),
        drain_timeout: millis(body.drain_timeout_ms),
    };
    restart_answer(supervisor.restart(request).await)
}

/// A restart's outcome over HTTP, on the admin routes and the app socket alike: `200`
/// with the report, `500` with the report of a generation that failed, or the
/// refusal's status with `{"error": …}`.
pub(super) fn restart_answer(outcome: Result<RestartReport, RestartError>) -> Response {
    match outcome {
        Ok(report) => {
            let status = match report.outcome {
                Outcome::Succeeded => StatusCode::OK,
                Outcome::Failed => StatusCode::INTERNAL_SERVER_ERROR,
            };
            (status, Json(report)).into_response()
        }
        Err(e) => error(e.http_status(), e.to_string()),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Shutdown {
    reason: String,
}

async fn shutdown(
    State(supervisor): State<Arc<Supervisor>>,
    Json(body): Json<Shutdown>,
) -> Response {
    let reason = if body.reason.trim().is_empty() {
        "the app asked".to_string()
    } else {
        format!("the app asked: {}", body.reason)
    };
    supervisor.request_shutdown(reason);
    Json(serde_json::json!({ "shutting_down": true })).into_response()
}

async fn status(State(supervisor): State<Arc<Supervisor>>) -> Response {
    Json(supervisor.status()).into_response()
}
