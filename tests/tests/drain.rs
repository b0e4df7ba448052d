//! The drain has a deadline: a request that outlives `--drain-timeout` is cut when
//! it expires, and the old worker is killed then — an old generation always goes away.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fleet_proto::v1::{Outcome, Phase, RestartRequest};
use fleet_tests::harness::{proc_state, wait_gone};
use fleet_tests::{Agent, AgentOpts};

const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// From the deadline to the agent seeing the killed worker gone: a SIGKILL and a
/// reap, a few ms; 500 ms leaves room for a loaded machine.
const KILL_MARGIN: Duration = Duration::from_millis(500);
/// From the agent seeing the worker gone to this test's client seeing its
/// connection end (the kernel closed it when the process died): scheduling only.
const CLIENT_MARGIN: Duration = Duration::from_millis(500);

/// Milliseconds since the epoch, as the agent's events give them.
fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64
}

#[tokio::test]
async fn a_request_longer_than_the_drain_timeout_is_cut_and_the_old_worker_killed() {
    let agent = Agent::start(AgentOpts::default().arg("--drain-timeout").arg("2s")).await;
    let old = agent.worker_pid().await;
    let sleeping = agent.start_sleep(30).await;
    assert_eq!(sleeping.pid(), old);
    let mut events = agent.watch().await;
    // One wall-clock anchor, to set the client's Instants against the agent's
    // event times (the same clock: one machine).
    let anchor = (Instant::now(), SystemTime::now());
    let wall = |t: Instant| unix_ms(anchor.1 + t.duration_since(anchor.0));

    let response = agent
        .grpc()
        .await
        .restart(agent.request(RestartRequest::default()))
        .await
        .unwrap_or_else(|status| agent.fail(&format!("gRPC Restart: {status}")))
        .into_inner();
    assert_eq!(response.outcome(), Outcome::Succeeded, "{response:?}");

    let finished = sleeping.finish(Duration::from_secs(10)).await;
    assert_eq!(
        finished.body,
        format!("{old}\n"),
        "the request was cut before its second line"
    );
    let cut_at = wall(finished.ended);

    // The agent's own account: when it sent SIGTERM, and when it saw the worker go.
    let draining = events
        .until("DRAINING of the old worker", Duration::from_secs(10), |e| {
            e.phase() == Phase::Draining && e.pid == old
        })
        .await;
    let drained = events
        .until(
            "DRAINED of the old worker",
            DRAIN_TIMEOUT + KILL_MARGIN * 4,
            |e| e.phase() == Phase::Drained && e.pid == old,
        )
        .await;
    assert_eq!(
        drained.message, "was killed by signal SIGKILL",
        "the old worker was killed at the deadline: {drained:?}"
    );
    let took = Duration::from_micros(drained.duration_us);
    assert!(
        took >= DRAIN_TIMEOUT && took <= DRAIN_TIMEOUT + KILL_MARGIN,
        "the agent drained for {took:?}, expected the {DRAIN_TIMEOUT:?} drain timeout \
         (+ at most {KILL_MARGIN:?} to kill and reap)"
    );
    // The request was cut by that kill: not before the deadline (SIGTERM + 2 s), and
    // no later than the agent saw the worker gone, plus the client's scheduling.
    let earliest = draining.unix_ms + DRAIN_TIMEOUT.as_millis() as u64;
    let latest = drained.unix_ms + CLIENT_MARGIN.as_millis() as u64;
    assert!(
        (earliest..=latest).contains(&cut_at),
        "the request was cut at {cut_at} ms; SIGTERM at {} ms, the worker gone at {} ms: \
         expected between {earliest} and {latest}",
        draining.unix_ms,
        drained.unix_ms
    );

    // DRAINED is sent once the supervisor reaped it: the pid is gone already.
    if wait_gone(old, Duration::from_secs(1)).await.is_none() {
        agent.fail(&format!(
            "old worker {old} still there (state {:?}) after its DRAINED event",
            proc_state(old)
        ));
    }
}
