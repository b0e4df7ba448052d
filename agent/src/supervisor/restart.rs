//! What a restart is asked for and what it reports: the request (with its limits),
//! the outcome, and the refusals. The state machine that runs it is `lifecycle`.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::exe::{ExeError, ExeInfo};

/// Longest `reason` a caller may give (it is logged and sent to every watcher).
pub const MAX_REASON: usize = 1024;
/// Longest executable path a caller may give.
pub const MAX_PATH: usize = 4096;

/// What started a restart (for logs and events).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Trigger {
    #[default]
    Api,
    Signal,
    Http,
    Grpc,
    /// The app itself, through [`crate::Node`].
    App,
    Recover,
    Start,
}

impl Trigger {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Trigger::Api => "api",
            Trigger::Signal => "SIGUSR1",
            Trigger::Http => "http",
            Trigger::Grpc => "grpc",
            Trigger::App => "app",
            Trigger::Recover => "recovery",
            Trigger::Start => "start",
        }
    }
}

/// A restart as a caller asks for it; every field but `exe` is optional.
#[derive(Debug, Clone, Default)]
pub struct RestartRequest {
    /// New executable (an absolute path); `None` restarts the current one (re-read from disk).
    pub exe: Option<PathBuf>,
    /// Expected sha256 (hex) of the executable.
    pub sha256: Option<String>,
    pub reason: String,
    pub trigger: Trigger,
    pub ready_timeout: Option<Duration>,
    pub drain_timeout: Option<Duration>,
}

impl RestartRequest {
    /// The limits every surface shares: a request beyond them is refused before
    /// anything is looked at (and never logged whole).
    pub fn check(&self) -> Result<(), RestartError> {
        if self.reason.len() > MAX_REASON {
            return Err(RestartError::BadRequest(format!(
                "reason is {} bytes long: give at most {MAX_REASON}",
                self.reason.len()
            )));
        }
        if let Some(exe) = &self.exe
            && exe.as_os_str().len() > MAX_PATH
        {
            return Err(RestartError::BadRequest(format!(
                "the executable path is {} bytes long: give at most {MAX_PATH}",
                exe.as_os_str().len()
            )));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Succeeded,
    Failed,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Timings {
    pub validate_us: u64,
    pub spawn_us: u64,
    /// From the trigger until READY=1.
    pub ready_us: u64,
}

/// The result of a restart that got as far as spawning.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RestartReport {
    pub outcome: Outcome,
    /// Why the new generation failed (empty on success).
    pub reason: String,
    pub stderr_tail: Vec<String>,
    /// The serving generation after the restart.
    pub generation: u64,
    pub old_pid: u32,
    pub new_pid: u32,
    pub exe: ExeInfo,
    pub timings: Timings,
}

/// A restart that did not start anything.
#[derive(Debug, thiserror::Error)]
pub enum RestartError {
    #[error("a restart is already in progress ({0}): wait for it to finish and try again")]
    InProgress(String),
    #[error("the node is shutting down: it takes no restarts")]
    ShuttingDown,
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Refused(#[from] ExeError),
    /// The supervisor's restart task ended without an outcome (it panicked).
    #[error("the restart task ended without an outcome: see the agent's log")]
    Lost,
}

impl RestartError {
    pub fn http_status(&self) -> u16 {
        match self {
            RestartError::InProgress(_) | RestartError::ShuttingDown => 409,
            RestartError::BadRequest(_) => 400,
            RestartError::Refused(e) => e.http_status(),
            RestartError::Lost => 500,
        }
    }
}
