//! The inventory of agents: what each node last said about itself in a heartbeat (or,
//! for static nodes, what its `Status` returned), and which nodes have gone quiet.
//! Listing a page of it, with counts over every node a listing matches, is in `page`.

/// One page of the nodes in id order, with counts over every matching node.
pub mod page;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use fleet_proto::limits;
use fleet_proto::v1 as pb;
use serde::{Deserialize, Serialize};

use crate::store::Store;

use crate::{Change, now_ms};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExeRecord {
    pub path: String,
    pub sha256: String,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListenerRecord {
    pub server: String,
    pub addr: String,
    pub tls: bool,
}

/// Why a node was not forgotten.
#[derive(Debug, thiserror::Error)]
pub enum ForgetError {
    #[error("no node {0:?}: see `fleetctl nodes`")]
    NotFound(String),
    #[error("{0}")]
    Live(String),
    #[error("the node was not removed from the store: {0}")]
    Store(crate::store::StoreError),
}

/// The state of a node whose agent shut down on purpose (its last heartbeat said so):
/// shown as such, not as unreachable, and left out of new rollouts.
pub const STOPPED: &str = "stopped";

/// One node as the controller knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub node_id: String,
    pub labels: BTreeMap<String, String>,
    /// The agent's own state (`stopped` after a shutdown), or `unreachable`.
    pub state: String,
    pub control_addr: String,
    pub admin_url: String,
    pub exe: ExeRecord,
    pub generation: u64,
    pub supervisor_pid: u32,
    pub worker_pid: u32,
    pub in_flight: u64,
    pub last_heartbeat_unix_ms: u64,
    pub started_at_unix_ms: u64,
    pub reason: String,
    pub static_node: bool,
    pub listeners: Vec<ListenerRecord>,
    /// The agent's own ready and drain timeouts (0: an agent too old to say).
    #[serde(default)]
    pub ready_timeout_ms: u64,
    #[serde(default)]
    pub drain_timeout_ms: u64,
    /// When the leader found it had missed its heartbeats (0: it had not). Written
    /// once, when the node goes quiet, so that followers, which hear no heartbeats,
    /// show it unreachable too; the next accepted heartbeat writes the node without it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub stale_since_unix_ms: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl NodeRecord {
    /// Whether [`Inventory::forget`] takes it: it no longer heartbeats (stopped or
    /// unreachable) and the controller does not poll it (not a static node).
    pub fn forgettable(&self) -> bool {
        !self.static_node && (self.state == STOPPED || self.state == "unreachable")
    }

    pub fn from_status(status: &pb::StatusResponse, static_node: bool) -> Self {
        let exe = status.exe.clone().unwrap_or_default();
        let worker = status
            .workers
            .iter()
            .find(|w| w.generation == status.generation);
        Self {
            node_id: status.node_id.clone(),
            labels: status.labels.clone().into_iter().collect(),
            state: status.state.clone(),
            control_addr: status.control_addr.clone(),
            admin_url: status.admin_url.clone(),
            exe: ExeRecord {
                path: exe.path,
                sha256: exe.sha256,
                size: exe.size,
            },
            generation: status.generation,
            supervisor_pid: status.supervisor_pid,
            worker_pid: worker.map(|w| w.pid).unwrap_or(0),
            // Old and new generations both count while a restart drains.
            in_flight: status.workers.iter().map(|w| w.in_flight).sum(),
            last_heartbeat_unix_ms: now_ms(),
            started_at_unix_ms: status.started_at_unix_ms,
            reason: String::new(),
            static_node,
            listeners: status
                .listeners
                .iter()
                .map(|l| ListenerRecord {
                    server: l.server.clone(),
                    addr: l.addr.clone(),
                    tls: l.tls,
                })
                .collect(),
            ready_timeout_ms: status.ready_timeout_ms,
            drain_timeout_ms: status.drain_timeout_ms,
            stale_since_unix_ms: 0,
        }
    }

    /// Whether [`Self::from_status`] of `status` would give the same facts as this
    /// record ([`Self::same_facts`]), compared in place: most heartbeats say nothing new,
    /// and building a record for each (a dozen strings and a map) was most of the
    /// controller's own work per beat. Every field named, as in `same_facts`.
    fn reports_same(&self, status: &pb::StatusResponse, static_node: bool) -> bool {
        let NodeRecord {
            node_id,
            labels,
            state,
            control_addr,
            admin_url,
            exe,
            generation,
            supervisor_pid,
            worker_pid,
            in_flight: _,
            last_heartbeat_unix_ms: _,
            started_at_unix_ms,
            reason,
            static_node: was_static,
            listeners,
            ready_timeout_ms,
            drain_timeout_ms,
            stale_since_unix_ms,
        } = self;
        let reported_exe = status.exe.as_ref();
        let reported_worker = status
            .workers
            .iter()
            .find(|w| w.generation == status.generation)
            .map_or(0, |w| w.pid);
        *node_id == status.node_id
            && *state == status.state
            && *generation == status.generation
            && *worker_pid == reported_worker
            && *supervisor_pid == status.supervisor_pid
            && *started_at_unix_ms == status.started_at_unix_ms
            && *was_static == static_node
            && *ready_timeout_ms == status.ready_timeout_ms
            && *drain_timeout_ms == status.drain_timeout_ms
            && *stale_since_unix_ms == 0
            && reason.is_empty()
            && *control_addr == status.control_addr
            && *admin_url == status.admin_url
            && exe.path == reported_exe.map_or("", |e| e.path.as_str())
            && exe.sha256 == reported_exe.map_or("", |e| e.sha256.as_str())
            && exe.size == reported_exe.map_or(0, |e| e.size)
            && labels.len() == status.labels.len()
            && status
                .labels
                .iter()
                .all(|(k, v)| labels.get(k).is_some_and(|mine| mine == v))
            && listeners.len() == status.listeners.len()
            && listeners.iter().zip(&status.listeners).all(|(mine, l)| {
                mine.server == l.server && mine.addr == l.addr && mine.tls == l.tls
            })
    }

    /// Same node facts apart from the heartbeat time and load (not worth a write).
    /// Field by field, every field named (a new one must be placed on one side or the
    /// other), without copying either node: it runs on every heartbeat.
    fn same_facts(&self, other: &NodeRecord) -> bool {
        let NodeRecord {
            node_id,
            labels,
            state,
            control_addr,
            admin_url,
            exe,
            generation,
            supervisor_pid,
            worker_pid,
            in_flight: _,
            last_heartbeat_unix_ms: _,
            started_at_unix_ms,
            reason,
            static_node,
            listeners,
            ready_timeout_ms,
            drain_timeout_ms,
            stale_since_unix_ms,
        } = self;
        *node_id == other.node_id
            && *state == other.state
            && *generation == other.generation
            && *worker_pid == other.worker_pid
            && *supervisor_pid == other.supervisor_pid
            && *started_at_unix_ms == other.started_at_unix_ms
            && *static_node == other.static_node
            && *ready_timeout_ms == other.ready_timeout_ms
            && *drain_timeout_ms == other.drain_timeout_ms
            && *stale_since_unix_ms == other.stale_since_unix_ms
            && *control_addr == other.control_addr
            && *admin_url == other.admin_url
            && *reason == other.reason
            && *exe == other.exe
            && *labels == other.labels
            && *listeners == other.listeners
    }
}

/// `zone=a,role=web`: every pair must match.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Selector(Vec<(String, String)>);

impl Selector {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut pairs = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.split_once('=') {
                Some((k, v)) if !k.trim().is_empty() => {
                    pairs.push((k.trim().to_string(), v.trim().to_string()))
                }
                _ => {
                    return Err(format!(
                        "selector part {part:?} must look like key=value (e.g. zone=a,role=web)"
                    ));
                }
            }
        }
        Ok(Self(pairs))
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

#[derive(Debug)]
pub struct Inventory {
    /// Keyed (and so ordered) by node id: a page of a listing is a walk in id order
    /// from where the previous page ended.
    nodes: RwLock<BTreeMap<String, NodeRecord>>,
    ttl: Duration,
    /// `--max-nodes`: a heartbeat of a node not yet known is refused at this many.
    max_nodes: AtomicUsize,
    /// Refused heartbeats are logged at most once a second (a flood of them must not
    /// become a flood of log lines): when the last was logged, and how many since.
    refusals_logged_ms: AtomicU64,
    refusals_unlogged: AtomicU64,
    store: Arc<dyn Store>,
    changes: tokio::sync::broadcast::Sender<Change>,
    /// Until when each node's certificate (mutual TLS) is valid, as issued since this
    /// controller started; forgetting a node forgets it.
    certificates: std::sync::Mutex<HashMap<String, std::time::SystemTime>>,
    /// A follower of an elected leader ([`crate::ha`]): nodes are as the leader last
    /// stored them (it alone hears their heartbeats), never found stale here.
    follower: std::sync::atomic::AtomicBool,
}

/// The default of `--max-nodes`: a fleet of 100,000 agents on one controller.
pub const DEFAULT_MAX_NODES: usize = 100_000;

/// Why a heartbeat (or a static node's status) was not recorded. Nothing of it is
/// kept, in memory or in the store.
#[derive(Debug, thiserror::Error)]
pub enum HeartbeatError {
    /// A field is missing or over its limit ([`fleet_proto::limits`]).
    #[error("{0}")]
    Invalid(String),
    /// A new node, and the inventory already holds `--max-nodes`.
    #[error("{0}")]
    Full(String),
}

impl HeartbeatError {
    pub fn status(&self) -> tonic::Status {
        match self {
            HeartbeatError::Invalid(m) => tonic::Status::invalid_argument(m),
            HeartbeatError::Full(m) => tonic::Status::resource_exhausted(m),
        }
    }
}

impl Inventory {
    pub fn new(
        store: Arc<dyn Store>,
        ttl: Duration,
        changes: tokio::sync::broadcast::Sender<Change>,
    ) -> Result<Self, crate::store::StoreError> {
        let mut nodes = BTreeMap::new();
        for mut node in store.load_nodes()? {
            // Known from before the controller restarted: one ttl of grace for its
            // next heartbeat before it counts as unreachable.
            node.last_heartbeat_unix_ms = now_ms();
            node.stale_since_unix_ms = 0;
            nodes.insert(node.node_id.clone(), node);
        }
        Ok(Self {
            nodes: RwLock::new(nodes),
            ttl,
            max_nodes: AtomicUsize::new(DEFAULT_MAX_NODES),
            refusals_logged_ms: AtomicU64::new(0),
            refusals_unlogged: AtomicU64::new(0),
            store,
            changes,
            certificates: Default::default(),
            follower: Default::default(),
        })
    }

    /// Replaces the nodes with the store's. `lead`: this controller leads from now on,
    /// and every node gets one TTL of grace for its next heartbeat; else each node is
    /// as the leader stored it.
    pub fn reload(&self, lead: bool) -> Result<(), crate::store::StoreError> {
        let mut loaded = BTreeMap::new();
        for mut node in self.store.load_nodes()? {
            if lead {
                node.last_heartbeat_unix_ms = now_ms();
                node.stale_since_unix_ms = 0;
            }
            loaded.insert(node.node_id.clone(), node);
        }
        let changed: Vec<String> = {
            let mut nodes = self.nodes.write().expect("inventory lock");
            let changed = loaded
                .iter()
                .filter(|(id, n)| nodes.get(*id).is_none_or(|old| !old.same_facts(n)))
                .map(|(id, _)| id.clone())
                .chain(nodes.keys().filter(|id| !loaded.contains_key(*id)).cloned())
                .collect();
            *nodes = loaded;
            changed
        };
        for id in changed {
            let _ = self.changes.send(Change::Node(id));
        }
        Ok(())
    }

    /// While following: the nodes a burst of etcd events wrote (`None`: deleted), as the
    /// leader stored them; each one whose facts changed is announced.
    pub fn follow(&self, written: BTreeMap<String, Option<NodeRecord>>) {
        let mut changed = Vec::new();
        {
            let mut nodes = self.nodes.write().expect("inventory lock");
            for (id, node) in written {
                let differs = match (&node, nodes.get(&id)) {
                    (Some(new), Some(old)) => !old.same_facts(new),
                    (None, None) => false,
                    _ => true,
                };
                match node {
                    Some(node) => {
                        nodes.insert(id.clone(), node);
                    }
                    None => {
                        nodes.remove(&id);
                    }
                }
                if differs {
                    changed.push(id);
                }
            }
        }
        for id in changed {
            let _ = self.changes.send(Change::Node(id));
        }
    }

    /// Follows an elected leader (`true`), or leads (`false`): see `follower`.
    pub fn set_follower(&self, follower: bool) {
        self.follower.store(follower, Ordering::Relaxed);
    }

    /// Notes that `node_id` was given a certificate valid until `until`.
    pub fn note_certificate(&self, node_id: &str, until: std::time::SystemTime) {
        let mut certs = self.certificates.lock().expect("certificates lock");
        let now = std::time::SystemTime::now();
        certs.retain(|_, t| *t > now);
        certs.insert(node_id.to_string(), until);
    }

    /// Until when `node_id`'s certificate is valid, if it was given one that still is.
    pub fn certificate_until(&self, node_id: &str) -> Option<std::time::SystemTime> {
        let certs = self.certificates.lock().expect("certificates lock");
        certs
            .get(node_id)
            .copied()
            .filter(|t| *t > std::time::SystemTime::now())
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// At most this many nodes: a heartbeat of a new node beyond it is refused (nodes
    /// already known keep heartbeating, even if there are more of them).
    pub fn set_max_nodes(&self, max: usize) {
        self.max_nodes.store(max, Ordering::Relaxed);
    }

    pub fn max_nodes(&self) -> usize {
        self.max_nodes.load(Ordering::Relaxed)
    }

    /// Records a heartbeat (or a static node's status), once every field is within
    /// [`fleet_proto::limits`] and, for a node not known yet, there is room for it.
    pub fn report(
        &self,
        status: &pb::StatusResponse,
        static_node: bool,
    ) -> Result<(), HeartbeatError> {
        let checked = Self::check(status).and_then(|()| self.record(status, static_node));
        if let Err(e) = &checked {
            crate::metrics::global().heartbeat_refused(match e {
                HeartbeatError::Invalid(_) => "invalid",
                HeartbeatError::Full(_) => "full",
            });
            self.log_refusal(e);
        }
        checked
    }

    /// Every field within its bound, before anything is built from them.
    fn check(status: &pb::StatusResponse) -> Result<(), HeartbeatError> {
        if status.node_id.trim().is_empty() {
            return Err(HeartbeatError::Invalid(
                "heartbeat without a node id: start the agent with --node-id".into(),
            ));
        }
        if status.control_addr.is_empty() {
            return Err(HeartbeatError::Invalid(format!(
                "node {} sent no control address",
                limits::shown(&status.node_id)
            )));
        }
        limits::check_status(status).map_err(|refusal| {
            HeartbeatError::Invalid(match limits::check_node_id(&status.node_id) {
                Ok(()) => format!("heartbeat of node {} refused: {refusal}", status.node_id),
                Err(_) => format!("heartbeat refused: {refusal}"),
            })
        })
    }

    fn record(&self, status: &pb::StatusResponse, static_node: bool) -> Result<(), HeartbeatError> {
        // A known node saying what it said before: its time and load, in place.
        {
            let mut nodes = self.nodes.write().expect("inventory lock");
            if let Some(old) = nodes.get_mut(&status.node_id)
                && !self.is_stale(old)
                && old.reports_same(status, static_node)
            {
                old.in_flight = status.workers.iter().map(|w| w.in_flight).sum();
                old.last_heartbeat_unix_ms = now_ms();
                drop(nodes);
                crate::metrics::global().heartbeat_accepted();
                return Ok(());
            }
        }
        let record = NodeRecord::from_status(status, static_node);
        // Most heartbeats change nothing but the time and load: the record moves into
        // the inventory, and only a new or changed one is copied, for the store. `was`:
        // the state it leaves as the API showed it (`unreachable` once stale), when it
        // differs from the new one; None for a node heard for the first time.
        let changed: Option<(NodeRecord, Option<String>)> = {
            let mut nodes = self.nodes.write().expect("inventory lock");
            let full = nodes.len() >= self.max_nodes();
            match nodes.get_mut(&record.node_id) {
                None if full => {
                    let max = self.max_nodes();
                    return Err(HeartbeatError::Full(format!(
                        "node {} is not registered: the controller already holds {} nodes, its limit \
                         (--max-nodes {max}); forget stopped or unreachable nodes (fleetctl forget NODE) \
                         or restart the controller with a larger --max-nodes",
                        record.node_id,
                        nodes.len()
                    )));
                }
                None => {
                    nodes.insert(record.node_id.clone(), record.clone());
                    Some((record, None))
                }
                Some(old) => {
                    // A new state is a changed fact, and a stale node always changes.
                    let changed = !old.same_facts(&record) || self.is_stale(old);
                    let out = changed.then(|| {
                        let follower = self.follower.load(Ordering::Relaxed);
                        let shown = self.shown_state(old, now_ms(), follower);
                        (record.clone(), Some(shown.to_string()))
                    });
                    *old = record;
                    out
                }
            }
        };
        let metrics = crate::metrics::global();
        metrics.heartbeat_accepted();
        if let Some((record, was)) = changed {
            match was.as_deref() {
                None => {
                    metrics.transition("new", &record.state);
                    crate::audit::node_joined(&record.node_id, &record.state, &record.control_addr);
                }
                Some(was) if was != record.state => {
                    metrics.transition(was, &record.state);
                    if was == "unreachable" {
                        crate::audit::node_back(&record.node_id, &record.state);
                    }
                }
                Some(_) => {}
            }
            // Queued now; committed by the writer thread.
            drop(self.store.put_node(&record));
            let _ = self.changes.send(Change::Node(record.node_id));
        }
        Ok(())
    }

    /// A warning per second at most, saying how many more were refused since.
    fn log_refusal(&self, e: &HeartbeatError) {
        let now = now_ms();
        let last = self.refusals_logged_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) < 1000
            || self
                .refusals_logged_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            self.refusals_unlogged.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match self.refusals_unlogged.swap(0, Ordering::Relaxed) {
            0 => tracing::warn!("{e}"),
            more => tracing::warn!("{e} (and {more} more refused since the last such warning)"),
        }
    }

    /// Removes a node that is stopped or unreachable, from memory and (durably) from
    /// the store; returns it as it was.
    pub async fn forget(&self, node_id: &str) -> Result<NodeRecord, ForgetError> {
        let node = {
            let mut nodes = self.nodes.write().expect("inventory lock");
            let Some(node) = nodes.get(node_id) else {
                return Err(ForgetError::NotFound(node_id.to_string()));
            };
            let node = self.effective(node);
            if !node.forgettable() {
                return Err(ForgetError::Live(if node.static_node {
                    format!(
                        "node {node_id} is a static node: remove its --node flag from the controller instead"
                    )
                } else {
                    format!(
                        "node {node_id} is {} and heartbeating: it would register again at its next heartbeat; shut it down first (fleetctl shutdown {node_id})",
                        node.state
                    )
                }));
            }
            nodes.remove(node_id);
            self.certificates
                .lock()
                .expect("certificates lock")
                .remove(node_id);
            node
        };
        self.store
            .delete_node(node_id)
            .await
            .map_err(ForgetError::Store)?;
        let _ = self.changes.send(Change::Node(node_id.to_string()));
        Ok(node)
    }

    /// A static node that could not be reached.
    pub fn unreachable(&self, node_id: &str, reason: String) {
        let mut nodes = self.nodes.write().expect("inventory lock");
        if let Some(node) = nodes.get_mut(node_id)
            && node.reason != reason
        {
            if node.state != "unreachable" {
                crate::metrics::global().transition(&node.state, "unreachable");
                crate::audit::node_unreachable(node_id, &reason);
            }
            node.state = "unreachable".into();
            node.reason = reason;
            let _ = self.changes.send(Change::Node(node_id.to_string()));
        }
    }

    /// It missed its heartbeats. A node that said it stopped is not expected to beat.
    fn is_stale(&self, node: &NodeRecord) -> bool {
        self.is_stale_at(node, now_ms(), self.follower.load(Ordering::Relaxed))
    }

    /// [`Self::is_stale`] at `now`, on a follower or not: one clock read and one load
    /// for a whole listing rather than one per node.
    fn is_stale_at(&self, node: &NodeRecord, now: u64, follower: bool) -> bool {
        !follower
            && node.state != STOPPED
            && now.saturating_sub(node.last_heartbeat_unix_ms) > self.ttl.as_millis() as u64
    }

    /// The state [`Self::effective`] shows, without copying the node: `unreachable` if
    /// it missed its heartbeats (or, on a follower, the leader found it had).
    fn shown_state<'n>(&self, node: &'n NodeRecord, now: u64, follower: bool) -> &'n str {
        if self.quiet(node, now, follower) {
            "unreachable"
        } else {
            &node.state
        }
    }

    /// Whether [`Self::effective`] shows `node` as unreachable whatever its record
    /// says: it missed its heartbeats (or, on a follower, the leader found it had).
    fn quiet(&self, node: &NodeRecord, now: u64, follower: bool) -> bool {
        if follower {
            node.stale_since_unix_ms > 0 && node.state != STOPPED
        } else {
            self.is_stale_at(node, now, follower)
        }
    }

    /// The node as seen now: `unreachable` (with since when) if it missed its heartbeats.
    fn effective(&self, node: &NodeRecord) -> NodeRecord {
        let mut node = node.clone();
        if node.stale_since_unix_ms > 0
            && node.state != STOPPED
            && self.follower.load(Ordering::Relaxed)
        {
            // As the leader found it and wrote it (a follower hears no heartbeats).
            node.state = "unreachable".into();
            if node.reason.is_empty() {
                node.reason = format!(
                    "no heartbeat since {} (as the leader found it)",
                    humantime::format_rfc3339_seconds(
                        std::time::UNIX_EPOCH + Duration::from_millis(node.last_heartbeat_unix_ms)
                    )
                );
            }
        } else if self.is_stale(&node) {
            let ago = Duration::from_millis(now_ms().saturating_sub(node.last_heartbeat_unix_ms));
            node.state = "unreachable".into();
            if node.reason.is_empty() {
                node.reason = format!(
                    "no heartbeat for {} (ttl {})",
                    humantime::format_duration(Duration::from_secs(ago.as_secs())),
                    humantime::format_duration(self.ttl)
                );
            }
        }
        node
    }

    /// Puts `node` in as it is, without a heartbeat's checks or a store write: tests
    /// that need many nodes.
    #[cfg(test)]
    pub(crate) fn insert(&self, node: NodeRecord) {
        let mut nodes = self.nodes.write().expect("inventory lock");
        nodes.insert(node.node_id.clone(), node);
    }

    pub fn get(&self, node_id: &str) -> Option<NodeRecord> {
        let nodes = self.nodes.read().expect("inventory lock");
        nodes.get(node_id).map(|n| self.effective(n))
    }

    /// Every matching node, sorted by id (rollout planning, metrics, `/api/nodes`). A
    /// listing for people goes a page at a time: [`Self::page`].
    pub fn list(&self, selector: &Selector) -> Vec<NodeRecord> {
        let nodes = self.nodes.read().expect("inventory lock");
        nodes
            .values()
            .filter(|n| selector.matches(&n.labels))
            .map(|n| self.effective(n))
            .collect()
    }

    /// Hands each node `selector` matches, in id order and as [`Self::get`] shows it, to
    /// `f`, under the read lock: for a walk that keeps a few fields of each (rollout
    /// planning) where [`Self::list`] would copy every record.
    pub fn each_matching(&self, selector: &Selector, mut f: impl FnMut(&NodeRecord)) {
        let nodes = self.nodes.read().expect("inventory lock");
        let (now, follower) = (now_ms(), self.follower.load(Ordering::Relaxed));
        for node in nodes.values().filter(|n| selector.matches(&n.labels)) {
            if self.quiet(node, now, follower) {
                f(&self.effective(node));
            } else {
                f(node);
            }
        }
    }

    /// Announces nodes that just went quiet, so live views update.
    pub async fn watch_staleness(self: Arc<Self>) {
        let mut stale: std::collections::HashSet<String> = Default::default();
        let mut tick = tokio::time::interval(staleness_tick(self.ttl));
        loop {
            tick.tick().await;
            let (now_stale, states): (std::collections::HashSet<String>, HashMap<String, String>) = {
                let nodes = self.nodes.read().expect("inventory lock");
                let (now, follower) = (now_ms(), self.follower.load(Ordering::Relaxed));
                nodes
                    .values()
                    .filter(|n| self.is_stale_at(n, now, follower))
                    .map(|n| (n.node_id.clone(), (n.node_id.clone(), n.state.clone())))
                    .unzip()
            };
            // Each node that just went quiet is written once, marked, for the
            // followers (and for the record); its next heartbeat writes it unmarked.
            let newly: Vec<NodeRecord> = {
                let mut nodes = self.nodes.write().expect("inventory lock");
                now_stale
                    .difference(&stale)
                    .filter_map(|id| {
                        let node = nodes.get_mut(id)?;
                        if node.stale_since_unix_ms > 0 || !self.is_stale(node) {
                            return None;
                        }
                        node.stale_since_unix_ms = now_ms();
                        Some(node.clone())
                    })
                    .collect()
            };
            for node in &newly {
                // Queued now; committed by the writer thread. Refused on a deposed
                // leader (fencing), which is then a follower.
                drop(self.store.put_node(node));
            }
            for id in now_stale.difference(&stale) {
                // Counted when it is noticed here: a node that went stale and beat
                // again within one tick ([`staleness_tick`]) is counted as coming back only.
                // A static node whose poll failed was marked (and audited) already.
                if let Some(state) = states.get(id).filter(|s| *s != "unreachable") {
                    crate::metrics::global().transition(state, "unreachable");
                    crate::audit::node_unreachable(
                        id,
                        &format!("no heartbeat for {}", humantime::format_duration(self.ttl)),
                    );
                }
                let _ = self.changes.send(Change::Node(id.clone()));
            }
            stale = now_stale;
        }
    }
}

/// The unit tests' fixtures, shared by the inventory's, the pages' and the dashboard's.
#[cfg(test)]
impl Inventory {
    /// An empty inventory on a fresh SQLite store in `dir`, with a TTL of 10 s.
    pub(crate) fn for_test(dir: &std::path::Path) -> Inventory {
        let store = crate::store::SqliteStore::open(&dir.join("fleet.db")).unwrap();
        let (changes, _) = tokio::sync::broadcast::channel(16);
        Inventory::new(Arc::new(store), Duration::from_secs(10), changes).unwrap()
    }
}

#[cfg(test)]
impl NodeRecord {
    /// A serving node `id` at `generation`, heartbeating now, without labels.
    pub(crate) fn for_test(id: &str, generation: u64) -> NodeRecord {
        NodeRecord {
            node_id: id.into(),
            labels: Default::default(),
            state: "serving".into(),
            control_addr: String::new(),
            admin_url: String::new(),
            exe: ExeRecord {
                path: "/opt/app".into(),
                sha256: String::new(),
                size: 0,
            },
            generation,
            supervisor_pid: 1,
            worker_pid: 2,
            in_flight: 0,
            last_heartbeat_unix_ms: now_ms(),
            started_at_unix_ms: 0,
            reason: String::new(),
            static_node: false,
            listeners: Vec::new(),
            ready_timeout_ms: 0,
            drain_timeout_ms: 0,
            stale_since_unix_ms: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The in-place comparison of a heartbeat agrees with building its record and
    /// comparing that, for a change of each field `from_status` reads (and for none).
    #[test]
    fn a_heartbeat_is_the_same_in_place_exactly_when_its_record_would_be() {
        let base = pb::StatusResponse {
            node_id: "web-1".into(),
            labels: [("zone".to_string(), "a".to_string())].into(),
            state: "serving".into(),
            control_addr: "127.0.0.1:7101".into(),
            admin_url: "http://127.0.0.1:7101/debug/admin".into(),
            exe: Some(pb::ExeInfo {
                path: "/opt/app".into(),
                sha256: "ab".repeat(32),
                size: 7,
            }),
            generation: 3,
            supervisor_pid: 10,
            workers: vec![pb::Worker {
                generation: 3,
                pid: 11,
                in_flight: 2,
                ..Default::default()
            }],
            started_at_unix_ms: 1_000,
            listeners: vec![pb::Listener {
                server: "default".into(),
                addr: "127.0.0.1:8199".into(),
                tls: false,
            }],
            ready_timeout_ms: 30_000,
            drain_timeout_ms: 60_000,
            ..Default::default()
        };
        let record = NodeRecord::from_status(&base, false);
        type Change = fn(&mut pb::StatusResponse);
        let changes: &[(&str, Change)] = &[
            ("nothing", |_| {}),
            ("in flight only", |s| s.workers[0].in_flight = 9),
            ("node id", |s| s.node_id = "web-2".into()),
            ("a label value", |s| {
                s.labels.insert("zone".into(), "b".into());
            }),
            ("a label more", |s| {
                s.labels.insert("role".into(), "web".into());
            }),
            ("no labels", |s| s.labels.clear()),
            ("state", |s| s.state = "restarting".into()),
            ("control address", |s| {
                s.control_addr = "127.0.0.1:7102".into()
            }),
            ("admin URL", |s| s.admin_url = "http://x/".into()),
            ("exe path", |s| {
                s.exe.as_mut().unwrap().path = "/opt/app2".into()
            }),
            ("exe digest", |s| {
                s.exe.as_mut().unwrap().sha256 = "cd".repeat(32)
            }),
            ("exe size", |s| s.exe.as_mut().unwrap().size = 8),
            ("no exe", |s| s.exe = None),
            ("generation", |s| s.generation = 4),
            ("supervisor pid", |s| s.supervisor_pid = 12),
            ("worker pid", |s| s.workers[0].pid = 13),
            ("the worker of another generation", |s| {
                s.workers[0].generation = 2
            }),
            ("started at", |s| s.started_at_unix_ms = 2_000),
            ("a listener's address", |s| {
                s.listeners[0].addr = "127.0.0.1:1".into()
            }),
            ("a listener's TLS", |s| s.listeners[0].tls = true),
            ("a listener's server", |s| {
                s.listeners[0].server = "api".into()
            }),
            ("a listener more", |s| s.listeners.push(Default::default())),
            ("ready timeout", |s| s.ready_timeout_ms = 1),
            ("drain timeout", |s| s.drain_timeout_ms = 1),
        ];
        for (what, change) in changes {
            let mut status = base.clone();
            change(&mut status);
            for static_node in [false, true] {
                assert_eq!(
                    record.reports_same(&status, static_node),
                    record.same_facts(&NodeRecord::from_status(&status, static_node)),
                    "{what}, static {static_node}"
                );
            }
        }
        assert!(record.reports_same(&base, false));
        // A record that carries what no heartbeat says (a reason, a stale mark) is
        // never the same: the heartbeat clears it.
        for marked in [
            NodeRecord {
                reason: "missed its heartbeats".into(),
                ..record.clone()
            },
            NodeRecord {
                stale_since_unix_ms: 5,
                ..record.clone()
            },
        ] {
            assert!(!marked.reports_same(&base, false));
            assert!(!marked.same_facts(&NodeRecord::from_status(&base, false)));
        }
    }

    fn status(id: &str) -> pb::StatusResponse {
        pb::StatusResponse {
            node_id: id.into(),
            state: "serving".into(),
            control_addr: "127.0.0.1:7101".into(),
            admin_url: "http://127.0.0.1:7101/debug/admin".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_status_over_a_limit_is_refused_and_nothing_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let inventory = Inventory::for_test(dir.path());
        let mut big = status("node-1");
        big.labels.insert("big".into(), "x".repeat(16 << 20));
        let e = inventory.report(&big, false).unwrap_err();
        assert!(matches!(e, HeartbeatError::Invalid(_)));
        assert_eq!(
            e.to_string(),
            format!(
                "heartbeat of node node-1 refused: label \"big\" value \"{}\"… is 16777216 bytes, over the limit of 256",
                "x".repeat(40)
            )
        );
        let e = inventory.report(&status("bad id"), false).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("heartbeat refused: node_id \"bad id\" holds ' '"),
            "{e}"
        );
        let mut js = status("node-1");
        js.admin_url = "javascript:alert(1)".into();
        let e = inventory.report(&js, false).unwrap_err().to_string();
        assert!(
            e.contains("admin_url \"javascript:alert(1)\" must start with http:// or https://"),
            "{e}"
        );
        assert!(inventory.list(&Selector::default()).is_empty());
        assert!(inventory.store.load_nodes().unwrap().is_empty());
    }

    /// (id, state, reason) of every node as rollout planning walks them.
    fn walked(inv: &Inventory) -> Vec<(String, String, String)> {
        let mut seen = Vec::new();
        inv.each_matching(&Selector::default(), |n| {
            seen.push((n.node_id.clone(), n.state.clone(), n.reason.clone()))
        });
        seen
    }

    /// The same as `get` shows each node.
    fn shown_as_got(inv: &Inventory) -> Vec<(String, String, String)> {
        inv.list(&Selector::default())
            .into_iter()
            .map(|n| (n.node_id, n.state, n.reason))
            .collect()
    }

    #[tokio::test]
    async fn planning_walks_a_node_past_its_ttl_as_unreachable_before_it_is_written_so() {
        // The leader shows a quiet node unreachable as soon as its TTL has passed, not
        // when its staleness tick writes it (none runs here): planning must see it so
        // too, or it would ask it for a preflight that cannot be answered.
        let dir = tempfile::tempdir().unwrap();
        let inventory = Inventory::new(
            Arc::new(crate::store::SqliteStore::open(&dir.path().join("fleet.db")).unwrap()),
            Duration::from_millis(50),
            tokio::sync::broadcast::channel(8).0,
        )
        .unwrap();
        inventory.report(&status("quiet"), false).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while inventory.get("quiet").unwrap().state != "unreachable" {
            assert!(std::time::Instant::now() < deadline, "never shown quiet");
            inventory.report(&status("beating"), false).unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        inventory.report(&status("beating"), false).unwrap();
        let walked = walked(&inventory);
        assert_eq!(walked, shown_as_got(&inventory));
        assert_eq!(walked[1].1, "unreachable", "{walked:?}");
        assert!(walked[1].2.contains("no heartbeat for"), "{walked:?}");
        assert_eq!(walked[0].1, "serving", "{walked:?}");
    }

    #[tokio::test]
    async fn a_node_gone_quiet_is_written_once_marked_so_followers_show_it_unreachable() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn crate::store::Store> =
            Arc::new(crate::store::SqliteStore::open(&dir.path().join("fleet.db")).unwrap());
        let (changes, _) = tokio::sync::broadcast::channel(64);
        let ttl = Duration::from_millis(100);
        let leader = Arc::new(Inventory::new(store.clone(), ttl, changes.clone()).unwrap());
        let follower = Inventory::new(store.clone(), ttl, changes).unwrap();
        follower.set_follower(true);
        leader.report(&status("quiet"), false).unwrap();
        leader.report(&status("beating"), false).unwrap();
        let watcher = tokio::spawn(leader.clone().watch_staleness());
        let stored = |id: &str| {
            store
                .load_nodes()
                .unwrap()
                .into_iter()
                .find(|n| n.node_id == id)
        };
        let marked = |id: &str| stored(id).map(|n| n.stale_since_unix_ms);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while marked("quiet").unwrap_or(0) == 0 {
            assert!(std::time::Instant::now() < deadline, "never written stale");
            leader.report(&status("beating"), false).unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(marked("beating"), Some(0));
        follower.reload(false).unwrap();
        let shown = |inv: &Inventory| {
            inv.list(&Selector::default())
                .into_iter()
                .map(|n| (n.node_id, n.state))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            shown(&follower),
            [
                ("beating".to_string(), "serving".to_string()),
                ("quiet".to_string(), "unreachable".to_string())
            ]
        );
        let quiet = follower.get("quiet").unwrap();
        assert!(
            quiet.reason.contains("as the leader found it"),
            "{}",
            quiet.reason
        );
        assert_eq!(walked(&follower), shown_as_got(&follower));
        // It beats again: written unmarked, and the follower shows it serving.
        leader.report(&status("quiet"), false).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while marked("quiet") != Some(0) {
            assert!(std::time::Instant::now() < deadline, "never written back");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        follower.reload(false).unwrap();
        assert_eq!(follower.get("quiet").unwrap().state, "serving");
        // A new leader gives every node a TTL of grace, marked or not.
        watcher.abort();
        let mut quiet = stored("quiet").unwrap();
        quiet.stale_since_unix_ms = 1;
        store.put_node(&quiet).await.unwrap();
        follower.set_follower(false);
        follower.reload(true).unwrap();
        assert_eq!(follower.get("quiet").unwrap().state, "serving");
    }

    #[test]
    fn new_nodes_over_the_cap_are_refused_known_ones_keep_beating() {
        let dir = tempfile::tempdir().unwrap();
        let inventory = Inventory::for_test(dir.path());
        inventory.set_max_nodes(2);
        inventory.report(&status("a"), false).unwrap();
        inventory.report(&status("b"), false).unwrap();
        let e = inventory.report(&status("c"), false).unwrap_err();
        assert!(matches!(e, HeartbeatError::Full(_)));
        assert!(
            e.to_string()
                .contains("already holds 2 nodes, its limit (--max-nodes 2)"),
            "{e}"
        );
        let mut again = status("a");
        again.state = "restarting".into();
        inventory.report(&again, false).unwrap();
        let nodes = inventory.list(&Selector::default());
        let ids: Vec<_> = nodes
            .iter()
            .map(|n| (n.node_id.as_str(), n.state.as_str()))
            .collect();
        assert_eq!(ids, [("a", "restarting"), ("b", "serving")]);
    }

    #[test]
    fn selectors() {
        let labels: BTreeMap<String, String> = [
            ("zone".to_string(), "a".to_string()),
            ("role".to_string(), "web".to_string()),
        ]
        .into();
        assert!(Selector::parse("").unwrap().matches(&labels));
        assert!(Selector::parse("zone=a").unwrap().matches(&labels));
        assert!(
            Selector::parse("zone=a, role=web")
                .unwrap()
                .matches(&labels)
        );
        assert!(!Selector::parse("zone=b").unwrap().matches(&labels));
        assert!(Selector::parse("zone").unwrap_err().contains("key=value"));
    }
}

/// How often [`Inventory::watch_staleness`] looks over the fleet: a twentieth of the
/// TTL (a node is found quiet at most 5 % late), between 500 ms and 5 s. Each look
/// reads every node: at 100,000 nodes every 500 ms it was 4 % of the controller's CPU.
fn staleness_tick(ttl: Duration) -> Duration {
    (ttl / 20).clamp(Duration::from_millis(500), Duration::from_secs(5))
}

#[cfg(test)]
mod staleness_tick_tests {
    use super::*;

    #[test]
    fn the_fleet_is_looked_over_a_twentieth_of_the_ttl_apart_within_bounds() {
        for (ttl_s, tick_ms) in [(2, 500), (30, 1500), (60, 3000), (600, 5000)] {
            assert_eq!(
                staleness_tick(Duration::from_secs(ttl_s)),
                Duration::from_millis(tick_ms),
                "ttl {ttl_s} s"
            );
        }
    }
}
