//! The audit log: one line, target `fleet::audit`, for every change of state the
//! controller makes or sees, with who made it.
//!
//! Each line has the fields `event` (`node.joined`, `node.restart`, `rollout.started`,
//! …), `actor` (the authenticated caller: a token's name, `bootstrap`, `local`, or
//! `agent`/`controller` for what a node or the controller itself did) and, where the
//! caller said it was someone else (`--actor`), `declared_actor`; then what was acted
//! on. With `--log-format json` each is one JSON object, so `jq 'select(.target ==
//! "fleet::audit")'` is the audit trail. Values a caller gave are written with `{:?}`,
//! control characters escaped, so none can forge a line.

use fleet_proto::v1 as pb;

use crate::rollout::{Rollout, RolloutState};
use crate::tokens::Caller;

/// The actor of what a node reports about itself (its heartbeats).
const AGENT: &str = "agent";
/// The actor of what the controller decides by itself (a missed heartbeat, the end of
/// a rollout).
const CONTROLLER: &str = "controller";

/// A node's first heartbeat (or first status poll, for a static node).
pub fn node_joined(node_id: &str, state: &str, control_addr: &str) {
    tracing::info!(
        target: "fleet::audit",
        event = "node.joined",
        actor = AGENT,
        node = node_id,
        state,
        control_addr,
        "node {node_id} registered ({state:?}, control {control_addr:?})"
    );
}

/// A node missed its heartbeats (or a static node's poll failed).
pub fn node_unreachable(node_id: &str, why: &str) {
    tracing::warn!(
        target: "fleet::audit",
        event = "node.unreachable",
        actor = CONTROLLER,
        node = node_id,
        reason = why,
        "node {node_id} is unreachable: {why}"
    );
}

/// An unreachable node heartbeats again.
pub fn node_back(node_id: &str, state: &str) {
    tracing::info!(
        target: "fleet::audit",
        event = "node.back",
        actor = AGENT,
        node = node_id,
        state,
        "node {node_id} is back ({state:?})"
    );
}

/// `fleetctl forget` or the dashboard's Forget.
pub fn node_forgotten(node_id: &str, was: &str, caller: &Caller) {
    tracing::info!(
        target: "fleet::audit",
        event = "node.forgotten",
        actor = caller.name.as_str(),
        node = node_id,
        state = was,
        "node {node_id} forgotten (it was {was}) by {}",
        caller.name
    );
}

/// A manual restart or shutdown of one node (not a rollout's), once its outcome is
/// known: `action` is `restart` or `shutdown`, `outcome` what the agent answered or
/// why the call failed.
pub fn node_action(
    action: &'static str,
    node_id: &str,
    caller: &Caller,
    reason: &str,
    outcome: &str,
) {
    let event = match action {
        "restart" => "node.restart",
        _ => "node.shutdown",
    };
    tracing::info!(
        target: "fleet::audit",
        event,
        actor = caller.name.as_str(),
        node = node_id,
        reason,
        outcome,
        "{action} of node {node_id} by {}: {outcome} (reason {reason:?})",
        caller.name
    );
}

/// What a restart's answer says, for [`node_action`].
pub fn restart_outcome(result: &Result<pb::RestartResponse, tonic::Status>) -> String {
    match result {
        Ok(r) => format!(
            "{} (generation {})",
            pb::Outcome::try_from(r.outcome)
                .map(|o| o.as_str_name())
                .unwrap_or("unknown outcome"),
            r.generation
        ),
        Err(status) => format!("refused: {}", status.message()),
    }
}

/// What a shutdown's answer says, for [`node_action`].
pub fn shutdown_outcome<T>(result: &Result<T, tonic::Status>) -> String {
    match result {
        Ok(_) => "accepted".to_string(),
        Err(status) => format!("refused: {}", status.message()),
    }
}

/// A rollout (or an undo) was started.
pub fn rollout_started(rollout: &Rollout, nodes: usize) {
    let spec = &rollout.spec;
    tracing::info!(
        target: "fleet::audit",
        event = "rollout.started",
        actor = spec.actor.as_str(),
        declared_actor = spec.declared_actor.as_str(),
        rollout = rollout.id.as_str(),
        undo_of = rollout.undo_of.as_str(),
        nodes,
        exe = spec.exe.as_str(),
        reason = spec.reason.as_str(),
        "rollout {} started by {}: {nodes} node(s) in batches {:?} to {:?} ({:?})",
        rollout.id,
        crate::tokens::actor_label(&spec.actor, &spec.declared_actor),
        rollout.batch_sizes,
        spec.exe,
        spec.reason
    );
}

/// An operator's pause, resume or abort, accepted. `actor` as the caller gave it to
/// [`crate::Fleet::request`] (`ci (as "alice")`).
pub fn rollout_requested(id: &str, wanted: RolloutState, actor: &str) {
    let event = match wanted {
        RolloutState::Paused => "rollout.pause",
        RolloutState::Running => "rollout.resume",
        _ => "rollout.abort",
    };
    tracing::info!(
        target: "fleet::audit",
        event,
        actor,
        rollout = id,
        "rollout {id}: {} requested by {actor}",
        &event["rollout.".len()..]
    );
}

/// A rollout paused itself after its canary batch (`--pause-after-canary`).
pub fn rollout_paused_after_canary(id: &str) {
    tracing::info!(
        target: "fleet::audit",
        event = "rollout.pause",
        actor = CONTROLLER,
        rollout = id,
        "rollout {id}: paused after its canary batch, as its spec asked"
    );
}

/// A rollout ended.
pub fn rollout_finished(rollout: &Rollout, seconds: f64) {
    tracing::info!(
        target: "fleet::audit",
        event = "rollout.finished",
        actor = CONTROLLER,
        rollout = rollout.id.as_str(),
        state = rollout.state.as_str(),
        seconds,
        "rollout {} {} after {seconds:.1}s: {}",
        rollout.id,
        rollout.state.as_str(),
        rollout.reason
    );
}

/// `fleetctl token create` (or a join token); `expires` RFC 3339, empty for never.
pub fn token_created(id: &str, name: &str, kind: &str, caller: &Caller, expires: &str) {
    tracing::info!(
        target: "fleet::audit",
        event = "token.created",
        actor = caller.name.as_str(),
        token = id,
        name,
        kind,
        expires,
        "token {id} ({name:?}, {kind}) created by {}{}",
        caller.describe(),
        if expires.is_empty() {
            String::new()
        } else {
            format!(", expires at {expires}")
        }
    );
}

/// `fleetctl token revoke`.
pub fn token_revoked(id: &str, name: &str, caller: &Caller) {
    tracing::info!(
        target: "fleet::audit",
        event = "token.revoked",
        actor = caller.name.as_str(),
        token = id,
        name,
        "token {id} ({name:?}) revoked by {}",
        caller.name
    );
}

/// A node certificate was issued: `how` is `join` (by join token `by`) or `renew`
/// (by the node's own certificate).
pub fn certificate_issued(
    node_id: &str,
    how: &'static str,
    by: &str,
    until: std::time::SystemTime,
) {
    let until = humantime::format_rfc3339_seconds(until).to_string();
    tracing::info!(
        target: "fleet::audit",
        event = "certificate.issued",
        actor = by,
        node = node_id,
        how,
        until = until.as_str(),
        "certificate for node {node_id} issued ({how}, by {by}), valid until {until}"
    );
}
