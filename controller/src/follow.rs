//! A follower's state kept current from etcd's watch one key at a time: what a burst of
//! events changed is applied to the inventory and the rollouts held, instead of reading
//! the whole fleet again (at 10,000 nodes a rollout writes thousands of keys a second,
//! and a whole reload read every node and every node of every rollout held each time).

use std::collections::{BTreeMap, BTreeSet};

use crate::inventory::NodeRecord;
use crate::rollout::{Rollout, RolloutNode};
use crate::store::etcd::key;

/// What one burst of etcd events changed, the last value of each key (`None`: deleted).
#[derive(Debug, Default)]
pub struct Burst {
    pub nodes: BTreeMap<String, Option<NodeRecord>>,
    pub rollouts: BTreeMap<String, Option<Rollout>>,
    /// Rollout id → node id → the node's new state in it.
    pub rollout_nodes: BTreeMap<String, BTreeMap<String, RolloutNode>>,
    /// A rollout whose nodes were deleted (its whole state is read again).
    pub rollouts_reread: BTreeSet<String>,
    pub tokens: bool,
    /// A key this controller cannot read: the whole state is read again instead.
    pub unreadable: Option<String>,
}

impl Burst {
    /// One event: `key` relative to the store's prefix, `value` `None` for a delete.
    /// Keys nothing in memory mirrors (restart history, the election) are left alone.
    pub fn add(&mut self, key: &str, value: Option<&[u8]>) {
        if let Some(id) = key.strip_prefix(key::NODES) {
            if let Some(node) = self.read(key, value) {
                self.nodes.insert(id.to_string(), node);
            }
        } else if let Some(id) = key.strip_prefix(key::ROLLOUTS) {
            if let Some(header) = self.read(key, value) {
                self.rollouts.insert(id.to_string(), header);
            }
        } else if let Some(rest) = key.strip_prefix(key::ROLLOUT_NODES) {
            let Some((rollout, node)) = rest.split_once('/') else {
                return;
            };
            match self.read::<RolloutNode>(key, value) {
                Some(Some(state)) => {
                    self.rollout_nodes
                        .entry(rollout.to_string())
                        .or_default()
                        .insert(node.to_string(), state);
                }
                Some(None) => {
                    self.rollouts_reread.insert(rollout.to_string());
                }
                None => {}
            }
        } else if key.starts_with(key::TOKENS) || key.starts_with(key::TOKENS_LAST_USED) {
            self.tokens = true;
        }
    }

    /// A put's record (`Some(Some)`) or a delete (`Some(None)`); `None` when the value
    /// is no such record (noted in [`Burst::unreadable`]).
    fn read<T: serde::de::DeserializeOwned>(
        &mut self,
        key: &str,
        value: Option<&[u8]>,
    ) -> Option<Option<T>> {
        match value.map(serde_json::from_slice::<T>) {
            None => Some(None),
            Some(Ok(record)) => Some(Some(record)),
            Some(Err(e)) => {
                self.unreadable(key, e);
                None
            }
        }
    }

    fn unreadable(&mut self, key: &str, e: serde_json::Error) {
        self.unreadable
            .get_or_insert_with(|| format!("{key}: not a record this controller reads: {e}"));
    }

    /// Nothing in memory changes with it.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
            && self.rollouts.is_empty()
            && self.rollout_nodes.is_empty()
            && self.rollouts_reread.is_empty()
            && !self.tokens
            && self.unreadable.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_keeps_the_last_value_of_each_key_and_ignores_what_is_not_mirrored() {
        let node =
            |generation| serde_json::to_vec(&NodeRecord::for_test("web-1", generation)).unwrap();
        let mut burst = Burst::default();
        burst.add("nodes/web-1", Some(&node(1)));
        burst.add("nodes/web-1", Some(&node(2)));
        burst.add("nodes/web-2", None);
        burst.add(
            "restarts/web-1/00000000000000000001-0000000001",
            Some(b"{}"),
        );
        burst.add("restart_times/x", Some(b"restarts/web-1/1"));
        assert_eq!(burst.nodes["web-1"].as_ref().map(|n| n.generation), Some(2));
        assert_eq!(burst.nodes["web-2"], None);
        assert!(!burst.tokens && burst.rollouts.is_empty() && burst.unreadable.is_none());

        let mut only_history = Burst::default();
        only_history.add("restarts/web-1/1", Some(b"{}"));
        assert!(only_history.is_empty(), "{only_history:?}");
    }

    #[test]
    fn rollout_keys_and_tokens_are_sorted_by_kind() {
        let view = crate::rollout::RolloutView::for_test(&["web-1"]);
        let mut burst = Burst::default();
        burst.add(
            "rollouts/r1",
            Some(&serde_json::to_vec(&view.rollout).unwrap()),
        );
        burst.add(
            "rollout_nodes/r1/web-1",
            Some(&serde_json::to_vec(&view.nodes[0]).unwrap()),
        );
        burst.add("rollout_nodes/r2/web-9", None);
        burst.add("token_last_used/t1", Some(b"00000000000000000001"));
        assert!(burst.rollouts["r1"].is_some());
        assert_eq!(burst.rollout_nodes["r1"]["web-1"].node_id, "web-1");
        assert!(burst.rollouts_reread.contains("r2"));
        assert!(burst.tokens);
    }

    #[test]
    fn a_record_it_cannot_read_asks_for_a_whole_reload() {
        let mut burst = Burst::default();
        burst.add("nodes/web-1", Some(b"{not json"));
        let why = burst.unreadable.as_deref().unwrap_or_default();
        assert!(why.starts_with("nodes/web-1: not a record"), "{why}");
        assert!(!burst.is_empty());
    }
}
