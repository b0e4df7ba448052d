//! The supervisor: the process with the stable PID. It owns every listening socket,
//! the notify sockets and the generation counter, starts worker generations, restarts
//! them (see `restart`), replaces workers that die, reaps every child, and shuts the
//! node down gracefully.
//!
//! It runs on a current-thread runtime: a few tasks, little memory, and no reaping in
//! the middle of a `fork` (see `reaper`).

mod generation;
mod reaper;
mod restart;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::Signal;
use serde::Serialize;
use tokio::sync::{broadcast, watch};

pub use generation::{Generation, WorkerState};
pub use reaper::ExitStatus;
pub use restart::{Outcome, RestartError, RestartReport, RestartRequest, Timings, Trigger};

use crate::config::Config;
use crate::exe::{CheckedExe, ExeError, ExeInfo, ExePolicy};
use crate::listeners::{self, BoundListener};
use crate::metrics::Metrics;
use crate::phase::{Event, Phase, unix_ms};

/// How long a node that stopped waits for its last heartbeat to reach the controller.
const LAST_BEAT_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The node as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
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
}

/// Whether workers are this binary's own app or a foreign program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerKind {
    /// Workers run `run()` of a fleet-agent build (`FLEET_ROLE=worker`).
    Library,
    /// Workers are any program speaking socket activation + sd_notify.
    Exec,
}

#[derive(Debug)]
pub struct Supervisor {
    config: Config,
    token: Option<String>,
    policy: ExePolicy,
    listeners: Vec<BoundListener>,
    runtime_dir: tempfile::TempDir,
    worker_args: Vec<OsString>,
    kind: WorkerKind,
    reaper: Arc<reaper::Reaper>,
    metrics: Metrics,
    events: broadcast::Sender<Event>,
    phase: watch::Sender<Phase>,
    seq: AtomicU64,
    restart_lock: tokio::sync::Mutex<()>,
    state: Mutex<State>,
    shutdown: watch::Sender<Option<String>>,
    started_at: SystemTime,
    control_addr: Mutex<Option<SocketAddr>>,
}

#[derive(Debug)]
struct State {
    node: NodeState,
    next_generation: u64,
    current: Option<Arc<Generation>>,
    workers: BTreeMap<u64, Arc<Generation>>,
    exe: ExeInfo,
    previous_exe: Option<ExeInfo>,
    probation_until: Option<Instant>,
    in_progress: Option<String>,
    succeeded: u64,
    failed: u64,
    crash_streak: u32,
}

/// What `Status` and `/debug/admin/status` report.
#[derive(Debug, Clone, Serialize)]
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
}

impl StatusReport {
    /// Requests in flight over every worker: old and new generations both count while
    /// a restart drains.
    pub fn in_flight(&self) -> u64 {
        self.workers.iter().map(|w| w.in_flight).sum()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct WorkerReport {
    pub generation: u64,
    pub pid: u32,
    pub exe: ExeInfo,
    pub state: &'static str,
    pub started_at_unix_ms: u64,
    pub ready_at_unix_ms: u64,
    /// Requests in flight, as the worker last reported them.
    pub in_flight: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ListenerReport {
    pub server: String,
    pub addr: String,
    pub tls: bool,
}

impl Supervisor {
    /// Binds every listener and prepares the private runtime directory. `exe` is what
    /// generation 1 runs; its directory is always an allowed exe directory.
    pub fn new(
        config: Config,
        exe: PathBuf,
        worker_args: Vec<OsString>,
        kind: WorkerKind,
    ) -> anyhow::Result<Arc<Self>> {
        use anyhow::Context as _;
        let token = config.token()?;
        let exe = exe
            .canonicalize()
            .with_context(|| format!("cannot find the worker executable {}", exe.display()))?;
        let mut allowed = config.restart.allowed_exe_dirs.clone();
        if let Some(dir) = exe.parent() {
            allowed.push(dir.to_path_buf());
        }
        let policy = ExePolicy::new(&allowed, config.restart.max_exe_size);
        // Its digest is computed meanwhile: the first worker doesn't wait for it.
        let exe_info = policy.validate_later(&exe)?.info;
        let listeners = listeners::bind_all(&config)?;
        // Private (0700) directory for the notify sockets and the control socket.
        let runtime_dir = tempfile::Builder::new()
            .prefix("fleet-agent-")
            .tempdir()
            .context("cannot create the runtime directory for notify sockets")?;
        let (events, _) = broadcast::channel(1024);
        Ok(Arc::new(Self {
            token,
            policy,
            listeners,
            runtime_dir,
            worker_args,
            kind,
            reaper: Arc::new(reaper::Reaper::default()),
            metrics: Metrics::default(),
            events,
            phase: watch::Sender::new(Phase::Idle),
            seq: AtomicU64::new(0),
            restart_lock: tokio::sync::Mutex::new(()),
            state: Mutex::new(State {
                node: NodeState::Starting,
                next_generation: 1,
                current: None,
                workers: BTreeMap::new(),
                exe: exe_info,
                previous_exe: None,
                probation_until: None,
                in_progress: None,
                succeeded: 0,
                failed: 0,
                crash_streak: 0,
            }),
            shutdown: watch::Sender::new(None),
            started_at: SystemTime::now(),
            control_addr: Mutex::new(None),
            config,
        }))
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn listeners(&self) -> &[BoundListener] {
        &self.listeners
    }

    /// Where workers reach the supervisor's admin routes (owner-only Unix socket).
    pub fn control_socket_path(&self) -> PathBuf {
        self.runtime_dir.path().join("control.sock")
    }

    pub fn set_control_addr(&self, addr: SocketAddr) {
        *self.control_addr.lock().expect("lock") = Some(addr);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("supervisor state lock")
    }

    /// Publishes an event (and logs nothing: callers log what a person needs).
    fn emit(&self, mut event: Event) {
        event.seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        self.phase.send_replace(event.phase);
        let _ = self.events.send(event);
    }

    /// Every event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// The latest phase.
    pub fn phase(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    /// Checks an executable exactly as a restart would.
    pub async fn preflight(
        &self,
        exe: Option<&std::path::Path>,
        sha256: Option<&str>,
    ) -> Result<ExeInfo, ExeError> {
        let current = self.lock().exe.path.clone();
        let checked = self.policy.validate(exe.unwrap_or(&current), sha256).await;
        checked.map(|c| c.info)
    }

    /// Asks the node to shut down gracefully; `run` does the work.
    pub fn request_shutdown(&self, reason: impl Into<String>) {
        let reason = reason.into();
        self.shutdown.send_if_modified(|s| {
            if s.is_none() {
                *s = Some(reason);
                true
            } else {
                false
            }
        });
    }

    pub fn shutting_down(&self) -> bool {
        self.shutdown.borrow().is_some()
    }

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
            format!("http://{control_addr}{}", self.config.admin.path)
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
                    state: g.state().as_str(),
                    started_at_unix_ms: unix_ms(g.started_at),
                    ready_at_unix_ms: g.ready_at.lock().expect("lock").map(unix_ms).unwrap_or(0),
                    in_flight: g.in_flight(),
                })
                .collect(),
            listeners: self
                .listeners
                .iter()
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
            ("FLEET_NODE_ID".to_string(), self.config.node_id.clone()),
        ];
        if self.kind == WorkerKind::Library {
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
                if st.node != NodeState::ShuttingDown {
                    st.node = NodeState::Degraded;
                }
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
            "worker gen {} (pid {}) {status} while serving; last stderr line: {last}",
            generation.number,
            generation.pid
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
            tracing::warn!("auto-revert: {msg}");
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
            let guard = self.restart_lock.lock().await;
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
                        "cannot start {}: {e}; trying {} instead",
                        exe.display(),
                        dead.exe.path.display()
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

    /// Runs the node: generation 1, then signals and requests, until a graceful
    /// shutdown has finished. Returns the process exit code.
    pub async fn run(self: Arc<Self>) -> Result<(), String> {
        use tokio::signal::unix::{SignalKind, signal};
        tokio::spawn(self.reaper.clone().run());
        let mut usr1 = signal(SignalKind::user_defined1()).map_err(|e| e.to_string())?;
        let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
        let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
        let mut quit = signal(SignalKind::quit()).map_err(|e| e.to_string())?;
        let mut hup = signal(SignalKind::hangup()).map_err(|e| e.to_string())?;

        let first = self
            .restart(RestartRequest {
                trigger: Trigger::Start,
                ..Default::default()
            })
            .await
            .map_err(|e| format!("cannot start the first worker: {e}"))?;
        if first.outcome != Outcome::Succeeded {
            let mut msg = format!("the first worker did not start: {}", first.reason);
            for line in &first.stderr_tail {
                msg.push_str("\n    ");
                msg.push_str(line);
            }
            return Err(msg);
        }
        for line in listeners::describe(&self.listeners, "started") {
            tracing::info!("{line}");
        }
        let heartbeat = self
            .config
            .controller
            .clone()
            .map(|url| tokio::spawn(crate::heartbeat::run(self.clone(), url)));
        // Under systemd (Type=notify) the node is up now.
        if let Err(e) = crate::notify::notify("READY=1") {
            tracing::warn!("cannot tell the service manager we are ready: {e}");
        }

        let mut shutdown = self.shutdown.subscribe();
        loop {
            tokio::select! {
                _ = usr1.recv() => {
                    let this = self.clone();
                    tokio::spawn(async move {
                        let request = RestartRequest { trigger: Trigger::Signal, ..Default::default() };
                        if let Err(e) = this.restart(request).await {
                            tracing::warn!("SIGUSR1 restart refused: {e}");
                        }
                    });
                }
                _ = term.recv() => self.request_shutdown("SIGTERM"),
                _ = int.recv() => self.request_shutdown("SIGINT"),
                _ = quit.recv() => self.request_shutdown("SIGQUIT"),
                _ = hup.recv() => self.request_shutdown("SIGHUP"),
                _ = shutdown.wait_for(|s| s.is_some()) => break,
            }
        }
        let reason = self.shutdown.borrow().clone().unwrap_or_default();
        self.shut_down(&reason).await;
        if let Some(heartbeat) = heartbeat {
            // Its last beat says "stopped"; a controller that is down does not hold
            // the exit up for long.
            if tokio::time::timeout(LAST_BEAT_WAIT, heartbeat)
                .await
                .is_err()
            {
                tracing::warn!("could not tell the controller that this node stopped");
            }
        }
        Ok(())
    }

    /// Drains every worker (SIGKILL at the drain deadline) and returns when none is left.
    async fn shut_down(self: &Arc<Self>, reason: &str) {
        let workers: Vec<Arc<Generation>> = {
            let mut st = self.lock();
            st.node = NodeState::ShuttingDown;
            st.workers.values().cloned().collect()
        };
        tracing::info!(
            "shutting down ({reason}): draining {} worker(s)",
            workers.len()
        );
        self.emit(Event::new(Phase::ShuttingDown, 0, 0, reason.to_string()));
        let deadline = tokio::time::Instant::now() + self.config.restart.drain_timeout;
        // A restart in progress notices the shutdown and kills its new generation.
        let _ = tokio::time::timeout_at(deadline, self.restart_lock.lock()).await;
        let workers: Vec<Arc<Generation>> = {
            let st = self.lock();
            workers
                .into_iter()
                .chain(st.workers.values().cloned())
                .collect()
        };
        for worker in &workers {
            worker.set_state(WorkerState::Draining);
            worker.signal(Signal::SIGTERM);
        }
        for worker in &workers {
            if tokio::time::timeout_at(deadline, worker.exited())
                .await
                .is_err()
            {
                tracing::warn!(
                    "gen {} (pid {}) still running at the drain deadline: killing it",
                    worker.number,
                    worker.pid
                );
                worker.signal(Signal::SIGKILL);
                worker.exited().await;
            }
        }
        self.lock().node = NodeState::Stopped;
        self.emit(Event::new(Phase::Stopped, 0, 0, reason.to_string()));
        tracing::info!("all servers shutdown");
    }
}
