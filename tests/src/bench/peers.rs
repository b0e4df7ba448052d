//! The servers people run today, as peers of a benchmark: nginx and HAProxy from the
//! distribution's packages, each in a per-run temp dir (configuration, pid file,
//! error log and temp paths all inside it), in the foreground, on a free loopback
//! port, answering `GET /` with a fixed "hello", and killed with their process group
//! when dropped.
//!
//! How each reloads, and when a reload counts as complete:
//! - nginx `-s reload` (SIGHUP to the master): the master starts new workers and
//!   tells the old ones to finish; complete when every old worker has exited.
//! - nginx binary upgrade: `USR2` to the master starts a new master (the pid file
//!   moves to `nginx.pid.oldbin`), which starts its workers; then `QUIT` to the old
//!   master; complete when the old master and its workers have exited.
//! - HAProxy `-W` (master-worker): `SIGUSR2` to the master re-executes it, it forks a
//!   new worker that takes over the listeners (`-x sockpair@`), the old worker stops
//!   listening and finishes its connections; complete when the old worker has exited.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::wait::{WaitPidFlag, waitpid};
use tempfile::TempDir;

use super::child::{Proc, children, command, spawn};
use super::{drain_lines, lock, pid_of};
use crate::harness::{http_get, is_running};

/// What the peers answer to `GET /`.
pub const BODY: &str = "hello";
/// How often reload trackers look at /proc.
pub const POLL: Duration = Duration::from_millis(2);
/// How long a peer may take to start answering.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// Attempts at a free port (another process may take the port between our probe and
/// the peer's bind).
const PORT_ATTEMPTS: usize = 5;

/// `name` on `PATH`, else in the sbin directories a distribution installs servers to.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The first line a program prints for `flag` (`nginx -v` prints to stderr).
pub fn version(exe: &Path, flag: &str) -> String {
    std::process::Command::new(exe)
        .arg(flag)
        .stdin(Stdio::null())
        .output()
        .ok()
        .and_then(|o| {
            let text = [o.stdout, o.stderr].concat();
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "?".into())
}

/// A port that was free a moment ago on 127.0.0.1 (bound to port 0, then released).
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("cannot bind 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Two different ports that were free a moment ago (both bound at once, then
/// released): a peer's HTTP/1.1 and HTTP/2 ports.
pub fn free_ports() -> anyhow::Result<(u16, u16)> {
    let bind = || std::net::TcpListener::bind("127.0.0.1:0").context("cannot bind 127.0.0.1:0");
    let (a, b) = (bind()?, bind()?);
    Ok((a.local_addr()?.port(), b.local_addr()?.port()))
}

/// `GET /` answered with a 2xx.
pub async fn answers(addr: SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(2), http_get(addr, "/")).await,
        Ok(Ok(r)) if r.status.is_success()
    )
}

/// Makes this process the reaper of its orphaned descendants (an nginx master left
/// behind by a binary upgrade), so they stay below it and it can reap them.
pub fn become_subreaper() -> anyhow::Result<()> {
    nix::sys::prctl::set_child_subreaper(true).context("prctl(PR_SET_CHILD_SUBREAPER)")
}

/// Reaps `pid` if it is an exited child of ours (no-op otherwise).
fn reap(pid: u32) {
    let _ = waitpid(pid_of(pid), Some(WaitPidFlag::WNOHANG));
}

/// Waits (polling /proc) until `check` holds; `false` after `timeout`.
async fn poll_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// One reload as a peer went through it.
#[derive(Debug, Clone)]
pub struct Reload {
    /// When the reload was triggered.
    pub trigger: Instant,
    /// When a new worker (or master) was first seen.
    pub ready: Option<Instant>,
    /// When the last process it replaced had exited.
    pub done: Option<Instant>,
    /// What went wrong, if it did not go through.
    pub error: Option<String>,
}

// ---------------------------------------------------------------------------
// nginx

/// How nginx is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NginxMode {
    /// The master is our child (reloads by `nginx -s reload`).
    Foreground,
    /// The master is started through a shell that exits once it is up: nginx ignores
    /// `USR2` while the process that started it is alive ("the changing binary signal
    /// is ignored"), as it would be when run as a daemon. Needs a subreaper to reap
    /// its old masters (see [`become_subreaper`]).
    Upgradable,
}

/// A running nginx.
#[derive(Debug)]
pub struct Nginx {
    exe: PathBuf,
    dir: TempDir,
    pub addr: SocketAddr,
    /// The same server over HTTP/2 (cleartext, prior knowledge: `listen … http2`).
    pub h2_addr: SocketAddr,
    /// From spawning it until it first answered `GET /` with a 2xx.
    pub startup: Duration,
    /// The master (Foreground) or the shell that started it (Upgradable); its
    /// process group holds every nginx process.
    proc: Proc,
    /// Every master seen, for reaping.
    masters: Vec<u32>,
}

impl Nginx {
    /// Starts nginx on a free port (retrying when the port was taken meanwhile).
    pub async fn start(exe: &Path, mode: NginxMode) -> anyhow::Result<Nginx> {
        let mut last = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let (port, h2_port) = free_ports()?;
            match Self::start_on(exe, mode, port, h2_port).await? {
                Ok(nginx) => return Ok(nginx),
                Err(collision) => last = collision,
            }
        }
        bail!("nginx could not bind a free port in {PORT_ATTEMPTS} attempts: {last}")
    }

    /// `Ok(Err(_))`: the port was taken.
    async fn start_on(
        exe: &Path,
        mode: NginxMode,
        port: u16,
        h2_port: u16,
    ) -> anyhow::Result<Result<Nginx, String>> {
        let dir = tempfile::Builder::new()
            .prefix("peer-bench-nginx-")
            .tempdir()
            .context("cannot create a temp dir for nginx")?;
        let d = dir.path().display().to_string();
        let conf = format!(
            "# written by peer-bench for one run\n\
             daemon off;\n\
             master_process on;\n\
             worker_processes auto;\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n\
             \x20   access_log off;\n\
             \x20   client_body_temp_path {d}/client_body;\n\
             \x20   proxy_temp_path {d}/proxy;\n\
             \x20   fastcgi_temp_path {d}/fastcgi;\n\
             \x20   uwsgi_temp_path {d}/uwsgi;\n\
             \x20   scgi_temp_path {d}/scgi;\n\
             \x20   keepalive_requests 10000000;\n\
             \x20   keepalive_timeout 60s;\n\
             \x20   server {{\n\
             \x20       listen 127.0.0.1:{port};\n\
             \x20       listen 127.0.0.1:{h2_port} http2;\n\
             \x20       location / {{ default_type text/plain; return 200 \"{BODY}\"; }}\n\
             \x20   }}\n\
             }}\n"
        );
        std::fs::write(dir.path().join("nginx.conf"), conf).context("write nginx.conf")?;
        let args = nginx_args(dir.path());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let cmd = match mode {
            NginxMode::Foreground => command(exe, &args),
            NginxMode::Upgradable => {
                // The shell starts nginx in the background and waits until its stdin
                // closes: nginx records the shell as its parent, which must be alive
                // until then and gone before the first USR2.
                let mut c = super::child::server_command(Path::new("/bin/sh"));
                c.arg("-c")
                    .arg(r#""$0" "$@" </dev/null & read _"#)
                    .arg(exe)
                    .args(&args)
                    .stdin(Stdio::piped());
                c
            }
        };
        let spawned = Instant::now();
        let (mut proc, pipes) = spawn("nginx", cmd)?;
        for pipe in [
            pipes
                .stdout
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            pipes
                .stderr
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            drain_lines(pipe, proc.stderr_tail.clone(), |_| {});
        }
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let error_log = dir.path().join("error.log");
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let log = std::fs::read_to_string(&error_log).unwrap_or_default();
            if log.contains("Address already in use") {
                return Ok(Err(format!("127.0.0.1:{port} or :{h2_port} was taken")));
            }
            if mode == NginxMode::Foreground
                && let Some(status) = proc.exited()
            {
                bail!(
                    "nginx exited at start ({status}); error log:\n  {}\n  output:\n  {}",
                    log.trim_end().replace('\n', "\n  "),
                    proc.tail(10).join("\n  ")
                );
            }
            if answers(addr).await {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "nginx did not answer on {addr} within {START_TIMEOUT:?}; error log:\n  {}",
                    log.trim_end().replace('\n', "\n  ")
                );
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let startup = spawned.elapsed();
        let mut nginx = Nginx {
            exe: exe.to_path_buf(),
            dir,
            addr,
            h2_addr: SocketAddr::from(([127, 0, 0, 1], h2_port)),
            startup,
            proc,
            masters: Vec::new(),
        };
        let master = nginx
            .master()
            .ok_or_else(|| anyhow!("nginx answers but wrote no pid file"))?;
        nginx.masters.push(master);
        if mode == NginxMode::Upgradable {
            drop(nginx.proc.take_stdin());
            if nginx.proc.wait_exit(Duration::from_secs(5)).await.is_none() {
                bail!("the shell that started nginx did not exit after its stdin closed");
            }
        }
        Ok(Ok(nginx))
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.path().join("nginx.pid")
    }

    /// The current master, from the pid file.
    pub fn master(&self) -> Option<u32> {
        read_pid(&self.pid_file())
    }

    /// The current master and its workers.
    pub fn processes(&self) -> Vec<u32> {
        self.master()
            .map(|m| std::iter::once(m).chain(children(m)).collect())
            .unwrap_or_default()
    }

    /// The last lines of the error log.
    pub fn error_log_tail(&self, n: usize) -> Vec<String> {
        tail_of(&self.dir.path().join("error.log"), n)
    }

    /// `nginx -s reload` (with this run's prefix and configuration); returns when the
    /// command has sent the signal.
    pub async fn reload(&self) -> anyhow::Result<()> {
        let mut args = nginx_args(self.dir.path());
        args.extend(["-s".into(), "reload".into()]);
        let out = tokio::process::Command::new(&self.exe)
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .await
            .context("cannot run nginx -s reload")?;
        if !out.status.success() {
            bail!(
                "nginx -s reload: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// One binary upgrade: `USR2` to the master, wait for the new master (pid file
    /// moved to `.oldbin`) and its workers, `QUIT` to the old master, wait until the
    /// old master and its workers are gone. Bounded by `timeout` per step.
    pub async fn upgrade(&mut self, timeout: Duration) -> Reload {
        let trigger = Instant::now();
        let mut reload = Reload {
            trigger,
            ready: None,
            done: None,
            error: None,
        };
        let Some(old) = self.master() else {
            reload.error = Some("no pid file".into());
            return reload;
        };
        let old_workers = children(old);
        if let Err(e) = kill(pid_of(old), Signal::SIGUSR2) {
            reload.error = Some(format!("kill -USR2 {old}: {e}"));
            return reload;
        }
        let oldbin = self.dir.path().join("nginx.pid.oldbin");
        let mut new = None;
        let moved = poll_until(timeout, || {
            new = self.master().filter(|m| *m != old && oldbin.exists());
            new.is_some()
        })
        .await;
        let Some(new) = new.filter(|_| moved) else {
            reload.error = Some(format!(
                "no new master within {timeout:?} after USR2 to {old}; error log: {}",
                self.error_log_tail(3).join(" | ")
            ));
            return reload;
        };
        self.masters.push(new);
        if poll_until(timeout, || !children(new).is_empty()).await {
            reload.ready = Some(Instant::now());
        }
        if let Err(e) = kill(pid_of(old), Signal::SIGQUIT) {
            reload.error = Some(format!("kill -QUIT {old}: {e}"));
            return reload;
        }
        let gone = poll_until(timeout, || {
            !is_running(old) && old_workers.iter().all(|w| !is_running(*w))
        })
        .await;
        if gone {
            reload.done = Some(Instant::now());
        } else {
            reload.error = Some(format!(
                "the old master {old} was still running {timeout:?} after QUIT"
            ));
        }
        reap(old);
        reload
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let mut all: Vec<u32> = self.masters.clone();
        for m in self.masters.clone().into_iter().chain(self.master()) {
            all.push(m);
            all.extend(children(m));
        }
        for pid in &all {
            let _ = kill(pid_of(*pid), Signal::SIGKILL);
        }
        let _ = killpg(pid_of(self.proc.pid()), Signal::SIGKILL);
        // Masters orphaned by an upgrade are ours to reap (we are their subreaper).
        let deadline = Instant::now() + Duration::from_secs(1);
        for pid in all {
            while matches!(
                waitpid(pid_of(pid), Some(WaitPidFlag::WNOHANG)),
                Ok(nix::sys::wait::WaitStatus::StillAlive)
            ) && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

fn nginx_args(dir: &Path) -> Vec<String> {
    let d = dir.display();
    vec![
        "-p".into(),
        format!("{d}/"),
        "-c".into(),
        format!("{d}/nginx.conf"),
        "-e".into(),
        format!("{d}/error.log"),
    ]
}

// ---------------------------------------------------------------------------
// HAProxy

/// A running HAProxy in master-worker mode; the master is our child.
#[derive(Debug)]
pub struct Haproxy {
    dir: TempDir,
    pub addr: SocketAddr,
    /// The same frontend over HTTP/2 (cleartext, prior knowledge: `bind … proto h2`).
    pub h2_addr: SocketAddr,
    /// From spawning it until it first answered `GET /` with a 2xx.
    pub startup: Duration,
    proc: Proc,
}

impl Haproxy {
    /// Starts `haproxy -W` on a free port (retrying when the port was taken meanwhile).
    pub async fn start(exe: &Path) -> anyhow::Result<Haproxy> {
        let mut last = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let (port, h2_port) = free_ports()?;
            match Self::start_on(exe, port, h2_port).await? {
                Ok(h) => return Ok(h),
                Err(collision) => last = collision,
            }
        }
        bail!("haproxy could not bind a free port in {PORT_ATTEMPTS} attempts: {last}")
    }

    async fn start_on(
        exe: &Path,
        port: u16,
        h2_port: u16,
    ) -> anyhow::Result<Result<Haproxy, String>> {
        let dir = tempfile::Builder::new()
            .prefix("peer-bench-haproxy-")
            .tempdir()
            .context("cannot create a temp dir for haproxy")?;
        let cfg = dir.path().join("haproxy.cfg");
        std::fs::write(
            &cfg,
            format!(
                "# written by peer-bench for one run\n\
                 global\n\
                 \x20   maxconn 4096\n\
                 defaults\n\
                 \x20   mode http\n\
                 \x20   timeout connect 5s\n\
                 \x20   timeout client 60s\n\
                 \x20   timeout server 60s\n\
                 \x20   timeout http-keep-alive 60s\n\
                 frontend hello\n\
                 \x20   bind 127.0.0.1:{port}\n\
                 \x20   bind 127.0.0.1:{h2_port} proto h2\n\
                 \x20   http-request return status 200 content-type text/plain string {BODY}\n"
            ),
        )
        .context("write haproxy.cfg")?;
        let pid_file = dir.path().join("haproxy.pid");
        let mut cmd = command(exe, &["-W", "-f"]);
        cmd.arg(&cfg)
            .arg("-p")
            .arg(&pid_file)
            .current_dir(dir.path());
        let spawned = Instant::now();
        let (mut proc, pipes) = spawn("haproxy", cmd)?;
        let tail = proc.stderr_tail.clone();
        if let Some(stdout) = pipes.stdout {
            drain_lines(stdout, tail.clone(), |_| {});
        }
        if let Some(stderr) = pipes.stderr {
            drain_lines(stderr, tail, |_| {});
        }
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = proc.exited() {
                tokio::time::sleep(Duration::from_millis(50)).await; // let the tail fill
                let out = proc.tail(10).join("\n  ");
                if out.contains("Address already in use") {
                    return Ok(Err(format!("127.0.0.1:{port} or :{h2_port} was taken")));
                }
                bail!("haproxy exited at start ({status}):\n  {out}");
            }
            if answers(addr).await {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "haproxy did not answer on {addr} within {START_TIMEOUT:?}:\n  {}",
                    proc.tail(10).join("\n  ")
                );
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(Ok(Haproxy {
            dir,
            addr,
            h2_addr: SocketAddr::from(([127, 0, 0, 1], h2_port)),
            startup: spawned.elapsed(),
            proc,
        }))
    }

    pub fn master(&self) -> u32 {
        self.proc.pid()
    }

    /// The master and its workers.
    pub fn processes(&self) -> Vec<u32> {
        std::iter::once(self.master())
            .chain(children(self.master()))
            .collect()
    }

    /// The last lines of its output.
    pub fn tail(&self, n: usize) -> Vec<String> {
        self.proc.tail(n)
    }

    /// The run's temp dir (configuration and pid file).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `SIGUSR2` to the master: reload.
    pub fn reload(&self) -> anyhow::Result<()> {
        kill(pid_of(self.master()), Signal::SIGUSR2)
            .with_context(|| format!("kill -USR2 {}", self.master()))
    }

    /// Whether the master would act on a `SIGUSR2` now. A reload re-executes the
    /// master, which blocks the signal and then installs its handlers again: a
    /// `SIGUSR2` sent in between is dropped (seen here at one reload every 100 ms:
    /// most reloads never happened). Read from /proc: caught and not blocked.
    pub fn accepts_reload(&self) -> bool {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{}/status", self.master())) else {
            return false;
        };
        let mask = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
                .unwrap_or(0)
        };
        let usr2 = 1u64 << (Signal::SIGUSR2 as u32 - 1);
        mask("SigCgt:") & usr2 != 0 && mask("SigBlk:") & usr2 == 0
    }

    /// Waits (bounded) until [`Haproxy::accepts_reload`].
    pub async fn wait_accepts_reload(&self, timeout: Duration) -> bool {
        poll_until(timeout, || self.accepts_reload()).await
    }
}

// ---------------------------------------------------------------------------
// Following reloads that may overlap

/// Follows the reloads of a master whose workers are its children (nginx `-s
/// reload`, HAProxy): a task looks at the master's children every [`POLL`].
#[derive(Debug)]
pub struct ReloadTracker {
    master: u32,
    state: Arc<Mutex<TrackerState>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug, Default)]
struct TrackerState {
    reloads: Vec<Tracked>,
    /// Workers an earlier reload already retires.
    retiring: HashSet<u32>,
}

#[derive(Debug)]
struct Tracked {
    reload: Reload,
    /// The master's children when it was triggered.
    known: Vec<u32>,
    /// Of those, the workers this reload replaces.
    old: Vec<u32>,
}

impl ReloadTracker {
    pub fn start(master: u32) -> ReloadTracker {
        let state = Arc::new(Mutex::new(TrackerState::default()));
        let task = tokio::spawn({
            let state = state.clone();
            async move {
                loop {
                    tokio::time::sleep(POLL).await;
                    let now = Instant::now();
                    let current = children(master);
                    let mut st = lock(&state);
                    for t in st.reloads.iter_mut().filter(|t| t.reload.done.is_none()) {
                        if t.reload.ready.is_none() && current.iter().any(|c| !t.known.contains(c))
                        {
                            t.reload.ready = Some(now);
                        }
                        if t.reload.ready.is_some() && t.old.iter().all(|p| !is_running(*p)) {
                            t.reload.done = Some(now);
                        }
                    }
                }
            }
        });
        ReloadTracker {
            master,
            state,
            task,
        }
    }

    /// Records a reload triggered at `trigger` (call just before triggering it).
    pub fn begin(&self, trigger: Instant) -> usize {
        let known = children(self.master);
        let mut st = lock(&self.state);
        let mut old: Vec<u32> = known
            .iter()
            .copied()
            .filter(|p| !st.retiring.contains(p))
            .collect();
        if old.is_empty() {
            old.clone_from(&known);
        }
        st.retiring.extend(old.iter().copied());
        st.reloads.push(Tracked {
            reload: Reload {
                trigger,
                ready: None,
                done: None,
                error: None,
            },
            known,
            old,
        });
        st.reloads.len() - 1
    }

    /// Marks reload `i` as failed to trigger.
    pub fn failed(&self, i: usize, error: String) {
        if let Some(t) = lock(&self.state).reloads.get_mut(i) {
            t.reload.error = Some(error);
            t.reload.done = Some(t.reload.trigger);
        }
    }

    /// Whether reload `i` has started its new workers.
    pub fn ready(&self, i: usize) -> bool {
        lock(&self.state)
            .reloads
            .get(i)
            .is_some_and(|t| t.reload.ready.is_some())
    }

    /// Waits up to `wait` for every reload to complete, then stops following.
    pub async fn finish(self, wait: Duration) -> Vec<Reload> {
        poll_until(wait, || {
            lock(&self.state)
                .reloads
                .iter()
                .all(|t| t.reload.done.is_some())
        })
        .await;
        self.task.abort();
        let st = lock(&self.state);
        st.reloads.iter().map(|t| t.reload.clone()).collect()
    }
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn tail_of(path: &Path, n: usize) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| l.to_string())
        .collect()
}
