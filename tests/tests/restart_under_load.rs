//! The promise of the whole project: restarts under load lose nothing. Sixteen
//! clients (8 on keep-alive connections, 8 opening a connection per request) hit
//! the node while it restarts 100 times back to back; every request must get a
//! 2xx and its whole body — no refused connection, no reset, no request written on
//! a kept-alive connection and answered by EOF.

use std::time::{Duration, Instant};

use fleet_proto::v1::{Outcome, RestartRequest};
use fleet_tests::{Agent, AgentOpts, Load, LoadSpec};

const RESTARTS: u64 = 100;
/// Bound on the restarts themselves (a debug build, two cores, other tests running).
const RESTARTS_DEADLINE: Duration = Duration::from_secs(75);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_back_to_back_restarts_under_load_lose_no_request() {
    let agent = Agent::start(AgentOpts::default()).await;
    let generation = agent.generation().await;
    let load = Load::start(LoadSpec {
        target: agent.app(),
        path: "/".into(),
        keepalive_connections: 8,
        fresh_connections: 8,
        max_requests: 2_000_000,
        max_duration: Duration::from_secs(120),
    });
    load.wait_progress(100, Duration::from_secs(20)).await;

    let mut grpc = agent.grpc().await;
    let started = Instant::now();
    for i in 1..=RESTARTS {
        let response = grpc
            .restart(agent.request(RestartRequest {
                reason: format!("back-to-back restart {i}/{RESTARTS}"),
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
        assert!(
            started.elapsed() < RESTARTS_DEADLINE,
            "only {i} restarts in {RESTARTS_DEADLINE:?}"
        );
    }
    let restarts_took = started.elapsed();
    // The last old workers drain while the load still runs.
    load.wait_progress(200, Duration::from_secs(20)).await;
    let report = load.finish().await;

    eprintln!(
        "{RESTARTS} restarts in {:.1}s under load: {}",
        restarts_took.as_secs_f64(),
        report.summary()
    );
    report.assert_no_failures(500);
    assert_eq!(agent.generation().await, generation + RESTARTS);
}
