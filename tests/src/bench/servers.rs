//! The workspace's own servers as a benchmark runs them: the demo app under
//! `fleet-agent` and `hello-peer` (a bare axum hello server), each started from its
//! release binary on a loopback port and found by the address it logs.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use fleet_proto::v1::StatusResponse;
use fleet_proto::v1::agent_service_client::AgentServiceClient;
use tokio::sync::mpsc;
use tonic::transport::Channel;

use super::child::{Proc, command, spawn};
use super::drain_lines;

/// How long a server may take to report its addresses.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Flags every `fleet-agent` a benchmark starts gets besides its own (set once, before
/// the first starts: `peer-bench --agent-arg`).
static AGENT_ARGS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();

/// Sets the flags of [`AGENT_ARGS`]; a second call changes nothing.
pub fn add_agent_args(args: Vec<String>) {
    let _ = AGENT_ARGS.set(args);
}

/// A running `fleet-agent` (demo app): the supervisor, its control endpoint and
/// the app's address.
#[derive(Debug)]
pub struct FleetAgent {
    pub proc: Proc,
    pub control: SocketAddr,
    pub http: SocketAddr,
}

#[derive(Debug)]
enum AgentLine {
    Control(SocketAddr),
    Http(SocketAddr),
}

/// Starts `fleet-agent --listen LISTEN --control 127.0.0.1:0` with `env` added, and
/// returns once both addresses are logged.
pub async fn start_agent(
    exe: &Path,
    listen: &str,
    env: &[(&str, OsString)],
) -> anyhow::Result<FleetAgent> {
    let mut cmd = command(exe, &["--listen", listen, "--control", "127.0.0.1:0"]);
    cmd.args(AGENT_ARGS.get().into_iter().flatten());
    cmd.env("NO_COLOR", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let (mut proc, pipes) = spawn("fleet-agent", cmd)?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    if let Some(stdout) = pipes.stdout {
        drain_lines(stdout, Arc::new(Mutex::new(VecDeque::new())), |_| {});
    }
    if let Some(stderr) = pipes.stderr {
        drain_lines(stderr, proc.stderr_tail.clone(), move |line| {
            if let Some(rest) = after(line, "control endpoint listening on ") {
                if let Some(a) = parse_addr(rest) {
                    let _ = tx.send(AgentLine::Control(a));
                }
            } else if line.contains("http server 'default' started listening on ")
                && let Some(a) = after(line, "started listening on ").and_then(parse_addr)
            {
                let _ = tx.send(AgentLine::Http(a));
            }
        });
    }
    let (mut control, mut http) = (None, None);
    let deadline = tokio::time::Instant::now() + STARTUP_TIMEOUT;
    while control.is_none() || http.is_none() {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(AgentLine::Control(a))) => control = Some(a),
            Ok(Some(AgentLine::Http(a))) => http = Some(a),
            Ok(None) | Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await; // let the tail fill
                let status = proc.exited();
                bail!(
                    "fleet-agent did not report its addresses within {:?} ({}); \
                     want `control endpoint listening on ADDR` and \
                     `http server 'default' started listening on [ADDR]`; last stderr lines:\n  {}",
                    STARTUP_TIMEOUT,
                    status.map_or("still running".to_string(), |s| s.to_string()),
                    proc.tail(15).join("\n  ")
                );
            }
        }
    }
    let (Some(control), Some(http)) = (control, http) else {
        unreachable!("loop exits only with both addresses");
    };
    Ok(FleetAgent {
        proc,
        control,
        http,
    })
}

impl FleetAgent {
    /// A gRPC client of its control endpoint.
    pub async fn grpc(&self) -> anyhow::Result<AgentServiceClient<Channel>> {
        let endpoint = format!("http://{}", self.control);
        tokio::time::timeout(
            STARTUP_TIMEOUT,
            AgentServiceClient::connect(endpoint.clone()),
        )
        .await
        .map_err(|_| anyhow!("connecting to {endpoint} timed out"))?
        .with_context(|| format!("cannot connect to the control endpoint {endpoint}"))
    }
}

/// The serving worker of a status (the newest generation if none says serving):
/// its pid and generation.
pub fn serving_worker(status: &StatusResponse) -> Option<(u32, u64)> {
    status
        .workers
        .iter()
        .filter(|w| w.state == "serving")
        .max_by_key(|w| w.generation)
        .or_else(|| status.workers.iter().max_by_key(|w| w.generation))
        .map(|w| (w.pid, w.generation))
}

/// Starts `hello-peer --listen LISTEN` and returns once it printed its address.
pub async fn start_hello_peer(exe: &Path, listen: &str) -> anyhow::Result<(Proc, SocketAddr)> {
    let (mut proc, pipes) = spawn("hello-peer", command(exe, &["--listen", listen]))?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    if let Some(stdout) = pipes.stdout {
        drain_lines(stdout, Arc::new(Mutex::new(VecDeque::new())), move |line| {
            if let Some(a) = after(line, "listening on ").and_then(parse_addr) {
                let _ = tx.send(a);
            }
        });
    }
    if let Some(stderr) = pipes.stderr {
        drain_lines(stderr, proc.stderr_tail.clone(), |_| {});
    }
    match tokio::time::timeout(STARTUP_TIMEOUT, rx.recv()).await {
        Ok(Some(addr)) => Ok((proc, addr)),
        _ => {
            let status = proc.exited();
            bail!(
                "hello-peer did not print `listening on ADDR` within {:?} ({}); stderr:\n  {}",
                STARTUP_TIMEOUT,
                status.map_or("still running".to_string(), |s| s.to_string()),
                proc.tail(15).join("\n  ")
            )
        }
    }
}

/// Text after `marker` in `line`, if present.
fn after<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    line.find(marker).map(|i| &line[i + marker.len()..])
}

fn parse_addr(s: &str) -> Option<SocketAddr> {
    s.trim()
        .trim_start_matches('[')
        .split([',', ']', ' '])
        .next()
        .and_then(|a| a.trim().parse().ok())
}
