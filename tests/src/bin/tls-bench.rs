//! `tls-bench`: what mutual TLS costs the controller against plain HTTP/2, measured in
//! one run on one machine with one build.
//!
//! ```text
//! cargo build --release --workspace --bins && target/release/tls-bench
//! ```
//!
//! For each mode it starts `fleet-controller` (next to its own executable) on a free
//! loopback port with a bootstrap token — plain, then with `--tls` — and measures:
//!
//! 1. **Registration** of `--agents` simulated agents (`fleet_tests::bench::sim_agents`),
//!    `--concurrency` at a time, each on a connection of its own that stays open.
//!    Plain: connect + first `Heartbeat` with the bootstrap token. TLS: `Join` (a CSR,
//!    on a connection without a client certificate that trusts only the pinned CA) +
//!    a new connection with the certificate + first `Heartbeat`. The keys and CSRs are
//!    made before the clock starts and timed apart. Wall time until all are
//!    registered, per-agent latency, and the controller's CPU per agent.
//! 2. **Heartbeats**: `--connections` of those agents, one connection each (as real
//!    agents), send heartbeats back to back for `--duration`: beats per second and the
//!    controller's CPU per beat.
//! 3. **Rollouts**: `--rollout-nodes` real `fleet-agent`s (the demo app) per mode —
//!    with the bootstrap token, or joined over mutual TLS — and rollouts one node at a
//!    time, no soak, between two copies of fleet-agent, alternating modes (each first
//!    every other round). The first two per mode are *cold* (each agent hashes the new
//!    executable in preflight, and in the first the controller opens its connections
//!    to the agents: a TLS handshake per node with `--tls`); then `--repeats` *warm*
//!    ones: time and controller CPU per node.
//!
//! The controller's CPU is utime + stime of /proc/PID/stat (10 ms ticks), and beside
//! it the sum of its threads' run times (/proc/PID/task/*/schedstat, ns), which
//! resolves the small rollout figures. This program, its simulated agents and the
//! controller share the machine's CPUs; the CPU other processes used meanwhile is
//! printed beside each phase. No targets: it prints figures and TLS ÷ plain ratios.
//! Exit status: 0 figures printed, 2 an error (a failed registration, heartbeat or
//! rollout), 130 interrupted. Loopback only; every wait is bounded; everything it
//! started is killed on exit.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use fleet_tests::bench::OutputFormat;
use fleet_tests::bench::child::sibling_exe;
use fleet_tests::bench::machine::{Machine, cpu_sample, foreign_cpu, loadavg};
use fleet_tests::bench::proc_cpu::{self, CpuUsed};
use fleet_tests::bench::rollouts::{RolloutRun, roll, start_agents};
use fleet_tests::bench::sim_agents::{Csr, SimAgent, register};
use fleet_tests::bench::stats::{percentile, sorted};
use fleet_tests::bench::tls_fleet::{BenchController, Mode};
use serde_json::{Value, json};
use tokio::task::JoinSet;

/// The simulated nodes' heartbeat TTL: no node goes stale while it is measured.
const SIM_TTL: Duration = Duration::from_secs(600);
/// The real agents' heartbeat TTL (the controller's default).
const REAL_TTL: Duration = Duration::from_secs(10);
/// One registration may take this long.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(60);
/// At most this many heartbeats per connection in the throughput phase.
const MAX_BEATS_PER_CONNECTION: usize = 5_000_000;
/// A pause between starting the real agents and their first rollout.
const SETTLE: Duration = Duration::from_secs(2);
/// Descriptors kept free for everything else (the controller's own files, pipes).
const FD_SLACK: usize = 256;

#[derive(Debug, Parser)]
#[command(
    name = "tls-bench",
    about = "What mutual TLS costs the controller against plain HTTP/2: registration, heartbeats, rollouts",
    long_about = "What mutual TLS costs the controller against plain HTTP/2, in one run: \
        registration of --agents simulated agents (plain: connect + first heartbeat with the \
        bootstrap token; TLS: Join with a CSR + connect with the certificate + first \
        heartbeat), heartbeat throughput over --connections connections for --duration, and \
        rollouts across --rollout-nodes real fleet-agents per mode (two cold, then --repeats \
        warm), one node at a time. Prints a table \
        of figures and the ratios TLS / plain; no targets. fleet-controller and fleet-agent \
        are found next to this executable."
)]
struct Args {
    /// Simulated agents that register, each on a connection of its own.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Registrations in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Connections sending heartbeats back to back, one registered agent each (as real
    /// agents do); at most --agents.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// How long the heartbeat throughput phase lasts per mode.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Real fleet-agents per mode for the rollouts (0: no rollouts).
    #[arg(long, default_value_t = 5)]
    rollout_nodes: usize,
    /// Measured (warm) rollouts per mode, after two cold ones (each agent hashes the
    /// new executable; the first opens the controller's connections to the agents).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// fleet-controller executable (default: next to this executable).
    #[arg(long)]
    controller_exe: Option<PathBuf>,
    /// fleet-agent executable (default: next to this executable).
    #[arg(long)]
    agent_exe: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Text)]
    output: OutputFormat,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.agents == 0 || args.concurrency == 0 || args.connections == 0 {
        eprintln!("tls-bench: --agents, --concurrency and --connections must be > 0");
        return ExitCode::from(2);
    }
    if args.connections > args.agents {
        eprintln!(
            "tls-bench: --connections {} is more than --agents {}: each connection carries one registered agent",
            args.connections, args.agents
        );
        return ExitCode::from(2);
    }
    if args.duration.is_zero() || (args.rollout_nodes > 0 && args.repeats == 0) {
        eprintln!("tls-bench: --duration and --repeats must be > 0");
        return ExitCode::from(2);
    }
    fleet_tests::bench::main("tls-bench", run(args))
}

/// Progress goes to stderr; stdout carries only the report.
fn say(line: impl AsRef<str>) {
    eprintln!("tls-bench: {}", line.as_ref());
}

/// What one phase cost besides its own figures.
#[derive(Debug, Clone, Copy)]
struct Cost {
    /// The controller's CPU.
    controller: CpuUsed,
    /// This process's CPU (the simulated agents' side).
    bench: Option<CpuUsed>,
    /// Share of all CPU time used by processes outside this benchmark.
    foreign: Option<f64>,
}

/// Starts measuring a phase's cost.
struct Meter {
    controller_pid: u32,
    controller: proc_cpu::CpuReading,
    bench: Option<proc_cpu::CpuReading>,
    machine: Option<fleet_tests::bench::machine::CpuSample>,
}

impl Meter {
    fn start(controller_pid: u32) -> anyhow::Result<Self> {
        Ok(Self {
            controller_pid,
            controller: proc_cpu::read(controller_pid).context("the controller is gone")?,
            bench: proc_cpu::read(std::process::id()),
            machine: cpu_sample(),
        })
    }

    fn stop(&self) -> anyhow::Result<Cost> {
        let controller = proc_cpu::read(self.controller_pid).context("the controller is gone")?;
        let bench = proc_cpu::read(std::process::id());
        Ok(Cost {
            controller: self.controller.until(&controller),
            bench: self
                .bench
                .as_ref()
                .zip(bench.as_ref())
                .map(|(a, b)| a.until(b)),
            foreign: foreign_cpu(self.machine, cpu_sample()),
        })
    }
}

#[derive(Debug)]
struct RegPhase {
    agents: usize,
    wall: Duration,
    /// Per agent, in the order they started.
    total: Vec<Duration>,
    join: Vec<Duration>,
    cost: Cost,
    /// Nodes `ListNodes` shows serving afterwards.
    listed: usize,
    rss: Option<u64>,
}

#[derive(Debug)]
struct BeatPhase {
    connections: usize,
    elapsed: Duration,
    beats: usize,
    failed: usize,
    first_error: Option<String>,
    latency: Vec<Duration>,
    cost: Cost,
}

#[derive(Debug)]
struct ModeFigures {
    mode: Mode,
    reg: RegPhase,
    beats: BeatPhase,
    rollouts: Rollouts,
}

/// A mode's rollouts: the two cold ones (to each executable once), then the warm ones.
#[derive(Debug, Default)]
struct Rollouts {
    cold: Vec<RolloutRun>,
    warm: Vec<RolloutRun>,
}

async fn run(args: Args) -> anyhow::Result<bool> {
    let controller_exe = match &args.controller_exe {
        Some(p) => p.clone(),
        None => sibling_exe("fleet-controller")?,
    };
    let agent_exe = match &args.agent_exe {
        Some(p) => p.clone(),
        None if args.rollout_nodes > 0 => sibling_exe("fleet-agent")?,
        None => PathBuf::new(),
    };
    check_descriptors(&args)?;
    let machine = Machine::describe();
    let load_start = loadavg();
    say(format!(
        "{machine}; load average {} at start",
        fmt_load(load_start)
    ));

    // The simulated agents' keys and CSRs, made before any clock starts (the agent
    // makes its key once, before it joins).
    say(format!("making {} keys and CSRs", args.agents));
    let ids: Vec<String> = (1..=args.agents).map(|i| format!("sim-{i}")).collect();
    let keygen_start = Instant::now();
    let keygen_ids = ids.clone();
    let csrs = tokio::task::spawn_blocking(move || {
        keygen_ids
            .iter()
            .map(|id| Csr::new(id))
            .collect::<anyhow::Result<Vec<_>>>()
    })
    .await??;
    let keygen = keygen_start.elapsed();

    let mut figures = Vec::new();
    let mut csrs = Some(csrs);
    for mode in [Mode::Plain, Mode::Tls] {
        let controller = BenchController::start(&controller_exe, mode, SIM_TTL).await?;
        say(format!(
            "{}: controller pid {} at {}",
            mode.name(),
            controller.pid(),
            controller.url()
        ));
        let tls = match mode {
            Mode::Plain => None,
            Mode::Tls => Some((
                controller.join_token().await?,
                csrs.take().unwrap_or_default(),
            )),
        };
        let (agents, reg) = registration(&controller, &args, &ids, tls).await?;
        say(format!(
            "{}: {} agents registered in {:.2} s",
            mode.name(),
            reg.agents,
            reg.wall.as_secs_f64()
        ));
        let beats = heartbeats(&controller, &agents[..args.connections], args.duration).await?;
        say(format!(
            "{}: {} heartbeats in {:.2} s on {} connections",
            mode.name(),
            beats.beats,
            beats.elapsed.as_secs_f64(),
            beats.connections
        ));
        drop(agents);
        drop(controller);
        figures.push(ModeFigures {
            mode,
            reg,
            beats,
            rollouts: Rollouts::default(),
        });
    }

    if args.rollout_nodes > 0 {
        let runs = rollouts(&args, &controller_exe, &agent_exe).await?;
        for (f, r) in figures.iter_mut().zip(runs) {
            f.rollouts = r;
        }
    }
    let load_end = loadavg();

    let report = Report {
        args: &args,
        machine: &machine,
        load: (load_start, load_end),
        keygen,
        figures: &figures,
    };
    match args.output {
        OutputFormat::Text => report.print_text(),
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&report.json())?),
    }
    let failed: usize = figures.iter().map(|f| f.beats.failed).sum();
    if failed > 0 {
        bail!("{failed} heartbeats failed (see the report)");
    }
    Ok(true)
}

/// Every simulated agent holds a connection here and one in the controller; joins
/// hold a second one while they run.
fn check_descriptors(args: &Args) -> anyhow::Result<()> {
    use nix::sys::resource::{Resource, getrlimit};
    let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit(NOFILE)")?;
    let need = args.agents + 2 * args.concurrency + FD_SLACK;
    if (need as u64) > soft {
        bail!(
            "--agents {} with --concurrency {} needs about {need} open files, and the limit \
             (RLIMIT_NOFILE) is {soft}: lower --agents, or raise the limit (ulimit -n)",
            args.agents,
            args.concurrency
        );
    }
    Ok(())
}

/// Registers every agent of `ids`, `--concurrency` at a time: plain without `tls`,
/// by joining with the join token and the CSRs otherwise.
async fn registration(
    controller: &BenchController,
    args: &Args,
    ids: &[String],
    tls: Option<(String, Vec<Csr>)>,
) -> anyhow::Result<(Vec<SimAgent>, RegPhase)> {
    let target = Arc::new(controller.target());
    let (join_token, csrs) = match tls {
        Some((token, csrs)) => (Some(Arc::new(token)), Some(csrs)),
        None => (None, None),
    };
    let mut csrs = csrs.map(Vec::into_iter);
    let mut pending = ids.iter().enumerate();
    let mut set = JoinSet::new();
    let mut done: Vec<Option<(SimAgent, fleet_tests::bench::sim_agents::Registration)>> =
        (0..ids.len()).map(|_| None).collect();
    let meter = Meter::start(controller.pid())?;
    let start = Instant::now();
    loop {
        while set.len() < args.concurrency
            && let Some((i, id)) = pending.next()
        {
            let target = target.clone();
            let id = id.clone();
            let control = format!("127.0.0.1:{}", 10_000 + i % 50_000);
            let join = match (&join_token, csrs.as_mut()) {
                (Some(token), Some(csrs)) => {
                    let csr = csrs.next().context("fewer CSRs than agents")?;
                    Some((token.clone(), csr))
                }
                _ => None,
            };
            set.spawn(async move {
                let registering = async {
                    match join {
                        Some((token, csr)) => {
                            register(&target, &id, &control, Some((token.as_str(), csr))).await
                        }
                        None => register(&target, &id, &control, None).await,
                    }
                };
                let result = tokio::time::timeout(REGISTER_TIMEOUT, registering)
                    .await
                    .unwrap_or_else(|_| {
                        Err(anyhow::anyhow!(
                            "{id}: not registered within {REGISTER_TIMEOUT:?}"
                        ))
                    });
                (i, result)
            });
        }
        let Some(joined) = set.join_next().await else {
            break;
        };
        let (i, result) = joined.context("a registration task panicked")?;
        done[i] = Some(result?);
    }
    let wall = start.elapsed();
    let cost = meter.stop()?;
    let rss = proc_cpu::rss_bytes(controller.pid());
    let listed = controller
        .nodes()
        .await?
        .iter()
        .filter(|n| n.state == "serving")
        .count();
    if listed != ids.len() {
        bail!(
            "{}: {} agents registered but the controller lists {listed} serving",
            controller.mode.name(),
            ids.len()
        );
    }
    let mut agents = Vec::with_capacity(ids.len());
    let (mut total, mut join) = (Vec::new(), Vec::new());
    for (agent, timing) in done.into_iter().flatten() {
        agents.push(agent);
        total.push(timing.total);
        join.extend(timing.join);
    }
    Ok((
        agents,
        RegPhase {
            agents: ids.len(),
            wall,
            total,
            join,
            cost,
            listed,
            rss,
        },
    ))
}

/// Every agent of `agents` on its own connection, heartbeats back to back for `duration`.
async fn heartbeats(
    controller: &BenchController,
    agents: &[SimAgent],
    duration: Duration,
) -> anyhow::Result<BeatPhase> {
    let meter = Meter::start(controller.pid())?;
    let start = Instant::now();
    let end = start + duration;
    let mut set = JoinSet::new();
    for agent in agents.iter().cloned() {
        set.spawn(async move {
            let mut agent = agent;
            let mut latency = Vec::new();
            let (mut failed, mut first_error) = (0usize, None);
            while Instant::now() < end && latency.len() + failed < MAX_BEATS_PER_CONNECTION {
                let sent = Instant::now();
                match agent.beat().await {
                    Ok(()) => latency.push(sent.elapsed()),
                    Err(e) => {
                        failed += 1;
                        first_error.get_or_insert_with(|| format!("{e:#}"));
                        // A failing connection must not spin.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            (latency, failed, first_error)
        });
    }
    let (mut beats, mut failed, mut first_error, mut all) = (0, 0, None, Vec::new());
    while let Some(joined) = set.join_next().await {
        let (latency, f, e) = joined.context("a heartbeat task panicked")?;
        beats += latency.len();
        failed += f;
        all.extend(latency);
        if first_error.is_none() {
            first_error = e;
        }
    }
    let elapsed = start.elapsed();
    let phase = BeatPhase {
        connections: agents.len(),
        elapsed,
        beats,
        failed,
        first_error,
        latency: sorted(all),
        cost: meter.stop()?,
    };
    Ok(phase)
}

/// Both fleets of real agents up at once, then the rollouts of each mode, alternating
/// modes so that a change in the machine's load hits both alike: first one to each
/// executable (cold), then `--repeats` (warm).
async fn rollouts(
    args: &Args,
    controller_exe: &Path,
    agent_exe: &Path,
) -> anyhow::Result<Vec<Rollouts>> {
    let releases = tempfile::Builder::new()
        .prefix("tls-bench-releases")
        .tempdir()
        .context("cannot create a temp dir for the releases")?;
    let mut exes = Vec::new();
    for name in ["fleet-agent-v2", "fleet-agent-v3"] {
        let to = releases.path().join(name);
        std::fs::copy(agent_exe, &to)
            .with_context(|| format!("cannot copy {} to {}", agent_exe.display(), to.display()))?;
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755))?;
        exes.push(std::fs::canonicalize(&to)?);
    }
    let mut fleets = Vec::new();
    for mode in [Mode::Plain, Mode::Tls] {
        let controller = BenchController::start(controller_exe, mode, REAL_TTL).await?;
        let agents = start_agents(
            agent_exe,
            &controller,
            args.rollout_nodes,
            "node-",
            releases.path(),
        )
        .await?;
        let client = controller.operator().await?;
        say(format!(
            "{}: {} fleet-agents serving under controller pid {}",
            mode.name(),
            agents.len(),
            controller.pid()
        ));
        fleets.push((controller, agents, client, Rollouts::default()));
    }
    // Whatever the agents still do after they first registered (the last ones' start)
    // settles before the first rollout is timed.
    tokio::time::sleep(SETTLE).await;
    let timeout = Duration::from_secs(120) + Duration::from_secs(10) * args.rollout_nodes as u32;
    let rounds = exes.len() + args.repeats;
    for r in 0..rounds {
        let exe = &exes[r % exes.len()];
        let cold = r < exes.len();
        // Each mode goes first every other round.
        let order: Vec<usize> = if r % 2 == 0 { vec![0, 1] } else { vec![1, 0] };
        for i in order {
            let (controller, _, client, runs) = &mut fleets[i];
            let run = roll(controller, client, exe, timeout)
                .await
                .with_context(|| format!("{} rollout {}", controller.mode.name(), r + 1))?;
            say(format!(
                "{}: rollout {} of {rounds} ({}): {:.1} ms per node",
                controller.mode.name(),
                r + 1,
                if cold { "cold" } else { "warm" },
                ms(run.wall) / run.nodes.max(1) as f64
            ));
            if cold {
                runs.cold.push(run);
            } else {
                runs.warm.push(run);
            }
        }
    }
    Ok(fleets.into_iter().map(|(_, _, _, runs)| runs).collect())
}

// ---------------------------------------------------------------------------
// The report

struct Report<'a> {
    args: &'a Args,
    machine: &'a Machine,
    load: (Option<f64>, Option<f64>),
    keygen: Duration,
    figures: &'a [ModeFigures],
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn fmt_load(l: Option<f64>) -> String {
    l.map_or("?".into(), |l| format!("{l:.2}"))
}

fn p(v: &[Duration], q: f64) -> Option<f64> {
    percentile(&sorted(v.to_vec()), q).map(ms)
}

fn per(d: Duration, n: usize) -> Option<f64> {
    (n > 0).then(|| us(d) / n as f64)
}

/// The rows of the table: a label, and a figure per mode.
type Row = (String, [Option<f64>; 2], &'static str);

impl RegPhase {
    /// p50 of the first and of the last tenth of the agents, in start order.
    fn deciles(&self) -> (Option<f64>, Option<f64>) {
        let tenth = (self.total.len() / 10).max(1);
        let last = &self.total[self.total.len().saturating_sub(tenth)..];
        (p(&self.total[..tenth], 50.0), p(last, 50.0))
    }
}

impl BeatPhase {
    fn per_second(&self) -> Option<f64> {
        let s = self.elapsed.as_secs_f64();
        (s > 0.0).then(|| self.beats as f64 / s)
    }
}

/// Over every rollout of a mode: (nodes, wall, restart → healthy, StartRollout, CPU).
fn rollout_totals(runs: &[RolloutRun]) -> (usize, Duration, Vec<Duration>, Duration, CpuUsed) {
    let nodes = runs.iter().map(|r| r.nodes).sum();
    let wall = runs.iter().map(|r| r.wall).sum();
    let healthy = runs
        .iter()
        .flat_map(|r| r.restart_to_healthy.iter().copied())
        .collect();
    let start = runs.iter().map(|r| r.start_call).sum();
    let cpu = CpuUsed {
        ticks: runs.iter().map(|r| r.cpu.ticks).sum(),
        precise: runs.iter().map(|r| r.cpu.precise).sum(),
    };
    (nodes, wall, healthy, start, cpu)
}

impl Report<'_> {
    fn mode(&self, i: usize) -> &ModeFigures {
        &self.figures[i]
    }

    fn rows(&self) -> Vec<Row> {
        let each = |f: &dyn Fn(&ModeFigures) -> Option<f64>| [f(self.mode(0)), f(self.mode(1))];
        let a = self.args;
        let mut rows: Vec<Row> = vec![
            (
                format!("registration of {} agents, wall", a.agents),
                each(&|m| Some(m.reg.wall.as_secs_f64())),
                "s",
            ),
            (
                "  per agent, p50".into(),
                each(&|m| p(&m.reg.total, 50.0)),
                "ms",
            ),
            (
                "  per agent, p99".into(),
                each(&|m| p(&m.reg.total, 99.0)),
                "ms",
            ),
            (
                "  controller CPU per agent (utime+stime)".into(),
                each(&|m| per(m.reg.cost.controller.ticks, m.reg.agents)),
                "us",
            ),
            (
                "  controller CPU per agent (threads' run time)".into(),
                each(&|m| {
                    m.reg
                        .cost
                        .controller
                        .precise
                        .and_then(|c| per(c, m.reg.agents))
                }),
                "us",
            ),
            (
                format!("  controller RSS with {} connections", a.agents),
                each(&|m| m.reg.rss.map(|b| b as f64 / 1e6)),
                "MB",
            ),
            (
                format!(
                    "heartbeats, {} connections x {}",
                    a.connections,
                    humantime::format_duration(a.duration)
                ),
                each(&|m| m.beats.per_second()),
                "/s",
            ),
            (
                "  controller CPU per beat (utime+stime)".into(),
                each(&|m| per(m.beats.cost.controller.ticks, m.beats.beats)),
                "us",
            ),
            (
                "  controller CPU per beat (threads' run time)".into(),
                each(&|m| {
                    m.beats
                        .cost
                        .controller
                        .precise
                        .and_then(|c| per(c, m.beats.beats))
                }),
                "us",
            ),
            (
                "  beat latency, p50".into(),
                each(&|m| p(&m.beats.latency, 50.0)),
                "ms",
            ),
            (
                "  beat latency, p99".into(),
                each(&|m| p(&m.beats.latency, 99.0)),
                "ms",
            ),
        ];
        if a.rollout_nodes > 0 {
            let t = |m: &ModeFigures| rollout_totals(&m.rollouts.warm);
            let first = |m: &ModeFigures| rollout_totals(&m.rollouts.cold[..1]);
            rows.extend([
                (
                    format!(
                        "rollout, {} nodes one at a time x {} (warm): time per node",
                        a.rollout_nodes, a.repeats
                    ),
                    each(&|m| {
                        let (n, wall, ..) = t(m);
                        per(wall, n).map(|u| u / 1e3)
                    }),
                    "ms",
                ),
                (
                    "  StartRollout call (plan, preflight of all), mean".into(),
                    each(&|m| per(t(m).3, m.rollouts.warm.len()).map(|u| u / 1e3)),
                    "ms",
                ),
                (
                    "  restarting -> healthy, mean".into(),
                    each(&|m| {
                        let (_, _, h, ..) = t(m);
                        let n = h.len();
                        per(h.iter().sum(), n).map(|u| u / 1e3)
                    }),
                    "ms",
                ),
                (
                    "  controller CPU per node (utime+stime)".into(),
                    each(&|m| {
                        let (n, _, _, _, cpu) = t(m);
                        per(cpu.ticks, n).map(|u| u / 1e3)
                    }),
                    "ms",
                ),
                (
                    "  controller CPU per node (threads' run time)".into(),
                    each(&|m| {
                        let (n, _, _, _, cpu) = t(m);
                        cpu.precise.and_then(|c| per(c, n)).map(|u| u / 1e3)
                    }),
                    "ms",
                ),
                (
                    "first rollout (cold): time per node".into(),
                    each(&|m| {
                        let (n, wall, ..) = first(m);
                        per(wall, n).map(|u| u / 1e3)
                    }),
                    "ms",
                ),
                (
                    "  controller CPU per node (threads' run time)".into(),
                    each(&|m| {
                        let (n, _, _, _, cpu) = first(m);
                        cpu.precise
                            .or(Some(cpu.ticks))
                            .and_then(|c| per(c, n))
                            .map(|u| u / 1e3)
                    }),
                    "ms",
                ),
            ]);
        }
        rows
    }

    fn print_text(&self) {
        let a = self.args;
        println!("tls-bench: the controller with mutual TLS against plain HTTP/2, one run");
        println!("machine: {}", self.machine);
        println!(
            "load average: {} at start, {} at end",
            fmt_load(self.load.0),
            fmt_load(self.load.1)
        );
        println!(
            "agents {} ({} registering at a time, each on its own connection), heartbeats on {} \
             of them for {}, rollouts {} x {} nodes",
            a.agents,
            a.concurrency,
            a.connections,
            humantime::format_duration(a.duration),
            a.repeats,
            a.rollout_nodes
        );
        println!();
        println!(
            "{:<58} {:>12} {:>12} {:>10}",
            "figure", "plain", "TLS", "TLS/plain"
        );
        for (label, [plain, tls], unit) in self.rows() {
            let f = |v: Option<f64>| {
                v.map_or("n/a".to_string(), |v| {
                    let digits = if v >= 100.0 {
                        0
                    } else if v >= 10.0 {
                        1
                    } else {
                        2
                    };
                    format!("{v:.digits$} {unit}")
                })
            };
            let ratio = match (plain, tls) {
                (Some(p), Some(t)) if p > 0.0 => format!("{:.2}", t / p),
                _ => "n/a".into(),
            };
            println!("{label:<58} {:>12} {:>12} {ratio:>10}", f(plain), f(tls));
        }
        println!();
        let tls = self.mode(1);
        println!(
            "TLS registration: Join p50 {:.2} ms / p99 {:.2} ms of it (its own connection and \
             handshake, the CA signing, the join token's use written to SQLite); key + CSR \
             made beforehand, not in the figures: {:.0} us each on this process",
            p(&tls.reg.join, 50.0).unwrap_or(f64::NAN),
            p(&tls.reg.join, 99.0).unwrap_or(f64::NAN),
            us(self.keygen) / a.agents as f64
        );
        for m in self.figures {
            let (first, last) = m.reg.deciles();
            println!(
                "{}: registration p50 of the first / last 10 % of agents: {:.2} / {:.2} ms; \
                 {} listed serving",
                m.mode.name(),
                first.unwrap_or(f64::NAN),
                last.unwrap_or(f64::NAN),
                m.reg.listed
            );
        }
        for m in self.figures {
            let each = |runs: &[RolloutRun]| {
                runs.iter()
                    .map(|r| format!("{:.1}", ms(r.wall) / r.nodes.max(1) as f64))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            if !m.rollouts.cold.is_empty() {
                println!(
                    "{}: rollout time per node, in order: cold {} ms; warm {} ms",
                    m.mode.name(),
                    each(&m.rollouts.cold),
                    each(&m.rollouts.warm)
                );
            }
        }
        println!("CPU beside the controller's (the simulated agents are this process):");
        for m in self.figures {
            let bench = |c: &Cost| {
                c.bench
                    .map_or("?".into(), |b| format!("{:.2} s", b.best().as_secs_f64()))
            };
            println!(
                "  {}: this process {} (registration), {} (heartbeats); other processes {} / {} \
                 of all CPU",
                m.mode.name(),
                bench(&m.reg.cost),
                bench(&m.beats.cost),
                fmt_share(m.reg.cost.foreign),
                fmt_share(m.beats.cost.foreign),
            );
        }
        for m in self.figures {
            if m.beats.failed > 0 {
                println!(
                    "{}: {} heartbeats FAILED; first: {}",
                    m.mode.name(),
                    m.beats.failed,
                    m.beats.first_error.as_deref().unwrap_or("?")
                );
            }
        }
    }

    fn json(&self) -> Value {
        let modes: Vec<Value> = self
            .figures
            .iter()
            .map(|m| {
                let cpu = cpu_json;
                json!({
                    "mode": m.mode.name(),
                    "registration": {
                        "agents": m.reg.agents,
                        "wall_s": m.reg.wall.as_secs_f64(),
                        "p50_ms": p(&m.reg.total, 50.0),
                        "p99_ms": p(&m.reg.total, 99.0),
                        "join_p50_ms": p(&m.reg.join, 50.0),
                        "join_p99_ms": p(&m.reg.join, 99.0),
                        "controller_cpu": cpu(&m.reg.cost.controller),
                        "controller_rss_bytes": m.reg.rss,
                        "other_processes_cpu_share": m.reg.cost.foreign,
                    },
                    "heartbeats": {
                        "connections": m.beats.connections,
                        "elapsed_s": m.beats.elapsed.as_secs_f64(),
                        "beats": m.beats.beats,
                        "failed": m.beats.failed,
                        "per_second": m.beats.per_second(),
                        "p50_ms": p(&m.beats.latency, 50.0),
                        "p99_ms": p(&m.beats.latency, 99.0),
                        "controller_cpu": cpu(&m.beats.cost.controller),
                        "other_processes_cpu_share": m.beats.cost.foreign,
                    },
                    "rollouts": {
                        "cold": m.rollouts.cold.iter().map(rollout_json).collect::<Vec<_>>(),
                        "warm": m.rollouts.warm.iter().map(rollout_json).collect::<Vec<_>>(),
                    },
                })
            })
            .collect();
        let ratios: Vec<Value> = self
            .rows()
            .into_iter()
            .map(|(label, [plain, tls], unit)| {
                json!({
                    "figure": label.trim(),
                    "unit": unit,
                    "plain": plain,
                    "tls": tls,
                    "tls_over_plain": plain.zip(tls).filter(|(p, _)| *p > 0.0).map(|(p, t)| t / p),
                })
            })
            .collect();
        json!({
            "machine": self.machine.json(),
            "load_average": {"start": self.load.0, "end": self.load.1},
            "keygen_us_per_agent": us(self.keygen) / self.args.agents as f64,
            "modes": modes,
            "table": ratios,
        })
    }
}

fn cpu_json(c: &CpuUsed) -> Value {
    json!({"ticks_s": c.ticks.as_secs_f64(), "threads_s": c.precise.map(|p| p.as_secs_f64())})
}

fn rollout_json(r: &RolloutRun) -> Value {
    json!({
        "nodes": r.nodes,
        "wall_ms": ms(r.wall),
        "start_call_ms": ms(r.start_call),
        "restart_to_healthy_ms": r.restart_to_healthy.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
        "controller_cpu": cpu_json(&r.cpu),
    })
}

fn fmt_share(f: Option<f64>) -> String {
    f.map_or("?".into(), |f| format!("{:.0} %", f * 100.0))
}
