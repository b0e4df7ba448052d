//! The programs a benchmark starts: each in its own process group, its output
//! drained by threads (the last stderr lines kept for error messages), and killed —
//! with everything it spawned — when the guard is dropped, also on panic and Ctrl-C.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use nix::sys::signal::{Signal, kill, killpg};
use std::os::unix::process::CommandExt as _;

use super::{lock, pid_of};

/// A started program and everything it spawned. Dropping it kills the process, its
/// descendants and its process group with SIGKILL and reaps it.
#[derive(Debug)]
pub struct Proc {
    pub name: &'static str,
    child: Child,
    pub stderr_tail: Arc<Mutex<VecDeque<String>>>,
}

/// The pipes of a freshly spawned child, before their drain threads start.
#[derive(Debug)]
pub struct Pipes {
    pub stdout: Option<ChildStdout>,
    pub stderr: Option<ChildStderr>,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last `n` lines of its stderr (as far as a drain thread copied them).
    pub fn tail(&self, n: usize) -> Vec<String> {
        let tail = lock(&self.stderr_tail);
        tail.iter()
            .skip(tail.len().saturating_sub(n))
            .cloned()
            .collect()
    }

    /// Its exit status, once it has exited (reaps it).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Takes its stdin (when it was spawned with one piped), e.g. to close it.
    pub fn take_stdin(&mut self) -> Option<std::process::ChildStdin> {
        self.child.stdin.take()
    }

    /// Graceful stop: SIGTERM, then wait up to `grace` for the exit (the Drop guard
    /// kills whatever is left).
    pub async fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.exited() {
            return Some(status);
        }
        let _ = kill(pid_of(self.pid()), Signal::SIGTERM);
        self.wait_exit(grace).await
    }

    /// Waits up to `timeout` for it to exit by itself.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pid = self.pid();
        if self.exited().is_some() {
            // What it started may live on in its process group (a daemon's
            // children, workers not yet gone): the group kill gets them.
            let _ = killpg(pid_of(pid), Signal::SIGKILL);
            return;
        }
        let all = descendants(pid);
        let _ = kill(pid_of(pid), Signal::SIGKILL);
        for d in all {
            let _ = kill(pid_of(d), Signal::SIGKILL);
        }
        let _ = killpg(pid_of(pid), Signal::SIGKILL);
        let _ = self.child.wait();
        eprintln!("{}: killed {} (pid {pid})", program_name(), self.name);
    }
}

/// The name of the running benchmark, for messages.
pub fn program_name() -> String {
    std::env::args()
        .next()
        .as_deref()
        .map(Path::new)
        .and_then(Path::file_name)
        .map_or_else(|| "bench".into(), |n| n.to_string_lossy().into_owned())
}

/// Spawns `command` with piped output, null stdin (unless the caller set one) and a
/// process group of its own: Ctrl-C in the terminal reaches only the benchmark,
/// which then stops everything in order, and the group can be killed as a whole.
pub fn spawn(name: &'static str, mut command: Command) -> anyhow::Result<(Proc, Pipes)> {
    let program = command.get_program().to_owned();
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start {}", program.to_string_lossy()))?;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    Ok((
        Proc {
            name,
            child,
            stderr_tail: Arc::new(Mutex::new(VecDeque::new())),
        },
        Pipes { stdout, stderr },
    ))
}

/// The CPUs the servers a benchmark starts are pinned to (`taskset -c` list), if any.
static SERVER_CPUS: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Pins every server started from now on to `cpus` (a `taskset -c` list, checked by
/// the caller): `command` and `server_command` start them under `taskset`, so the
/// processes they spawn (workers, a new nginx master) inherit it.
pub fn pin_servers(cpus: &str) {
    let _ = SERVER_CPUS.set(cpus.to_string());
}

/// `Command::new(exe)`, under `taskset -c CPUS` when servers are pinned.
pub fn server_command(exe: &Path) -> Command {
    match SERVER_CPUS.get() {
        Some(cpus) => {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(cpus).arg(exe);
            c
        }
        None => Command::new(exe),
    }
}

/// `Command::new(exe).args(args)` with stdin from /dev/null (pinned as
/// [`server_command`] says).
pub fn command(exe: &Path, args: &[&str]) -> Command {
    let mut c = server_command(exe);
    c.args(args).stdin(Stdio::null());
    c
}

/// The direct children of `pid` (from /proc/PID/task/TID/children).
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let Ok(list) = std::fs::read_to_string(task.path().join("children")) else {
            continue;
        };
        for c in list
            .split_whitespace()
            .filter_map(|c| c.parse::<u32>().ok())
        {
            if !out.contains(&c) {
                out.push(c);
            }
        }
    }
    out
}

/// Every descendant of `pid`, bounded.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut stack = vec![pid];
    while let Some(p) = stack.pop() {
        if out.len() >= 4096 {
            break;
        }
        for c in children(p) {
            if !out.contains(&c) {
                out.push(c);
                stack.push(c);
            }
        }
    }
    out
}

/// `name` next to this executable (the workspace's binaries are built together).
pub fn sibling_exe(name: &str) -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("cannot find this executable's path")?;
    let dir = me
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent directory", me.display()))?;
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "{} not found; run `cargo build --release --workspace --bins` first",
            path.display()
        );
    }
    Ok(path)
}
