//! What the node reports about itself: its state, its workers and its listeners,
//! for gRPC `Status`, `/debug/admin/status`, heartbeats and the admin page.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::Supervisor;
use crate::exe::ExeInfo;
use crate::phase::unix_ms;

/// The node as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NodeState {
    Starting,
    Serving,
    Restarting,
    /// No worker is serving (it died and is being replaced); connections wait in the backlog.
    Degraded,
    ShuttingDown,
    /// Every worker has exited after a graceful shutdown; the process exits next.
    Stopped,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Starting => "starting",
            NodeState::Serving => "serving",
            NodeState::Restarting => "restarting",
            NodeState::Degraded => "degraded",
            NodeState::ShuttingDown => "shutting-down",
            NodeState::Stopped => "stopped",
        }
    }

    /// Once shutting down, a node never serves again.
    pub fn is_final(self) -> bool {
        matches!(self, NodeState::ShuttingDown | NodeState::Stopped)
    }
}

/// What `Status` and `/debug/admin/status` report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub node_id: String,
    pub labels: BTreeMap<String, String>,
    pub supervisor_pid: u32,
    pub state: NodeState,
    pub generation: u64,
    pub exe: ExeInfo,
    pub workers: Vec<WorkerReport>,
    pub listeners: Vec<ListenerReport>,
    pub control_addr: String,
    pub admin_url: String,
    pub started_at_unix_ms: u64,
    pub version: String,
    pub restarts_succeeded: u64,
    pub restarts_failed: u64,
    pub in_progress: String,
    pub ready_timeout: std::time::Duration,
    pub drain_timeout: std::time::Duration,
    /// The last [`RECENT_RESTARTS`] restarts, oldest first.
    #[serde(default)]
    pub recent_restarts: Vec<RecentRestart>,
}

/// Restarts the agent keeps in memory for its status and admin page.
pub const RECENT_RESTARTS: usize = 16;

/// One restart (not the node's start) as this agent ran it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RecentRestart {
    pub at_unix_ms: u64,
    pub trigger: String,
    pub succeeded: bool,
    pub reason: String,
    /// The serving generation after it.
    pub generation: u64,
    pub old_pid: u32,
    pub new_pid: u32,
    pub exe: String,
    /// Trigger → READY (on a failure: trigger → failure).
    pub ready_us: u64,
    /// The old worker's drain; 0 while it drains or when there was none.
    pub drain_us: u64,
}

impl StatusReport {
    /// Requests in flight over every worker: old and new generations both count while
    /// a restart drains.
    pub fn in_flight(&self) -> u64 {
        self.workers.iter().map(|w| w.in_flight).sum()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerReport {
    pub generation: u64,
    pub pid: u32,
    pub exe: ExeInfo,
    pub state: String,
    pub started_at_unix_ms: u64,
    pub ready_at_unix_ms: u64,
    /// Requests in flight, as the worker last reported them.
    pub in_flight: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListenerReport {
    pub server: String,
    pub addr: String,
    pub tls: bool,
}

impl Supervisor {
    pub fn status(&self) -> StatusReport {
        let mut st = self.lock();
        let mut exe = st.exe.clone();
        if st.exe.sha256.is_empty() && self.policy.complete(&mut exe) {
            st.exe = exe;
        }
        let control_addr = self
            .control_addr
            .lock()
            .expect("lock")
            .map(|a| a.to_string())
            .unwrap_or_default();
        let admin_url = if control_addr.is_empty() {
            String::new()
        } else {
            // Over mutual TLS the control port speaks TLS to all but loopback peers.
            let scheme = if self.config.mtls() { "https" } else { "http" };
            format!("{scheme}://{control_addr}{}", self.config.admin.path)
        };
        StatusReport {
            node_id: self.config.node_id.clone(),
            labels: self.config.labels.clone(),
            supervisor_pid: std::process::id(),
            state: st.node,
            generation: st.current.as_ref().map(|g| g.number).unwrap_or(0),
            exe: st.exe.clone(),
            workers: st
                .workers
                .values()
                .map(|g| WorkerReport {
                    generation: g.number,
                    pid: g.pid,
                    // A worker started before its digest was known: the node's is known
                    // by now (no file I/O), unless the node has moved to another exe.
                    exe: match &g.exe {
                        e if !e.sha256.is_empty() => e.clone(),
                        e if e.path == st.exe.path => st.exe.clone(),
                        e => {
                            let mut exe = e.clone();
                            self.policy.complete(&mut exe);
                            exe
                        }
                    },
                    state: g.state().as_str().to_string(),
                    started_at_unix_ms: unix_ms(g.started_at),
                    ready_at_unix_ms: g.ready_at.lock().expect("lock").map(unix_ms).unwrap_or(0),
                    in_flight: g.in_flight(),
                })
                .collect(),
            listeners: crate::listeners::distinct(&self.listeners)
                .map(|l| ListenerReport {
                    server: l.server.clone(),
                    addr: l.addr.to_string(),
                    tls: l.tls,
                })
                .collect(),
            control_addr,
            admin_url,
            started_at_unix_ms: unix_ms(self.started_at),
            version: env!("CARGO_PKG_VERSION").to_string(),
            restarts_succeeded: st.succeeded,
            restarts_failed: st.failed,
            in_progress: st.in_progress.clone().unwrap_or_default(),
            ready_timeout: self.config.restart.ready_timeout,
            drain_timeout: self.config.restart.drain_timeout,
            recent_restarts: st.recent.iter().cloned().collect(),
        }
    }
}
