//! Each node's restart history: every restart or shutdown the controller asked for
//! (a rollout step, a rollback, or a manual action through gRPC or the dashboard), with
//! who asked, the outcome and the agent's timings. Kept in the store, the last
//! [`KEEP_PER_NODE`] a node.
//!
//! The handoff time (trigger → READY) is in the agent's Restart answer; the old
//! worker's drain ends later, so it comes with a later heartbeat
//! (`StatusResponse.recent_restarts`) and is filled in then.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use fleet_proto::v1 as pb;
use serde::{Deserialize, Serialize};

use crate::store::{Store, StoreError};

/// Restarts kept per node. Enough for a useful distribution of handoff and drain
/// times (the node page's chart) and weeks of ordinary history, while 10,000 nodes
/// stay within ~150 MB of store (a record is ~300 bytes of JSON).
pub const KEEP_PER_NODE: usize = 50;

/// Where a restart came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Grpc,
    Dashboard,
    Rollout,
    Rollback,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Grpc => "grpc",
            Via::Dashboard => "dashboard",
            Via::Rollout => "rollout",
            Via::Rollback => "rollback",
        }
    }
}

/// One restart (or shutdown) of one node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RestartRecord {
    pub node_id: String,
    /// When the controller sent the request.
    pub at_unix_ms: u64,
    /// `restart` or `shutdown`.
    pub kind: String,
    /// The rollout it was a step of; empty for a manual action.
    pub rollout_id: String,
    /// The authenticated caller (a rollout's actor for its steps).
    pub actor: String,
    pub via: String,
    /// `succeeded`, `failed`, `refused` (nothing started) or `accepted` (a shutdown).
    pub outcome: String,
    pub reason: String,
    pub generation: u64,
    pub old_pid: u32,
    pub new_pid: u32,
    pub exe: String,
    /// Trigger → READY as the agent measured it (0: nothing became ready).
    pub handoff_us: u64,
    /// The old worker's drain (0: not reported yet, or nothing to drain).
    pub drain_us: u64,
}

impl RestartRecord {
    /// A restart request and what came of it.
    pub fn restart(
        node_id: &str,
        via: Via,
        actor: &str,
        rollout_id: &str,
        at_unix_ms: u64,
        result: &Result<pb::RestartResponse, tonic::Status>,
    ) -> Self {
        let mut r = Self {
            node_id: node_id.to_string(),
            at_unix_ms,
            kind: "restart".into(),
            rollout_id: rollout_id.to_string(),
            actor: actor.to_string(),
            via: via.as_str().into(),
            ..Default::default()
        };
        match result {
            Ok(resp) => {
                let ok = resp.outcome == pb::Outcome::Succeeded as i32;
                r.outcome = if ok { "succeeded" } else { "failed" }.into();
                r.reason = resp.reason.clone();
                r.generation = resp.generation;
                r.old_pid = resp.old_pid;
                r.new_pid = resp.new_pid;
                r.exe = resp
                    .exe
                    .as_ref()
                    .map(|e| e.path.clone())
                    .unwrap_or_default();
                r.handoff_us = if ok {
                    resp.timings.as_ref().map(|t| t.ready_us).unwrap_or(0)
                } else {
                    0
                };
            }
            Err(status) => {
                r.outcome = "refused".into();
                r.reason = status.message().to_string();
            }
        }
        r
    }

    /// A shutdown request and the agent's answer.
    pub fn shutdown(
        node_id: &str,
        via: Via,
        actor: &str,
        at_unix_ms: u64,
        result: &Result<pb::ShutdownResponse, tonic::Status>,
    ) -> Self {
        let (outcome, reason) = match result {
            Ok(_) => ("accepted", String::new()),
            Err(s) => ("refused", s.message().to_string()),
        };
        Self {
            node_id: node_id.to_string(),
            at_unix_ms,
            kind: "shutdown".into(),
            actor: actor.to_string(),
            via: via.as_str().into(),
            outcome: outcome.into(),
            reason,
            ..Default::default()
        }
    }

    pub fn to_message(&self) -> pb::NodeRestart {
        pb::NodeRestart {
            at_unix_ms: self.at_unix_ms,
            kind: self.kind.clone(),
            rollout_id: self.rollout_id.clone(),
            actor: self.actor.clone(),
            outcome: self.outcome.clone(),
            reason: self.reason.clone(),
            generation: self.generation,
            old_pid: self.old_pid,
            new_pid: self.new_pid,
            exe: self.exe.clone(),
            handoff_us: self.handoff_us,
            drain_us: self.drain_us,
            via: self.via.clone(),
        }
    }
}

/// Records restarts and fills in drain times as heartbeats report them.
#[derive(Debug)]
pub struct History {
    store: Arc<dyn Store>,
    /// What each node's last status said (memory only: the next heartbeat after a
    /// controller restart brings it back). One entry per node: one copy of its id.
    heard: Mutex<HashMap<String, Heard>>,
}

/// What [`History`] keeps of one node's last status.
#[derive(Debug, Default)]
struct Heard {
    /// Its worker generations.
    workers: Vec<pb::Worker>,
    /// Drain times (old pid, µs): a restart whose answer arrives after a heartbeat
    /// already reported its drain takes it from here.
    drains: Vec<(u32, u64)>,
    /// Old worker pids whose drain time was already written (the last 32), so that
    /// every heartbeat does not write it again.
    forwarded: VecDeque<u32>,
}

impl History {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            heard: Mutex::new(HashMap::new()),
        }
    }

    /// Writes `record`; returns once it is durable. A store error is logged, not
    /// returned: the restart itself has happened either way.
    pub async fn record(&self, mut record: RestartRecord) {
        if record.old_pid != 0 && record.drain_us == 0 {
            let heard = self.heard.lock().expect("history lock");
            if let Some(&(_, us)) = heard
                .get(&record.node_id)
                .and_then(|h| h.drains.iter().find(|(pid, _)| *pid == record.old_pid))
            {
                record.drain_us = us;
            }
        }
        // A rollout's successful restarts are logged at debug: the rollout logs its
        // batches and end, and a line per node would be 100,000 lines for a large
        // fleet (each one is in the history all the same). Failures stay at info.
        if record.rollout_id.is_empty() {
            tracing::info!(
                "node {}: {} {} by {} via {}",
                record.node_id,
                record.kind,
                record.outcome,
                record.actor,
                record.via,
            );
        } else if record.outcome != "succeeded" {
            tracing::info!(
                "node {}: {} {} by {} via {} (rollout {}): {}",
                record.node_id,
                record.kind,
                record.outcome,
                record.actor,
                record.via,
                record.rollout_id,
                record.reason
            );
        } else {
            tracing::debug!(
                "node {}: {} {} by {} via {} (rollout {})",
                record.node_id,
                record.kind,
                record.outcome,
                record.actor,
                record.via,
                record.rollout_id
            );
        }
        if let Err(e) = self.store.put_restart(&record).await {
            tracing::error!(
                "node {}: the restart history was not written: {e}",
                record.node_id
            );
        }
    }

    /// Takes what a node's accepted status says of its workers and of the drain times
    /// of its recent restarts.
    pub fn heard(&self, status: &pb::StatusResponse) {
        let id = status.node_id.as_str();
        let fresh: Vec<(u32, u64)> = {
            let mut heard = self.heard.lock().expect("history lock");
            // The id is copied once per node, not once per heartbeat.
            if !heard.contains_key(id) {
                heard.insert(id.to_string(), Heard::default());
            }
            let node = heard.get_mut(id).expect("inserted above");
            // A beat that reports what the last one did (most do) copies nothing. (A
            // clone, not clone_from: extending an empty vector reserves room for four.)
            if node.workers != status.workers {
                node.workers = status.workers.clone();
            }
            node.drains.clear();
            node.drains.extend(
                status
                    .recent_restarts
                    .iter()
                    .filter(|r| r.drain_us > 0 && r.old_pid != 0)
                    .map(|r| (r.old_pid, r.drain_us)),
            );
            let seen = &mut node.forwarded;
            let mut fresh = Vec::new();
            for r in &status.recent_restarts {
                if r.drain_us == 0 || r.old_pid == 0 || seen.contains(&r.old_pid) {
                    continue;
                }
                seen.push_back(r.old_pid);
                if seen.len() > 32 {
                    seen.pop_front();
                }
                fresh.push((r.old_pid, r.drain_us));
            }
            fresh
        };
        for (old_pid, drain_us) in fresh {
            // Queued; the writer commits it with whatever else is waiting.
            drop(
                self.store
                    .set_restart_drain(&status.node_id, old_pid, drain_us),
            );
        }
    }

    /// Forgets what is held in memory for a node (it was forgotten).
    pub fn forget(&self, node_id: &str) {
        self.heard.lock().expect("history lock").remove(node_id);
    }

    /// The node's worker generations as it last reported them, oldest first.
    pub fn workers(&self, node_id: &str) -> Vec<pb::Worker> {
        let mut w = self
            .heard
            .lock()
            .expect("history lock")
            .get(node_id)
            .map(|h| h.workers.clone())
            .unwrap_or_default();
        w.sort_by_key(|w| w.generation);
        w
    }

    /// A node's restarts, newest first.
    pub fn of_node(&self, node_id: &str, limit: usize) -> Result<Vec<RestartRecord>, StoreError> {
        self.store.load_restarts(Some(node_id), limit)
    }

    /// The fleet's latest restarts, newest first.
    pub fn recent(&self, limit: usize) -> Result<Vec<RestartRecord>, StoreError> {
        self.store.load_restarts(None, limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteStore;

    fn status(node: &str, restarts: Vec<pb::RecentRestart>) -> pb::StatusResponse {
        pb::StatusResponse {
            node_id: node.into(),
            recent_restarts: restarts,
            ..Default::default()
        }
    }

    fn drained(old_pid: u32, drain_us: u64) -> pb::RecentRestart {
        pb::RecentRestart {
            old_pid,
            drain_us,
            ..Default::default()
        }
    }

    fn restart(node: &str, old_pid: u32) -> RestartRecord {
        RestartRecord {
            node_id: node.into(),
            kind: "restart".into(),
            outcome: "succeeded".into(),
            old_pid,
            new_pid: old_pid + 1,
            handoff_us: 5,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_drain_reported_before_or_after_the_restart_answer_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(&dir.path().join("fleet.db")).unwrap());
        let history = History::new(store.clone());
        // After: the answer is recorded first, the drain comes with a heartbeat.
        history.record(restart("web-1", 10)).await;
        history.heard(&status("web-1", vec![drained(10, 700)]));
        // Before: a heartbeat already carried the drain of pid 20.
        history.heard(&status("web-1", vec![drained(10, 700), drained(20, 900)]));
        history.record(restart("web-1", 20)).await;
        // Another node's drain of the same pid does not leak into web-1's history.
        history.heard(&status("web-2", vec![drained(30, 5)]));
        // The queued drain update is committed before this write's ack.
        store.put_restart(&restart("web-3", 1)).await.unwrap();
        let got: Vec<(u32, u64)> = history
            .of_node("web-1", 10)
            .unwrap()
            .iter()
            .map(|r| (r.old_pid, r.drain_us))
            .collect();
        assert_eq!(got, [(20, 900), (10, 700)]);
        assert_eq!(history.recent(10).unwrap().len(), 3);
    }
}
