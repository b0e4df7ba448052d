//! One worker generation as the supervisor sees it: its process, its readiness
//! (`READY=1` on its own notify socket), its exit status and its last stderr lines.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use nix::sys::signal::Signal;
use tokio::io::AsyncBufReadExt;
use tokio::net::UnixDatagram;
use tokio::sync::watch;

use super::reaper::{ExitStatus, Reaper};
use crate::exe::{CheckedExe, ExeInfo};
use crate::notify::{self, Notice};
use crate::process::{self, SpawnSpec};

/// How many stderr lines a failure report carries.
const STDERR_TAIL: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    Starting,
    Serving,
    Draining,
}

impl WorkerState {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::Serving => "serving",
            WorkerState::Draining => "draining",
        }
    }
}

/// A running (or just exited) worker process.
#[derive(Debug)]
pub struct Generation {
    pub number: u64,
    pub pid: u32,
    pub exe: ExeInfo,
    pub started_at: SystemTime,
    pub state: Mutex<WorkerState>,
    pub ready_at: Mutex<Option<SystemTime>>,
    /// Requests in flight, as the worker last reported them.
    in_flight: Arc<AtomicU64>,
    exit: watch::Receiver<Option<ExitStatus>>,
    ready: watch::Receiver<bool>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    stderr_done: watch::Receiver<bool>,
    notify_path: PathBuf,
}

/// What a new generation needs from the supervisor.
#[derive(Debug)]
pub struct Launch<'a> {
    pub number: u64,
    /// Started from its open descriptor: what was checked is what runs.
    pub exe: &'a CheckedExe,
    pub args: &'a [OsString],
    pub env: Vec<(String, String)>,
    pub listeners: Vec<(String, std::os::fd::RawFd)>,
    pub runtime_dir: &'a std::path::Path,
}

impl Generation {
    /// Binds the generation's notify socket and starts its process.
    pub fn spawn(launch: Launch<'_>, reaper: &Reaper) -> std::io::Result<Arc<Self>> {
        let notify_path = launch
            .runtime_dir
            .join(format!("notify-{}.sock", launch.number));
        let _ = std::fs::remove_file(&notify_path);
        let notify_socket = UnixDatagram::bind(&notify_path)?;
        let mut env = launch.env;
        env.push((
            "NOTIFY_SOCKET".into(),
            notify_path.to_string_lossy().into_owned(),
        ));
        env.push(("FLEET_GENERATION".into(), launch.number.to_string()));
        // A `#!` script started from a descriptor sees `$0` = /dev/fd/N: this names
        // the file (resolved), e.g. to find what lies next to it.
        env.push((
            "FLEET_EXE".into(),
            launch.exe.info.path.to_string_lossy().into_owned(),
        ));
        let spec = SpawnSpec {
            exe: &launch.exe.info.path,
            exe_fd: launch.exe.fd(),
            script: launch.exe.is_script(),
            args: launch.args,
            env,
            listeners: launch.listeners,
        };
        let mut child = match process::spawn(&spec) {
            Ok(child) => child,
            Err(e) => {
                let _ = std::fs::remove_file(&notify_path);
                return Err(e);
            }
        };
        let pid = child.id();
        // Registered before we yield to the runtime, so the reaper can't miss it.
        let exit = reaper.watch(pid);

        let (ready_tx, ready) = watch::channel(false);
        let stderr_tail = Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_TAIL)));
        let (stderr_done_tx, stderr_done) = watch::channel(false);
        if let Some(stderr) = child.stderr.take() {
            let tail = stderr_tail.clone();
            match tokio::process::ChildStderr::from_std(stderr) {
                Ok(stderr) => {
                    tokio::spawn(pump_stderr(stderr, tail, stderr_done_tx));
                }
                Err(e) => tracing::warn!("cannot read the stderr of pid {pid}: {e}"),
            }
        }
        let in_flight = Arc::new(AtomicU64::new(0));
        tokio::spawn(listen_notify(
            notify_socket,
            pid,
            ready_tx,
            in_flight.clone(),
            exit.clone(),
        ));

        Ok(Arc::new(Self {
            number: launch.number,
            pid,
            exe: launch.exe.info.clone(),
            started_at: SystemTime::now(),
            state: Mutex::new(WorkerState::Starting),
            ready_at: Mutex::new(None),
            in_flight,
            exit,
            ready,
            stderr_tail,
            stderr_done,
            notify_path,
        }))
    }

    pub fn state(&self) -> WorkerState {
        *self.state.lock().expect("state lock")
    }

    pub fn set_state(&self, state: WorkerState) {
        *self.state.lock().expect("state lock") = state;
        if state == WorkerState::Serving {
            *self.ready_at.lock().expect("state lock") = Some(SystemTime::now());
        }
    }

    /// Requests in flight, as the worker last reported them (0 if it never did).
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn exit_status(&self) -> Option<ExitStatus> {
        *self.exit.borrow()
    }

    pub async fn exited(&self) -> ExitStatus {
        let mut rx = self.exit.clone();
        loop {
            if let Some(status) = *rx.borrow_and_update() {
                return status;
            }
            if rx.changed().await.is_err() {
                // The reaper dropped the sender without a status: cannot happen
                // while the supervisor runs; treat as killed.
                return ExitStatus::Signal(Signal::SIGKILL);
            }
        }
    }

    /// Resolves when the worker has sent READY=1, and never if it exits first
    /// (its notify listener then drops the sender).
    pub async fn ready(&self) {
        let mut rx = self.ready.clone();
        if rx.wait_for(|r| *r).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Sends `sig` unless the process has already been reaped (its PID may be reused).
    pub fn signal(&self, sig: Signal) {
        if self.exit_status().is_none() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), sig);
        }
    }

    /// The last lines it wrote to stderr, once its pipe is closed (or after a short wait).
    pub async fn stderr_tail(&self) -> Vec<String> {
        let mut done = self.stderr_done.clone();
        let _ = tokio::time::timeout(std::time::Duration::from_millis(500), done.wait_for(|d| *d))
            .await;
        self.stderr_tail
            .lock()
            .expect("tail lock")
            .iter()
            .cloned()
            .collect()
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.notify_path);
    }
}

/// Copies the worker's stderr to ours, line by line, keeping the last lines.
async fn pump_stderr(
    stderr: tokio::process::ChildStderr,
    tail: Arc<Mutex<VecDeque<String>>>,
    done: watch::Sender<bool>,
) {
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "{line}");
        }
        let mut tail = tail.lock().expect("tail lock");
        if tail.len() == STDERR_TAIL {
            tail.pop_front();
        }
        tail.push_back(line);
    }
    let _ = done.send(true);
}

/// Reads the generation's sd_notify datagrams until it exits.
async fn listen_notify(
    socket: UnixDatagram,
    pid: u32,
    ready: watch::Sender<bool>,
    in_flight: Arc<AtomicU64>,
    mut exit: watch::Receiver<Option<ExitStatus>>,
) {
    let mut buf = vec![0u8; 4096];
    loop {
        tokio::select! {
            // A READY=1 sent just before exiting still counts: read before looking at the exit.
            biased;
            res = socket.recv(&mut buf) => {
                let Ok(n) = res else { return };
                for notice in notify::parse(&buf[..n]) {
                    match notice {
                        Notice::Ready => { let _ = ready.send(true); }
                        Notice::Status(s) => tracing::debug!("pid {pid} status: {s}"),
                        Notice::InFlight(n) => in_flight.store(n, Ordering::Relaxed),
                        Notice::Stopping | Notice::Other(_) => {}
                    }
                }
            }
            _ = exit.wait_for(|e| e.is_some()) => return,
        }
    }
}
