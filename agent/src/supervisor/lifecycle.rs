//! The restart lifecycle, in one place:
//! `validate exe → spawn gen N+1 → wait READY → SIGTERM gen N → drain`,
//! plus what happens around it: a serving worker that dies is replaced (with
//! backoff, or by the previous executable while on probation), and an old
//! generation's drain ends in `SIGKILL` at its deadline.
//!
//! A restart belongs to the supervisor, not to its caller: [`Supervisor::restart`]
//! runs it as a task of its own and only awaits the outcome. A caller that goes away
//! (an HTTP client that disconnects, a gRPC deadline, a controller's timeout) changes
//! nothing: the new generation is promoted or killed exactly as it would have been,
//! and the outcome is in `Status`, the events, the log and the metrics. One restart
//! runs at a time (`restart_lock`); a second is refused at once.
//!
//! A restart returns once the new generation is ready (or has failed); the old
//! generation's drain goes on in the background, so restarts can follow each other
//! while earlier generations finish their last requests.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tokio::sync::OwnedMutexGuard;

use super::generation::{self, Generation, WorkerState};
use super::reaper::ExitStatus;
use super::restart::{Outcome, RestartError, RestartReport, RestartRequest, Timings, Trigger};
use super::{NodeState, State, Supervisor};
use crate::exe::{CheckedExe, ExeInfo};
use crate::listeners;
use crate::logging::escape;
use crate::phase::{Event, Phase};

impl State {
    /// The one place the node's state changes. Shutting down is final: nothing a
    /// restart or a dying worker does afterwards brings the node back to serving.
    pub(super) fn set_node(&mut self, to: NodeState) {
        let stays = match self.node {
            NodeState::Stopped => true,
            NodeState::ShuttingDown => to != NodeState::Stopped,
            _ => false,
        };
        if !stays && self.node != to {
            tracing::debug!("node state {} -> {}", self.node.as_str(), to.as_str());
            self.node = to;
        }
    }

    /// After a restart that changed nothing: serving if a worker serves, else degraded.
    fn settle(&mut self) {
        if matches!(self.node, NodeState::Restarting | NodeState::Starting) {
            let to = if self.current.is_some() {
                NodeState::Serving
            } else {
                NodeState::Degraded
            };
            self.set_node(to);
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
    /// Restarts the node, or refuses at once if a restart is already running. The
    /// restart runs as the supervisor's task; dropping this future abandons only the
    /// wait for its outcome.
    pub async fn restart(
        self: &Arc<Self>,
        request: RestartRequest,
    ) -> Result<RestartReport, RestartError> {
        if let Err(e) = request.check() {
            self.refused(&e.to_string(), None);
            return Err(e);
        }
        let guard = match self.restart_lock.clone().try_lock_owned() {
            Ok(guard) => guard,
            Err(_) => {
                let what = self
                    .lock()
                    .in_progress
                    .clone()
                    .unwrap_or_else(|| "another restart".into());
                self.refused(&format!("a restart is already in progress: {what}"), None);
                return Err(RestartError::InProgress(what));
            }
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let this = self.clone();
        let trigger = request.trigger;
        tokio::spawn(async move {
            let outcome = this.restart_locked(request, guard).await;
            if let Err(unheard) = tx.send(outcome) {
                let said = match unheard {
                    Ok(report) => format!("{:?}", report.outcome).to_lowercase(),
                    Err(e) => format!("refused ({})", escape(&e.to_string())),
                };
                tracing::info!(
                    "the caller of the {} restart went away before its outcome: {said}",
                    trigger.as_str()
                );
            }
        });
        rx.await.unwrap_or(Err(RestartError::Lost))
    }

    /// Runs one restart; the caller holds the restart lock (moved in, so the lock is
    /// held until this task, not its caller, is done). A restart that got as far as
    /// spawning is kept in the node's recent restarts.
    pub(super) async fn restart_locked(
        self: &Arc<Self>,
        request: RestartRequest,
        guard: OwnedMutexGuard<()>,
    ) -> Result<RestartReport, RestartError> {
        let at_unix_ms = crate::phase::unix_ms(std::time::SystemTime::now());
        let trigger = request.trigger;
        let result = self.restart_inner(request, guard).await;
        if let (Ok(report), true) = (&result, trigger != Trigger::Start) {
            let mut st = self.lock();
            if st.recent.len() >= super::status::RECENT_RESTARTS {
                st.recent.pop_front();
            }
            st.recent.push_back(super::status::RecentRestart {
                at_unix_ms,
                trigger: trigger.as_str().to_string(),
                succeeded: report.outcome == Outcome::Succeeded,
                reason: report.reason.clone(),
                generation: report.generation,
                old_pid: report.old_pid,
                new_pid: report.new_pid,
                exe: report.exe.path.display().to_string(),
                ready_us: report.timings.ready_us,
                drain_us: 0,
            });
        }
        result
    }

    async fn restart_inner(
        self: &Arc<Self>,
        request: RestartRequest,
        _guard: OwnedMutexGuard<()>,
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
            self.lock().set_node(NodeState::Restarting);
            let reason = if request.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", escape(&request.reason))
            };
            tracing::info!(
                "server reloading ({trigger}{reason}) into {}",
                escape(&exe_path.display().to_string())
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
                self.lock().settle();
                self.refused(&e.to_string(), Some(&exe_path));
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
            st.set_node(NodeState::Serving);
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
                escape(&info.path.display().to_string()),
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

    /// Records a restart refused before anything was spawned.
    fn refused(&self, why: &str, exe: Option<&std::path::Path>) {
        tracing::warn!("restart refused: {}", escape(why));
        let mut event = Event::new(Phase::Refused, 0, 0, why);
        if let Some(exe) = exe {
            event = event.exe(exe);
        }
        self.emit(event);
        self.metrics.restart("refused");
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
            st.settle();
        }
        self.metrics.restart("failed");
        let keeps = match old {
            Some(o) if o.exit_status().is_none() => {
                format!("gen {} (pid {}) keeps serving", o.number, o.pid)
            }
            _ => "no worker is serving".to_string(),
        };
        let mut msg = format!("restart failed: {}; {keeps}", escape(&reason));
        if !stderr_tail.is_empty() {
            msg.push_str("; its last stderr lines:");
            for line in &stderr_tail {
                msg.push_str("\n    ");
                msg.push_str(&escape(line));
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

    /// Starts generation N and registers it; its exit is watched by `monitor`.
    fn spawn_generation(self: &Arc<Self>, exe: &CheckedExe) -> std::io::Result<Arc<Generation>> {
        let number = {
            let mut st = self.lock();
            let n = st.next_generation;
            st.next_generation += 1;
            n
        };
        let mut env = vec![
            (
                "FLEET_SUPERVISOR_PID".to_string(),
                std::process::id().to_string(),
            ),
            (
                "FLEET_CONTROL_SOCKET".to_string(),
                self.control_socket_path().to_string_lossy().into_owned(),
            ),
            (
                super::APP_SOCKET_ENV.to_string(),
                self.app_socket_path().to_string_lossy().into_owned(),
            ),
            ("FLEET_NODE_ID".to_string(), self.config.node_id.clone()),
        ];
        if self.kind == super::WorkerKind::Library {
            env.push(("FLEET_ROLE".to_string(), "worker".to_string()));
        }
        let generation = Generation::spawn(
            generation::Launch {
                number,
                exe,
                args: &self.worker_args,
                env,
                listeners: self
                    .listeners
                    .iter()
                    .map(|l| (l.server.clone(), l.fd()))
                    .collect(),
                runtime_dir: self.runtime_dir.path(),
            },
            &self.reaper,
        )?;
        {
            let mut st = self.lock();
            st.workers.insert(number, generation.clone());
            self.metrics.set_generation(
                st.current.as_ref().map(|g| g.number).unwrap_or(0),
                st.workers.len(),
            );
        }
        tokio::spawn(self.clone().monitor(generation.clone()));
        Ok(generation)
    }

    /// Waits for a generation to exit; replaces it if it was serving.
    async fn monitor(self: Arc<Self>, generation: Arc<Generation>) {
        let status = generation.exited().await;
        let state = generation.state();
        let (unexpected, in_probation) = {
            let mut st = self.lock();
            st.workers.remove(&generation.number);
            let current = st
                .current
                .as_ref()
                .is_some_and(|g| g.number == generation.number);
            if current {
                st.current = None;
                st.set_node(NodeState::Degraded);
            }
            self.metrics.set_generation(
                st.current.as_ref().map(|g| g.number).unwrap_or(0),
                st.workers.len(),
            );
            let in_probation = st.probation_until.is_some_and(|t| Instant::now() < t);
            (
                current && state == WorkerState::Serving && !self.shutting_down(),
                in_probation,
            )
        };
        if !unexpected {
            return;
        }
        self.metrics.worker_exit();
        let tail = generation.stderr_tail().await;
        let last = tail
            .last()
            .map(String::as_str)
            .unwrap_or("(no stderr output)");
        tracing::warn!(
            "worker gen {} (pid {}) {status} while serving; last stderr line: {}",
            generation.number,
            generation.pid,
            escape(last)
        );
        self.emit(
            Event::new(
                Phase::WorkerExited,
                generation.number,
                generation.pid,
                format!("{status}; last stderr line: {last}"),
            )
            .exe(&generation.exe.path),
        );
        tokio::spawn(self.recover(generation, status, in_probation));
    }

    /// Brings a serving worker back after one died: the previous exe if it died in
    /// probation, otherwise the same exe with backoff.
    async fn recover(self: Arc<Self>, dead: Arc<Generation>, status: ExitStatus, probation: bool) {
        let revert_to = if probation {
            self.lock().previous_exe.take()
        } else {
            None
        };
        if let Some(prev) = &revert_to {
            let since = dead
                .ready_at
                .lock()
                .expect("lock")
                .and_then(|t| t.elapsed().ok())
                .unwrap_or_default();
            let msg = format!(
                "gen {} ({}) {status} {} ms after READY, within the {} probation: starting the previous exe {} again",
                dead.number,
                dead.exe.path.display(),
                since.as_millis(),
                humantime::format_duration(self.config.restart.probation),
                prev.path.display()
            );
            tracing::warn!("auto-revert: {}", escape(&msg));
            self.metrics.restart("reverted");
            self.emit(Event::new(Phase::Reverting, dead.number, dead.pid, msg).exe(&prev.path));
        }
        let mut exe = revert_to.map(|e| e.path).unwrap_or(dead.exe.path.clone());
        loop {
            if self.shutting_down() {
                return;
            }
            let streak = {
                let mut st = self.lock();
                st.crash_streak = st.crash_streak.saturating_add(1);
                st.crash_streak
            };
            // 0 on the first try, then 100 ms doubling up to 10 s.
            let delay = if streak <= 1 {
                Duration::ZERO
            } else {
                Duration::from_millis(100 * (1u64 << (streak - 2).min(7)))
                    .min(Duration::from_secs(10))
            };
            tokio::time::sleep(delay).await;
            let guard = self.restart_lock.clone().lock_owned().await;
            if self.lock().current.is_some() || self.shutting_down() {
                return;
            }
            let request = RestartRequest {
                exe: Some(exe.clone()),
                reason: format!("replacing gen {} which {status}", dead.number),
                trigger: Trigger::Recover,
                ..Default::default()
            };
            match self.restart_locked(request, guard).await {
                Ok(report) if report.outcome == Outcome::Succeeded => return,
                Ok(_) => {}
                Err(RestartError::Refused(e)) => {
                    tracing::warn!(
                        "cannot start {}: {}; trying {} instead",
                        escape(&exe.display().to_string()),
                        escape(&e.to_string()),
                        escape(&dead.exe.path.display().to_string())
                    );
                    exe = dead.exe.path.clone();
                }
                Err(_) => return,
            }
        }
    }

    /// Drains an old generation: SIGTERM now, SIGKILL at the deadline.
    fn drain(self: &Arc<Self>, old: Arc<Generation>, timeout: Duration) {
        old.set_state(WorkerState::Draining);
        self.emit(Event::new(
            Phase::Draining,
            old.number,
            old.pid,
            format!(
                "SIGTERM, drain timeout {}",
                humantime::format_duration(timeout)
            ),
        ));
        old.signal(Signal::SIGTERM);
        let this = self.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let status = match tokio::time::timeout(timeout, old.exited()).await {
                Ok(status) => status,
                Err(_) => {
                    tracing::warn!(
                        "gen {} (pid {}) still running {} after SIGTERM: killing it (drain timeout)",
                        old.number,
                        old.pid,
                        humantime::format_duration(timeout)
                    );
                    old.signal(Signal::SIGKILL);
                    old.exited().await
                }
            };
            let took = started.elapsed();
            this.metrics.drained(took);
            {
                let mut st = this.lock();
                let drained = st
                    .recent
                    .iter_mut()
                    .rev()
                    .find(|r| r.old_pid == old.pid && r.drain_us == 0);
                if let Some(r) = drained {
                    r.drain_us = (took.as_micros() as u64).max(1);
                }
            }
            tracing::info!(
                "gen {} (pid {}) drained in {} ms and {status}",
                old.number,
                old.pid,
                took.as_millis()
            );
            this.emit(
                Event::new(Phase::Drained, old.number, old.pid, status.to_string()).took(took),
            );
        });
    }
}
