//! Hollow agents: **a test tool**, not a Fleet component. Many lightweight simulated
//! agents in one process, for exercising the controller at fleet scale (the
//! `scale-bench` benchmark, the `hollow-agents` binary and in-process tests).
//!
//! Each hollow agent serves the real `fleet.v1.AgentService` (a tonic server) on its
//! own loopback port, and registers and heartbeats to the controller exactly like a
//! `fleet-agent` started with `--controller` would: a beat on its `HeartbeatStream`
//! call (or a `Heartbeat` call per beat, [`HollowConfig::unary_heartbeats`]) with a
//! full `StatusResponse` (node id, labels, control address, admin URL, exe path + sha256,
//! generation, PIDs, state), at the interval the controller returns. Nothing behind
//! it is real:
//!
//! - No process is started. PIDs are fake and above the kernel's largest possible PID
//!   (2^22), so they can never name a real process. The exe is a path only; its
//!   "sha256" is the sha256 of the path string and its size is made up.
//! - `Restart` sleeps a configurable latency (± jitter), then fails with the
//!   configured probability (`OUTCOME_FAILED` with a reason) or bumps the generation,
//!   takes a new fake worker PID and the requested exe. Each restart's duration is
//!   recorded ([`HollowFleet::restarts`]) so a benchmark can tell simulated time from
//!   controller time.
//! - `Preflight` accepts any absolute path (and refuses for the node ids in
//!   [`HollowConfig::refuse_preflight_for`]); `Status` returns the simulated state;
//!   `Watch` sends a snapshot, then the simulated restart phases; `Shutdown` sends a
//!   last heartbeat (`shutting-down`), then stops heartbeating and closes the port.
//! - No app ports (the status lists no listeners) and no HTTP admin page: the admin
//!   URL points at the control port, which answers gRPC only.
//!
//! It is built to be lean: one tokio runtime and no thread per agent; two tasks per
//! agent (its server and its heartbeat loop). Like a real agent, each has its own
//! HTTP/2 connection to the controller, unless [`HollowConfig::channels`] says how
//! many connections all the agents of the process share (to simulate more agents
//! than the controller's open-file limit allows connections). The first heartbeats
//! are spread over [`HollowConfig::heartbeat_jitter`], and whenever the controller
//! changes the interval each agent picks a random point in the new interval, so
//! 10,000 agents never heartbeat in one burst; like a real agent, each also
//! heartbeats at once when a restart ends (READY or FAILED), so a batch's restarts
//! come back to the controller as a burst — unless, as a real agent does, it sends
//! its status with the restart's answer to a controller that takes statuses with
//! answers (and then also leaves out a periodic beat due within half an interval of
//! such a status).
//!
//! Each agent uses a listening socket, its heartbeat connection, and one per
//! connection the controller keeps open to it: call [`raise_nofile`] first (the
//! binaries do). Agents listen on 127.0.0.1, or with more than
//! [`AGENTS_PER_ADDRESS`] in the fleet, on 127.0.0.2, 127.0.0.3, … by index, and
//! heartbeat from there (a loopback address has about 28,000 ephemeral ports).

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use fleet_proto::v1 as pb;
use fleet_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
use fleet_proto::v1::controller_service_client::ControllerServiceClient;
use sha2::{Digest as _, Sha256};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tonic::codegen::tokio_stream::Stream;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

/// Fake PIDs start above the largest PID Linux can hand out (`pid_max` ≤ 2^22).
const FAKE_PID_BASE: u32 = 1 << 23;
/// Fake worker PIDs are taken from here on, one per simulated worker.
const FAKE_WORKER_PID_BASE: u32 = 1 << 24;
/// The made-up size of every simulated executable.
const FAKE_EXE_SIZE: u64 = 8 << 20;
/// Bounds on the heartbeat interval a controller may ask for.
const MIN_INTERVAL: Duration = Duration::from_millis(50);
const MAX_INTERVAL: Duration = Duration::from_secs(600);
/// Retry delay after a failed heartbeat (capped by the interval).
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(1);
/// Deadline of one heartbeat call.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(10);
/// Every later heartbeat period is the interval ± this fraction.
const PERIOD_JITTER: f64 = 0.1;
/// Events buffered per `Watch` caller; a slower caller misses events.
const WATCH_BUFFER: usize = 64;
/// Agents per loopback address: agent `index` listens on 127.0.0.1 + `index /
/// AGENTS_PER_ADDRESS` when [`HollowConfig::bind_ip`] is 127.0.0.1, and its own
/// heartbeat connection comes from there too (as from its own host): two of the
/// ~28,000 ephemeral ports of an address each.
pub const AGENTS_PER_ADDRESS: usize = 5_000;

/// What the simulated fleet looks like and how it behaves.
#[derive(Debug, Clone)]
pub struct HollowConfig {
    /// Number of agents.
    pub count: usize,
    /// Index of the first agent: node ids are `{id_prefix}{index:05}`.
    pub first_index: usize,
    pub id_prefix: String,
    /// Controller URL (`http://HOST:PORT`, as `fleet-agent --controller` takes it);
    /// `None`: no heartbeats.
    pub controller: Option<String>,
    /// Sent to the controller as `authorization: Bearer TOKEN`.
    pub token: Option<String>,
    /// When set, every `AgentService` call must carry `authorization: Bearer TOKEN`.
    pub agent_token: Option<String>,
    /// Simulated time from the `Restart` call to the new worker being ready.
    pub restart_latency: Duration,
    /// The latency is drawn uniformly from `restart_latency ± restart_jitter`.
    pub restart_jitter: Duration,
    /// Probability (0..=1) that a restart into an executable other than
    /// [`initial_exe`](Self::initial_exe) ends with `OUTCOME_FAILED`: a new build
    /// fails on a share of the nodes; going back to the build they started with
    /// always works (so a rollback is checked, not simulated away).
    pub failure_rate: f64,
    /// The first heartbeats are spread uniformly over this window.
    pub heartbeat_jitter: Duration,
    /// Heartbeat interval until the controller says otherwise.
    pub initial_interval: Duration,
    /// Node ids whose `Preflight` (and `Restart` into a new exe) refuses.
    pub refuse_preflight_for: HashSet<String>,
    /// The executable every agent starts with.
    pub initial_exe: String,
    /// Labels of every agent, besides `sim=hollow` and `shard=<index % shards>`.
    pub labels: Vec<(String, String)>,
    /// Number of `shard` label values.
    pub shards: usize,
    /// HTTP/2 connections to the controller shared by all the agents' heartbeats;
    /// 0: one per agent, as real agents have.
    pub channels: usize,
    /// A `Heartbeat` call per beat, as agents before `HeartbeatStream` (and agents
    /// of a controller without it) send them; else one stream per agent.
    pub unary_heartbeats: bool,
    /// The agents take no calls on their heartbeat stream (as agents from before
    /// `Command`): the controller dials each one's control port. Else they say
    /// `takes_commands` and answer the controller's calls on the stream.
    pub dialled_calls: bool,
    /// The agents send their answers on the stream without their status and every
    /// beat (as agents from before `status_with_answers`), whatever the controller
    /// says.
    pub answers_without_status: bool,
    /// Address the agents listen on (port 0 each); 127.0.0.1 spreads them over
    /// 127.0.0.1, .2, … ([`AGENTS_PER_ADDRESS`] each, by index).
    pub bind_ip: IpAddr,
    /// Seed of the latency / failure / jitter random numbers.
    pub seed: u64,
}

impl Default for HollowConfig {
    fn default() -> Self {
        Self {
            count: 100,
            first_index: 0,
            id_prefix: "hollow-".into(),
            controller: None,
            token: None,
            agent_token: None,
            restart_latency: Duration::from_millis(50),
            restart_jitter: Duration::from_millis(10),
            failure_rate: 0.0,
            heartbeat_jitter: Duration::from_secs(1),
            initial_interval: Duration::from_secs(1),
            refuse_preflight_for: HashSet::new(),
            initial_exe: "/opt/app-v1".into(),
            labels: Vec::new(),
            shards: 10,
            channels: 0,
            unary_heartbeats: false,
            dialled_calls: false,
            answers_without_status: false,
            bind_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            seed: 0x5eed_f1ee7,
        }
    }
}

/// One `Restart` an agent carried out (refused calls are not recorded).
#[derive(Debug, Clone)]
pub struct RestartRecord {
    pub node_id: String,
    /// When the call arrived.
    pub started: Instant,
    /// The same, as microseconds since the Unix epoch (comparable across processes).
    pub started_unix_us: u64,
    /// From the call's arrival until its response was ready.
    pub duration: Duration,
    pub succeeded: bool,
    /// The exe the restart was into.
    pub exe: String,
    /// Generation after the restart.
    pub generation: u64,
}

/// Counters over the whole simulated fleet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HollowStats {
    pub agents: usize,
    /// Agents whose first heartbeat the controller accepted.
    pub registered: usize,
    pub heartbeats_ok: u64,
    pub heartbeats_failed: u64,
    pub restarts_succeeded: u64,
    pub restarts_failed: u64,
    /// The most recent heartbeat interval the controller asked for (ms; 0 = none yet).
    pub interval_ms: u64,
    /// The most recent heartbeat error, if any.
    pub last_heartbeat_error: Option<String>,
}

impl RestartRecord {
    /// One line for `hollow-agents --stdin-commands`:
    /// `restart NODE_ID START_UNIX_US DURATION_US ok|failed GENERATION EXE`.
    pub fn to_line(&self) -> String {
        format!(
            "restart {} {} {} {} {} {}",
            self.node_id,
            self.started_unix_us,
            micros(self.duration),
            if self.succeeded { "ok" } else { "failed" },
            self.generation,
            self.exe
        )
    }
}

/// A restart as reported on a `restart ...` line (see [`RestartRecord::to_line`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestartLine {
    pub node_id: String,
    pub started_unix_us: u64,
    pub duration: Duration,
    pub succeeded: bool,
    pub generation: u64,
    pub exe: String,
}

impl RestartLine {
    pub fn parse(line: &str) -> Option<Self> {
        let mut f = line.strip_prefix("restart ")?.splitn(6, ' ');
        Some(Self {
            node_id: f.next()?.to_string(),
            started_unix_us: f.next()?.parse().ok()?,
            duration: Duration::from_micros(f.next()?.parse().ok()?),
            succeeded: match f.next()? {
                "ok" => true,
                "failed" => false,
                _ => return None,
            },
            generation: f.next()?.parse().ok()?,
            exe: f.next().unwrap_or("").to_string(),
        })
    }
}

impl From<&RestartRecord> for RestartLine {
    fn from(r: &RestartRecord) -> Self {
        Self {
            node_id: r.node_id.clone(),
            started_unix_us: r.started_unix_us,
            duration: r.duration,
            succeeded: r.succeeded,
            generation: r.generation,
            exe: r.exe.clone(),
        }
    }
}

impl HollowStats {
    /// One line for `hollow-agents --stdin-commands`: `stats at_ms=... agents=...
    /// registered=... heartbeats_ok=... heartbeats_failed=... restarts_succeeded=...
    /// restarts_failed=... interval_ms=... last_error=TEXT` (TEXT to the end of line).
    pub fn to_line(&self, at_unix_ms: u64) -> String {
        format!(
            "stats at_ms={at_unix_ms} agents={} registered={} heartbeats_ok={} heartbeats_failed={} \
             restarts_succeeded={} restarts_failed={} interval_ms={} last_error={}",
            self.agents,
            self.registered,
            self.heartbeats_ok,
            self.heartbeats_failed,
            self.restarts_succeeded,
            self.restarts_failed,
            self.interval_ms,
            self.last_heartbeat_error
                .as_deref()
                .unwrap_or("")
                .replace('\n', " ")
        )
    }

    /// Parses [`HollowStats::to_line`]: `(at_unix_ms, stats)`.
    pub fn parse_line(line: &str) -> Option<(u64, Self)> {
        let rest = line.strip_prefix("stats ")?;
        let (fields, last_error) = match rest.split_once(" last_error=") {
            Some((f, e)) => (f, e.trim()),
            None => (rest, ""),
        };
        let mut at = None;
        let mut s = Self {
            last_heartbeat_error: (!last_error.is_empty()).then(|| last_error.to_string()),
            ..Self::default()
        };
        for kv in fields.split_whitespace() {
            let (k, v) = kv.split_once('=')?;
            let v: u64 = v.parse().ok()?;
            match k {
                "at_ms" => at = Some(v),
                "agents" => s.agents = usize::try_from(v).ok()?,
                "registered" => s.registered = usize::try_from(v).ok()?,
                "heartbeats_ok" => s.heartbeats_ok = v,
                "heartbeats_failed" => s.heartbeats_failed = v,
                "restarts_succeeded" => s.restarts_succeeded = v,
                "restarts_failed" => s.restarts_failed = v,
                "interval_ms" => s.interval_ms = v,
                _ => {}
            }
        }
        Some((at?, s))
    }
}

/// A running simulated fleet. Dropping it stops every agent.
#[derive(Debug)]
pub struct HollowFleet {
    agents: Vec<Arc<Agent>>,
    shared: Arc<Shared>,
    tasks: JoinSet<()>,
}

#[derive(Debug)]
struct Shared {
    cfg: HollowConfig,
    auth: Option<MetadataValue<tonic::metadata::Ascii>>,
    rng: Rng,
    next_pid: AtomicU32,
    registered: AtomicUsize,
    heartbeats_ok: AtomicU64,
    heartbeats_failed: AtomicU64,
    restarts_succeeded: AtomicU64,
    restarts_failed: AtomicU64,
    interval_ms: AtomicU64,
    last_error: Mutex<Option<String>>,
    restarts: Mutex<Vec<RestartRecord>>,
}

#[derive(Debug)]
struct Agent {
    node_id: String,
    labels: HashMap<String, String>,
    addr: SocketAddr,
    supervisor_pid: u32,
    started_at_ms: u64,
    state: Mutex<AgentState>,
    /// Set once the agent has shut down: its server and heartbeats stop.
    stop: watch::Sender<bool>,
    /// A restart ended: heartbeat now (a real agent does, after READY or FAILED).
    beat_now: tokio::sync::Notify,
    /// Commands received on the heartbeat stream and not answered yet, and answers
    /// whose stream ended before they were sent (listed in the next stream's first
    /// beat, sent first on it), as a real agent keeps them.
    commands: Mutex<(HashSet<u64>, Vec<pb::CommandAnswer>)>,
    /// The stream open now: an answer whose own stream has ended goes out on it.
    current: Mutex<Option<mpsc::UnboundedSender<pb::HeartbeatRequest>>>,
    /// The controller said it takes a status sent with an answer as a beat.
    status_with_answers: AtomicBool,
    /// When (unix ms) a status last went out with an answer.
    status_sent_ms: AtomicU64,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct AgentState {
    /// "serving", "restarting", "shutting-down".
    state: &'static str,
    generation: u64,
    exe: pb::ExeInfo,
    worker_pid: u32,
    worker_started_ms: u64,
    worker_ready_ms: u64,
    restarts_succeeded: u64,
    restarts_failed: u64,
    in_progress: String,
    seq: u64,
    watchers: Vec<mpsc::Sender<Result<pb::Event, Status>>>,
}

/// Raises the soft limit on open files to the hard limit, and first the hard limit to
/// `want` where the process may (root). Returns the soft limit now in force.
pub fn raise_nofile(want: u64) -> anyhow::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit(NOFILE)")?;
    let mut hard = hard;
    if hard < want && setrlimit(Resource::RLIMIT_NOFILE, want, want).is_ok() {
        hard = want;
    }
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("setrlimit(NOFILE)")?;
    }
    Ok(hard.max(soft))
}

/// Connections the controller has open to agents at most: `MAX_CHANNELS` (1,024)
/// kept, the least recently used closed first, plus `MAX_CALLS` (1,024) calls in
/// flight, each of which may hold a channel closed meanwhile
/// (`controller/src/agents.rs`).
pub const CONTROLLER_AGENT_CONNECTIONS: usize = 2048;

/// File descriptors `count` agents may need: a listener each, a heartbeat
/// connection each (`channels` 0) or `channels` shared ones, the controller's
/// connections to them ([`CONTROLLER_AGENT_CONNECTIONS`] at most), and some slack.
pub fn nofile_needed(count: usize, channels: usize) -> u64 {
    let heartbeat = if channels == 0 { count } else { channels };
    (count + heartbeat + count.min(CONTROLLER_AGENT_CONNECTIONS) + 512) as u64
}

/// Where agent `index` listens: `ip`, or for 127.0.0.1 the loopback address of its
/// block of [`AGENTS_PER_ADDRESS`].
pub fn agent_ip(ip: IpAddr, index: usize) -> IpAddr {
    match ip {
        IpAddr::V4(v4) if v4 == Ipv4Addr::LOCALHOST => {
            let block = u32::try_from(index / AGENTS_PER_ADDRESS).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(v4) + block.min(0x00ff_fffd)))
        }
        other => other,
    }
}

/// A listening socket on `addr` *without* `SO_REUSEADDR` (which std and tokio's
/// `TcpListener::bind` set): with it, Linux looks for a free port 0 the slow way once
/// a few thousand are taken — binding 10,000 took seconds instead of milliseconds.
fn bind_listener(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(false)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Connects from `self.0` (an agent's own address), as from the agent's own host. The
/// socket is bound with `IP_BIND_ADDRESS_NO_PORT`, so the port is chosen at connect
/// time and may be shared with connections to other destinations: binding port 0
/// first would reserve one of the address's ports for each connection, and the
/// kernel's search for a free one slows to a crawl as they run out.
#[derive(Debug, Clone, Copy)]
struct FromAddress(IpAddr);

impl tonic::codegen::Service<http::Uri> for FromAddress {
    type Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>;
    type Error = std::io::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let local = self.0;
        Box::pin(async move {
            let host = uri
                .host()
                .unwrap_or_default()
                .trim_matches(|c| c == '[' || c == ']');
            let port = uri.port_u16().unwrap_or(80);
            let target = match host.parse::<IpAddr>() {
                Ok(ip) => SocketAddr::new(ip, port),
                Err(_) => tokio::net::lookup_host((host, port))
                    .await?
                    .find(|a| a.is_ipv4() == local.is_ipv4())
                    .ok_or_else(|| {
                        std::io::Error::new(
                            std::io::ErrorKind::NotFound,
                            format!("{host} has no address of {local}'s family"),
                        )
                    })?,
            };
            let socket = if local.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            nix::sys::socket::setsockopt(
                &socket,
                nix::sys::socket::sockopt::IpBindAddressNoPort,
                &true,
            )?;
            socket.bind(SocketAddr::new(local, 0))?;
            let stream = socket.connect(target).await?;
            stream.set_nodelay(true)?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        })
    }
}

/// `sha256` (hex) of the path string: the simulated digest of a simulated exe.
pub fn fake_sha256(path: &str) -> String {
    let digest = Sha256::digest(path.as_bytes());
    let mut out = String::with_capacity(64);
    for b in digest {
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn exe_info(path: &str) -> pb::ExeInfo {
    pb::ExeInfo {
        path: path.to_string(),
        sha256: fake_sha256(path),
        size: FAKE_EXE_SIZE,
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// A lock-free splitmix64 stream shared by all agents.
#[derive(Debug)]
struct Rng(AtomicU64);

impl Rng {
    const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

    fn next(&self) -> u64 {
        let mut z = self
            .0
            .fetch_add(Self::GAMMA, Ordering::Relaxed)
            .wrapping_add(Self::GAMMA);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, d).
    fn below(&self, d: Duration) -> Duration {
        d.mul_f64(self.unit())
    }

    /// Uniform in [base - jitter, base + jitter], not below zero.
    fn around(&self, base: Duration, jitter: Duration) -> Duration {
        let offset = jitter.as_secs_f64() * (2.0 * self.unit() - 1.0);
        Duration::from_secs_f64((base.as_secs_f64() + offset).max(0.0))
    }
}

impl HollowFleet {
    /// Binds every agent's port, starts its server and (with a controller) its
    /// heartbeats. Must run inside a tokio runtime. The servers answer at once;
    /// [`HollowFleet::wait_registered`] waits for the first heartbeats.
    pub async fn start(cfg: HollowConfig) -> anyhow::Result<Self> {
        if cfg.count == 0 {
            bail!("the hollow fleet needs at least one agent");
        }
        if !(0.0..=1.0).contains(&cfg.failure_rate) {
            bail!("failure rate {} must be between 0 and 1", cfg.failure_rate);
        }
        let auth = match &cfg.token {
            Some(t) => Some(
                format!("Bearer {t}")
                    .parse()
                    .context("the controller token is not a valid header value")?,
            ),
            None => None,
        };
        let endpoint = match &cfg.controller {
            Some(url) => Some(
                Endpoint::from_shared(url.clone())
                    .with_context(|| format!("bad controller URL {url:?}"))?
                    .connect_timeout(Duration::from_secs(5))
                    .tcp_nodelay(true),
            ),
            None => None,
        };
        // Shared connections (`channels` > 0); else each agent opens its own.
        let shared_channels: Vec<Channel> = match &endpoint {
            // Each from the address of the first agent it carries (spread like them).
            Some(endpoint) => (0..cfg.channels)
                .map(|j| {
                    let ip = agent_ip(cfg.bind_ip, cfg.first_index + j);
                    if ip.is_unspecified() {
                        endpoint.connect_lazy()
                    } else {
                        endpoint.connect_with_connector_lazy(FromAddress(ip))
                    }
                })
                .collect(),
            None => Vec::new(),
        };
        let shared = Arc::new(Shared {
            rng: Rng(AtomicU64::new(cfg.seed)),
            next_pid: AtomicU32::new(FAKE_WORKER_PID_BASE),
            registered: AtomicUsize::new(0),
            heartbeats_ok: AtomicU64::new(0),
            heartbeats_failed: AtomicU64::new(0),
            restarts_succeeded: AtomicU64::new(0),
            restarts_failed: AtomicU64::new(0),
            interval_ms: AtomicU64::new(0),
            last_error: Mutex::new(None),
            restarts: Mutex::new(Vec::new()),
            auth,
            cfg,
        });
        let cfg = &shared.cfg;
        let mut agents = Vec::with_capacity(cfg.count);
        let mut tasks = JoinSet::new();
        let now_ms = unix_ms();
        for n in 0..cfg.count {
            let index = cfg.first_index + n;
            let ip = agent_ip(cfg.bind_ip, index);
            let listener = bind_listener(SocketAddr::new(ip, 0)).with_context(|| {
                format!(
                    "cannot bind hollow agent {n} of {} on {ip}:0 (too many open files? \
                     raise the limit: ulimit -n {})",
                    cfg.count,
                    nofile_needed(cfg.count, cfg.channels)
                )
            })?;
            let addr = listener.local_addr()?;
            let mut labels: HashMap<String, String> = cfg.labels.iter().cloned().collect();
            labels.insert("sim".into(), "hollow".into());
            labels.insert("shard".into(), (index % cfg.shards.max(1)).to_string());
            let (stop, stop_rx) = watch::channel(false);
            let agent = Arc::new(Agent {
                node_id: format!("{}{index:05}", cfg.id_prefix),
                labels,
                addr,
                supervisor_pid: FAKE_PID_BASE + u32::try_from(index).unwrap_or(0),
                started_at_ms: now_ms,
                state: Mutex::new(AgentState {
                    state: "serving",
                    generation: 1,
                    exe: exe_info(&cfg.initial_exe),
                    worker_pid: shared.next_pid.fetch_add(1, Ordering::Relaxed),
                    worker_started_ms: now_ms,
                    worker_ready_ms: now_ms,
                    restarts_succeeded: 0,
                    restarts_failed: 0,
                    in_progress: String::new(),
                    seq: 0,
                    watchers: Vec::new(),
                }),
                stop,
                beat_now: tokio::sync::Notify::new(),
                commands: Mutex::default(),
                current: Mutex::default(),
                status_with_answers: AtomicBool::new(false),
                status_sent_ms: AtomicU64::new(0),
                shared: shared.clone(),
            });
            let service = AgentServiceServer::new(HollowService {
                agent: agent.clone(),
            });
            let mut server_stop = stop_rx.clone();
            tasks.spawn(async move {
                let signal = async move {
                    let _ = server_stop.wait_for(|s| *s).await;
                };
                let _ = tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming_shutdown(TcpIncoming::from(listener), signal)
                    .await;
            });
            if let Some(endpoint) = &endpoint {
                let channel = match shared_channels.get(n % shared_channels.len().max(1)) {
                    Some(shared) => shared.clone(),
                    None if ip.is_unspecified() => endpoint.connect_lazy(),
                    None => endpoint.connect_with_connector_lazy(FromAddress(ip)),
                };
                tasks.spawn(heartbeat_loop(agent.clone(), channel, stop_rx));
            }
            agents.push(agent);
        }
        Ok(Self {
            agents,
            shared,
            tasks,
        })
    }

    pub fn len(&self) -> usize {
        self.agents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.agents.is_empty()
    }

    /// `(node id, control address)` of every agent, in index order.
    pub fn addrs(&self) -> Vec<(String, SocketAddr)> {
        self.agents
            .iter()
            .map(|a| (a.node_id.clone(), a.addr))
            .collect()
    }

    pub fn stats(&self) -> HollowStats {
        let s = &self.shared;
        HollowStats {
            agents: self.agents.len(),
            registered: s.registered.load(Ordering::Relaxed),
            heartbeats_ok: s.heartbeats_ok.load(Ordering::Relaxed),
            heartbeats_failed: s.heartbeats_failed.load(Ordering::Relaxed),
            restarts_succeeded: s.restarts_succeeded.load(Ordering::Relaxed),
            restarts_failed: s.restarts_failed.load(Ordering::Relaxed),
            interval_ms: s.interval_ms.load(Ordering::Relaxed),
            last_heartbeat_error: lock(&s.last_error).clone(),
        }
    }

    /// Every restart carried out so far, in completion order.
    pub fn restarts(&self) -> Vec<RestartRecord> {
        lock(&self.shared.restarts).clone()
    }

    /// Waits until every agent's first heartbeat was accepted (at once without a
    /// controller). `progress` is called about every `every` while waiting.
    pub async fn wait_registered(
        &self,
        timeout: Option<Duration>,
        every: Duration,
        mut progress: impl FnMut(&HollowStats),
    ) -> anyhow::Result<()> {
        if self.shared.cfg.controller.is_none() {
            return Ok(());
        }
        let start = tokio::time::Instant::now();
        let mut last_report = start;
        loop {
            let stats = self.stats();
            if stats.registered >= self.agents.len() {
                return Ok(());
            }
            if timeout.is_some_and(|t| start.elapsed() >= t) {
                bail!(
                    "only {} of {} hollow agents registered within {:?}; last heartbeat error: {}",
                    stats.registered,
                    stats.agents,
                    timeout.unwrap_or_default(),
                    stats.last_heartbeat_error.as_deref().unwrap_or("none")
                );
            }
            if last_report.elapsed() >= every {
                last_report = tokio::time::Instant::now();
                progress(&stats);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// [`Self::wait_registered`] within `timeout`, without progress reports: what a
    /// test waits for.
    pub async fn registered_within(&self, timeout: Duration) -> anyhow::Result<()> {
        self.wait_registered(Some(timeout), timeout, |_| {}).await
    }

    /// [`Self::start`], then [`Self::registered_within`] `timeout`: the fleet a test
    /// starts with.
    pub async fn start_registered(cfg: HollowConfig, timeout: Duration) -> anyhow::Result<Self> {
        let fleet = Self::start(cfg).await?;
        fleet.registered_within(timeout).await?;
        Ok(fleet)
    }

    /// Stops every agent (servers and heartbeats) and waits for their tasks.
    pub async fn shutdown(mut self) {
        for a in &self.agents {
            a.stop.send_replace(true);
            lock(&a.state).watchers.clear();
        }
        let all = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(5), all)
            .await
            .is_err()
        {
            self.tasks.abort_all();
        }
    }
}

impl Agent {
    fn status(&self) -> pb::StatusResponse {
        let s = lock(&self.state);
        pb::StatusResponse {
            node_id: self.node_id.clone(),
            labels: self.labels.clone(),
            supervisor_pid: self.supervisor_pid,
            state: s.state.to_string(),
            generation: s.generation,
            exe: Some(s.exe.clone()),
            workers: vec![pb::Worker {
                generation: s.generation,
                pid: s.worker_pid,
                exe: Some(s.exe.clone()),
                state: if s.state == "shutting-down" {
                    "draining".into()
                } else {
                    "serving".into()
                },
                started_at_unix_ms: s.worker_started_ms,
                ready_at_unix_ms: s.worker_ready_ms,
                // No process serves behind a hollow agent.
                in_flight: 0,
            }],
            listeners: Vec::new(),
            control_addr: self.addr.to_string(),
            admin_url: format!("http://{}/debug/admin", self.addr),
            started_at_unix_ms: self.started_at_ms,
            version: format!("hollow-agent {}", env!("CARGO_PKG_VERSION")),
            restarts_succeeded: s.restarts_succeeded,
            restarts_failed: s.restarts_failed,
            // A hollow agent drains nothing: no restart history to report.
            recent_restarts: Vec::new(),
            in_progress: s.in_progress.clone(),
            // The real agent's defaults.
            ready_timeout_ms: 30_000,
            drain_timeout_ms: 60_000,
        }
    }

    fn check_auth(&self, metadata: &MetadataMap) -> Result<(), Status> {
        let Some(token) = &self.shared.cfg.agent_token else {
            return Ok(());
        };
        let given = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if given == Some(token.as_str()) {
            Ok(())
        } else {
            Err(Status::unauthenticated(
                "missing or wrong token: send `authorization: Bearer TOKEN`",
            ))
        }
    }

    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    /// Resolves and checks an exe the way the real agent's validation would, in
    /// simulation: any absolute path is fine; sha256, when given, must match.
    fn check_exe(&self, exe: &str, sha256: &str, current: &str) -> Result<pb::ExeInfo, Status> {
        let path = if exe.trim().is_empty() {
            current
        } else {
            exe.trim()
        };
        if !path.starts_with('/') {
            return Err(Status::invalid_argument(format!(
                "exe {path} is not an absolute path: give the path of the new build"
            )));
        }
        if self.shared.cfg.refuse_preflight_for.contains(&self.node_id) {
            return Err(Status::failed_precondition(format!(
                "exe {path} refused: hollow agent {} is configured to refuse preflight \
                 (--refuse-preflight-for)",
                self.node_id
            )));
        }
        let info = exe_info(path);
        let sha256 = sha256.trim();
        if !sha256.is_empty() && !sha256.eq_ignore_ascii_case(&info.sha256) {
            return Err(Status::failed_precondition(format!(
                "exe {path} has sha256 {}, not the expected {sha256} (hollow agent: the \
                 simulated digest is the sha256 of the path string)",
                info.sha256
            )));
        }
        Ok(info)
    }
}

impl AgentState {
    fn emit(&mut self, phase: pb::Phase, pid: u32, message: String, duration_us: u64) {
        self.seq += 1;
        if self.watchers.is_empty() {
            return;
        }
        let event = pb::Event {
            seq: self.seq,
            unix_ms: unix_ms(),
            phase: phase as i32,
            generation: self.generation,
            pid,
            message,
            duration_us,
            exe: self.exe.path.clone(),
        };
        self.watchers
            .retain(|w| match w.try_send(Ok(event.clone())) {
                Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => true,
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            });
    }
}

async fn heartbeat_loop(agent: Arc<Agent>, channel: Channel, mut stop: watch::Receiver<bool>) {
    let shared = agent.shared.clone();
    let cfg = &shared.cfg;
    let mut client = ControllerServiceClient::new(channel)
        .max_decoding_message_size(1 << 20)
        .max_encoding_message_size(1 << 20);
    let mut stream = None;
    let mut interval = cfg.initial_interval.max(MIN_INTERVAL);
    let mut delay = shared.rng.below(cfg.heartbeat_jitter);
    let mut registered = false;
    loop {
        let due = tokio::select! {
            () = tokio::time::sleep(delay) => true,
            () = agent.beat_now.notified() => false,
            _ = stop.changed() => false,
        };
        let stopping = agent.stopped();
        // A real agent leaves out a periodic beat within half an interval of a status
        // sent with an answer (to a controller that takes those).
        let sent = agent.status_sent_ms.load(Ordering::Relaxed);
        if due
            && !stopping
            && stream.is_some()
            && agent.status_with_answers.load(Ordering::Relaxed)
            && u128::from(unix_ms().saturating_sub(sent)) < (interval / 2).as_millis()
        {
            delay = interval.mul_f64(1.0 + PERIOD_JITTER * (2.0 * shared.rng.unit() - 1.0));
            continue;
        }
        let beat = pb::HeartbeatRequest {
            status: Some(agent.status()),
            in_flight: 0,
            ..Default::default()
        };
        let answer = if cfg.unary_heartbeats {
            let mut request = shared.request(beat);
            request.set_timeout(HEARTBEAT_TIMEOUT);
            client.heartbeat(request).await.map(Response::into_inner)
        } else {
            let sent = send_on_stream(&agent, &mut client, &mut stream, beat);
            match tokio::time::timeout(HEARTBEAT_TIMEOUT, sent).await {
                Ok(answer) => answer,
                Err(_) => Err(Status::deadline_exceeded("no answer to the beat")),
            }
        };
        if answer.is_err() {
            // Opened again by the next beat.
            stream = None;
        }
        match answer {
            Ok(answer) => {
                shared.heartbeats_ok.fetch_add(1, Ordering::Relaxed);
                agent.status_with_answers.store(
                    answer.status_with_answers && stream.is_some() && !cfg.answers_without_status,
                    Ordering::Relaxed,
                );
                if !registered {
                    registered = true;
                    shared.registered.fetch_add(1, Ordering::Relaxed);
                }
                let ms = answer.interval_ms;
                delay = interval.mul_f64(1.0 + PERIOD_JITTER * (2.0 * shared.rng.unit() - 1.0));
                if ms > 0 {
                    shared.interval_ms.store(ms, Ordering::Relaxed);
                    let asked = Duration::from_millis(ms).clamp(MIN_INTERVAL, MAX_INTERVAL);
                    if asked != interval {
                        // A random point in the new interval keeps the fleet spread out.
                        interval = asked;
                        delay = shared.rng.below(interval);
                    }
                }
            }
            Err(status) => {
                shared.heartbeats_failed.fetch_add(1, Ordering::Relaxed);
                *lock(&shared.last_error) = Some(format!(
                    "{}: {:?}: {}",
                    agent.node_id,
                    status.code(),
                    status.message()
                ));
                delay = shared
                    .rng
                    .around(RETRY_AFTER_ERROR.min(interval), RETRY_AFTER_ERROR / 10);
            }
        }
        if stopping {
            return;
        }
    }
}

/// An agent's open `HeartbeatStream` call: beats (and answers to commands) out, the
/// answers to beats back in order from the task that reads the stream (and hands
/// commands to [`answer_command`]).
#[derive(Debug)]
struct BeatStream {
    out: mpsc::UnboundedSender<pb::HeartbeatRequest>,
    acks: mpsc::Receiver<Result<pb::HeartbeatResponse, Status>>,
    reader: tokio::task::JoinHandle<()>,
    fresh: bool,
}

impl Drop for BeatStream {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Sends `beat` on the agent's stream, opening it first if need be.
async fn send_on_stream(
    agent: &Arc<Agent>,
    client: &mut ControllerServiceClient<Channel>,
    stream: &mut Option<BeatStream>,
    mut beat: pb::HeartbeatRequest,
) -> Result<pb::HeartbeatResponse, Status> {
    if stream.is_none() {
        let (out, queue) = mpsc::unbounded_channel();
        let request = agent
            .shared
            .request(tonic::codegen::tokio_stream::wrappers::UnboundedReceiverStream::new(queue));
        let answers = client.heartbeat_stream(request).await?.into_inner();
        let (acks_tx, acks) = mpsc::channel(1);
        let (reader_agent, reader_out) = (agent.clone(), out.clone());
        let reader = tokio::spawn(fleet_proto::commands::read_stream(
            answers,
            acks_tx,
            move |command| {
                tokio::spawn(answer_command(
                    reader_agent.clone(),
                    command,
                    reader_out.clone(),
                ));
            },
        ));
        *stream = Some(BeatStream {
            out,
            acks,
            reader,
            fresh: true,
        });
    }
    let Some(open) = stream else {
        unreachable!("opened above");
    };
    let takes = !agent.shared.cfg.dialled_calls;
    let fresh = std::mem::take(&mut open.fresh);
    let outbox = if fresh && takes {
        beat.takes_commands = true;
        let mut commands = lock(&agent.commands);
        beat.working = commands.0.iter().copied().collect();
        beat.working.extend(commands.1.iter().map(|a| a.id));
        std::mem::take(&mut commands.1)
    } else {
        Vec::new()
    };
    // A send fails only once the call is over; its status says why.
    let _ = open.out.send(beat);
    if fresh && takes {
        *lock(&agent.current) = Some(open.out.clone());
    }
    for answer in outbox {
        send_answer(agent, &open.out, answer);
    }
    open.acks
        .recv()
        .await
        .unwrap_or_else(|| Err(fleet_proto::commands::ended()))
}

/// Sends an answer on `out`, or keeps it for the agent's next stream.
fn send_answer(
    agent: &Agent,
    out: &mpsc::UnboundedSender<pb::HeartbeatRequest>,
    answer: pb::CommandAnswer,
) {
    // With the node's status where the controller takes it (as a real agent's).
    let status = agent
        .status_with_answers
        .load(Ordering::Relaxed)
        .then(|| agent.status());
    let with_status = status.is_some();
    let message = pb::HeartbeatRequest {
        answer: Some(answer.clone()),
        status,
        ..Default::default()
    };
    // On its own stream, else on the one open now, else kept for the next.
    let Err(unsent) = out.send(message) else {
        if with_status {
            agent.status_sent_ms.store(unix_ms(), Ordering::Relaxed);
        }
        return;
    };
    let current = lock(&agent.current).clone();
    if current.is_none_or(|now| now.send(unsent.0).is_err()) {
        lock(&agent.commands).1.push(answer);
    }
}

/// Carries out a command from the controller as the agent's `AgentService` would
/// the same call with the command's token, and answers it on the stream.
async fn answer_command(
    agent: Arc<Agent>,
    command: pb::Command,
    out: mpsc::UnboundedSender<pb::HeartbeatRequest>,
) {
    let id = command.id;
    if !lock(&agent.commands).0.insert(id) {
        return;
    }
    let answer = if agent.shared.cfg.dialled_calls {
        fleet_proto::commands::refusal(
            tonic::Code::PermissionDenied,
            "this hollow agent takes no commands on its stream",
        )
    } else {
        let mut metadata = MetadataMap::new();
        if let Ok(value) = format!("Bearer {}", command.token).parse() {
            metadata.insert("authorization", value);
        }
        let service = HollowService {
            agent: agent.clone(),
        };
        fleet_proto::commands::answer(&service, command.call, &metadata).await
    };
    // Sent (or kept) before it leaves the working set, as a real agent does.
    send_answer(
        &agent,
        &out,
        pb::CommandAnswer {
            id,
            answer: Some(answer),
        },
    );
    lock(&agent.commands).0.remove(&id);
}

impl Shared {
    /// A request with the fleet's token.
    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(auth) = &self.auth {
            request.metadata_mut().insert("authorization", auth.clone());
        }
        request
    }
}

/// The `AgentService` of one hollow agent.
#[derive(Debug)]
struct HollowService {
    agent: Arc<Agent>,
}

#[tonic::async_trait]
impl AgentService for HollowService {
    async fn restart(
        &self,
        request: Request<pb::RestartRequest>,
    ) -> Result<Response<pb::RestartResponse>, Status> {
        let started = Instant::now();
        self.agent.check_auth(request.metadata())?;
        let r = request.into_inner();
        let agent = self.agent.clone();
        let (info, old_pid, new_pid) = {
            let mut s = lock(&agent.state);
            match s.state {
                "shutting-down" => return Err(Status::unavailable("the node is shutting down")),
                "restarting" => {
                    return Err(Status::aborted(format!(
                        "a restart is already running ({})",
                        s.in_progress
                    )));
                }
                _ => {}
            }
            let current = s.exe.path.clone();
            let info = agent.check_exe(&r.exe, &r.sha256, &current)?;
            let old_pid = s.worker_pid;
            let new_pid = agent.shared.next_pid.fetch_add(1, Ordering::Relaxed);
            s.state = "restarting";
            s.in_progress = format!("waiting-ready {}", info.path);
            let path = info.path.clone();
            s.emit(pb::Phase::Validating, old_pid, format!("exe {path}"), 0);
            s.emit(pb::Phase::Spawning, new_pid, format!("exe {path}"), 0);
            s.emit(pb::Phase::WaitingReady, new_pid, String::new(), 0);
            (info, old_pid, new_pid)
        };
        let validate_us = micros(started.elapsed());
        // The simulated restart runs to its end even if the caller goes away, as a
        // real one would.
        let work = tokio::spawn(async move {
            let shared = agent.shared.clone();
            let cfg = &shared.cfg;
            let latency = shared.rng.around(cfg.restart_latency, cfg.restart_jitter);
            tokio::time::sleep(latency).await;
            let failed = info.path != cfg.initial_exe && shared.rng.unit() < cfg.failure_rate;
            let ready_us = micros(started.elapsed());
            let response = {
                let mut s = lock(&agent.state);
                s.state = "serving";
                s.in_progress.clear();
                if failed {
                    s.restarts_failed += 1;
                    let reason = format!(
                        "generation {} exited with status 1 before READY (hollow agent: \
                         simulated failure, --failure-rate {})",
                        s.generation + 1,
                        cfg.failure_rate
                    );
                    s.emit(pb::Phase::Failed, new_pid, reason.clone(), ready_us);
                    pb::RestartResponse {
                        outcome: pb::Outcome::Failed as i32,
                        reason,
                        stderr_tail: vec!["hollow agent: simulated crash".into()],
                        generation: s.generation,
                        old_pid,
                        new_pid,
                        exe: Some(s.exe.clone()),
                        timings: Some(pb::PhaseTimings {
                            validate_us,
                            spawn_us: validate_us,
                            ready_us,
                        }),
                    }
                } else {
                    let now = unix_ms();
                    s.generation += 1;
                    s.worker_pid = new_pid;
                    s.exe = info;
                    s.worker_started_ms = now.saturating_sub(ready_us / 1000);
                    s.worker_ready_ms = now;
                    s.restarts_succeeded += 1;
                    s.emit(pb::Phase::Ready, new_pid, String::new(), ready_us);
                    s.emit(pb::Phase::Draining, old_pid, String::new(), 0);
                    s.emit(pb::Phase::Drained, old_pid, String::new(), 0);
                    pb::RestartResponse {
                        outcome: pb::Outcome::Succeeded as i32,
                        reason: String::new(),
                        stderr_tail: Vec::new(),
                        generation: s.generation,
                        old_pid,
                        new_pid,
                        exe: Some(s.exe.clone()),
                        timings: Some(pb::PhaseTimings {
                            validate_us,
                            spawn_us: validate_us,
                            ready_us,
                        }),
                    }
                }
            };
            if failed {
                shared.restarts_failed.fetch_add(1, Ordering::Relaxed);
            } else {
                shared.restarts_succeeded.fetch_add(1, Ordering::Relaxed);
            }
            // As a real agent: while commands on the stream are at work (this restart,
            // called there), their answers carry the status to a controller that takes
            // it; else a beat at once.
            let answered = !lock(&agent.commands).0.is_empty()
                && agent.status_with_answers.load(Ordering::Relaxed);
            if !answered {
                agent.beat_now.notify_one();
            }
            let duration = started.elapsed();
            lock(&shared.restarts).push(RestartRecord {
                node_id: agent.node_id.clone(),
                started,
                started_unix_us: unix_us().saturating_sub(micros(duration)),
                duration,
                succeeded: !failed,
                exe: response
                    .exe
                    .as_ref()
                    .map(|e| e.path.clone())
                    .unwrap_or_default(),
                generation: response.generation,
            });
            response
        });
        let response = work
            .await
            .map_err(|e| Status::internal(format!("hollow restart task failed: {e}")))?;
        Ok(Response::new(response))
    }

    async fn shutdown(
        &self,
        request: Request<pb::ShutdownRequest>,
    ) -> Result<Response<pb::ShutdownResponse>, Status> {
        self.agent.check_auth(request.metadata())?;
        let reason = request.into_inner().reason;
        {
            let mut s = lock(&self.agent.state);
            if s.state == "shutting-down" {
                return Ok(Response::new(pb::ShutdownResponse {}));
            }
            s.state = "shutting-down";
            let pid = s.worker_pid;
            s.emit(pb::Phase::ShuttingDown, pid, reason, 0);
        }
        let agent = self.agent.clone();
        tokio::spawn(async move {
            // Answer first, then stop: the heartbeat loop sends one last heartbeat
            // (shutting-down), the server closes the port.
            tokio::time::sleep(Duration::from_millis(50)).await;
            {
                let mut s = lock(&agent.state);
                let pid = s.worker_pid;
                s.emit(pb::Phase::Stopped, pid, String::new(), 0);
                s.watchers.clear();
            }
            agent.stop.send_replace(true);
        });
        Ok(Response::new(pb::ShutdownResponse {}))
    }

    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        self.agent.check_auth(request.metadata())?;
        Ok(Response::new(self.agent.status()))
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.agent.check_auth(request.metadata())?;
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        {
            let mut s = lock(&self.agent.state);
            let snapshot = pb::Event {
                seq: s.seq,
                unix_ms: unix_ms(),
                phase: pb::Phase::Snapshot as i32,
                generation: s.generation,
                pid: s.worker_pid,
                message: format!("state {}", s.state),
                duration_us: 0,
                exe: s.exe.path.clone(),
            };
            let _ = tx.try_send(Ok(snapshot));
            if !self.agent.stopped() {
                s.watchers.push(tx);
            }
        }
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn preflight(
        &self,
        request: Request<pb::PreflightRequest>,
    ) -> Result<Response<pb::PreflightResponse>, Status> {
        self.agent.check_auth(request.metadata())?;
        let r = request.into_inner();
        let current = {
            let s = lock(&self.agent.state);
            if s.state == "shutting-down" {
                return Err(Status::unavailable("the node is shutting down"));
            }
            s.exe.path.clone()
        };
        let info = self.agent.check_exe(&r.exe, &r.sha256, &current)?;
        Ok(Response::new(pb::PreflightResponse { exe: Some(info) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_proto::v1::agent_service_client::AgentServiceClient;
    use fleet_proto::v1::controller_service_server::{ControllerService, ControllerServiceServer};
    use tonic::codegen::tokio_stream::StreamExt as _;

    /// A controller that only takes heartbeats and keeps the last status per node.
    /// (Cloned, it shares what it heard.)
    #[derive(Debug, Default, Clone)]
    struct FakeController {
        token: Option<String>,
        interval_ms: u64,
        nodes: Arc<Mutex<HashMap<String, pb::StatusResponse>>>,
        heartbeats: Arc<AtomicU64>,
    }

    type Unimplemented<T> = Result<Response<T>, Status>;

    fn unimplemented<T>() -> Unimplemented<T> {
        Err(Status::unimplemented("fake controller"))
    }

    #[tonic::async_trait]
    impl ControllerService for FakeController {
        async fn heartbeat(
            &self,
            request: Request<pb::HeartbeatRequest>,
        ) -> Result<Response<pb::HeartbeatResponse>, Status> {
            if let Some(t) = &self.token {
                let ok = request
                    .metadata()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    == Some(format!("Bearer {t}").as_str());
                if !ok {
                    return Err(Status::unauthenticated("token"));
                }
            }
            let status = request
                .into_inner()
                .status
                .ok_or_else(|| Status::invalid_argument("no status"))?;
            self.heartbeats.fetch_add(1, Ordering::Relaxed);
            lock(&self.nodes).insert(status.node_id.clone(), status);
            Ok(Response::new(pb::HeartbeatResponse {
                interval_ms: self.interval_ms,
                ..Default::default()
            }))
        }
        type HeartbeatStreamStream =
            Pin<Box<dyn Stream<Item = Result<pb::HeartbeatResponse, Status>> + Send>>;
        /// Each beat as `heartbeat` takes it (the token checked once, at the start).
        async fn heartbeat_stream(
            &self,
            request: Request<tonic::Streaming<pb::HeartbeatRequest>>,
        ) -> Unimplemented<Self::HeartbeatStreamStream> {
            let metadata = request.metadata().clone();
            let mut incoming = request.into_inner();
            let (answers, queue) = mpsc::channel(1);
            let me = self.clone();
            tokio::spawn(async move {
                while let Ok(Some(beat)) = incoming.message().await {
                    let mut request = Request::new(beat);
                    *request.metadata_mut() = metadata.clone();
                    let answer = me.heartbeat(request).await.map(Response::into_inner);
                    if answers.send(answer).await.is_err() {
                        return;
                    }
                }
            });
            Ok(Response::new(Box::pin(ReceiverStream::new(queue))))
        }
        async fn list_nodes(
            &self,
            _: Request<pb::ListNodesRequest>,
        ) -> Unimplemented<pb::ListNodesResponse> {
            unimplemented()
        }
        async fn get_node(&self, _: Request<pb::GetNodeRequest>) -> Unimplemented<pb::Node> {
            unimplemented()
        }
        async fn get_node_history(
            &self,
            _: Request<pb::GetNodeHistoryRequest>,
        ) -> Unimplemented<pb::NodeHistory> {
            unimplemented()
        }
        async fn get_controllers(
            &self,
            _: Request<pb::GetControllersRequest>,
        ) -> Unimplemented<pb::ControllersResponse> {
            unimplemented()
        }
        async fn restart_node(
            &self,
            _: Request<pb::RestartNodeRequest>,
        ) -> Unimplemented<pb::RestartResponse> {
            unimplemented()
        }
        async fn shutdown_node(
            &self,
            _: Request<pb::ShutdownNodeRequest>,
        ) -> Unimplemented<pb::ShutdownResponse> {
            unimplemented()
        }
        async fn forget_node(&self, _: Request<pb::ForgetNodeRequest>) -> Unimplemented<pb::Node> {
            unimplemented()
        }
        async fn start_rollout(&self, _: Request<pb::RolloutSpec>) -> Unimplemented<pb::Rollout> {
            unimplemented()
        }
        async fn get_rollout(
            &self,
            _: Request<pb::GetRolloutRequest>,
        ) -> Unimplemented<pb::Rollout> {
            unimplemented()
        }
        async fn list_rollouts(
            &self,
            _: Request<pb::ListRolloutsRequest>,
        ) -> Unimplemented<pb::ListRolloutsResponse> {
            unimplemented()
        }
        type WatchRolloutStream = Pin<Box<dyn Stream<Item = Result<pb::Rollout, Status>> + Send>>;
        async fn watch_rollout(
            &self,
            _: Request<pb::GetRolloutRequest>,
        ) -> Unimplemented<Self::WatchRolloutStream> {
            unimplemented()
        }
        async fn pause_rollout(
            &self,
            _: Request<pb::RolloutActionRequest>,
        ) -> Unimplemented<pb::Rollout> {
            unimplemented()
        }
        async fn resume_rollout(
            &self,
            _: Request<pb::RolloutActionRequest>,
        ) -> Unimplemented<pb::Rollout> {
            unimplemented()
        }
        async fn abort_rollout(
            &self,
            _: Request<pb::RolloutActionRequest>,
        ) -> Unimplemented<pb::Rollout> {
            unimplemented()
        }
        async fn undo_rollout(
            &self,
            _: Request<pb::RolloutActionRequest>,
        ) -> Unimplemented<pb::Rollout> {
            unimplemented()
        }
        async fn create_token(
            &self,
            _: Request<pb::CreateTokenRequest>,
        ) -> Unimplemented<pb::CreateTokenResponse> {
            unimplemented()
        }
        async fn list_tokens(
            &self,
            _: Request<pb::ListTokensRequest>,
        ) -> Unimplemented<pb::ListTokensResponse> {
            unimplemented()
        }
        async fn revoke_token(
            &self,
            _: Request<pb::RevokeTokenRequest>,
        ) -> Unimplemented<pb::Token> {
            unimplemented()
        }
        async fn get_version(
            &self,
            _: Request<pb::GetVersionRequest>,
        ) -> Unimplemented<pb::VersionResponse> {
            unimplemented()
        }
    }

    async fn fake_controller(fake: Arc<FakeController>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(ControllerServiceServer::from_arc(fake))
                .serve_with_incoming(TcpIncoming::from(listener))
                .await;
        });
        format!("http://{addr}")
    }

    fn config(count: usize) -> HollowConfig {
        HollowConfig {
            count,
            heartbeat_jitter: Duration::from_millis(200),
            restart_latency: Duration::from_millis(20),
            restart_jitter: Duration::from_millis(5),
            ..HollowConfig::default()
        }
    }

    async fn agent_client(addr: SocketAddr) -> AgentServiceClient<Channel> {
        AgentServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_restart_is_reported_by_a_heartbeat_at_once_not_at_the_next_interval() {
        let fake = Arc::new(FakeController {
            interval_ms: 600_000,
            ..FakeController::default()
        });
        let url = fake_controller(fake.clone()).await;
        let fleet = HollowFleet::start(HollowConfig {
            controller: Some(url),
            ..config(2)
        })
        .await
        .unwrap();
        fleet
            .registered_within(Duration::from_secs(10))
            .await
            .unwrap();
        let (id, addr) = fleet.addrs()[0].clone();
        let r = agent_client(addr)
            .await
            .restart(pb::RestartRequest {
                exe: "/opt/app-v2".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.outcome, pb::Outcome::Succeeded as i32);
        // The interval is 10 minutes: only the beat a restart sends can bring it.
        let t0 = Instant::now();
        while lock(&fake.nodes)[&id].generation != 2 {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "no heartbeat after the restart"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(lock(&fake.nodes)["hollow-00001"].generation, 1);
        fleet.shutdown().await;
    }

    #[test]
    fn agents_spread_over_loopback_addresses_by_index() {
        let local: IpAddr = Ipv4Addr::LOCALHOST.into();
        assert_eq!(agent_ip(local, 0), local);
        assert_eq!(
            agent_ip(local, AGENTS_PER_ADDRESS - 1),
            local,
            "a whole block on one address"
        );
        assert_eq!(
            agent_ip(local, AGENTS_PER_ADDRESS),
            "127.0.0.2".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            agent_ip(local, 5 * AGENTS_PER_ADDRESS + 7),
            "127.0.0.6".parse::<IpAddr>().unwrap()
        );
        let other: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(agent_ip(other, 5 * AGENTS_PER_ADDRESS), other);
    }

    #[tokio::test]
    async fn registers_with_full_status_and_takes_the_interval() {
        let fake = Arc::new(FakeController {
            token: Some("s3cret".into()),
            interval_ms: 100,
            ..FakeController::default()
        });
        let url = fake_controller(fake.clone()).await;
        let fleet = HollowFleet::start(HollowConfig {
            controller: Some(url),
            token: Some("s3cret".into()),
            ..config(50)
        })
        .await
        .unwrap();
        fleet
            .registered_within(Duration::from_secs(10))
            .await
            .unwrap();
        let nodes = lock(&fake.nodes).clone();
        assert_eq!(nodes.len(), 50);
        let (id, addr) = fleet.addrs()[42].clone();
        assert_eq!(id, "hollow-00042");
        let s = &nodes["hollow-00042"];
        assert_eq!(s.state, "serving");
        assert_eq!(s.control_addr, addr.to_string());
        assert_eq!(s.admin_url, format!("http://{addr}/debug/admin"));
        assert_eq!(s.labels["sim"], "hollow");
        assert_eq!(s.labels["shard"], "2");
        let exe = s.exe.as_ref().unwrap();
        assert_eq!(exe.path, "/opt/app-v1");
        assert_eq!(exe.sha256, fake_sha256("/opt/app-v1"));
        assert_eq!(exe.sha256.len(), 64);
        assert_eq!(s.generation, 1);
        assert!(s.supervisor_pid > 1 << 22 && s.workers[0].pid > 1 << 22);
        // The controller asked for 100 ms: 3 more rounds of the 50 nodes come in about
        // 0.3 s. At the 1 s initial interval they would take 2.7 s at least (10 %
        // jitter), so 1.5 s tells the two apart with room for a busy machine.
        let before = fake.heartbeats.load(Ordering::Relaxed);
        let t0 = Instant::now();
        let bound = Duration::from_millis(1_500);
        loop {
            let after = fake.heartbeats.load(Ordering::Relaxed);
            if after - before >= 50 * 3 {
                break;
            }
            assert!(
                t0.elapsed() < bound,
                "only {} heartbeats in {bound:?} (3 rounds of 50 at 100 ms expected)",
                after - before
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let stats = fleet.stats();
        assert_eq!(stats.registered, 50);
        assert_eq!(stats.interval_ms, 100);
        assert_eq!(stats.heartbeats_failed, 0);
        fleet.shutdown().await;
    }

    #[tokio::test]
    async fn wrong_controller_token_never_registers() {
        let fake = Arc::new(FakeController {
            token: Some("right".into()),
            interval_ms: 100,
            ..FakeController::default()
        });
        let url = fake_controller(fake.clone()).await;
        let fleet = HollowFleet::start(HollowConfig {
            controller: Some(url),
            token: Some("wrong".into()),
            ..config(3)
        })
        .await
        .unwrap();
        let err = fleet
            .registered_within(Duration::from_millis(800))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("0 of 3"), "{err}");
        assert!(err.contains("Unauthenticated"), "{err}");
        fleet.shutdown().await;
    }

    #[tokio::test]
    async fn restart_preflight_status_and_watch() {
        let fleet = HollowFleet::start(config(3)).await.unwrap();
        let (_, addr) = fleet.addrs()[1].clone();
        let mut c = agent_client(addr).await;

        let pre = c
            .preflight(pb::PreflightRequest {
                exe: "/opt/app-v2".into(),
                sha256: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(pre.exe.unwrap().sha256, fake_sha256("/opt/app-v2"));
        let bad = c
            .preflight(pb::PreflightRequest {
                exe: "relative/app".into(),
                sha256: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(bad.code(), tonic::Code::InvalidArgument);
        let mismatch = c
            .preflight(pb::PreflightRequest {
                exe: "/opt/app-v2".into(),
                sha256: "00".repeat(32),
            })
            .await
            .unwrap_err();
        assert_eq!(mismatch.code(), tonic::Code::FailedPrecondition);

        let mut watch = c.watch(pb::WatchRequest {}).await.unwrap().into_inner();
        let snap = watch.next().await.unwrap().unwrap();
        assert_eq!(snap.phase, pb::Phase::Snapshot as i32);

        let before = c.status(pb::StatusRequest {}).await.unwrap().into_inner();
        let t0 = Instant::now();
        let r = c
            .restart(pb::RestartRequest {
                exe: "/opt/app-v2".into(),
                sha256: fake_sha256("/opt/app-v2"),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let took = t0.elapsed();
        assert_eq!(r.outcome, pb::Outcome::Succeeded as i32);
        assert_eq!(r.generation, 2);
        assert_eq!(r.old_pid, before.workers[0].pid);
        assert_ne!(r.new_pid, r.old_pid);
        assert!(took >= Duration::from_millis(15), "{took:?}");
        let after = c.status(pb::StatusRequest {}).await.unwrap().into_inner();
        assert_eq!(after.exe.unwrap().path, "/opt/app-v2");
        assert_eq!(after.generation, 2);
        assert_eq!(after.workers[0].pid, r.new_pid);
        assert_eq!(after.restarts_succeeded, 1);

        let mut phases = Vec::new();
        while phases.last() != Some(&(pb::Phase::Drained as i32)) {
            let e = tokio::time::timeout(Duration::from_secs(2), watch.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            phases.push(e.phase);
        }
        assert_eq!(
            phases,
            [
                pb::Phase::Validating,
                pb::Phase::Spawning,
                pb::Phase::WaitingReady,
                pb::Phase::Ready,
                pb::Phase::Draining,
                pb::Phase::Drained
            ]
            .map(|p| p as i32)
        );
        let records = fleet.restarts();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].node_id, "hollow-00001");
        assert!(records[0].succeeded && records[0].duration >= Duration::from_millis(15));
        fleet.shutdown().await;
    }

    #[tokio::test]
    async fn concurrent_restart_is_aborted_and_failures_are_simulated() {
        // The first restart lasts 1 s: the second request comes well inside it.
        let fleet = HollowFleet::start(HollowConfig {
            failure_rate: 1.0,
            restart_latency: Duration::from_secs(1),
            ..config(1)
        })
        .await
        .unwrap();
        let (_, addr) = fleet.addrs()[0].clone();
        let mut c1 = agent_client(addr).await;
        let mut c2 = c1.clone();
        let mut watch = c2.watch(pb::WatchRequest {}).await.unwrap().into_inner();
        let snap = watch.next().await.unwrap().unwrap();
        assert_eq!(snap.phase, pb::Phase::Snapshot as i32);
        let first = tokio::spawn(async move {
            c1.restart(pb::RestartRequest {
                exe: "/opt/app-v2".into(),
                ..Default::default()
            })
            .await
        });
        // The first restart is under way once its WAITING_READY event is out.
        loop {
            let e = tokio::time::timeout(Duration::from_secs(5), watch.next())
                .await
                .expect("an event of the first restart within 5 s")
                .unwrap()
                .unwrap();
            if e.phase == pb::Phase::WaitingReady as i32 {
                break;
            }
        }
        let busy = c2.restart(pb::RestartRequest::default()).await.unwrap_err();
        assert_eq!(busy.code(), tonic::Code::Aborted);
        let r = first.await.unwrap().unwrap().into_inner();
        assert_eq!(r.outcome, pb::Outcome::Failed as i32);
        assert!(r.reason.contains("simulated failure"), "{}", r.reason);
        assert_eq!(r.generation, 1);
        let s = c2.status(pb::StatusRequest {}).await.unwrap().into_inner();
        assert_eq!(s.exe.unwrap().path, "/opt/app-v1");
        assert_eq!(s.state, "serving");
        assert_eq!(s.restarts_failed, 1);
        assert!(!fleet.restarts()[0].succeeded);
        fleet.shutdown().await;
    }

    #[tokio::test]
    async fn refused_preflight_agent_token_and_shutdown() {
        let fake = Arc::new(FakeController {
            interval_ms: 60_000,
            ..FakeController::default()
        });
        let url = fake_controller(fake.clone()).await;
        let fleet = HollowFleet::start(HollowConfig {
            controller: Some(url),
            agent_token: Some("agent-token".into()),
            refuse_preflight_for: ["hollow-00001".to_string()].into(),
            ..config(2)
        })
        .await
        .unwrap();
        fleet
            .registered_within(Duration::from_secs(10))
            .await
            .unwrap();
        let addrs = fleet.addrs();
        let mut c0 = agent_client(addrs[0].1).await;
        let mut c1 = agent_client(addrs[1].1).await;
        let unauth = c0.status(pb::StatusRequest {}).await.unwrap_err();
        assert_eq!(unauth.code(), tonic::Code::Unauthenticated);
        fn with_token<T>(m: T) -> Request<T> {
            let mut r = Request::new(m);
            r.metadata_mut()
                .insert("authorization", "Bearer agent-token".parse().unwrap());
            r
        }
        let pre = pb::PreflightRequest {
            exe: "/opt/app-v2".into(),
            sha256: String::new(),
        };
        c0.preflight(with_token(pre.clone())).await.unwrap();
        let refused = c1.preflight(with_token(pre)).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
        assert!(
            refused.message().contains("refuse"),
            "{}",
            refused.message()
        );

        c0.shutdown(with_token(pb::ShutdownRequest {
            reason: "test".into(),
        }))
        .await
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let last = lock(&fake.nodes)["hollow-00000"].state.clone();
            if last == "shutting-down" {
                break;
            }
            assert!(Instant::now() < deadline, "no final heartbeat: {last}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The port closes.
        let deadline = Instant::now() + Duration::from_secs(5);
        while tokio::net::TcpStream::connect(addrs[0].1).await.is_ok() {
            assert!(Instant::now() < deadline, "port still open");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        fleet.shutdown().await;
    }

    #[test]
    fn report_lines_round_trip() {
        let stats = HollowStats {
            agents: 5000,
            registered: 4999,
            heartbeats_ok: 123,
            heartbeats_failed: 2,
            restarts_succeeded: 7,
            restarts_failed: 1,
            interval_ms: 10_000,
            last_heartbeat_error: Some("hollow-00001: Unavailable: down\nhard".into()),
        };
        let (at, back) = HollowStats::parse_line(&stats.to_line(42)).unwrap();
        assert_eq!(at, 42);
        assert_eq!(
            back,
            HollowStats {
                last_heartbeat_error: Some("hollow-00001: Unavailable: down hard".into()),
                ..stats.clone()
            }
        );
        let quiet = HollowStats {
            last_heartbeat_error: None,
            ..stats
        };
        assert_eq!(HollowStats::parse_line(&quiet.to_line(1)).unwrap().1, quiet);
        let record = RestartRecord {
            node_id: "hollow-00042".into(),
            started: Instant::now(),
            started_unix_us: 1_700_000_000_000_000,
            duration: Duration::from_micros(51_234),
            succeeded: true,
            exe: "/opt/app v2".into(),
            generation: 2,
        };
        let line = record.to_line();
        assert_eq!(
            line,
            "restart hollow-00042 1700000000000000 51234 ok 2 /opt/app v2"
        );
        assert_eq!(
            RestartLine::parse(&line).unwrap(),
            RestartLine::from(&record)
        );
        assert!(RestartLine::parse("restart x 1 2 maybe 3 /a").is_none());
    }

    #[test]
    fn rng_is_uniformish_and_bounded() {
        let rng = Rng(AtomicU64::new(1));
        let base = Duration::from_millis(50);
        let jitter = Duration::from_millis(10);
        let mut sum = 0.0;
        for _ in 0..10_000 {
            let d = rng.around(base, jitter);
            assert!(d >= Duration::from_millis(40) && d <= Duration::from_millis(60));
            sum += d.as_secs_f64();
        }
        let mean = sum / 10_000.0;
        assert!((mean - 0.050).abs() < 0.001, "{mean}");
        assert!(rng.around(Duration::ZERO, jitter) <= jitter);
    }
}
