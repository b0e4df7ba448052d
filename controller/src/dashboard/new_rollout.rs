//! Starting a rollout from a form with the options of `fleetctl rollout`. "Preview"
//! plans it as a dry run (nothing is touched: the batches and the nodes in each are
//! shown for confirmation); "Start rollout" on that page starts it and opens its live
//! page. A spec that cannot run, or a preflight refusal, shows the form again as it was
//! filled in, with what to fix.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Form, Router, routing::get};
use maud::{Markup, html};
use serde::{Deserialize, Serialize};

use super::Dashboard;
use super::actions::{rollout_error_page, rollout_error_status};
use super::session::{Session, percent_encode};
use super::view::{self, Flash, Section};
use crate::fleet::RolloutError;
use crate::rollout::{RolloutView, Spec};

pub fn router() -> Router<Arc<Dashboard>> {
    Router::new().route("/rollouts/new", get(form_page).post(submit))
}

/// The form's fields, as typed (all text, so that a bad value comes back as it was).
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct RolloutForm {
    pub exe: String,
    pub sha256: String,
    pub selector: String,
    /// Node ids to leave out, separated by commas or spaces.
    pub exclude: String,
    pub skip_unreachable: Option<String>,
    pub batches: String,
    pub max_parallel: String,
    pub max_unavailable: String,
    pub canary: String,
    pub pause_after_canary: Option<String>,
    pub min_healthy: String,
    pub ready_timeout: String,
    pub drain_timeout: String,
    pub health_path: String,
    pub max_failures: String,
    pub auto_rollback: Option<String>,
    pub reason: String,
    pub actor: String,
    /// `preview`, `start` or `edit`.
    pub step: String,
}

fn count(value: &str, what: &str) -> Result<u32, String> {
    let v = value.trim();
    if v.is_empty() {
        return Ok(0);
    }
    v.parse()
        .map_err(|_| format!("{what} {v:?} is not a whole number of nodes (e.g. 2)"))
}

fn duration_ms(value: &str, what: &str) -> Result<u64, String> {
    let v = value.trim();
    if v.is_empty() {
        return Ok(0);
    }
    humantime::parse_duration(v)
        .map(|d: Duration| d.as_millis() as u64)
        .map_err(|e| format!("{what} {v:?} is not a duration ({e}): write e.g. 500ms, 30s or 2m"))
}

impl RolloutForm {
    /// The spec this form asks for, started by `actor` (the session's caller; the
    /// form's actor field is kept beside it when it says something else); what is
    /// wrong with it otherwise. An empty min healthy is `default_min_healthy`, the
    /// controller's default (which the form shows filled in).
    pub fn spec(&self, actor: &str, default_min_healthy: Duration) -> Result<Spec, String> {
        let spec = Spec {
            exe: self.exe.trim().to_string(),
            sha256: self.sha256.trim().to_ascii_lowercase(),
            selector: self.selector.trim().to_string(),
            batches: self.batches.trim().to_string(),
            max_parallel: count(&self.max_parallel, "max parallel")?,
            max_unavailable: self.max_unavailable.trim().to_string(),
            canary: count(&self.canary, "canary")?,
            pause_after_canary: self.pause_after_canary.is_some(),
            min_healthy_ms: if self.min_healthy.trim().is_empty() {
                u64::try_from(default_min_healthy.as_millis()).unwrap_or(u64::MAX)
            } else {
                duration_ms(&self.min_healthy, "min healthy")?
            },
            ready_timeout_ms: duration_ms(&self.ready_timeout, "ready timeout")?,
            drain_timeout_ms: duration_ms(&self.drain_timeout, "drain timeout")?,
            health_path: self.health_path.trim().to_string(),
            max_failures: Spec::max_failures_or_default(&self.max_failures),
            auto_rollback: self.auto_rollback.is_some(),
            reason: self.reason.trim().to_string(),
            actor: actor.to_string(),
            declared_actor: match self.actor.trim() {
                a if a == actor => String::new(),
                a => a.to_string(),
            },
            exclude: self
                .exclude
                .split([',', ' '])
                .map(str::trim)
                .filter(|id| !id.is_empty())
                .map(str::to_string)
                .collect(),
            skip_unreachable: self.skip_unreachable.is_some(),
            left_out: Vec::new(),
        };
        if spec.exe.is_empty() {
            return Err("give the new executable: an absolute path on the nodes".into());
        }
        if spec.pause_after_canary && spec.canary == 0 {
            return Err("pause after canary needs a canary count".into());
        }
        spec.check().map_err(|e| e.0)?;
        Ok(spec)
    }
}

fn text_field(name: &str, label: &str, value: &str, placeholder: &str, help: &str) -> Markup {
    html! {
        p.field {
            label for=(name) { (label) }
            input id=(name) name=(name) type="text" value=(value) placeholder=[(!placeholder.is_empty()).then_some(placeholder)] autocomplete="off" aria-describedby={ (name) "-help" };
            small id={ (name) "-help" } { (help) }
        }
    }
}

fn check_field(name: &str, label: &str, checked: bool, help: &str) -> Markup {
    html! {
        p.field.check {
            input id=(name) name=(name) type="checkbox" value="on" checked[checked];
            label for=(name) { (label) }
            small { " " (help) }
        }
    }
}

/// The form, filled in with `f`; `default_soak` is the controller's default soak,
/// named in the min healthy field's help.
fn form(s: &Session, f: &RolloutForm, default_soak: &str) -> Markup {
    let soak_help = format!(
        "How long a restarted node must keep serving before it counts as healthy \
         (the controller's default: {default_soak}; 0s: no soak)."
    );
    html! {
        form #rollout-form method="post" action="/rollouts/new" {
            input type="hidden" name="csrf" value=(s.csrf);
            fieldset {
                legend { "What and where" }
                (text_field("exe", "Executable", &f.exe, "/opt/app/app-v2", "Absolute path on the nodes, inside their agents' allowed directories."))
                (text_field("sha256", "sha256", &f.sha256, "64 hex digits", "Optional: a node whose copy differs refuses in preflight."))
                (text_field("selector", "Selector", &f.selector, "role=web,zone=a", "Only nodes with these labels (empty: every node)."))
                (text_field("exclude", "Exclude", &f.exclude, "web-3, web-7", "Node ids to leave out even if the selector matches them."))
                (check_field("skip_unreachable", "Skip unreachable", f.skip_unreachable.is_some(), "Leave unreachable nodes out instead of refusing the rollout."))
            }
            fieldset {
                legend { "Batches" }
                (text_field("batches", "Batches", &f.batches, "1,10%,100%", "Cumulative sizes, counts or percentages (empty: one node at a time)."))
                (text_field("max_parallel", "Max parallel", &f.max_parallel, "N", "Batches of N nodes each, instead of batches."))
                (text_field("max_unavailable", "Max unavailable", &f.max_unavailable, "1 or 25%", "How many targets may be down at once."))
                (text_field("canary", "Canary", &f.canary, "N", "Restart this many nodes first, as a batch of their own."))
                (check_field("pause_after_canary", "Pause after the canary", f.pause_after_canary.is_some(), "Wait for Resume after the canary batch."))
            }
            fieldset {
                legend { "Health" }
                (text_field("min_healthy", "Min healthy", &f.min_healthy, "", &soak_help))
                (text_field("health_path", "Health path", &f.health_path, "/healthz", "HTTP path checked on each node's first app port after its restart."))
                (text_field("ready_timeout", "Ready timeout", &f.ready_timeout, "agent's default", "How long a new worker may take to become ready."))
                (text_field("drain_timeout", "Drain timeout", &f.drain_timeout, "agent's default", "How long an old worker may drain before it is killed."))
                (text_field("max_failures", "Max failures", &f.max_failures, "", "Failure budget, a count or a percentage (0, 2 or 10%): more failed nodes stop the rollout. 0: the first failure stops it."))
                (check_field("auto_rollback", "Auto-rollback", f.auto_rollback.is_some(), "When it fails, return the restarted nodes to their previous executable."))
            }
            fieldset {
                legend { "Record" }
                (text_field("reason", "Reason", &f.reason, "v2: faster search", "Kept with the rollout in its history."))
                (text_field("actor", "On behalf of", &f.actor, "optional", "Recorded beside your own name, which the history shows as the actor."))
            }
            p.buttons {
                button #preview type="submit" name="step" value="preview" { "Preview plan" }
            }
        }
    }
}

/// The controller's default soak as the form writes it ("10s").
fn default_soak(d: &Dashboard) -> String {
    humantime::format_duration(d.fleet.default_min_healthy()).to_string()
}

fn shell(d: &Dashboard, s: &Session, flash: Option<&Flash>, body: Markup) -> Markup {
    view::page(
        "New rollout",
        Section::NewRollout,
        Some(s),
        d.sessions.token_required(),
        flash,
        body,
    )
}

async fn form_page(State(d): State<Arc<Dashboard>>, Extension(s): Extension<Session>) -> Response {
    let body = html! {
        h1 { "New rollout" }
        p { "The same options as " code { "fleetctl rollout" } ". Preview shows the plan; nothing is touched until you confirm it." }
        (form(&s, &RolloutForm {
            // The value the rollout gets, not a placeholder: what is shown is used.
            min_healthy: default_soak(&d),
            max_failures: Spec::DEFAULT_MAX_FAILURES.into(),
            ..RolloutForm::default()
        }, &default_soak(&d)))
    };
    shell(&d, &s, None, body).into_response()
}

fn form_again(
    d: &Dashboard,
    s: &Session,
    f: &RolloutForm,
    status: StatusCode,
    error: String,
) -> Response {
    let flash = Flash::Error(error);
    let body = html! { h1 { "New rollout" } (form(s, f, &default_soak(d))) };
    view::with_status(status, shell(d, s, Some(&flash), body))
}

/// The plan of a dry run, with the form's values carried in hidden fields.
fn preview(s: &Session, f: &RolloutForm, plan: &RolloutView) -> Markup {
    let fields = serde_urlencoded::to_string(f)
        .ok()
        .and_then(|q| serde_urlencoded::from_str::<Vec<(String, String)>>(&q).ok())
        .unwrap_or_default();
    html! {
        h1 { "Start this rollout?" }
        p {
            "Roll " span.path { (plan.rollout.spec.exe) } " to " strong { (plan.nodes.len()) " node(s)" }
            " in " (plan.rollout.batch_sizes.len()) " batch(es). Every node accepted the executable in preflight; none has been touched."
        }
        p #plan-soak {
            "Each restarted node must keep serving for "
            strong { (view::millis(plan.rollout.spec.min_healthy_ms)) }
            " before it counts as healthy"
            @if plan.rollout.spec.min_healthy_ms == 0 { " (no soak: READY is enough)" }
            "."
        }
        @if !plan.rollout.spec.left_out.is_empty() {
            ul #left-out {
                @for (reason, ids) in fleet_proto::rules::group_refusals(plan.rollout.spec.left_out.iter().map(|(n, r)| (n.as_str(), r.as_str()))) {
                    li { "Left out: " (fleet_proto::rules::refusal_line(&reason, &ids, 20)) }
                }
            }
        }
        ol #plan {
            @for (b, size) in plan.rollout.batch_sizes.iter().enumerate() {
                li {
                    "Batch " (b + 1) @if plan.rollout.spec.canary > 0 && b == 0 { " (canary)" } ": " (size) " node(s) — "
                    @for (i, n) in plan.nodes.iter().filter(|n| n.batch as usize == b).enumerate() {
                        @if i > 0 { ", " }
                        @if i < 20 { (n.node_id) } @else if i == 20 { "…" }
                    }
                }
            }
        }
        form method="post" action="/rollouts/new" {
            input type="hidden" name="csrf" value=(s.csrf);
            @for (k, v) in &fields {
                @if k != "step" { input type="hidden" name=(k) value=(v); }
            }
            p.buttons {
                button #start type="submit" name="step" value="start" { "Start rollout" }
                " "
                button type="submit" name="step" value="edit" { "Change the options" }
            }
        }
    }
}

async fn submit(
    State(d): State<Arc<Dashboard>>,
    Extension(s): Extension<Session>,
    Form(f): Form<RolloutForm>,
) -> Response {
    let spec = match f.spec(&s.caller.name, d.fleet.default_min_healthy()) {
        Ok(spec) => spec,
        Err(e) => return form_again(&d, &s, &f, StatusCode::BAD_REQUEST, e),
    };
    match f.step.as_str() {
        "start" => match d.fleet.start_rollout(spec, false).await {
            Ok(started) => Redirect::to(&format!(
                "/rollouts/{}?done=started",
                percent_encode(&started.id())
            ))
            .into_response(),
            Err(e) => refused(&d, &s, &f, e),
        },
        "edit" => {
            let body = html! { h1 { "New rollout" } (form(&s, &f, &default_soak(&d))) };
            shell(&d, &s, None, body).into_response()
        }
        _ => match d.fleet.start_rollout(spec, true).await {
            // A plan that preflight would refuse is shown as the refusal, with the form
            // to correct (the plan is for fleetctl --dry-run).
            Ok(plan) => match plan.with_view(would_refuse) {
                Some(e) => refused(&d, &s, &f, e),
                None => shell(&d, &s, None, plan.with_view(|p| preview(&s, &f, p))).into_response(),
            },
            Err(e) => refused(&d, &s, &f, e),
        },
    }
}

/// The refusal a dry run's plan marks, as the real run would return it.
fn would_refuse(plan: &RolloutView) -> Option<RolloutError> {
    let refusals: Vec<(String, String)> = plan
        .nodes
        .iter()
        .filter_map(|n| {
            let why = n
                .reason
                .strip_prefix(fleet_proto::rules::PREFLIGHT_WOULD_REFUSE)?;
            Some((n.node_id.clone(), why.to_string()))
        })
        .collect();
    (!refusals.is_empty()).then_some(RolloutError::Preflight {
        targets: plan.nodes.len(),
        refusals,
    })
}

fn refused(d: &Dashboard, s: &Session, f: &RolloutForm, e: RolloutError) -> Response {
    match e {
        // Not about what the operator typed: no form to correct.
        RolloutError::NotFound(_) | RolloutError::Store(_) => rollout_error_page(d, s, "", &e),
        _ => form_again(d, s, f, rollout_error_status(&e), e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOAK: Duration = Duration::from_secs(10);

    #[test]
    fn an_empty_soak_is_the_controllers_default_and_0s_is_kept() {
        let mut f = RolloutForm {
            exe: "/opt/app/v2".into(),
            ..Default::default()
        };
        let spec = f.spec("alice", SOAK).unwrap();
        assert_eq!(spec.min_healthy_ms, 10_000);
        assert_eq!(spec.max_failures, "0", "the budget applied, not empty");
        f.min_healthy = "0s".into();
        assert_eq!(f.spec("alice", SOAK).unwrap().min_healthy_ms, 0);
    }

    #[test]
    fn exclude_takes_ids_separated_by_commas_or_spaces() {
        let f = RolloutForm {
            exe: "/opt/app/v2".into(),
            exclude: " web-3, web-7 web-9,,".into(),
            skip_unreachable: Some("on".into()),
            ..Default::default()
        };
        let spec = f.spec("alice", SOAK).unwrap();
        assert_eq!(spec.exclude, ["web-3", "web-7", "web-9"]);
        assert!(spec.skip_unreachable);
    }

    #[test]
    fn bad_values_say_what_to_write() {
        let f = RolloutForm {
            exe: "/opt/app/v2".into(),
            min_healthy: "soon".into(),
            ..Default::default()
        };
        assert!(f.spec("alice", SOAK).unwrap_err().contains("30s"));
        let f = RolloutForm {
            exe: "/opt/app/v2".into(),
            canary: "two".into(),
            ..Default::default()
        };
        assert!(f.spec("alice", SOAK).unwrap_err().contains("whole number"));
        let f = RolloutForm {
            exe: "/opt/app/v2".into(),
            min_healthy: "2s".into(),
            batches: "1,100%".into(),
            auto_rollback: Some("on".into()),
            ..Default::default()
        };
        let spec = f.spec("alice", SOAK).unwrap();
        assert_eq!(spec.min_healthy_ms, 2000);
        assert!(spec.auto_rollback);
        assert_eq!(spec.actor, "alice");
        assert_eq!(spec.declared_actor, "");
        let f = RolloutForm {
            actor: "deploy-bot".into(),
            ..f
        };
        assert_eq!(f.spec("alice", SOAK).unwrap().declared_actor, "deploy-bot");
    }
}
