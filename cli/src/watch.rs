//! Following a rollout: the controller's `WatchRollout` stream sends the whole rollout,
//! then after every change the rollout with the nodes that changed; `Merged` puts them
//! together, `Progress` turns consecutive snapshots into lines (a batch starts, a node
//! changes phase, the rollout pauses), and the final state gives the exit code.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use anyhow::Result;
use fleet_proto::v1::{Rollout, RolloutNode};

use crate::client::{CallError, Controller, is_unreachable};
use crate::exit::{Exit, Failure};
use crate::output::{self, batches, duration, nodes_count, pids, started};

/// How long to keep trying when the connection to the controller drops mid-watch (a
/// restarted controller resumes its rollouts, so the watch can go on).
const RECONNECT_FOR: Duration = Duration::from_secs(30);
const RECONNECT_EVERY: Duration = Duration::from_secs(1);

/// The states a rollout ends in; the stream ends after one of them.
pub fn finished(state: &str) -> bool {
    matches!(state, "succeeded" | "failed" | "rolled-back" | "aborted")
}

/// The exit code for a rollout that ended in `state`.
pub fn exit_for(state: &str) -> Exit {
    match state {
        "succeeded" => Exit::Success,
        "rolled-back" => Exit::RolledBack,
        _ => Exit::Failed,
    }
}

/// The width of the phase column: the longest node state, "rolled-back".
const PHASE_WIDTH: usize = 11;

/// The rollout as the watch's messages add up: a message with every node replaces
/// it, one with `nodes_changed_only` replaces the header and the nodes it carries.
#[derive(Debug, Default)]
pub struct Merged {
    rollout: Rollout,
    /// Node id -> position in `rollout.nodes`.
    index: HashMap<String, usize>,
}

impl Merged {
    /// Takes the next message; returns the whole rollout as it now stands.
    pub fn apply(&mut self, mut message: Rollout) -> &Rollout {
        if !message.nodes_changed_only || message.id != self.rollout.id {
            self.index = message
                .nodes
                .iter()
                .enumerate()
                .map(|(i, n)| (n.node_id.clone(), i))
                .collect();
            self.rollout = message;
            return &self.rollout;
        }
        let changed = std::mem::take(&mut message.nodes);
        message.nodes = std::mem::take(&mut self.rollout.nodes);
        message.nodes_changed_only = false;
        for node in changed {
            match self.index.get(&node.node_id) {
                Some(&i) => message.nodes[i] = node,
                None => {
                    self.index.insert(node.node_id.clone(), message.nodes.len());
                    message.nodes.push(node);
                }
            }
        }
        self.rollout = message;
        &self.rollout
    }

    pub fn into_rollout(self) -> Rollout {
        self.rollout
    }
}

/// What has been printed so far, to print only what changed.
#[derive(Debug, Default)]
pub struct Progress {
    /// Each node's state as last printed; a node not here is "pending".
    nodes: HashMap<String, String>,
    /// Batches (wire numbers) whose start was printed.
    batches: BTreeSet<u32>,
    /// The rollout's state as last seen; `None` before the first snapshot.
    state: Option<String>,
    /// A line about the rollout entering a final state, held back: if the stream ends
    /// here the summary says it better; if not (failed, then rolled back) it is printed.
    held: Option<String>,
}

impl Progress {
    /// The lines to print for the next snapshot.
    pub fn update(&mut self, r: &Rollout) -> Vec<String> {
        let mut lines: Vec<String> = self.held.take().into_iter().collect();
        if self.state.is_none() {
            lines.push(header(r));
        }
        let resumed = self.state.as_deref() == Some("paused") && r.state == "running";
        if resumed {
            // Before the nodes the resumed rollout has started since.
            lines.push(format!("rollout {} resumed", r.id));
        }
        let width = r.nodes.iter().map(|n| n.node_id.len()).max().unwrap_or(0);
        let batches = batches(r);
        for batch in &batches {
            if !self.batches.contains(&batch.value) && batch.nodes.iter().any(|n| started(&n.state))
            {
                self.batches.insert(batch.value);
                let ids: Vec<&str> = batch.nodes.iter().map(|n| n.node_id.as_str()).collect();
                lines.push(format!(
                    "batch {}/{} started: {}",
                    batch.number,
                    batches.len(),
                    ids.join(", ")
                ));
            }
            for node in &batch.nodes {
                let before = self
                    .nodes
                    .get(&node.node_id)
                    .map_or("pending", String::as_str);
                if before != node.state {
                    lines.push(node_line(node, width));
                    self.nodes.insert(node.node_id.clone(), node.state.clone());
                }
            }
        }
        if self.state.as_deref() != Some(r.state.as_str()) {
            let first = self.state.is_none();
            let reason = if r.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", r.reason)
            };
            match r.state.as_str() {
                "paused" if r.reason.contains("fleetctl rollout resume") => {
                    lines.push(format!("rollout {} paused{reason}; still watching", r.id));
                }
                "paused" => lines.push(format!(
                    "rollout {id} paused{reason}; resume it with `fleetctl rollout resume {id}` \
                     (or stop it with `fleetctl rollout abort {id}`); still watching",
                    id = r.id
                )),
                _ if first || resumed => {}
                state if finished(state) => {
                    self.held = Some(format!("rollout {} {state}{reason}", r.id));
                }
                state => lines.push(format!("rollout {} {state}{reason}", r.id)),
            }
            self.state = Some(r.state.clone());
        }
        lines
    }
}

/// The first line: which rollout, to what, over how many nodes and batches.
pub fn header(r: &Rollout) -> String {
    let batches = batches(r);
    let sizes: Vec<String> = batches.iter().map(|b| b.nodes.len().to_string()).collect();
    let actor = r.spec.as_ref().map_or(String::new(), |s| {
        output::actor(&s.actor, &s.declared_actor)
    });
    let mut line = format!(
        "rollout {} {}: {} to {} in {} {} ({})",
        r.id,
        r.state,
        output::target(r),
        nodes_count(r.nodes.len()),
        batches.len(),
        if batches.len() == 1 {
            "batch"
        } else {
            "batches"
        },
        sizes.join(", "),
    );
    if !actor.is_empty() {
        line.push_str(&format!(", by {actor}"));
    }
    line
}

/// "  n3  failed       pid 4100 -> 4400: exited with status 1 before READY"
pub fn node_line(n: &RolloutNode, width: usize) -> String {
    let mut detail = pids(n.old_pid, n.new_pid);
    if !n.reason.is_empty() {
        if detail.is_empty() {
            detail = n.reason.clone();
        } else {
            detail = format!("{detail}: {}", n.reason);
        }
    }
    let line = format!(
        "  {:<width$}  {:<PHASE_WIDTH$}  {detail}",
        n.node_id, n.state
    );
    line.trim_end().to_string()
}

/// The last line: "rollout r3 rolled-back after 12s: 1 node failed (2 failed, 1 rolled-back)".
pub fn summary(r: &Rollout) -> String {
    let mut line = format!("rollout {} {}", r.id, r.state);
    if r.finished_unix_ms > r.created_unix_ms && r.created_unix_ms > 0 {
        line.push_str(&format!(
            " after {}",
            duration(r.finished_unix_ms - r.created_unix_ms)
        ));
    }
    if !r.reason.is_empty() {
        line.push_str(&format!(": {}", r.reason));
    }
    line.push_str(&format!(" ({})", output::state_counts(r)));
    line
}

/// Follows rollout `id` until it ends, printing progress (to stderr when stdout is
/// for JSON). Returns the exit code of its final state and the rollout as it ended.
///
/// A stream that breaks is opened again, on the next controller first (any controller
/// serves a watch): for up to [`RECONNECT_FOR`], the first time at once and then every
/// [`RECONNECT_EVERY`]. A refusal ends the watch.
pub async fn follow(
    controller: &mut Controller,
    id: &str,
    to_stderr: bool,
) -> Result<(Exit, Option<Rollout>)> {
    let print = |line: &str| -> Result<()> {
        if to_stderr {
            eprintln!("{line}");
            Ok(())
        } else {
            output::emit(line)
        }
    };
    let mut progress = Progress::default();
    let mut merged = Merged::default();
    let mut id = id.to_string();
    // Whether a message came: the rollout is known to exist.
    let mut seen = false;
    // Since when the watch is lost.
    let mut lost: Option<Instant> = None;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);

    loop {
        let opened = tokio::select! {
            opened = controller.watch_rollout(id.clone()) => opened,
            _ = &mut ctrl_c => return interrupted(&id),
        };
        // Why the watch is lost this time, once the rollout is known to exist.
        let why = match opened {
            Ok(mut stream) => loop {
                let message = tokio::select! {
                    message = stream.message() => message,
                    _ = &mut ctrl_c => return interrupted(&id),
                };
                match message {
                    Ok(Some(message)) => {
                        let r = merged.apply(message);
                        if lost.take().is_some() {
                            eprintln!("reconnected to the controller at {}", controller.url());
                        }
                        for line in progress.update(r) {
                            print(&line)?;
                        }
                        // "latest" could name another rollout after a reconnect.
                        id.clone_from(&r.id);
                        seen = true;
                    }
                    Ok(None) => {
                        let last = seen.then(|| std::mem::take(&mut merged).into_rollout());
                        return match last {
                            Some(r) if finished(&r.state) => {
                                print(&summary(&r))?;
                                if r.state != "succeeded" {
                                    print(&format!(
                                        "each node's reason and timeline: fleetctl rollout status {} --timeline",
                                        r.id
                                    ))?;
                                }
                                Ok((exit_for(&r.state), Some(r)))
                            }
                            Some(r) => Err(Failure::new(
                                Exit::Failed,
                                format!(
                                    "the controller ended the watch while rollout {id} is {}: \
                                     follow it with `fleetctl rollout status {id} --watch`",
                                    r.state
                                ),
                            )
                            .into()),
                            None => Err(Failure::new(
                                Exit::Failed,
                                format!("the controller sent nothing about rollout {id}"),
                            )
                            .into()),
                        };
                    }
                    Err(status) if is_unreachable(&status) && seen => {
                        let why = format!(
                            "lost the controller at {} ({})",
                            controller.url(),
                            status.message()
                        );
                        controller.lost();
                        break why;
                    }
                    Err(status) => return Err(controller.error(&status)),
                }
            },
            Err(CallError::Unreachable(e)) if seen => format!("{e:#}"),
            Err(e) => return Err(e.into()),
        };
        // The first retry is at once (the connection may just have been idle-closed),
        // later ones a second apart.
        let first_retry = lost.is_none();
        let since = *lost.get_or_insert_with(|| {
            eprintln!(
                "{why}; reconnecting for up to {}",
                humantime::format_duration(RECONNECT_FOR)
            );
            Instant::now()
        });
        if since.elapsed() >= RECONNECT_FOR {
            return Err(Failure::new(
                Exit::Failed,
                format!(
                    "stopped watching rollout {id}: {why}. The rollout goes on without this \
                     watch: follow it with `fleetctl rollout status {id} --watch`"
                ),
            )
            .into());
        }
        if !first_retry {
            tokio::select! {
                () = tokio::time::sleep(RECONNECT_EVERY) => {}
                _ = &mut ctrl_c => return interrupted(&id),
            }
        }
    }
}

fn interrupted(id: &str) -> Result<(Exit, Option<Rollout>)> {
    eprintln!(
        "stopped watching; rollout {id} goes on: follow it with `fleetctl rollout status {id} --watch`, \
         stop it with `fleetctl rollout abort {id}`"
    );
    Ok((Exit::Interrupted, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, batch: u32, state: &str) -> RolloutNode {
        RolloutNode {
            node_id: id.into(),
            batch,
            state: state.into(),
            ..Default::default()
        }
    }

    fn rollout(state: &str, nodes: Vec<RolloutNode>) -> Rollout {
        Rollout {
            id: "r3".into(),
            state: state.into(),
            spec: Some(fleet_proto::v1::RolloutSpec {
                exe: "/opt/app-v2".into(),
                actor: "alice".into(),
                ..Default::default()
            }),
            created_unix_ms: 10_000,
            nodes,
            ..Default::default()
        }
    }

    #[test]
    fn partial_messages_merge_into_the_whole_rollout() {
        let mut merged = Merged::default();
        let first = rollout(
            "running",
            vec![node("n1", 0, "pending"), node("n2", 1, "pending")],
        );
        assert_eq!(merged.apply(first.clone()), &first);

        // Only n2 moved; the header comes with every message.
        let partial = Rollout {
            nodes_changed_only: true,
            current_batch: 1,
            ..rollout("running", vec![node("n2", 1, "restarting")])
        };
        let now = merged.apply(partial);
        let states: Vec<(&str, &str)> = now
            .nodes
            .iter()
            .map(|n| (n.node_id.as_str(), n.state.as_str()))
            .collect();
        assert_eq!(states, [("n1", "pending"), ("n2", "restarting")]);
        assert_eq!(now.current_batch, 1);
        assert!(!now.nodes_changed_only, "what comes out is whole");

        // A whole message (after a reconnect) replaces everything.
        let whole = rollout("succeeded", vec![node("n1", 0, "healthy")]);
        assert_eq!(merged.apply(whole.clone()), &whole);
        // A partial message about another rollout ("latest" moved on) is not merged
        // into this one.
        let other = Rollout {
            id: "r4".into(),
            nodes_changed_only: true,
            ..rollout("running", vec![node("n9", 0, "pending")])
        };
        assert_eq!(merged.apply(other).nodes.len(), 1);
    }

    #[test]
    fn a_rollout_reads_batch_by_batch() {
        let mut p = Progress::default();
        let mut r = rollout(
            "running",
            vec![
                node("n1", 0, "pending"),
                node("n2", 1, "pending"),
                node("n3", 1, "pending"),
            ],
        );
        assert_eq!(
            p.update(&r),
            ["rollout r3 running: /opt/app-v2 to 3 nodes in 2 batches (1, 2), by alice"]
        );

        r.nodes[0].state = "restarting".into();
        r.nodes[0].old_pid = 4100;
        assert_eq!(
            p.update(&r),
            ["batch 1/2 started: n1", "  n1  restarting   pid 4100"]
        );
        // Nothing changed: nothing printed.
        assert!(p.update(&r).is_empty());

        r.nodes[0].state = "healthy".into();
        r.nodes[0].new_pid = 4321;
        r.nodes[1].state = "restarting".into();
        r.nodes[2].state = "restarting".into();
        assert_eq!(
            p.update(&r),
            [
                "  n1  healthy      pid 4100 -> 4321",
                "batch 2/2 started: n2, n3",
                "  n2  restarting",
                "  n3  restarting",
            ]
        );

        r.nodes[1].state = "healthy".into();
        r.nodes[2].state = "healthy".into();
        r.state = "succeeded".into();
        r.finished_unix_ms = 51_000;
        assert_eq!(p.update(&r), ["  n2  healthy", "  n3  healthy"]);
        assert_eq!(summary(&r), "rollout r3 succeeded after 41s (3 healthy)");
        assert_eq!(exit_for(&r.state), Exit::Success);
    }

    #[test]
    fn a_failure_shows_the_nodes_reason_and_a_rollback_exits_3() {
        let mut p = Progress::default();
        let mut r = rollout(
            "running",
            vec![
                node("web-1", 0, "restarting"),
                node("web-2", 0, "restarting"),
            ],
        );
        p.update(&r);
        r.nodes[0].state = "failed".into();
        r.nodes[0].old_pid = 4100;
        r.nodes[0].new_pid = 4400;
        r.nodes[0].reason = "exited with status 1 before READY".into();
        r.state = "failed".into();
        r.reason = "failure budget (0) spent".into();
        assert_eq!(
            p.update(&r),
            ["  web-1  failed       pid 4100 -> 4400: exited with status 1 before READY"]
        );
        // Failed, then rolled back: the held "failed" line comes out first.
        r.nodes[1].state = "rolled-back".into();
        r.state = "rolled-back".into();
        r.finished_unix_ms = 14_500;
        assert_eq!(
            p.update(&r),
            [
                "rollout r3 failed: failure budget (0) spent",
                "  web-2  rolled-back",
            ]
        );
        assert_eq!(
            summary(&r),
            "rollout r3 rolled-back after 4.5s: failure budget (0) spent (1 failed, 1 rolled-back)"
        );
        assert_eq!(exit_for("rolled-back"), Exit::RolledBack);
        assert_eq!(exit_for("failed"), Exit::Failed);
        assert_eq!(exit_for("aborted"), Exit::Failed);
    }

    #[test]
    fn a_pause_says_how_to_resume_and_the_watch_goes_on() {
        let mut p = Progress::default();
        let mut r = rollout(
            "running",
            vec![node("n1", 0, "healthy"), node("n2", 1, "pending")],
        );
        p.update(&r);
        r.state = "paused".into();
        r.reason = "after the canary".into();
        let lines = p.update(&r);
        assert_eq!(lines.len(), 1);
        assert!(
            lines[0].starts_with(
                "rollout r3 paused: after the canary; resume it with `fleetctl rollout resume r3`"
            ),
            "{lines:?}"
        );
        r.state = "running".into();
        r.nodes[1].state = "restarting".into();
        assert_eq!(
            p.update(&r),
            [
                "rollout r3 resumed",
                "batch 2/2 started: n2",
                "  n2  restarting",
            ]
        );
        assert!(!finished("paused"));

        // A reason that already says how to resume is not repeated.
        let mut p = Progress::default();
        p.update(&r);
        r.state = "paused".into();
        r.reason = "paused after the canary: `fleetctl rollout resume r3`".into();
        assert_eq!(
            p.update(&r),
            [
                "rollout r3 paused: paused after the canary: `fleetctl rollout resume r3`; still watching"
            ]
        );
    }

    #[test]
    fn watching_midway_shows_where_the_rollout_stands() {
        let mut p = Progress::default();
        let r = rollout(
            "paused",
            vec![node("n1", 5, "healthy"), node("n2", 6, "pending")],
        );
        let lines = p.update(&r);
        assert_eq!(
            lines[0],
            "rollout r3 paused: /opt/app-v2 to 2 nodes in 2 batches (1, 1), by alice"
        );
        assert_eq!(lines[1], "batch 1/2 started: n1");
        assert_eq!(lines[2], "  n1  healthy");
        assert!(lines[3].contains("fleetctl rollout resume r3"));
    }
}
