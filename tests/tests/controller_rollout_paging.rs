//! A rollout of many nodes read without one message of every node: `StartRollout`
//! with `summary_answer` answers the header and counts only, `GetRollout` with
//! `page_size` gives the nodes a page at a time in the rollout's order (a page token
//! that names no node of the rollout is refused saying what to send), and `fleetctl
//! rollout status -o json` puts the pages together into the same rollout as one whole
//! answer, one `GetRollout` call per page. Hollow agents on the real controller.

use std::time::Duration;

use fleet_proto::v1 as pb;
use fleet_tests::fleet::{Controller, ControllerOpts};
use fleet_tests::harness::http_get;
use fleet_tests::hollow::{HollowConfig, HollowFleet};

const AGENTS: usize = 23;

/// How many GetRollout calls the controller has answered, from its `/metrics`.
async fn get_rollout_calls(controller: &Controller) -> u64 {
    let metrics = http_get(controller.addr(), "/metrics")
        .await
        .expect("GET /metrics")
        .text();
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("fleet_controller_api_request_duration_seconds_count{")
                && l.contains("route=\"GetRollout\"")
        })
        .map(|l| {
            l.rsplit(' ')
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .expect("a count")
        })
        .sum()
}

fn ids(nodes: &[pb::RolloutNode]) -> Vec<&str> {
    nodes.iter().map(|n| n.node_id.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_is_started_without_its_nodes_and_read_a_page_at_a_time() {
    let controller = Controller::start(ControllerOpts::default()).await;
    let fleet = HollowFleet::start_registered(
        HollowConfig {
            count: AGENTS,
            controller: Some(controller.url()),
            restart_latency: Duration::from_millis(5),
            restart_jitter: Duration::from_millis(1),
            ..HollowConfig::default()
        },
        Duration::from_secs(30),
    )
    .await
    .expect("hollow agents that register");

    let mut grpc = controller.grpc();
    let started = grpc
        .start_rollout(pb::RolloutSpec {
            exe: "/opt/app-v2".into(),
            batches: "30%,100%".into(),
            summary_answer: true,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| controller.fail(&format!("StartRollout: {s}")))
        .into_inner();
    assert!(started.nodes.is_empty(), "a summary: {:?}", started.nodes);
    assert_eq!(
        started.progress.as_ref().map(|p| p.total),
        Some(AGENTS as u32),
        "the counts are there"
    );
    assert_eq!(started.batch_sizes.iter().sum::<u32>(), AGENTS as u32);
    let id = started.id.clone();
    let whole = controller
        .wait_rollout_end(&id, Duration::from_secs(60))
        .await;
    assert_eq!(whole.state, "succeeded", "{whole:?}");
    assert_eq!(whole.nodes.len(), AGENTS);
    assert!(
        whole.next_page_token.is_empty(),
        "no page asked, none given"
    );

    // Pages of 10: 10, 10, 3, in the rollout's order, tokens on all but the last.
    let mut paged = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = grpc
            .get_rollout(pb::GetRolloutRequest {
                id: id.clone(),
                page_size: 10,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| controller.fail(&format!("GetRollout page: {s}")))
            .into_inner();
        pages += 1;
        assert_eq!(
            page.progress.as_ref().map(|p| p.healthy),
            Some(AGENTS as u32),
            "every page counts the whole rollout"
        );
        assert!(page.nodes.len() <= 10, "page {pages}: {}", page.nodes.len());
        paged.extend(page.nodes);
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
        assert!(pages < 10, "the pages never end");
    }
    assert_eq!(pages, 3);
    assert_eq!(
        ids(&paged),
        ids(&whole.nodes),
        "the same nodes in the same order"
    );
    assert_eq!(paged, whole.nodes);

    // A token from elsewhere is refused, saying what to send instead.
    let refused = grpc
        .get_rollout(pb::GetRolloutRequest {
            id: id.clone(),
            page_size: 10,
            page_token: "no-such-node".into(),
            ..Default::default()
        })
        .await
        .expect_err("an unknown page token");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().contains("next_page_token"),
        "{}",
        refused.message()
    );

    // fleetctl asks a page at a time and prints the rollout whole.
    let calls_before = get_rollout_calls(&controller).await;
    let status = controller
        .fleetctl(["rollout", "status", &id, "-o", "json", "--page-size", "10"])
        .await;
    status.expect_code(0);
    let json = status.json();
    let printed: Vec<&str> = json["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| n["node_id"].as_str().expect("a node id"))
        .collect();
    assert_eq!(printed, ids(&whole.nodes), "{}", status.stdout);
    assert_eq!(get_rollout_calls(&controller).await - calls_before, 3);

    // A rollout that is followed starts with a summary answer; it still moves every
    // node once.
    controller
        .fleetctl(["rollout", "--exe", "/opt/app-v3", "--batches", "100%"])
        .await
        .expect_code(0);
    let restarts = fleet.restarts();
    assert_eq!(
        restarts.len(),
        2 * AGENTS,
        "two restarts each: {restarts:?}"
    );
    fleet.shutdown().await;
}
