//! The restart state machine, one at a time:
//! `validate exe → spawn gen N+1 → wait READY → SIGTERM gen N → drain`.
//!
//! A restart returns once the new generation is ready (or has failed); the old
//! generation's drain goes on in the background, so restarts can follow each other
//! while earlier generations finish their last requests.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde::Serialize;

use super::{Generation, NodeState, Supervisor, WorkerState};
use crate::exe::{ExeError, ExeInfo};
use crate::listeners;
use crate::phase::{Event, Phase};

/// What started a restart (for logs and events).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Trigger {
    #[default]
    Api,
    Signal,
    Http,
    Grpc,
    Recover,
    Start,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Api => "api",
            Trigger::Signal => "SIGUSR1",
            Trigger::Http => "http",
            Trigger::Grpc => "grpc",
            Trigger::Recover => "recovery",
            Trigger::Start => "start",
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct RestartRequest {
    /// New executable; `None` restarts the current one (re-read from disk).
    pub exe: Option<PathBuf>,
    /// Expected sha256 (hex) of the executable.
    pub sha256: Option<String>,
    pub reason: String,
    pub trigger: Trigger,
    pub ready_timeout: Option<Duration>,
    pub drain_timeout: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Succeeded,
    Failed,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    pub validate_us: u64,
    pub spawn_us: u64,
    /// From the trigger until READY=1.
    pub ready_us: u64,
}

/// The result of a restart that got as far as spawning.
#[derive(Debug, Clone, Serialize)]
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
    #[error(transparent)]
    Refused(#[from] ExeError),
}

impl RestartError {
    pub fn http_status(&self) -> u16 {
        match self {
            RestartError::InProgress(_) | RestartError::ShuttingDown => 409,
            RestartError::Refused(e) => e.http_status(),
        }
    }
}

/// Clears the "in progress" note whichever way the restart ends.
struct InProgress<'a>(&'a Supervisor);

impl InProgress<'_> {
    fn set(&self, what: String) {
        self.0.lock().in_progress = Some(what);
    }
}

impl Drop for InProgress<'_> {
    fn drop(&mut self) {
        self.0.lock().in_progress = None;
    }
}

impl Supervisor {
    /// Restarts the node, or refuses at once if a restart is already running.
    pub async fn restart(
        self: &Arc<Self>,
        request: RestartRequest,
    ) -> Result<RestartReport, RestartError> {
        let guard = match self.restart_lock.try_lock() {
            Ok(guard) => guard,
            Err(_) => {
                let what = self
                    .lock()
                    .in_progress
                    .clone()
                    .unwrap_or_else(|| "another restart".into());
                self.emit(Event::new(
                    Phase::Refused,
                    0,
                    0,
                    format!("a restart is already in progress: {what}"),
                ));
                self.metrics.restart("refused");
                return Err(RestartError::InProgress(what));
            }
        };
        self.restart_locked(request, guard).await
    }

    pub(super) async fn restart_locked(
        self: &Arc<Self>,
        request: RestartRequest,
        _guard: tokio::sync::MutexGuard<'_, ()>,
    ) -> Result<RestartReport, RestartError> {
        if self.shutting_down() {
            return Err(RestartError::ShuttingDown);
        }
        let trigger = request.trigger.as_str();
        let started = Instant::now();
        let (old, current_exe) = {
            let st = self.lock();
            (st.current.clone(), st.exe.path.clone())
        };
        let exe_path = request.exe.clone().unwrap_or(current_exe);
        let progress = InProgress(self);
        progress.set(format!(
            "{trigger} restart into {} since {}",
            exe_path.display(),
            humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        ));
        // Generation 1 is the node starting, not a restart: not counted, not logged as one.
        let is_restart = request.trigger != Trigger::Start;
        if is_restart {
            self.lock().node = NodeState::Restarting;
            let reason = if request.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", request.reason)
            };
            tracing::info!(
                "server reloading ({trigger}{reason}) into {}",
                exe_path.display()
            );
        }
        self.emit(Event::new(Phase::Validating, 0, 0, trigger).exe(&exe_path));
        // Starting the node, the digest is not waited for (it is the agent's own
        // executable, tens of MB): status reports it once the hash is done.
        let validated = match (is_restart, request.sha256.as_deref()) {
            (false, None) => self.policy.validate_later(&exe_path),
            (_, sha256) => self.policy.validate(&exe_path, sha256).await,
        };
        let checked = match validated {
            Ok(checked) => checked,
            Err(e) => {
                tracing::warn!("restart refused: {e}");
                self.settle_node_state();
                self.emit(Event::new(Phase::Refused, 0, 0, e.to_string()).exe(&exe_path));
                self.metrics.restart("refused");
                return Err(e.into());
            }
        };
        let validate_us = started.elapsed().as_micros() as u64;
        let info = checked.info.clone();

        self.emit(Event::new(Phase::Spawning, 0, 0, trigger).exe(&info.path));
        let spawn_started = Instant::now();
        let generation = match self.spawn_generation(&checked) {
            Ok(g) => g,
            Err(e) => {
                let reason = format!("cannot start {}: {e}", info.path.display());
                return Ok(self.failed(old.as_ref(), None, info, reason, Vec::new(), started));
            }
        };
        let spawn_us = spawn_started.elapsed().as_micros() as u64;
        self.emit(
            Event::new(
                Phase::WaitingReady,
                generation.number,
                generation.pid,
                trigger,
            )
            .exe(&info.path),
        );

        let ready_timeout = request
            .ready_timeout
            .unwrap_or(self.config.restart.ready_timeout);
        let mut shutdown = self.shutdown.subscribe();
        let failure = tokio::select! {
            biased;
            _ = generation.ready() => None,
            status = generation.exited() => Some(format!(
                "gen {} (pid {}) {status} before it was ready",
                generation.number, generation.pid
            )),
            _ = tokio::time::sleep(ready_timeout) => Some(format!(
                "gen {} (pid {}) did not become ready (send READY=1) within the {} ready timeout",
                generation.number, generation.pid, humantime::format_duration(ready_timeout)
            )),
            _ = shutdown.wait_for(|s| s.is_some()) => Some("the node is shutting down".to_string()),
        };
        if let Some(reason) = failure {
            generation.signal(Signal::SIGKILL);
            let _ = tokio::time::timeout(Duration::from_secs(5), generation.exited()).await;
            let tail = generation.stderr_tail().await;
            return Ok(self.failed(old.as_ref(), Some(&generation), info, reason, tail, started));
        }

        let ready = started.elapsed();
        generation.set_state(WorkerState::Serving);
        {
            let mut st = self.lock();
            st.previous_exe = old.as_ref().map(|o| o.exe.clone());
            st.exe = info.clone();
            st.current = Some(generation.clone());
            st.node = NodeState::Serving;
            st.probation_until = old
                .as_ref()
                .map(|_| Instant::now() + self.config.restart.probation);
            if request.trigger != Trigger::Recover {
                st.crash_streak = 0;
            }
            if is_restart {
                st.succeeded += 1;
            }
            self.metrics
                .set_generation(generation.number, st.workers.len());
        }
        self.metrics.handoff(ready);
        if is_restart {
            self.metrics.restart("succeeded");
        }
        self.emit(
            Event::new(Phase::Ready, generation.number, generation.pid, trigger)
                .took(ready)
                .exe(&info.path),
        );
        let old_pid = old.as_ref().map(|o| o.pid).unwrap_or(0);
        if let Some(old) = old.filter(|o| o.exit_status().is_none()) {
            let drain_timeout = request
                .drain_timeout
                .unwrap_or(self.config.restart.drain_timeout);
            self.drain(old, drain_timeout);
        }
        if is_restart {
            tracing::info!(
                "restart succeeded ({trigger}): pid {old_pid} -> gen {} pid {} ({}), ready in {:.1} ms",
                generation.number,
                generation.pid,
                info.path.display(),
                ready.as_secs_f64() * 1000.0
            );
            for line in listeners::describe(&self.listeners, "reloaded") {
                tracing::info!("{line}");
            }
        }
        Ok(RestartReport {
            outcome: Outcome::Succeeded,
            reason: String::new(),
            stderr_tail: Vec::new(),
            generation: generation.number,
            old_pid,
            new_pid: generation.pid,
            exe: info,
            timings: Timings {
                validate_us,
                spawn_us,
                ready_us: ready.as_micros() as u64,
            },
        })
    }

    /// Records a new generation that never got ready; the old one keeps serving.
    fn failed(
        &self,
        old: Option<&Arc<Generation>>,
        new: Option<&Arc<Generation>>,
        exe: ExeInfo,
        reason: String,
        stderr_tail: Vec<String>,
        started: Instant,
    ) -> RestartReport {
        {
            let mut st = self.lock();
            st.failed += 1;
        }
        self.settle_node_state();
        self.metrics.restart("failed");
        let keeps = match old {
            Some(o) if o.exit_status().is_none() => {
                format!("gen {} (pid {}) keeps serving", o.number, o.pid)
            }
            _ => "no worker is serving".to_string(),
        };
        let mut msg = format!("restart failed: {reason}; {keeps}");
        if !stderr_tail.is_empty() {
            msg.push_str("; its last stderr lines:");
            for line in &stderr_tail {
                msg.push_str("\n    ");
                msg.push_str(line);
            }
        }
        tracing::error!("{msg}");
        self.emit(
            Event::new(
                Phase::Failed,
                new.map(|g| g.number).unwrap_or(0),
                new.map(|g| g.pid).unwrap_or(0),
                reason.clone(),
            )
            .took(started.elapsed())
            .exe(&exe.path),
        );
        RestartReport {
            outcome: Outcome::Failed,
            reason,
            stderr_tail,
            generation: old.map(|o| o.number).unwrap_or(0),
            old_pid: old.map(|o| o.pid).unwrap_or(0),
            new_pid: new.map(|g| g.pid).unwrap_or(0),
            exe,
            timings: Timings {
                ready_us: started.elapsed().as_micros() as u64,
                ..Default::default()
            },
        }
    }

    /// After a restart that changed nothing: serving if a worker serves, else degraded.
    fn settle_node_state(&self) {
        let mut st = self.lock();
        if st.node == NodeState::Restarting || st.node == NodeState::Starting {
            st.node = if st.current.is_some() {
                NodeState::Serving
            } else {
                NodeState::Degraded
            };
        }
    }
}
