//! A rollout: its spec (checked), its plan (batches of nodes) and the per-node state
//! machine `pending → preflight → restarting → soaking → healthy | failed |
//! rolled-back | skipped`. The engine that drives it is in `rollout/engine.rs`.

pub mod engine;
/// One rollout in memory.
mod handle;

pub use handle::RolloutHandle;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::inventory::{NodeRecord, Selector};

/// A checked rollout spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Spec {
    pub exe: String,
    pub sha256: String,
    pub selector: String,
    pub batches: String,
    pub max_parallel: u32,
    pub max_unavailable: String,
    pub canary: u32,
    pub pause_after_canary: bool,
    pub min_healthy_ms: u64,
    pub ready_timeout_ms: u64,
    pub drain_timeout_ms: u64,
    pub health_path: String,
    pub max_failures: String,
    pub auto_rollback: bool,
    pub reason: String,
    /// Who started it: the authenticated caller's name.
    pub actor: String,
    /// Who the caller said it was (`--actor`, the form's actor field), kept beside
    /// `actor` when it says something else; empty otherwise.
    #[serde(default)]
    pub declared_actor: String,
    /// Node ids never planned, whatever the selector matches (`--exclude`).
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Leave unreachable and stopped targets out instead of failing preflight.
    #[serde(default)]
    pub skip_unreachable: bool,
    /// Set when planned: the matched nodes left out and why (node id, reason).
    #[serde(default)]
    pub left_out: Vec<(String, String)>,
}

use fleet_proto::rules;
/// A count or a percentage of the targets (`"2"`, `"10%"`): the rule fleetctl uses too.
pub use fleet_proto::rules::Amount;

/// A spec that cannot run, with what to fix.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SpecError(pub String);

impl Spec {
    pub fn check(&self) -> Result<(), SpecError> {
        let bad = |m: String| Err(SpecError(m));
        if !self.exe.starts_with('/') {
            return bad(format!(
                "exe {:?} must be an absolute path on the nodes, e.g. /opt/app/app-v2",
                self.exe
            ));
        }
        let hex64 = self.sha256.len() == 64 && self.sha256.chars().all(|c| c.is_ascii_hexdigit());
        if !self.sha256.is_empty() && !hex64 {
            return bad(format!(
                "sha256 {:?} is not 64 hex digits: give the output of sha256sum",
                self.sha256
            ));
        }
        Selector::parse(&self.selector).map_err(SpecError)?;
        if !self.batches.is_empty() && self.max_parallel > 0 {
            return bad("give either batches or max_parallel, not both".into());
        }
        rules::parse_batches(&self.batches).map_err(|e| SpecError(format!("batches: {e}")))?;
        if !self.max_unavailable.is_empty() {
            rules::parse_max_unavailable(&self.max_unavailable)
                .map_err(|e| SpecError(format!("max_unavailable: {e}")))?;
        }
        if !self.max_failures.is_empty() {
            rules::parse_max_failures(&self.max_failures)
                .map_err(|e| SpecError(format!("max_failures: {e}")))?;
        }
        if let Some(bad_id) = self.exclude.iter().find(|id| id.trim().is_empty()) {
            return bad(format!(
                "exclude {bad_id:?}: give a node id, as `fleetctl nodes` lists them"
            ));
        }
        if !self.health_path.is_empty() && !self.health_path.starts_with('/') {
            return bad(format!(
                "health path {:?} must start with '/', e.g. /healthz",
                self.health_path
            ));
        }
        Ok(())
    }

    /// The soak a rollout gets when its request does not give one: long enough to see
    /// a new build that crashes after a few seconds (Nomad's `min_healthy_time` is 10 s
    /// too). `fleet-controller --default-min-healthy` changes it.
    pub const DEFAULT_MIN_HEALTHY: Duration = Duration::from_secs(10);

    /// The failure budget of a rollout that gives none: the first failure stops it.
    pub const DEFAULT_MAX_FAILURES: &str = "0";

    /// A failure budget as given, or the default one when empty: the stored spec says
    /// what the engine applies.
    pub fn max_failures_or_default(given: &str) -> String {
        match given.trim() {
            "" => Spec::DEFAULT_MAX_FAILURES.to_string(),
            m => m.to_string(),
        }
    }

    pub fn min_healthy(&self) -> Duration {
        Duration::from_millis(self.min_healthy_ms)
    }
}

/// Cumulative batch boundaries for `total` targets: `"1,10%,100%"` over 50 nodes gives
/// batches of 1, 4 and 45. A canary batch comes first; the last batch always ends at
/// `total`.
pub fn plan(spec: &Spec, total: usize) -> Vec<usize> {
    let mut sizes = Vec::new();
    let mut done = 0usize;
    if spec.canary > 0 {
        let n = (spec.canary as usize).min(total);
        sizes.push(n);
        done = n;
    }
    let steps = rules::parse_batches(&spec.batches).unwrap_or_default();
    if !steps.is_empty() {
        for step in steps {
            let upto = step.of(total).min(total);
            if upto > done {
                sizes.push(upto - done);
                done = upto;
            }
        }
    } else {
        let per = (spec.max_parallel.max(1)) as usize;
        while done < total {
            let n = per.min(total - done);
            sizes.push(n);
            done += n;
        }
    }
    if done < total {
        sizes.push(total - done);
    }
    sizes.retain(|n| *n > 0);
    sizes
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RolloutState {
    Planned,
    Running,
    Paused,
    Succeeded,
    Failed,
    RolledBack,
    Aborted,
}

impl RolloutState {
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Planned => "planned",
            RolloutState::Running => "running",
            RolloutState::Paused => "paused",
            RolloutState::Succeeded => "succeeded",
            RolloutState::Failed => "failed",
            RolloutState::RolledBack => "rolled-back",
            RolloutState::Aborted => "aborted",
        }
    }

    pub fn finished(self) -> bool {
        matches!(
            self,
            RolloutState::Succeeded
                | RolloutState::Failed
                | RolloutState::RolledBack
                | RolloutState::Aborted
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NodeState {
    Pending,
    Preflight,
    Restarting,
    Soaking,
    Healthy,
    Failed,
    RolledBack,
    Skipped,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Pending => "pending",
            NodeState::Preflight => "preflight",
            NodeState::Restarting => "restarting",
            NodeState::Soaking => "soaking",
            NodeState::Healthy => "healthy",
            NodeState::Failed => "failed",
            NodeState::RolledBack => "rolled-back",
            NodeState::Skipped => "skipped",
        }
    }

    /// Done with this rollout, one way or another.
    pub fn finished(self) -> bool {
        matches!(
            self,
            NodeState::Healthy | NodeState::Failed | NodeState::RolledBack | NodeState::Skipped
        )
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimelineEntry {
    pub unix_ms: u64,
    pub state: NodeState,
    pub message: String,
    pub pid: u32,
}

/// One node's progress in one rollout; persisted on every transition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutNode {
    pub node_id: String,
    pub batch: u32,
    pub state: NodeState,
    pub reason: String,
    pub target_exe: String,
    pub target_sha256: String,
    pub previous_exe: String,
    pub previous_sha256: String,
    /// The node's generation before its restart: after a controller crash, a higher
    /// generation running the target exe proves the restart already happened.
    pub previous_generation: u64,
    pub old_pid: u32,
    pub new_pid: u32,
    pub new_generation: u64,
    pub timeline: Vec<TimelineEntry>,
}

/// What changes when a rollout node moves ([`RolloutNode::version`]).
pub type NodeVersion = (NodeState, usize, u32, u32);

impl RolloutNode {
    /// Changes with every step of the node: a step goes through [`RolloutNode::set`]
    /// (one more timeline entry, with the reason) or sets a pid. A watch compares it
    /// to send only the nodes that moved.
    pub fn version(&self) -> NodeVersion {
        (self.state, self.timeline.len(), self.old_pid, self.new_pid)
    }

    pub fn set(&mut self, state: NodeState, message: impl Into<String>, pid: u32) {
        let message = message.into();
        self.state = state;
        if matches!(
            state,
            NodeState::Failed | NodeState::Skipped | NodeState::RolledBack
        ) {
            self.reason = message.clone();
        }
        self.timeline.push(TimelineEntry {
            unix_ms: crate::now_ms(),
            state,
            message,
            pid,
        });
    }
}

/// A node a rollout is planned over, with what to restart it into: the few fields of
/// its record that planning, preflight and its [`RolloutNode`] read, not the whole
/// record (labels, listeners, admin URL, history). Planning 100,000 nodes from copies
/// of their records raised the controller's resident set by ~110 MB.
#[derive(Debug, Clone)]
pub struct Target {
    pub node_id: String,
    /// Its state as the inventory shows it, and the reason given with it.
    pub state: String,
    pub reason: String,
    pub control_addr: String,
    /// The executable it runs now, and its generation and worker.
    pub exe: String,
    pub sha256: String,
    pub generation: u64,
    pub worker_pid: u32,
    /// What it is to restart into.
    pub target_exe: String,
    pub target_sha256: String,
}

impl Target {
    pub fn new(node: &NodeRecord, target_exe: String, target_sha256: String) -> Self {
        Target {
            node_id: node.node_id.clone(),
            state: node.state.clone(),
            reason: node.reason.clone(),
            control_addr: node.control_addr.clone(),
            exe: node.exe.path.clone(),
            sha256: node.exe.sha256.clone(),
            generation: node.generation,
            worker_pid: node.worker_pid,
            target_exe,
            target_sha256,
        }
    }
}

/// A rollout's header (the nodes are stored row by row).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub id: String,
    pub seq: u64,
    pub spec: Spec,
    pub state: RolloutState,
    pub reason: String,
    pub created_unix_ms: u64,
    pub finished_unix_ms: u64,
    pub batch_sizes: Vec<u32>,
    pub current_batch: u32,
    pub undo_of: String,
    /// Set when the operator asked to pause, resume or abort, for the engine to act on
    /// at the next step.
    pub requested: Option<RolloutState>,
    /// Its nodes by outcome, stored with the header once it has finished, so that a
    /// controller start counts an old rollout without reading its nodes back (absent
    /// while it runs, and in rollouts stored by an older controller).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_counts: Option<Progress>,
}

/// A rollout's header and node counts without its nodes: what a listing shows.
#[derive(Debug, Clone)]
pub struct RolloutSummary {
    pub rollout: Rollout,
    pub progress: Progress,
}

/// A rollout with its nodes, as the API returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutView {
    #[serde(flatten)]
    pub rollout: Rollout,
    pub nodes: Vec<RolloutNode>,
}

/// A rollout's nodes by outcome; only `healthy` counts as done. The dashboard's bar,
/// the API's `RolloutProgress` and the log all read it from here.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub total: usize,
    pub healthy: usize,
    pub failed: usize,
    pub rolled_back: usize,
    pub skipped: usize,
    /// Restarting or soaking.
    pub active: usize,
    /// Not started yet (pending or preflight).
    pub pending: usize,
}

impl Progress {
    pub fn of<'a>(nodes: impl IntoIterator<Item = &'a RolloutNode>) -> Progress {
        let mut p = Progress::default();
        for n in nodes {
            p.total += 1;
            let slot = match n.state {
                NodeState::Healthy => &mut p.healthy,
                NodeState::Failed => &mut p.failed,
                NodeState::RolledBack => &mut p.rolled_back,
                NodeState::Skipped => &mut p.skipped,
                NodeState::Restarting | NodeState::Soaking => &mut p.active,
                NodeState::Pending | NodeState::Preflight => &mut p.pending,
            };
            *slot += 1;
        }
        p
    }

    /// Whole percent of the nodes that are healthy (100 only when all are).
    pub fn healthy_pct(&self) -> usize {
        if self.total == 0 {
            return 0;
        }
        let pct = self.healthy * 100 / self.total;
        if self.healthy < self.total {
            pct.min(99)
        } else {
            100
        }
    }

    /// The parts in the order the bar draws them, with their CSS/data names.
    pub fn parts(&self) -> [(&'static str, usize); 6] {
        [
            ("healthy", self.healthy),
            ("failed", self.failed),
            ("rolled-back", self.rolled_back),
            ("skipped", self.skipped),
            ("active", self.active),
            ("pending", self.pending),
        ]
    }
}

/// A rollout as the HTTP API (`/api/rollouts`) gives it: the stored header, its nodes
/// (left out of a listing without `?nodes=1`), its progress, and its times in RFC 3339
/// beside the `unix_ms` ones.
#[derive(Debug, Serialize)]
pub struct RolloutReport<'a> {
    #[serde(flatten)]
    pub rollout: &'a Rollout,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nodes: Option<&'a [RolloutNode]>,
    pub progress: Progress,
    pub created: String,
    /// `None` while it runs.
    pub finished: Option<String>,
}

impl<'a> RolloutReport<'a> {
    fn new(rollout: &'a Rollout, nodes: Option<&'a [RolloutNode]>, progress: Progress) -> Self {
        RolloutReport {
            rollout,
            nodes,
            progress,
            created: rfc3339(rollout.created_unix_ms),
            finished: (rollout.finished_unix_ms > 0).then(|| rfc3339(rollout.finished_unix_ms)),
        }
    }
}

impl RolloutSummary {
    pub fn report(&self) -> RolloutReport<'_> {
        RolloutReport::new(&self.rollout, None, self.progress)
    }
}

fn rfc3339(unix_ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(unix_ms))
        .to_string()
}

impl RolloutView {
    pub fn progress(&self) -> Progress {
        Progress::of(&self.nodes)
    }

    pub fn report(&self) -> RolloutReport<'_> {
        RolloutReport::new(&self.rollout, Some(&self.nodes), self.progress())
    }

    pub fn counts(&self) -> BTreeMap<&'static str, usize> {
        let mut counts = BTreeMap::new();
        for node in &self.nodes {
            *counts.entry(node.state.as_str()).or_default() += 1;
        }
        counts
    }
}

/// Fixtures for the tests of the rollout's users (the API's messages, the views).
#[cfg(test)]
impl RolloutNode {
    /// A pending node of batch 0 with nothing else set.
    pub(crate) fn for_test(node_id: &str) -> RolloutNode {
        RolloutNode {
            node_id: node_id.into(),
            batch: 0,
            state: NodeState::Pending,
            reason: String::new(),
            target_exe: String::new(),
            target_sha256: String::new(),
            previous_exe: String::new(),
            previous_sha256: String::new(),
            previous_generation: 0,
            old_pid: 0,
            new_pid: 0,
            new_generation: 0,
            timeline: Vec::new(),
        }
    }
}

#[cfg(test)]
impl RolloutView {
    /// Rollout `r1`, running, one batch of these pending nodes.
    pub(crate) fn for_test(node_ids: &[&str]) -> RolloutView {
        RolloutView {
            rollout: Rollout {
                id: "r1".into(),
                seq: 1,
                spec: tests::spec("", 0, 0),
                state: RolloutState::Running,
                reason: String::new(),
                created_unix_ms: 1,
                finished_unix_ms: 0,
                batch_sizes: vec![node_ids.len() as u32],
                current_batch: 0,
                undo_of: String::new(),
                requested: None,
                final_counts: None,
            },
            nodes: node_ids
                .iter()
                .map(|id| RolloutNode::for_test(id))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_follow_fleetctls_rules() {
        // The dashboard's form and the API check specs here, with fleetctl's own rule.
        let err = spec("2,1", 0, 0).check().unwrap_err().to_string();
        assert!(err.contains("larger than the one before"), "{err}");
        assert!(spec("1,10%,100%", 0, 0).check().is_ok());
        let mut s = spec("", 0, 0);
        s.max_unavailable = "0".into();
        assert!(s.check().unwrap_err().to_string().contains("at least 1"));
        s.max_unavailable = "12.5%".into();
        assert!(s.check().is_err(), "whole percentages only, as fleetctl");
    }

    pub(crate) fn spec(batches: &str, canary: u32, max_parallel: u32) -> Spec {
        Spec {
            exe: "/opt/app/v2".into(),
            sha256: String::new(),
            selector: String::new(),
            batches: batches.into(),
            max_parallel,
            max_unavailable: String::new(),
            canary,
            pause_after_canary: false,
            min_healthy_ms: 0,
            ready_timeout_ms: 0,
            drain_timeout_ms: 0,
            health_path: String::new(),
            max_failures: String::new(),
            auto_rollback: false,
            reason: String::new(),
            actor: String::new(),
            declared_actor: String::new(),
            exclude: Vec::new(),
            skip_unreachable: false,
            left_out: Vec::new(),
        }
    }

    #[test]
    fn only_healthy_nodes_count_as_done() {
        let node = |state| RolloutNode {
            state,
            ..RolloutNode::for_test("n")
        };
        use NodeState::*;
        let nodes: Vec<RolloutNode> = [Healthy, Failed, Skipped, Skipped, Soaking, Preflight]
            .into_iter()
            .map(node)
            .collect();
        let p = Progress::of(&nodes);
        assert_eq!(
            (p.total, p.healthy, p.failed, p.skipped, p.active, p.pending),
            (6, 1, 1, 2, 1, 1)
        );
        assert_eq!(p.healthy_pct(), 16);
        assert_eq!(p.parts().iter().map(|(_, n)| n).sum::<usize>(), p.total);
        // 199 of 200 healthy is not "100%".
        let mut many: Vec<RolloutNode> = (0..199).map(|_| node(Healthy)).collect();
        many.push(node(Failed));
        assert_eq!(Progress::of(&many).healthy_pct(), 99);
        many.pop();
        assert_eq!(Progress::of(&many).healthy_pct(), 100);
    }

    #[test]
    fn cumulative_batches() {
        assert_eq!(plan(&spec("1,10%,100%", 0, 0), 50), vec![1, 4, 45]);
        assert_eq!(plan(&spec("1,10%,100%", 0, 0), 5), vec![1, 4]);
        assert_eq!(plan(&spec("50%", 0, 0), 5), vec![3, 2]);
        assert_eq!(plan(&spec("", 0, 2), 5), vec![2, 2, 1]);
        assert_eq!(plan(&spec("", 0, 0), 3), vec![1, 1, 1]);
        assert_eq!(plan(&spec("100%", 2, 0), 5), vec![2, 3]);
        assert!(plan(&spec("", 0, 0), 0).is_empty());
    }

    #[test]
    fn bad_specs_say_what_to_fix() {
        let mut s = spec("1,ten", 0, 0);
        assert!(s.check().unwrap_err().0.contains("10%"));
        s.batches = "1".into();
        s.max_parallel = 2;
        assert!(s.check().unwrap_err().0.contains("not both"));
        s.max_parallel = 0;
        s.exe = "app".into();
        assert!(s.check().unwrap_err().0.contains("absolute"));
    }
}
