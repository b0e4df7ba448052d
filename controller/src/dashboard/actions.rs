//! What an operator can do to a node or a rollout from the dashboard. Each action is
//! two steps: a `GET` page that says exactly what will happen and asks for
//! confirmation, and the `POST` (with the session's CSRF token, checked by the guard)
//! that does it and shows the outcome.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Form, Router, routing::get};
use fleet_proto::v1 as pb;
use maud::{Markup, html};
use serde::Deserialize;

use super::Dashboard;
use super::session::{Session, percent_encode};
use super::view::{self, Flash, Section};
use crate::fleet::RolloutError;
use crate::history::{RestartRecord, Via};
use crate::inventory::NodeRecord;
use crate::rollout::{NodeState, RolloutState};

pub fn router() -> Router<Arc<Dashboard>> {
    Router::new()
        .route("/nodes/{id}/restart", get(confirm_restart).post(do_restart))
        .route(
            "/nodes/{id}/shutdown",
            get(confirm_shutdown).post(do_shutdown),
        )
        .route("/nodes/{id}/forget", get(confirm_forget).post(do_forget))
        .route(
            "/rollouts/{id}/{action}",
            get(confirm_rollout_action).post(do_rollout_action),
        )
}

#[derive(Debug, Default, Deserialize)]
pub struct RestartForm {
    #[serde(default)]
    exe: String,
    #[serde(default)]
    sha256: String,
    #[serde(default)]
    reason: String,
    /// The "restart anyway" box, offered when an active rollout has the node.
    #[serde(default)]
    force: Option<String>,
}

/// A page of this module: the shell with the session and the flash.
fn shell(d: &Dashboard, s: &Session, title: &str, flash: Option<&Flash>, body: Markup) -> Markup {
    view::page(
        title,
        Section::Nodes,
        Some(s),
        d.sessions.token_required(),
        flash,
        body,
    )
}

fn unknown_node(d: &Dashboard, s: &Session, id: &str) -> Response {
    let flash = Flash::Error(format!(
        "no node {id:?}: it may have been removed; see the nodes page"
    ));
    view::with_status(
        StatusCode::NOT_FOUND,
        shell(
            d,
            s,
            "Unknown node",
            Some(&flash),
            html! { p { a href="/" { "Back to the nodes" } } },
        ),
    )
}

fn node_facts(n: &NodeRecord) -> Markup {
    html! {
        dl.spec {
            dt { "State" } dd { (view::state(&n.state)) }
            dt { "Executable" } dd { span.path { (n.exe.path) } " " (view::short_sha(&n.exe.sha256)) }
            dt { "Generation" } dd { (n.generation) }
            dt { "Worker PID" } dd { (n.worker_pid) }
            dt { "In flight" } dd { (n.in_flight) }
        }
    }
}

/// While an active rollout has the node: what that means, and a box to act anyway.
fn force_box(held: Option<&(String, NodeState)>, action: &str, checked: bool) -> Markup {
    html! {
        @if let Some((rollout, state)) = held {
            p.warning #held-by data-rollout=(rollout) {
                "Rollout " a href={ "/rollouts/" (rollout) } { (rollout) } " has not finished with this node (it is "
                (state.as_str()) " there): " (action) " it once the rollout is done with it, abort the rollout first, or:"
            }
            p {
                label { input #force name="force" type="checkbox" value="1" checked[checked]; " " (action) " anyway (recorded in " (rollout) ")" }
            }
        }
    }
}

/// A page for a node that cannot be acted on because its agent is down.
fn down_page(
    d: &Dashboard,
    s: &Session,
    n: &NodeRecord,
    verb: &str,
    action: &str,
) -> Option<Response> {
    let status = crate::agents::refuse_if_down(n, action).err()?;
    let flash = Flash::Error(status.message().to_string());
    let body = html! {
        (node_facts(n))
        p { a.button href="/" { "Back to the nodes" } }
    };
    Some(view::with_status(
        StatusCode::CONFLICT,
        shell(d, s, &format!("{verb} {}", n.node_id), Some(&flash), body),
    ))
}

fn restart_form(
    n: &NodeRecord,
    s: &Session,
    form: &RestartForm,
    held: Option<&(String, NodeState)>,
) -> Markup {
    let action = format!("/nodes/{}/restart", percent_encode(&n.node_id));
    html! {
        form.confirm method="post" action=(action) {
            input type="hidden" name="csrf" value=(s.csrf);
            p {
                label for="exe" { "New executable (empty: restart the same one)" }
                input #exe name="exe" type="text" value=(form.exe) placeholder="/opt/app/app-v2" autocomplete="off";
            }
            p {
                label for="sha256" { "Expected sha256 (optional)" }
                input #sha256 name="sha256" type="text" value=(form.sha256) pattern="[0-9a-fA-F]{64}" autocomplete="off";
            }
            p {
                label for="reason" { "Reason" }
                input #reason name="reason" type="text" value=(form.reason);
            }
            (force_box(held, "restart", form.force.is_some()))
            p.buttons {
                button #confirm type="submit" { "Restart " (n.node_id) }
                " " a href="/" { "Cancel" }
            }
        }
    }
}

async fn confirm_restart(
    State(d): State<Arc<Dashboard>>,
    Extension(s): Extension<Session>,
    Path(id): Path<String>,
) -> Response {
    let Some(n) = d.fleet.inventory.get(&id) else {
        return unknown_node(&d, &s, &id);
    };
    if let Some(page) = down_page(&d, &s, &n, "Restart", "restart") {
        return page;
    }
    let held = d.fleet.holding_node(&id);
    let body = html! {
        h1 { "Restart " (n.node_id) "?" }
        p { "The agent starts a new worker generation on the same sockets, waits until it is ready, then lets the current one finish its requests. If the new generation fails, the current one keeps serving." }
        (node_facts(&n))
        (restart_form(&n, &s, &RestartForm::default(), held.as_ref()))
    };
    shell(&d, &s, &format!("Restart {id}"), None, body).into_response()
}

/// The reason an agent logs for a change asked from the dashboard, with who asked.
fn dashboard_reason(given: &str, s: &Session) -> String {
    let given = match given.trim() {
        "" => "dashboard",
        r => r,
    };
    crate::api::asked_by(given, &s.caller)
}

/// The HTTP status for an agent's gRPC refusal.
fn http_status(code: tonic::Code) -> StatusCode {
    match code {
        tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
        tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
        tonic::Code::FailedPrecondition => StatusCode::PRECONDITION_FAILED,
        tonic::Code::Aborted => StatusCode::CONFLICT,
        tonic::Code::Unauthenticated => StatusCode::BAD_GATEWAY,
        tonic::Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    }
}

async fn do_restart(
    State(d): State<Arc<Dashboard>>,
    Extension(s): Extension<Session>,
    Path(id): Path<String>,
    Form(form): Form<RestartForm>,
) -> Response {
    let Some(n) = d.fleet.inventory.get(&id) else {
        return unknown_node(&d, &s, &id);
    };
    if let Some(page) = down_page(&d, &s, &n, "Restart", "restart") {
        return page;
    }
    if let Err(refused) = d
        .fleet
        .guard_manual(&id, "restart", form.force.is_some(), &s.caller.name)
        .await
    {
        let flash = Flash::Error(refused.0.replace("--force", "the box below"));
        let held = d.fleet.holding_node(&id);
        let body = html! {
            h1 { "Restart " (n.node_id) "?" }
            (node_facts(&n))
            (restart_form(&n, &s, &form, held.as_ref()))
        };
        return view::with_status(
            StatusCode::CONFLICT,
            shell(&d, &s, &format!("Restart {id}"), Some(&flash), body),
        );
    }
    tracing::info!(
        "node {id}: restart {} (dashboard)",
        dashboard_reason(&form.reason, &s)
    );
    let request = pb::RestartRequest {
        exe: form.exe.trim().to_string(),
        sha256: form.sha256.trim().to_ascii_lowercase(),
        reason: dashboard_reason(&form.reason, &s),
        ..Default::default()
    };
    let sent_at = crate::now_ms();
    let reason = request.reason.clone();
    let result = d.fleet.agents.restart(&n, request).await;
    crate::audit::node_action(
        "restart",
        &id,
        &s.caller,
        &reason,
        &crate::audit::restart_outcome(&result),
    );
    let actor = &s.caller.name;
    let record = RestartRecord::restart(&id, Via::Dashboard, actor, "", sent_at, &result);
    d.fleet.history.record(record).await;
    let r = match result {
        Ok(r) => r,
        Err(status) => {
            // Refused before anything was spawned: the form again, as filled in.
            let flash = Flash::Error(format!("{id} refused the restart: {}", status.message()));
            let body = html! {
                h1 { "Restart " (n.node_id) "?" }
                (node_facts(&n))
                (restart_form(&n, &s, &form, d.fleet.holding_node(&id).as_ref()))
            };
            return view::with_status(
                http_status(status.code()),
                shell(&d, &s, &format!("Restart {id}"), Some(&flash), body),
            );
        }
    };
    let ok = r.outcome == pb::Outcome::Succeeded as i32;
    let exe = r.exe.clone().unwrap_or_default();
    let timings = r.timings.unwrap_or_default();
    let flash = if ok {
        Flash::Done(format!(
            "{id} restarted: generation {}, worker PID {} → {}, ready in {}.",
            r.generation,
            r.old_pid,
            r.new_pid,
            view::millis(timings.ready_us / 1000)
        ))
    } else {
        Flash::Error(format!(
            "{id}: the new generation failed and the old one kept serving: {}",
            r.reason
        ))
    };
    let body = html! {
        h1 #outcome data-outcome=(if ok { "succeeded" } else { "failed" }) {
            "Restart of " (id) ": " @if ok { "succeeded" } @else { "failed" }
        }
        dl.spec {
            dt { "Generation" } dd #new-generation { (r.generation) }
            dt { "Worker PID" } dd { (r.old_pid) " → " span #new-pid { (r.new_pid) } }
            dt { "Executable" } dd { span.path { (exe.path) } " " (view::short_sha(&exe.sha256)) }
            dt { "Timings" } dd {
                "validate " (timings.validate_us) " µs, spawn " (timings.spawn_us) " µs, ready " (timings.ready_us) " µs"
            }
        }
        @if !r.stderr_tail.is_empty() {
            h2 { "Last lines of its stderr" }
            pre.stderr { @for l in &r.stderr_tail { (l) "\n" } }
        }
        p { a.button href="/" { "Back to the nodes" } }
    };
    shell(&d, &s, &format!("Restart {id}"), Some(&flash), body).into_response()
}

async fn confirm_shutdown(
    State(d): State<Arc<Dashboard>>,
    Extension(s): Extension<Session>,
    Path(id): Path<String>,
) -> Response {
    confirm_danger(&d, &s, &id, &SHUT_DOWN)
}

const SHUT_DOWN: DangerAction = DangerAction {
    verb: "Shut down",
    route: "shutdown",
    what: "In-flight requests complete, then the agent and its workers exit and the node's ports close. Nothing restarts it but its service manager.",
    with_reason: true,
};

const FORGET: DangerAction = DangerAction {
    verb: "Forget",
    route: "forget",
    what: "The controller removes it from its inventory; rollouts no longer count it. Nothing happens on the node. If its agent heartbeats again, it is listed again.",
    with_reason: false,
};

/// A node action that cannot be taken back, as its confirmation page presents it.
struct DangerAction {
    verb: &'static str,
    /// The last segment of `/nodes/{id}/...`.
    route: &'static str,
    what: &'static str,
    with_reason: bool,
}

fn confirm_danger(d: &Dashboard, s: &Session, id: &str, a: &DangerAction) -> Response {
    let Some(n) = d.fleet.inventory.get(id) else {
        return unknown_node(d, s, id);
    };
    if a.route == SHUT_DOWN.route
        && let Some(page) = down_page(d, s, &n, a.verb, "shut down")
    {
        return page;
    }
    let held = (a.route == SHUT_DOWN.route)
        .then(|| d.fleet.holding_node(id))
        .flatten();
    let action = format!("/nodes/{}/{}", percent_encode(&n.node_id), a.route);
    let body = html! {
        h1 { (a.verb) " " (n.node_id) "?" }
        p { (a.what) }
        (node_facts(&n))
        form.confirm method="post" action=(action) {
            input type="hidden" name="csrf" value=(s.csrf);
            @if a.with_reason {
                p { label for="reason" { "Reason" } input #reason name="reason" type="text"; }
            }
            (force_box(held.as_ref(), "shut down", false))
            p.buttons {
                button.danger #confirm type="submit" { (a.verb) " " (n.node_id) }
                " " a href="/" { "Cancel" }
            }
        }
    };
    shell(d, s, &format!("{} {id}", a.verb), None, body).into_response()
}

/// The outcome of a node action: what happened, and the way back.
fn node_outcome(
    d: &Dashboard,
    s: &Session,
    title: &str,
    status: StatusCode,
    flash: Flash,
) -> Response {
    let body = html! { p { a.button href="/" { "Back to the nodes" } } };
    view::with_status(status, shell(d, s, title, Some(&flash), body))
}

#[derive(Debug, Default, Deserialize)]
pub struct ReasonForm {
    #[serde(default)]
    reason: String,
    /// The "shut down anyway" box, offered when an active rollout has the node.
    #[serde(default)]
    force: Option<String>,
}

async fn do_shutdown(
    State(d): State<Arc<Dashboard>>,
    Extension(s): Extension<Session>,
    Path(id): Path<String>,
    Form(form): Form<ReasonForm>,
) -> Response {
    let Some(n) = d.fleet.inventory.get(&id) else {
        return unknown_node(&d, &s, &id);
    };
    if let Some(page) = down_page(&d, &s, &n, SHUT_DOWN.verb, "shut down") {
        return page;
    }
    if let Err(refused) = d
        .fleet
        .guard_manual(&id, "shut down", form.force.is_some(), &s.caller.name)
        .await
    {
        let flash = Flash::Error(refused.0.replace(
            "with --force",
            "by ticking \"shut down anyway\" on the confirmation page",
        ));
        return node_outcome(
            &d,
            &s,
            &format!("{} {id}", SHUT_DOWN.verb),
            StatusCode::CONFLICT,
            flash,
        );
    }
    tracing::info!(
        "node {id}: shutdown {} (dashboard)",
        dashboard_reason(&form.reason, &s)
    );
    let reason = dashboard_reason(&form.reason, &s);
    let sent_at = crate::now_ms();
    let result = d.fleet.agents.shutdown(&n, reason.clone()).await;
    crate::audit::node_action(
        "shutdown",
        &id,
        &s.caller,
        &reason,
        &crate::audit::shutdown_outcome(&result),
    );
    let actor = &s.caller.name;
    let record = RestartRecord::shutdown(&id, Via::Dashboard, actor, sent_at, &result);
    d.fleet.history.record(record).await;
    let (status, flash) = match result {
        Ok(_) => (
            StatusCode::OK,
            Flash::Done(format!(
                "{id} is shutting down: its requests complete, then it exits."
            )),
        ),
        Err(e) => (
            http_status(e.code()),
            Flash::Error(format!("{id} refused the shutdown: {}", e.message())),
        ),
    };
    node_outcome(&d, &s, &format!("{} {id}", SHUT_DOWN.verb), status, flash)
}

async fn confirm_forget(
    State(d): State<Arc<Dashboard>>,
    Extension(s): Extension<Session>,
    Path(id): Path<String>,
) -> Response {
    confirm_danger(&d, &s, &id, &FORGET)
}

async fn do_forget(
    State(d): State<Arc<Dashboard>>,
    Extension(s): Extension<Session>,
    Path(id): Path<String>,
) -> Response {
    use crate::inventory::ForgetError;
    let (status, flash) = match d.fleet.inventory.forget(&id).await {
        Ok(n) => {
            crate::audit::node_forgotten(&id, &n.state, &s.caller);
            (
                StatusCode::OK,
                Flash::Done(format!("Forgot {id} (it was {}).", n.state)),
            )
        }
        Err(e) => (
            match e {
                ForgetError::NotFound(_) => StatusCode::NOT_FOUND,
                ForgetError::Live(_) => StatusCode::CONFLICT,
                ForgetError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
            },
            Flash::Error(e.to_string()),
        ),
    };
    node_outcome(&d, &s, &format!("{} {id}", FORGET.verb), status, flash)
}

/// Pause, resume, abort and undo: what each says it will do.
fn explain(action: &str) -> Option<(&'static str, &'static str)> {
    Some(match action {
        "pause" => (
            "Pause",
            "No further node is restarted until you resume it; the batch under way finishes.",
        ),
        "resume" => ("Resume", "The rollout continues with its next batch."),
        "abort" => (
            "Abort",
            "The rollout stops at the batch boundary; nodes not yet restarted stay as they are.",
        ),
        "undo" => (
            "Undo",
            "A new rollout moves every node this one restarted back to its previous executable.",
        ),
        _ => return None,
    })
}

/// The HTTP status a page about a refused rollout request carries.
pub fn rollout_error_status(e: &RolloutError) -> StatusCode {
    match e {
        RolloutError::InvalidSpec(_) => StatusCode::BAD_REQUEST,
        RolloutError::Refused(_) | RolloutError::Preflight { .. } => {
            StatusCode::PRECONDITION_FAILED
        }
        RolloutError::NotFound(_) => StatusCode::NOT_FOUND,
        RolloutError::WrongState(_) => StatusCode::CONFLICT,
        RolloutError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

pub fn rollout_error_page(d: &Dashboard, s: &Session, id: &str, e: &RolloutError) -> Response {
    let flash = Flash::Error(e.to_string());
    view::with_status(
        rollout_error_status(e),
        view::page(
            "Rollout",
            Section::Rollouts,
            Some(s),
            d.sessions.token_required(),
            Some(&flash),
            html! { p { a.button href={ "/rollouts/" (percent_encode(id)) } { "Back to the rollout" } } },
        ),
    )
}

async fn confirm_rollout_action(
    State(d): State<Arc<Dashboard>>,
    Extension(s): Extension<Session>,
    Path((id, action)): Path<(String, String)>,
) -> Response {
    let Some((verb, what)) = explain(&action) else {
        let e = RolloutError::InvalidSpec(format!(
            "{action:?} is not an action on a rollout: pause, resume, abort or undo"
        ));
        return rollout_error_page(&d, &s, &id, &e);
    };
    let view = match d.fleet.rollout(&id) {
        Ok(v) => v,
        Err(e) => return rollout_error_page(&d, &s, &id, &e),
    };
    let r = &view.rollout;
    let body = html! {
        h1 { (verb) " rollout " (r.id) "?" }
        p { (what) }
        p { "It is " (view::state(r.state.as_str())) ", rolling " span.path { (r.spec.exe) } " to " (view.nodes.len()) " node(s)." }
        form.confirm method="post" action={ "/rollouts/" (percent_encode(&r.id)) "/" (action) } {
            input type="hidden" name="csrf" value=(s.csrf);
            p.buttons {
                button #confirm type="submit" class=[(action == "abort").then_some("danger")] { (verb) " " (r.id) }
                " " a href={ "/rollouts/" (percent_encode(&r.id)) } { "Cancel" }
            }
        }
    };
    view::page(
        &format!("{verb} {id}"),
        Section::Rollouts,
        Some(&s),
        d.sessions.token_required(),
        None,
        body,
    )
    .into_response()
}

async fn do_rollout_action(
    State(d): State<Arc<Dashboard>>,
    Extension(s): Extension<Session>,
    Path((id, action)): Path<(String, String)>,
) -> Response {
    let actor = s.caller.name.as_str();
    let wanted = match action.as_str() {
        "pause" => Some(RolloutState::Paused),
        "resume" => Some(RolloutState::Running),
        "abort" => Some(RolloutState::Aborted),
        _ => None,
    };
    let result = match (action.as_str(), wanted) {
        (_, Some(state)) => d
            .fleet
            .request(&id, state, actor)
            .await
            .map(|h| h.view.lock().expect("view lock").rollout.id.clone()),
        ("undo", None) => d.fleet.undo(&id, actor, "").await.map(|s| s.id()),
        (other, None) => Err(RolloutError::InvalidSpec(format!(
            "{other:?} is not an action on a rollout: pause, resume, abort or undo"
        ))),
    };
    match result {
        Ok(new_id) if action == "undo" => {
            Redirect::to(&format!("/rollouts/{}?done=undo", percent_encode(&new_id)))
                .into_response()
        }
        Ok(same_id) => {
            let done = match action.as_str() {
                "pause" => "paused",
                "resume" => "resumed",
                _ => "aborted",
            };
            Redirect::to(&format!(
                "/rollouts/{}?done={done}",
                percent_encode(&same_id)
            ))
            .into_response()
        }
        Err(e) => rollout_error_page(&d, &s, &id, &e),
    }
}
