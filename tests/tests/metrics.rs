//! `/metrics` tells an operator how restarts go: counters by outcome, and
//! histograms of the handoff (trigger → READY) and of the drain (SIGTERM → exit).

use std::time::Duration;

use fleet_proto::v1::{Outcome, RestartRequest};
use fleet_tests::harness::{eventually, install_fixture, metric};
use fleet_tests::{Agent, AgentOpts};
use tonic::Code;

#[tokio::test]
async fn metrics_count_restarts_by_outcome_and_time_handoffs_and_drains() {
    let releases = tempfile::tempdir().unwrap();
    let exit3 = install_fixture(releases.path(), "exit3.sh");
    let agent = Agent::start(
        AgentOpts::default()
            .arg("--allowed-exe-dir")
            .arg(releases.path()),
    )
    .await;
    let mut grpc = agent.grpc().await;

    let succeeded = grpc
        .restart(agent.request(RestartRequest::default()))
        .await
        .unwrap_or_else(|status| agent.fail(&format!("gRPC Restart: {status}")))
        .into_inner();
    assert_eq!(succeeded.outcome(), Outcome::Succeeded, "{succeeded:?}");
    let failed = grpc
        .restart(agent.request(RestartRequest {
            exe: exit3.display().to_string(),
            ..Default::default()
        }))
        .await
        .unwrap_or_else(|status| agent.fail(&format!("gRPC Restart: {status}")))
        .into_inner();
    assert_eq!(failed.outcome(), Outcome::Failed, "{failed:?}");
    let refused = grpc
        .restart(agent.request(RestartRequest {
            exe: releases.path().join("missing").display().to_string(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused}");

    // The drain of the first restart's old worker ends on its own schedule.
    let text = eventually(Duration::from_secs(10), "a drain in /metrics", async || {
        let response = agent.admin("/metrics").await;
        if response.status != 200 {
            return Err(format!("/metrics: {} {}", response.status, response.text()));
        }
        let text = response.text();
        match metric(&text, "fleet_agent_drain_seconds_count", &[]) {
            Some(n) if n >= 1.0 => Ok(text),
            other => Err(format!("fleet_agent_drain_seconds_count = {other:?}")),
        }
    })
    .await;
    eprintln!("{text}");

    let restarts = |outcome| metric(&text, "fleet_agent_restarts_total", &[("outcome", outcome)]);
    assert_eq!(restarts("succeeded"), Some(1.0), "succeeded restarts");
    assert_eq!(restarts("failed"), Some(1.0), "failed restarts");
    assert_eq!(restarts("refused"), Some(1.0), "refused restarts");
    assert_eq!(
        restarts("reverted").unwrap_or(0.0),
        0.0,
        "reverted restarts"
    );

    for histogram in ["fleet_agent_handoff_seconds", "fleet_agent_drain_seconds"] {
        assert!(
            text.contains(&format!("# TYPE {histogram} histogram")),
            "{histogram} is a histogram"
        );
        let count = metric(&text, &format!("{histogram}_count"), &[]).unwrap_or(0.0);
        assert!(count >= 1.0, "{histogram}_count = {count}");
        let inf = metric(&text, &format!("{histogram}_bucket"), &[("le", "+Inf")]);
        assert_eq!(inf, Some(count), "{histogram} +Inf bucket = count");
        let sum = metric(&text, &format!("{histogram}_sum"), &[]).unwrap_or(-1.0);
        assert!(sum > 0.0, "{histogram}_sum = {sum}");
    }
    assert_eq!(
        metric(&text, "fleet_agent_generation", &[]),
        Some(agent.generation().await as f64),
        "fleet_agent_generation"
    );
}
