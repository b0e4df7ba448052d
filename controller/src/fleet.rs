//! The controller's shared state: inventory, store, agent clients and rollouts, and the
//! operations the API offers on them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::broadcast;

use crate::agents::Agents;
use crate::inventory::{Inventory, NodeRecord, STOPPED, Selector};
use crate::rollout::{
    self, NodeState, Rollout, RolloutHandle, RolloutNode, RolloutState, RolloutView, Spec,
    TimelineEntry,
};
use crate::store::Store;
use crate::tokens::Tokens;
use crate::{Change, now_ms};

/// The text of a preflight refusal: a headline, then one line per node (50 at most).
fn preflight_message(targets: usize, refusals: &[(String, String)]) -> String {
    let mut msg = format!(
        "preflight refused on {} of {targets} node(s); no node was restarted:",
        refusals.len()
    );
    for (node, reason) in refusals.iter().take(50) {
        msg.push_str(&format!("\n  node {node}: {reason}"));
    }
    if refusals.len() > 50 {
        msg.push_str(&format!("\n  … and {} more", refusals.len() - 50));
    }
    msg
}

#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("{0}")]
    InvalidSpec(String),
    #[error("{0}")]
    Refused(String),
    /// Preflight refused on these nodes (id, reason) of `targets`.
    #[error("{}", preflight_message(*.targets, .refusals))]
    Preflight {
        targets: usize,
        refusals: Vec<(String, String)>,
    },
    #[error("no rollout {0:?}: list them with `fleetctl rollout history`")]
    NotFound(String),
    #[error("{0}")]
    WrongState(String),
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
}

#[derive(Debug)]
pub struct Fleet {
    pub inventory: Arc<Inventory>,
    pub store: Arc<dyn Store>,
    pub agents: Agents,
    /// Every node's restart history.
    pub history: crate::history::History,
    /// Operator and join tokens.
    pub tokens: Arc<Tokens>,
    pub changes: broadcast::Sender<Change>,
    rollouts: Mutex<HashMap<String, Arc<RolloutHandle>>>,
    seq: AtomicU64,
    /// Serializes starting rollouts (one active rollout at a time).
    start_lock: tokio::sync::Mutex<()>,
}

impl Fleet {
    pub fn new(
        store: Arc<dyn Store>,
        heartbeat_ttl: Duration,
        agent_token: Option<&str>,
    ) -> Result<Arc<Self>, crate::store::StoreError> {
        let (changes, _) = broadcast::channel(8192);
        let inventory = Arc::new(Inventory::new(
            store.clone(),
            heartbeat_ttl,
            changes.clone(),
        )?);
        let mut rollouts = HashMap::new();
        let mut seq = 0;
        for header in store.load_rollouts()? {
            let nodes = store.load_rollout_nodes(&header.id)?;
            seq = seq.max(header.seq);
            let mut view = RolloutView {
                rollout: header,
                nodes,
            };
            view.nodes.sort_by_key(|n| (n.batch, n.node_id.clone()));
            rollouts.insert(view.rollout.id.clone(), Arc::new(RolloutHandle::new(view)));
        }
        let tokens = Arc::new(Tokens::load(store.clone())?);
        Ok(Arc::new(Self {
            inventory,
            history: crate::history::History::new(store.clone()),
            store,
            agents: Agents::new(agent_token),
            tokens,
            changes,
            rollouts: Mutex::new(rollouts),
            seq: AtomicU64::new(seq),
            start_lock: tokio::sync::Mutex::new(()),
        }))
    }

    /// Restarts the engines of rollouts that were running (or paused) when the
    /// controller stopped. Nodes already done are not touched again.
    pub fn resume_unfinished(self: &Arc<Self>) {
        for handle in self.rollouts.lock().expect("rollouts lock").values() {
            let (id, state) = {
                let v = handle.view.lock().expect("view lock");
                (v.rollout.id.clone(), v.rollout.state)
            };
            if matches!(state, RolloutState::Running | RolloutState::Paused) {
                tracing::info!("resuming rollout {id} ({})", state.as_str());
                tokio::spawn(rollout::engine::run(self.clone(), handle.clone()));
            }
        }
    }

    pub fn handle(&self, id: &str) -> Result<Arc<RolloutHandle>, RolloutError> {
        let rollouts = self.rollouts.lock().expect("rollouts lock");
        let found = if id == "latest" || id.is_empty() {
            rollouts
                .values()
                .max_by_key(|h| h.view.lock().expect("view lock").rollout.seq)
        } else {
            rollouts.get(id)
        };
        found
            .cloned()
            .ok_or_else(|| RolloutError::NotFound(id.to_string()))
    }

    pub fn rollout(&self, id: &str) -> Result<RolloutView, RolloutError> {
        Ok(self.handle(id)?.view.lock().expect("view lock").clone())
    }

    /// Newest first.
    pub fn rollouts(&self, limit: usize) -> Vec<RolloutView> {
        let mut all: Vec<RolloutView> = self
            .rollouts
            .lock()
            .expect("rollouts lock")
            .values()
            .map(|h| h.view.lock().expect("view lock").clone())
            .collect();
        all.sort_by_key(|v| std::cmp::Reverse(v.rollout.seq));
        if limit > 0 {
            all.truncate(limit);
        }
        all
    }

    /// The rollout running or paused now, if any.
    pub fn active_rollout(&self) -> Option<RolloutView> {
        self.rollouts
            .lock()
            .expect("rollouts lock")
            .values()
            .find_map(|h| {
                let v = h.view.lock().expect("view lock");
                matches!(
                    v.rollout.state,
                    RolloutState::Running | RolloutState::Paused
                )
                .then(|| v.clone())
            })
    }

    fn active(&self) -> Option<String> {
        self.rollouts
            .lock()
            .expect("rollouts lock")
            .values()
            .map(|h| h.view.lock().expect("view lock").rollout.clone())
            .find(|r| matches!(r.state, RolloutState::Running | RolloutState::Paused))
            .map(|r| format!("rollout {} is {}", r.id, r.state.as_str()))
    }

    /// Checks the spec, selects and preflights the targets, plans the batches and
    /// starts the engine (or, for a dry run, returns the plan only).
    pub async fn start_rollout(
        self: &Arc<Self>,
        spec: Spec,
        dry_run: bool,
    ) -> Result<RolloutView, RolloutError> {
        spec.check().map_err(|e| RolloutError::InvalidSpec(e.0))?;
        let selector = Selector::parse(&spec.selector).map_err(RolloutError::InvalidSpec)?;
        let matched = self.inventory.list(&selector);
        let matched_count = matched.len();
        // Nodes shut down on purpose are not restarted (nor counted as failures).
        let targets: Vec<NodeRecord> = matched.into_iter().filter(|n| n.state != STOPPED).collect();
        if targets.is_empty() {
            return Err(RolloutError::Refused(if matched_count == 0 {
                format!(
                    "the selector {:?} matches no node: check `fleetctl nodes`",
                    spec.selector
                )
            } else {
                format!(
                    "every node the selector {:?} matches ({matched_count}) is stopped: start their agents again",
                    spec.selector
                )
            }));
        }
        let nodes: Vec<(NodeRecord, String, String)> = targets
            .into_iter()
            .map(|n| (n, spec.exe.clone(), spec.sha256.clone()))
            .collect();
        self.begin(spec, nodes, dry_run, String::new()).await
    }

    /// Undo: a new rollout that moves every node the given rollout moved back to its
    /// own previous executable. `actor` is the caller, `declared` who it said it was.
    pub async fn undo(
        self: &Arc<Self>,
        id: &str,
        actor: &str,
        declared: &str,
    ) -> Result<RolloutView, RolloutError> {
        let view = self.rollout(id)?;
        if !view.rollout.state.finished() {
            return Err(RolloutError::WrongState(format!(
                "rollout {} is {}: abort it or wait for it to finish before undoing it",
                view.rollout.id,
                view.rollout.state.as_str()
            )));
        }
        let mut nodes = Vec::new();
        for n in view
            .nodes
            .iter()
            .filter(|n| n.state == NodeState::Healthy && !n.previous_exe.is_empty())
        {
            let record = self.inventory.get(&n.node_id).ok_or_else(|| {
                RolloutError::Refused(format!("node {} is no longer known", n.node_id))
            })?;
            nodes.push((record, n.previous_exe.clone(), n.previous_sha256.clone()));
        }
        if nodes.is_empty() {
            return Err(RolloutError::WrongState(format!(
                "rollout {} moved no node that is still healthy: nothing to undo",
                view.rollout.id
            )));
        }
        let mut spec = view.rollout.spec.clone();
        spec.exe = format!("(previous executables of {})", view.rollout.id);
        spec.sha256 = String::new();
        spec.canary = 0;
        spec.pause_after_canary = false;
        spec.actor = actor.to_string();
        spec.declared_actor = if declared == actor {
            String::new()
        } else {
            declared.to_string()
        };
        spec.reason = format!("undo {}", view.rollout.id);
        spec.auto_rollback = false;
        self.begin(spec, nodes, false, view.rollout.id.clone())
            .await
    }

    async fn begin(
        self: &Arc<Self>,
        spec: Spec,
        targets: Vec<(NodeRecord, String, String)>,
        dry_run: bool,
        undo_of: String,
    ) -> Result<RolloutView, RolloutError> {
        let _one_at_a_time = self.start_lock.lock().await;
        if !dry_run && let Some(active) = self.active() {
            return Err(RolloutError::WrongState(format!(
                "{active}: abort it or wait for it to finish first"
            )));
        }
        let refusals = rollout::engine::preflight(self, &targets).await;
        if !refusals.is_empty() {
            return Err(RolloutError::Preflight {
                targets: targets.len(),
                refusals,
            });
        }
        let sizes = rollout::plan(&spec, targets.len());
        let seq = self.seq.load(Ordering::SeqCst) + 1;
        let now = now_ms();
        let mut nodes = Vec::with_capacity(targets.len());
        let mut batch = 0u32;
        let mut left_in_batch = sizes.first().copied().unwrap_or(0);
        for (node, exe, sha) in targets {
            while left_in_batch == 0 {
                batch += 1;
                left_in_batch = sizes[batch as usize];
            }
            left_in_batch -= 1;
            nodes.push(RolloutNode {
                node_id: node.node_id.clone(),
                batch,
                state: NodeState::Pending,
                reason: String::new(),
                target_exe: exe,
                target_sha256: sha,
                previous_exe: node.exe.path.clone(),
                previous_sha256: node.exe.sha256.clone(),
                previous_generation: node.generation,
                old_pid: node.worker_pid,
                new_pid: 0,
                new_generation: 0,
                timeline: vec![TimelineEntry {
                    unix_ms: now,
                    state: NodeState::Preflight,
                    message: "executable accepted".into(),
                    pid: node.worker_pid,
                }],
            });
        }
        let rollout = Rollout {
            id: format!("r{seq}"),
            seq,
            spec,
            state: if dry_run {
                RolloutState::Planned
            } else {
                RolloutState::Running
            },
            reason: String::new(),
            created_unix_ms: now,
            finished_unix_ms: 0,
            batch_sizes: sizes.iter().map(|s| *s as u32).collect(),
            current_batch: 0,
            undo_of,
            requested: None,
        };
        let view = RolloutView { rollout, nodes };
        if dry_run {
            return Ok(view);
        }
        self.seq.store(seq, Ordering::SeqCst);
        // Durable before the first node is touched.
        self.store
            .put_rollout_nodes(&view.rollout.id, &view.nodes)
            .await?;
        self.store.put_rollout(&view.rollout).await?;
        tracing::info!(
            "rollout {} started by {}: {} node(s) in batches {:?} to {} ({})",
            view.rollout.id,
            crate::tokens::actor_label(&view.rollout.spec.actor, &view.rollout.spec.declared_actor),
            view.nodes.len(),
            view.rollout.batch_sizes,
            view.rollout.spec.exe,
            view.rollout.spec.reason
        );
        let handle = Arc::new(RolloutHandle::new(view.clone()));
        self.rollouts
            .lock()
            .expect("rollouts lock")
            .insert(view.rollout.id.clone(), handle.clone());
        let _ = self.changes.send(Change::Rollout(view.rollout.id.clone()));
        tokio::spawn(rollout::engine::run(self.clone(), handle));
        Ok(view)
    }

    /// Records an operator's pause, resume or abort for the engine to act on; `actor`
    /// goes into the rollout's reason as given (see [`crate::tokens::actor_label`]).
    pub async fn request(
        &self,
        id: &str,
        wanted: RolloutState,
        actor: &str,
    ) -> Result<RolloutView, RolloutError> {
        let handle = self.handle(id)?;
        let header = {
            let mut view = handle.view.lock().expect("view lock");
            let state = view.rollout.state;
            let allowed = match wanted {
                RolloutState::Paused => state == RolloutState::Running,
                RolloutState::Running => state == RolloutState::Paused,
                RolloutState::Aborted => !state.finished() && state != RolloutState::Planned,
                _ => false,
            };
            if !allowed {
                return Err(RolloutError::WrongState(format!(
                    "rollout {} is {}: it cannot be {}",
                    view.rollout.id,
                    state.as_str(),
                    match wanted {
                        RolloutState::Paused => "paused",
                        RolloutState::Running => "resumed",
                        _ => "aborted",
                    }
                )));
            }
            view.rollout.requested = Some(wanted);
            if wanted == RolloutState::Running {
                view.rollout.state = RolloutState::Running;
                view.rollout.reason = format!("resumed by {actor}");
            }
            if wanted == RolloutState::Aborted {
                view.rollout.reason = format!("aborted by {actor}");
            }
            view.rollout.clone()
        };
        self.store.put_rollout(&header).await?;
        handle.wake.notify_one();
        let _ = self.changes.send(Change::Rollout(header.id.clone()));
        Ok(handle.view.lock().expect("view lock").clone())
    }
}
