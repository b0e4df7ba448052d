//! One rollout in memory, shared by the engine that moves it and the operations
//! (pause, resume, abort, views) that look at it.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::Notify;

use super::{Progress, Rollout, RolloutView};

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
    /// Set for a finished rollout whose nodes are left in the store (older than the
    /// newest few, [`crate::fleet::FINISHED_KEPT`]): their counts; `view.nodes` is empty.
    /// [`crate::fleet::Fleet::full`] reads the nodes back when they are asked for.
    pub stored: Option<Progress>,
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
            stored: None,
        }
    }

    /// A finished rollout kept as its header and node counts only.
    pub fn stored(rollout: Rollout, progress: Progress, term: u64) -> Self {
        Self {
            view: Mutex::new(RolloutView {
                rollout,
                nodes: Vec::new(),
            }),
            wake: Notify::new(),
            index: HashMap::new(),
            term,
            stored: Some(progress),
        }
    }

    /// The node counts: kept, or counted from `view` (this handle's, locked).
    pub fn progress(&self, view: &RolloutView) -> Progress {
        self.stored.unwrap_or_else(|| view.progress())
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
