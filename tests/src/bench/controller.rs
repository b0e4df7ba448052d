//! `fleet-controller` as a benchmark starts it: a free loopback port, its own process
//! group, its output kept for failure messages, killed on drop.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nix::sys::signal::{Signal, kill, killpg};
use tokio::sync::mpsc;

use super::{drain_lines, lock, pid_of};

/// How long the controller may take to log the address it listens on.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Warnings and errors kept apart from the tail.
const WARNINGS_KEPT: usize = 20;

/// The started controller. Dropping it kills it (and its process group) and reaps it.
#[derive(Debug)]
pub struct Controller {
    pub addr: SocketAddr,
    child: Child,
    tail: Arc<Mutex<VecDeque<String>>>,
    /// Its last warnings and errors, apart: at scale they scroll out of the tail
    /// among thousands of lines of registrations.
    warnings: Arc<Mutex<VecDeque<String>>>,
    /// How many lines it logged at WARN or ERROR in all.
    warned: Arc<std::sync::atomic::AtomicUsize>,
}

impl Controller {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn tail(&self, n: usize) -> Vec<String> {
        let t = lock(&self.tail);
        t.iter().skip(t.len().saturating_sub(n)).cloned().collect()
    }

    /// Its last `n` lines logged at WARN or ERROR.
    pub fn warnings(&self, n: usize) -> Vec<String> {
        let w = lock(&self.warnings);
        w.iter().skip(w.len().saturating_sub(n)).cloned().collect()
    }

    /// How many lines it logged at WARN or ERROR so far.
    pub fn warned(&self) -> usize {
        self.warned.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub async fn terminate(&mut self, grace: Duration) {
        if self.exited().is_some() {
            return;
        }
        let _ = kill(pid_of(self.pid()), Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && self.exited().is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        if self.exited().is_some() {
            return;
        }
        let pid = pid_of(self.pid());
        let _ = kill(pid, Signal::SIGKILL);
        let _ = killpg(pid, Signal::SIGKILL);
        let _ = self.child.wait();
        eprintln!(
            "{}: killed fleet-controller (pid {pid})",
            super::child::program_name()
        );
    }
}

fn parse_listening(line: &str) -> Option<SocketAddr> {
    const MARKER: &str = "controller listening on ";
    let rest = &line[line.find(MARKER)? + MARKER.len()..];
    rest.split_whitespace()
        .next()?
        .trim_matches(|c| c == '[' || c == ']' || c == ',')
        .parse()
        .ok()
}

pub async fn start_controller(exe: &Path, db: &Path, ttl: Duration) -> anyhow::Result<Controller> {
    let ttl = format!("{}ms", ttl.as_millis());
    let mut args: Vec<OsString> = vec!["--listen".into(), "127.0.0.1:0".into(), "--db".into()];
    args.push(db.into());
    args.extend(["--heartbeat-ttl".into(), ttl.into()]);
    start_controller_with(exe, &args).await
}

/// Starts `exe ARGS` (which should include `--listen 127.0.0.1:0`) and returns once it
/// logged the address it listens on.
pub async fn start_controller_with(exe: &Path, args: &[OsString]) -> anyhow::Result<Controller> {
    let mut child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Own process group: Ctrl-C reaches only the bench, which stops it in order.
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start {}", exe.display()))?;
    let tail = Arc::new(Mutex::new(VecDeque::new()));
    let warnings = Arc::new(Mutex::new(VecDeque::new()));
    let warned = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let on_line = |tx: mpsc::UnboundedSender<SocketAddr>| {
        let (warnings, warned) = (warnings.clone(), warned.clone());
        move |line: &str| {
            if let Some(a) = parse_listening(line) {
                let _ = tx.send(a);
            }
            if line.contains(" WARN ") || line.contains(" ERROR ") {
                warned.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let mut w = lock(&warnings);
                if w.len() == WARNINGS_KEPT {
                    w.pop_front();
                }
                w.push_back(line.to_string());
            }
        }
    };
    if let Some(stdout) = child.stdout.take() {
        drain_lines(stdout, tail.clone(), on_line(tx.clone()));
    }
    if let Some(stderr) = child.stderr.take() {
        drain_lines(stderr, tail.clone(), on_line(tx));
    }
    let mut controller = Controller {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        tail,
        warnings,
        warned,
    };
    match tokio::time::timeout(STARTUP_TIMEOUT, rx.recv()).await {
        Ok(Some(addr)) => {
            controller.addr = addr;
            Ok(controller)
        }
        _ => {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let status = controller.exited();
            bail!(
                "fleet-controller did not log `controller listening on ADDR` within {STARTUP_TIMEOUT:?} ({}); last output:\n  {}",
                status.map_or("still running".to_string(), |s| s.to_string()),
                controller.tail(15).join("\n  ")
            )
        }
    }
}
