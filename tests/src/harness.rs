//! Run the real `fleet-agent` binary the way an operator would.
//!
//! [`Agent::start`] spawns it on free loopback ports (`127.0.0.1:0`) in a per-test
//! temp dir, echoes its log to the test's stderr, and returns once the control
//! endpoint and every server reported the address they bound. Tests then drive
//! the node through signals, HTTP and gRPC, and wait on log lines, readiness
//! probes or `/proc` — never on a bare sleep. Dropping the [`Agent`] kills the
//! supervisor and everything below it.

mod back_to_back;
mod events;
mod files;
mod http;
mod opt_out;
mod parse;
mod procs;

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ::http::Method;
use fleet_proto::v1::agent_service_client::AgentServiceClient;
use fleet_proto::v1::{Phase, WatchRequest};
use tempfile::TempDir;
use tonic::transport::Channel;

use crate::output::ProcessLog;

pub use back_to_back::BackToBack;
pub use events::Events;
pub use files::{
    TlsFiles, agent_binary, binary, chmod, copy_agent_binary, fixture_path, install_fixture,
    sha256_hex,
};
pub use http::{
    Finished, HttpResponse, InFlight, http_get, http_open, http_request, http_send, https_h2_get,
};
pub use opt_out::{SKIP_H2LOAD, SKIP_PIDNS, SKIP_PODMAN, SKIP_ROOT, cannot_run};
pub use parse::{metric, parse_control, parse_pid, parse_server, percent_encode, restart_path};
pub use procs::{
    children_of, eventually, exe_of, is_running, is_zombie, kill_tree, parent_of, proc_state,
    running_children_of, send_signal, wait_gone, wait_not_running,
};

/// How long [`Agent::start`] waits for the control endpoint and every server.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// How long, after a process exited, its output streams may take to end (longer
/// only when a process it left behind holds them).
pub const STREAMS_CLOSE: Duration = Duration::from_secs(2);

/// How to run the agent. `..Default::default()` gives one server on a free port and
/// a control endpoint on a free port.
#[derive(Debug, Clone)]
pub struct AgentOpts {
    /// `--listen` addresses of the default server (none when a config file names servers).
    pub listen: Vec<String>,
    /// `--control` address; `None` leaves it to the config file.
    pub control: Option<String>,
    /// A TOML config, written to `<tempdir>/agent.toml` and passed as `--config`.
    /// `{dir}` in it is replaced by the temp dir's path.
    pub config: Option<String>,
    /// A token, written to `<tempdir>/token` and passed as `--token-file`; the
    /// helpers below then send it with every control request.
    pub token: Option<String>,
    /// More arguments, after the ones above.
    pub args: Vec<OsString>,
    /// Extra environment variables.
    pub env: Vec<(OsString, OsString)>,
    /// How many `... server 'NAME' started listening on [...]` lines `start` waits for.
    pub servers: usize,
    /// Run the agent under this command (e.g. `unshare --pid --fork`).
    pub wrapper: Vec<OsString>,
    /// The agent binary to run (default: [`agent_binary`]).
    pub program: Option<PathBuf>,
}

impl Default for AgentOpts {
    fn default() -> Self {
        AgentOpts {
            listen: vec!["127.0.0.1:0".into()],
            control: Some("127.0.0.1:0".into()),
            config: None,
            token: None,
            args: Vec::new(),
            env: Vec::new(),
            servers: 1,
            wrapper: Vec::new(),
            program: None,
        }
    }
}

impl AgentOpts {
    /// Add arguments (builder style): `AgentOpts::default().arg("--drain-timeout").arg("2s")`.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }
}

/// A server as the agent reported it: `http server 'web' started listening on [A, B]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub name: String,
    pub tls: bool,
    pub addrs: Vec<SocketAddr>,
}

/// A running `fleet-agent` (or its wrapper), killed with everything below it on drop.
#[derive(Debug)]
pub struct Agent {
    child: Mutex<Child>,
    pid: u32,
    exit: Mutex<Option<ExitStatus>>,
    dir: TempDir,
    log: Arc<ProcessLog>,
    control: Option<SocketAddr>,
    servers: Vec<Server>,
    token: Option<String>,
}

impl Agent {
    /// An agent whose one server ("secure", one free port) speaks HTTPS with `tls`'s
    /// certificate (HTTP/2 and HTTP/1.1 by ALPN).
    pub async fn start_https(tls: &TlsFiles) -> Agent {
        let config = format!(
            r#"
[control]
listen = "127.0.0.1:0"

[[servers]]
name = "secure"
listen = ["127.0.0.1:0"]
tls = {{ cert = "{}", key = "{}" }}
"#,
            tls.cert_pem.display(),
            tls.key_pem.display()
        );
        Agent::start(AgentOpts {
            listen: Vec::new(),
            control: None,
            config: Some(config),
            ..Default::default()
        })
        .await
    }

    /// Spawn the agent and return at once (for agents that are expected to exit).
    pub fn spawn(opts: AgentOpts) -> Agent {
        let dir = tempfile::Builder::new()
            .prefix("fleet-agent-test")
            .tempdir()
            .expect("create a temp dir");
        let program = opts.program.clone().unwrap_or_else(agent_binary);
        let mut command = match opts.wrapper.split_first() {
            Some((wrapper, wrapper_args)) => {
                let mut c = Command::new(wrapper);
                c.args(wrapper_args).arg(&program);
                c
            }
            None => Command::new(&program),
        };
        if let Some(control) = &opts.control {
            command.arg("--control").arg(control);
        }
        for listen in &opts.listen {
            command.arg("--listen").arg(listen);
        }
        if let Some(config) = &opts.config {
            let path = dir.path().join("agent.toml");
            let text = config.replace("{dir}", &dir.path().display().to_string());
            std::fs::write(&path, text).expect("write agent.toml");
            command.arg("--config").arg(path);
        }
        if let Some(token) = &opts.token {
            let path = dir.path().join("token");
            std::fs::write(&path, format!("{token}\n")).expect("write the token file");
            chmod(&path, 0o600);
            command.arg("--token-file").arg(path);
        }
        command
            .args(&opts.args)
            .envs(opts.env.iter().map(|(k, v)| (k, v)))
            .env("NO_COLOR", "1")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        eprintln!("[harness] running {command:?}");
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()));
        let pid = child.id();
        let log = ProcessLog::new();
        log.capture(&mut child, "agent");
        Agent {
            child: Mutex::new(child),
            pid,
            exit: Mutex::new(None),
            dir,
            log,
            control: None,
            servers: Vec::new(),
            token: opts.token,
        }
    }

    /// Spawn the agent and wait until its control endpoint and `opts.servers`
    /// servers are listening; panics with the log if it exits or takes over 20 s.
    pub async fn start(opts: AgentOpts) -> Agent {
        let servers = opts.servers;
        let wait_control = opts.control.is_some() || opts.config.is_some();
        let mut agent = Agent::spawn(opts);
        if wait_control {
            let line = agent
                .wait_for_log("control endpoint listening on ", START_TIMEOUT)
                .await;
            agent.control = Some(parse_control(&line).unwrap_or_else(|| {
                agent.fail(&format!("cannot parse the control address in {line:?}"))
            }));
        }
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            // Take the mark first: a line that lands while we parse is then seen
            // by the wait below.
            let mark = agent.log_len();
            agent.servers = agent
                .log_lines()
                .iter()
                .filter_map(|l| parse_server(l))
                .fold(Vec::new(), |mut acc: Vec<Server>, s| {
                    if !acc.iter().any(|a| a.name == s.name) {
                        acc.push(s);
                    }
                    acc
                });
            if agent.servers.len() >= servers {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            agent
                .wait_for_log_from(mark, "started listening on", left)
                .await;
        }
        agent
    }

    /// The pid of the process we spawned (the supervisor, or the wrapper).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The per-test temp dir the agent runs in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The control endpoint's address.
    pub fn control(&self) -> SocketAddr {
        self.control
            .unwrap_or_else(|| self.fail("the agent reported no control endpoint"))
    }

    /// The servers, in the order their lines appeared.
    pub fn servers(&self) -> &[Server] {
        &self.servers
    }

    /// The first address of the first server (the app port).
    pub fn app(&self) -> SocketAddr {
        self.servers
            .first()
            .and_then(|s| s.addrs.first().copied())
            .unwrap_or_else(|| self.fail("the agent reported no server"))
    }

    /// The token the agent was started with.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    // ----- log -----

    /// Every line logged so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.all()
    }

    /// How many lines were logged so far: a mark for [`Agent::wait_for_log_from`].
    pub fn log_len(&self) -> usize {
        self.log.len()
    }

    /// Wait for a line containing `needle`, anywhere in the log.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        self.wait_for_log_from(0, needle, timeout).await
    }

    /// Wait for a line containing `needle` among the lines from index `mark` on.
    /// Panics with the log after `timeout`, or as soon as the agent exited without it.
    pub async fn wait_for_log_from(&self, mark: usize, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut changed = self.log.subscribe();
        loop {
            if let Some(line) = self.log.find_from(mark, needle) {
                return line;
            }
            let now = Instant::now();
            if now >= deadline {
                self.fail(&format!(
                    "no log line containing {needle:?} within {timeout:?}"
                ));
            }
            if let Some(status) = self.try_exit() {
                self.log.wait_closed(STREAMS_CLOSE).await;
                if let Some(line) = self.log.find_from(mark, needle) {
                    return line;
                }
                self.fail(&format!(
                    "the agent exited ({status}) without logging {needle:?}"
                ));
            }
            let _ = tokio::time::timeout(
                (deadline - now).min(Duration::from_millis(100)),
                changed.changed(),
            )
            .await;
        }
    }

    /// Count the lines containing `needle`.
    pub fn count_log(&self, needle: &str) -> usize {
        self.log.count(needle)
    }

    /// Panic with `message` and the whole log.
    pub fn fail(&self, message: &str) -> ! {
        let log = self.log_lines().join("\n    ");
        panic!("{message}\n  agent log:\n    {log}");
    }

    // ----- process -----

    /// The exit status, if the spawned process exited (reaps it).
    pub fn try_exit(&self) -> Option<ExitStatus> {
        let mut exit = self.exit.lock().unwrap();
        if exit.is_none() {
            *exit = self.child.lock().unwrap().try_wait().ok().flatten();
        }
        *exit
    }

    /// Wait for the spawned process to exit; panics with the log after `timeout`.
    pub async fn wait_exit(&self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit() {
                self.log.wait_closed(STREAMS_CLOSE).await;
                return status;
            }
            if Instant::now() >= deadline {
                self.fail(&format!("the agent did not exit within {timeout:?}"));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The supervisor's child processes that are running (not zombies).
    pub fn running_children(&self) -> Vec<u32> {
        running_children_of(self.pid)
    }

    // ----- HTTP -----

    /// `GET path` on the app port (fresh connection).
    pub async fn get(&self, path: &str) -> HttpResponse {
        http_get(self.app(), path)
            .await
            .unwrap_or_else(|e| self.fail(&e))
    }

    /// `GET path` on the control endpoint with the token, if any.
    pub async fn admin(&self, path: &str) -> HttpResponse {
        self.admin_on(self.control(), path).await
    }

    /// `GET path` on `addr` with the token, if any.
    pub async fn admin_on(&self, addr: SocketAddr, path: &str) -> HttpResponse {
        http_request(addr, Method::GET, path, self.token())
            .await
            .unwrap_or_else(|e| self.fail(&e))
    }

    /// `POST path` (an action: restart, reload, shutdown) on the control endpoint with
    /// the token, if any, the way `curl -X POST` sends it.
    pub async fn action(&self, path: &str) -> HttpResponse {
        self.action_on(self.control(), path).await
    }

    /// `POST path` on `addr` with the token, if any.
    pub async fn action_on(&self, addr: SocketAddr, path: &str) -> HttpResponse {
        http_request(addr, Method::POST, path, self.token())
            .await
            .unwrap_or_else(|e| self.fail(&e))
    }

    /// The worker that answers `GET /pid` on the app port now.
    pub async fn worker_pid(&self) -> u32 {
        let response = self.get("/pid").await;
        parse_pid(&response).unwrap_or_else(|e| self.fail(&e))
    }

    /// Wait until `GET /pid` on `addr` is answered by a worker other than `old`
    /// (fresh connections, every 20 ms); returns the new pid.
    pub async fn wait_worker_change_on(
        &self,
        addr: SocketAddr,
        old: u32,
        timeout: Duration,
    ) -> u32 {
        eventually(
            timeout,
            &format!("a worker other than {old} on {addr}"),
            async || {
                let response = http_get(addr, "/pid").await?;
                match parse_pid(&response)? {
                    pid if pid != old => Ok(pid),
                    pid => Err(format!("still served by {pid}")),
                }
            },
        )
        .await
    }

    /// [`Agent::wait_worker_change_on`] on the app port.
    pub async fn wait_worker_change(&self, old: u32, timeout: Duration) -> u32 {
        self.wait_worker_change_on(self.app(), old, timeout).await
    }

    /// The worker of the serving generation, as the supervisor's status says. Right
    /// after a restart returns, `GET /pid` ([`Agent::worker_pid`]) may still be
    /// answered by the old worker while it takes its SIGTERM; this may not.
    pub async fn serving_worker(&self) -> u32 {
        let status = self.status().await;
        let generation = &status["generation"];
        status["workers"]
            .as_array()
            .and_then(|ws| ws.iter().find(|w| &w["generation"] == generation))
            .and_then(|w| w["pid"].as_u64())
            .map(|pid| pid as u32)
            .unwrap_or_else(|| self.fail(&format!("no worker of the serving generation: {status}")))
    }

    /// `GET /debug/admin/status` on the control endpoint, as JSON.
    pub async fn status(&self) -> serde_json::Value {
        let response = self.admin("/debug/admin/status").await;
        if !response.status.is_success() {
            self.fail(&format!(
                "GET /debug/admin/status: {} {}",
                response.status,
                response.text()
            ));
        }
        response.json()
    }

    /// The serving generation, from the status.
    pub async fn generation(&self) -> u64 {
        let status = self.status().await;
        status["generation"]
            .as_u64()
            .unwrap_or_else(|| self.fail(&format!("status has no generation: {status}")))
    }

    /// Start `GET /sleep?secs=N` on the app port and return once the worker has
    /// sent the first line (its pid), so the request is known to be in flight.
    pub async fn start_sleep(&self, secs: u64) -> InFlight {
        InFlight::start(self.app(), &format!("/sleep?secs={secs}"))
            .await
            .unwrap_or_else(|e| self.fail(&e))
    }

    // ----- gRPC -----

    /// A gRPC client for the control endpoint.
    pub async fn grpc(&self) -> AgentServiceClient<Channel> {
        AgentServiceClient::connect(format!("http://{}", self.control()))
            .await
            .unwrap_or_else(|e| self.fail(&format!("gRPC connect to {}: {e}", self.control())))
    }

    /// Follow the node's restart events (gRPC `Watch`); the SNAPSHOT that opens the
    /// stream has been read already.
    pub async fn watch(&self) -> Events {
        let stream = self
            .grpc()
            .await
            .watch(self.request(WatchRequest {}))
            .await
            .unwrap_or_else(|status| self.fail(&format!("gRPC Watch: {status}")))
            .into_inner();
        let mut events = Events {
            stream,
            seen: Vec::new(),
        };
        let first = events.next(Duration::from_secs(10)).await;
        assert_eq!(
            first.phase(),
            Phase::Snapshot,
            "Watch starts with a SNAPSHOT: {first:?}"
        );
        events
    }

    /// A gRPC request carrying `authorization: Bearer TOKEN` when the agent has a token.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(token) = &self.token {
            request.metadata_mut().insert(
                "authorization",
                format!("Bearer {token}").parse().expect("ascii token"),
            );
        }
        request
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // Once the supervisor has exited, whatever it left behind was reparented and
        // can no longer be found by parent pid; tests assert that nothing was left.
        if self.try_exit().is_none() {
            kill_tree(self.pid);
        }
        if let Ok(mut child) = self.child.lock() {
            let _ = child.wait();
        }
    }
}
