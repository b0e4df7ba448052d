//! Driving a rollout: batch after batch, each node through
//! `restarting → soaking → healthy | failed`, every transition persisted before the
//! next step; the failure budget stops it, auto-rollback returns the nodes it moved,
//! an operator can pause, resume or abort it at batch boundaries.
//!
//! Restarting a node twice is what must never happen after a controller crash: a node
//! found in `restarting` is first asked for its status, and if it already runs the
//! target exe at a newer generation than recorded, its restart is taken as done.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_proto::v1 as pb;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;

use super::RolloutHandle;
use super::{Amount, NodeState, RolloutNode, RolloutState, Target};
use crate::agents::CALL_TIMEOUT;
use crate::fleet::Fleet;
use crate::history::{RestartRecord, Via};
use crate::inventory::{NodeRecord, STOPPED};
use crate::{Change, now_ms};

/// How many agents are asked at once during preflight.
const PREFLIGHT_CONCURRENCY: usize = 512;
/// How often a soaking node is looked at.
const SOAK_POLL: Duration = Duration::from_millis(250);

/// Asks every target's agent to validate its exe; returns the refusals.
pub async fn preflight(fleet: &Fleet, targets: &[Target]) -> Vec<(String, String)> {
    let mut refusals = Vec::new();
    let mut pending = targets.iter();
    let mut running = FuturesUnordered::new();
    loop {
        while running.len() < PREFLIGHT_CONCURRENCY {
            let Some(node) = pending.next() else {
                break;
            };
            running.push(async move {
                if node.state == "unreachable" {
                    return Some((
                        node.node_id.clone(),
                        format!("unreachable: {}", node.reason),
                    ));
                }
                if node.state == STOPPED {
                    return Some((
                        node.node_id.clone(),
                        "stopped: its agent was shut down; start it again first".into(),
                    ));
                }
                let request = pb::PreflightRequest {
                    exe: node.target_exe.clone(),
                    sha256: node.target_sha256.clone(),
                };
                let agents = &fleet.agents;
                match agents
                    .preflight(&node.node_id, &node.control_addr, request)
                    .await
                {
                    Ok(_) => None,
                    Err(status) => Some((node.node_id.clone(), describe(&status))),
                }
            });
        }
        match running.next().await {
            Some(Some(refusal)) => refusals.push(refusal),
            Some(None) => {}
            None => break,
        }
    }
    refusals.sort();
    refusals
}

fn describe(status: &tonic::Status) -> String {
    match status.code() {
        tonic::Code::Unavailable => format!("unreachable: {}", status.message()),
        _ => status.message().to_string(),
    }
}

pub async fn run(fleet: Arc<Fleet>, handle: Arc<RolloutHandle>) {
    let id = handle.view.lock().expect("view lock").rollout.id.clone();
    let outcome = drive(&fleet, &handle).await;
    if !fleet.may_drive(&handle) {
        // Deposed mid-way: the new leader resumes the rollout from what was stored.
        tracing::warn!("rollout {id}: no longer the leader; the new leader carries it on");
        return;
    }
    let (state, reason) = outcome;
    let header = {
        let mut view = handle.view.lock().expect("view lock");
        view.rollout.state = state;
        if !reason.is_empty() {
            view.rollout.reason = reason;
        }
        view.rollout.finished_unix_ms = now_ms();
        view.rollout.requested = None;
        view.rollout.final_counts = Some(view.progress());
        view.rollout.clone()
    };
    if let Err(e) = fleet.store.put_rollout(&header).await {
        tracing::error!("rollout {id}: cannot record its end: {e}");
    }
    let _ = fleet.changes.send(Change::Rollout(id.clone()));
    // From its creation, as fleetctl and the dashboard count it: an engine resumed
    // after a controller restart has run only part of that time.
    let took_ms = header
        .finished_unix_ms
        .saturating_sub(header.created_unix_ms);
    crate::audit::rollout_finished(&header, took_ms as f64 / 1000.0);
}

/// Runs the batches; returns the final state and why.
async fn drive(fleet: &Arc<Fleet>, handle: &Arc<RolloutHandle>) -> (RolloutState, String) {
    let (spec, sizes, total) = {
        let view = handle.view.lock().expect("view lock");
        (
            view.rollout.spec.clone(),
            view.rollout.batch_sizes.clone(),
            view.nodes.len(),
        )
    };
    let budget = Amount::parse(&spec.max_failures)
        .map(|a| a.of(total))
        .unwrap_or(0);
    let concurrency = max_unavailable(&spec, total).unwrap_or(usize::MAX);
    let steps = Arc::new(Steps::of(&spec_id(handle), &spec));
    loop {
        if !fleet.may_drive(handle) {
            return (RolloutState::Running, "no longer the leader".into());
        }
        // Operator requests are honoured between batches.
        if let Some(end) = honour_requests(fleet, handle).await {
            return end;
        }
        let (batch, ids) = {
            let view = handle.view.lock().expect("view lock");
            let b = view.rollout.current_batch;
            let ids: Vec<String> = view
                .nodes
                .iter()
                .filter(|n| {
                    n.batch == b
                        && matches!(
                            n.state,
                            NodeState::Pending
                                | NodeState::Preflight
                                | NodeState::Restarting
                                | NodeState::Soaking
                        )
                })
                .map(|n| n.node_id.clone())
                .collect();
            (b, ids)
        };
        if batch as usize >= sizes.len() {
            break;
        }
        tracing::info!(
            "rollout {}: batch {} of {}: {} node(s)",
            spec_id(handle),
            batch + 1,
            sizes.len(),
            ids.len()
        );
        at_most(concurrency, ids, |node_id| {
            move_node(fleet.clone(), handle.clone(), steps.clone(), node_id)
        })
        .await;
        let failures = count(handle, |n| n.state == NodeState::Failed);
        if failures > budget {
            let reason = format!(
                "{failures} node(s) failed, more than the failure budget of {budget}: stopped after batch {}",
                batch + 1
            );
            skip_rest(
                fleet,
                handle,
                "not started: the rollout stopped at its failure budget",
            )
            .await;
            if spec.auto_rollback {
                // Nodes that failed before their new generation served were never
                // changed: with nothing moved, "rolled back" (exit 3) would be untrue.
                let moved = roll_back(fleet, handle, &steps).await;
                if moved == 0 {
                    return (
                        RolloutState::Failed,
                        format!("{reason}; nothing to roll back: no node had been changed"),
                    );
                }
                return (
                    RolloutState::RolledBack,
                    format!("{reason}; rolled back {moved} node(s)"),
                );
            }
            return (RolloutState::Failed, reason);
        }
        let header = {
            let mut view = handle.view.lock().expect("view lock");
            view.rollout.current_batch = batch + 1;
            if batch == 0
                && spec.canary > 0
                && spec.pause_after_canary
                && (batch as usize + 1) < sizes.len()
            {
                view.rollout.state = RolloutState::Paused;
                view.rollout.reason = format!(
                    "paused after the canary batch: check it, then `fleetctl rollout resume {}`",
                    view.rollout.id
                );
            }
            view.rollout.clone()
        };
        if header.state == RolloutState::Paused {
            crate::audit::rollout_paused_after_canary(&header.id);
        }
        if let Err(e) = fleet.store.put_rollout(&header).await {
            return (
                RolloutState::Failed,
                format!("cannot persist progress: {e}"),
            );
        }
        let _ = fleet.changes.send(Change::Rollout(header.id.clone()));
    }
    let failures = count(handle, |n| n.state == NodeState::Failed);
    if failures > 0 {
        (
            RolloutState::Failed,
            format!("{failures} node(s) failed, within the failure budget of {budget}"),
        )
    } else {
        (RolloutState::Succeeded, format!("{total} node(s) healthy"))
    }
}

fn spec_id(handle: &RolloutHandle) -> String {
    handle.view.lock().expect("view lock").rollout.id.clone()
}

fn count(handle: &RolloutHandle, f: impl Fn(&RolloutNode) -> bool) -> usize {
    handle
        .view
        .lock()
        .expect("view lock")
        .nodes
        .iter()
        .filter(|n| f(n))
        .count()
}

/// Waits while paused; returns the end state if the rollout was aborted.
async fn honour_requests(fleet: &Fleet, handle: &RolloutHandle) -> Option<(RolloutState, String)> {
    loop {
        let (state, requested, id) = {
            let mut view = handle.view.lock().expect("view lock");
            let requested = view.rollout.requested.take();
            if requested == Some(RolloutState::Paused) {
                view.rollout.state = RolloutState::Paused;
                view.rollout.reason = format!(
                    "paused: `fleetctl rollout resume {}` continues it",
                    view.rollout.id
                );
            }
            (view.rollout.state, requested, view.rollout.id.clone())
        };
        if requested == Some(RolloutState::Aborted) {
            let reason = handle
                .view
                .lock()
                .expect("view lock")
                .rollout
                .reason
                .clone();
            skip_rest(fleet, handle, &format!("not started: {reason}")).await;
            return Some((RolloutState::Aborted, reason));
        }
        if requested == Some(RolloutState::Paused) {
            let header = handle.view.lock().expect("view lock").rollout.clone();
            let _ = fleet.store.put_rollout(&header).await;
            let _ = fleet.changes.send(Change::Rollout(id.clone()));
        }
        if state != RolloutState::Paused {
            return None;
        }
        handle.wake.notified().await;
    }
}

/// Marks every node not yet started as skipped.
async fn skip_rest(fleet: &Fleet, handle: &RolloutHandle, why: &str) {
    let (id, changed) = {
        let mut view = handle.view.lock().expect("view lock");
        let mut changed = Vec::new();
        for node in view
            .nodes
            .iter_mut()
            .filter(|n| matches!(n.state, NodeState::Pending | NodeState::Preflight))
        {
            node.set(NodeState::Skipped, why, 0);
            changed.push(node.clone());
        }
        (view.rollout.id.clone(), changed)
    };
    let _ = fleet.store.put_rollout_nodes(&id, &changed).await;
    let _ = fleet.changes.send(Change::Rollout(id));
}

/// Applies a change to one node, persists it, and tells the watchers.
async fn update(
    fleet: &Fleet,
    handle: &RolloutHandle,
    node_id: &str,
    f: impl FnOnce(&mut RolloutNode),
) -> RolloutNode {
    match update_stored(fleet, handle, node_id, f).await {
        Ok(node) | Err(node) => node,
    }
}

/// [`update`], saying whether the store took it (`Err`: it did not, e.g. because
/// this controller no longer leads).
async fn update_stored(
    fleet: &Fleet,
    handle: &RolloutHandle,
    node_id: &str,
    f: impl FnOnce(&mut RolloutNode),
) -> Result<RolloutNode, RolloutNode> {
    let (id, node) = {
        let mut view = handle.view.lock().expect("view lock");
        let id = view.rollout.id.clone();
        let node = &mut view.nodes[handle.position(node_id)];
        f(node);
        (id, node.clone())
    };
    if let Err(e) = fleet
        .store
        .put_rollout_nodes(&id, std::slice::from_ref(&node))
        .await
    {
        tracing::error!("rollout {id}: cannot persist node {node_id}: {e}");
        let _ = fleet.changes.send(Change::Rollout(id));
        return Err(node);
    }
    let _ = fleet.changes.send(Change::Rollout(id));
    Ok(node)
}

/// What moving a node (or moving it back) takes from its rollout's spec, made once per
/// rollout and shared by its nodes. (Each node took a copy of the whole spec, whose `exclude` and
/// `left_out` lists grow with the fleet: leaving 10,000 nodes out made every restart
/// copy 30,000 strings.)
#[derive(Debug)]
struct Steps {
    rollout_id: String,
    /// The reason each agent is told.
    reason: String,
    actor: String,
    ready_timeout_ms: u64,
    drain_timeout_ms: u64,
    min_healthy: Duration,
    health_path: String,
}

impl Steps {
    fn of(rollout_id: &str, spec: &super::Spec) -> Self {
        Self {
            rollout_id: rollout_id.to_string(),
            reason: format!("rollout {rollout_id}: {}", spec.reason),
            actor: spec.actor.clone(),
            ready_timeout_ms: spec.ready_timeout_ms,
            drain_timeout_ms: spec.drain_timeout_ms,
            min_healthy: spec.min_healthy(),
            health_path: spec.health_path.clone(),
        }
    }
}

/// Moves one node to its target exe; its end state is recorded in the rollout.
async fn move_node(
    fleet: Arc<Fleet>,
    handle: Arc<RolloutHandle>,
    steps: Arc<Steps>,
    node_id: String,
) {
    if !fleet.may_drive(&handle) {
        return;
    }
    let node = handle.view.lock().expect("view lock").nodes[handle.position(&node_id)].clone();
    let Some(record) = fleet.inventory.get(&node_id) else {
        update(&fleet, &handle, &node_id, |n| {
            n.set(
                NodeState::Failed,
                "node no longer known to the controller",
                0,
            )
        })
        .await;
        return;
    };

    // After a controller crash: was this node's restart already done?
    let mut already = None;
    if matches!(node.state, NodeState::Restarting | NodeState::Soaking) {
        // The restart may still be under way on the agent: wait for it to end first.
        let mut status = fleet
            .agents
            .status(&record.node_id, &record.control_addr, CALL_TIMEOUT)
            .await;
        let deadline = Instant::now() + Duration::from_secs(120);
        while let Ok(s) = &status
            && !s.in_progress.is_empty()
            && Instant::now() < deadline
            && fleet.may_drive(&handle)
        {
            tokio::time::sleep(SOAK_POLL).await;
            status = fleet
                .agents
                .status(&record.node_id, &record.control_addr, CALL_TIMEOUT)
                .await;
        }
        match status {
            Ok(status) => {
                let exe = status.exe.clone().unwrap_or_default();
                if status.generation > node.previous_generation && exe.path == node.target_exe {
                    let pid = status
                        .workers
                        .iter()
                        .find(|w| w.generation == status.generation)
                        .map(|w| w.pid)
                        .unwrap_or(0);
                    already = Some((status.generation, pid));
                }
            }
            Err(status) => {
                update(&fleet, &handle, &node_id, |n| {
                    n.set(
                        NodeState::Failed,
                        format!("unreachable: {}", describe(&status)),
                        0,
                    )
                })
                .await;
                return;
            }
        }
    }

    let mut found = "restart found done after a controller restart";
    // Restarted into the target outside the rollout since it was planned (a manual
    // restart forced past the guard): not restarted again, only soaked.
    if already.is_none()
        && matches!(node.state, NodeState::Pending | NodeState::Preflight)
        && record.generation > node.previous_generation
        && record.exe.path == node.target_exe
        && (node.target_sha256.is_empty() || record.exe.sha256 == node.target_sha256)
    {
        already = Some((record.generation, record.worker_pid));
        found = "already runs the target (restarted outside the rollout since it was planned): not restarted again";
    }
    // Without a soak or a health check the node is healthy as soon as it is soaking:
    // both states go to the store in one write (a restart interrupted before it is
    // found done from the claim, as above).
    let at_once = steps.min_healthy.is_zero() && steps.health_path.is_empty();
    let soaking = |n: &mut RolloutNode, message: String, generation: u64, pid: u32| {
        n.new_generation = generation;
        n.new_pid = pid;
        n.set(NodeState::Soaking, message, pid);
        if at_once {
            n.set(NodeState::Healthy, "healthy", pid);
        }
    };
    let (generation, new_pid) = match already {
        Some(done) => {
            update(&fleet, &handle, &node_id, |n| {
                soaking(n, found.to_string(), done.0, done.1)
            })
            .await;
            done
        }
        None if record.state == "unreachable" => {
            // Not called at all: a node cut off would only take the call's timeouts,
            // and one that answers later must not find a restart it was never told
            // the outcome of.
            update(&fleet, &handle, &node_id, |n| {
                n.set(
                    NodeState::Failed,
                    format!("unreachable: {}", record.reason),
                    0,
                )
            })
            .await;
            return;
        }
        None => {
            let old_pid = record.worker_pid;
            // The claim: the node's restart is stored (by the leader, fenced) before
            // its agent is called, or the agent is not called at all.
            let claimed = update_stored(&fleet, &handle, &node_id, |n| {
                n.previous_generation = record.generation;
                n.old_pid = old_pid;
                if n.previous_exe.is_empty() {
                    n.previous_exe = record.exe.path.clone();
                    n.previous_sha256 = record.exe.sha256.clone();
                }
                n.set(
                    NodeState::Restarting,
                    format!("restarting into {}", n.target_exe),
                    old_pid,
                );
            })
            .await;
            if claimed.is_err() || !fleet.may_drive(&handle) {
                tracing::warn!("node {node_id}: not restarted: its claim was not stored");
                return;
            }
            let request = pb::RestartRequest {
                exe: node.target_exe.clone(),
                sha256: node.target_sha256.clone(),
                reason: steps.reason.clone(),
                ready_timeout_ms: steps.ready_timeout_ms,
                drain_timeout_ms: steps.drain_timeout_ms,
            };
            let sent_at = now_ms();
            let result = fleet.agents.restart(&record, request).await;
            fleet
                .history
                .record(RestartRecord::restart(
                    &node_id,
                    Via::Rollout,
                    &steps.actor,
                    &steps.rollout_id,
                    sent_at,
                    &result,
                ))
                .await;
            match result {
                Err(status) => {
                    update(&fleet, &handle, &node_id, |n| {
                        n.set(
                            NodeState::Failed,
                            format!("restart refused or unreachable: {}", describe(&status)),
                            old_pid,
                        )
                    })
                    .await;
                    return;
                }
                Ok(r) if r.outcome() != pb::Outcome::Succeeded => {
                    let mut reason = format!("new generation failed: {}", r.reason);
                    if let Some(last) = r.stderr_tail.last() {
                        reason.push_str(&format!("; last stderr line: {last}"));
                    }
                    update(&fleet, &handle, &node_id, |n| {
                        n.set(NodeState::Failed, reason, r.new_pid)
                    })
                    .await;
                    return;
                }
                Ok(r) => {
                    let ready_ms = r.timings.map(|t| t.ready_us / 1000).unwrap_or(0);
                    let message = format!(
                        "gen {} pid {} ready in {ready_ms} ms",
                        r.generation, r.new_pid
                    );
                    update(&fleet, &handle, &node_id, |n| {
                        soaking(n, message, r.generation, r.new_pid)
                    })
                    .await;
                    (r.generation, r.new_pid)
                }
            }
        }
    };
    if at_once {
        return;
    }

    // Soak: the new generation must stay the serving one for min_healthy. Without a
    // soak the Restart answer (READY) is the last word, and no status call is made.
    let soak_until = Instant::now() + steps.min_healthy;
    while !steps.min_healthy.is_zero() {
        if !fleet.may_drive(&handle) {
            return;
        }
        match fleet
            .agents
            .status(&record.node_id, &record.control_addr, CALL_TIMEOUT)
            .await
        {
            Ok(status) if status.generation == generation => {}
            Ok(status) => {
                let exe = status.exe.map(|e| e.path).unwrap_or_default();
                update(&fleet, &handle, &node_id, |n| {
                    n.set(
                        NodeState::Failed,
                        format!(
                            "gen {generation} did not stay: the node now serves gen {} ({exe}), state {}",
                            status.generation, status.state
                        ),
                        new_pid,
                    )
                })
                .await;
                return;
            }
            Err(status) => {
                update(&fleet, &handle, &node_id, |n| {
                    n.set(
                        NodeState::Failed,
                        format!("unreachable while soaking: {}", describe(&status)),
                        new_pid,
                    )
                })
                .await;
                return;
            }
        }
        if Instant::now() >= soak_until {
            break;
        }
        tokio::time::sleep(SOAK_POLL.min(soak_until.saturating_duration_since(Instant::now())))
            .await;
    }
    if !fleet.may_drive(&handle) {
        return;
    }
    if !steps.health_path.is_empty()
        && let Err(reason) = health_check(&record, &steps.health_path).await
    {
        update(&fleet, &handle, &node_id, |n| {
            n.set(NodeState::Failed, reason, new_pid)
        })
        .await;
        return;
    }
    update(&fleet, &handle, &node_id, |n| {
        n.set(NodeState::Healthy, "healthy", new_pid)
    })
    .await;
}

/// GET `path` on the node's first plain-HTTP app port; 2xx within 5 s is healthy.
async fn health_check(node: &NodeRecord, path: &str) -> Result<(), String> {
    let Some(listener) = node.listeners.iter().find(|l| !l.tls) else {
        return Err(format!(
            "health check {path}: the node has no plain-HTTP port to check"
        ));
    };
    let addr = listener.addr.clone();
    let check = async {
        let stream = tokio::net::TcpStream::connect(&addr)
            .await
            .map_err(|e| e.to_string())?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let request = http::Request::get(path)
            .header(http::header::HOST, addr.as_str())
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(response.status())
    };
    match tokio::time::timeout(Duration::from_secs(5), check).await {
        Ok(Ok(status)) if status.is_success() => Ok(()),
        Ok(Ok(status)) => Err(format!("health check GET {addr}{path} answered {status}")),
        Ok(Err(e)) => Err(format!("health check GET {addr}{path} failed: {e}")),
        Err(_) => Err(format!(
            "health check GET {addr}{path}: no answer within 5s"
        )),
    }
}

/// Moves every node this rollout restarted back to its previous executable, no more
/// at once than the rollout restarted (its `max_unavailable`, else its largest
/// batch): a rollback must not take down more of the fleet than the rollout did.
/// Returns how many it tried to move (0: no node had been changed).
async fn roll_back(fleet: &Arc<Fleet>, handle: &Arc<RolloutHandle>, steps: &Arc<Steps>) -> usize {
    let (nodes, at_once) = {
        let view = handle.view.lock().expect("view lock");
        // What each node's move back needs, not a copy of its record and timeline
        // (at 100,000 nodes half of them may go back).
        let nodes: Vec<(String, String, String)> = view
            .nodes
            .iter()
            .filter(|n| {
                n.new_generation > 0
                    && matches!(
                        n.state,
                        NodeState::Healthy | NodeState::Soaking | NodeState::Failed
                    )
            })
            .map(|n| (n.node_id.clone(), n.previous_exe.clone(), n.reason.clone()))
            .collect();
        let largest = view.rollout.batch_sizes.iter().copied().max().unwrap_or(1) as usize;
        let at_once = max_unavailable(&view.rollout.spec, view.nodes.len()).unwrap_or(largest);
        (nodes, at_once)
    };
    let moved = nodes.len();
    at_most(at_once, nodes, |node| {
        move_back(fleet.clone(), handle.clone(), steps.clone(), node)
    })
    .await;
    moved
}

/// The rollout's `max_unavailable` as a number of its `total` nodes (1 at least);
/// None when it gives none.
fn max_unavailable(spec: &super::Spec, total: usize) -> Option<usize> {
    match Amount::parse(&spec.max_unavailable) {
        Ok(a) if !spec.max_unavailable.is_empty() => Some(a.of(total).max(1)),
        _ => None,
    }
}

/// Runs `work` on every item, no more than `limit` at once (1 at least), each as a
/// task of its own: a batch's nodes progress on every worker thread, and each wakes
/// only its own task (in one `FuturesUnordered` every wake of 10,000 nodes went
/// through one shared queue, ~4 % of a 100,000-node rollout's CPU). Dropping the
/// future (the engine stopped) aborts the tasks, as it dropped the futures before.
async fn at_most<T, F: Future<Output = ()> + Send + 'static>(
    limit: usize,
    items: Vec<T>,
    mut work: impl FnMut(T) -> F,
) {
    let mut pending = items.into_iter();
    let mut running = tokio::task::JoinSet::new();
    loop {
        while running.len() < limit.max(1) {
            let Some(item) = pending.next() else { break };
            running.spawn(work(item));
        }
        match running.join_next().await {
            None => break,
            Some(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Some(_) => {}
        }
    }
}

/// Restarts one node of the rollout (id, previous exe, its reason so far) back into
/// its previous executable and records how that went.
async fn move_back(
    fleet: Arc<Fleet>,
    handle: Arc<RolloutHandle>,
    steps: Arc<Steps>,
    (node_id, previous_exe, was): (String, String, String),
) {
    let Some(record) = fleet.inventory.get(&node_id) else {
        return;
    };
    let claimed = match fleet.may_drive(&handle) {
        true => fleet.claim().await,
        false => Err("this controller no longer leads".into()),
    };
    if let Err(why) = claimed {
        tracing::warn!("node {}: not rolled back: {why}", node_id);
        return;
    }
    let request = pb::RestartRequest {
        exe: previous_exe.clone(),
        sha256: String::new(),
        reason: format!("rollback of rollout {}", steps.rollout_id),
        ..Default::default()
    };
    let sent_at = now_ms();
    let result = fleet.agents.restart(&record, request).await;
    fleet
        .history
        .record(RestartRecord::restart(
            &node_id,
            Via::Rollback,
            &steps.actor,
            &steps.rollout_id,
            sent_at,
            &result,
        ))
        .await;
    match result {
        Ok(r) if r.outcome() == pb::Outcome::Succeeded => {
            update(&fleet, &handle, &node_id, |n| {
                let why = if was.is_empty() {
                    String::new()
                } else {
                    format!(" (was: {was})")
                };
                n.set(
                    NodeState::RolledBack,
                    format!(
                        "rolled back to {} (gen {} pid {}){why}",
                        previous_exe, r.generation, r.new_pid
                    ),
                    r.new_pid,
                )
            })
            .await;
        }
        Ok(r) => {
            update(&fleet, &handle, &node_id, |n| {
                n.set(
                    NodeState::Failed,
                    format!("rollback failed: {}", r.reason),
                    0,
                )
            })
            .await;
        }
        Err(status) => {
            update(&fleet, &handle, &node_id, |n| {
                n.set(
                    NodeState::Failed,
                    format!("rollback failed: {}", describe(&status)),
                    0,
                )
            })
            .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size_of_future<F, Fut>(_: F) -> usize
    where
        F: Fn(Arc<Fleet>, Arc<RolloutHandle>, Arc<Steps>, String) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    /// A batch holds a node's future per node at once (10,000 of them in a
    /// 100,000-node rollout in 10 % batches): with the dialled calls' tonic futures
    /// inline it was 6,040 bytes, 3,040 with them boxed.
    #[test]
    fn a_nodes_future_stays_small() {
        let size = size_of_future(move_node);
        assert!(size <= 4096, "move_node's future is {size} bytes");
    }
}
