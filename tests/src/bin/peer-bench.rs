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
//!    Printed per target: requests, failed requests by kind, p50/p99/max latency in
//!    steady state and inside reload windows, reload completion time; then the
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
use fleet_tests::bench::load::{self, LoadShape, Throughput};
use fleet_tests::bench::machine::{Machine, loadavg};
use fleet_tests::bench::peers::{
    Haproxy, Nginx, NginxMode, answers, become_subreaper, find_program, free_port, version,
};
use fleet_tests::bench::reload::{
    self, Exes, Plan, RAMP_UP, ReloadRun, Target, WINDOW_AFTER_READY,
};
use fleet_tests::bench::servers::{STARTUP_TIMEOUT, serving_worker, start_agent, start_hello_peer};
use fleet_tests::bench::stats::{
    LatencyStats, Verdict, fmt_bytes, fmt_ms, fmt_pct, fmt_ratio, json_ms, ms, percentile, ratio,
    stats_json, verdict,
};
use fleet_tests::footprint::{Mem, mem};
use serde_json::{Value, json};

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
}

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
    fleet_tests::bench::main("peer-bench", run(args))
}

// ---------------------------------------------------------------------------
// Finding the peers

const INSTALL_HINT: &str = "apt-get install nginx haproxy";

/// The peers' executables (None: missing) and what was said about them.
struct Peers {
    nginx: Option<PathBuf>,
    haproxy: Option<PathBuf>,
    notes: Vec<String>,
}

fn find_peers(args: &Args) -> Peers {
    let find = |given: &Option<PathBuf>, name| given.clone().or_else(|| find_program(name));
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
    for (name, path) in [("nginx", &nginx), ("haproxy", &haproxy)] {
        if path.is_none() {
            notes.push(format!(
                "{name} is MISSING (not on PATH, not in /usr/sbin): its targets are left out; \
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
        requests: args.requests,
    }
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

    /// The peer with the lowest p99 inside reload windows.
    fn best_peer(&self) -> Option<&ReloadRun> {
        self.peers()
            .filter(|r| r.split.window.p99.is_some())
            .min_by_key(|r| r.split.window.p99)
    }
}

/// The failure kinds of the load generator, as the table shows them.
const KINDS: [(&str, &[&str]); 5] = [
    ("refused", &["connect"]),
    ("reset", &["reset", "reused-conn-closed"]),
    ("timeout", &["timeout"]),
    ("non-2xx", &["status"]),
    ("other", &["other"]),
];

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
    let mut targets: Vec<(&'static str, SocketAddr)> =
        vec![("fleet", agent.http), ("hello-peer", hello_addr)];
    if let Some(n) = &nginx {
        targets.push(("nginx", n.addr));
    }
    if let Some(h) = &haproxy {
        targets.push(("haproxy", h.addr));
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
    let peers = find_peers(&args);
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
    for every in &args.reload_every {
        for percent in &args.keepalive_percent {
            let setting = Setting {
                every: *every,
                keepalive_percent: *percent,
                shape: shape_of(&args, *percent),
            };
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
                    every: *every,
                    warmup: args.warmup,
                };
                match reload::run(*target, &exes, &plan).await {
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
            verdicts.push(verdict(
                f.failed == 0 && f.requests > 0 && !f.reloads.is_empty() && errors.is_empty(),
                format!("fleet: no failed request ({s})"),
                format!(
                    "{} failed of {} requests; {} reloads, {} did not go through",
                    f.failed,
                    f.requests,
                    f.reloads.len(),
                    errors.len()
                ),
            ));
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

// ---------------------------------------------------------------------------
// Report

struct Report<'a> {
    args: &'a Args,
    machine: &'a Machine,
    versions: &'a [(&'a str, String)],
    notes: &'a [String],
    results: &'a [SettingResult],
    tp: Option<&'a ThroughputPart>,
    verdicts: &'a [Verdict],
    load: (Option<f64>, Option<f64>),
}

fn window_definition() -> String {
    format!(
        "reload window = from the trigger until the later of (new workers up + {} s) and (reload complete); \
         a request belongs to it by its start time; latency is of successful requests, leaving out the first {:?} (ramp-up)",
        WINDOW_AFTER_READY.as_secs(),
        RAMP_UP
    )
}

fn dist(v: &[Duration]) -> (Option<Duration>, Option<Duration>, Option<Duration>) {
    (percentile(v, 50.0), percentile(v, 90.0), v.last().copied())
}

impl Report<'_> {
    fn text(&self) -> String {
        let mut o = String::new();
        let mut line = |s: String| {
            o.push_str(&s);
            o.push('\n');
        };
        line(format!(
            "peer-bench: fleet-agent vs nginx and HAProxy, loopback, {} (shared by the load generator and the servers)",
            self.machine
        ));
        for (name, v) in self.versions {
            line(format!("  {name}: {v}"));
        }
        for note in self.notes {
            line(format!("  NOTE: {note}"));
        }
        let la = |l: Option<f64>| l.map_or("?".to_string(), |l| format!("{l:.2}"));
        line(format!(
            "machine 1-min load average: {} before, {} after",
            la(self.load.0),
            la(self.load.1)
        ));
        line(String::new());
        line("== Reloads under load ==".to_string());
        line(format!(
            "each target: {:?} of closed-loop GET / (after {:?} unmeasured); no reload in the first and last fifth; \
             in between one every R, never before the previous one has its new workers up",
            self.args.duration, self.args.warmup
        ));
        line(window_definition());
        for t in Target::ALL {
            line(format!("  {:<14} {}", t.name(), t.method()));
        }
        for r in self.results {
            line(String::new());
            line(format!("-- {} --", r.setting.describe()));
            for (t, why) in &r.skipped {
                line(format!("  {} left out: {why}", t.name()));
            }
            line(format!(
                "  {:<14} {:>7} {:>9} {:>8} {:>7} {:>7} {:>6} {:>7} {:>7} {:>6} {:>6}",
                "target",
                "reloads",
                "requests",
                "req/s",
                "failed",
                "refused",
                "reset",
                "timeout",
                "non-2xx",
                "other",
                "busy"
            ));
            for run in &r.runs {
                let mut row = format!(
                    "  {:<14} {:>7} {:>9} {:>8.0} {:>7}",
                    run.target.name(),
                    run.reloads.len(),
                    run.requests,
                    run.rps,
                    run.failed
                );
                for (i, (_, kinds)) in KINDS.iter().enumerate() {
                    let w = [7, 6, 7, 7, 6][i];
                    row.push_str(&format!(" {:>w$}", kind_count(run, kinds)));
                }
                row.push_str(&format!(" {:>6}", fmt_pct(run.foreign_cpu)));
                line(row);
            }
            line(format!(
                "  {:<14} {:>31} | {:>31} | {:>8}",
                "latency (ms)",
                "steady p50 / p99 / max",
                "in reload windows p50 / p99 / max",
                "windows"
            ));
            let l = |s: &LatencyStats| {
                let f =
                    |d: Option<Duration>| d.map_or("n/a".to_string(), |d| format!("{:.2}", ms(d)));
                format!("{:>9} {:>9} {:>9}", f(s.p50), f(s.p99), f(s.max))
            };
            for run in &r.runs {
                line(format!(
                    "  {:<14} {:>31} | {:>33} | {:>7.1}s",
                    run.target.name(),
                    l(&run.split.steady),
                    l(&run.split.window),
                    run.split.window_time.as_secs_f64()
                ));
            }
            line(format!(
                "  {:<14} {:>28} | {:>28} | {}",
                "reload (ms)",
                "trigger->up p50 / p90 / max",
                "trigger->complete p50 / p90 / max",
                "not through"
            ));
            for run in &r.runs {
                let f =
                    |d: Option<Duration>| d.map_or("n/a".to_string(), |d| format!("{:.1}", ms(d)));
                let (u, c) = (dist(&run.up()), dist(&run.completion()));
                line(format!(
                    "  {:<14} {:>9} {:>8} {:>9} | {:>10} {:>10} {:>10} | {}",
                    run.target.name(),
                    f(u.0),
                    f(u.1),
                    f(u.2),
                    f(c.0),
                    f(c.1),
                    f(c.2),
                    run.errors().len()
                ));
            }
            for run in &r.runs {
                for e in run.errors().iter().take(2) {
                    line(format!("  {} reload error: {e}", run.target.name()));
                }
                for (kind, ex) in &run.examples {
                    for m in ex.iter().take(1) {
                        line(format!("  {} failure [{kind}]: {m}", run.target.name()));
                    }
                }
            }
            if let Some(f) = r.fleet() {
                let peers: Vec<&ReloadRun> = r.peers().collect();
                if !peers.is_empty() {
                    let mut head = format!("  {:<34}", "ratio fleet / peer");
                    for p in &peers {
                        head.push_str(&format!(" {:>14}", p.target.name()));
                    }
                    line(head);
                    for (name, value) in ratio_rows() {
                        let mut row = format!("  {name:<34}");
                        for p in &peers {
                            row.push_str(&format!(" {:>14}", value(f, p)));
                        }
                        line(row);
                    }
                }
            }
        }
        if let Some(tp) = self.tp {
            line(String::new());
            line("== Throughput (no reloads), memory, start-up ==".to_string());
            line(format!(
                "{}; {} rounds of {:?}, alternating, best of each (runs during which other processes took > 5% of the CPUs are repeated)",
                tp.shape.describe(),
                self.args.rounds,
                self.args.throughput_duration
            ));
            let ran: Vec<&str> = TP_TARGETS
                .into_iter()
                .filter(|t| tp.tp.runs.iter().any(|r| r.target == *t))
                .collect();
            for t in &ran {
                line(format!(
                    "  {:<11} best {:>7.0} req/s  median {:>7.0}  (runs {}){}",
                    t,
                    tp.tp.best(t),
                    tp.tp.median(t),
                    tp.tp.spread(t),
                    if tp.tp.all_skewed(t) {
                        "  SKEWED: the machine was busy"
                    } else {
                        ""
                    }
                ));
            }
            for t in ran.iter().skip(1) {
                line(format!(
                    "  throughput fleet / {t}: {:.3} (medians: {:.3})",
                    tp.tp.best("fleet") / tp.tp.best(t),
                    tp.tp.median("fleet") / tp.tp.median(t)
                ));
            }
            line("  resident memory after the load:".to_string());
            for (what, pid, m) in &tp.memory {
                line(format!(
                    "    {what:<24} pid {pid:<7} RSS {}  (private {})",
                    fmt_bytes(m.map(|m| m.rss)),
                    fmt_bytes(m.map(|m| m.anon))
                ));
            }
            line(format!(
                "  start-up, median of {} (spawn -> first 2xx on GET /):",
                self.args.startup_runs
            ));
            for (t, v) in &tp.startup {
                if !v.is_empty() {
                    line(format!("    {t:<11} {}", fmt_ms(median(v))));
                }
            }
            line(format!(
                "    fleet-agent spawn -> READY=1 (sd_notify, what systemd waits for): {}",
                fmt_ms(median(&tp.fleet_ready))
            ));
        }
        line(String::new());
        line("== Verdicts ==".to_string());
        for v in self.verdicts {
            line(v.to_string());
        }
        o
    }

    fn json(&self) -> Value {
        let run_json = |run: &ReloadRun| {
            let (u, c) = (dist(&run.up()), dist(&run.completion()));
            json!({
                "target": run.target.name(),
                "method": run.target.method(),
                "reloads": run.reloads.len(),
                "reload_errors": run.errors(),
                "requests": run.requests,
                "ok": run.ok,
                "failed": run.failed,
                "failed_by_kind": KINDS.iter().map(|(n, k)| (n.to_string(), json!(kind_count(run, k)))).collect::<serde_json::Map<_, _>>(),
                "failed_in_windows": run.split.failed_in_window,
                "failure_examples": run.examples,
                "rps": run.rps.round(),
                "polite_reconnects": run.reconnects,
                "steady": stats_json(&run.split.steady),
                "window": stats_json(&run.split.window),
                "window_time_ms": run.split.window_time.as_millis() as u64,
                "trigger_to_up_ms": {"p50": json_ms(u.0), "p90": json_ms(u.1), "max": json_ms(u.2)},
                "trigger_to_complete_ms": {"p50": json_ms(c.0), "p90": json_ms(c.1), "max": json_ms(c.2)},
                "foreign_cpu": run.foreign_cpu,
            })
        };
        let settings: Vec<Value> = self
            .results
            .iter()
            .map(|r| {
                let ratios: Vec<Value> = match r.fleet() {
                    Some(f) => r
                        .peers()
                        .map(|p| {
                            let rows: serde_json::Map<_, _> = ratio_rows()
                                .into_iter()
                                .map(|(name, value)| (name.to_string(), json!(value(f, p))))
                                .collect();
                            json!({"peer": p.target.name(), "fleet_over_peer": rows})
                        })
                        .collect(),
                    None => Vec::new(),
                };
                json!({
                    "reload_every_ms": r.setting.every.as_millis() as u64,
                    "keepalive_percent": r.setting.keepalive_percent,
                    "keepalive": r.setting.shape.keepalive,
                    "fresh": r.setting.shape.fresh,
                    "targets": r.runs.iter().map(run_json).collect::<Vec<_>>(),
                    "left_out": r.skipped.iter().map(|(t, why)| json!({"target": t.name(), "why": why})).collect::<Vec<_>>(),
                    "ratios": ratios,
                })
            })
            .collect();
        let tp = self.tp.map(|tp| {
            json!({
                "keepalive": tp.shape.keepalive,
                "fresh": tp.shape.fresh,
                "runs": tp.tp.runs.iter().map(|r| json!({
                    "target": r.target, "round": r.round, "requests": r.requests, "ok": r.ok,
                    "failed": r.failed, "rps": r.rps.round(), "foreign_cpu": r.foreign_cpu, "skewed": r.skewed,
                })).collect::<Vec<_>>(),
                "best_rps": TP_TARGETS.iter().map(|t| (t.to_string(), json!(tp.tp.best(t).round()))).collect::<serde_json::Map<_, _>>(),
                "memory": tp.memory.iter().map(|(what, pid, m)| json!({
                    "process": what, "pid": pid, "rss_bytes": m.map(|m| m.rss),
                    "anon_bytes": m.map(|m| m.anon), "pss_bytes": m.and_then(|m| m.pss),
                })).collect::<Vec<_>>(),
                "startup_to_first_2xx_ms": tp.startup.iter().map(|(t, v)| (t.to_string(), json_ms(median(v)))).collect::<serde_json::Map<_, _>>(),
                "fleet_startup_to_ready_ms": json_ms(median(&tp.fleet_ready)),
            })
        });
        json!({
            "machine": self.machine.json(),
            "versions": self.versions.iter().map(|(n, v)| (n.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "notes": self.notes,
            "duration_ms": self.args.duration.as_millis() as u64,
            "window_definition": window_definition(),
            "settings": settings,
            "throughput": tp,
            "verdicts": self.verdicts.iter().map(Verdict::json).collect::<Vec<_>>(),
            "pass": self.verdicts.iter().all(|v| v.pass),
            "loadavg_1m": [self.load.0, self.load.1],
        })
    }
}

type RatioRow = (&'static str, fn(&ReloadRun, &ReloadRun) -> String);

/// The rows of the ratio table: Fleet's figure over the peer's.
fn ratio_rows() -> Vec<RatioRow> {
    fn lat(a: Option<Duration>, b: Option<Duration>) -> String {
        fmt_ratio(ratio(a.map(ms), b.map(ms)))
    }
    vec![
        ("failed requests (fleet vs peer)", |f, p| {
            format!("{} vs {}", f.failed, p.failed)
        }),
        ("p99 in reload windows", |f, p| {
            lat(f.split.window.p99, p.split.window.p99)
        }),
        ("p50 in reload windows", |f, p| {
            lat(f.split.window.p50, p.split.window.p50)
        }),
        ("max in reload windows", |f, p| {
            lat(f.split.window.max, p.split.window.max)
        }),
        ("p99 steady", |f, p| {
            lat(f.split.steady.p99, p.split.steady.p99)
        }),
        ("reload complete, median", |f, p| {
            lat(
                percentile(&f.completion(), 50.0),
                percentile(&p.completion(), 50.0),
            )
        }),
        ("req/s during the run", |f, p| {
            fmt_ratio(ratio(Some(f.rps), Some(p.rps)))
        }),
    ]
}
