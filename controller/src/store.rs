//! Persistence: one trait, two implementations: embedded SQLite (one file, no server,
//! the default) and etcd v3 (a cluster that several controllers can share).
//!
//! Every rollout transition is written before the engine acts on it. Writes go to one
//! writer that commits whatever has queued up in one transaction (group commit), so
//! 10,000 nodes changing state at once cost a few transactions, not 10,000.

pub mod etcd;
mod sqlite;

pub use etcd::{EtcdOptions, EtcdStore, EtcdTls, Fence};
pub use sqlite::SqliteStore;

use crate::history::RestartRecord;
use crate::inventory::NodeRecord;
use crate::rollout::{Rollout, RolloutNode};
use crate::tokens::TokenRecord;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {message}")]
    Db { path: String, message: String },
    #[error("etcd at {endpoints}: {message}")]
    Etcd { endpoints: String, message: String },
    /// A write refused because this controller does not hold the leadership it was
    /// given ([`EtcdStore::set_fence`]): another controller may be writing.
    #[error("{0}")]
    NotLeader(String),
    #[error("the store has stopped")]
    Stopped,
}

/// What the controller keeps across restarts.
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Where the state is: `sqlite:PATH` or `etcd://HOST:PORT,…`.
    fn url(&self) -> String;
    fn load_nodes(&self) -> Result<Vec<NodeRecord>, StoreError>;
    fn load_rollouts(&self) -> Result<Vec<Rollout>, StoreError>;
    fn load_rollout_nodes(&self, rollout_id: &str) -> Result<Vec<RolloutNode>, StoreError>;
    /// Durable when the returned future resolves.
    fn put_node(&self, node: &NodeRecord) -> WriteAck;
    /// Removes the node and its restart history.
    fn delete_node(&self, node_id: &str) -> WriteAck;
    fn put_rollout(&self, rollout: &Rollout) -> WriteAck;
    fn put_rollout_nodes(&self, rollout_id: &str, nodes: &[RolloutNode]) -> WriteAck;
    /// Every token (digests, never token strings), with its last use.
    fn load_tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;
    /// Creates or replaces a token's record, but not its last use.
    fn put_token(&self, token: &TokenRecord) -> WriteAck;
    /// Records a token's last use, unless a later one is stored already.
    fn touch_token(&self, id: &str, last_used_unix_ms: u64) -> WriteAck;
    /// Adds a restart to its node's history, dropping all but the node's newest
    /// [`crate::history::KEEP_PER_NODE`].
    fn put_restart(&self, restart: &RestartRecord) -> WriteAck;
    /// Sets the drain time of the node's latest restart whose old worker was
    /// `old_pid`, unless it is set already.
    fn set_restart_drain(&self, node_id: &str, old_pid: u32, drain_us: u64) -> WriteAck;
    /// Newest first: one node's restarts, or (None) the whole fleet's.
    fn load_restarts(
        &self,
        node_id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<RestartRecord>, StoreError>;
    /// Resolves `Ok` while this controller may write: with etcd and a required fence,
    /// once etcd confirmed the fence still holds ([`StoreError::NotLeader`] if not);
    /// at once for a store only this controller writes. Call it before acting on
    /// something only the leader may do (calling an agent).
    fn check_fence(&self) -> WriteAck;
}

/// Resolves once the write is committed.
pub type WriteAck =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), StoreError>> + Send>>;
