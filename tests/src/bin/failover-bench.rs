//! `failover-bench`: how long a rollout stands still when its leader dies.
//!
//! ```text
//! cargo build --workspace --bins && target/debug/failover-bench --trials 20
//! ```
//!
//! Three `fleet-controller`s share a three-member etcd cluster (real `etcd` processes
//! on loopback ports) with `--lease-ttl` (default 3 s, the controller's default); three
//! real agents. Each trial starts a rollout (one node at a time, 300 ms soak, between
//! two copies of fleet-agent), waits until its first node is healthy, `SIGKILL`s the
//! leader, and measures the time from the kill to the rollout's next step taken by the
//! new leader (the first timeline entry after the kill that is not the takeover note).
//! The killed controller is started again and the rollout is waited out before the
//! next trial. It prints each trial, then p50/p90/max against the lease TTL. No target:
//! figures only. Exit status 0 when every trial's rollout succeeded, 2 otherwise.
//! Loopback only; every wait is bounded; everything it started is killed on exit.

use std::ffi::OsString;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use fleet_tests::bench::stats::{percentile, sorted};
use fleet_tests::etcd::EtcdCluster;
use fleet_tests::fleet::{Controller, ControllerOpts, TestStore, agent_release, node_id};
use fleet_tests::{Agent, AgentOpts};

#[derive(Debug, Parser)]
#[command(about = "Leader failover time of a rollout (3 controllers on etcd)")]
struct Args {
    /// How many times the leader is killed.
    #[arg(long, default_value_t = 20)]
    trials: usize,
    /// The controllers' --lease-ttl.
    #[arg(long, default_value = "3s")]
    lease_ttl: String,
    /// Agents (nodes of each rollout).
    #[arg(long, default_value_t = 3)]
    nodes: usize,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(2),
        Err(e) => {
            eprintln!("failover-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// The index of the controller that leads now, as the controllers say.
async fn leader(controllers: &[Controller]) -> anyhow::Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        for c in controllers {
            let Ok(group) = c
                .grpc()
                .get_controllers(fleet_proto::v1::GetControllersRequest {})
                .await
            else {
                continue;
            };
            let group = group.into_inner();
            if let Some(url) = group.controllers.iter().find(|c| c.leader).map(|c| &c.url)
                && let Some(i) = controllers.iter().position(|c| c.url() == *url)
            {
                return Ok(i);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("no controller leads after 30 s")
}

async fn run(args: &Args) -> anyhow::Result<bool> {
    let ttl = humantime::parse_duration(&args.lease_ttl)?;
    let etcd = Arc::new(EtcdCluster::start(3).await);
    let prefix = format!("/failover-bench-{}/", std::process::id());
    let mut controllers = Vec::new();
    for _ in 0..3 {
        controllers.push(
            Controller::start(ControllerOpts {
                args: vec![
                    OsString::from("--lease-ttl"),
                    OsString::from(&args.lease_ttl),
                ],
                store: TestStore::Shared(etcd.clone(), prefix.clone()),
                ..ControllerOpts::default()
            })
            .await,
        );
    }
    let urls = controllers
        .iter()
        .map(|c| c.url())
        .collect::<Vec<_>>()
        .join(",");
    let releases = tempfile::tempdir()?;
    let exes = [
        agent_release(releases.path(), "fleet-agent-v1"),
        agent_release(releases.path(), "fleet-agent-v2"),
    ];
    let mut agents: Vec<Agent> = Vec::new();
    for i in 0..args.nodes {
        let opts = AgentOpts::default()
            .arg("--controller")
            .arg(&urls)
            .arg("--node-id")
            .arg(node_id(i))
            .arg("--allowed-exe-dir")
            .arg(releases.path());
        agents.push(Agent::start(opts).await);
    }
    let ids: Vec<String> = (0..args.nodes).map(node_id).collect();
    let first = leader(&controllers).await?;
    controllers[first]
        .wait_nodes(&ids, "serving", Duration::from_secs(30))
        .await;

    let mut gaps = Vec::new();
    let mut all_succeeded = true;
    println!(
        "{} trials, 3 controllers, 3 etcd members, {} nodes, --lease-ttl {}",
        args.trials, args.nodes, args.lease_ttl
    );
    for trial in 0..args.trials {
        let exe = &exes[trial % 2];
        let lead = leader(&controllers).await?;
        let reader = (lead + 1) % 3;
        let ctl = controllers[reader]
            .fleetctl([
                OsString::from("--controller"),
                OsString::from(&urls),
                "rollout".into(),
                "--exe".into(),
                exe.clone().into_os_string(),
                "--max-parallel".into(),
                "1".into(),
                "--min-healthy".into(),
                "300ms".into(),
                "--detach".into(),
                "-o".into(),
                "json".into(),
            ])
            .await;
        let id = ctl.expect_code(0).json()["id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        controllers[reader]
            .wait_rollout(&id, "a node healthy", Duration::from_secs(60), |r| {
                r.nodes.iter().any(|n| n.state == "healthy")
            })
            .await;
        let killed_at = now_ms();
        controllers[lead].kill();
        let moved = controllers[reader]
            .wait_rollout(&id, "a step after the kill", Duration::from_secs(60), |r| {
                r.nodes
                    .iter()
                    .flat_map(|n| &n.timeline)
                    .any(|t| t.unix_ms > killed_at && !t.message.starts_with("leader change"))
            })
            .await;
        let step = moved
            .nodes
            .iter()
            .flat_map(|n| &n.timeline)
            .filter(|t| t.unix_ms > killed_at && !t.message.starts_with("leader change"))
            .map(|t| t.unix_ms)
            .min()
            .unwrap_or(killed_at);
        let gap = Duration::from_millis(step - killed_at);
        println!(
            "trial {:>2}: leader {lead} killed, rollout moving again after {gap:?}",
            trial + 1
        );
        gaps.push(gap);
        controllers[lead].restart().await;
        let done = controllers[reader]
            .wait_rollout_end(&id, Duration::from_secs(60))
            .await;
        if done.state != "succeeded" {
            println!(
                "trial {}: rollout {id} ended {} ({})",
                trial + 1,
                done.state,
                done.reason
            );
            all_succeeded = false;
        }
    }
    let gaps = sorted(gaps);
    let show = |p: f64| percentile(&gaps, p).map_or("-".into(), |d| format!("{d:?}"));
    let p90 = percentile(&gaps, 90.0).unwrap_or_default();
    println!(
        "failover (SIGKILL of the leader → the rollout's next step): p50 {} p90 {} max {} over {} trials; lease TTL {:?}; p90 ÷ TTL {:.2}",
        show(50.0),
        show(90.0),
        show(100.0),
        gaps.len(),
        ttl,
        p90.as_secs_f64() / ttl.as_secs_f64()
    );
    Ok(all_succeeded)
}
