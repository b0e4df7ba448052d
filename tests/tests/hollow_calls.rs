//! The simulator scale-bench measures with calls the controller as a fleet of this
//! build does: hollow agents take the controller's calls on their heartbeat streams
//! (no connection to their ports), and with `dialled_calls` they are dialled, as agents
//! from before `Command`; either way a rollout moves every one of them exactly once.

use std::time::Duration;

use fleet_tests::fleet::{Controller, ControllerOpts};
use fleet_tests::harness::http_request;
use fleet_tests::hollow::{HollowConfig, HollowFleet};
use http::{Method, StatusCode};

const TOKEN: &str = "hollow-calls-token-5d1e";
const AGENTS: usize = 20;

/// `fleet_controller_agent_calls_total{call,via}` from the controller's `/metrics`.
async fn calls(controller: &Controller, call: &str, via: &str) -> u64 {
    let series = format!("fleet_controller_agent_calls_total{{call=\"{call}\",via=\"{via}\"}} ");
    counter(controller, &series).await
}

/// The value of the line of the controller's `/metrics` that begins with `series`.
async fn counter(controller: &Controller, series: &str) -> u64 {
    let response = http_request(controller.addr(), Method::GET, "/metrics", Some(TOKEN))
        .await
        .expect("GET /metrics");
    assert_eq!(response.status, StatusCode::OK, "{}", response.text());
    let text = response.text();
    text.lines()
        .find_map(|l| l.strip_prefix(series))
        .map_or(0, |v| v.trim().parse().expect("a count"))
}

/// A controller with the token, and [`AGENTS`] hollow agents registered with it
/// (restarts of 5 ms unless `configure` says otherwise).
async fn start(configure: impl FnOnce(HollowConfig) -> HollowConfig) -> (Controller, HollowFleet) {
    let controller = Controller::start(ControllerOpts {
        token: Some(TOKEN.into()),
        ..ControllerOpts::default()
    })
    .await;
    let fleet = HollowFleet::start_registered(
        configure(HollowConfig {
            count: AGENTS,
            controller: Some(controller.url()),
            token: Some(TOKEN.into()),
            agent_token: Some(TOKEN.into()),
            restart_latency: Duration::from_millis(5),
            restart_jitter: Duration::from_millis(1),
            ..HollowConfig::default()
        }),
        Duration::from_secs(30),
    )
    .await
    .expect("hollow agents that register");
    (controller, fleet)
}

async fn roll_out(dialled_calls: bool) {
    let (controller, fleet) = start(|c| HollowConfig { dialled_calls, ..c }).await;
    let node = controller
        .fleetctl(["node", "hollow-00000", "-o", "json"])
        .await;
    node.expect_code(0);
    assert_eq!(
        node.json()["calls_on_stream"],
        !dialled_calls,
        "{}",
        node.stdout
    );
    controller
        .fleetctl(["rollout", "--exe", "/opt/app-v2", "--batches", "50%,100%"])
        .await
        .expect_code(0);
    let restarts = fleet.restarts();
    assert_eq!(restarts.len(), AGENTS, "one restart each: {restarts:?}");
    assert!(
        restarts
            .iter()
            .all(|r| r.succeeded && r.exe == "/opt/app-v2")
    );
    let (on, off) = if dialled_calls {
        ("dial", "stream")
    } else {
        ("stream", "dial")
    };
    for call in ["Preflight", "Restart"] {
        assert_eq!(
            calls(&controller, call, on).await,
            AGENTS as u64,
            "{call} via {on}"
        );
        assert_eq!(calls(&controller, call, off).await, 0, "{call} via {off}");
    }
    // On the stream every answer (preflight and restart) carries the agent's status,
    // as a real agent's does to this controller; a dialled call has no answer there.
    let statuses = counter(&controller, "fleet_controller_answer_statuses_total ").await;
    if dialled_calls {
        assert_eq!(statuses, 0);
    } else {
        assert!(
            statuses >= 2 * AGENTS as u64,
            "{statuses} statuses with answers"
        );
    }
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hollow_agents_take_the_controllers_calls_on_their_heartbeat_streams() {
    roll_out(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hollow_agents_with_dialled_calls_are_dialled() {
    roll_out(true).await;
}

/// A rollout stopped at its failure budget moves its nodes back no more at once than it
/// moved them (`--max-unavailable 3`), not all of them together: a rollback must not
/// take down more of the fleet than the rollout did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_moves_no_more_nodes_at_once_than_the_rollout_did() {
    let (controller, fleet) = start(|c| HollowConfig {
        restart_latency: Duration::from_millis(40),
        // Half the restarts into the new exe fail: the first batch (10 nodes) passes a
        // budget of 0 but for a chance of 1 in 1,024.
        failure_rate: 0.5,
        ..c
    })
    .await;
    let initial = HollowConfig::default().initial_exe;
    let rollout = controller
        .fleetctl([
            "rollout",
            "--exe",
            "/opt/app-v2",
            "--batches",
            "50%,100%",
            "--max-unavailable",
            "3",
            "--max-failures",
            "0",
            "--auto-rollback",
        ])
        .await;
    rollout.expect_code(3);
    let restarts = fleet.restarts();
    let moved: Vec<_> = restarts
        .iter()
        .filter(|r| r.succeeded && r.exe == "/opt/app-v2")
        .collect();
    // (A restart that failed is recorded with the exe the node kept.)
    let back: Vec<_> = restarts
        .iter()
        .filter(|r| r.succeeded && r.exe == initial)
        .collect();
    assert!(!moved.is_empty(), "{restarts:?}");
    assert_eq!(
        back.len(),
        moved.len(),
        "every moved node back: {restarts:?}"
    );
    // The most restarts back under way at one moment.
    let at_once = back
        .iter()
        .map(|r| {
            let start = r.started_unix_us;
            back.iter()
                .filter(|o| {
                    o.started_unix_us <= start
                        && start < o.started_unix_us + o.duration.as_micros() as u64
                })
                .count()
        })
        .max()
        .unwrap_or(0);
    assert!(
        (1..=3).contains(&at_once),
        "{at_once} restarts back at once with --max-unavailable 3: {back:?}"
    );
    fleet.shutdown().await;
}
