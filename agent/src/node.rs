//! The app's own handle on its node: restart it into a new executable or shut it
//! down from the app's code, as `Server.Restart(newExeFilePath)` and `Shutdown()` do in
//! the framework Fleet replaces.
//!
//! A worker reaches its supervisor over a private owner-only Unix socket
//! (`$FLEET_APP_SOCKET`, set for every worker). The restart is the supervisor's, not
//! the caller's: the worker that asks is usually the one drained right after, and it
//! gets the outcome first, because the supervisor answers before the old generation
//! is told to drain and the drain lets requests in flight finish.
//!
//! ```no_run
//! # async fn handler() -> Result<(), fleet_agent::NodeError> {
//! let node = fleet_agent::Node::current()?;
//! let report = node
//!     .restart(fleet_agent::RestartRequest {
//!         exe: Some("/opt/app/releases/v2/app".into()),
//!         reason: "self-update".into(),
//!         ..Default::default()
//!     })
//!     .await?;
//! println!("generation {} is pid {}", report.generation, report.new_pid);
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};

pub use crate::supervisor::APP_SOCKET_ENV;
use crate::supervisor::{RestartReport, RestartRequest, StatusReport};

/// A restart as it travels over the app socket.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct AppRestart {
    pub exe: Option<PathBuf>,
    pub sha256: Option<String>,
    pub reason: String,
    pub ready_timeout_ms: u64,
    pub drain_timeout_ms: u64,
}

/// An error answer over the app socket.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct AppError {
    pub error: String,
}

/// Why the node did not do what its app asked.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(
        "this process does not run under a fleet-agent supervisor (${APP_SOCKET_ENV} is not set)"
    )]
    NotSupervised,
    #[error("cannot reach the supervisor at {path}: {message}")]
    Unreachable { path: PathBuf, message: String },
    /// The supervisor refused (bad input, a restart already running, shutting down…);
    /// `status` is the HTTP status the admin routes would give.
    #[error("{message}")]
    Refused { status: u16, message: String },
    #[error("the supervisor's answer makes no sense ({0}): is the agent the same version?")]
    Protocol(String),
}

/// The node this process serves in.
#[derive(Debug, Clone)]
pub struct Node {
    socket: PathBuf,
}

impl Node {
    /// The node of this worker, from its environment.
    pub fn current() -> Result<Self, NodeError> {
        std::env::var_os(APP_SOCKET_ENV)
            .map(|socket| Node {
                socket: socket.into(),
            })
            .ok_or(NodeError::NotSupervised)
    }

    /// A node whose supervisor listens on `socket`.
    pub fn at(socket: impl Into<PathBuf>) -> Self {
        Node {
            socket: socket.into(),
        }
    }

    /// Restarts the node (into `request.exe` if given) and returns the report once the
    /// new generation is ready or has failed: a report with `Outcome::Failed` is a
    /// restart that was tried and left the old generation serving. `request.trigger`
    /// is ignored (it is always the app).
    pub async fn restart(&self, request: RestartRequest) -> Result<RestartReport, NodeError> {
        let millis = |d: Option<Duration>| d.map(|d| d.as_millis() as u64).unwrap_or(0);
        let body = AppRestart {
            exe: request.exe,
            sha256: request.sha256,
            reason: request.reason,
            ready_timeout_ms: millis(request.ready_timeout),
            drain_timeout_ms: millis(request.drain_timeout),
        };
        let body = serde_json::to_vec(&body).map_err(|e| NodeError::Protocol(e.to_string()))?;
        let (status, bytes) = self.call("POST", "/restart", body).await?;
        match status {
            // 500 carries the report of a restart that failed.
            200 | 500 => serde_json::from_slice(&bytes).map_err(|e| protocol(&bytes, e)),
            _ => Err(refused(status, &bytes)),
        }
    }

    /// Shuts the node down gracefully: every worker drains (this one too: the request
    /// that asked finishes first), then the supervisor exits.
    pub async fn shutdown(&self, reason: &str) -> Result<(), NodeError> {
        let body = serde_json::to_vec(&serde_json::json!({ "reason": reason }))
            .map_err(|e| NodeError::Protocol(e.to_string()))?;
        match self.call("POST", "/shutdown", body).await? {
            (200, _) => Ok(()),
            (status, bytes) => Err(refused(status, &bytes)),
        }
    }

    /// The node's status, as `/debug/admin/status` reports it.
    pub async fn status(&self) -> Result<StatusReport, NodeError> {
        match self.call("GET", "/status", Vec::new()).await? {
            (200, bytes) => serde_json::from_slice(&bytes).map_err(|e| protocol(&bytes, e)),
            (status, bytes) => Err(refused(status, &bytes)),
        }
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(u16, Bytes), NodeError> {
        let unreachable = |message: String| NodeError::Unreachable {
            path: self.socket.clone(),
            message,
        };
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        tokio::spawn(connection);
        let request = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, "localhost")
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| NodeError::Protocol(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let status = response.status().as_u16();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(e.to_string()))?
            .to_bytes();
        Ok((status, bytes))
    }

    /// The socket this handle talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

fn protocol(bytes: &[u8], e: serde_json::Error) -> NodeError {
    NodeError::Protocol(format!("{e}: {}", String::from_utf8_lossy(bytes)))
}

fn refused(status: u16, bytes: &[u8]) -> NodeError {
    let message = serde_json::from_slice::<AppError>(bytes)
        .map(|e| e.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(bytes).into_owned());
    NodeError::Refused { status, message }
}
