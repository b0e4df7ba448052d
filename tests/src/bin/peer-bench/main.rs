//! `peer-bench`: Fleet against nginx and HAProxy, in the same run, on this machine.
//!
//! ```text
//! cargo build --release --workspace --bins && target/release/peer-bench
//! ```
//!
//! 1. Reloads under load: the same closed-loop load (`--connections`, split by
//!    `--keepalive-percent` into keep-alive and new-connection clients) against each
//!    target in turn while it reloads every `--reload-every`: fleet-agent's demo app
//!    (`SIGUSR1`), nginx (`nginx -s reload`), nginx binary upgrade (`USR2` + `QUIT`),
//!    HAProxy `-W` (`SIGUSR2`). Each setting of the cartesian product of
//!    `--reload-every` and `--keepalive-percent` is one round of every target.
//!    With `--load h2` (or `http1,h2`) the same runs go with an HTTP/2 load instead:
//!    `--h2-streams` connections × streams of the load generator's HTTP/2 mode
//!    (cleartext, prior knowledge; nginx `listen … http2`, HAProxy `bind … proto h2`
//!    on a second port of each peer; Fleet's port speaks both).
//!    Printed per target: requests, failed requests by kind, p50/p99/max latency in
//!    steady state and inside reload windows, reload completion time (and for
//!    HTTP/2 what the clients re-sent and reconnected, which is no failure); then the
//!    ratios Fleet/peer. Targets: no failed request for Fleet at any setting, and
//!    Fleet's p99 inside reload windows no worse than the best peer's.
//! 2. Throughput and footprint: the demo app through fleet-agent, `hello-peer` (bare
//!    axum), nginx and HAProxy, same load, alternating rounds (best of each), as
//!    ratios; the RSS of every process; start-up time (spawn → first 2xx, and for
//!    fleet-agent spawn → its `READY=1`).
//!
//! The peers are found on PATH or in /usr/sbin; a missing one is named with the
//! command that installs it and left out (`--install-peers` installs it when run as
//! root). Each runs from a temp dir of its own on a free loopback port and is killed
//! with its process group on exit. Exit status: 0 every target met, 1 a target
//! missed, 2 could not run, 130 interrupted.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use fleet_proto::v1::StatusRequest;
use fleet_tests::bench::OutputFormat;
use fleet_tests::bench::child::sibling_exe;
use fleet_tests::bench::load::{self, FOREIGN_CPU_WARN, LoadShape, Throughput};
use fleet_tests::bench::machine::{Machine, loadavg};
use fleet_tests::bench::peers::{
    Haproxy, Nginx, NginxMode, answers, become_subreaper, find_program, free_port, version,
};
use fleet_tests::bench::reload::{self, Discarded, Exes, Plan, ReloadRun, Target};
use fleet_tests::bench::servers::{STARTUP_TIMEOUT, serving_worker, start_agent, start_hello_peer};
use fleet_tests::bench::stats::{fmt_ms, fmt_pct, fmt_ratio, ms, percentile, ratio, verdict};
use fleet_tests::footprint::{Mem, mem};

#[derive(Debug, Parser)]
#[command(
    name = "peer-bench",
    about = "Restarts under load and throughput of fleet-agent against nginx and HAProxy, same run"
)]
struct Args {
    /// Length of each reload run (one per target and setting).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Interval between reloads; several (comma-separated) make several settings.
    #[arg(long, value_delimiter = ',', default_value = "500ms", value_parser = humantime::parse_duration)]
    reload_every: Vec<Duration>,
    /// Closed-loop clients.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Share of the clients that keep their connection alive (the others open a new
    /// connection per request); several (comma-separated) make several settings.
    #[arg(long, value_delimiter = ',', default_value = "50")]
    keepalive_percent: Vec<u8>,
    /// Which loads make settings (comma-separated): http1 (the `--connections` and
    /// `--keepalive-percent` clients), h2 (`--h2-streams` HTTP/2 streams).
    #[arg(long, value_delimiter = ',', default_value = "http1", value_parser = ["http1", "h2"])]
    load: Vec<String>,
    /// The HTTP/2 load: CONNECTIONSxSTREAMS, closed-loop streams on each connection.
    #[arg(long, default_value = "8x16", value_parser = parse_streams)]
    h2_streams: (usize, usize),
    /// Upper bound on requests per load run.
    #[arg(long, default_value_t = 20_000_000)]
    requests: u64,
    /// Which reload targets to run (comma-separated): fleet, nginx-reload,
    /// nginx-upgrade, haproxy.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "fleet,nginx-reload,nginx-upgrade,haproxy"
    )]
    targets: Vec<String>,
    /// How often a reload run is repeated when other processes took more than 5% of
    /// the CPUs during it (the least disturbed run counts).
    #[arg(long, default_value_t = 2)]
    busy_repeats: u32,
    /// Unmeasured load before each run.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Length of each throughput run.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    throughput_duration: Duration,
    /// Throughput rounds per server (alternating); the best of each counts.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=10))]
    rounds: u32,
    /// Start-ups measured per server (the median is reported).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    startup_runs: u32,
    /// Skip the throughput, footprint and start-up part.
    #[arg(long)]
    skip_throughput: bool,
    /// Install missing peers with apt-get (needs root).
    #[arg(long)]
    install_peers: bool,
    /// fleet-agent executable (default: next to this executable).
    #[arg(long)]
    agent_exe: Option<PathBuf>,
    /// hello-peer executable (default: next to this executable).
    #[arg(long)]
    hello_exe: Option<PathBuf>,
    /// nginx executable (default: found on PATH or in /usr/sbin).
    #[arg(long)]
    nginx: Option<PathBuf>,
    /// haproxy executable (default: found on PATH or in /usr/sbin).
    #[arg(long)]
    haproxy: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Text)]
    output: OutputFormat,
    /// CPUs the servers run on (a `taskset -c` list: `1`, `2-15`, `0,2`), with
    /// `--client-cpus`: the load generator and the servers each get their own CPUs
    /// instead of sharing all of them. Needs util-linux's `taskset`.
    #[arg(long, requires = "client_cpus")]
    server_cpus: Option<String>,
    /// CPUs the load generator (this process) runs on; see `--server-cpus`.
    #[arg(long, requires = "server_cpus")]
    client_cpus: Option<String>,
    /// A flag for every fleet-agent started (repeatable), e.g.
    /// `--agent-arg=--sockets-per-port=0` for a listening socket per CPU.
    #[arg(long = "agent-arg", value_name = "FLAG", allow_hyphen_values = true)]
    agent_args: Vec<String>,
}

/// A `taskset -c` style list (`0`, `1-3`, `0,2-3`) as CPU numbers, each below `cpus`.
fn parse_cpu_list(list: &str, cpus: usize) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for part in list.split(',') {
        let (lo, hi) = match part.split_once('-') {
            Some((lo, hi)) => (lo.trim(), hi.trim()),
            None => (part.trim(), part.trim()),
        };
        let (Ok(lo), Ok(hi)) = (lo.parse::<usize>(), hi.parse::<usize>()) else {
            return Err(format!("{list:?}: give CPU numbers like 1, 2-15 or 0,2"));
        };
        if lo > hi || hi >= cpus {
            return Err(format!(
                "{list:?}: this machine's CPUs are 0 to {}",
                cpus.saturating_sub(1)
            ));
        }
        out.extend(lo..=hi);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Pins this process (the load generator: every thread started from now on) to
/// `client` and the servers it will start to `server`.
fn pin(server: &str, client: &str) -> Result<String, String> {
    let cpus = nix::unistd::sysconf(nix::unistd::SysconfVar::_NPROCESSORS_ONLN)
        .ok()
        .flatten()
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(1);
    let servers = parse_cpu_list(server, cpus).map_err(|e| format!("--server-cpus {e}"))?;
    let clients = parse_cpu_list(client, cpus).map_err(|e| format!("--client-cpus {e}"))?;
    if let Some(both) = servers.iter().find(|c| clients.contains(c)) {
        return Err(format!(
            "CPU {both} is in both --server-cpus and --client-cpus: give each its own"
        ));
    }
    if !fleet_tests::bench::peers::find_program("taskset").is_some_and(|p| p.is_file()) {
        return Err("--server-cpus needs taskset (apt-get install util-linux)".into());
    }
    let mut set = nix::sched::CpuSet::new();
    for &c in &clients {
        set.set(c)
            .map_err(|e| format!("--client-cpus: CPU {c}: {e}"))?;
    }
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
        .map_err(|e| format!("cannot pin the load generator to CPUs {client}: {e}"))?;
    fleet_tests::bench::child::pin_servers(server);
    Ok(format!(
        "servers pinned to CPUs {server} ({} of them), the load generator to CPUs {client} ({}) with taskset",
        servers.len(),
        clients.len()
    ))
}

mod report;

use report::Report;

fn main() -> ExitCode {
    let args = Args::parse();
    let bad = |msg: &str| {
        eprintln!("peer-bench: {msg}");
        ExitCode::from(2)
    };
    if args.duration.is_zero() || args.reload_every.iter().any(Duration::is_zero) {
        return bad("--duration and --reload-every must be > 0");
    }
    if args.connections == 0 {
        return bad("--connections must be > 0");
    }
    if args.keepalive_percent.iter().any(|p| *p > 100) {
        return bad("--keepalive-percent must be 0..=100");
    }
    if let Some(t) = args.targets.iter().find(|t| Target::parse(t).is_none()) {
        return bad(&format!(
            "unknown target {t:?}: use fleet, nginx-reload, nginx-upgrade, haproxy"
        ));
    }
    if let (Some(server), Some(client)) = (&args.server_cpus, &args.client_cpus) {
        // Before the runtime starts, so that each of its threads inherits it.
        match pin(server, client) {
            Ok(said) => eprintln!("peer-bench: {said}"),
            Err(e) => return bad(&e),
        }
    }
    fleet_tests::bench::main("peer-bench", run(args))
}

// ---------------------------------------------------------------------------
// Finding the peers

const INSTALL_HINT: &str = "apt-get install nginx haproxy";

/// No request inside a reload window may take this long (a stalled handoff shows
/// here even when nothing fails).
const TARGET_WINDOW_MAX: Duration = Duration::from_secs(1);

/// The peers' executables (None: missing) and what was said about them.
struct Peers {
    nginx: Option<PathBuf>,
    haproxy: Option<PathBuf>,
    notes: Vec<String>,
}

fn find_peers(args: &Args) -> Peers {
    // A path given on the command line is used as it is (missing if it is no file).
    let find = |given: &Option<PathBuf>, name| match given {
        Some(p) => Some(p.clone()).filter(|p| p.is_file()),
        None => find_program(name),
    };
    let (mut nginx, mut haproxy) = (find(&args.nginx, "nginx"), find(&args.haproxy, "haproxy"));
    let mut notes = Vec::new();
    let missing: Vec<&str> = [("nginx", &nginx), ("haproxy", &haproxy)]
        .into_iter()
        .filter(|(_, p)| p.is_none())
        .map(|(n, _)| n)
        .collect();
    if !missing.is_empty() && args.install_peers {
        if nix::unistd::geteuid().is_root() {
            eprintln!("peer-bench: installing {} with apt-get", missing.join(" "));
            let ok = std::process::Command::new("apt-get")
                .args(["update", "-qq"])
                .status()
                .is_ok_and(|s| s.success())
                && std::process::Command::new("apt-get")
                    .args(["install", "-y", "-qq"])
                    .args(&missing)
                    .status()
                    .is_ok_and(|s| s.success());
            if !ok {
                notes.push(format!("apt-get install {} failed", missing.join(" ")));
            }
            nginx = find(&args.nginx, "nginx");
            haproxy = find(&args.haproxy, "haproxy");
        } else {
            notes.push("--install-peers needs root; not installing".into());
        }
    }
    for (name, path, given) in [
        ("nginx", &nginx, &args.nginx),
        ("haproxy", &haproxy, &args.haproxy),
    ] {
        if path.is_none() {
            let looked = match given {
                Some(p) => format!("--{name} {} is not a file", p.display()),
                None => "not on PATH, not in /usr/sbin".into(),
            };
            notes.push(format!(
                "{name} is MISSING ({looked}): its targets are left out; \
                 install it with `{INSTALL_HINT}` (or run peer-bench as root with --install-peers)"
            ));
        }
    }
    Peers {
        nginx,
        haproxy,
        notes,
    }
}

fn needs(target: Target, peers: &Peers) -> Option<&'static str> {
    match target {
        Target::Fleet => None,
        Target::NginxReload | Target::NginxUpgrade => peers.nginx.is_none().then_some("nginx"),
        Target::Haproxy => peers.haproxy.is_none().then_some("haproxy"),
    }
}

// ---------------------------------------------------------------------------
// Reloads under load

/// One setting: a reload interval and a client mix.
#[derive(Debug, Clone, Copy)]
struct Setting {
    every: Duration,
    keepalive_percent: u8,
    shape: LoadShape,
}

impl Setting {
    fn describe(&self) -> String {
        if self.shape.is_h2() {
            return format!(
                "reload every {}, HTTP/2 (h2c): {} connections x {} streams",
                humantime::format_duration(self.every),
                self.shape.h2_connections,
                self.shape.h2_streams
            );
        }
        format!(
            "reload every {}, {} connections ({} keep-alive + {} new-connection)",
            humantime::format_duration(self.every),
            self.shape.keepalive + self.shape.fresh,
            self.shape.keepalive,
            self.shape.fresh
        )
    }
}

fn shape_of(args: &Args, keepalive_percent: u8) -> LoadShape {
    let keepalive = (args.connections * usize::from(keepalive_percent) + 50) / 100;
    LoadShape {
        keepalive,
        fresh: args.connections - keepalive,
        h2_connections: 0,
        h2_streams: 0,
        requests: args.requests,
    }
}

fn h2_shape(args: &Args) -> LoadShape {
    LoadShape {
        keepalive: 0,
        fresh: 0,
        h2_connections: args.h2_streams.0,
        h2_streams: args.h2_streams.1,
        requests: args.requests,
    }
}

/// "8x16" → (8, 16), both > 0.
fn parse_streams(s: &str) -> Result<(usize, usize), String> {
    let parse = |n: &str| n.trim().parse::<usize>().ok().filter(|n| *n > 0);
    s.split_once(['x', 'X'])
        .and_then(|(c, m)| Some((parse(c)?, parse(m)?)))
        .ok_or_else(|| format!("{s:?} is not CONNECTIONSxSTREAMS, e.g. 8x16"))
}

/// The results of one setting: a run per target (or why it could not run).
struct SettingResult {
    setting: Setting,
    runs: Vec<ReloadRun>,
    skipped: Vec<(Target, String)>,
}

impl SettingResult {
    fn fleet(&self) -> Option<&ReloadRun> {
        self.runs.iter().find(|r| r.target == Target::Fleet)
    }

    fn peers(&self) -> impl Iterator<Item = &ReloadRun> {
        self.runs.iter().filter(|r| r.target != Target::Fleet)
    }

    /// The peer with the lowest p99 inside reload windows, among those whose every
    /// reload went through (a peer that skipped reloads spent less time reloading,
    /// and its windows are not comparable).
    fn best_peer(&self) -> Option<&ReloadRun> {
        self.peers()
            .filter(|r| r.split.window.p99.is_some() && r.errors().is_empty())
            .min_by_key(|r| r.split.window.p99)
    }

    /// The peer with the lowest maximum latency inside reload windows, among the same.
    fn lowest_window_max_peer(&self) -> Option<&ReloadRun> {
        self.peers()
            .filter(|r| r.split.window.max.is_some() && r.errors().is_empty())
            .min_by_key(|r| r.split.window.max)
    }
}

/// The failure kinds of the load generator, as the table shows them: "stream
/// reset" is an HTTP/2 stream the server reset (or ended by GOAWAY) once it was
/// processing it; "unsent" a request the server did not process that could not be
/// sent again in its attempts (HTTP/2 refused, above GOAWAY's last stream id, not
/// sent; HTTP/1.1 closed before the write).
const KINDS: [(&str, &[&str]); 7] = [
    ("refused", &["connect", "tls"]),
    ("reset", &["reset", "reused-conn-closed"]),
    ("stream reset", &["stream-reset"]),
    (
        "unsent",
        &[
            "refused-stream",
            "above-goaway",
            "not-sent",
            "closed-before-write",
        ],
    ),
    ("timeout", &["timeout"]),
    ("non-2xx", &["status"]),
    ("other", &["other"]),
];

/// Runs `target`; a run during which other processes took more than
/// FOREIGN_CPU_WARN of the CPUs is repeated (at most `repeats` times) and the least
/// disturbed run is kept for the figures. The runs left out keep counting for their
/// failed requests (`ReloadRun::discarded`): a quieter repeat never hides a failure.
async fn run_settled(
    target: Target,
    exes: &Exes,
    plan: &Plan,
    repeats: u32,
) -> anyhow::Result<ReloadRun> {
    let busy = |r: &ReloadRun| r.foreign_cpu.unwrap_or(0.0);
    let mut best = reload::run(target, exes, plan).await?;
    let mut discarded = Vec::new();
    for _ in 0..repeats {
        if busy(&best) <= FOREIGN_CPU_WARN {
            break;
        }
        eprintln!(
            "peer-bench: other processes took {} of the CPUs during that run; repeating it",
            fmt_pct(best.foreign_cpu)
        );
        let again = reload::run(target, exes, plan).await?;
        if busy(&again) < busy(&best) {
            discarded.push(Discarded::of(&best));
            best = again;
        } else {
            discarded.push(Discarded::of(&again));
        }
    }
    best.discarded = discarded;
    Ok(best)
}

fn kind_count(run: &ReloadRun, kinds: &[&str]) -> u64 {
    kinds
        .iter()
        .map(|k| run.split.failures.get(k).copied().unwrap_or(0))
        .sum()
}

// ---------------------------------------------------------------------------
// Throughput, footprint, start-up

const TP_TARGETS: [&str; 4] = ["fleet", "hello-peer", "nginx", "haproxy"];

struct ThroughputPart {
    shape: LoadShape,
    tp: Throughput,
    /// (process, its pid, its memory) of every server process.
    memory: Vec<(String, u32, Option<Mem>)>,
    /// Server → spawn-to-first-2xx of each start-up.
    startup: Vec<(&'static str, Vec<Duration>)>,
    /// fleet-agent spawn → READY=1 of each start-up.
    fleet_ready: Vec<Duration>,
}

async fn throughput_part(
    args: &Args,
    exes: &Exes,
    hello: &std::path::Path,
) -> anyhow::Result<ThroughputPart> {
    let shape = shape_of(args, args.keepalive_percent[0]);
    let agent = start_agent(&exes.agent, "127.0.0.1:0", &[]).await?;
    let (hello_proc, hello_addr) = start_hello_peer(hello, "127.0.0.1:0").await?;
    // A peer that does not start is left out of this part (and said so).
    let nginx = match &exes.nginx {
        Some(exe) => Nginx::start(exe, NginxMode::Foreground)
            .await
            .map_err(|e| eprintln!("peer-bench: nginx left out of the throughput part: {e:#}"))
            .ok(),
        None => None,
    };
    let haproxy = match &exes.haproxy {
        Some(exe) => Haproxy::start(exe)
            .await
            .map_err(|e| eprintln!("peer-bench: haproxy left out of the throughput part: {e:#}"))
            .ok(),
        None => None,
    };
    // Each server's CPU is read from its root processes and their children: the
    // supervisor and its worker, nginx's master and workers, HAProxy's master and worker.
    let mut targets: Vec<load::ThroughputTarget> = vec![
        ("fleet", agent.http, vec![agent.proc.pid()]),
        ("hello-peer", hello_addr, vec![hello_proc.pid()]),
    ];
    if let Some(n) = &nginx {
        targets.push(("nginx", n.addr, n.master().into_iter().collect()));
    }
    if let Some(h) = &haproxy {
        targets.push(("haproxy", h.addr, vec![h.master()]));
    }
    let tp = load::throughput(
        &shape,
        &targets,
        args.rounds,
        args.throughput_duration,
        args.warmup,
    )
    .await?;

    // Memory after the load, every process still running.
    let mut memory = vec![(
        "fleet-agent supervisor".to_string(),
        agent.proc.pid(),
        mem(agent.proc.pid()),
    )];
    let status = agent
        .grpc()
        .await?
        .status(StatusRequest {})
        .await?
        .into_inner();
    if let Some((worker, _)) = serving_worker(&status) {
        memory.push(("fleet-agent worker".into(), worker, mem(worker)));
    }
    memory.push(("hello-peer".into(), hello_proc.pid(), mem(hello_proc.pid())));
    let mut add = |what: &str, pids: Vec<u32>| {
        for (i, pid) in pids.into_iter().enumerate() {
            let role = if i == 0 { "master" } else { "worker" };
            memory.push((format!("{what} {role}"), pid, mem(pid)));
        }
    };
    if let Some(n) = &nginx {
        add("nginx", n.processes());
    }
    if let Some(h) = &haproxy {
        add("haproxy", h.processes());
    }
    let (nginx_ran, haproxy_ran) = (nginx.is_some(), haproxy.is_some());
    drop((agent, hello_proc, nginx, haproxy));

    let mut startup: Vec<(&'static str, Vec<Duration>)> =
        TP_TARGETS.iter().map(|t| (*t, Vec::new())).collect();
    let mut fleet_ready = Vec::new();
    for i in 1..=args.startup_runs {
        eprintln!("peer-bench: start-up {i}/{}", args.startup_runs);
        let (ready, up) = fleet_startup(&exes.agent).await?;
        fleet_ready.push(ready);
        startup[0].1.push(up);
        startup[1].1.push(hello_startup(hello).await?);
        if let Some(exe) = exes.nginx.as_ref().filter(|_| nginx_ran) {
            startup[2]
                .1
                .push(Nginx::start(exe, NginxMode::Foreground).await?.startup);
        }
        if let Some(exe) = exes.haproxy.as_ref().filter(|_| haproxy_ran) {
            startup[3].1.push(Haproxy::start(exe).await?.startup);
        }
    }
    Ok(ThroughputPart {
        shape,
        tp,
        memory,
        startup,
        fleet_ready,
    })
}

/// Polls `GET /` on `addr` every millisecond; the time since `t0` of the first 2xx.
async fn first_ok(addr: SocketAddr, t0: Instant) -> Option<Duration> {
    let deadline = t0 + STARTUP_TIMEOUT;
    while Instant::now() < deadline {
        if answers(addr).await {
            return Some(t0.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    None
}

/// fleet-agent on a port picked beforehand: spawn → READY=1 (sd_notify, as systemd
/// sees it) and spawn → first 2xx.
async fn fleet_startup(exe: &std::path::Path) -> anyhow::Result<(Duration, Duration)> {
    let dir = tempfile::Builder::new()
        .prefix("peer-bench-notify-")
        .tempdir()?;
    let path = dir.path().join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&path).context("bind the notify socket")?;
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let t0 = Instant::now();
    let ready = async {
        let mut buf = [0u8; 512];
        loop {
            let n = socket.recv(&mut buf).await?;
            if String::from_utf8_lossy(&buf[..n])
                .lines()
                .any(|l| l == "READY=1")
            {
                return anyhow::Ok(t0.elapsed());
            }
        }
    };
    let env: [(&str, OsString); 1] = [("NOTIFY_SOCKET", path.clone().into())];
    let listen = addr.to_string();
    let (agent, ready, up) = tokio::join!(
        start_agent(exe, &listen, &env),
        tokio::time::timeout(STARTUP_TIMEOUT, ready),
        first_ok(addr, t0)
    );
    let _agent = agent?;
    let ready = ready.context("no READY=1 from fleet-agent")??;
    let up = up.context("fleet-agent never answered")?;
    Ok((ready, up))
}

async fn hello_startup(exe: &std::path::Path) -> anyhow::Result<Duration> {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let t0 = Instant::now();
    let listen = addr.to_string();
    let (peer, up) = tokio::join!(start_hello_peer(exe, &listen), first_ok(addr, t0));
    let _peer = peer?;
    up.context("hello-peer never answered")
}

fn median(v: &[Duration]) -> Option<Duration> {
    let mut v = v.to_vec();
    v.sort_unstable();
    percentile(&v, 50.0)
}

// ---------------------------------------------------------------------------
// The run

async fn run(args: Args) -> anyhow::Result<bool> {
    let machine = Machine::describe();
    let load_before = loadavg();
    let agent = match &args.agent_exe {
        Some(p) => p.clone(),
        None => sibling_exe("fleet-agent")?,
    };
    let hello = match &args.hello_exe {
        Some(p) => p.clone(),
        None => sibling_exe("hello-peer")?,
    };
    let mut peers = find_peers(&args);
    if let (Some(server), Some(client)) = (&args.server_cpus, &args.client_cpus) {
        peers.notes.push(format!(
            "servers pinned to CPUs {server}, the load generator to CPUs {client} (taskset)"
        ));
    }
    if !args.agent_args.is_empty() {
        peers.notes.push(format!(
            "fleet-agent ran with {}",
            args.agent_args.join(" ")
        ));
    }
    fleet_tests::bench::servers::add_agent_args(args.agent_args.clone());
    for note in &peers.notes {
        eprintln!("peer-bench: {note}");
    }
    let versions: Vec<(&str, String)> = [
        ("nginx", peers.nginx.as_ref().map(|p| version(p, "-v"))),
        ("haproxy", peers.haproxy.as_ref().map(|p| version(p, "-v"))),
    ]
    .into_iter()
    .filter_map(|(n, v)| Some((n, v?)))
    .collect();
    let targets: Vec<Target> = args
        .targets
        .iter()
        .filter_map(|t| Target::parse(t))
        .collect();
    let mut skipped: Vec<(Target, String)> = Vec::new();
    let runnable: Vec<Target> = targets
        .iter()
        .copied()
        .filter(|t| match needs(*t, &peers) {
            Some(missing) => {
                skipped.push((*t, format!("{missing} is missing: `{INSTALL_HINT}`")));
                false
            }
            None => true,
        })
        .collect();
    if runnable.contains(&Target::NginxUpgrade)
        && let Err(e) = become_subreaper()
    {
        eprintln!("peer-bench: {e:#}: old nginx masters will stay zombies until the bench exits");
    }
    let exes = Exes {
        agent,
        nginx: peers.nginx.clone(),
        haproxy: peers.haproxy.clone(),
    };

    let mut results = Vec::new();
    let mut settings = Vec::new();
    for every in &args.reload_every {
        for load in &args.load {
            if load == "h2" {
                settings.push(Setting {
                    every: *every,
                    keepalive_percent: 0,
                    shape: h2_shape(&args),
                });
                continue;
            }
            for percent in &args.keepalive_percent {
                settings.push(Setting {
                    every: *every,
                    keepalive_percent: *percent,
                    shape: shape_of(&args, *percent),
                });
            }
        }
    }
    for setting in settings {
        let mut result = SettingResult {
            setting,
            runs: Vec::new(),
            skipped: skipped.clone(),
        };
        for target in &runnable {
            eprintln!(
                "peer-bench: {} under load, {} ({:?})",
                target.name(),
                setting.describe(),
                args.duration
            );
            let plan = Plan {
                shape: setting.shape,
                duration: args.duration,
                every: setting.every,
                warmup: args.warmup,
            };
            match run_settled(*target, &exes, &plan, args.busy_repeats).await {
                Ok(run) => result.runs.push(run),
                Err(e) if *target == Target::Fleet => {
                    return Err(e.context("fleet-agent could not be benchmarked"));
                }
                Err(e) => {
                    eprintln!("peer-bench: {} could not run: {e:#}", target.name());
                    result
                        .skipped
                        .push((*target, format!("could not run: {e:#}")));
                }
            }
        }
        results.push(result);
    }

    let tp = if args.skip_throughput {
        None
    } else {
        Some(throughput_part(&args, &exes, &hello).await?)
    };
    let load_after = loadavg();

    // ---- verdicts
    let mut verdicts = Vec::new();
    let peers_requested = targets.iter().any(|t| *t != Target::Fleet);
    let mut no_peer_ran = false;
    for r in &results {
        let s = r.setting.describe();
        if let Some(f) = r.fleet() {
            let errors = f.errors();
            let failed = f.failed_with_discarded();
            let not_completed = f.not_completed();
            verdicts.push(verdict(
                failed == 0
                    && f.requests > 0
                    && !f.reloads.is_empty()
                    && errors.is_empty()
                    && not_completed == 0,
                format!("fleet: no failed request, every reload complete ({s})"),
                format!(
                    "{} failed of {} requests ({} of them in {} repeated runs); {} reloads, {} did not go through, {} left an old worker running",
                    failed,
                    f.requests + f.discarded.iter().map(|d| d.requests).sum::<u64>(),
                    failed - f.failed,
                    f.discarded.len(),
                    f.reloads.len(),
                    errors.len(),
                    not_completed
                ),
            ));
            verdicts.push(verdict(
                f.split.window.max.is_some_and(|m| m < TARGET_WINDOW_MAX),
                format!(
                    "fleet: max latency in reload windows < {} ms ({s})",
                    TARGET_WINDOW_MAX.as_millis()
                ),
                format!(
                    "{} (p99.9 {})",
                    fmt_ms(f.split.window.max),
                    fmt_ms(f.split.window.p999)
                ),
            ));
            let (window_max, steady_max) = (f.split.window.max, f.split.steady.max);
            verdicts.push(verdict(
                window_max.is_some()
                    && steady_max.is_some()
                    && window_max <= steady_max.map(|m| m * 2),
                format!("fleet: max latency in reload windows <= 2x the steady max ({s})"),
                format!(
                    "{} vs steady {} (ratio {})",
                    fmt_ms(window_max),
                    fmt_ms(steady_max),
                    fmt_ratio(ratio(window_max.map(ms), steady_max.map(ms)))
                ),
            ));
            if let Some(peer) = r.lowest_window_max_peer() {
                let peer_max = peer.split.window.max;
                verdicts.push(verdict(
                    window_max.is_some() && window_max <= peer_max,
                    format!("fleet: max latency in reload windows <= best peer's ({s})"),
                    format!(
                        "fleet {} vs {} {} (ratio {})",
                        fmt_ms(window_max),
                        peer.target.name(),
                        fmt_ms(peer_max),
                        fmt_ratio(ratio(window_max.map(ms), peer_max.map(ms)))
                    ),
                ));
            }
            match r.best_peer() {
                Some(best) => {
                    let (fp, bp) = (f.split.window.p99, best.split.window.p99);
                    verdicts.push(verdict(
                        fp.is_some() && fp <= bp,
                        format!("fleet: p99 in reload windows <= best peer's ({s})"),
                        format!(
                            "fleet {} vs {} {} (ratio {})",
                            fmt_ms(fp),
                            best.target.name(),
                            fmt_ms(bp),
                            fmt_ratio(ratio(fp.map(ms), bp.map(ms)))
                        ),
                    ));
                }
                None if peers_requested => no_peer_ran = true,
                None => {}
            }
        }
    }
    let all_pass = verdicts.iter().all(|v| v.pass);

    let report = Report {
        args: &args,
        machine: &machine,
        versions: &versions,
        notes: &peers.notes,
        results: &results,
        tp: tp.as_ref(),
        verdicts: &verdicts,
        load: (load_before, load_after),
    };
    match args.output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&report.json())?),
        OutputFormat::Text => print!("{}", report.text()),
    }
    if no_peer_ran {
        bail!(
            "no peer could run, so Fleet could not be compared: install them with `{INSTALL_HINT}`"
        );
    }
    Ok(all_pass)
}

#[cfg(test)]
mod pin_tests {
    use super::parse_cpu_list;

    #[test]
    fn cpu_lists_read_as_taskset_reads_them() {
        assert_eq!(parse_cpu_list("1", 2), Ok(vec![1]));
        assert_eq!(parse_cpu_list("0,2-3,2", 16), Ok(vec![0, 2, 3]));
        for bad in ["2", "1-0", "x", "", "0-"] {
            let e = parse_cpu_list(bad, 2).unwrap_err();
            assert!(e.starts_with(&format!("{bad:?}")), "{bad}: {e}");
        }
    }
}
