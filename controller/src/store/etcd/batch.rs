//! One group commit, planned without a server: the writes queued since the last
//! commit in, etcd operations out, one per key (etcd refuses a transaction that names a
//! key twice), cut into transactions etcd accepts.
//!
//! The writer is the only one writing these keys (one controller, or the leader whose
//! fence every transaction checks), so what it learned of the keys stays true between
//! commits: each node's restart keys, and the time index. It forgets all of it whenever
//! a commit fails or the fence changes, and reads it again when next needed.

use std::collections::{BTreeSet, HashMap};

use crate::history::{KEEP_PER_NODE, RestartRecord};

/// etcd's default `--max-txn-ops`.
pub const MAX_TXN_OPS: usize = 128;
/// Under etcd's default `--max-request-bytes` (1.5 MiB), with room for the framing.
pub const MAX_TXN_BYTES: usize = 1024 * 1024;
/// The fleet's newest restarts kept in the time index (`restart_times/`), which
/// `load_restarts(None, ..)` reads: the nodes page charts the last 200.
pub const RECENT_KEEP: usize = 1000;

/// What the controller asked to store, in the order it asked.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    Node(String, String),
    DeleteNode(String),
    Rollout(String, String),
    RolloutNode(String, String, String),
    Token(String, String),
    TouchToken(String, u64),
    Restart {
        node: String,
        at_unix_ms: u64,
        old_pid: u32,
        json: String,
    },
    RestartDrain(String, u32, u64),
}

/// Keys, relative to the store's prefix.
pub mod key {
    pub fn node(id: &str) -> String {
        format!("nodes/{id}")
    }
    pub fn rollout(id: &str) -> String {
        format!("rollouts/{id}")
    }
    pub fn rollout_nodes(rollout: &str) -> String {
        format!("rollout_nodes/{rollout}/")
    }
    pub fn rollout_node(rollout: &str, node: &str) -> String {
        format!("rollout_nodes/{rollout}/{node}")
    }
    pub fn token(id: &str) -> String {
        format!("tokens/{id}")
    }
    /// A token's last use, apart from its record (like SQLite's column), as
    /// [`padded`] milliseconds: etcd compares values as bytes.
    pub fn token_last_used(id: &str) -> String {
        format!("token_last_used/{id}")
    }
    /// A node's restarts: `restarts/NODE/` then a [`restart_suffix`], so that they
    /// sort oldest first.
    pub fn restarts(node: &str) -> String {
        format!("restarts/{node}/")
    }
    pub fn restart(node: &str, suffix: &str) -> String {
        format!("restarts/{node}/{suffix}")
    }
    /// The time index: the fleet's newest restarts, oldest first; the value is the
    /// restart's key.
    pub const RESTART_TIMES: &str = "restart_times/";
    pub fn restart_time(node: &str, suffix: &str) -> String {
        let at = &suffix[..suffix.len().min(20)];
        format!("restart_times/{at}/{node}/{suffix}")
    }
    pub const NODES: &str = "nodes/";
    pub const ROLLOUTS: &str = "rollouts/";
    pub const ROLLOUT_NODES: &str = "rollout_nodes/";
    pub const TOKENS: &str = "tokens/";
    pub const TOKENS_LAST_USED: &str = "token_last_used/";

    /// `at_unix_ms-old_pid`, zero-padded so that byte order is time order; `-N` after
    /// it when a restart of the same node, time and pid is stored already.
    pub fn restart_suffix(at_unix_ms: u64, old_pid: u32, n: u32) -> String {
        match n {
            0 => format!("{}-{old_pid:010}", padded(at_unix_ms)),
            n => format!("{}-{old_pid:010}-{n}", padded(at_unix_ms)),
        }
    }
    /// The old pid in a [`restart_suffix`].
    pub fn suffix_pid(suffix: &str) -> Option<u32> {
        suffix.split('-').nth(1)?.parse().ok()
    }
    /// 20 digits: any u64, in byte order.
    pub fn padded(n: u64) -> String {
        format!("{n:020}")
    }
}

/// One etcd operation on one key.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
    },
    Delete {
        key: String,
    },
    /// Put `value` unless the key holds a larger one already (values compare as
    /// bytes: [`key::padded`]), and, with `requires`, only while that key exists.
    AtLeast {
        key: String,
        value: String,
        requires: Option<String>,
    },
}

impl Op {
    pub fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::Delete { key } | Op::AtLeast { key, .. } => key,
        }
    }

    /// About what it adds to a request, for [`MAX_TXN_BYTES`].
    fn size(&self) -> usize {
        match self {
            Op::Put { key, value } => 16 + key.len() + value.len(),
            Op::Delete { key } => 16 + key.len(),
            // Two nested transactions, four compares, two puts.
            Op::AtLeast {
                key,
                value,
                requires,
            } => {
                96 + 6 * key.len() + 3 * value.len() + 2 * requires.as_ref().map_or(0, |r| r.len())
            }
        }
    }
}

/// What the writer knows of the keys between commits.
#[derive(Debug, Default)]
pub struct Known {
    /// Each node's restart suffixes, oldest first (nodes not listed: not read yet).
    restarts: HashMap<String, BTreeSet<String>>,
    /// The time index's keys, oldest first (`None`: not read yet).
    recent: Option<BTreeSet<String>>,
}

impl Known {
    /// Forget everything (a commit failed, or the fence changed): read again on need.
    pub fn forget(&mut self) {
        *self = Known::default();
    }

    /// The nodes whose restart keys `writes` need and that are not known yet.
    pub fn unknown_nodes(&self, writes: &[Write]) -> Vec<String> {
        let mut nodes: Vec<String> = writes
            .iter()
            .filter_map(|w| match w {
                Write::DeleteNode(node)
                | Write::Restart { node, .. }
                | Write::RestartDrain(node, _, _) => Some(node),
                _ => None,
            })
            .filter(|node| !self.restarts.contains_key(*node))
            .cloned()
            .collect();
        nodes.sort();
        nodes.dedup();
        nodes
    }

    /// Whether `writes` add restarts while the time index is not known yet.
    pub fn needs_recent(&self, writes: &[Write]) -> bool {
        self.recent.is_none() && writes.iter().any(|w| matches!(w, Write::Restart { .. }))
    }

    /// A node's restart suffixes as read from etcd.
    pub fn learn_restarts(&mut self, node: &str, suffixes: impl IntoIterator<Item = String>) {
        self.restarts
            .insert(node.to_string(), suffixes.into_iter().collect());
    }

    /// The time index's keys (relative) as read from etcd.
    pub fn learn_recent(&mut self, keys: impl IntoIterator<Item = String>) {
        self.recent = Some(keys.into_iter().collect());
    }

    /// The operations for `writes`, applied in order as SQLite applies them in one
    /// transaction, and drain times whose restart records must be read first.
    /// Call [`Known::unknown_nodes`] and [`Known::needs_recent`] first, and learn
    /// what they name.
    pub fn plan(&mut self, writes: &[Write]) -> Plan {
        let mut plan = Plan::default();
        let mut tokens_written: BTreeSet<&str> = BTreeSet::new();
        for write in writes {
            match write {
                Write::Node(id, json) => plan.put(key::node(id), json.as_bytes().to_vec()),
                Write::DeleteNode(id) => {
                    plan.set(Op::Delete { key: key::node(id) });
                    let gone = self.restarts.insert(id.clone(), BTreeSet::new());
                    for suffix in gone.unwrap_or_default() {
                        self.drop_restart(&mut plan, id, &suffix);
                    }
                }
                Write::Rollout(id, json) => plan.put(key::rollout(id), json.as_bytes().to_vec()),
                Write::RolloutNode(rollout, node, json) => {
                    plan.put(key::rollout_node(rollout, node), json.as_bytes().to_vec())
                }
                Write::Token(id, json) => {
                    tokens_written.insert(id);
                    plan.put(key::token(id), json.as_bytes().to_vec())
                }
                Write::TouchToken(id, at) => {
                    let k = key::token_last_used(id);
                    // etcd evaluates every compare before any write of the transaction:
                    // a token created earlier in this batch exists, though etcd does
                    // not see it yet.
                    let requires = (!tokens_written.contains(id.as_str())).then(|| key::token(id));
                    let value = key::padded(*at);
                    let op = match plan.get(&k) {
                        Some(Op::AtLeast {
                            value: was,
                            requires: was_requires,
                            ..
                        }) => Op::AtLeast {
                            key: k,
                            value: value.max(was.clone()),
                            requires: requires.and(was_requires.clone()),
                        },
                        _ => Op::AtLeast {
                            key: k,
                            value,
                            requires,
                        },
                    };
                    plan.set(op);
                }
                Write::Restart {
                    node,
                    at_unix_ms,
                    old_pid,
                    json,
                } => {
                    let stored = self.restarts.entry(node.clone()).or_default();
                    let suffix = (0..)
                        .map(|n| key::restart_suffix(*at_unix_ms, *old_pid, n))
                        .find(|s| !stored.contains(s))
                        .expect("a free suffix");
                    stored.insert(suffix.clone());
                    let doc = key::restart(node, &suffix);
                    let time = key::restart_time(node, &suffix);
                    plan.put(doc.clone(), json.as_bytes().to_vec());
                    plan.put(time.clone(), doc.into_bytes());
                    let recent = self.recent.get_or_insert_with(BTreeSet::new);
                    recent.insert(time);
                    while recent.len() > RECENT_KEEP {
                        let oldest = recent.pop_first().expect("not empty");
                        plan.set(Op::Delete { key: oldest });
                    }
                    let stored = self.restarts.get_mut(node).expect("inserted");
                    let mut dropped = Vec::new();
                    while stored.len() > KEEP_PER_NODE {
                        dropped.push(stored.pop_first().expect("not empty"));
                    }
                    for suffix in dropped {
                        self.drop_restart(&mut plan, node, &suffix);
                    }
                }
                Write::RestartDrain(node, old_pid, drain_us) => {
                    let latest = self.restarts.get(node).and_then(|stored| {
                        stored
                            .iter()
                            .rev()
                            .find(|s| key::suffix_pid(s) == Some(*old_pid))
                    });
                    let Some(suffix) = latest else { continue };
                    let doc = key::restart(node, suffix);
                    match plan.get(&doc) {
                        Some(Op::Put { value, .. }) => {
                            if let Some(set) = with_drain(value, *drain_us) {
                                plan.put(doc, set);
                            }
                        }
                        Some(_) => {}
                        None => {
                            if !plan.drains.iter().any(|(k, _)| *k == doc) {
                                plan.drains.push((doc, *drain_us));
                            }
                        }
                    }
                }
            }
        }
        plan
    }

    fn drop_restart(&mut self, plan: &mut Plan, node: &str, suffix: &str) {
        plan.set(Op::Delete {
            key: key::restart(node, suffix),
        });
        let time = key::restart_time(node, suffix);
        if let Some(recent) = &mut self.recent {
            recent.remove(&time);
        }
        plan.set(Op::Delete { key: time });
    }
}

/// The record with its drain time set, unless it has one already (or is not a
/// restart record).
fn with_drain(json: &[u8], drain_us: u64) -> Option<Vec<u8>> {
    let mut record: RestartRecord = serde_json::from_slice(json).ok()?;
    if record.drain_us != 0 {
        return None;
    }
    record.drain_us = drain_us;
    serde_json::to_vec(&record).ok()
}

/// A batch's operations, in the order their keys were first written (so that a
/// record and its index usually land in the same transaction), one per key.
#[derive(Debug, Default)]
pub struct Plan {
    ops: Vec<Op>,
    at: HashMap<String, usize>,
    /// Drain times for restarts stored before this batch: (key, µs). Their records
    /// must be read, then given to [`Plan::drain_read`].
    pub drains: Vec<(String, u64)>,
}

impl Plan {
    fn get(&self, key: &str) -> Option<&Op> {
        self.at.get(key).map(|&i| &self.ops[i])
    }

    fn put(&mut self, key: String, value: Vec<u8>) {
        self.set(Op::Put { key, value });
    }

    /// The key's last operation wins; it keeps the place of its first.
    fn set(&mut self, op: Op) {
        match self.at.get(op.key()) {
            Some(&i) => self.ops[i] = op,
            None => {
                self.at.insert(op.key().to_string(), self.ops.len());
                self.ops.push(op);
            }
        }
    }

    /// A restart record named in [`Plan::drains`] as read (`None`: gone): its drain
    /// time is set unless it has one, or this batch deleted it.
    pub fn drain_read(&mut self, key: &str, record: Option<&[u8]>) {
        let Some(&(_, drain_us)) = self.drains.iter().find(|(k, _)| k == key) else {
            return;
        };
        if self.get(key).is_some() {
            return;
        }
        if let Some(set) = record.and_then(|json| with_drain(json, drain_us)) {
            self.put(key.to_string(), set);
        }
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// The operations cut into transactions of at most `max_ops` and about
    /// `max_bytes` (an operation larger than that goes alone).
    pub fn into_txns(self, max_ops: usize, max_bytes: usize) -> Vec<Vec<Op>> {
        let mut txns: Vec<Vec<Op>> = Vec::new();
        let mut current: Vec<Op> = Vec::new();
        let mut bytes = 0;
        for op in self.ops {
            let size = op.size();
            if !current.is_empty() && (current.len() == max_ops || bytes + size > max_bytes) {
                txns.push(std::mem::take(&mut current));
                bytes = 0;
            }
            bytes += size;
            current.push(op);
        }
        if !current.is_empty() {
            txns.push(current);
        }
        txns
    }
}

#[cfg(test)]
mod tests;
