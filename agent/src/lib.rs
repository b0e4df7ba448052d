//! Fleet's node agent: zero-downtime restarts of one node.
//!
//! A supervisor with a stable PID owns the listening sockets and hands them to worker
//! generations (systemd socket activation: fds 3.., `LISTEN_FDS`, `LISTEN_FDNAMES`);
//! a new generation says `READY=1` (sd_notify) before the old one is told to drain.
//! The same [`run`] becomes the supervisor or a worker depending on its environment,
//! so a Rust app embeds the whole thing around its own axum `Router`:
//!
//! ```no_run
//! use axum::{Router, routing::get};
//!
//! fn main() -> std::process::ExitCode {
//!     fleet_agent::run(|| Router::new().route("/", get(|| async { "hello" })))
//! }
//! ```
//!
//! An app's own code can restart or shut down its node through [`Node`].
//!
//! The public surface is that: [`run`], [`Config`] and [`Node`] with the types of its
//! requests and reports. Modules, in the order a request to restart flows through them:

/// Command-line flags, merged on top of the configuration file.
mod cli;
/// The configuration: one serde struct with defaults and validation.
pub mod config;
/// Log lines that name the process that wrote them; caller values escaped.
mod logging;
/// The control endpoint: gRPC `AgentService`, `/debug/admin`, `/healthz`, `/metrics`.
mod control;
/// The app's own handle on its node: restart, shut down, status.
mod node;
/// Executable validation: allowed directories, mode, owner, sha256.
mod exe;
/// The supervisor: the restart lifecycle, generations, reaping, signals, shutdown.
mod supervisor;
/// The lifecycle phases and the events that report them.
mod phase;
/// The node's listening sockets, bound once.
mod listeners;
/// Passing sockets across `exec` (the one module with `unsafe`).
mod process;
/// sd_notify, both ends.
mod notify;
/// The worker: adopt listeners, serve, say READY, drain.
mod worker;
/// Serving a `Router` on listeners, and draining without losing a request.
mod serve;
/// HTTPS with rustls.
mod tls;
/// Prometheus metrics.
mod metrics;
/// The controllers a node talks to, and which one now (several on one store).
mod controllers;
/// Heartbeats to the fleet's controllers.
mod heartbeat;
/// Calls the controller makes on the heartbeat stream.
mod commands;
/// `--health-check`: probe a running agent's `/healthz`.
mod health_check;
/// The node's certificate for mutual TLS with an `https://` controller.
mod identity;
/// The demo app.
#[doc(hidden)]
pub mod demo;

use std::ffi::OsString;
use std::process::ExitCode;

use clap::Parser;

pub use config::Config;
pub use exe::ExeInfo;
pub use node::{APP_SOCKET_ENV, Node, NodeError};
pub use supervisor::{
    ListenerReport, NodeState, Outcome, RestartReport, RestartRequest, StatusReport, Timings,
    WorkerReport,
};

use supervisor::Supervisor;

/// Runs the agent around `app`: parses the command line and configuration, then
/// supervises (in the process you start) or serves `app` (in each worker generation).
/// Exit codes: 0 after a graceful shutdown, 1 on a failure at run time, 2 for bad
/// configuration.
pub fn run<F>(app: F) -> ExitCode
where
    F: FnOnce() -> axum::Router,
{
    let worker = std::env::var_os("FLEET_ROLE").is_some_and(|r| r == "worker");
    if worker {
        // Not for the worker's own children.
        process::remove_env_early("FLEET_ROLE");
    }
    // Parsed first: the flag or the file says how to log. (clap's own errors go to
    // stderr as text; a file that cannot be read is reported in the flag's format.)
    let cli = cli::Cli::parse();
    if cli.health_check {
        return health_check::run(cli.control_addr());
    }
    let config = cli.config();
    logging::init(
        if worker { "worker" } else { "supervisor" },
        match &config {
            Ok(config) => config.log_format,
            Err(_) => cli.log_format.unwrap_or_default(),
        },
    );
    let config = match config {
        Ok(config) => config,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(2);
        }
    };
    if cli.print_config {
        match toml::to_string_pretty(&config) {
            Ok(text) => print!("{text}"),
            Err(e) => {
                tracing::error!("cannot print the configuration: {e}");
                return ExitCode::FAILURE;
            }
        }
        return ExitCode::SUCCESS;
    }
    if worker {
        return worker::run(config, app());
    }
    supervise(config)
}

/// How long a node that stopped waits for its last heartbeat to reach the controller.
const LAST_BEAT_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The supervisor's main: a current-thread runtime (see `supervisor::reaper`).
fn supervise(config: Config) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let (exe, args, kind) = match &config.exec {
            Some(exec) => (
                exec.path.clone(),
                exec.args.iter().map(OsString::from).collect(),
                supervisor::WorkerKind::Exec,
            ),
            None => match std::env::current_exe() {
                Ok(exe) => (
                    exe,
                    std::env::args_os().skip(1).collect(),
                    supervisor::WorkerKind::Library,
                ),
                Err(e) => {
                    tracing::error!("cannot find this program's executable: {e}");
                    return ExitCode::FAILURE;
                }
            },
        };
        let supervisor = match Supervisor::new(config, exe, args, kind) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::FAILURE;
            }
        };
        let control = match control::Control::bind(&supervisor).await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("{e:#}");
                return ExitCode::FAILURE;
            }
        };
        let config = supervisor.config();
        let tls = config.mtls().then(|| {
            identity::start(
                config.controller.clone(),
                config.node_id.clone(),
                config.join.clone(),
            )
        });
        let control = match &tls {
            Some(tls) => control.with_tls(tls.server.clone()),
            None => control,
        };
        if let Ok(addr) = control.local_addr() {
            tracing::info!("control endpoint listening on {addr}");
        }
        tokio::spawn(control.serve());
        let urls = supervisor.config().controller.clone();
        let heartbeat = (!urls.is_empty()).then(|| {
            let tls = tls.as_ref().map(|t| t.client.clone());
            tokio::spawn(heartbeat::run(supervisor.clone(), urls, tls))
        });
        if let Err(e) = supervisor.run().await {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
        if let Some(heartbeat) = heartbeat {
            // Its last beat says "stopped"; a controller that is down does not hold
            // the exit up for long.
            if tokio::time::timeout(LAST_BEAT_WAIT, heartbeat)
                .await
                .is_err()
            {
                tracing::warn!("could not tell the controller that this node stopped");
            }
        }
        ExitCode::SUCCESS
    })
}
