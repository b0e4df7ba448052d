//! The controller's shared state: inventory, store, agent clients and rollouts, and the
//! operations the API offers on them.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::broadcast;

use crate::agents::Agents;
use crate::inventory::{Inventory, STOPPED, Selector};
use crate::rollout::{
    self, NodeState, Progress, Rollout, RolloutHandle, RolloutNode, RolloutState, RolloutSummary,
    RolloutView, Spec, Target, TimelineEntry,
};
use crate::store::Store;
use crate::tokens::Tokens;
use crate::{Change, now_ms};

/// Finished rollouts kept whole in memory, the newest; older ones keep their header and
/// node counts, their nodes are read from the store when asked for.
pub const FINISHED_KEPT: usize = 5;

/// Every rollout in the store, each with its nodes in batch order, except finished ones
/// older than the newest [`FINISHED_KEPT`]: those come without nodes, with their counts —
/// taken from `counted` (rollouts already held that way: a finished rollout does not
/// change) or counted from their nodes, one rollout's nodes in memory at a time.
fn load_rollouts(
    store: &dyn Store,
    counted: &HashMap<String, (Rollout, Progress)>,
) -> Result<Vec<(RolloutView, Option<Progress>)>, crate::store::StoreError> {
    let mut headers = store.load_rollouts()?;
    headers.sort_by_key(|h| std::cmp::Reverse(h.seq));
    let mut finished = 0;
    let mut out = Vec::with_capacity(headers.len());
    for header in headers {
        if header.state.finished() {
            finished += 1;
            if finished > FINISHED_KEPT {
                let progress = match (header.final_counts, counted.get(&header.id)) {
                    (Some(progress), _) => progress,
                    (None, Some((held, progress))) if *held == header => *progress,
                    (None, _) => Progress::of(&store.load_rollout_nodes(&header.id)?),
                };
                let view = RolloutView {
                    rollout: header,
                    nodes: Vec::new(),
                };
                out.push((view, Some(progress)));
                continue;
            }
        }
        let mut nodes = store.load_rollout_nodes(&header.id)?;
        nodes.sort_by_key(|n| (n.batch, n.node_id.clone()));
        out.push((
            RolloutView {
                rollout: header,
                nodes,
            },
            None,
        ));
    }
    Ok(out)
}

/// Runs `f`, a blocking store read, off the async worker where the runtime allows it.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The text of a preflight refusal: a headline, then one line per reason with the
/// nodes that gave it ("3 nodes: exe not found: web-1, web-2, web-3"; 20 groups and
/// 20 ids a group at most).
pub fn preflight_message(targets: usize, refusals: &[(String, String)]) -> String {
    let mut msg = format!(
        "preflight refused on {} of {targets} node(s); no node was restarted:",
        refusals.len()
    );
    let groups =
        fleet_proto::rules::group_refusals(refusals.iter().map(|(n, r)| (n.as_str(), r.as_str())));
    for (reason, nodes) in groups.iter().take(20) {
        msg.push_str("\n  ");
        msg.push_str(&fleet_proto::rules::refusal_line(reason, nodes, 20));
    }
    if groups.len() > 20 {
        msg.push_str(&format!("\n  … and {} more reasons", groups.len() - 20));
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
    /// The soak of a rollout whose request gives none (`--default-min-healthy`).
    default_min_healthy_ms: AtomicU64,
    /// The election, when several controllers share an etcd store ([`crate::ha`]).
    ha: std::sync::OnceLock<Arc<crate::ha::Ha>>,
    /// Whether this controller leads (set by [`Fleet::take_over`], cleared by
    /// [`Fleet::step_down`]).
    leading: std::sync::atomic::AtomicBool,
    /// Held by a reload and by a take-over, so that a follower's reload never
    /// overwrites what a new leader just loaded. Never waited for on a runtime
    /// thread: a reload that finds it taken skips (the take-over loads anyway), and a
    /// take-over waits for it in `block_in_place` (a worker blocked on it while the
    /// reload waits on etcd stalled the runtime: the I/O the reload waited for could
    /// not be driven).
    reloading: Mutex<()>,
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
        for (view, stored) in load_rollouts(store.as_ref(), &HashMap::new())? {
            seq = seq.max(view.rollout.seq);
            let handle = match stored {
                Some(progress) => RolloutHandle::stored(view.rollout, progress, 0),
                None => RolloutHandle::new(view, 0),
            };
            let id = handle.view.lock().expect("view lock").rollout.id.clone();
            rollouts.insert(id, Arc::new(handle));
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
            default_min_healthy_ms: AtomicU64::new(millis(Spec::DEFAULT_MIN_HEALTHY)),
            ha: std::sync::OnceLock::new(),
            leading: Default::default(),
            reloading: Mutex::new(()),
        }))
    }

    /// Takes part in an election: until it leads, this controller changes nothing.
    pub fn set_ha(&self, ha: Arc<crate::ha::Ha>) {
        self.inventory.set_follower(true);
        let _ = self.ha.set(ha);
    }

    pub fn ha(&self) -> Option<&Arc<crate::ha::Ha>> {
        self.ha.get()
    }

    /// Whether this controller may change the fleet now: always with its own store,
    /// only while it leads (with a fresh lease) when it shares one.
    pub fn may_act(&self) -> bool {
        self.ha.get().is_none_or(|ha| ha.is_leader())
    }

    /// Before an agent is called: this controller still leads, as the store itself
    /// confirms (a transaction on the leader's election key). Always Ok with a store
    /// of its own.
    pub async fn claim(&self) -> Result<(), String> {
        if let Some(refusal) = self.not_leader() {
            return Err(refusal.message().to_string());
        }
        self.store.check_fence().await.map_err(|e| e.to_string())
    }

    /// The refusal of a change this controller may not make now.
    pub fn not_leader(&self) -> Option<tonic::Status> {
        let ha = self.ha.get()?;
        (!ha.is_leader()).then(|| ha.not_leader())
    }

    /// The leadership term this controller acts in (0: it has a store of its own, or
    /// was never elected).
    pub fn term(&self) -> u64 {
        self.ha.get().map_or(0, |ha| ha.term())
    }

    /// Whether the engine of `handle` may take its next step: this controller may act
    /// and the rollout was loaded or started in the current term.
    pub fn may_drive(&self, handle: &RolloutHandle) -> bool {
        self.may_act() && handle.term == self.term()
    }

    /// A follower's refresh: the nodes, rollouts and tokens as the store holds them
    /// (nothing while this controller leads: its memory is the truth then). `Ok(false)`:
    /// not done (leading, or a take-over holds the state).
    pub fn reload(&self) -> Result<bool, crate::store::StoreError> {
        let Ok(_reloading) = self.reloading.try_lock() else {
            return Ok(false);
        };
        if self.leading.load(Ordering::SeqCst) {
            return Ok(false);
        }
        tokio::task::block_in_place(|| {
            self.inventory.reload(false)?;
            self.reload_rollouts(false)
        })?;
        Ok(true)
    }

    /// While following: what a burst of etcd events changed, applied key by key
    /// ([`crate::follow`]). `Ok(false)`: not applied (a take-over holds the state, or
    /// this controller leads), so the next burst must read everything again.
    pub fn follow(&self, burst: crate::follow::Burst) -> Result<bool, crate::store::StoreError> {
        let Ok(_reloading) = self.reloading.try_lock() else {
            return Ok(false);
        };
        if self.leading.load(Ordering::SeqCst) {
            return Ok(false);
        }
        if let Some(why) = &burst.unreadable {
            tracing::warn!("reading the whole state again: {why}");
            tokio::task::block_in_place(|| {
                self.inventory.reload(false)?;
                self.reload_rollouts(false)
            })?;
            return Ok(true);
        }
        if burst.tokens {
            tokio::task::block_in_place(|| self.tokens.reload())?;
        }
        self.inventory.follow(burst.nodes);

        let mut changed = BTreeSet::new();
        // Rollouts not held whole (new ones, or nodes deleted) are read from the store.
        let mut reread: BTreeSet<String> = burst.rollouts_reread;
        {
            let mut rollouts = self.rollouts.lock().expect("rollouts lock");
            for (id, header) in &burst.rollouts {
                match (header, rollouts.get(id)) {
                    (None, Some(_)) => {
                        rollouts.remove(id);
                        changed.insert(id.clone());
                    }
                    (None, None) => {}
                    (Some(header), Some(h)) if h.stored.is_none() => {
                        h.view.lock().expect("view lock").rollout = header.clone();
                        self.seq.fetch_max(header.seq, Ordering::Relaxed);
                        changed.insert(id.clone());
                    }
                    (Some(_), _) => {
                        reread.insert(id.clone());
                    }
                }
            }
            for (id, nodes) in burst.rollout_nodes {
                let Some(h) = rollouts.get(&id).filter(|h| h.stored.is_none()) else {
                    // Not held whole: a new rollout's header follows its nodes, and an
                    // old finished one is read from the store when asked for.
                    if burst.rollouts.contains_key(&id) {
                        reread.insert(id);
                    }
                    continue;
                };
                let mut view = h.view.lock().expect("view lock");
                for (node_id, node) in nodes {
                    match h.find(&node_id) {
                        Some(i) => view.nodes[i] = node,
                        // A node the plan did not have: read the rollout whole.
                        None => {
                            reread.insert(id.clone());
                        }
                    }
                }
                changed.insert(id);
            }
        }
        // Headers the burst did not carry are read from the store, all in one read.
        let mut stored: Option<HashMap<String, Rollout>> = None;
        for id in reread {
            let header = match burst.rollouts.get(&id) {
                Some(Some(header)) => header.clone(),
                _ => {
                    if stored.is_none() {
                        let all = tokio::task::block_in_place(|| self.store.load_rollouts())?;
                        stored = Some(all.into_iter().map(|r| (r.id.clone(), r)).collect());
                    }
                    match stored.as_mut().and_then(|all| all.remove(&id)) {
                        Some(header) => header,
                        None => continue,
                    }
                }
            };
            let mut nodes = tokio::task::block_in_place(|| self.store.load_rollout_nodes(&id))?;
            nodes.sort_by_key(|n| (n.batch, n.node_id.clone()));
            self.seq.fetch_max(header.seq, Ordering::Relaxed);
            let handle = RolloutHandle::new(
                RolloutView {
                    rollout: header,
                    nodes,
                },
                self.term(),
            );
            self.rollouts
                .lock()
                .expect("rollouts lock")
                .insert(id.clone(), Arc::new(handle));
            changed.insert(id);
        }
        self.keep_newest_finished();
        for id in changed {
            let _ = self.changes.send(Change::Rollout(id));
        }
        Ok(true)
    }

    /// Just deposed: follow from now on (the engines stop at their next step).
    pub fn step_down(&self) {
        self.leading.store(false, Ordering::SeqCst);
        self.inventory.set_follower(true);
    }

    /// The tokens and rollouts as the store holds them. `fresh`: every rollout gets a new handle (of the current term), not only those
    /// that changed.
    fn reload_rollouts(&self, fresh: bool) -> Result<(), crate::store::StoreError> {
        self.tokens.reload()?;
        let mut loaded = HashMap::new();
        let mut seq = 0;
        // Old finished rollouts held as counts are not read again (a follower reloads
        // after every change in etcd).
        let counted: HashMap<String, (Rollout, Progress)> = self
            .rollouts
            .lock()
            .expect("rollouts lock")
            .iter()
            .filter_map(|(id, h)| {
                let progress = h.stored?;
                let header = h.view.lock().expect("view lock").rollout.clone();
                Some((id.clone(), (header, progress)))
            })
            .collect();
        for (view, stored) in load_rollouts(self.store.as_ref(), &counted)? {
            seq = seq.max(view.rollout.seq);
            loaded.insert(view.rollout.id.clone(), (view, stored));
        }
        self.seq.fetch_max(seq, Ordering::Relaxed);
        let mut changed = Vec::new();
        {
            let mut rollouts = self.rollouts.lock().expect("rollouts lock");
            rollouts.retain(|id, _| loaded.contains_key(id));
            let term = self.term();
            for (id, (view, stored)) in loaded {
                match rollouts.get(&id) {
                    Some(h)
                        if !fresh
                            && h.stored == stored
                            && *h.view.lock().expect("view lock") == view => {}
                    _ => {
                        let handle = match stored {
                            Some(progress) => RolloutHandle::stored(view.rollout, progress, term),
                            None => RolloutHandle::new(view, term),
                        };
                        rollouts.insert(id.clone(), Arc::new(handle));
                        changed.push(id);
                    }
                }
            }
        }
        for id in changed {
            let _ = self.changes.send(Change::Rollout(id));
        }
        Ok(())
    }

    /// Just elected: load what the previous leader left (every node gets one
    /// heartbeat TTL of grace) and note the takeover in each unfinished rollout's
    /// timeline; [`Fleet::resume_unfinished`] then starts their engines.
    pub fn take_over(&self, me: &str) -> Result<(), crate::store::StoreError> {
        tokio::task::block_in_place(|| {
            let _reloading = self.reloading.lock().expect("reloading lock");
            self.inventory.reload(true)?;
            self.reload_rollouts(true)?;
            self.inventory.set_follower(false);
            self.leading.store(true, Ordering::SeqCst);
            Ok::<(), crate::store::StoreError>(())
        })?;
        for handle in self.rollouts.lock().expect("rollouts lock").values() {
            let (id, nodes) = {
                let mut view = handle.view.lock().expect("view lock");
                if !matches!(
                    view.rollout.state,
                    RolloutState::Running | RolloutState::Paused
                ) {
                    continue;
                }
                let message = format!("leader change: {me} took the rollout over");
                let mut nodes = Vec::new();
                for node in view.nodes.iter_mut().filter(|n| !n.state.finished()) {
                    node.timeline.push(TimelineEntry {
                        unix_ms: now_ms(),
                        state: node.state,
                        message: message.clone(),
                        pid: 0,
                    });
                    nodes.push(node.clone());
                }
                (view.rollout.id.clone(), nodes)
            };
            tracing::info!("rollout {id}: taken over from the previous leader");
            drop(self.store.put_rollout_nodes(&id, &nodes));
        }
        Ok(())
    }

    /// Sets the soak of rollouts whose request gives none (`--default-min-healthy`).
    pub fn set_default_min_healthy(&self, soak: Duration) {
        self.default_min_healthy_ms
            .store(millis(soak), Ordering::Relaxed);
    }

    pub fn default_min_healthy(&self) -> Duration {
        Duration::from_millis(self.default_min_healthy_ms.load(Ordering::Relaxed))
    }

    /// The soak a rollout gets: the one its request gave, else the controller's default.
    /// The stored spec carries the result, so what is shown is what was used.
    pub fn resolve_min_healthy(&self, given: Option<u64>) -> u64 {
        given.unwrap_or_else(|| self.default_min_healthy_ms.load(Ordering::Relaxed))
    }

    /// Restarts the engines of rollouts that were running (or paused) when the
    /// controller stopped (or the previous leader lost its lease). Nodes already done
    /// are not touched again.
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

    /// The rollout `id` (or "latest") with its nodes, read back from the store if they
    /// were left there ([`Fleet::full`]).
    pub fn handle(&self, id: &str) -> Result<Arc<RolloutHandle>, RolloutError> {
        self.full(&self.find(id)?)
    }

    /// The rollout `id` (or "latest") as held in memory: without its nodes if it is an
    /// old finished one ([`RolloutHandle::stored`]).
    pub fn find(&self, id: &str) -> Result<Arc<RolloutHandle>, RolloutError> {
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

    /// The handle with its nodes: `handle` itself, or for a rollout whose nodes were
    /// left in the store ([`RolloutHandle::stored`]) a handle read back from it, for
    /// this caller only (the next old rollout asked for is read again, not kept).
    pub fn full(&self, handle: &Arc<RolloutHandle>) -> Result<Arc<RolloutHandle>, RolloutError> {
        if handle.stored.is_none() {
            return Ok(handle.clone());
        }
        let rollout = handle.view.lock().expect("view lock").rollout.clone();
        let nodes = blocking(|| self.store.load_rollout_nodes(&rollout.id))?;
        let mut view = RolloutView { rollout, nodes };
        view.nodes.sort_by_key(|n| (n.batch, n.node_id.clone()));
        Ok(Arc::new(RolloutHandle::new(view, handle.term)))
    }

    /// Leaves the nodes of finished rollouts older than the newest [`FINISHED_KEPT`] in
    /// the store, keeping their headers and counts: a rollout of 100,000 nodes is
    /// ~150 MB in memory, and the history grows by one with every rollout.
    fn keep_newest_finished(&self) {
        let handles = self.rollout_handles(0);
        let old = handles
            .iter()
            .filter(|h| h.view.lock().expect("view lock").rollout.state.finished())
            .skip(FINISHED_KEPT)
            .filter(|h| h.stored.is_none());
        let mut trimmed = Vec::new();
        for h in old {
            let view = h.view.lock().expect("view lock");
            trimmed.push(RolloutHandle::stored(
                view.rollout.clone(),
                view.progress(),
                h.term,
            ));
        }
        if trimmed.is_empty() {
            return;
        }
        let mut rollouts = self.rollouts.lock().expect("rollouts lock");
        for h in trimmed {
            let id = h.view.lock().expect("view lock").rollout.id.clone();
            tracing::debug!("rollout {id}: its nodes are left in the store");
            rollouts.insert(id, Arc::new(h));
        }
    }

    /// A copy of the rollout with every node: for one rollout at a time. To read a
    /// part of it, lock [`Fleet::handle`]'s view instead of copying 100,000 nodes.
    pub fn rollout(&self, id: &str) -> Result<RolloutView, RolloutError> {
        Ok(self.handle(id)?.view.lock().expect("view lock").clone())
    }

    /// Newest first, `limit` of them (0: all), each shared, not copied.
    pub fn rollout_handles(&self, limit: usize) -> Vec<Arc<RolloutHandle>> {
        let mut all: Vec<(u64, Arc<RolloutHandle>)> = self
            .rollouts
            .lock()
            .expect("rollouts lock")
            .values()
            .map(|h| (h.view.lock().expect("view lock").rollout.seq, h.clone()))
            .collect();
        all.sort_by_key(|(seq, _)| std::cmp::Reverse(*seq));
        if limit > 0 {
            all.truncate(limit);
        }
        all.into_iter().map(|(_, h)| h).collect()
    }

    /// Newest first: copies of every node of each rollout. Listings use
    /// [`Fleet::rollout_summaries`]: the history of a fleet of 100,000 nodes is
    /// 100,000 nodes a rollout.
    pub fn rollouts(&self, limit: usize) -> Result<Vec<RolloutView>, RolloutError> {
        self.rollout_handles(limit)
            .iter()
            .map(|h| Ok(self.full(h)?.view.lock().expect("view lock").clone()))
            .collect()
    }

    /// Newest first: each rollout's header and node counts, without its nodes.
    pub fn rollout_summaries(&self, limit: usize) -> Vec<RolloutSummary> {
        self.rollout_handles(limit)
            .iter()
            .map(|h| {
                let view = h.view.lock().expect("view lock");
                RolloutSummary {
                    rollout: view.rollout.clone(),
                    progress: h.progress(&view),
                }
            })
            .collect()
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
    ) -> Result<Started, RolloutError> {
        spec.check().map_err(|e| RolloutError::InvalidSpec(e.0))?;
        let selector = Selector::parse(&spec.selector).map_err(RolloutError::InvalidSpec)?;
        // An excluded id that names no node is a typo: the node meant to be spared
        // would be restarted.
        if let Some(unknown) = spec
            .exclude
            .iter()
            .find(|id| self.inventory.get(id).is_none())
        {
            return Err(RolloutError::InvalidSpec(format!(
                "exclude: no node {unknown:?}: check the id with `fleetctl nodes`"
            )));
        }
        let mut spec = spec;
        // The targets keep a few fields of each matched record, taken in one walk
        // under the inventory's read lock (no copy of every record), into a vector
        // sized by a first walk (a doubling one would hold two copies at its last
        // growth).
        let mut matched_count = 0;
        self.inventory
            .each_matching(&selector, |_| matched_count += 1);
        let mut targets = Vec::with_capacity(matched_count);
        let mut left_out = Vec::new();
        matched_count = 0;
        // A set: looked up once per matched node (a list of 10,000 excluded ids
        // searched for each of 100,000 nodes took ~3 s of StartRollout).
        let excluded: HashSet<&str> = spec.exclude.iter().map(String::as_str).collect();
        self.inventory.each_matching(&selector, |n| {
            matched_count += 1;
            if excluded.contains(n.node_id.as_str()) {
                left_out.push((
                    n.node_id.clone(),
                    "excluded by request (--exclude)".to_string(),
                ));
            } else if n.state == STOPPED || (spec.skip_unreachable && n.state == "unreachable") {
                // Nodes shut down on purpose are not restarted (nor counted as failures).
                let why = crate::agents::down(n).unwrap_or_else(|| n.state.clone());
                left_out.push((
                    n.node_id.clone(),
                    if n.state == STOPPED && !spec.skip_unreachable {
                        why
                    } else {
                        format!("skipped by request (--skip-unreachable): {why}")
                    },
                ));
            } else {
                targets.push(Target::new(n, spec.exe.clone(), spec.sha256.clone()));
            }
        });
        left_out.sort();
        spec.left_out = left_out;
        if targets.is_empty() {
            return Err(RolloutError::Refused(if matched_count == 0 {
                format!(
                    "the selector {:?} matches no node: check `fleetctl nodes`",
                    spec.selector
                )
            } else {
                let mut msg = format!(
                    "every node the selector {:?} matches ({matched_count}) is left out; nothing to restart:",
                    spec.selector
                );
                let groups = fleet_proto::rules::group_refusals(
                    spec.left_out.iter().map(|(n, r)| (n.as_str(), r.as_str())),
                );
                for (reason, nodes) in &groups {
                    msg.push_str("\n  ");
                    msg.push_str(&fleet_proto::rules::refusal_line(reason, nodes, 20));
                }
                msg
            }));
        }
        self.begin(spec, targets, dry_run, String::new()).await
    }

    /// Undo: a new rollout that moves every node the given rollout moved back to its
    /// own previous executable. `actor` is the caller, `declared` who it said it was.
    pub async fn undo(
        self: &Arc<Self>,
        id: &str,
        actor: &str,
        declared: &str,
    ) -> Result<Started, RolloutError> {
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
            nodes.push(Target::new(
                &record,
                n.previous_exe.clone(),
                n.previous_sha256.clone(),
            ));
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
        // The nodes to move back are listed above, not selected again.
        spec.exclude.clear();
        spec.skip_unreachable = false;
        spec.left_out.clear();
        self.begin(spec, nodes, false, view.rollout.id.clone())
            .await
    }

    /// The next rollout's seq: one past the newest rollout's, passing over an id whose
    /// node rows are stored without a header (a controller that died between a plan's
    /// two writes, or a header the store refused): a new rollout of that id would
    /// take those rows as its own at the next load.
    fn next_seq(&self) -> Result<u64, crate::store::StoreError> {
        let mut seq = self.seq.load(Ordering::SeqCst) + 1;
        while !blocking(|| self.store.load_rollout_nodes(&format!("r{seq}")))?.is_empty() {
            tracing::warn!(
                "rollout id r{seq} has node rows but no header (a plan whose writing was cut \
                 short): passed over"
            );
            seq += 1;
        }
        Ok(seq)
    }

    async fn begin(
        self: &Arc<Self>,
        mut spec: Spec,
        mut targets: Vec<Target>,
        dry_run: bool,
        undo_of: String,
    ) -> Result<Started, RolloutError> {
        let _one_at_a_time = self.start_lock.lock().await;
        if !dry_run && let Some(active) = self.active() {
            return Err(RolloutError::WrongState(format!(
                "{active}: abort it or wait for it to finish first"
            )));
        }
        let mut refusals = rollout::engine::preflight(self, &targets).await;
        // With skip_unreachable, a node whose agent did not answer preflight (down
        // since its last heartbeat) is left out as well, not only those known down.
        if spec.skip_unreachable {
            let (unreachable, rest): (Vec<_>, Vec<_>) = refusals
                .into_iter()
                .partition(|(_, reason)| reason.starts_with("unreachable"));
            refusals = rest;
            let gone: HashSet<&str> = unreachable.iter().map(|(id, _)| id.as_str()).collect();
            targets.retain(|n| !gone.contains(n.node_id.as_str()));
            spec.left_out
                .extend(unreachable.into_iter().map(|(id, reason)| {
                    (
                        id,
                        format!("skipped by request (--skip-unreachable): {reason}"),
                    )
                }));
            spec.left_out.sort();
            if targets.is_empty() {
                return Err(RolloutError::Refused(
                    "every target is unreachable (left out by --skip-unreachable): nothing to restart"
                        .into(),
                ));
            }
        }
        // A dry run shows the plan even when the real run would be refused, with the
        // refusing nodes marked (their reason) and the rollout's reason saying so.
        if !refusals.is_empty() && !dry_run {
            return Err(RolloutError::Preflight {
                targets: targets.len(),
                refusals,
            });
        }
        let refused: HashMap<&str, &str> = refusals
            .iter()
            .map(|(n, r)| (n.as_str(), r.as_str()))
            .collect();
        let targets_count = targets.len();
        let sizes = rollout::plan(&spec, targets.len());
        let seq = self.next_seq()?;
        let now = now_ms();
        let mut nodes = Vec::with_capacity(targets.len());
        let mut batch = 0u32;
        let mut left_in_batch = sizes.first().copied().unwrap_or(0);
        for node in targets {
            while left_in_batch == 0 {
                batch += 1;
                left_in_batch = sizes[batch as usize];
            }
            left_in_batch -= 1;
            let refusal = refused.get(node.node_id.as_str()).copied();
            nodes.push(RolloutNode {
                batch,
                state: NodeState::Pending,
                reason: refusal
                    .map(|r| format!("{}{r}", fleet_proto::rules::PREFLIGHT_WOULD_REFUSE))
                    .unwrap_or_default(),
                target_exe: node.target_exe,
                target_sha256: node.target_sha256,
                previous_exe: node.exe,
                previous_sha256: node.sha256,
                previous_generation: node.generation,
                old_pid: node.worker_pid,
                new_pid: 0,
                new_generation: 0,
                timeline: vec![TimelineEntry {
                    unix_ms: now,
                    state: NodeState::Preflight,
                    message: match refusal {
                        Some(r) => format!("refused: {r}"),
                        None => "executable accepted".into(),
                    },
                    pid: node.worker_pid,
                }],
                node_id: node.node_id,
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
            reason: if refusals.is_empty() {
                String::new()
            } else {
                format!(
                    "dry run: a real run would be refused, {}",
                    preflight_message(targets_count, &refusals)
                        .replace("; no node was restarted:", ":")
                )
            },
            created_unix_ms: now,
            finished_unix_ms: 0,
            batch_sizes: sizes.iter().map(|s| *s as u32).collect(),
            current_batch: 0,
            undo_of,
            requested: None,
            final_counts: None,
        };
        let view = RolloutView { rollout, nodes };
        if dry_run {
            return Ok(Started::Plan(Box::new(view)));
        }
        self.seq.store(seq, Ordering::SeqCst);
        // Durable before the first node is touched.
        self.store
            .put_rollout_nodes(&view.rollout.id, &view.nodes)
            .await?;
        self.store.put_rollout(&view.rollout).await?;
        crate::audit::rollout_started(&view.rollout, view.nodes.len());
        for (reason, ids) in fleet_proto::rules::group_refusals(
            view.rollout
                .spec
                .left_out
                .iter()
                .map(|(n, r)| (n.as_str(), r.as_str())),
        ) {
            tracing::info!(
                "rollout {} left out {}",
                view.rollout.id,
                fleet_proto::rules::refusal_line(&reason, &ids, 20)
            );
        }
        let id = view.rollout.id.clone();
        let handle = Arc::new(RolloutHandle::new(view, self.term()));
        self.rollouts
            .lock()
            .expect("rollouts lock")
            .insert(id.clone(), handle.clone());
        // One more rollout in memory: the oldest whole finished one, if any beyond
        // FINISHED_KEPT, keeps only its counts.
        self.keep_newest_finished();
        let _ = self.changes.send(Change::Rollout(id));
        tokio::spawn(rollout::engine::run(self.clone(), handle.clone()));
        Ok(Started::Running(handle))
    }
}

/// What starting a rollout gives: a dry run's plan, or the rollout now running.
#[derive(Debug)]
pub enum Started {
    /// The plan of a dry run, kept nowhere.
    Plan(Box<RolloutView>),
    /// The rollout in memory, its engine started: its view is the handle's, not a copy
    /// of it (100,000 nodes are ~50 MB).
    Running(Arc<RolloutHandle>),
}

impl Started {
    /// Looks at the plan, or at the running rollout's view under its lock: its first
    /// batch may have moved on since it started.
    pub fn with_view<R>(&self, f: impl FnOnce(&RolloutView) -> R) -> R {
        match self {
            Started::Plan(view) => f(view),
            Started::Running(handle) => f(&handle.view.lock().expect("view lock")),
        }
    }

    pub fn id(&self) -> String {
        self.with_view(|v| v.rollout.id.clone())
    }
}

impl Fleet {
    /// Records an operator's pause, resume or abort for the engine to act on; `actor`
    /// goes into the rollout's reason as given (see [`crate::tokens::actor_label`]).
    /// Gives the rollout's handle: its view is read under its lock, not copied (100,000
    /// nodes are tens of MB).
    pub async fn request(
        &self,
        id: &str,
        wanted: RolloutState,
        actor: &str,
    ) -> Result<Arc<RolloutHandle>, RolloutError> {
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
        crate::audit::rollout_requested(&header.id, wanted, actor);
        handle.wake.notify_one();
        let _ = self.changes.send(Change::Rollout(header.id.clone()));
        Ok(handle)
    }

    /// The active (running or paused) rollout that has yet to finish with `node_id`,
    /// and how far the node is in it: (rollout id, node state).
    pub fn holding_node(&self, node_id: &str) -> Option<(String, NodeState)> {
        let handle = self.holding(node_id)?;
        let view = handle.view.lock().expect("view lock");
        let node = &view.nodes[handle.position(node_id)];
        Some((view.rollout.id.clone(), node.state))
    }

    fn holding(&self, node_id: &str) -> Option<Arc<RolloutHandle>> {
        self.rollouts
            .lock()
            .expect("rollouts lock")
            .values()
            .find(|h| {
                let v = h.view.lock().expect("view lock");
                // By the rollout's index of its nodes, not a walk of them under the
                // lock the engine takes for every step of every node.
                matches!(
                    v.rollout.state,
                    RolloutState::Running | RolloutState::Paused
                ) && h
                    .find(node_id)
                    .is_some_and(|i| !v.nodes[i].state.finished())
            })
            .cloned()
    }

    /// Guards a manual `action` ("restart", "shut down") of `node_id` by `actor`: while
    /// an active (running or paused) rollout has yet to finish with the node (pending,
    /// preflight, restarting or soaking there), it is refused with the rollout's id and
    /// what to do. With `force` it goes through: logged with the actor, and written
    /// into the node's timeline in that rollout so the rollout's page shows it. Nodes
    /// the rollout is done with (healthy, failed, skipped) are not guarded.
    pub async fn guard_manual(
        &self,
        node_id: &str,
        action: &str,
        force: bool,
        actor: &str,
    ) -> Result<(), ManualRefused> {
        if let Err(why) = self.claim().await {
            return Err(ManualRefused(format!(
                "node {node_id} was not asked to {action}: {why}"
            )));
        }
        let Some(handle) = self.holding(node_id) else {
            return Ok(());
        };
        let (id, state, changed) = {
            let mut view = handle.view.lock().expect("view lock");
            let id = view.rollout.id.clone();
            let state = view.rollout.state;
            let position = handle.position(node_id);
            let node = &mut view.nodes[position];
            if !force {
                return Err(ManualRefused(format!(
                    "node {node_id} is in rollout {id} ({}; the node is {} there, batch {}): \
                     {action} it once the rollout is done with it, abort the rollout \
                     (`fleetctl rollout abort {id}`), or {action} it anyway with --force \
                     (recorded in {id})",
                    state.as_str(),
                    node.state.as_str(),
                    node.batch + 1
                )));
            }
            let node_state = node.state;
            let pid = node.new_pid.max(node.old_pid);
            node.timeline.push(TimelineEntry {
                unix_ms: now_ms(),
                state: node_state,
                message: format!("manual {action} forced by {actor}, outside the rollout"),
                pid,
            });
            (id, state, node.clone())
        };
        tracing::warn!(
            "node {node_id}: manual {action} forced by {actor} during rollout {id} ({}; the node is {} there)",
            state.as_str(),
            changed.state.as_str()
        );
        if let Err(e) = self.store.put_rollout_nodes(&id, &[changed]).await {
            tracing::error!("rollout {id}: cannot record the forced {action} of {node_id}: {e}");
        }
        let _ = self.changes.send(Change::Rollout(id));
        Ok(())
    }
}

/// A manual action refused because an active rollout has the node (see
/// [`Fleet::guard_manual`]).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ManualRefused(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    /// Rollout `r{seq}`, succeeded, its `nodes` healthy.
    fn finished(seq: u64, nodes: usize) -> RolloutView {
        let ids: Vec<String> = (0..nodes).map(|i| format!("n{i}")).collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        let mut v = RolloutView::for_test(&ids);
        v.rollout.id = format!("r{seq}");
        v.rollout.seq = seq;
        v.rollout.state = RolloutState::Succeeded;
        for n in &mut v.nodes {
            n.set(NodeState::Healthy, "healthy", 0);
        }
        v
    }

    /// A fleet on a store holding rollouts r1..r`count`, finished, 4 nodes each.
    async fn with_finished(count: u64) -> (tempfile::TempDir, Arc<Fleet>) {
        let dir = tempfile::tempdir().unwrap();
        let store =
            Arc::new(crate::store::SqliteStore::open(&dir.path().join("fleet.db")).unwrap());
        for seq in 1..=count {
            let v = finished(seq, 4);
            store
                .put_rollout_nodes(&v.rollout.id, &v.nodes)
                .await
                .unwrap();
            store.put_rollout(&v.rollout).await.unwrap();
        }
        (
            dir,
            Fleet::new(store, Duration::from_secs(10), None).unwrap(),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_the_newest_finished_rollouts_keep_their_nodes_in_memory() {
        let count = FINISHED_KEPT as u64 + 3;
        let (_dir, fleet) = with_finished(count).await;

        // r1..r3 are older than the newest FINISHED_KEPT: counts only in memory.
        for seq in 1..=count {
            let held = fleet.find(&format!("r{seq}")).unwrap();
            let kept = seq > count - FINISHED_KEPT as u64;
            assert_eq!(held.stored.is_none(), kept, "r{seq}");
            let nodes = held.view.lock().unwrap().nodes.len();
            assert_eq!(nodes, if kept { 4 } else { 0 }, "r{seq}");
        }
        // Every way to read one gives its nodes or its counts all the same.
        let old = fleet.rollout("r1").unwrap();
        assert_eq!(old.nodes.len(), 4, "read back from the store");
        assert_eq!(old.progress().healthy, 4);
        let summaries = fleet.rollout_summaries(0);
        assert_eq!(summaries.len(), count as usize);
        assert!(
            summaries
                .iter()
                .all(|s| s.progress.healthy == 4 && s.progress.total == 4)
        );
        assert_eq!(
            fleet
                .rollouts(0)
                .unwrap()
                .iter()
                .map(|v| v.nodes.len())
                .sum::<usize>(),
            4 * count as usize
        );

        // One more finished in memory (as a rollout that ran here ends): the oldest
        // whole one keeps only its counts once the next rollout starts.
        let newest = finished(count + 1, 2);
        fleet.rollouts.lock().unwrap().insert(
            newest.rollout.id.clone(),
            Arc::new(RolloutHandle::new(newest, 0)),
        );
        let oldest_kept = format!("r{}", count - FINISHED_KEPT as u64 + 1);
        assert!(fleet.find(&oldest_kept).unwrap().stored.is_none());
        fleet.keep_newest_finished();
        let trimmed = fleet.find(&oldest_kept).unwrap();
        assert_eq!(trimmed.stored.map(|p| p.healthy), Some(4));
        assert!(trimmed.view.lock().unwrap().nodes.is_empty());
        assert!(
            fleet
                .find(&format!("r{}", count + 1))
                .unwrap()
                .stored
                .is_none()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_start_takes_an_old_rollouts_counts_from_its_header() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            Arc::new(crate::store::SqliteStore::open(&dir.path().join("fleet.db")).unwrap());
        let counts = Progress {
            total: 4,
            healthy: 3,
            failed: 1,
            ..Progress::default()
        };
        for seq in 1..=FINISHED_KEPT as u64 + 2 {
            let mut v = finished(seq, 4);
            // r1 says what it ended with and has no nodes stored (were they read, it
            // would count 0); r2 was stored by a controller that kept no counts.
            if seq == 1 {
                v.rollout.final_counts = Some(counts);
            } else {
                store
                    .put_rollout_nodes(&v.rollout.id, &v.nodes)
                    .await
                    .unwrap();
            }
            store.put_rollout(&v.rollout).await.unwrap();
        }
        let fleet = Fleet::new(store, Duration::from_secs(10), None).unwrap();
        assert_eq!(fleet.find("r1").unwrap().stored, Some(counts));
        assert_eq!(fleet.find("r2").unwrap().stored.map(|p| p.healthy), Some(4));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_follower_applies_what_etcd_says_changed_key_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            Arc::new(crate::store::SqliteStore::open(&dir.path().join("fleet.db")).unwrap());
        let running = RolloutView::for_test(&["n0", "n1"]);
        store.put_rollout_nodes("r1", &running.nodes).await.unwrap();
        store.put_rollout(&running.rollout).await.unwrap();
        store
            .put_node(&crate::inventory::NodeRecord::for_test("gone", 1))
            .await
            .unwrap();
        let fleet = Fleet::new(store.clone(), Duration::from_secs(10), None).unwrap();
        let before = fleet.find("r1").unwrap();
        let mut changes = fleet.changes.subscribe();

        // What the leader wrote meanwhile: r1's n0 healthy and its next batch, a new
        // rollout r2 (its nodes in the store, as the leader writes them before the
        // header), a node that heartbeat for the first time, one forgotten.
        let mut healthy = running.nodes[0].clone();
        healthy.set(NodeState::Healthy, "healthy", 7);
        let mut header = running.rollout.clone();
        header.current_batch = 1;
        let mut new = finished(2, 3);
        new.rollout.state = RolloutState::Running;
        store.put_rollout_nodes("r2", &new.nodes).await.unwrap();
        let mut burst = crate::follow::Burst::default();
        burst.add("rollout_nodes/r1/n0", Some(&json(&healthy)));
        burst.add("rollouts/r1", Some(&json(&header)));
        burst.add("rollout_nodes/r2/n0", Some(&json(&new.nodes[0])));
        burst.add("rollouts/r2", Some(&json(&new.rollout)));
        burst.add(
            "nodes/web-1",
            Some(&json(&crate::inventory::NodeRecord::for_test("web-1", 3))),
        );
        burst.add("nodes/gone", None);
        assert!(fleet.follow(burst).unwrap());

        let after = fleet.find("r1").unwrap();
        assert!(Arc::ptr_eq(&before, &after), "r1 changed in place");
        {
            let view = after.view.lock().unwrap();
            assert_eq!(view.nodes[0].state, NodeState::Healthy);
            assert_eq!(view.nodes[1].state, running.nodes[1].state);
            assert_eq!(view.rollout.current_batch, 1);
        }
        let r2 = fleet.rollout("r2").unwrap();
        assert_eq!(r2.nodes.len(), 3, "read whole from the store");
        assert_eq!(fleet.inventory.get("web-1").map(|n| n.generation), Some(3));
        assert!(fleet.inventory.get("gone").is_none());
        let mut announced = BTreeSet::new();
        while let Ok(change) = changes.try_recv() {
            announced.insert(format!("{change:?}"));
        }
        for expected in [
            r#"Rollout("r1")"#,
            r#"Rollout("r2")"#,
            r#"Node("web-1")"#,
            r#"Node("gone")"#,
        ] {
            assert!(announced.contains(expected), "{expected} in {announced:?}");
        }

        // A leader's memory is the truth: it applies nothing.
        fleet.leading.store(true, Ordering::SeqCst);
        let mut burst = crate::follow::Burst::default();
        burst.add(
            "nodes/gone",
            Some(&json(&crate::inventory::NodeRecord::for_test("gone", 1))),
        );
        assert!(!fleet.follow(burst).unwrap());
        assert!(fleet.inventory.get("gone").is_none());
    }

    /// A record as the store writes it.
    fn json<T: serde::Serialize>(record: &T) -> Vec<u8> {
        serde_json::to_vec(record).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rollout_id_with_node_rows_but_no_header_is_passed_over() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            Arc::new(crate::store::SqliteStore::open(&dir.path().join("fleet.db")).unwrap());
        let fleet = Fleet::new(store.clone(), Duration::from_secs(10), None).unwrap();
        assert_eq!(fleet.next_seq().unwrap(), 1);
        // What a controller that died between a plan's two writes leaves: r1's nodes,
        // no header. A controller started on it must not plan r1 again.
        let cut_short = RolloutView::for_test(&["n0", "n1"]);
        store
            .put_rollout_nodes("r1", &cut_short.nodes)
            .await
            .unwrap();
        let fleet = Fleet::new(store.clone(), Duration::from_secs(10), None).unwrap();
        assert_eq!(fleet.next_seq().unwrap(), 2);
        assert!(
            fleet.find("r1").is_err(),
            "rows without a header are no rollout"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reload_leaves_the_rollouts_held_as_counts_as_they_are() {
        let (_dir, fleet) = with_finished(FINISHED_KEPT as u64 + 2).await;
        let before = fleet.find("r1").unwrap();
        assert!(before.stored.is_some());
        let mut changes = fleet.changes.subscribe();
        // What a follower does after any change in etcd.
        fleet.reload_rollouts(false).unwrap();
        assert!(
            Arc::ptr_eq(&before, &fleet.find("r1").unwrap()),
            "the same handle"
        );
        assert!(
            changes.try_recv().is_err(),
            "no rollout announced as changed"
        );
    }
}
