//! The drain has a deadline: a request that outlives `--drain-timeout` is cut when
//! it expires, and the old worker is killed then — an old generation always goes away.

use std::time::{Duration, Instant};

use fleet_proto::v1::{Outcome, RestartRequest};
use fleet_tests::harness::{proc_state, wait_gone};
use fleet_tests::{Agent, AgentOpts};

#[tokio::test]
async fn a_request_longer_than_the_drain_timeout_is_cut_and_the_old_worker_killed() {
    let agent = Agent::start(AgentOpts::default().arg("--drain-timeout").arg("2s")).await;
    let old = agent.worker_pid().await;
    let sleeping = agent.start_sleep(30).await;
    assert_eq!(sleeping.pid(), old);

    let response = agent
        .grpc()
        .await
        .restart(agent.request(RestartRequest::default()))
        .await
        .unwrap_or_else(|status| agent.fail(&format!("gRPC Restart: {status}")))
        .into_inner();
    // The restart returns at READY, when the old worker is told to drain.
    let restarted = Instant::now();
    assert_eq!(response.outcome(), Outcome::Succeeded, "{response:?}");

    let finished = sleeping.finish(Duration::from_secs(10)).await;
    let cut_after = finished.ended.duration_since(restarted);
    assert_eq!(
        finished.body,
        format!("{old}\n"),
        "the request was cut before its second line"
    );
    assert!(
        cut_after >= Duration::from_millis(1500) && cut_after <= Duration::from_millis(2500),
        "the request was cut {cut_after:?} after the restart, expected ~2 s (the drain timeout)"
    );

    let budget = Duration::from_millis(2500).saturating_sub(restarted.elapsed());
    if wait_gone(old, budget).await.is_none() {
        agent.fail(&format!(
            "old worker {old} still there (state {:?}) 2.5 s after the restart",
            proc_state(old)
        ));
    }
}
