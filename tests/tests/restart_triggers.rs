//! Every way to ask a node for a restart works the same: a new worker takes over,
//! the supervisor keeps its PID, a request in flight across the restart completes
//! on the old worker with its whole body, and the old worker exits as soon as that
//! request is done — long before the 60 s drain timeout.

use std::time::Duration;

use fleet_proto::v1::{Outcome, RestartRequest};
use fleet_tests::harness::{eventually, is_running, parent_of, proc_state, send_signal, wait_gone};
use fleet_tests::{Agent, AgentOpts};
use nix::sys::signal::Signal;

/// How soon after its last request the old worker must be gone.
const OLD_WORKER_EXIT: Duration = Duration::from_secs(3);

/// Start a node, hold `GET /sleep?secs=5` in flight on its worker, pull `trigger`,
/// and check what every restart must do.
async fn restarts_without_dropping_the_request_in_flight(trigger: impl AsyncFnOnce(&Agent, u32)) {
    restarts_with(AgentOpts::default(), trigger).await;
}

/// [`restarts_without_dropping_the_request_in_flight`] on a node started with `opts`.
async fn restarts_with(opts: AgentOpts, trigger: impl AsyncFnOnce(&Agent, u32)) {
    let agent = Agent::start(opts).await;
    let supervisor = agent.pid();
    let old = agent.worker_pid().await;
    assert_eq!(
        parent_of(old),
        Some(supervisor),
        "the worker is the supervisor's child"
    );

    let sleeping = agent.start_sleep(5).await;
    assert_eq!(sleeping.pid(), old, "/sleep is held by the serving worker");

    trigger(&agent, old).await;

    let new = agent.wait_worker_change(old, Duration::from_secs(20)).await;
    assert_eq!(
        parent_of(new),
        Some(supervisor),
        "the new worker is the supervisor's child"
    );
    assert!(is_running(supervisor), "the supervisor is still running");
    assert_eq!(
        agent.status().await["supervisor_pid"].as_u64(),
        Some(u64::from(supervisor)),
        "the supervisor PID does not change"
    );

    let finished = sleeping.finish(Duration::from_secs(30)).await;
    assert_eq!(finished.status, 200);
    assert_eq!(finished.error, None, "the in-flight request was cut");
    assert_eq!(
        finished.body,
        format!("{old}\n{old}\n"),
        "the in-flight request completes on the old worker with its whole body"
    );

    let budget = OLD_WORKER_EXIT.saturating_sub(finished.ended.elapsed());
    if wait_gone(old, budget).await.is_none() {
        agent.fail(&format!(
            "old worker {old} is still there (state {:?}) {OLD_WORKER_EXIT:?} after its last request ended",
            proc_state(old)
        ));
    }
}

#[tokio::test]
async fn sigusr1_to_the_supervisor_restarts() {
    restarts_without_dropping_the_request_in_flight(async |agent, _| {
        send_signal(agent.pid(), Signal::SIGUSR1);
    })
    .await;
}

#[tokio::test]
async fn sigusr1_to_the_worker_restarts() {
    restarts_without_dropping_the_request_in_flight(async |_, worker| {
        send_signal(worker, Signal::SIGUSR1);
    })
    .await;
}

#[tokio::test]
async fn http_restart_on_the_control_port_restarts() {
    restarts_without_dropping_the_request_in_flight(async |agent, old| {
        let response = agent.action("/debug/admin/restart").await;
        assert_restarted(agent, &response, old);
    })
    .await;
}

#[tokio::test]
async fn http_restart_on_the_app_port_restarts() {
    // Without a token the app ports serve the admin routes only when asked to.
    restarts_with(
        AgentOpts::default().arg("--app-admin"),
        async |agent, old| {
            let response = agent.action_on(agent.app(), "/debug/admin/restart").await;
            assert_restarted(agent, &response, old);
        },
    )
    .await;
}

#[tokio::test]
async fn http_reload_restarts() {
    restarts_without_dropping_the_request_in_flight(async |agent, old| {
        let response = agent.action("/debug/admin/reload").await;
        assert_restarted(agent, &response, old);
    })
    .await;
}

#[tokio::test]
async fn grpc_restart_restarts() {
    restarts_without_dropping_the_request_in_flight(async |agent, old| {
        let response = agent
            .grpc()
            .await
            .restart(agent.request(RestartRequest {
                reason: "grpc_restart_restarts".into(),
                ..Default::default()
            }))
            .await
            .unwrap_or_else(|status| agent.fail(&format!("gRPC Restart: {status}")))
            .into_inner();
        assert_eq!(response.outcome(), Outcome::Succeeded, "{response:?}");
        assert_eq!(response.old_pid, old, "{response:?}");
        assert_ne!(response.new_pid, old, "{response:?}");
    })
    .await;
}

/// A 200 `{outcome: "succeeded", old_pid, new_pid}` from an HTTP restart route.
fn assert_restarted(agent: &Agent, response: &fleet_tests::HttpResponse, old: u32) {
    if response.status != 200 {
        agent.fail(&format!("restart: {} {}", response.status, response.text()));
    }
    let body = response.json();
    assert_eq!(body["outcome"], "succeeded", "{body}");
    assert_eq!(body["old_pid"].as_u64(), Some(u64::from(old)), "{body}");
    assert_ne!(body["new_pid"].as_u64(), Some(u64::from(old)), "{body}");
}

/// The tokio worker threads of `pid` (tokio names them `tokio-rt-worker`).
fn runtime_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the worker's threads")
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|name| name.trim() == "tokio-rt-worker")
        })
        .count()
}

/// Wait until `pid` runs exactly `want` tokio worker threads. A new thread names itself once it
/// runs, so right after READY one may still carry its parent's name (seen on a loaded CI machine).
async fn expect_runtime_threads(pid: u32, want: usize, what: &str) {
    eventually(
        Duration::from_secs(10),
        what,
        async || match runtime_threads(pid) {
            n if n == want => Ok(()),
            n => Err(format!("{n} tokio-rt-worker threads, want {want}")),
        },
    )
    .await;
}

#[tokio::test]
async fn every_generation_runs_the_worker_threads_asked_for() {
    let agent = Agent::start(AgentOpts {
        args: vec!["--worker-threads".into(), "3".into()],
        ..Default::default()
    })
    .await;
    let old = agent.worker_pid().await;
    expect_runtime_threads(old, 3, "--worker-threads 3").await;
    send_signal(agent.pid(), Signal::SIGUSR1);
    let new = agent.wait_worker_change(old, Duration::from_secs(20)).await;
    expect_runtime_threads(new, 3, "the new generation to run 3 too").await;
}
