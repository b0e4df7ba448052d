//! A few real `fleet-agent`s (the demo app) under a [`BenchController`], started the
//! way the test harness starts them (`Controller::agent_opts` / `join_opts`): plain
//! with the bootstrap token, or joined over mutual TLS with a join token and the CA's
//! fingerprint. Then rollouts across them, one node at a time and without a soak,
//! timed from the `StartRollout` call to the end `WatchRollout` reports.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use fleet_proto::v1 as pb;
use fleet_proto::v1::controller_service_client::ControllerServiceClient;
use tempfile::TempDir;
use tonic::transport::Channel;

use super::child::{Proc, command, spawn};
use super::drain_lines;
use super::proc_cpu::{self, CpuUsed};
use super::tls_fleet::{BenchController, Mode};
use crate::fleet::{FINISHED, describe, entered};

/// How long the agents may take to be listed `serving`.
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(60);

/// A running agent (killed with its workers on drop) and its temp dir.
#[derive(Debug)]
pub struct RealAgent {
    pub node_id: String,
    // Declared first: killed before its directory goes.
    proc: Proc,
    _dir: TempDir,
}

/// Starts `count` agents `PREFIX1..PREFIXcount` from `exe`, each allowed to run
/// executables from `releases`, and waits until the controller lists every one of
/// them serving.
pub async fn start_agents(
    exe: &Path,
    controller: &BenchController,
    count: usize,
    prefix: &str,
    releases: &Path,
) -> anyhow::Result<Vec<RealAgent>> {
    let join_token = match controller.mode {
        Mode::Plain => None,
        Mode::Tls => Some(controller.join_token().await?),
    };
    let mut agents = Vec::with_capacity(count);
    for i in 1..=count {
        let node_id = format!("{prefix}{i}");
        let dir = tempfile::Builder::new()
            .prefix("tls-bench-agent")
            .tempdir()
            .context("cannot create a temp dir for an agent")?;
        let url = controller.url();
        let mut args: Vec<PathBuf> = ["--listen", "127.0.0.1:0", "--control", "127.0.0.1:0"]
            .iter()
            .map(PathBuf::from)
            .collect();
        args.extend(["--controller".into(), url.into()]);
        args.extend(["--node-id".into(), node_id.clone().into()]);
        args.extend(["--allowed-exe-dir".into(), releases.to_path_buf()]);
        match (&join_token, &controller.ca) {
            (Some(token), Some(ca)) => {
                let file = dir.path().join("join-token");
                std::fs::write(&file, token)
                    .with_context(|| format!("cannot write {}", file.display()))?;
                args.extend(["--identity-dir".into(), dir.path().join("id")]);
                args.extend(["--join-token-file".into(), file]);
                args.extend(["--ca-hash".into(), ca.hash.clone().into()]);
            }
            _ => args.extend(["--token-file".into(), controller.token_file()]),
        }
        let mut cmd = command(exe, &[]);
        cmd.args(&args).env("NO_COLOR", "1").current_dir(dir.path());
        let (proc, pipes) = spawn("fleet-agent", cmd)?;
        if let Some(stdout) = pipes.stdout {
            drain_lines(stdout, Arc::new(Mutex::new(VecDeque::new())), |_| {});
        }
        if let Some(stderr) = pipes.stderr {
            drain_lines(stderr, proc.stderr_tail.clone(), |_| {});
        }
        agents.push(RealAgent {
            node_id,
            proc,
            _dir: dir,
        });
    }
    wait_serving(controller, &mut agents).await?;
    Ok(agents)
}

async fn wait_serving(
    controller: &BenchController,
    agents: &mut [RealAgent],
) -> anyhow::Result<()> {
    let deadline = Instant::now() + REGISTER_TIMEOUT;
    let mut client = controller.operator().await?;
    loop {
        let nodes = client
            .list_nodes(controller.authed(pb::ListNodesRequest::default()))
            .await
            .context("ListNodes")?
            .into_inner()
            .nodes;
        let missing: Vec<String> = agents
            .iter()
            .filter(|a| {
                !nodes
                    .iter()
                    .any(|n| n.node_id == a.node_id && n.state == "serving")
            })
            .map(|a| a.node_id.clone())
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        for agent in agents.iter_mut() {
            if let Some(status) = agent.proc.exited() {
                bail!(
                    "fleet-agent {} exited ({status}); last stderr lines:\n  {}",
                    agent.node_id,
                    agent.proc.tail(15).join("\n  ")
                );
            }
        }
        if Instant::now() >= deadline {
            let first = agents
                .iter()
                .find(|a| a.node_id == missing[0])
                .map(|a| a.proc.tail(10).join("\n  "))
                .unwrap_or_default();
            bail!(
                "{} of {} agents not serving after {REGISTER_TIMEOUT:?} ({}); last stderr \
                 lines of {}:\n  {first}",
                missing.len(),
                agents.len(),
                missing.join(", "),
                missing[0]
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One timed rollout.
#[derive(Debug, Clone)]
pub struct RolloutRun {
    pub nodes: usize,
    /// `StartRollout` sent → `WatchRollout` says it succeeded.
    pub wall: Duration,
    /// The `StartRollout` call alone (plan and preflight of every node).
    pub start_call: Duration,
    /// Each node's `restarting` → `healthy` (ms resolution).
    pub restart_to_healthy: Vec<Duration>,
    /// The controller's CPU over `wall`.
    pub cpu: CpuUsed,
}

/// Rolls `exe` across every node of `controller`, one at a time, no soak; fails
/// unless the rollout succeeds within `timeout`.
pub async fn roll(
    controller: &BenchController,
    client: &mut ControllerServiceClient<Channel>,
    exe: &Path,
    timeout: Duration,
) -> anyhow::Result<RolloutRun> {
    let pid = controller.pid();
    let cpu_before = proc_cpu::read(pid).ok_or_else(|| anyhow!("the controller is gone"))?;
    let start = Instant::now();
    let started = client
        .start_rollout(controller.authed(pb::RolloutSpec {
            exe: exe.display().to_string(),
            reason: "tls-bench".into(),
            // No soak (not the controller's 10 s default): the handoffs are measured.
            min_healthy_set: true,
            ..Default::default()
        }))
        .await
        .context("StartRollout")?
        .into_inner();
    let start_call = start.elapsed();
    let mut stream = client
        .watch_rollout(controller.authed(pb::GetRolloutRequest {
            id: started.id.clone(),
            ..Default::default()
        }))
        .await
        .context("WatchRollout")?
        .into_inner();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = started;
    while !FINISHED.contains(&last.state.as_str()) {
        match tokio::time::timeout_at(deadline, stream.message()).await {
            Ok(Ok(Some(r))) => last = r,
            Ok(Ok(None)) => bail!(
                "WatchRollout ended before the rollout did: {}",
                describe(&last)
            ),
            Ok(Err(status)) => bail!("WatchRollout: {status}"),
            Err(_) => bail!(
                "the rollout did not end within {timeout:?}: {}",
                describe(&last)
            ),
        }
    }
    let wall = start.elapsed();
    let cpu_after = proc_cpu::read(pid).ok_or_else(|| anyhow!("the controller is gone"))?;
    if last.state != "succeeded" {
        bail!("the rollout did not succeed: {}", describe(&last));
    }
    let restart_to_healthy = last
        .nodes
        .iter()
        .filter_map(|n| {
            let (from, to) = (entered(n, "restarting")?, entered(n, "healthy")?);
            Some(Duration::from_millis(to.saturating_sub(from)))
        })
        .collect();
    Ok(RolloutRun {
        nodes: last.nodes.len(),
        wall,
        start_call,
        restart_to_healthy,
        cpu: cpu_before.until(&cpu_after),
    })
}
