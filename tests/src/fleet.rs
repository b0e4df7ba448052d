//! Run the real `fleet-controller` with real agents, and drive it with `fleetctl`
//! the way an operator would.
//!
//! [`Controller::start`] spawns the controller on a loopback port with a per-test
//! SQLite file in a temp dir (with `FLEET_TEST_STORE=etcd`, a one-member etcd of its
//! own: [`TestStore`]), echoes its log to the test's stderr, and returns once it
//! logged the address it listens on. [`Controller::start_nodes`] starts agents that
//! heartbeat to it and returns once `ListNodes` shows every one of them serving;
//! [`Controller::fleetctl`] runs the CLI with `FLEET_CONTROLLER` (and `FLEET_TOKEN`)
//! set. Waits poll the controller with a deadline, never a bare sleep. Dropping the
//! [`Controller`] kills it with SIGKILL; agents are killed by their own drop.

use std::ffi::{OsStr, OsString};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleet_proto::v1 as pb;
use fleet_proto::v1::controller_service_client::ControllerServiceClient;
use tempfile::TempDir;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::etcd::EtcdCluster;
use crate::harness::{STREAMS_CLOSE, copy_agent_binary, eventually};
use crate::output::ProcessLog;
use crate::{Agent, AgentOpts};

/// How long [`Controller::start`] waits for `controller listening on ADDR`, and
/// [`Controller::start_nodes`] for every node to be serving.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one `fleetctl` run may take (a watched rollout included).
pub const FLEETCTL_TIMEOUT: Duration = Duration::from_secs(120);
/// The states a rollout ends in.
pub const FINISHED: [&str; 4] = ["succeeded", "failed", "rolled-back", "aborted"];
/// What the controller logs, followed by its address, once it listens.
const LISTENING: &str = "controller listening on ";
/// What a controller on etcd logs once it leads.
pub const ELECTED: &str = "elected leader";

pub use crate::harness::binary;

/// How long [`Controller::restart`] keeps trying to listen on its old address again
/// while something else holds it.
pub const REBIND_WINDOW: Duration = Duration::from_secs(15);
/// How many times at most [`Controller::restart`] starts the controller on its old
/// address within [`REBIND_WINDOW`].
pub const REBIND_ATTEMPTS: u32 = 20;

/// A status as an agent reports it, every field valid, for heartbeats sent straight to
/// a controller by a test: zone `a`, serving at generation 1 of `/opt/app-v1`; its PIDs
/// are above the largest Linux hands out, so they name no process.
pub fn reported_status(node_id: &str) -> pb::StatusResponse {
    pb::StatusResponse {
        node_id: node_id.into(),
        labels: [("zone".to_string(), "a".to_string())].into(),
        supervisor_pid: 1 << 23,
        state: "serving".into(),
        generation: 1,
        exe: Some(pb::ExeInfo {
            path: "/opt/app-v1".into(),
            sha256: "ab".repeat(32),
            size: 1,
        }),
        workers: vec![pb::Worker {
            generation: 1,
            pid: (1 << 23) + 1,
            state: "serving".into(),
            ..Default::default()
        }],
        control_addr: "127.0.0.1:9".into(),
        admin_url: "http://127.0.0.1:9/debug/admin".into(),
        version: "test".into(),
        ..Default::default()
    }
}

/// The id [`Controller::start_nodes`] gives node `i` (0-based): `node-1`, `node-2`, ...
pub fn node_id(i: usize) -> String {
    format!("node-{}", i + 1)
}

/// Where a test's controller keeps its state.
#[derive(Debug, Clone, Default)]
pub enum TestStore {
    /// SQLite in the controller's temp dir; with `FLEET_TEST_STORE=etcd`, a one-member
    /// etcd started for this controller instead (unless it runs under a `wrapper`, in
    /// another network namespace), so that the controller suite runs on either store.
    #[default]
    Default,
    /// SQLite, whatever `FLEET_TEST_STORE` says.
    Sqlite,
    /// This cluster, under an `--etcd-prefix` no other controller uses.
    Etcd(Arc<EtcdCluster>),
    /// This cluster under this prefix: the controllers of one group (high
    /// availability) share it.
    Shared(Arc<EtcdCluster>, String),
}

/// How to run the controller. `..Default::default()` gives a free port and a 2 s
/// heartbeat TTL (agents heartbeat every ttl/3).
#[derive(Debug, Clone)]
pub struct ControllerOpts {
    /// `--listen`; `127.0.0.1:0` picks a free port.
    pub listen: String,
    /// `--heartbeat-ttl`.
    pub heartbeat_ttl: String,
    /// A token, written to `<tempdir>/token` and passed as `--token-file`; agents from
    /// [`Controller::agent_opts`], [`Controller::grpc`] and [`Controller::fleetctl`]
    /// then carry it.
    pub token: Option<String>,
    /// `--default-min-healthy`: `Some("0s")` by default, so that tests not about the
    /// soak are not slowed by the controller's 10 s; `None` runs with its own default.
    pub default_min_healthy: Option<String>,
    /// More arguments.
    pub args: Vec<OsString>,
    /// `--tls`: mutual TLS with the fleet CA created in `<tempdir>/fleet-tls`; the
    /// URL is `https://`, and [`Controller::grpc`] and [`Controller::fleetctl`] trust
    /// that CA.
    pub tls: bool,
    /// Run the controller (and `fleetctl`) under this command, e.g.
    /// `ip netns exec NS` ([`crate::netns`]).
    pub wrapper: Vec<OsString>,
    /// SQLite or etcd.
    pub store: TestStore,
}

impl Default for ControllerOpts {
    fn default() -> Self {
        ControllerOpts {
            listen: "127.0.0.1:0".into(),
            heartbeat_ttl: "2s".into(),
            token: None,
            default_min_healthy: Some("0s".into()),
            args: Vec::new(),
            tls: false,
            wrapper: Vec::new(),
            store: TestStore::Default,
        }
    }
}

/// The etcd a controller keeps its state in, and its keys' prefix there.
#[derive(Debug, Clone)]
pub struct EtcdStore {
    pub cluster: Arc<EtcdCluster>,
    pub prefix: String,
}

impl EtcdStore {
    /// For `store`, or `None` for SQLite; starts a one-member etcd for
    /// [`TestStore::Default`] under `FLEET_TEST_STORE=etcd`.
    async fn for_test(opts: &ControllerOpts) -> Option<EtcdStore> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let cluster = match &opts.store {
            TestStore::Sqlite => return None,
            TestStore::Default if !crate::etcd::test_store_is_etcd() => return None,
            // A controller in another network namespace cannot reach an etcd on this
            // one's loopback.
            TestStore::Default if !opts.wrapper.is_empty() => return None,
            TestStore::Default => Arc::new(EtcdCluster::start(1).await),
            TestStore::Etcd(cluster) => cluster.clone(),
            TestStore::Shared(cluster, prefix) => {
                return Some(EtcdStore {
                    cluster: cluster.clone(),
                    prefix: prefix.clone(),
                });
            }
        };
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Some(EtcdStore {
            cluster,
            prefix: format!("/fleet-test-{}-{n}/", std::process::id()),
        })
    }
}

/// Adds `authorization: Bearer TOKEN` to every call, when there is a token.
#[derive(Debug, Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A gRPC client of the controller, with or without the token.
pub type ControllerClient = ControllerServiceClient<InterceptedService<Channel, Bearer>>;

/// What one `fleetctl` run did.
#[derive(Debug, Clone)]
pub struct Ctl {
    /// The command line, for messages.
    pub args: String,
    /// The exit code (`None`: killed by a signal).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Ctl {
    /// Panic with the whole output unless fleetctl exited with `code`.
    pub fn expect_code(&self, code: i32) -> &Ctl {
        assert_eq!(
            self.code,
            Some(code),
            "fleetctl {} exited with {:?}, expected {code}\n--- stdout:\n{}--- stderr:\n{}",
            self.args,
            self.code,
            self.stdout,
            self.stderr
        );
        self
    }

    /// Stdout parsed as JSON; panics with the output if it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "fleetctl {}: stdout is not JSON ({e}):\n{}",
                self.args, self.stdout
            )
        })
    }

    /// Stdout and stderr, for `contains` checks that do not care which.
    pub fn output(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// A running `fleet-controller`, killed with SIGKILL on drop. Its database outlives
/// [`Controller::kill`], so [`Controller::restart`] comes back with the same state.
#[derive(Debug)]
pub struct Controller {
    child: Mutex<Child>,
    dir: TempDir,
    addr: SocketAddr,
    /// Every line the controller printed, over all its runs.
    log: Arc<ProcessLog>,
    opts: ControllerOpts,
    /// Where its state is, when not in SQLite; the same over restarts.
    etcd: Option<EtcdStore>,
}

impl Controller {
    /// Spawn the controller and wait until it listens; panics with its log if it
    /// exits or takes longer than [`START_TIMEOUT`].
    pub async fn start(opts: ControllerOpts) -> Controller {
        let dir = tempfile::Builder::new()
            .prefix("fleet-controller-test")
            .tempdir()
            .expect("create a temp dir");
        if let Some(token) = &opts.token {
            std::fs::write(dir.path().join("token"), format!("{token}\n"))
                .expect("write the token");
        }
        let log = ProcessLog::new();
        let etcd = EtcdStore::for_test(&opts).await;
        let child = spawn(dir.path(), &opts, &opts.listen, &log, etcd.as_ref());
        let mut controller = Controller {
            child: Mutex::new(child),
            dir,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log,
            opts,
            etcd,
        };
        let line = controller
            .wait_for_log_from(0, LISTENING, START_TIMEOUT)
            .await;
        controller.addr = controller.listening_addr(&line);
        controller.wait_elected(0).await;
        controller
    }

    /// A controller alone on its etcd prefix leads: wait for its election (from log
    /// line `mark` on), so that a test's first change is not sent to a follower. A
    /// controller of a group ([`TestStore::Shared`]) may follow: not waited for.
    async fn wait_elected(&self, mark: usize) {
        if self.etcd.is_some() && !matches!(self.opts.store, TestStore::Shared(..)) {
            self.wait_for_log_from(mark, ELECTED, START_TIMEOUT).await;
        }
    }

    /// The address in a `controller listening on ADDR` line.
    fn listening_addr(&self, line: &str) -> SocketAddr {
        let rest = &line[line.find(LISTENING).expect("found") + LISTENING.len()..];
        let token = rest.split_whitespace().next().unwrap_or_default();
        let token =
            token.trim_matches(|c: char| !(c.is_ascii_alphanumeric() || ".:[]".contains(c)));
        token
            .parse()
            .unwrap_or_else(|_| self.fail(&format!("cannot parse the address in {line:?}")))
    }

    /// The controller's process id (of the process running now, after a restart).
    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap().id()
    }

    /// Kill the controller with SIGKILL (no chance to write anything more) and reap it.
    pub fn kill(&self) {
        let mut child = self.child.lock().unwrap();
        eprintln!("[harness] SIGKILL fleet-controller {}", child.id());
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Start the controller again on the same address and database (after
    /// [`Controller::kill`]); returns once it listens.
    ///
    /// Agents and fleetctl know the controller by its address, so it must come back
    /// on the very port the kernel gave it at first. While it was down, that port was
    /// free for anyone (an outgoing connection's ephemeral port, say): when the
    /// controller says it is in use, wait until it is free and try again, at most
    /// [`REBIND_ATTEMPTS`] times over [`REBIND_WINDOW`], then fail saying so.
    pub async fn restart(&self) {
        self.kill();
        let addr = self.addr;
        let started = Instant::now();
        for attempt in 1..=REBIND_ATTEMPTS {
            let mark = self.log.len();
            let child = spawn(
                self.dir.path(),
                &self.opts,
                &addr.to_string(),
                &self.log,
                self.etcd.as_ref(),
            );
            *self.child.lock().unwrap() = child;
            let outcome = self
                .wait_for_log_or_exit(mark, LISTENING, START_TIMEOUT)
                .await;
            let line = match outcome {
                Ok(line) => line,
                Err(status) => {
                    let in_use = self
                        .log_lines()
                        .iter()
                        .skip(mark)
                        .any(|l| l.contains("Address already in use"));
                    if !in_use {
                        self.fail(&format!(
                            "the controller exited ({status}) without logging {LISTENING:?}"
                        ));
                    }
                    eprintln!(
                        "[harness] {addr} is in use (attempt {attempt}/{REBIND_ATTEMPTS}): \
                         waiting for it to be free"
                    );
                    self.wait_free(addr, started, attempt).await;
                    continue;
                }
            };
            let back_on = self.listening_addr(&line);
            assert_eq!(back_on, addr, "the controller came back on another address");
            self.wait_elected(mark).await;
            return;
        }
        self.fail(&format!(
            "the controller could not listen on its old address {addr} again: in use at \
             each of {REBIND_ATTEMPTS} attempts over {:?}; another process took the port \
             while the controller was down",
            started.elapsed()
        ));
    }

    /// Poll until `addr` can be bound (then release it for the controller); fails
    /// once [`REBIND_WINDOW`] since `started` is spent.
    async fn wait_free(&self, addr: SocketAddr, started: Instant, attempt: u32) {
        loop {
            match std::net::TcpListener::bind(addr) {
                Ok(probe) => return drop(probe),
                Err(e) if started.elapsed() >= REBIND_WINDOW => self.fail(&format!(
                    "the controller could not listen on its old address {addr} again: still \
                     in use ({e}) after {attempt} attempts over {REBIND_WINDOW:?}; another \
                     process took the port while the controller was down"
                )),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// The API address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR` (`https://` with TLS), what agents and fleetctl are given.
    pub fn url(&self) -> String {
        let scheme = if self.opts.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// The fleet CA's certificate (with [`ControllerOpts::tls`]).
    pub fn ca_cert(&self) -> PathBuf {
        let given = self
            .opts
            .args
            .iter()
            .position(|a| a == "--ca-cert")
            .and_then(|i| self.opts.args.get(i + 1));
        if let Some(path) = given {
            return PathBuf::from(path);
        }
        self.dir.path().join("fleet-tls").join("ca.crt")
    }

    /// The fleet CA's fingerprint, `sha256:…`, as the controller logged it.
    pub fn ca_hash(&self) -> String {
        const MARK: &str = "--ca-hash ";
        self.log_lines()
            .iter()
            .find_map(|l| {
                let rest = &l[l.find(MARK)? + MARK.len()..];
                rest.split_whitespace().next().map(str::to_string)
            })
            .unwrap_or_else(|| self.fail("the controller logged no CA fingerprint"))
    }

    /// Options for an agent that joins this controller (started with `tls`) as
    /// `node_id` with the join token in `join_token_file`, keeping its certificate in
    /// `id/` of its own temp dir.
    pub fn join_opts(&self, node_id: &str, join_token_file: &Path) -> AgentOpts {
        AgentOpts::default()
            .arg("--controller")
            .arg(self.url())
            .arg("--node-id")
            .arg(node_id)
            .arg("--identity-dir")
            .arg("id")
            .arg("--join-token-file")
            .arg(join_token_file)
            .arg("--ca-hash")
            .arg(self.ca_hash())
    }

    /// The controller's temp dir: its database (`fleet.db` and SQLite's `-wal` /
    /// `-shm` files), token and CA (`fleet-tls/`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The etcd the controller keeps its state in (`None`: SQLite, in [`Controller::dir`]).
    pub fn etcd(&self) -> Option<&EtcdStore> {
        self.etcd.as_ref()
    }

    /// What the controller stored, as bytes: its SQLite files (`fleet.db` and its
    /// journal), or every key and value under its etcd prefix.
    pub async fn stored_bytes(&self) -> Vec<u8> {
        let mut stored = Vec::new();
        match &self.etcd {
            Some(etcd) => {
                for (key, value) in etcd.cluster.dump(&etcd.prefix).await {
                    stored.extend(key.into_bytes());
                    stored.extend(value);
                }
            }
            None => {
                for entry in std::fs::read_dir(self.dir()).expect("read the controller's dir") {
                    let path = entry.expect("a dir entry").path();
                    let name = path.file_name().unwrap_or_default().to_string_lossy();
                    if name.starts_with("fleet.db") {
                        stored.extend(std::fs::read(&path).expect("read the database"));
                    }
                }
            }
        }
        stored
    }

    /// The controller's token, if it has one.
    pub fn token(&self) -> Option<&str> {
        self.opts.token.as_deref()
    }

    // ----- log -----

    /// Every line logged so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.all()
    }

    /// Wait for a line containing `needle` among the lines from index `mark` on;
    /// panics with the log after `timeout`, or once the controller exited without it.
    pub async fn wait_for_log_from(&self, mark: usize, needle: &str, timeout: Duration) -> String {
        match self.wait_for_log_or_exit(mark, needle, timeout).await {
            Ok(line) => line,
            Err(status) => self.fail(&format!(
                "the controller exited ({status}) without logging {needle:?}"
            )),
        }
    }

    /// [`Controller::wait_for_log_from`], but the controller's exit without the line
    /// is returned (`Err` with its status) rather than a panic.
    async fn wait_for_log_or_exit(
        &self,
        mark: usize,
        needle: &str,
        timeout: Duration,
    ) -> Result<String, std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        let mut changed = self.log.subscribe();
        loop {
            if let Some(line) = self.log.find_from(mark, needle) {
                return Ok(line);
            }
            if Instant::now() >= deadline {
                self.fail(&format!(
                    "no log line containing {needle:?} within {timeout:?}"
                ));
            }
            let exited = self.child.lock().unwrap().try_wait().ok().flatten();
            if let Some(status) = exited {
                self.log.wait_closed(STREAMS_CLOSE).await;
                return self.log.find_from(mark, needle).ok_or(status);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let _ =
                tokio::time::timeout(left.min(Duration::from_millis(100)), changed.changed()).await;
        }
    }

    /// Panic with `message` and the controller's whole log.
    pub fn fail(&self, message: &str) -> ! {
        let log = self.log_lines().join("\n    ");
        panic!("{message}\n  controller log:\n    {log}");
    }

    // ----- gRPC -----

    /// A client carrying the controller's token (if any).
    pub fn grpc(&self) -> ControllerClient {
        self.grpc_with_token(self.token())
    }

    /// A client carrying `token`, or none.
    pub fn grpc_with_token(&self, token: Option<&str>) -> ControllerClient {
        let bearer = token.map(|t| format!("Bearer {t}").parse().expect("an ASCII token"));
        // A lazily connected channel: it connects on the first call (and again after
        // a restart of the controller).
        let endpoint = Endpoint::from_shared(self.url())
            .expect("a valid URL")
            .connect_timeout(Duration::from_secs(5));
        let channel = if self.opts.tls {
            endpoint.connect_with_connector_lazy(self.tls_connector(None))
        } else {
            endpoint.connect_lazy()
        };
        ControllerServiceClient::with_interceptor(channel, Bearer(bearer))
    }

    /// A TLS connector to this controller trusting its CA, presenting `identity`.
    pub fn tls_connector(
        &self,
        identity: Option<fleet_net::tls::Identity>,
    ) -> fleet_net::tls::Connector {
        let pem = std::fs::read(self.ca_cert()).expect("read the fleet CA");
        let ca = fleet_net::tls::read_certs(&pem).expect("a PEM CA");
        let roots = fleet_net::tls::roots(&ca).expect("a valid CA");
        let config = fleet_net::tls::client_config(roots, identity).expect("a client config");
        fleet_net::tls::Connector::new(Arc::new(config), fleet_net::tls::CONTROLLER_NAME)
            .expect("a valid name")
    }

    /// `ListNodes` with every node.
    pub async fn nodes(&self) -> Vec<pb::Node> {
        self.grpc()
            .list_nodes(pb::ListNodesRequest::default())
            .await
            .unwrap_or_else(|s| self.fail(&format!("ListNodes: {s}")))
            .into_inner()
            .nodes
    }

    /// `GetRollout`.
    pub async fn rollout(&self, id: &str) -> pb::Rollout {
        self.grpc()
            .get_rollout(pb::GetRolloutRequest {
                id: id.into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| self.fail(&format!("GetRollout {id}: {s}")))
            .into_inner()
    }

    /// `ListRollouts`, newest first.
    pub async fn rollouts(&self) -> Vec<pb::Rollout> {
        self.grpc()
            .list_rollouts(pb::ListRolloutsRequest::default())
            .await
            .unwrap_or_else(|s| self.fail(&format!("ListRollouts: {s}")))
            .into_inner()
            .rollouts
    }

    /// Poll `GetRollout` until `ready` holds; panics after `timeout` with the rollout
    /// as last seen.
    pub async fn wait_rollout(
        &self,
        id: &str,
        what: &str,
        timeout: Duration,
        ready: impl Fn(&pb::Rollout) -> bool,
    ) -> pb::Rollout {
        let mut client = self.grpc();
        eventually(timeout, &format!("rollout {id}: {what}"), async || {
            let rollout = client
                .get_rollout(pb::GetRolloutRequest {
                    id: id.into(),
                    ..Default::default()
                })
                .await
                .map_err(|s| format!("GetRollout: {s}"))?
                .into_inner();
            if ready(&rollout) {
                Ok(rollout)
            } else {
                Err(describe(&rollout))
            }
        })
        .await
    }

    /// Wait until the rollout ended (succeeded, failed, rolled-back or aborted).
    pub async fn wait_rollout_end(&self, id: &str, timeout: Duration) -> pb::Rollout {
        self.wait_rollout(id, "ended", timeout, |r| {
            FINISHED.contains(&r.state.as_str())
        })
        .await
    }

    /// Poll `ListNodes` until every id in `ids` is listed with state `state`.
    pub async fn wait_nodes(
        &self,
        ids: &[String],
        state: &str,
        timeout: Duration,
    ) -> Vec<pb::Node> {
        let mut client = self.grpc();
        eventually(timeout, &format!("nodes {ids:?} {state}"), async || {
            let nodes = client
                .list_nodes(pb::ListNodesRequest::default())
                .await
                .map_err(|s| format!("ListNodes: {s}"))?
                .into_inner()
                .nodes;
            let missing: Vec<String> = ids
                .iter()
                .filter(|id| !nodes.iter().any(|n| &n.node_id == *id && n.state == state))
                .map(|id| {
                    let seen = nodes.iter().find(|n| &n.node_id == id);
                    format!("{id}: {:?}", seen.map(|n| (&n.state, &n.reason)))
                })
                .collect();
            if missing.is_empty() {
                Ok(nodes)
            } else {
                Err(missing.join("; "))
            }
        })
        .await
    }

    // ----- agents -----

    /// Options for an agent that registers with this controller as `node_id` (and
    /// carries its token).
    pub fn agent_opts(&self, node_id: &str) -> AgentOpts {
        AgentOpts {
            token: self.opts.token.clone(),
            ..AgentOpts::default()
        }
        .arg("--controller")
        .arg(self.url())
        .arg("--node-id")
        .arg(node_id)
    }

    /// Start `n` agents as `node-1` .. `node-n` (options from [`Controller::agent_opts`],
    /// then `configure(i, opts)`), all at once, and wait until the controller lists
    /// every one serving.
    pub async fn start_nodes(
        &self,
        n: usize,
        configure: impl Fn(usize, AgentOpts) -> AgentOpts,
    ) -> Vec<Agent> {
        let mut starting = tokio::task::JoinSet::new();
        for i in 0..n {
            let opts = configure(i, self.agent_opts(&node_id(i)));
            starting.spawn(async move { (i, Agent::start(opts).await) });
        }
        let mut agents: Vec<(usize, Agent)> = starting.join_all().await;
        agents.sort_by_key(|(i, _)| *i);
        let ids: Vec<String> = (0..n).map(node_id).collect();
        self.wait_nodes(&ids, "serving", START_TIMEOUT).await;
        agents.into_iter().map(|(_, a)| a).collect()
    }

    // ----- fleetctl -----

    /// Run `fleetctl ARGS` against this controller with its token (if any).
    pub async fn fleetctl<I, S>(&self, args: I) -> Ctl
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.fleetctl_with_token(self.token(), args).await
    }

    /// Run `fleetctl ARGS` with `FLEET_TOKEN` set to `token`, or unset.
    pub async fn fleetctl_with_token<I, S>(&self, token: Option<&str>, args: I) -> Ctl
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let shown = args
            .iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ");
        let mut command = match self.opts.wrapper.split_first() {
            Some((wrapper, wrapper_args)) => {
                let mut c = tokio::process::Command::new(wrapper);
                c.args(wrapper_args).arg(binary("fleetctl"));
                c
            }
            None => tokio::process::Command::new(binary("fleetctl")),
        };
        if self.opts.tls {
            command.env("FLEET_CA_CERT", self.ca_cert());
        } else {
            command.env_remove("FLEET_CA_CERT");
        }
        command
            .args(&args)
            .env("FLEET_CONTROLLER", self.url())
            .env_remove("FLEET_TOKEN")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if let Some(token) = token {
            command.env("FLEET_TOKEN", token);
        }
        eprintln!("[harness] fleetctl {shown}");
        let output = match tokio::time::timeout(FLEETCTL_TIMEOUT, command.output()).await {
            Ok(Ok(output)) => output,
            Ok(Err(e)) => panic!("run fleetctl {shown}: {e}"),
            Err(_) => self.fail(&format!(
                "fleetctl {shown} did not end within {FLEETCTL_TIMEOUT:?}"
            )),
        };
        let ctl = Ctl {
            args: shown,
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        };
        eprintln!(
            "[fleetctl {}] exit {:?}\n--- stdout:\n{}--- stderr:\n{}",
            ctl.args, ctl.code, ctl.stdout, ctl.stderr
        );
        ctl
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        if let Ok(mut child) = self.child.lock() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Spawn `fleet-controller` with its database in `dir` (or in `etcd`), echoing its
/// output into `log`.
fn spawn(
    dir: &Path,
    opts: &ControllerOpts,
    listen: &str,
    log: &Arc<ProcessLog>,
    etcd: Option<&EtcdStore>,
) -> Child {
    let program = binary("fleet-controller");
    let mut command = match opts.wrapper.split_first() {
        Some((wrapper, wrapper_args)) => {
            let mut c = Command::new(wrapper);
            c.args(wrapper_args).arg(&program);
            c
        }
        None => Command::new(&program),
    };
    if opts.tls {
        command.arg("--tls");
    }
    match etcd {
        Some(etcd) => command
            .arg("--store")
            .arg(etcd.cluster.url())
            .arg("--etcd-prefix")
            .arg(&etcd.prefix),
        None => command.arg("--db").arg(dir.join("fleet.db")),
    };
    command
        .arg("--listen")
        .arg(listen)
        .arg("--heartbeat-ttl")
        .arg(&opts.heartbeat_ttl);
    if opts.token.is_some() {
        command.arg("--token-file").arg(dir.join("token"));
    }
    if let Some(soak) = &opts.default_min_healthy {
        command.arg("--default-min-healthy").arg(soak);
    }
    command
        .args(&opts.args)
        .env("NO_COLOR", "1")
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    eprintln!("[harness] running {command:?}");
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()));
    log.capture(&mut child, "controller");
    child
}

// ----- reading rollouts -----

/// "r1 running () batch 1 [node-1 b0 healthy (healthy), node-2 b1 pending ()]": the
/// rollout in one line, for failure messages.
pub fn describe(r: &pb::Rollout) -> String {
    let nodes: Vec<String> = r
        .nodes
        .iter()
        .map(|n| format!("{} b{} {} ({})", n.node_id, n.batch, n.state, n.reason))
        .collect();
    format!(
        "{} {} ({}) batch {} [{}]",
        r.id,
        r.state,
        r.reason,
        r.current_batch,
        nodes.join(", ")
    )
}

/// The rollout's node `id`; panics with the rollout if there is none.
pub fn rollout_node<'a>(r: &'a pb::Rollout, id: &str) -> &'a pb::RolloutNode {
    r.nodes
        .iter()
        .find(|n| n.node_id == id)
        .unwrap_or_else(|| panic!("rollout has no node {id}: {}", describe(r)))
}

/// When the node first entered `state`, from its timeline.
pub fn entered(node: &pb::RolloutNode, state: &str) -> Option<u64> {
    node.timeline
        .iter()
        .find(|t| t.state == state)
        .map(|t| t.unix_ms)
}

/// The agent's own `Status` (gRPC, with its token).
pub async fn agent_status(agent: &Agent) -> pb::StatusResponse {
    agent
        .grpc()
        .await
        .status(agent.request(pb::StatusRequest {}))
        .await
        .unwrap_or_else(|s| agent.fail(&format!("gRPC Status: {s}")))
        .into_inner()
}

/// Each agent runs `exe`, one generation and one successful restart further than
/// `before` (its status then): restarted exactly once, whatever happened meanwhile.
pub async fn restarted_exactly_once(agents: &[Agent], before: &[pb::StatusResponse], exe: &Path) {
    for (i, agent) in agents.iter().enumerate() {
        let status = agent_status(agent).await;
        assert_eq!(exe_path(&status), exe.to_str().unwrap(), "{}", node_id(i));
        assert_eq!(
            status.generation,
            before[i].generation + 1,
            "{} was restarted exactly once: {status:?}",
            node_id(i)
        );
        assert_eq!(
            status.restarts_succeeded,
            before[i].restarts_succeeded + 1,
            "{}: {status:?}",
            node_id(i)
        );
    }
}

/// The path of the executable the agent's serving generation runs.
pub fn exe_path(status: &pb::StatusResponse) -> String {
    status
        .exe
        .as_ref()
        .map(|e| e.path.clone())
        .unwrap_or_default()
}

/// The pid of the worker of the agent's serving generation.
pub fn worker_pid(status: &pb::StatusResponse) -> u32 {
    status
        .workers
        .iter()
        .find(|w| w.generation == status.generation)
        .map(|w| w.pid)
        .unwrap_or_else(|| panic!("no worker of the serving generation in {status:?}"))
}

/// A release: a copy of the agent binary as `dir/name`, by its canonical path (the
/// path the agents report once they run it).
pub fn agent_release(dir: &Path, name: &str) -> PathBuf {
    std::fs::canonicalize(copy_agent_binary(dir, name)).expect("canonicalize the release")
}
