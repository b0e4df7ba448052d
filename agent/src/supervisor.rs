//! The supervisor: the process with the stable PID. It owns every listening socket,
//! the notify sockets and the generation counter, runs the restart lifecycle (see
//! `lifecycle`), reaps every child, answers every signal, and shuts the node down
//! gracefully.
//!
//! It runs on a current-thread runtime: a few tasks, little memory, and no reaping in
//! the middle of a `fork` (see `reaper`).

mod generation;
mod lifecycle;
mod reaper;
mod restart;
mod signals;
mod status;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use nix::sys::signal::Signal;
use tokio::sync::{broadcast, watch};

pub use generation::{Generation, WorkerState};
pub use restart::{
    MAX_REASON, Outcome, RestartError, RestartReport, RestartRequest, Timings, Trigger,
};
pub(crate) use signals::name as signal_name;
pub use status::{ListenerReport, NodeState, RECENT_RESTARTS, StatusReport, WorkerReport};

use crate::config::{Config, ConfigError};
use crate::exe::{ExeError, ExeInfo, ExePolicy};
use crate::listeners::{self, BindError, BoundListener};
use crate::logging::escape;
use crate::metrics::Metrics;
use crate::phase::{Event, Phase};

/// The variable that names the supervisor's app socket in a worker's environment
/// (see [`crate::Node`]).
pub const APP_SOCKET_ENV: &str = "FLEET_APP_SOCKET";

/// Whether workers are this binary's own app or a foreign program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerKind {
    /// Workers run `run()` of a fleet-agent build (`FLEET_ROLE=worker`).
    Library,
    /// Workers are any program speaking socket activation + sd_notify.
    Exec,
}

/// Why the supervisor could not start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot find the worker executable {path}: {source}")]
    NoExecutable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Exe(#[from] ExeError),
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("cannot create the runtime directory for the notify and control sockets: {0}")]
    RuntimeDir(std::io::Error),
    #[error("cannot watch signals: {0}")]
    Signals(std::io::Error),
    #[error("{0}")]
    FirstWorker(String),
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
    seq: AtomicU64,
    /// Held by the one restart that runs (owned, so the restart's task holds it).
    restart_lock: Arc<tokio::sync::Mutex<()>>,
    state: Mutex<State>,
    shutdown: watch::Sender<Option<String>>,
    started_at: SystemTime,
    control_addr: Mutex<Option<SocketAddr>>,
}

#[derive(Debug)]
struct State {
    /// Changed only by `State::set_node` (lifecycle).
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
    /// The last restarts, oldest first (at most `status::RECENT_RESTARTS`).
    recent: std::collections::VecDeque<status::RecentRestart>,
}

impl Supervisor {
    /// Binds every listener and prepares the private runtime directory. `exe` is what
    /// generation 1 runs; its directory is always an allowed exe directory.
    pub fn new(
        config: Config,
        exe: PathBuf,
        worker_args: Vec<OsString>,
        kind: WorkerKind,
    ) -> Result<Arc<Self>, SupervisorError> {
        let token = config.token()?;
        let exe = exe
            .canonicalize()
            .map_err(|source| SupervisorError::NoExecutable { path: exe, source })?;
        let mut allowed = config.restart.allowed_exe_dirs.clone();
        if let Some(dir) = exe.parent() {
            allowed.push(dir.to_path_buf());
        }
        let policy = ExePolicy::new(&allowed, config.restart.max_exe_size);
        // Its digest is computed meanwhile: the first worker doesn't wait for it.
        let exe_info = policy.validate_later(&exe)?.info;
        let listeners = listeners::bind_all(&config)?;
        // Private (0700) directory for the notify sockets and the control sockets.
        let runtime_dir = tempfile::Builder::new()
            .prefix("fleet-agent-")
            .tempdir()
            .map_err(SupervisorError::RuntimeDir)?;
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
            seq: AtomicU64::new(0),
            restart_lock: Arc::new(tokio::sync::Mutex::new(())),
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
                recent: std::collections::VecDeque::new(),
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

    /// Where workers reach the supervisor's admin routes on behalf of a request on an
    /// app port (owner-only Unix socket; checked like the control port).
    pub fn control_socket_path(&self) -> PathBuf {
        self.runtime_dir.path().join("control.sock")
    }

    /// Where the app's own code reaches its node ([`crate::Node`]; owner-only Unix socket).
    pub fn app_socket_path(&self) -> PathBuf {
        self.runtime_dir.path().join("app.sock")
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
        let _ = self.events.send(event);
    }

    /// Every event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
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

    /// Asks the node to shut down gracefully; `run` does the work. A reason longer
    /// than [`MAX_REASON`] is cut (it is logged).
    pub fn request_shutdown(&self, reason: impl Into<String>) {
        let mut reason = reason.into();
        if reason.len() > MAX_REASON {
            let mut end = MAX_REASON;
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            reason.truncate(end);
            reason.push('…');
        }
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

    /// Runs the node: generation 1, then signals and requests, until a graceful
    /// shutdown has finished.
    pub async fn run(self: Arc<Self>) -> Result<(), SupervisorError> {
        tokio::spawn(self.reaper.clone().run());
        let mut signals = signals::Signals::install().map_err(SupervisorError::Signals)?;

        let first = self
            .restart(RestartRequest {
                trigger: Trigger::Start,
                ..Default::default()
            })
            .await
            .map_err(|e| {
                SupervisorError::FirstWorker(format!("cannot start the first worker: {e}"))
            })?;
        if first.outcome != Outcome::Succeeded {
            let mut msg = format!("the first worker did not start: {}", first.reason);
            for line in &first.stderr_tail {
                msg.push_str("\n    ");
                msg.push_str(&escape(line));
            }
            return Err(SupervisorError::FirstWorker(msg));
        }
        for line in listeners::describe(&self.listeners, "started") {
            tracing::info!("{line}");
        }
        // Under systemd (Type=notify) the node is up now.
        if let Err(e) = crate::notify::notify("READY=1") {
            tracing::warn!("cannot tell the service manager we are ready: {e}");
        }

        let mut shutdown = self.shutdown.subscribe();
        loop {
            tokio::select! {
                action = signals.next() => match action {
                    signals::Action::Restart => {
                        let this = self.clone();
                        tokio::spawn(async move {
                            let request = RestartRequest { trigger: Trigger::Signal, ..Default::default() };
                            // Refusals are logged by the lifecycle.
                            let _ = this.restart(request).await;
                        });
                    }
                    signals::Action::Shutdown(name) => self.request_shutdown(name),
                    signals::Action::Ignored => {}
                },
                _ = shutdown.wait_for(|s| s.is_some()) => break,
            }
        }
        let reason = self.shutdown.borrow().clone().unwrap_or_default();
        self.shut_down(&reason).await;
        Ok(())
    }

    /// Drains every worker (SIGKILL at the drain deadline) and returns when none is left.
    async fn shut_down(self: &Arc<Self>, reason: &str) {
        let workers: Vec<Arc<Generation>> = {
            let mut st = self.lock();
            st.set_node(NodeState::ShuttingDown);
            st.workers.values().cloned().collect()
        };
        tracing::info!(
            "shutting down ({}): draining {} worker(s)",
            escape(reason),
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
        self.lock().set_node(NodeState::Stopped);
        self.emit(Event::new(Phase::Stopped, 0, 0, reason.to_string()));
        tracing::info!("all servers shutdown");
    }
}
