//! A restart belongs to the node, not to whoever asked for it: a caller that gives
//! up halfway (an HTTP client that disconnects, a gRPC deadline) changes nothing. The
//! new generation, which needs 3 s to become ready, is still promoted exactly as it
//! would have been; afterwards one worker serves every request, the old one is gone,
//! and Status, Watch and the metrics report the restart's real outcome.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fleet_proto::v1::{Phase, RestartRequest};
use fleet_tests::harness::{
    Events, agent_binary, chmod, eventually, http_request, metric, restart_path, wait_gone,
};
use fleet_tests::{Agent, AgentOpts, Load, LoadSpec, Span, ZeroLoss};
use http::Method;

/// How long the slow build takes to send READY=1.
const SLOW_START: Duration = Duration::from_secs(3);
/// How long the caller waits before it gives up.
const CALLER_PATIENCE: Duration = Duration::from_secs(1);

/// A build of the app that warms up for 3 s before it starts serving: a script that
/// sleeps, then becomes the agent binary (same PID, so `LISTEN_PID` still matches).
fn slow_build(dir: &Path) -> PathBuf {
    let path = dir.join("app-slow");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\n# warms up for {} s, then serves\nsleep {}\nexec '{}' \"$@\"\n",
            SLOW_START.as_secs(),
            SLOW_START.as_secs(),
            agent_binary().display()
        ),
    )
    .unwrap();
    chmod(&path, 0o755);
    path
}

/// A node under load that may restart into the slow build, watched from before the
/// restart is asked for.
struct Scene {
    _releases: tempfile::TempDir,
    slow: PathBuf,
    agent: Agent,
    old: u32,
    load: Load,
    events: Events,
}

async fn scene() -> Scene {
    let releases = tempfile::tempdir().unwrap();
    let slow = slow_build(releases.path());
    let agent = node(releases.path()).await;
    let old = agent.worker_pid().await;
    let load = load_on(&agent);
    load.wait_progress(100, Duration::from_secs(20)).await;
    let events = agent.watch().await;
    Scene {
        _releases: releases,
        slow,
        agent,
        old,
        load,
        events,
    }
}

async fn node(releases: &Path) -> Agent {
    Agent::start(AgentOpts::default().arg("--allowed-exe-dir").arg(releases)).await
}

fn load_on(agent: &Agent) -> Load {
    Load::start(LoadSpec {
        target: agent.app(),
        path: "/pid".into(),
        keepalive_connections: 2,
        fresh_connections: 2,
        max_requests: 2_000_000,
        max_duration: Duration::from_secs(60),
        ..Default::default()
    })
}

/// After an abandoned restart: the restart went through, exactly one worker serves
/// and answers everything, and every surface tells the real outcome.
async fn the_restart_went_through(scene: Scene, asked: Instant) {
    let Scene {
        agent,
        mut events,
        load,
        old,
        slow,
        ..
    } = scene;
    let ready = events
        .until_phase(Phase::Ready, SLOW_START + Duration::from_secs(20))
        .await;
    let ready_seen = Instant::now();
    let new = ready.pid;
    assert_ne!(new, old, "a new generation became ready: {ready:?}");
    events
        .until("DRAINED of the old worker", Duration::from_secs(20), |e| {
            e.phase() == Phase::Drained && e.pid == old
        })
        .await;
    assert!(
        wait_gone(old, Duration::from_secs(5)).await.is_some(),
        "the old worker {old} is gone"
    );

    let status = agent.status().await;
    let workers = status["workers"].as_array().cloned().unwrap_or_default();
    assert_eq!(workers.len(), 1, "exactly one worker is left: {status}");
    assert_eq!(workers[0]["pid"].as_u64(), Some(u64::from(new)), "{status}");
    assert_eq!(workers[0]["state"], "serving", "{status}");
    assert_eq!(status["state"], "serving", "{status}");
    assert_eq!(status["restarts_succeeded"], 1, "{status}");
    assert_eq!(status["in_progress"], "", "{status}");
    assert_eq!(
        status["exe"]["path"].as_str(),
        Some(slow.canonicalize().unwrap().to_str().unwrap()),
        "{status}"
    );
    let metrics = agent.admin("/metrics").await.text();
    assert_eq!(
        metric(
            &metrics,
            "fleet_agent_restarts_total",
            &[("outcome", "succeeded")]
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(metric(&metrics, "fleet_agent_workers", &[]), Some(1.0));

    // Every request from now on is answered by the one worker left.
    let mark = load.snapshot_requests();
    load.wait_progress(200, Duration::from_secs(20)).await;
    let report = load.finish().await;
    // Nothing failed, the old generation kept serving through the 3 s the new one
    // took (requests completed in that span), and nothing stalled.
    report.assert_zero_loss(&ZeroLoss {
        min_requests: mark + 200,
        spans: vec![Span {
            label: "the abandoned restart, until the new generation was ready".into(),
            from: asked,
            to: ready_seen,
        }],
        min_in_span: 100,
        max_latency: Duration::from_secs(1),
    });
    for _ in 0..50 {
        assert_eq!(agent.worker_pid().await, new, "only the new worker answers");
    }
    println!(
        "restart abandoned after {CALLER_PATIENCE:?}: gen {} pid {new} ready after {} ms; load: {}",
        ready.generation,
        ready.duration_us / 1000,
        report.summary()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_whose_http_client_disconnects_completes_on_its_own() {
    let scene = scene().await;
    let (agent, slow) = (&scene.agent, &scene.slow);

    let started = Instant::now();
    let gave_up = tokio::time::timeout(
        CALLER_PATIENCE,
        http_request(
            agent.control(),
            Method::POST,
            &restart_path(Some(slow), None),
            agent.token(),
        ),
    )
    .await;
    assert!(
        gave_up.is_err(),
        "the restart answered within {CALLER_PATIENCE:?}, before the slow build could be ready: {gave_up:?}"
    );
    // The client's connection is closed now (its future was dropped).
    assert!(started.elapsed() < SLOW_START);
    agent
        .wait_for_log("the caller of the http restart went away", SLOW_START * 10)
        .await;
    the_restart_went_through(scene, started).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_whose_grpc_deadline_passes_completes_on_its_own() {
    let scene = scene().await;
    let (agent, slow) = (&scene.agent, &scene.slow);

    let started = Instant::now();
    let mut request = agent.request(RestartRequest {
        exe: slow.display().to_string(),
        reason: "a caller with a 1 s deadline".into(),
        ..Default::default()
    });
    request.set_timeout(CALLER_PATIENCE);
    let answer = agent.grpc().await.restart(request).await;
    let status = answer.expect_err("the deadline passes before the slow build is ready");
    assert!(
        matches!(
            status.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        "{status:?}"
    );
    agent
        .wait_for_log("the caller of the grpc restart went away", SLOW_START * 10)
        .await;
    the_restart_went_through(scene, started).await;
}

#[tokio::test]
async fn a_second_restart_while_the_first_runs_is_refused_and_the_first_completes() {
    let releases = tempfile::tempdir().unwrap();
    let slow = slow_build(releases.path());
    let agent = node(releases.path()).await;
    let old = agent.worker_pid().await;
    let path = restart_path(Some(&slow), None);
    let first = tokio::time::timeout(
        CALLER_PATIENCE,
        http_request(agent.control(), Method::POST, &path, agent.token()),
    );
    assert!(first.await.is_err(), "the first restart takes 3 s");
    let second = http_request(agent.control(), Method::POST, &path, agent.token())
        .await
        .unwrap();
    assert_eq!(second.status, 409, "{}", second.text());
    assert!(
        second.text().contains("already in progress"),
        "{}",
        second.text()
    );
    let new = agent
        .wait_worker_change(old, SLOW_START + Duration::from_secs(20))
        .await;
    eventually(
        Duration::from_secs(10),
        "the node to serve on one worker",
        async || {
            let status = agent.status().await;
            match status["workers"].as_array().map(Vec::len) {
                Some(1) if status["state"] == "serving" => Ok(()),
                _ => Err(status.to_string()),
            }
        },
    )
    .await;
    assert_eq!(agent.worker_pid().await, new);
}
