//! A new generation that fails costs nothing: under load, not one request fails,
//! the old generation keeps (or goes back to) serving, the caller learns why
//! (exit status or "did not become ready", and the last lines of its stderr), and
//! no process is left behind.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fleet_proto::v1::{Outcome, Phase, RestartRequest};
use fleet_tests::harness::{eventually, install_fixture, restart_path};
use fleet_tests::{Agent, AgentOpts, Load, LoadSpec, ZeroLoss};

/// A node that may run the fixture programs copied into `releases`.
async fn node(releases: &Path, extra: &[&str]) -> Agent {
    let mut opts = AgentOpts::default().arg("--allowed-exe-dir").arg(releases);
    for arg in extra {
        opts = opts.arg(*arg);
    }
    Agent::start(opts).await
}

fn load_on(agent: &Agent) -> Load {
    Load::start(LoadSpec {
        target: agent.app(),
        path: "/".into(),
        keepalive_connections: 4,
        fresh_connections: 4,
        max_requests: 1_000_000,
        max_duration: Duration::from_secs(60),
        ..Default::default()
    })
}

/// The supervisor's only running child is `worker` (the failed generation is gone).
async fn assert_only_child_is(agent: &Agent, worker: u32) {
    eventually(
        Duration::from_secs(5),
        &format!("worker {worker} to be the supervisor's only child"),
        async || match agent.running_children() {
            children if children == vec![worker] => Ok(()),
            children => Err(format!("children: {children:?}")),
        },
    )
    .await;
}

fn stderr_tail_contains(tail: &[String], needle: &str) -> bool {
    tail.iter().any(|line| line.contains(needle))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_that_exits_at_start_is_reported_with_its_status_and_stderr() {
    let releases = tempfile::tempdir().unwrap();
    let exit3 = install_fixture(releases.path(), "exit3.sh");
    let agent = node(releases.path(), &[]).await;
    let generation = agent.generation().await;
    let worker = agent.worker_pid().await;
    let load = load_on(&agent);
    load.wait_progress(50, Duration::from_secs(20)).await;

    let response = agent.action(&restart_path(Some(&exit3), None)).await;
    assert_eq!(response.status, 500, "{}", response.text());
    let body = response.json();
    assert_eq!(body["outcome"], "failed", "{body}");
    let reason = body["reason"].as_str().unwrap_or_default();
    // The new generation, by number, and its exact exit status (a '3' anywhere, in a
    // pid say, would not do).
    let failed_generation = format!("gen {} (pid ", generation + 1);
    assert!(
        reason.starts_with(&failed_generation)
            && reason.ends_with(") exited with status 3 before it was ready"),
        "the reason names gen {} and its exit status 3: {reason:?}",
        generation + 1
    );
    let tail: Vec<String> = serde_json::from_value(body["stderr_tail"].clone()).unwrap_or_default();
    assert!(
        stderr_tail_contains(&tail, "cannot open /etc/app/config.toml"),
        "the caller gets the last stderr lines: {body}"
    );

    old_generation_kept_serving(&agent, load, worker, generation).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_that_never_becomes_ready_is_killed_and_reported() {
    let releases = tempfile::tempdir().unwrap();
    let never_ready = install_fixture(releases.path(), "never_ready.sh");
    let agent = node(releases.path(), &["--ready-timeout", "1s"]).await;
    let generation = agent.generation().await;
    let worker = agent.worker_pid().await;
    let load = load_on(&agent);
    load.wait_progress(50, Duration::from_secs(20)).await;

    let response = agent
        .grpc()
        .await
        .restart(agent.request(RestartRequest {
            exe: never_ready.display().to_string(),
            ..Default::default()
        }))
        .await
        .unwrap_or_else(|status| agent.fail(&format!("gRPC Restart: {status}")))
        .into_inner();
    assert_eq!(response.outcome(), Outcome::Failed, "{response:?}");
    assert!(
        response
            .reason
            .starts_with(&format!("gen {} (pid ", generation + 1))
            && response
                .reason
                .ends_with(") did not become ready (send READY=1) within the 1s ready timeout"),
        "the reason names gen {} and says it did not become ready in 1s: {response:?}",
        generation + 1
    );
    assert!(
        stderr_tail_contains(&response.stderr_tail, "warming caches"),
        "the caller gets the last stderr lines: {response:?}"
    );

    old_generation_kept_serving(&agent, load, worker, generation).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_that_dies_in_probation_is_reverted_to_the_previous_exe() {
    let releases = tempfile::tempdir().unwrap();
    let crashing = install_fixture(releases.path(), "ready_then_exit.py");
    let agent = node(releases.path(), &["--probation", "5s"]).await;
    let before = agent.status().await;
    let previous_exe: PathBuf = before["exe"]["path"]
        .as_str()
        .unwrap_or_else(|| panic!("status has no exe.path: {before}"))
        .into();
    let worker = agent.worker_pid().await;
    let generation = agent.generation().await;
    let mut events = agent.watch().await;
    let load = load_on(&agent);
    load.wait_progress(50, Duration::from_secs(20)).await;

    // It sends READY=1, so the restart itself succeeds and the old worker drains;
    // then it exits within probation and the supervisor brings the previous exe back.
    let response = agent.action(&restart_path(Some(&crashing), None)).await;
    eprintln!(
        "restart into ready_then_exit.py: {} {}",
        response.status,
        response.text()
    );
    events
        .until_phase(Phase::Reverting, Duration::from_secs(20))
        .await;
    // The READY after REVERTING is the reverted generation's.
    let ready = events
        .until_phase(Phase::Ready, Duration::from_secs(20))
        .await;
    // The new generation is the one that died: its WORKER_EXITED event (by
    // generation and pid, the ones its own READY event gave) carries its exit status
    // and last stderr line, and the REVERTING event names the same generation. (The
    // old worker's drain events also mention an exit: they must not count.)
    let new_generation = generation + 1;
    let new_ready = events
        .seen
        .iter()
        .find(|e| e.phase() == Phase::Ready && e.generation == new_generation)
        .unwrap_or_else(|| {
            panic!(
                "no READY event for gen {new_generation}: {:#?}",
                events.seen
            )
        })
        .clone();
    let exited = events
        .seen
        .iter()
        .find(|e| e.phase() == Phase::WorkerExited)
        .unwrap_or_else(|| panic!("no WORKER_EXITED event: {:#?}", events.seen));
    assert_eq!(
        (exited.generation, exited.pid),
        (new_generation, new_ready.pid),
        "the exited worker is the new generation: {exited:#?}"
    );
    assert_eq!(
        exited.message,
        "exited with status 1; last stderr line: ready_then_exit.py: fatal: lost the database connection",
        "the event gives the exit status and the last stderr line"
    );
    let reverting = events
        .seen
        .iter()
        .find(|e| e.phase() == Phase::Reverting)
        .expect("REVERTING was seen");
    assert_eq!(
        (reverting.generation, reverting.pid),
        (new_generation, new_ready.pid),
        "the revert is of the new generation: {reverting:#?}"
    );
    assert!(
        reverting.message.contains("exited with status 1"),
        "{reverting:#?}"
    );
    assert_ne!(
        ready.generation, new_generation,
        "READY after REVERTING is a newer gen"
    );

    let reverted = eventually(
        Duration::from_secs(10),
        "the reverted worker to serve",
        async || match agent.worker_pid().await {
            pid if pid == ready.pid => Ok(pid),
            pid => Err(format!("served by {pid}, READY event said {}", ready.pid)),
        },
    )
    .await;
    assert_ne!(reverted, worker);
    let after = agent.status().await;
    assert_eq!(
        after["exe"]["path"].as_str(),
        previous_exe.to_str(),
        "the status shows the previous exe again: {after}"
    );
    assert_only_child_is(&agent, reverted).await;

    load.wait_progress(100, Duration::from_secs(20)).await;
    let report = load.finish().await;
    eprintln!("{}", report.summary());
    // No failed request, and none waited a second: a failed generation or a revert
    // costs no stall either.
    report.assert_zero_loss(&ZeroLoss {
        min_requests: 150,
        spans: Vec::new(),
        min_in_span: 0,
        max_latency: Duration::from_secs(1),
    });
}

/// After a failed restart: the old worker still serves (same pid and generation, the
/// only child left), and the load saw no failure.
async fn old_generation_kept_serving(agent: &Agent, load: Load, worker: u32, generation: u64) {
    load.wait_progress(100, Duration::from_secs(20)).await;
    assert_eq!(
        agent.worker_pid().await,
        worker,
        "the old generation keeps serving"
    );
    assert_eq!(agent.generation().await, generation);
    assert_only_child_is(agent, worker).await;
    let report = load.finish().await;
    eprintln!("{}", report.summary());
    // No failed request, and none waited a second: a failed generation or a revert
    // costs no stall either.
    report.assert_zero_loss(&ZeroLoss {
        min_requests: 150,
        spans: Vec::new(),
        min_in_span: 0,
        max_latency: Duration::from_secs(1),
    });
}
