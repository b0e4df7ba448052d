//! HTTP/2 restarts measured by a client nobody here wrote: `h2load` (nghttp2's
//! benchmark, Debian's `nghttp2-client`, installed by `.ci/run`), 16 connections ×
//! 20 concurrent streams, over h2c (prior knowledge) and over HTTPS (h2 by ALPN).
//!
//! h2load does not open a new connection after GOAWAY, so one h2load run can only
//! witness one restart: each round starts h2load, waits until its 16 connections
//! are established on the app port (`/proc/net/tcp`), restarts the node with
//! `SIGUSR1` while the 320 streams are in flight, waits for the restart to succeed
//! and for h2load to finish. Ten rounds make a run; each test makes three runs. Every
//! stream h2load opened must succeed: a stream refused because the client read the
//! GOAWAY after responses it had already answered with new requests, a response lost
//! to a reset at close, or a stream above the final `last_stream_id` all show as
//! `failed` here (see agent/src/serve/h2.rs and serve/linger.rs).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use fleet_tests::harness::{SKIP_H2LOAD, TlsFiles, cannot_run, eventually, send_signal};
use fleet_tests::{Agent, AgentOpts};
use nix::sys::signal::Signal;

const RUNS: usize = 3;
const ROUNDS: usize = 10;
const CONNECTIONS: usize = 16;
const STREAMS: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2load_over_h2c_loses_no_stream_across_restarts() {
    let Some(h2load) = h2load("h2load_over_h2c_loses_no_stream_across_restarts") else {
        return;
    };
    let agent = Agent::start(AgentOpts::default()).await;
    let url = format!("http://{}/", agent.app());
    for run in 1..=RUNS {
        rounds(&agent, &h2load, &url, run).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2load_over_https_h2_loses_no_stream_across_restarts() {
    let Some(h2load) = h2load("h2load_over_https_h2_loses_no_stream_across_restarts") else {
        return;
    };
    let certs = tempfile::tempdir().unwrap();
    let tls = TlsFiles::generate(certs.path());
    let agent = Agent::start_https(&tls).await;
    let url = format!("https://{}/", agent.app());
    for run in 1..=RUNS {
        rounds(&agent, &h2load, &url, run).await;
    }
}

/// The `h2load` binary, or `None` (after the opt-out notice) where it is missing.
fn h2load(test: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("h2load"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        cannot_run(
            test,
            "h2load is not installed",
            "apt-get install nghttp2-client (bash .ci/run does)",
            SKIP_H2LOAD,
        );
    }
    found
}

/// One run: ten restarts, each under a fresh h2load.
async fn rounds(agent: &Agent, h2load: &PathBuf, url: &str, run: usize) {
    let mut total = 0;
    for round in 1..=ROUNDS {
        let summary = one_restart(agent, h2load, url).await;
        assert_eq!(
            (summary.failed, summary.errored, summary.timeout),
            (0, 0, 0),
            "run {run}, round {round}: h2load lost streams across the restart: {summary:?}"
        );
        assert_eq!(
            summary.succeeded, summary.done,
            "run {run}, round {round}: {summary:?}"
        );
        assert!(
            summary.succeeded >= (CONNECTIONS * STREAMS) as u64,
            "run {run}, round {round}: fewer streams than one batch per connection: {summary:?}"
        );
        total += summary.succeeded;
    }
    eprintln!("run {run}: {ROUNDS} restarts under h2load, {total} streams, 0 failed");
}

async fn one_restart(agent: &Agent, h2load: &PathBuf, url: &str) -> Summary {
    let old_worker = agent.serving_worker().await;
    let port = agent.app().port();
    let before = established(agent.app());
    let child = tokio::process::Command::new(h2load)
        .args([
            "-c",
            &CONNECTIONS.to_string(),
            "-m",
            &STREAMS.to_string(),
            "-D",
            "1s",
            url,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start h2load");
    eventually(
        Duration::from_secs(10),
        "h2load's connections",
        async || {
            let now = established(agent.app());
            if now >= before + CONNECTIONS {
                Ok(())
            } else {
                Err(format!("{now} connections established on port {port}"))
            }
        },
    )
    .await;
    let mark = agent.log_len();
    send_signal(agent.pid(), Signal::SIGUSR1);
    agent
        .wait_for_log_from(mark, "restart succeeded (SIGUSR1)", Duration::from_secs(10))
        .await;
    let output = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("h2load finishes within 20 s")
        .expect("h2load runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "h2load failed ({}): {stdout}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let summary = Summary::parse(&stdout).unwrap_or_else(|| panic!("no summary in:\n{stdout}"));
    let new_worker = agent.serving_worker().await;
    assert_ne!(
        new_worker, old_worker,
        "a new worker serves after the restart"
    );
    summary
}

/// h2load's `requests:` line.
#[derive(Debug, Default)]
struct Summary {
    done: u64,
    succeeded: u64,
    failed: u64,
    errored: u64,
    timeout: u64,
}

impl Summary {
    /// `requests: 74797 total, 74797 started, 74797 done, 74797 succeeded, 0 failed,
    /// 0 errored, 0 timeout`
    fn parse(stdout: &str) -> Option<Summary> {
        let line = stdout.lines().find(|l| l.starts_with("requests:"))?;
        let mut summary = Summary::default();
        for part in line.trim_start_matches("requests:").split(',') {
            let mut words = part.split_whitespace();
            let n: u64 = words.next()?.parse().ok()?;
            match words.next()? {
                "done" => summary.done = n,
                "succeeded" => summary.succeeded = n,
                "failed" => summary.failed = n,
                "errored" => summary.errored = n,
                "timeout" => summary.timeout = n,
                _ => {}
            }
        }
        Some(summary)
    }
}

/// Established TCP connections whose local end is `addr` (the server's side of each
/// client connection), from `/proc/net/tcp`.
fn established(addr: SocketAddr) -> usize {
    let SocketAddr::V4(v4) = addr else {
        panic!("{addr}: only IPv4 loopback is used here")
    };
    // /proc/net/tcp writes the address as the in-memory u32 in hex (little-endian
    // on x86), then the port in hex.
    let local = format!(
        "{:08X}:{:04X}",
        u32::from_ne_bytes(v4.ip().octets()),
        v4.port()
    );
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.len() > 3 && fields[1] == local && fields[3] == "01"
        })
        .count()
}
