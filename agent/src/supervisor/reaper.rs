//! Reaping children, including orphans: the supervisor may be PID 1 of a container,
//! where every orphaned process in the namespace becomes its child.
//!
//! One `waitpid(-1)` loop driven by `SIGCHLD` collects every exit; a worker's status
//! goes to whoever watches its PID. Because only this loop reaps, a PID we have not
//! seen exit is still ours (alive or a zombie), so signalling it can't hit a reused PID.
//! Invariant: the supervisor runs on a current-thread runtime, so this loop never runs
//! in the middle of `Command::spawn` (which waits for a child whose exec failed).

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;

use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::sync::watch;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    Signal(nix::sys::signal::Signal),
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exited with status {c}"),
            ExitStatus::Signal(s) => write!(f, "was killed by signal {}", s.as_str()),
        }
    }
}

#[derive(Debug, Default)]
pub struct Reaper {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    watched: HashMap<i32, watch::Sender<Option<ExitStatus>>>,
    /// Exits nobody watched (yet): orphans, or a child that died before `watch`.
    unclaimed: HashMap<i32, ExitStatus>,
}

impl Reaper {
    /// The exit status of `pid`, once it has exited.
    pub fn watch(&self, pid: u32) -> watch::Receiver<Option<ExitStatus>> {
        let mut inner = self.inner.lock().expect("reaper lock");
        let early = inner.unclaimed.remove(&(pid as i32));
        let (tx, rx) = watch::channel(early);
        if early.is_none() {
            inner.watched.insert(pid as i32, tx);
        }
        rx
    }

    /// Collects every child that has exited so far.
    pub fn reap(&self) {
        loop {
            let (pid, status) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, ExitStatus::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, ExitStatus::Signal(sig)),
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(_) => continue,
            };
            let mut inner = self.inner.lock().expect("reaper lock");
            match inner.watched.remove(&pid.as_raw()) {
                Some(tx) => {
                    let _ = tx.send(Some(status));
                }
                None => {
                    tracing::debug!("reaped process {pid} ({status})");
                    if inner.unclaimed.len() >= 256 {
                        inner.unclaimed.clear();
                    }
                    inner.unclaimed.insert(pid.as_raw(), status);
                }
            }
        }
    }

    /// Reaps on every `SIGCHLD`, forever.
    pub async fn run(self: std::sync::Arc<Self>) {
        let mut sigchld = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())
        {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("cannot watch SIGCHLD, exited workers will not be noticed: {e}");
                return;
            }
        };
        loop {
            self.reap();
            if sigchld.recv().await.is_none() {
                return;
            }
        }
    }
}
