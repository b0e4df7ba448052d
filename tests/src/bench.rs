//! What every benchmark program shares: a runtime, Ctrl-C/SIGTERM handling that drops
//! (and so kills) whatever the benchmark started, and the exit codes
//! (0 every target met, 1 a target missed, 2 could not run, 130 interrupted).

/// Programs a benchmark starts, killed with what they spawned on drop.
pub mod child;
/// Figures about the machine and how busy it was.
pub mod machine;
/// The workspace's servers: the demo app under fleet-agent, hello-peer.
pub mod servers;
/// fleet-controller, started for a benchmark.
pub mod controller;
/// A controller plain or with mutual TLS, and what its clients need to reach it.
pub mod tls_fleet;
/// Simulated agents that register (plain, or by joining over mutual TLS) and heartbeat.
pub mod sim_agents;
/// A few real fleet-agents under a controller, and timed rollouts across them.
pub mod rollouts;
/// Another process's CPU time and memory, from /proc.
pub mod proc_cpu;
/// nginx and HAProxy as peers, and following their reloads.
pub mod peers;
/// Load runs and throughput rounds.
pub mod load;
/// A server under load while it reloads on a schedule (fleet, nginx, HAProxy).
pub mod reload;
/// Latency and failures inside and outside restart windows; formatting.
pub mod stats;

use std::collections::VecDeque;
use std::future::Future;
use std::io::{BufRead, BufReader, Read};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::unistd::Pid;

/// `-o text|json`, the output flag of every benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

/// Runs `bench` to completion; `Ok(true)` means every target was met.
pub fn main<F>(name: &str, bench: F) -> ExitCode
where
    F: Future<Output = anyhow::Result<bool>>,
{
    // One thread per CPU, said explicitly: tokio would take TOKIO_WORKER_THREADS from
    // the environment, which a run may set for the servers it starts (fleet-agent's
    // workers, hello-peer), not for the load generator.
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start the tokio runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let code = runtime.block_on(async {
        // Dropping `bench` drops its process guards, which kill what it started.
        tokio::select! {
            res = bench => match res {
                Ok(true) => 0,
                Ok(false) => 1,
                Err(e) => {
                    eprintln!("{name}: error: {e:#}");
                    2
                }
            },
            () = interrupted() => {
                eprintln!("{name}: interrupted; stopping every process it started");
                130
            }
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(3));
    ExitCode::from(code)
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

/// How many lines of a child's output are kept for error messages.
pub const TAIL_LINES: usize = 40;

pub fn pid_of(pid: u32) -> Pid {
    Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX))
}

pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub use crate::output::strip_ansi;

/// Reads `reader` line by line until EOF (so the child never blocks on a full pipe),
/// keeps the last lines, and hands every line to `on_line`.
pub fn drain_lines(
    reader: impl Read + Send + 'static,
    tail: Arc<Mutex<VecDeque<String>>>,
    mut on_line: impl FnMut(&str) + Send + 'static,
) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(reader);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = strip_ansi(String::from_utf8_lossy(&buf).trim_end());
                    on_line(&line);
                    let mut t = lock(&tail);
                    if t.len() == TAIL_LINES {
                        t.pop_front();
                    }
                    t.push_back(line);
                }
            }
        }
    });
}
