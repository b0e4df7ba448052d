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

use crate::fleet::{Fleet, RolloutError};
use crate::inventory::{Selector, page};
use crate::rollout::{RolloutSummary, RolloutView};

mod events;

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
    /// Only nodes shown in this state.
    state: Option<String>,
    /// A page: the nodes after this id…
    after: Option<String>,
    /// …at most this many (1 to `page::MAX_PAGE`).
    limit: Option<String>,
}

impl NodesQuery {
    /// The listing asked for: every matching node when none of `state`, `after` and
    /// `limit` is given (as before paging), else a page of at most `limit` (default
    /// and most [`page::MAX_PAGE`]).
    fn parse(&self) -> Result<page::Query, String> {
        let limit = match self.limit.as_deref() {
            None => None,
            Some(text) => match text.parse::<usize>() {
                Ok(n) if (1..=page::MAX_PAGE).contains(&n) => Some(n),
                _ => {
                    return Err(format!(
                        "limit={text:?}: give a number of nodes from 1 to {} (the next page \
                         starts after=the last id of this one)",
                        page::MAX_PAGE
                    ));
                }
            },
        };
        let paged = limit.is_some() || self.after.is_some() || self.state.is_some();
        Ok(page::Query {
            selector: Selector::parse(self.selector.as_deref().unwrap_or(""))?,
            state: page::parse_state(self.state.as_deref().unwrap_or(""))?,
            after: self.after.clone().filter(|a| !a.is_empty()),
            limit: match (paged, limit) {
                (false, _) => None,
                (true, None) => Some(page::MAX_PAGE),
                (true, limit) => limit,
            },
            count_labels: false,
        })
    }
}

fn error(status: StatusCode, msg: String) -> Response {
    (status, Json(json!({ "error": msg }))).into_response()
}

/// `/api/nodes`: a JSON array of nodes in id order. A page (`?limit=`, `?after=` or
/// `?state=` given) says in `X-Total-Count` how many nodes the listing matches and,
/// when more follow, where the next page is in `Link: <…>; rel="next"` (RFC 8288).
async fn nodes(
    State(fleet): State<Arc<Fleet>>,
    Query(q): Query<NodesQuery>,
    uri: axum::http::Uri,
) -> Response {
    let query = match q.parse() {
        Ok(query) => query,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    if query.limit.is_none() {
        return Json(fleet.inventory.list(&query.selector)).into_response();
    }
    let page = fleet.inventory.page(&query);
    let mut response = Json(&page.nodes).into_response();
    let headers = response.headers_mut();
    headers.insert("x-total-count", page.total.into());
    if let Some(last) = &page.next {
        let mut next = form_urlencoded::Serializer::new(String::new());
        for (key, value) in form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()) {
            if key != "after" {
                next.append_pair(&key, &value);
            }
        }
        next.append_pair("after", last);
        let link = format!("<{}?{}>; rel=\"next\"", uri.path(), next.finish());
        if let Ok(value) = axum::http::HeaderValue::from_str(&link) {
            headers.insert(axum::http::header::LINK, value);
        }
    }
    response
}

async fn node(State(fleet): State<Arc<Fleet>>, Path(id): Path<String>) -> Response {
    match fleet.inventory.get(&id) {
        Some(node) => Json(node).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no node {id:?}")),
    }
}

/// Rollouts listed when `limit` is not given.
const ROLLOUTS_LISTED: usize = 100;
/// The most `limit` may ask for (a rollout with its nodes can be 100,000 of them).
const ROLLOUTS_LISTED_MAX: usize = 1000;

#[derive(Debug, Deserialize)]
struct RolloutsQuery {
    limit: Option<String>,
    nodes: Option<String>,
}

impl RolloutsQuery {
    /// (how many, with their nodes), or what is wrong with the query.
    fn parse(&self) -> Result<(usize, bool), String> {
        let limit = match self.limit.as_deref() {
            None => ROLLOUTS_LISTED,
            Some(text) => match text.parse::<usize>() {
                Ok(n) if (1..=ROLLOUTS_LISTED_MAX).contains(&n) => n,
                _ => {
                    return Err(format!(
                        "limit={text:?}: give a number of rollouts from 1 to {ROLLOUTS_LISTED_MAX} \
                         (default {ROLLOUTS_LISTED}, newest first)"
                    ));
                }
            },
        };
        let nodes = match self.nodes.as_deref() {
            None | Some("0" | "false") => false,
            Some("1" | "true") => true,
            Some(other) => {
                return Err(format!(
                    "nodes={other:?}: give nodes=1 to list each rollout's nodes too, or leave it out"
                ));
            }
        };
        Ok((limit, nodes))
    }
}

/// Newest first: each rollout's header and counts, and its nodes only when asked
/// (`?nodes=1`), so that a listing does not read 100,000 nodes of every old rollout
/// back from the store.
async fn rollouts(State(fleet): State<Arc<Fleet>>, Query(q): Query<RolloutsQuery>) -> Response {
    let (limit, with_nodes) = match q.parse() {
        Ok(parsed) => parsed,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    if !with_nodes {
        let summaries = fleet.rollout_summaries(limit);
        let reports: Vec<_> = summaries.iter().map(RolloutSummary::report).collect();
        return Json(reports).into_response();
    }
    let rollouts = match fleet.rollouts(limit) {
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

#[derive(Debug, Deserialize)]
struct EventsQuery {
    coalesce_ms: Option<String>,
}

/// `/api/events`: `event: node` / `event: rollout` with the id that changed, `event:
/// resync` when this client fell behind and should reload everything; gathered over
/// `?coalesce_ms=N` where asked (see [`events`](mod@events)).
async fn events(State(fleet): State<Arc<Fleet>>, Query(q): Query<EventsQuery>) -> Response {
    let window = match events::parse_coalesce(q.coalesce_ms.as_deref()) {
        Ok(window) => window,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let changes = tokio_stream::wrappers::BroadcastStream::new(fleet.changes.subscribe());
    // Counted while the stream lives: axum drops it when the client goes away.
    let client = crate::metrics::global().sse_client();
    let stream = events::events(changes, window).map(move |sent| {
        let _counted = &client;
        Ok::<_, Infallible>(match sent {
            events::Sent::Node(id) => Event::default().event("node").data(id),
            events::Sent::Rollout(id) => Event::default().event("rollout").data(id),
            events::Sent::Resync => Event::default().event("resync").data(""),
        })
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}
