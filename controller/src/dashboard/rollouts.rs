//! Rollouts: the list (newest first) and one rollout's page — its spec, a progress
//! bar, its plan as batches and every node's phase with timings and, on failure, the
//! reason. Both pages are live.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Router, routing::get};
use maud::{Markup, html};
use serde::Deserialize;

use super::Dashboard;
use super::session::{Session, percent_encode};
use super::view::{self, Flash, Live, Section};
use crate::fleet::RolloutError;
use crate::now_ms;
use crate::rollout::{NodeState, Progress, RolloutNode, RolloutState, RolloutView, Spec};
use crate::tokens::{Role, actor_label};

pub fn router() -> Router<Arc<Dashboard>> {
    Router::new()
        .route("/rollouts", get(list))
        .route("/rollouts/{id}", get(detail))
}

#[derive(Debug, Default, Deserialize)]
pub struct PageQuery {
    #[serde(default)]
    fragment: Option<String>,
    /// What the action that led here did (a fixed word, see [`done_message`]).
    #[serde(default)]
    done: String,
    /// `?all=1`: every node of every batch and of the timeline, however many.
    #[serde(default)]
    all: Option<String>,
}

/// The most nodes a batch's table lists unless all are asked for: failed and moving
/// ones first, so that what needs looking at is there at 100,000 nodes too.
const ROWS_PER_BATCH: usize = 200;

/// The nodes of a batch to list: all of them if `all` or few enough, else
/// [`ROWS_PER_BATCH`] of them, the failed, rolled back, skipped, restarting and soaking
/// ones first (each group in the batch's order), then the others.
fn rows_shown<'a>(batch: &[&'a RolloutNode], all: bool) -> Vec<&'a RolloutNode> {
    if all || batch.len() <= ROWS_PER_BATCH {
        return batch.to_vec();
    }
    let settled = |n: &&RolloutNode| matches!(n.state, NodeState::Pending | NodeState::Healthy);
    let (quiet, notable): (Vec<&RolloutNode>, Vec<&RolloutNode>) =
        batch.iter().copied().partition(settled);
    notable
        .into_iter()
        .chain(quiet)
        .take(ROWS_PER_BATCH)
        .collect()
}

/// The message for `?done=WORD` after an action; unknown words show nothing.
fn done_message(done: &str, id: &str) -> Option<Flash> {
    let m = match done {
        "started" => format!("Rollout {id} started."),
        "paused" => format!("Rollout {id} will pause at the next batch boundary."),
        "resumed" => format!("Rollout {id} resumed."),
        "aborted" => format!("Rollout {id} is aborting: nodes not yet restarted stay as they are."),
        "undo" => {
            format!("Rollout {id} started: it moves the nodes back to their previous executables.")
        }
        _ => return None,
    };
    Some(Flash::Done(m))
}

/// A rollout's progress as one bar split by outcome — healthy, failed, rolled back,
/// skipped, in progress, pending — each part as wide as its share of the nodes, and
/// the counts written out. Only healthy nodes make the percentage: a rollout that
/// failed or skipped nodes never shows 100%.
fn progress_bar(p: Progress, id: &str) -> Markup {
    // An SVG whose parts are sized by attributes: the page's CSP allows no inline
    // `style`, and attributes need no script either.
    const WIDTH: usize = 1000;
    let pct = p.healthy_pct();
    let label = progress_text(p);
    let mut x = 0;
    let mut parts = Vec::new();
    for (kind, count) in p.parts() {
        if count > 0 {
            let w = count * WIDTH / p.total.max(1);
            parts.push((kind, count, x, w));
            x += w;
        }
    }
    // Rounding leaves the last part short by a few units: it takes them.
    if let Some(last) = parts.last_mut() {
        last.3 = WIDTH - last.2;
    }
    html! {
        span.progress {
            svg.segbar #(id) role="img" aria-label=(label) viewBox={ "0 0 " (WIDTH) " 10" }
                preserveAspectRatio="none"
                data-total=(p.total) data-healthy=(p.healthy) data-failed=(p.failed)
                data-rolled-back=(p.rolled_back) data-skipped=(p.skipped)
                data-active=(p.active) data-pending=(p.pending) {
                @for (kind, count, x, w) in &parts {
                    rect class={ "seg seg-" (kind) } data-kind=(kind) data-count=(count)
                        x=(x) y="0" width=(w) height="10" {
                        title { (count) " " (kind) }
                    }
                }
            }
            span.pct data-pct=(pct) { (label) }
        }
    }
}

/// "2/6 healthy (33%), 1 failed, 3 skipped".
fn progress_text(p: Progress) -> String {
    let mut text = format!("{}/{} healthy ({}%)", p.healthy, p.total, p.healthy_pct());
    for (kind, count) in p.parts().into_iter().skip(1) {
        if count > 0 {
            let kind = match kind {
                "active" => "in progress",
                "rolled-back" => "rolled back",
                k => k,
            };
            text.push_str(&format!(", {count} {kind}"));
        }
    }
    text
}

async fn list(
    State(d): State<Arc<Dashboard>>,
    Extension(session): Extension<Session>,
    Query(q): Query<PageQuery>,
) -> Response {
    let rollouts = d.fleet.rollout_summaries(0);
    let now = now_ms();
    let content = html! {
        div.scroll {
            table.cards #rollouts {
                thead { tr {
                    th scope="col" { "Id" } th scope="col" { "Executable" } th scope="col" { "State" }
                    th scope="col" { "Progress" } th scope="col" { "Started" } th scope="col" { "Actor" }
                    th scope="col" { "Reason" }
                } }
                tbody {
                    @for r in &rollouts {
                        tr #{ "rollout-" (r.rollout.id) } data-state=(r.rollout.state.as_str()) {
                            th scope="row" { a href={ "/rollouts/" (r.rollout.id) } { (r.rollout.id) } }
                            td.exe data-label="Executable" { span.path { (r.rollout.spec.exe) } }
                            td data-label="State" { (view::state(r.rollout.state.as_str())) }
                            td data-label="Progress" { (progress_bar(r.progress, &format!("progress-{}", r.rollout.id))) }
                            td data-label="Started" { (view::since(r.rollout.created_unix_ms, now)) }
                            td data-label="Actor" { (actor_label(&r.rollout.spec.actor, &r.rollout.spec.declared_actor)) }
                            td data-label="Reason" { (r.rollout.spec.reason) }
                        }
                    }
                    @if rollouts.is_empty() {
                        tr { td colspan="7" { "No rollout yet."
                            @if session.may(Role::Operator) { " " a href="/rollouts/new" { "Start one." } } } }
                    }
                }
            }
        }
    };
    if q.fragment.is_some() {
        return content.into_response();
    }
    let live = Live {
        src: "/rollouts?fragment=1".into(),
        events: "rollout",
        rollout: None,
        every: None,
    };
    let body = html! {
        h1 { "Rollouts" }
        @if session.may(Role::Operator) { p { a.button href="/rollouts/new" { "New rollout" } } }
        (view::live(&live, content))
    };
    view::page(
        "Rollouts",
        Section::Rollouts,
        Some(&session),
        d.sessions.token_required(),
        None,
        body,
    )
    .into_response()
}

async fn detail(
    State(d): State<Arc<Dashboard>>,
    Extension(session): Extension<Session>,
    Path(id): Path<String>,
    Query(q): Query<PageQuery>,
) -> Response {
    let view = match d.fleet.rollout(&id) {
        Ok(v) => v,
        Err(e) => {
            let status = match e {
                RolloutError::NotFound(_) => StatusCode::NOT_FOUND,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            let flash = Flash::Error(e.to_string());
            return view::with_status(
                status,
                view::page(
                    "Rollout",
                    Section::Rollouts,
                    Some(&session),
                    d.sessions.token_required(),
                    Some(&flash),
                    html! { p { a href="/rollouts" { "All rollouts" } } },
                ),
            );
        }
    };
    let content = rollout(&view, session.may(Role::Operator), q.all.is_some());
    if q.fragment.is_some() {
        return content.into_response();
    }
    let id = view.rollout.id.clone();
    let live = Live {
        src: format!(
            "/rollouts/{}?fragment=1{}",
            percent_encode(&id),
            if q.all.is_some() { "&all=1" } else { "" }
        ),
        events: "rollout",
        rollout: Some(id.clone()),
        every: None,
    };
    let flash = done_message(&q.done, &id);
    let body = html! {
        h1 { "Rollout " (id) }
        (view::live(&live, content))
    };
    view::page(
        &format!("Rollout {id}"),
        Section::Rollouts,
        Some(&session),
        d.sessions.token_required(),
        flash.as_ref(),
        body,
    )
    .into_response()
}

/// The live part of a rollout's page; with the buttons for changes if `operator`;
/// every node listed if `all`, else at most [`ROWS_PER_BATCH`] a batch.
fn rollout(v: &RolloutView, operator: bool, all: bool) -> Markup {
    let r = &v.rollout;
    let s = &r.spec;
    let now = now_ms();
    let state = r.state;
    let batches = r.batch_sizes.len();
    let ended = if r.finished_unix_ms > 0 {
        r.finished_unix_ms
    } else {
        now
    };
    html! {
        section.summary aria-label="Summary" {
            p.rollout-state #rollout-state data-state=(state.as_str()) {
                (view::state(state.as_str()))
                @if !r.reason.is_empty() { " — " span.note { (r.reason) } }
            }
            (progress_bar(v.progress(), "rollout-progress"))
            @if operator { (actions(v)) }
            dl.spec {
                dt { "Executable" } dd { span.path { (s.exe) } " " (view::short_sha(&s.sha256)) }
                dt { "Selector" } dd { @if s.selector.is_empty() { "every node" } @else { code { (s.selector) } } }
                dt { "Batches" } dd {
                    (r.batch_sizes.iter().map(u32::to_string).collect::<Vec<_>>().join(" + "))
                    @if !s.batches.is_empty() { " (" code { (s.batches) } ")" }
                    @if s.max_parallel > 0 { " (max parallel " (s.max_parallel) ")" }
                    @if s.canary > 0 { ", canary " (s.canary) @if s.pause_after_canary { ", pause after canary" } }
                }
                dt { "Soak" } dd { @if s.min_healthy_ms == 0 { "none (ready is enough)" } @else { (view::millis(s.min_healthy_ms)) } @if !s.health_path.is_empty() { ", health check " code { (s.health_path) } } }
                dt { "Failure budget" } dd {
                    (Spec::max_failures_or_default(&s.max_failures))
                    @if Spec::max_failures_or_default(&s.max_failures) == "0" { " (the first failure stops it)" }
                    @if s.auto_rollback { ", auto-rollback" }
                }
                dt { "Started" } dd { (view::since(r.created_unix_ms, now)) " by " span #actor { (actor_label(&s.actor, &s.declared_actor)) } }
                dt { "Duration" } dd { (view::millis(ended.saturating_sub(r.created_unix_ms))) @if r.finished_unix_ms == 0 { " so far" } }
                @if !s.reason.is_empty() { dt { "Reason" } dd { (s.reason) } }
                @if !r.undo_of.is_empty() { dt { "Undoes" } dd { a href={ "/rollouts/" (r.undo_of) } { (r.undo_of) } } }
            }
        }
        (super::charts::rollout_timeline(v, now, all))
        @for (b, size) in r.batch_sizes.iter().enumerate() {
            @let nodes: Vec<&RolloutNode> = v.nodes.iter().filter(|n| n.batch as usize == b).collect();
            @let batch_progress = Progress::of(nodes.iter().copied());
            @let shown = rows_shown(&nodes, all);
            section.batch #{ "batch-" (b + 1) } aria-label={ "Batch " (b + 1) } {
                h2 {
                    "Batch " (b + 1) " of " (batches)
                    @if s.canary > 0 && b == 0 { " (canary)" }
                    " · " (size) " node" @if *size != 1 { "s" }
                    " · " (progress_text(batch_progress))
                    @if state == RolloutState::Running && r.current_batch as usize == b { " · " span.current { "in progress" } }
                }
                div.scroll {
                    table.phases.cards.long {
                        thead { tr {
                            th scope="col" { "Node" } th scope="col" { "Phase" } th scope="col" { "Worker PID" }
                            th scope="col" { "Restart" } th scope="col" { "Soak" } th scope="col" { "Reason / timeline" }
                        } }
                        tbody { @for n in &shown { (node_row(n)) } }
                    }
                }
                @if shown.len() < nodes.len() {
                    p.note.rows-shown {
                        "Showing " (shown.len()) " of " (nodes.len()) " nodes of this batch, failed and moving ones first ("
                        a href={ "?all=1#batch-" (b + 1) } { "show all" } ")."
                    }
                }
            }
        }
    }
}

/// Milliseconds between the first entry in `from` and the first later one in `to`.
fn phase_ms(n: &RolloutNode, from: NodeState, to: &[NodeState]) -> Option<u64> {
    let start = n.timeline.iter().position(|t| t.state == from)?;
    let end = n.timeline[start..].iter().find(|t| to.contains(&t.state))?;
    Some(end.unix_ms.saturating_sub(n.timeline[start].unix_ms))
}

fn node_row(n: &RolloutNode) -> Markup {
    use NodeState::*;
    let restart = phase_ms(n, Restarting, &[Soaking, Healthy, Failed, RolledBack]);
    let soak = phase_ms(n, Soaking, &[Healthy, Failed, RolledBack]);
    let fmt = |ms: Option<u64>| ms.map(view::millis).unwrap_or_else(|| "—".into());
    html! {
        tr #{ "rn-" (n.node_id) } data-node=(n.node_id) data-phase=(n.state.as_str()) {
            th scope="row" { a.node-link href={ "/nodes/" (percent_encode(&n.node_id)) } { (n.node_id) } }
            td data-label="Phase" { (view::state(n.state.as_str())) }
            td.num data-label="Worker PID" { (n.old_pid) @if n.new_pid != 0 && n.new_pid != n.old_pid { " → " (n.new_pid) } }
            td data-label="Restart" { (fmt(restart)) }
            td data-label="Soak" { (fmt(soak)) }
            td data-label="Reason / timeline" {
                @if !n.reason.is_empty() { pre.reason { (n.reason) } }
                details {
                    summary { (n.timeline.len()) " step" @if n.timeline.len() != 1 { "s" } }
                    ol.timeline {
                        @for t in &n.timeline {
                            li { time datetime=(view::rfc3339(t.unix_ms)) { (view::rfc3339(t.unix_ms)) } " "
                                (view::state(t.state.as_str())) " " (t.message)
                                @if t.pid != 0 { " (pid " (t.pid) ")" } }
                        }
                    }
                }
            }
        }
    }
}

/// The buttons for what can be done to the rollout in its state; each leads to a
/// confirmation page.
fn actions(v: &RolloutView) -> Markup {
    let id = percent_encode(&v.rollout.id);
    let state = v.rollout.state;
    let undoable = state.finished()
        && v.nodes
            .iter()
            .any(|n| n.state == NodeState::Healthy && !n.previous_exe.is_empty());
    html! {
        p.actions {
            @if state == RolloutState::Running { a.button href={ "/rollouts/" (id) "/pause" } { "Pause" } " " }
            @if state == RolloutState::Paused { a.button href={ "/rollouts/" (id) "/resume" } { "Resume" } " " }
            @if matches!(state, RolloutState::Running | RolloutState::Paused) {
                a.button.danger href={ "/rollouts/" (id) "/abort" } { "Abort" } " "
            }
            @if undoable { a.button href={ "/rollouts/" (id) "/undo" } { "Undo" } }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(nodes: usize) -> RolloutView {
        let ids: Vec<String> = (0..nodes).map(|i| format!("n{i:05}")).collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        RolloutView::for_test(&ids)
    }

    #[test]
    fn a_big_batch_lists_its_failed_and_moving_nodes_first_and_says_how_many_are_left_out() {
        let mut v = view(1_500);
        v.nodes[1_400].set(NodeState::Failed, "exited with status 1 before READY", 0);
        v.nodes[1_450].set(NodeState::Restarting, "restart asked", 0);
        let page = rollout(&v, false, false).into_string();
        assert_eq!(page.matches("<tr id=\"rn-").count(), ROWS_PER_BATCH);
        assert!(
            page.contains("id=\"rn-n01400\""),
            "the failed node is listed"
        );
        assert!(
            page.contains("id=\"rn-n01450\""),
            "the restarting node is listed"
        );
        assert!(
            page.contains("Showing 200 of 1500 nodes of this batch"),
            "{}",
            &page[..200]
        );
        assert!(
            page.contains("data-rows=\"1000\""),
            "the timeline is cut too"
        );
        assert!(page.contains("the first 1000 of 1500 nodes"));

        let all = rollout(&v, false, true).into_string();
        assert_eq!(all.matches("<tr id=\"rn-").count(), 1_500);
        assert!(all.contains("data-rows=\"1500\""));
        assert!(!all.contains("nodes of this batch") && !all.contains("show all"));

        let small = rollout(&view(3), false, false).into_string();
        assert_eq!(small.matches("<tr id=\"rn-").count(), 3);
        assert!(!small.contains("nodes of this batch") && !small.contains("show all"));
    }
}
