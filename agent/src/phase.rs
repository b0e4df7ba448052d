//! The restart lifecycle, named once: every phase a node goes through is a [`Phase`],
//! published as an [`Event`] on a broadcast channel (gRPC `Watch`, heartbeats, tests).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Checking the executable (path, allowed dirs, mode, sha256).
    Validating,
    /// Starting the new generation with the inherited listeners.
    Spawning,
    /// Waiting for the new generation's `READY=1`.
    WaitingReady,
    /// The new generation is serving.
    Ready,
    /// The old generation got `SIGTERM` and is finishing its requests.
    Draining,
    /// The old generation has exited (or was killed at the drain deadline).
    Drained,
    /// The new generation failed before READY; the old one keeps serving.
    Failed,
    /// The restart was refused before anything was spawned.
    Refused,
    /// The new generation died during probation; the previous exe is being started again.
    Reverting,
    /// A serving worker exited on its own; it is being replaced.
    WorkerExited,
    /// The node is shutting down gracefully.
    ShuttingDown,
    /// Every worker has exited; the supervisor is about to exit.
    Stopped,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Validating => "validating",
            Phase::Spawning => "spawning",
            Phase::WaitingReady => "waiting-ready",
            Phase::Ready => "ready",
            Phase::Draining => "draining",
            Phase::Drained => "drained",
            Phase::Failed => "failed",
            Phase::Refused => "refused",
            Phase::Reverting => "reverting",
            Phase::WorkerExited => "worker-exited",
            Phase::ShuttingDown => "shutting-down",
            Phase::Stopped => "stopped",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One step of the lifecycle, with what it concerned and how long it took.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub seq: u64,
    pub unix_ms: u64,
    pub phase: Phase,
    pub generation: u64,
    pub pid: u32,
    pub message: String,
    /// Duration of the step that just ended, where that makes sense (0 otherwise).
    pub duration_us: u64,
    pub exe: String,
}

impl Event {
    pub fn new(phase: Phase, generation: u64, pid: u32, message: impl Into<String>) -> Self {
        Self {
            seq: 0,
            unix_ms: unix_ms(SystemTime::now()),
            phase,
            generation,
            pid,
            message: message.into(),
            duration_us: 0,
            exe: String::new(),
        }
    }

    pub fn took(mut self, d: Duration) -> Self {
        self.duration_us = d.as_micros() as u64;
        self
    }

    pub fn exe(mut self, exe: &std::path::Path) -> Self {
        self.exe = exe.display().to_string();
        self
    }
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}
