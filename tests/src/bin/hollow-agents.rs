//! `hollow-agents`: **a test tool** — N simulated Fleet agents in one process, for
//! exercising a controller at fleet scale without N real nodes.
//!
//! ```text
//! cargo build --release -p fleet-tests --bin hollow-agents
//! target/release/hollow-agents --count 10000 --controller "$FLEET_CONTROLLER"
//! ```
//!
//! Each hollow agent serves the real `fleet.v1.AgentService` on its own
//! `127.0.0.1:0` port (127.0.0.2, … past the first 5,000 indexes) and registers and heartbeats like `fleet-agent --controller`,
//! but nothing runs behind it: restarts sleep `--restart-latency` (± jitter) and, when
//! into another exe than the one it started with, fail with probability `--failure-rate`; PIDs, exe digests and sizes are made up (see
//! `fleet_tests::hollow`). Node ids are `hollow-00000`, `hollow-00001`, ...; labels
//! `sim=hollow`, `shard=<index % 10>` and any `--label`.
//!
//! Prints `hollow agents ready: N` on stdout once every agent serves and (with
//! `--controller`) the controller accepted its first heartbeat; with `--print-addrs`
//! first one `NODE_ID ADDR` line per agent. Runs until SIGINT / SIGTERM, then prints
//! a summary on stderr. Exit status: 0 after a signal, 2 when it could not start.
//!
//! With `--stdin-commands` (how `scale-bench` drives it) it also reads commands, one
//! per line, from stdin and answers on stdout: `stats` prints one `stats at_ms=...`
//! line of fleet counters; `restarts` prints a `restart NODE_ID START_UNIX_US
//! DURATION_US ok|failed GENERATION EXE` line per restart so far, then `restarts end
//! COUNT`. End of stdin stops it, so the agents die with the program driving them.

use std::collections::HashSet;
use std::io::Write as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use fleet_tests::hollow::{HollowConfig, HollowFleet, nofile_needed, raise_nofile};
use std::io::BufRead as _;

#[derive(Debug, Parser)]
#[command(
    name = "hollow-agents",
    about = "TEST TOOL: many simulated Fleet agents (real AgentService, simulated restarts) in one process",
    long_about = "TEST TOOL: many simulated Fleet agents in one process. Each serves the real \
                  fleet.v1.AgentService on its own loopback port and heartbeats to the \
                  controller like fleet-agent --controller, but no process runs behind it: \
                  restarts only sleep, PIDs and digests are fake. For scale tests and \
                  benchmarks of the controller; never point it at a production controller."
)]
struct Args {
    /// Number of simulated agents.
    #[arg(long, default_value_t = 100)]
    count: usize,
    /// Controller to register with and heartbeat to (omit: serve only, no heartbeats).
    #[arg(long, env = "FLEET_CONTROLLER")]
    controller: Option<String>,
    /// Token sent to the controller (`authorization: Bearer TOKEN`).
    #[arg(long, env = "FLEET_TOKEN")]
    token: Option<String>,
    /// Token every AgentService call must carry (default: none required).
    #[arg(long)]
    agent_token: Option<String>,
    /// Simulated restart time (call to new worker ready).
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    restart_latency: Duration,
    /// Each restart takes restart-latency ± up to this much (uniform).
    #[arg(long, default_value = "10ms", value_parser = humantime::parse_duration)]
    restart_jitter: Duration,
    /// Probability (0..1) that a restart into a new exe fails (OUTCOME_FAILED with a
    /// reason); a restart back into the exe it started with never does.
    #[arg(long, default_value_t = 0.0)]
    failure_rate: f64,
    /// The first heartbeats are spread uniformly over this window.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    heartbeat_jitter: Duration,
    /// Node ids whose Preflight refuses (comma-separated or repeated).
    #[arg(long, value_delimiter = ',')]
    refuse_preflight_for: Vec<String>,
    /// Extra label on every agent, KEY=VALUE (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Node id prefix (ids are PREFIX00000, PREFIX00001, ...).
    #[arg(long, default_value = "hollow-")]
    id_prefix: String,
    /// Index of the first agent (to run several processes side by side).
    #[arg(long, default_value_t = 0)]
    first_index: usize,
    /// The executable every agent starts with.
    #[arg(long, default_value = "/opt/app-v1")]
    exe: String,
    /// HTTP/2 connections to the controller shared by all agents' heartbeats; 0: one
    /// per agent, as real agents have (the controller then needs a descriptor each).
    #[arg(long, default_value_t = 0)]
    channels: usize,
    /// A `Heartbeat` call per beat, as agents from before `HeartbeatStream` send them
    /// (default: one long-lived `HeartbeatStream` call per agent).
    #[arg(long)]
    unary_heartbeats: bool,
    /// The agents take no calls on their heartbeat stream: the controller dials each
    /// one's control port (as agents from before `Command`).
    #[arg(long)]
    dialled_calls: bool,
    /// Answers on the stream go without the agent's status, and every beat is sent
    /// (as agents from before `status_with_answers`).
    #[arg(long)]
    answers_without_status: bool,
    /// Print one `NODE_ID ADDR` line per agent on stdout before the ready line.
    #[arg(long)]
    print_addrs: bool,
    /// Read `stats` / `restarts` commands from stdin, answer on stdout; stop at EOF.
    #[arg(long)]
    stdin_commands: bool,
    /// Seed of the simulated latencies and failures.
    #[arg(long, default_value_t = 0x5eed_f1ee7)]
    seed: u64,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().into(), v.trim().into())),
        _ => Err(format!("label {s:?} must be KEY=VALUE")),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hollow-agents: cannot start the tokio runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let code = runtime.block_on(async {
        match run(args).await {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("hollow-agents: error: {e:#}");
                2
            }
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(2));
    ExitCode::from(code)
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.count == 0 {
        bail!("--count must be at least 1");
    }
    if !(0.0..=1.0).contains(&args.failure_rate) {
        bail!("--failure-rate must be between 0 and 1");
    }
    let needed = nofile_needed(args.count, args.channels);
    let limit = raise_nofile(needed)?;
    if limit < needed {
        eprintln!(
            "hollow-agents: warning: open-file limit {limit} < {needed} needed for {} agents \
             (a listener and a heartbeat connection each, plus the controller's connections); \
             raise it (ulimit -Hn), share connections (--channels N) or run fewer",
            args.count
        );
    }
    let cfg = HollowConfig {
        count: args.count,
        first_index: args.first_index,
        id_prefix: args.id_prefix,
        controller: args.controller.clone(),
        token: args.token,
        agent_token: args.agent_token,
        restart_latency: args.restart_latency,
        restart_jitter: args.restart_jitter,
        failure_rate: args.failure_rate,
        heartbeat_jitter: args.heartbeat_jitter,
        refuse_preflight_for: args
            .refuse_preflight_for
            .into_iter()
            .collect::<HashSet<_>>(),
        initial_exe: args.exe,
        labels: args.labels,
        channels: args.channels,
        unary_heartbeats: args.unary_heartbeats,
        dialled_calls: args.dialled_calls,
        answers_without_status: args.answers_without_status,
        seed: args.seed,
        ..HollowConfig::default()
    };
    let started = Instant::now();
    let fleet = HollowFleet::start(cfg)
        .await
        .context("cannot start the hollow agents")?;
    if args.print_addrs {
        let mut out = std::io::stdout().lock();
        for (id, addr) in fleet.addrs() {
            writeln!(out, "{id} {addr}")?;
        }
    }
    let stop_reason = {
        let commands = async {
            if args.stdin_commands {
                commands(&fleet).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::pin!(commands);
        let wait = fleet.wait_registered(None, Duration::from_secs(5), |s| {
            eprintln!(
                "hollow-agents: {}/{} registered with {}; last heartbeat error: {}",
                s.registered,
                s.agents,
                args.controller.as_deref().unwrap_or("-"),
                s.last_heartbeat_error.as_deref().unwrap_or("none")
            );
        });
        let early = tokio::select! {
            res = wait => {
                res?;
                None
            }
            () = interrupted() => Some("interrupted before all agents registered"),
            () = &mut commands => Some("stdin closed before all agents registered"),
        };
        match early {
            Some(why) => why,
            None => {
                {
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "hollow agents ready: {}", fleet.len())?;
                    out.flush()?;
                }
                eprintln!(
                    "hollow-agents: {} agents ready in {:.2?}",
                    fleet.len(),
                    started.elapsed()
                );
                tokio::select! {
                    () = interrupted() => "signal",
                    () = &mut commands => "stdin closed",
                }
            }
        }
    };
    let s = fleet.stats();
    eprintln!(
        "hollow-agents: stopping ({stop_reason}); heartbeats ok {} failed {}, restarts succeeded {} failed {}",
        s.heartbeats_ok, s.heartbeats_failed, s.restarts_succeeded, s.restarts_failed
    );
    fleet.shutdown().await;
    Ok(())
}

/// Answers `stats` and `restarts` commands from stdin until it closes.
async fn commands(fleet: &HollowFleet) {
    // One thread reads stdin (tokio's stdin is not enabled in this workspace).
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    while let Some(line) = lines.recv().await {
        let answer = match line.trim() {
            "stats" => fleet.stats().to_line(unix_ms()),
            "restarts" => {
                let records = fleet.restarts();
                let mut out = String::with_capacity(records.len() * 80 + 32);
                for r in &records {
                    out.push_str(&r.to_line());
                    out.push('\n');
                }
                out.push_str(&format!("restarts end {}", records.len()));
                out
            }
            "" => continue,
            other => {
                eprintln!("hollow-agents: unknown command {other:?} (want stats or restarts)");
                continue;
            }
        };
        let mut out = std::io::stdout().lock();
        if writeln!(out, "{answer}")
            .and_then(|()| out.flush())
            .is_err()
        {
            return;
        }
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

async fn interrupted() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
