//! One rollout in memory, shared by the engine that moves it and the operations
//! (pause, resume, abort, views) that look at it.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::Notify;

use super::RolloutView;

/// One rollout in memory; the engine mutates it and persists every transition.
#[derive(Debug)]
pub struct RolloutHandle {
    pub view: Mutex<RolloutView>,
    /// Wakes the engine when an operator pauses, resumes or aborts.
    pub wake: Notify,
    /// Node id → position in `view.nodes` (fixed once the rollout is planned).
    index: HashMap<String, usize>,
    /// The leadership term it was made in ([`crate::ha`]; 0 with a store of its own):
    /// an engine drives it only while that term lasts, so an engine left from an
    /// earlier term never acts again, even if this controller is elected anew.
    pub term: u64,
}

impl RolloutHandle {
    pub fn new(view: RolloutView, term: u64) -> Self {
        let index = view
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.node_id.clone(), i))
            .collect();
        Self {
            view: Mutex::new(view),
            wake: Notify::new(),
            index,
            term,
        }
    }

    /// Where a node of this rollout sits in `view.nodes`.
    pub fn position(&self, node_id: &str) -> usize {
        self.index[node_id]
    }

    /// Where a node sits in `view.nodes`, if it is in this rollout.
    pub fn find(&self, node_id: &str) -> Option<usize> {
        self.index.get(node_id).copied()
    }
}
