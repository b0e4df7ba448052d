//! Requests in flight are counted where an operator looks: the agent's status, its
//! `/metrics`, and the controller's inventory (which the dashboard shows). The worker
//! reports them to its supervisor over sd_notify (`X_FLEET_IN_FLIGHT=N`).

use std::time::Duration;

use fleet_tests::fleet::{Controller, ControllerOpts, node_id};
use fleet_tests::harness::{eventually, metric};
use fleet_tests::{Agent, HttpResponse};

const WAIT: Duration = Duration::from_secs(10);
const SLEEPS: u64 = 3;

/// Requests in flight as the agent's status, its metrics and the controller say.
async fn counts(agent: &Agent, controller: &Controller) -> (u64, u64, u64) {
    // A count that is missing is a failure, never a zero: a zero is what the idle
    // checks below expect, so reading "absent" as 0 would let them pass untested.
    let status = agent.status().await;
    let workers = status["workers"]
        .as_array()
        .filter(|w| !w.is_empty())
        .unwrap_or_else(|| agent.fail(&format!("the status lists no workers: {status}")));
    let from_status = workers
        .iter()
        .map(|w| {
            w["in_flight"].as_u64().unwrap_or_else(|| {
                agent.fail(&format!("a worker in the status has no in_flight: {w}"))
            })
        })
        .sum();
    let metrics: HttpResponse = agent.admin("/metrics").await;
    let text = metrics.text();
    let from_metrics = match metric(&text, "fleet_agent_requests_in_flight", &[]) {
        Some(v) if v >= 0.0 && v.fract() == 0.0 => v as u64,
        other => agent.fail(&format!(
            "fleet_agent_requests_in_flight is {other:?}, not a count, in /metrics:\n{text}"
        )),
    };
    let node = controller
        .nodes()
        .await
        .into_iter()
        .find(|n| n.node_id == node_id(0))
        .expect("node-1 is listed");
    (from_status, from_metrics, node.in_flight)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_reach_the_status_the_metrics_and_the_controller() {
    let controller = Controller::start(ControllerOpts::default()).await;
    let agents = controller.start_nodes(1, |_, opts| opts).await;
    let agent = &agents[0];
    assert_eq!(counts(agent, &controller).await, (0, 0, 0), "an idle node");

    // Three requests held by the worker (each has sent its first line).
    let mut sleeps = Vec::new();
    for _ in 0..SLEEPS {
        sleeps.push(agent.start_sleep(4).await);
    }
    eventually(
        WAIT,
        "3 requests in flight everywhere",
        async || match counts(agent, &controller).await {
            (SLEEPS, SLEEPS, SLEEPS) => Ok(()),
            other => Err(format!("(status, metrics, controller) = {other:?}")),
        },
    )
    .await;

    // Once they are answered, nothing is in flight any more.
    for sleep in sleeps {
        let done = sleep.finish(WAIT).await;
        assert!(done.error.is_none(), "{:?}", done.error);
    }
    eventually(
        WAIT,
        "no request in flight anywhere",
        async || match counts(agent, &controller).await {
            (0, 0, 0) => Ok(()),
            other => Err(format!("(status, metrics, controller) = {other:?}")),
        },
    )
    .await;
}
