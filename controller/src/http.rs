//! HTTP for the dashboard and scripts: JSON views of nodes and rollouts, and
//! Server-Sent Events that say what changed.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tokio_stream::StreamExt;

use crate::Change;
use crate::fleet::{Fleet, RolloutError};
use crate::inventory::Selector;
use crate::rollout::RolloutView;

pub fn router(fleet: Arc<Fleet>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/api/nodes", get(nodes))
        .route("/api/nodes/{id}", get(node))
        .route("/api/rollouts", get(rollouts))
        .route("/api/rollouts/{id}", get(rollout))
        .route("/api/events", get(events))
        .with_state(fleet)
}

#[derive(Debug, Deserialize)]
struct NodesQuery {
    selector: Option<String>,
}

fn error(status: StatusCode, msg: String) -> Response {
    (status, Json(json!({ "error": msg }))).into_response()
}

async fn nodes(State(fleet): State<Arc<Fleet>>, Query(q): Query<NodesQuery>) -> Response {
    match Selector::parse(q.selector.as_deref().unwrap_or("")) {
        Ok(selector) => Json(fleet.inventory.list(&selector)).into_response(),
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

async fn node(State(fleet): State<Arc<Fleet>>, Path(id): Path<String>) -> Response {
    match fleet.inventory.get(&id) {
        Some(node) => Json(node).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no node {id:?}")),
    }
}

async fn rollouts(State(fleet): State<Arc<Fleet>>) -> Response {
    let rollouts = match fleet.rollouts(0) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let reports: Vec<_> = rollouts.iter().map(RolloutView::report).collect();
    Json(reports).into_response()
}

async fn rollout(State(fleet): State<Arc<Fleet>>, Path(id): Path<String>) -> Response {
    match fleet.rollout(&id) {
        Ok(view) => Json(view.report()).into_response(),
        Err(e @ RolloutError::NotFound(_)) => error(StatusCode::NOT_FOUND, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// A path no route serves (the table of roles lets through only paths it names, but
/// a pattern like `/assets/*` names more than exist): a plain 404 for HTTP, and
/// `UNIMPLEMENTED` for a gRPC call, as gRPC clients expect.
pub async fn not_found(request: axum::extract::Request) -> Response {
    let path = request.uri().path();
    let grpc = request
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if grpc {
        return tonic::Status::unimplemented(format!(
            "{path} is not a method this controller serves (is the client newer than the controller?)"
        ))
        .into_http();
    }
    (
        StatusCode::NOT_FOUND,
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; charset=utf-8",
        )],
        format!("no page {} {path}\n", request.method()),
    )
        .into_response()
}

/// OpenMetrics text (what prometheus-client writes, and the agent's `/metrics` serves).
async fn metrics(State(fleet): State<Arc<Fleet>>) -> Response {
    let body = crate::metrics::global().render(&fleet);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// `event: node` / `event: rollout` with the id that changed; `event: resync` when
/// this client fell behind and should reload everything.
async fn events(
    State(fleet): State<Arc<Fleet>>,
) -> Sse<impl tokio_stream::Stream<Item = Result<Event, Infallible>>> {
    let changes = tokio_stream::wrappers::BroadcastStream::new(fleet.changes.subscribe());
    // Counted while the stream lives: axum drops it when the client goes away.
    let client = crate::metrics::global().sse_client();
    let stream = changes.map(move |change| {
        let _counted = &client;
        Ok(match change {
            Ok(Change::Node(id)) => Event::default().event("node").data(id),
            Ok(Change::Rollout(id)) => Event::default().event("rollout").data(id),
            Err(_) => Event::default().event("resync").data(""),
        })
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}
