//! `fleet-agent --exec` supervises a program in another language that speaks
//! socket activation (fds 3.., LISTEN_FDS) and sd_notify (READY=1), here a small
//! Python server: restarted again and again under load, it loses no request.

use std::time::{Duration, Instant};

use fleet_proto::v1::{Outcome, RestartRequest};
use fleet_tests::harness::{exe_of, install_fixture, parent_of};
use fleet_tests::{Agent, AgentOpts, Load, LoadSpec, Span, ZeroLoss};

const RESTARTS: u32 = 25;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_server_under_exec_restarts_25_times_under_load_without_losing_a_request() {
    let dir = tempfile::tempdir().unwrap();
    let server = install_fixture(dir.path(), "py_server.py");
    let agent = Agent::start(AgentOpts::default().arg("--exec").arg(&server)).await;
    let first = agent.worker_pid().await;
    assert_eq!(
        parent_of(first),
        Some(agent.pid()),
        "the Python server is the supervisor's child"
    );
    let python = exe_of(first).unwrap_or_default();
    assert!(
        python.display().to_string().contains("python"),
        "the worker runs Python: {}",
        python.display()
    );

    let load = Load::start(LoadSpec {
        target: agent.app(),
        path: "/".into(),
        keepalive_connections: 4,
        fresh_connections: 4,
        max_requests: 1_000_000,
        max_duration: Duration::from_secs(60),
        ..Default::default()
    });
    load.wait_progress(50, Duration::from_secs(20)).await;

    let mut grpc = agent.grpc().await;
    let started = Instant::now();
    let mut worker = first;
    let mut spans = Vec::new();
    for i in 1..=RESTARTS {
        let asked = Instant::now();
        let response = grpc
            .restart(agent.request(RestartRequest {
                reason: format!("python restart {i}/{RESTARTS}"),
                ..Default::default()
            }))
            .await
            .unwrap_or_else(|status| agent.fail(&format!("restart {i}: gRPC error {status}")))
            .into_inner();
        assert_eq!(
            response.outcome(),
            Outcome::Succeeded,
            "restart {i}: {response:?}"
        );
        assert_eq!(response.old_pid, worker, "restart {i}: {response:?}");
        assert_ne!(response.new_pid, worker, "restart {i}: {response:?}");
        worker = response.new_pid;
        spans.push(Span {
            label: format!("restart {i}"),
            from: asked,
            // At least 250 ms: on two shared cores a span of a few ms may see no
            // request complete without anything being wrong.
            to: Instant::now().max(asked + Duration::from_millis(250)),
        });
    }
    let restarts_took = started.elapsed();
    load.wait_progress(100, Duration::from_secs(20)).await;
    let report = load.finish().await;

    eprintln!(
        "{RESTARTS} restarts of the Python server in {:.1}s under load: {}",
        restarts_took.as_secs_f64(),
        report.summary()
    );
    // Nothing failed, requests completed during every restart, and none stalled.
    report.assert_zero_loss(&ZeroLoss {
        min_requests: 300,
        spans,
        min_in_span: 1,
        max_latency: Duration::from_secs(1),
    });
    assert_eq!(
        agent.worker_pid().await,
        worker,
        "the last generation serves"
    );
}
