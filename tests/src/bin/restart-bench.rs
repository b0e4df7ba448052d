//! `restart-bench`: what a fleet-agent restart costs, measured against a peer in the
//! same run.
//!
//! ```text
//! cargo build --release --workspace --bins && target/release/restart-bench
//! ```
//!
//! It starts `fleet-agent --listen 127.0.0.1:0 --control 127.0.0.1:0` (the demo app)
//! and `hello-peer --listen 127.0.0.1:0` (a bare axum hello server), both found next
//! to its own executable, and drives them with the closed-loop load generator of
//! `fleet_tests::loadgen` (`GET /`, keep-alive and fresh-connection clients):
//!
//! 1. Throughput without restarts: demo app and peer alternately, `--rounds` times
//!    each, best of each; the ratio demo/peer (target ≥ 0.97).
//! 2. Restart under load: the same load against the demo app while the agent is
//!    restarted through gRPC `AgentService.Restart` every `--restart-every`, one at a
//!    time; `Watch` gives each old worker's exit. Failed requests (target: none),
//!    latency inside restart windows against steady state (p99 ratio ≤ 1.5),
//!    trigger→READY (median < 10 ms), trigger→old-worker-exit, supervisor and worker
//!    RSS (supervisor < 5 MB).
//! 3. One verdict line per target. Exit status: 0 every target passed, 1 some target
//!    failed, 2 the bench could not run, 130 interrupted.
//!
//! Loopback only. Every loop is bounded in count and time; every process started is
//! killed on exit, also on panic and Ctrl-C (a Drop guard).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow};
use clap::Parser;
use fleet_proto::v1::{Event, Outcome, Phase, RestartRequest, StatusRequest, WatchRequest};
use fleet_tests::bench::OutputFormat;
use fleet_tests::bench::child::sibling_exe;
use fleet_tests::bench::load::{self, FOREIGN_CPU_WARN, LoadShape, finish_load};
use fleet_tests::bench::machine::{cpu_sample, foreign_cpu, loadavg};
use fleet_tests::bench::servers::{
    FleetAgent, STARTUP_TIMEOUT, serving_worker, start_agent, start_hello_peer,
};
use fleet_tests::bench::stats::{
    LatencyStats, WINDOW_AFTER_EXIT, Windows, fmt_bytes, fmt_ms, fmt_pct, fmt_split, json_ms,
    latency_stats, ms, ok_rps, percentile, sorted, stats_json, verdict,
};
use fleet_tests::footprint::{Mem, mem};
use fleet_tests::loadgen::{Load, LoadOptions, LoadReport, Pacing, RequestRecord};
use serde_json::json;
use tokio::sync::mpsc;

/// Targets (see the README's benchmark section).
const TARGET_THROUGHPUT_RATIO: f64 = 0.97;
const TARGET_P99_RATIO: f64 = 1.5;
const TARGET_READY_MEDIAN: Duration = Duration::from_millis(10);
/// No request inside a restart window may take this long: a stall of the handoff
/// (the new worker not accepting, say) shows here even when nothing fails.
const TARGET_WINDOW_MAX: Duration = Duration::from_millis(250);
const TARGET_SUPERVISOR_RSS_BYTES: u64 = 5_000_000;

/// A failed restart's window lasts until this long after its call returned.
const WINDOW_FAILED: Duration = Duration::from_secs(1);

/// Latency figures of the restart phase leave out requests started in its first
/// RAMP_UP (all clients connecting at once); failures are counted from the start.
const RAMP_UP: Duration = Duration::from_millis(500);

/// Bounds on waiting for things that should be quick.
const RESTART_RPC_TIMEOUT: Duration = Duration::from_secs(30);
const DRAINED_WAIT: Duration = Duration::from_secs(15);
const REFUSED_RETRY: Duration = Duration::from_millis(10);

#[derive(Debug, Parser)]
#[command(
    name = "restart-bench",
    about = "Throughput and restart-under-load benchmark of fleet-agent's demo app against a bare axum peer"
)]
struct Args {
    /// Length of each load run (each throughput run and the restart phase).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Interval between restarts in the restart phase (a restart starts no earlier
    /// than the previous one returned).
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    restart_every: Duration,
    /// Closed-loop clients that keep their connection alive.
    #[arg(long, default_value_t = 8)]
    keepalive: usize,
    /// Closed-loop clients that open a fresh connection for every request.
    #[arg(long, default_value_t = 8)]
    fresh: usize,
    /// Upper bound on requests per load run.
    #[arg(long, default_value_t = 20_000_000)]
    requests: u64,
    /// Throughput runs per target (alternating demo, peer); the best of each counts.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=10))]
    rounds: u32,
    /// Unmeasured warm-up load per target before the throughput runs.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Run the restart phase's load open loop at this many requests per second over
    /// all clients (latency then counts from each request's scheduled time, so a stall
    /// is not hidden by clients that wait for it: no coordinated omission). Default:
    /// closed loop. The throughput runs are always closed loop.
    #[arg(long, value_name = "REQ_PER_SEC")]
    rate: Option<f64>,
    /// fleet-agent executable (default: next to this executable).
    #[arg(long)]
    agent_exe: Option<PathBuf>,
    /// hello-peer executable (default: next to this executable).
    #[arg(long)]
    peer_exe: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Text)]
    output: OutputFormat,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.duration.is_zero() || args.restart_every.is_zero() {
        eprintln!("restart-bench: --duration and --restart-every must be > 0");
        return ExitCode::from(2);
    }
    if args.keepalive + args.fresh == 0 {
        eprintln!("restart-bench: at least one client is needed (--keepalive / --fresh)");
        return ExitCode::from(2);
    }
    fleet_tests::bench::main("restart-bench", run(args))
}

// ---------------------------------------------------------------------------
// Throughput

struct Throughput {
    tp: load::Throughput,
    median_ratio: f64,
    best_demo: f64,
    best_peer: f64,
    ratio: f64,
}

async fn throughput(args: &Args, demo: SocketAddr, peer: SocketAddr) -> anyhow::Result<Throughput> {
    let tp = load::throughput(
        &shape(args),
        &[("demo", demo, Vec::new()), ("peer", peer, Vec::new())],
        args.rounds,
        args.duration,
        args.warmup,
    )
    .await?;
    let (best_demo, best_peer) = (tp.best("demo"), tp.best("peer"));
    let (median_demo, median_peer) = (tp.median("demo"), tp.median("peer"));
    let median_ratio = if median_peer > 0.0 {
        median_demo / median_peer
    } else {
        0.0
    };
    let ratio = if best_peer > 0.0 {
        best_demo / best_peer
    } else {
        0.0
    };
    Ok(Throughput {
        tp,
        median_ratio,
        best_demo,
        best_peer,
        ratio,
    })
}

fn shape(args: &Args) -> LoadShape {
    LoadShape {
        keepalive: args.keepalive,
        fresh: args.fresh,
        h2_connections: 0,
        h2_streams: 0,
        requests: args.requests,
    }
}

#[derive(Debug, Default)]
struct RestartRec {
    trigger: Option<Instant>,
    /// Client-side round trip of the Restart call.
    rpc: Duration,
    succeeded: bool,
    reason: String,
    ready_us: u64,
    old_pid: u32,
    new_pid: u32,
    generation: u64,
    /// When the bench received the old worker's DRAINED event.
    old_exit: Option<Instant>,
    /// SIGTERM → old worker exit, as measured by the agent.
    drain_us: Option<u64>,
}

impl RestartRec {
    fn trigger(&self) -> Instant {
        self.trigger.unwrap_or_else(Instant::now)
    }

    /// The restart window: from the trigger until the old worker's exit as seen on
    /// Watch, plus the reconnect margin (`run_end` if it never exited). A failed
    /// restart: from the trigger until 1 s after the call returned.
    fn window(&self, run_end: Instant) -> (Instant, Instant) {
        let t = self.trigger();
        if !self.succeeded {
            return (t, t + self.rpc + WINDOW_FAILED);
        }
        (t, self.old_exit.unwrap_or(run_end) + WINDOW_AFTER_EXIT)
    }
}

struct RestartPhase {
    report: LoadReport,
    restarts: Vec<RestartRec>,
    refused: u64,
    refusal_examples: Vec<String>,
    errors: Vec<String>,
    other_events: BTreeMap<String, u64>,
    steady: LatencyStats,
    steady_before: LatencyStats,
    steady_after: LatencyStats,
    window: LatencyStats,
    failed_in_window: u64,
    failed_steady: u64,
    failures_by_kind: BTreeMap<&'static str, u64>,
    window_time: Duration,
    lead: Duration,
    restart_span: Duration,
    supervisor_rss: Option<Mem>,
    worker_rss: Option<Mem>,
    worker_pid: Option<u32>,
    generation: u64,
    foreign_cpu: Option<f64>,
}

async fn restart_phase(args: &Args, agent: &FleetAgent) -> anyhow::Result<RestartPhase> {
    let mut client = agent.grpc().await?;

    // Subscribe before any restart; the first event (the snapshot) proves it is live.
    let mut stream = tokio::time::timeout(STARTUP_TIMEOUT, client.watch(WatchRequest {}))
        .await
        .map_err(|_| anyhow!("Watch did not answer within {STARTUP_TIMEOUT:?}"))?
        .context("Watch failed")?
        .into_inner();
    let first = tokio::time::timeout(STARTUP_TIMEOUT, stream.message())
        .await
        .map_err(|_| anyhow!("Watch sent no snapshot within {STARTUP_TIMEOUT:?}"))?
        .context("Watch stream failed")?
        .ok_or_else(|| anyhow!("Watch stream ended before its first event"))?;
    if first.phase != Phase::Snapshot as i32 {
        eprintln!(
            "restart-bench: note: the first Watch event is {:?}, not a snapshot",
            Phase::try_from(first.phase)
        );
    }
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<(Instant, Event)>();
    let watcher = tokio::spawn(async move {
        // Ends when the stream ends or the receiver is gone (aborted at the end).
        while let Ok(Some(ev)) = stream.message().await {
            if ev_tx.send((Instant::now(), ev)).is_err() {
                break;
            }
        }
    });

    // Quiet lead-in and tail (no restart triggered) so that steady state has samples
    // of its own; restarts happen in between.
    let lead = args.duration / 5;
    let tail = args.duration / 5;
    let restart_span = args.duration.saturating_sub(lead + tail);
    let max_restarts =
        (restart_span.as_secs_f64() / args.restart_every.as_secs_f64()).ceil() as usize + 1;
    let max_attempts = max_restarts * 20 + 100;

    eprintln!(
        "restart-bench: restart phase ({:?} of load, a restart every {:?} from {:?} to {:?})",
        args.duration,
        args.restart_every,
        lead,
        lead + restart_span
    );
    let cpu_before = cpu_sample();
    let phase_start = Instant::now();
    let spec = shape(args).spec(agent.http, args.duration);
    let load = match args.rate {
        Some(per_second) => Load::start_with(
            spec,
            LoadOptions {
                pacing: Pacing::Open { per_second },
                ..LoadOptions::default()
            },
        ),
        None => Load::start(spec),
    };
    let stop_at = phase_start + lead + restart_span;
    let mut next = phase_start + lead;
    let mut restarts = Vec::new();
    let mut refused = 0;
    let mut refusal_examples = Vec::new();
    let mut errors = Vec::new();
    let mut attempts = 0;
    while restarts.len() < max_restarts && attempts < max_attempts {
        tokio::time::sleep_until(next.into()).await;
        let trigger = Instant::now();
        if trigger >= stop_at {
            break;
        }
        attempts += 1;
        let req = RestartRequest {
            reason: format!("restart-bench #{}", restarts.len() + 1),
            ..RestartRequest::default()
        };
        let res = tokio::time::timeout(RESTART_RPC_TIMEOUT, client.restart(req)).await;
        let rpc = trigger.elapsed();
        match res {
            Err(_) => {
                errors.push(format!(
                    "Restart did not return within {RESTART_RPC_TIMEOUT:?}; no more restarts"
                ));
                break;
            }
            Ok(Err(status))
                if matches!(
                    status.code(),
                    tonic::Code::Aborted
                        | tonic::Code::FailedPrecondition
                        | tonic::Code::Unavailable
                ) =>
            {
                // Another restart still in progress (or busy): one at a time, retry soon.
                refused += 1;
                if refusal_examples.len() < 3 {
                    refusal_examples.push(format!("{:?}: {}", status.code(), status.message()));
                }
                next = Instant::now() + REFUSED_RETRY;
                continue;
            }
            Ok(Err(status)) => {
                errors.push(format!(
                    "Restart failed: {:?}: {}; no more restarts",
                    status.code(),
                    status.message()
                ));
                break;
            }
            Ok(Ok(resp)) => {
                let resp = resp.into_inner();
                let succeeded = resp.outcome == Outcome::Succeeded as i32;
                if !succeeded && errors.len() < 5 {
                    errors.push(format!(
                        "restart #{} failed: {} (stderr tail: {})",
                        restarts.len() + 1,
                        resp.reason,
                        resp.stderr_tail.join(" | ")
                    ));
                }
                restarts.push(RestartRec {
                    trigger: Some(trigger),
                    rpc,
                    succeeded,
                    reason: resp.reason,
                    ready_us: resp.timings.map_or(0, |t| t.ready_us),
                    old_pid: resp.old_pid,
                    new_pid: resp.new_pid,
                    generation: resp.generation,
                    ..RestartRec::default()
                });
            }
        }
        next = (trigger + args.restart_every).max(Instant::now());
    }
    let mut report = finish_load(load, phase_start, args.duration, args.requests).await?;
    let foreign_cpu = foreign_cpu(cpu_before, cpu_sample());

    // Collect the DRAINED events of every old worker (bounded wait for stragglers).
    let mut drained: HashMap<u32, (Instant, u64)> = HashMap::new();
    let mut other_events = BTreeMap::new();
    let expected: Vec<u32> = restarts
        .iter()
        .filter(|r| r.succeeded && r.old_pid != 0)
        .map(|r| r.old_pid)
        .collect();
    let deadline = tokio::time::Instant::now() + DRAINED_WAIT;
    loop {
        let ev = if expected.iter().all(|p| drained.contains_key(p)) {
            match ev_rx.try_recv() {
                Ok(ev) => ev,
                Err(_) => break,
            }
        } else {
            match tokio::time::timeout_at(deadline, ev_rx.recv()).await {
                Ok(Some(ev)) => ev,
                Ok(None) | Err(_) => break,
            }
        };
        let (at, ev) = ev;
        match Phase::try_from(ev.phase) {
            Ok(Phase::Drained) => {
                drained.insert(ev.pid, (at, ev.duration_us));
            }
            Ok(p @ (Phase::Failed | Phase::Reverting | Phase::WorkerExited | Phase::Refused)) => {
                *other_events.entry(format!("{p:?}")).or_insert(0) += 1;
            }
            _ => {}
        }
    }
    watcher.abort();
    for r in &mut restarts {
        if let Some((at, us)) = drained.get(&r.old_pid) {
            r.old_exit = Some(*at);
            r.drain_us = Some(*us);
        }
    }

    // Classify requests by their start time.
    let run_end = Instant::now();
    let windows = Windows(restarts.iter().map(|r| r.window(run_end)).collect());
    let in_window = |r: &RequestRecord| windows.contains(r.start);
    // Latency leaves out the load's own ramp-up (every client connecting at once).
    let ramped = phase_start + RAMP_UP;
    let window = latency_stats(&report, |r| r.start >= ramped && in_window(r));
    let steady = latency_stats(&report, |r| r.start >= ramped && !in_window(r));
    // Steady state before the first restart and after the last window, apart.
    let first_trigger = restarts.first().map_or(stop_at, RestartRec::trigger);
    let steady_before = latency_stats(&report, |r| r.start >= ramped && r.start < first_trigger);
    let steady_after = latency_stats(&report, |r| r.start >= first_trigger && !in_window(r));
    let failed_in_window = report
        .records
        .iter()
        .filter(|r| !r.ok && in_window(r))
        .count() as u64;
    let failed_steady = report
        .records
        .iter()
        .filter(|r| !r.ok && !in_window(r))
        .count() as u64;
    let window_time = windows.total();
    // Failures by kind from every record (the report keeps only the first examples).
    let mut failures_by_kind: BTreeMap<&'static str, u64> = BTreeMap::new();
    for r in report.records.iter().filter(|r| !r.ok) {
        *failures_by_kind
            .entry(r.failure.unwrap_or("other"))
            .or_default() += 1;
    }
    report.records.clear();
    report.records.shrink_to_fit();

    // Memory at the end (the agent is still running).
    let supervisor_rss = mem(agent.proc.pid());
    let status = tokio::time::timeout(Duration::from_secs(5), client.status(StatusRequest {}))
        .await
        .ok()
        .and_then(Result::ok)
        .map(tonic::Response::into_inner);
    let (worker_pid, generation) = status.as_ref().map_or((None, 0), |s| {
        (serving_worker(s).map(|(pid, _)| pid), s.generation)
    });
    let worker_rss = worker_pid.and_then(mem);

    Ok(RestartPhase {
        report,
        restarts,
        refused,
        refusal_examples,
        errors,
        other_events,
        steady,
        steady_before,
        steady_after,
        window,
        failures_by_kind,
        failed_in_window,
        failed_steady,
        window_time,
        lead,
        restart_span,
        supervisor_rss,
        worker_rss,
        worker_pid,
        generation,
        foreign_cpu,
    })
}

// ---------------------------------------------------------------------------
// Report

async fn run(args: Args) -> anyhow::Result<bool> {
    if let Some(rate) = args.rate
        && !(rate.is_finite() && rate > 0.0)
    {
        anyhow::bail!(
            "--rate {rate} is not a rate: give requests per second above 0, e.g. --rate 20000"
        );
    }
    let agent_exe = match &args.agent_exe {
        Some(p) => p.clone(),
        None => sibling_exe("fleet-agent")?,
    };
    let peer_exe = match &args.peer_exe {
        Some(p) => p.clone(),
        None => sibling_exe("hello-peer")?,
    };
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZeroUsize::get);
    let load_before = loadavg();

    let mut agent = start_agent(&agent_exe, "127.0.0.1:0", &[]).await?;
    let (mut peer, peer_addr) = start_hello_peer(&peer_exe, "127.0.0.1:0").await?;
    let supervisor_rss_start = mem(agent.proc.pid());
    eprintln!(
        "restart-bench: fleet-agent pid {} (demo app http://{}, control {}), hello-peer pid {} (http://{})",
        agent.proc.pid(),
        agent.http,
        agent.control,
        peer.pid(),
        peer_addr
    );

    let tp = throughput(&args, agent.http, peer_addr).await?;
    let _ = peer.terminate(Duration::from_secs(5)).await;
    drop(peer);

    let rp = restart_phase(&args, &agent).await?;
    let agent_tail = agent.proc.tail(12);

    let load_after = loadavg();
    let shutdown = agent.proc.terminate(Duration::from_secs(15)).await;
    drop(agent);

    // ---- figures
    let ready: Vec<Duration> = rp
        .restarts
        .iter()
        .filter(|r| r.succeeded)
        .map(|r| Duration::from_micros(r.ready_us))
        .collect();
    let ready = sorted(ready);
    let rpc = sorted(rp.restarts.iter().map(|r| r.rpc).collect());
    // The READY verdict is timed by the bench, not taken from the agent's own report:
    // a successful Restart call returns once the new worker is READY.
    let rpc_ok = sorted(
        rp.restarts
            .iter()
            .filter(|r| r.succeeded)
            .map(|r| r.rpc)
            .collect(),
    );
    let exit = sorted(
        rp.restarts
            .iter()
            .filter_map(|r| r.old_exit.map(|e| e.saturating_duration_since(r.trigger())))
            .collect(),
    );
    let drain = sorted(
        rp.restarts
            .iter()
            .filter_map(|r| r.drain_us.map(Duration::from_micros))
            .collect(),
    );
    let succeeded = rp.restarts.iter().filter(|r| r.succeeded).count();
    let failed_restarts = rp.restarts.len() - succeeded;
    let no_exit = rp
        .restarts
        .iter()
        .filter(|r| r.succeeded && r.old_exit.is_none())
        .count();
    // Counts from every record; examples from the report's first failures.
    let mut failure_kinds: BTreeMap<&str, (u64, Vec<String>)> = rp
        .failures_by_kind
        .iter()
        .map(|(k, n)| (*k, (*n, Vec::new())))
        .collect();
    for f in &rp.report.failures {
        let e = failure_kinds.entry(f.kind).or_default();
        if e.1.len() < 3 {
            e.1.push(f.message.clone());
        }
    }
    let p99_ratio = match (rp.window.p99, rp.steady.p99) {
        (Some(w), Some(s)) if !s.is_zero() => Some(w.as_secs_f64() / s.as_secs_f64()),
        _ => None,
    };

    let mut verdicts = vec![
        verdict(
            tp.ratio >= TARGET_THROUGHPUT_RATIO,
            format!("throughput demo/peer >= {TARGET_THROUGHPUT_RATIO}"),
            format!(
                "{:.3} ({:.0} / {:.0} req/s)",
                tp.ratio, tp.best_demo, tp.best_peer
            ),
        ),
        verdict(
            rp.report.failed == 0 && rp.report.requests > 0,
            "no failed request while restarting",
            format!(
                "{} failed of {} requests",
                rp.report.failed, rp.report.requests
            ),
        ),
        verdict(
            !rp.restarts.is_empty() && failed_restarts == 0 && rp.errors.is_empty(),
            "every restart succeeded",
            format!(
                "{succeeded} succeeded, {failed_restarts} failed, {} refused-and-retried",
                rp.refused
            ),
        ),
        verdict(
            p99_ratio.is_some_and(|r| r <= TARGET_P99_RATIO),
            format!("p99 in restart windows / steady p99 <= {TARGET_P99_RATIO}"),
            match p99_ratio {
                Some(r) => format!(
                    "{r:.2} ({} / {})",
                    fmt_ms(rp.window.p99),
                    fmt_ms(rp.steady.p99)
                ),
                None => "n/a (no samples)".to_string(),
            },
        ),
        verdict(
            rp.window.max.is_some_and(|m| m < TARGET_WINDOW_MAX),
            format!(
                "max latency in restart windows < {} ms",
                TARGET_WINDOW_MAX.as_millis()
            ),
            format!(
                "{} (p99.9 {})",
                fmt_ms(rp.window.max),
                fmt_ms(rp.window.p999)
            ),
        ),
        verdict(
            percentile(&rpc_ok, 50.0).is_some_and(|m| m < TARGET_READY_MEDIAN),
            format!(
                "trigger->READY median < {} ms (Restart call round trip, timed by the bench)",
                TARGET_READY_MEDIAN.as_millis()
            ),
            format!(
                "{} (the agent reports {})",
                fmt_ms(percentile(&rpc_ok, 50.0)),
                fmt_ms(percentile(&ready, 50.0))
            ),
        ),
        verdict(
            rp.supervisor_rss
                .is_some_and(|m| m.rss < TARGET_SUPERVISOR_RSS_BYTES),
            format!(
                "supervisor RSS < {} MB",
                TARGET_SUPERVISOR_RSS_BYTES / 1_000_000
            ),
            fmt_bytes(rp.supervisor_rss.map(|r| r.rss)),
        ),
    ];
    if no_exit > 0 {
        verdicts.push(verdict(
            false,
            "every old worker exited (DRAINED seen)",
            format!("{no_exit} old workers without a DRAINED event within {DRAINED_WAIT:?} after the load"),
        ));
    }
    let all_pass = verdicts.iter().all(|v| v.pass);
    // Every run of a target skewed, or the restart phase skewed.
    let all_skewed = |t: &str| tp.tp.all_skewed(t);
    let busy_machine = all_skewed("demo")
        || all_skewed("peer")
        || rp.foreign_cpu.is_some_and(|f| f > FOREIGN_CPU_WARN);

    let window_def = format!(
        "restart window = from the Restart call until the old worker's exit (its DRAINED event on Watch) + {:?}; \
         a request belongs to it by its start time",
        WINDOW_AFTER_EXIT
    );
    let pacing = match args.rate {
        Some(r) => format!("restart phase open loop at {r:.0} req/s, throughput runs closed loop"),
        None => "closed loop".to_string(),
    };
    let load_desc = format!(
        "{pacing}, GET /, {} keep-alive + {} fresh-connection clients, {:?} per run, max {} requests per run",
        args.keepalive, args.fresh, args.duration, args.requests
    );

    match args.output {
        OutputFormat::Json => {
            let restart_json = json!({
                "window_definition": window_def,
                "lead_in_ms": rp.lead.as_millis() as u64,
                "ramp_up_excluded_ms": RAMP_UP.as_millis() as u64,
                "restart_span_ms": rp.restart_span.as_millis() as u64,
                "window_time_ms": rp.window_time.as_millis() as u64,
                "restarts": rp.restarts.len(),
                "succeeded": succeeded,
                "failed": failed_restarts,
                "refused_and_retried": rp.refused,
                "refusal_examples": rp.refusal_examples,
                "errors": rp.errors,
                "other_events": rp.other_events,
                "requests": rp.report.requests,
                "ok": rp.report.ok,
                "failed_requests": rp.report.failed,
                "failed_in_window": rp.failed_in_window,
                "failed_steady": rp.failed_steady,
                "polite_reconnects": rp.report.reconnects,
                "unsent_retries": rp.report.unsent_retries,
                "failures": failure_kinds.iter().map(|(k, (n, ex))| json!({"kind": k, "count": n, "examples": ex})).collect::<Vec<_>>(),
                "rps": ok_rps(&rp.report).round(),
                "foreign_cpu": rp.foreign_cpu,
                "steady": stats_json(&rp.steady),
                "window": stats_json(&rp.window),
                "p99_ratio": p99_ratio,
                "trigger_to_ready_ms": {"median": json_ms(percentile(&ready, 50.0)), "p90": json_ms(percentile(&ready, 90.0)), "max": json_ms(ready.last().copied())},
                "restart_rpc_ms": {"median": json_ms(percentile(&rpc, 50.0)), "max": json_ms(rpc.last().copied())},
                "trigger_to_old_exit_ms": {"median": json_ms(percentile(&exit, 50.0)), "max": json_ms(exit.last().copied())},
                "drain_ms": {"median": json_ms(percentile(&drain, 50.0)), "max": json_ms(drain.last().copied())},
                "per_restart": rp.restarts.iter().map(|r| json!({
                    "generation": r.generation, "old_pid": r.old_pid, "new_pid": r.new_pid,
                    "succeeded": r.succeeded, "reason": r.reason,
                    "ready_ms": r.ready_us as f64 / 1000.0, "rpc_ms": ms(r.rpc),
                    "old_exit_ms": json_ms(r.old_exit.map(|e| e.saturating_duration_since(r.trigger()))),
                    "drain_ms": r.drain_us.map(|u| u as f64 / 1000.0),
                })).collect::<Vec<_>>(),
            });
            let v = json!({
                "settings": {
                    "duration_ms": args.duration.as_millis() as u64,
                    "restart_every_ms": args.restart_every.as_millis() as u64,
                    "keepalive": args.keepalive,
                    "fresh": args.fresh,
                    "requests_bound": args.requests,
                    "rounds": args.rounds,
                    "warmup_ms": args.warmup.as_millis() as u64,
                    "cpus": cpus,
                    "loadavg_1m_before": load_before,
                    "loadavg_1m_after": load_after,
                },
                "throughput": {
                    "runs": tp.tp.runs.iter().map(|r| json!({
                        "target": r.target, "round": r.round, "requests": r.requests,
                        "ok": r.ok, "failed": r.failed, "rps": r.rps.round(),
                        "foreign_cpu": r.foreign_cpu, "skewed": r.skewed,
                    })).collect::<Vec<_>>(),
                    "best_demo_rps": tp.best_demo.round(),
                    "best_peer_rps": tp.best_peer.round(),
                    "ratio": tp.ratio,
                    "median_ratio": tp.median_ratio,
                },
                "restart": restart_json,
                "memory": {
                    "supervisor_rss_bytes_start": supervisor_rss_start.map(|r| r.rss),
                    "supervisor_rss_bytes": rp.supervisor_rss.map(|r| r.rss),
                    "supervisor_hwm_bytes": rp.supervisor_rss.map(|r| r.hwm),
                    "supervisor_rss_anon_bytes": rp.supervisor_rss.map(|r| r.anon),
                    "supervisor_rss_file_bytes": rp.supervisor_rss.map(|r| r.file),
                    "supervisor_pss_bytes": rp.supervisor_rss.and_then(|r| r.pss),
                    "worker_pid": rp.worker_pid,
                    "worker_rss_bytes": rp.worker_rss.map(|r| r.rss),
                    "worker_hwm_bytes": rp.worker_rss.map(|r| r.hwm),
                    "worker_rss_anon_bytes": rp.worker_rss.map(|r| r.anon),
                    "worker_rss_file_bytes": rp.worker_rss.map(|r| r.file),
                    "worker_pss_bytes": rp.worker_rss.and_then(|r| r.pss),
                    "generation": rp.generation,
                },
                "agent_shutdown": shutdown.map(|s| s.to_string()),
                "verdicts": verdicts.iter().map(|v| json!({"pass": v.pass, "target": v.what, "figure": v.figure})).collect::<Vec<_>>(),
                "pass": all_pass,
                "busy_machine": busy_machine,
            });
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        OutputFormat::Text => {
            let mut o = String::new();
            let mut line = |s: String| {
                o.push_str(&s);
                o.push('\n');
            };
            line(format!(
                "restart-bench: fleet-agent demo app vs hello-peer (bare axum), loopback, {cpus} CPUs shared with the load generator"
            ));
            line(format!("load: {load_desc}"));
            let la = |l: Option<f64>| l.map_or("?".to_string(), |l| format!("{l:.2}"));
            line(format!(
                "machine 1-min load average: {} before, {} after (other work on these CPUs skews every figure)",
                la(load_before),
                la(load_after)
            ));
            line(String::new());
            line("== Throughput, no restarts ==".to_string());
            line(format!(
                "runs alternate demo, peer ({} rounds, after an unmeasured {:?} warm-up of each); the best run of each counts,",
                args.rounds, args.warmup
            ));
            line("so that a noisy run on a small machine does not decide the ratio; a run during which other processes".to_string());
            line(format!(
                "took more than {:.0}% of the CPUs is skewed: repeated (at most {} extra runs) and left out of the best",
                FOREIGN_CPU_WARN * 100.0,
                args.rounds
            ));
            line(format!(
                "  {:<6} {:<5} {:>10} {:>10} {:>7}  {}",
                "round", "app", "requests", "req/s", "failed", "CPU used by other processes"
            ));
            for r in &tp.tp.runs {
                line(format!(
                    "  {:<6} {:<5} {:>10} {:>10.0} {:>7}  {}",
                    r.round,
                    r.target,
                    r.requests,
                    r.rps,
                    r.failed,
                    if r.skewed {
                        format!("{} (skewed: not counted)", fmt_pct(r.foreign_cpu))
                    } else {
                        fmt_pct(r.foreign_cpu)
                    }
                ));
            }
            line(format!(
                "best demo {:.0} req/s, best peer {:.0} req/s, ratio demo/peer {:.3} (runs: demo {}, peer {} req/s)",
                tp.best_demo,
                tp.best_peer,
                tp.ratio,
                tp.tp.spread("demo"),
                tp.tp.spread("peer")
            ));
            line(format!(
                "(ratio of the medians of the same runs: {:.3}; the verdict uses the best runs)",
                tp.median_ratio
            ));
            if all_skewed("demo") || all_skewed("peer") {
                line(format!(
                    "WARNING: other processes took more than {:.0}% of the CPUs during every run of a target; the ratio is skewed",
                    FOREIGN_CPU_WARN * 100.0
                ));
            }
            line(String::new());
            line("== Restart under load ==".to_string());
            line(format!(
                "{:?} of load; no restart in the first {:?} and after {:?} (steady state); in between a gRPC Restart every {:?}, one at a time",
                args.duration,
                rp.lead,
                rp.lead + rp.restart_span,
                args.restart_every
            ));
            line(format!(
                "latency figures leave out requests started in the first {:?} (load ramp-up); failures count from the start",
                RAMP_UP
            ));
            line(window_def.clone());
            line(format!(
                "restarts: {} ({succeeded} succeeded, {failed_restarts} failed), {} refused as busy and retried; generation now {}",
                rp.restarts.len(),
                rp.refused,
                rp.generation
            ));
            for ex in &rp.refusal_examples {
                line(format!("  refusal: {ex}"));
            }
            for e in &rp.errors {
                line(format!("  error: {e}"));
            }
            if !rp.other_events.is_empty() {
                line(format!("  other Watch events: {:?}", rp.other_events));
            }
            line(format!(
                "requests: {} ({} ok, {} failed: {} in restart windows, {} in steady state), {:.0} req/s; restart windows cover {:.1} s of {:.1} s; CPU used by other processes {}",
                rp.report.requests,
                rp.report.ok,
                rp.report.failed,
                rp.failed_in_window,
                rp.failed_steady,
                ok_rps(&rp.report),
                rp.window_time.as_secs_f64(),
                rp.report.elapsed.as_secs_f64(),
                fmt_pct(rp.foreign_cpu)
            ));
            if rp.foreign_cpu.is_some_and(|f| f > FOREIGN_CPU_WARN) {
                line(format!(
                    "WARNING: other processes took more than {:.0}% of the CPUs during the restart phase; its latencies are skewed",
                    FOREIGN_CPU_WARN * 100.0
                ));
            }
            line(format!(
                "  keep-alive clients reconnected {} times after a polite close (Connection: close or closed before a write), {} requests re-sent unsent (not failures)",
                rp.report.reconnects, rp.report.unsent_retries
            ));
            for (kind, (n, ex)) in &failure_kinds {
                line(format!("  failure {kind}: {n}"));
                for m in ex {
                    line(format!("    e.g. {m}"));
                }
            }
            line(format!(
                "latency steady:   p50 {:>9}  p99 {:>9}  p99.9 {:>9}  max {:>9}  ({} requests)",
                fmt_ms(rp.steady.p50),
                fmt_ms(rp.steady.p99),
                fmt_ms(rp.steady.p999),
                fmt_ms(rp.steady.max),
                rp.steady.count
            ));
            line(format!(
                "  of which before the first restart: p99 {} ({} requests), after the last window: p99 {} ({} requests)",
                fmt_ms(rp.steady_before.p99),
                rp.steady_before.count,
                fmt_ms(rp.steady_after.p99),
                rp.steady_after.count
            ));
            line(format!(
                "latency windows:  p50 {:>9}  p99 {:>9}  p99.9 {:>9}  max {:>9}  ({} requests)",
                fmt_ms(rp.window.p50),
                fmt_ms(rp.window.p99),
                fmt_ms(rp.window.p999),
                fmt_ms(rp.window.max),
                rp.window.count
            ));
            line(format!(
                "p99 windows / steady: {}",
                p99_ratio.map_or("n/a".to_string(), |r| format!("{r:.2}"))
            ));
            line(format!(
                "trigger->READY (agent's timings.ready_us): median {}  p90 {}  max {}",
                fmt_ms(percentile(&ready, 50.0)),
                fmt_ms(percentile(&ready, 90.0)),
                fmt_ms(ready.last().copied())
            ));
            line(format!(
                "Restart call round trip (bench):          median {}  max {}",
                fmt_ms(percentile(&rpc, 50.0)),
                fmt_ms(rpc.last().copied())
            ));
            line(format!(
                "trigger->old worker exit (DRAINED seen):  median {}  max {}  ({} of {} seen)",
                fmt_ms(percentile(&exit, 50.0)),
                fmt_ms(exit.last().copied()),
                exit.len(),
                succeeded
            ));
            line(format!(
                "SIGTERM->old worker exit (drain, agent):  median {}  max {}",
                fmt_ms(percentile(&drain, 50.0)),
                fmt_ms(drain.last().copied())
            ));
            line(format!(
                "supervisor RSS: {} at the end [{}] (peak {}, {} at start)",
                fmt_bytes(rp.supervisor_rss.map(|r| r.rss)),
                fmt_split(rp.supervisor_rss),
                fmt_bytes(rp.supervisor_rss.map(|r| r.hwm)),
                fmt_bytes(supervisor_rss_start.map(|r| r.rss))
            ));
            line(format!(
                "worker RSS: {} at the end [{}] (pid {}, peak {})",
                fmt_bytes(rp.worker_rss.map(|r| r.rss)),
                fmt_split(rp.worker_rss),
                rp.worker_pid.map_or("?".to_string(), |p| p.to_string()),
                fmt_bytes(rp.worker_rss.map(|r| r.hwm))
            ));
            line(format!(
                "agent graceful shutdown: {}",
                shutdown.map_or("did not exit within 15 s (killed)".to_string(), |s| s
                    .to_string())
            ));
            if failed_restarts > 0 || !rp.errors.is_empty() || rp.report.failed > 0 {
                line("last agent log lines:".to_string());
                for l in &agent_tail {
                    line(format!("  {l}"));
                }
            }
            line(String::new());
            line("== Verdicts ==".to_string());
            for v in &verdicts {
                line(format!(
                    "{}  {}: {}",
                    if v.pass { "PASS" } else { "FAIL" },
                    v.what,
                    v.figure
                ));
            }
            print!("{o}");
        }
    }
    Ok(all_pass)
}
