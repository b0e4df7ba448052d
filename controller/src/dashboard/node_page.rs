//! A node's page, `/nodes/ID`: its facts, its worker generations, its restart history
//! across rollouts and manual actions (who, when, outcome, timings) with the
//! distribution of its handoff and drain times, and its recent rollout events.
//! An unknown node is a 404 page.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Router, routing::get};
use maud::{Markup, html};
use serde::Deserialize;

use super::Dashboard;
use super::charts;
use super::session::{Session, percent_encode};
use super::view::{self, Flash, Live, Section};
use crate::history::{KEEP_PER_NODE, RestartRecord};
use crate::inventory::NodeRecord;
use crate::now_ms;

/// Rollout events shown: the newest of the node's steps in its latest rollouts.
const EVENTS: usize = 20;
/// Rollouts searched for the node's events.
const ROLLOUTS_SEARCHED: usize = 20;

pub fn router() -> Router<Arc<Dashboard>> {
    Router::new().route("/nodes/{id}", get(page))
}

#[derive(Debug, Default, Deserialize)]
pub struct NodeQuery {
    #[serde(default)]
    fragment: Option<String>,
}

async fn page(
    State(d): State<Arc<Dashboard>>,
    Extension(s): Extension<Session>,
    Path(id): Path<String>,
    Query(q): Query<NodeQuery>,
) -> Response {
    let shell = |title: &str, flash: Option<&Flash>, body: Markup| {
        view::page(
            title,
            Section::Nodes,
            Some(&s),
            d.sessions.token_required(),
            flash,
            body,
        )
    };
    let Some(node) = d.fleet.inventory.get(&id) else {
        let flash = Flash::Error(format!(
            "no node {id:?}: it may have been forgotten, or never joined; see the nodes page"
        ));
        return view::with_status(
            StatusCode::NOT_FOUND,
            shell(
                "Unknown node",
                Some(&flash),
                html! { p { a href="/" { "Back to the nodes" } } },
            ),
        );
    };
    let history = match d.fleet.history.of_node(&id, KEEP_PER_NODE) {
        Ok(h) => h,
        Err(e) => {
            let flash = Flash::Error(format!("the restart history cannot be read: {e}"));
            return view::with_status(
                StatusCode::INTERNAL_SERVER_ERROR,
                shell(&format!("Node {id}"), Some(&flash), html! {}),
            );
        }
    };
    let content = content(&d, &node, &history);
    if q.fragment.is_some() {
        return content.into_response();
    }
    let live = Live {
        src: format!("/nodes/{}?fragment=1", percent_encode(&id)),
        events: "node,rollout",
        rollout: None,
        every: Some(std::time::Duration::from_secs(10)),
    };
    let body = html! {
        h1 { "Node " (id) }
        (view::live(&live, content))
    };
    shell(&format!("Node {id}"), None, body).into_response()
}

fn content(d: &Dashboard, n: &NodeRecord, history: &[RestartRecord]) -> Markup {
    let now = now_ms();
    let workers = d.fleet.history.workers(&n.node_id);
    let restarts: Vec<&RestartRecord> = history.iter().filter(|r| r.kind == "restart").collect();
    let handoffs: Vec<u64> = restarts
        .iter()
        .filter(|r| r.outcome == "succeeded")
        .map(|r| r.handoff_us)
        .collect();
    let drains: Vec<u64> = restarts
        .iter()
        .filter(|r| r.outcome == "succeeded" && r.old_pid != 0)
        .map(|r| r.drain_us)
        .collect();
    html! {
        section.summary aria-label="Facts" {
            p #node-state data-state=(n.state) {
                (view::state(&n.state))
                @if !n.reason.is_empty() { " — " span.note { (n.reason) } }
            }
            dl.spec #node-facts {
                dt { "Executable" } dd { span.path { (n.exe.path) } " " (view::short_sha(&n.exe.sha256)) }
                dt { "Generation" } dd { (n.generation) }
                dt { "Supervisor PID" } dd { (n.supervisor_pid) }
                dt { "Worker PID" } dd { (n.worker_pid) }
                dt { "Up" } dd { (view::uptime(n.started_at_unix_ms, now)) }
                dt { "Last heartbeat" } dd { (view::since(n.last_heartbeat_unix_ms, now)) }
                dt { "In flight" } dd { (n.in_flight) }
                dt { "Labels" } dd {
                    @for (k, v) in &n.labels { code { (k) "=" (v) } " " }
                    @if n.labels.is_empty() { "—" }
                }
                dt { "Control" } dd { code { (n.control_addr) } }
                dt { "Calls" } dd #node-calls {
                    @if d.fleet.agents.lines.has(&n.node_id) { "on its heartbeat stream" }
                    @else { "dialled at " code { (n.control_addr) } }
                }
                dt { "Admin" } dd {
                    @if n.admin_url.starts_with("http://") || n.admin_url.starts_with("https://") {
                        a href=(n.admin_url) rel="noopener noreferrer" { (n.admin_url) }
                    } @else { "—" }
                }
                dt { "Timeouts" } dd { "ready " (view::millis(n.ready_timeout_ms)) ", drain " (view::millis(n.drain_timeout_ms)) }
                dt { "Added" } dd { @if n.static_node { "static (--node)" } @else { "by heartbeat" } }
            }
        }
        section aria-label="Generations" {
            h2 { "Generations" }
            div.scroll {
                table.cards #generations {
                    thead { tr {
                        th scope="col" { "Gen" } th scope="col" { "PID" } th scope="col" { "State" }
                        th scope="col" { "Started" } th scope="col" { "Ready" } th scope="col" { "Handoff" }
                        th scope="col" { "Drained in" }
                    } }
                    tbody {
                        @for w in workers.iter().rev() {
                            @let made = history.iter().find(|r| r.new_pid == w.pid && r.generation == w.generation);
                            tr data-generation=(w.generation) {
                                th scope="row" { (w.generation) }
                                td.num data-label="PID" { (w.pid) }
                                td data-label="State" { (view::state(&w.state)) }
                                td data-label="Started" { (stamp(w.started_at_unix_ms)) }
                                td data-label="Ready" { (stamp(w.ready_at_unix_ms)) }
                                td data-label="Handoff" { (made.map(|r| us_or_dash(r.handoff_us)).unwrap_or_else(|| "—".into())) }
                                td data-label="Drained in" { @if w.state == "draining" { "draining…" } @else { "—" } }
                            }
                        }
                        @for r in restarts.iter().filter(|r| r.outcome == "succeeded" && r.old_pid != 0 && !workers.iter().any(|w| w.pid == r.old_pid)).take(10) {
                            tr.gone data-pid=(r.old_pid) {
                                th scope="row" { "before " (r.generation) }
                                td.num data-label="PID" { (r.old_pid) }
                                td data-label="State" { "exited" }
                                td data-label="Started" { "—" }
                                td data-label="Ready" { "—" }
                                td data-label="Handoff" { "—" }
                                td data-label="Drained in" { (us_or_dash(r.drain_us)) }
                            }
                        }
                        @if workers.is_empty() {
                            tr { td colspan="7" { "No worker reported yet (the node's next heartbeat brings them)." } }
                        }
                    }
                }
            }
        }
        section aria-label="Restart history" {
            h2 { "Restarts" }
            p.note {
                "The last " (KEEP_PER_NODE) " restarts and shutdowns the controller asked for, newest first. "
                "Handoff: trigger → READY of the new worker; drain: SIGTERM → exit of the old one."
            }
            div.charts {
                (charts::histogram("handoff-chart", "Handoff time", &handoffs))
                (charts::histogram("drain-chart", "Drain time", &drains))
            }
            div.scroll {
                table.cards #restarts {
                    thead { tr {
                        th scope="col" { "When" } th scope="col" { "Action" } th scope="col" { "By" }
                        th scope="col" { "Outcome" } th scope="col" { "Gen" } th scope="col" { "PID" }
                        th scope="col" { "Handoff" } th scope="col" { "Drain" } th scope="col" { "Reason" }
                    } }
                    tbody {
                        @for r in history {
                            tr.restart data-kind=(r.kind) data-outcome=(r.outcome) data-actor=(r.actor)
                                data-via=(r.via) data-handoff-us=(r.handoff_us) data-drain-us=(r.drain_us) {
                                th scope="row" { (view::since(r.at_unix_ms, now)) }
                                td data-label="Action" { (r.kind) }
                                td data-label="By" {
                                    span.actor { (r.actor) } " · " (r.via)
                                    @if !r.rollout_id.is_empty() {
                                        " " a href={ "/rollouts/" (percent_encode(&r.rollout_id)) } { (r.rollout_id) }
                                    }
                                }
                                td data-label="Outcome" { (view::state(&r.outcome)) }
                                td.num data-label="Gen" { @if r.generation > 0 { (r.generation) } @else { "—" } }
                                td.num data-label="PID" {
                                    @if r.old_pid != 0 || r.new_pid != 0 { (r.old_pid) " → " (r.new_pid) } @else { "—" }
                                }
                                td.num data-label="Handoff" { (us_or_dash(r.handoff_us)) }
                                td.num data-label="Drain" { (us_or_dash(r.drain_us)) }
                                td data-label="Reason" { @if !r.reason.is_empty() { pre.reason { (r.reason) } } }
                            }
                        }
                        @if history.is_empty() {
                            tr { td colspan="9" { "No restart recorded yet." } }
                        }
                    }
                }
            }
        }
        (events(d, &n.node_id))
    }
}

/// The node's latest steps in rollouts, newest first.
fn events(d: &Dashboard, node_id: &str) -> Markup {
    let mut steps = Vec::new();
    // Old finished rollouts whose nodes are left in the store have none here: the
    // events are those of the rollouts held whole (the newest finished ones and any
    // running).
    for h in d.fleet.rollout_handles(ROLLOUTS_SEARCHED) {
        let Some(i) = h.find(node_id) else { continue };
        let v = h.view.lock().expect("view lock");
        let Some(n) = v.nodes.get(i) else { continue };
        for t in &n.timeline {
            steps.push((v.rollout.id.clone(), t.clone()));
        }
    }
    steps.sort_by_key(|(_, t)| std::cmp::Reverse(t.unix_ms));
    steps.truncate(EVENTS);
    html! {
        section aria-label="Recent events" {
            h2 { "Recent rollout events" }
            @if steps.is_empty() {
                p { "This node has not been part of a rollout yet." }
            } @else {
                ol.timeline #node-events {
                    @for (id, t) in &steps {
                        li {
                            time datetime=(view::rfc3339(t.unix_ms)) { (view::rfc3339(t.unix_ms)) } " "
                            a href={ "/rollouts/" (percent_encode(id)) } { (id) } " "
                            (view::state(t.state.as_str())) " " (t.message)
                            @if t.pid != 0 { " (pid " (t.pid) ")" }
                        }
                    }
                }
            }
        }
    }
}

fn stamp(unix_ms: u64) -> Markup {
    if unix_ms == 0 {
        return html! { "—" };
    }
    html! { time datetime=(view::rfc3339(unix_ms)) { (view::rfc3339(unix_ms)) } }
}

fn us_or_dash(us: u64) -> String {
    if us == 0 {
        "—".into()
    } else {
        charts::micros(us)
    }
}
