//! A node's page and the dashboard's pictures, in headless Chromium with a real
//! controller and three real agents: after a rollout and a manual restart, the node's
//! page lists both restarts with who asked and non-zero handoff and drain times, its
//! handoff chart has one sample per restart, the rollout's timeline has one bar per
//! node in batch order, the nodes page charts the fleet's handoffs, `fleetctl node`
//! shows the same history, and an unknown node is a 404.
//! Screenshots land in `target/test-artifacts/`.

use std::time::Duration;

use fleet_tests::browser::Browser;
use fleet_tests::fleet::{Controller, ControllerOpts, agent_release};
use fleet_tests::harness::{eventually, http_send};
use http::{Method, StatusCode};
use serde_json::Value;

const NODES: usize = 3;
const WAIT: Duration = Duration::from_secs(30);

/// The sum of the `data-count` of a chart's bars.
async fn charted(browser: &Browser, chart: &str) -> usize {
    browser
        .attrs_of(&format!("figure#{chart} rect.bar"), "data-count")
        .await
        .into_iter()
        .map(|c| c.unwrap_or_default().parse::<usize>().unwrap_or(0))
        .sum()
}

async fn samples(browser: &Browser, chart: &str) -> usize {
    browser
        .attrs_of(&format!("figure#{chart}"), "data-samples")
        .await
        .pop()
        .flatten()
        .unwrap_or_else(|| panic!("no chart {chart} on the page"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_page_lists_restarts_with_timings_and_the_rollout_has_a_timeline() {
    let releases = tempfile::tempdir().unwrap();
    let v2 = agent_release(releases.path(), "fleet-agent-v2");
    let controller = Controller::start(ControllerOpts::default()).await;
    let _agents = controller
        .start_nodes(NODES, |_, opts| {
            opts.arg("--allowed-exe-dir").arg(releases.path())
        })
        .await;

    // A rollout in two batches (1 node, then 2), with a soak to see on the timeline.
    controller
        .fleetctl([
            "rollout".as_ref(),
            "--exe".as_ref(),
            v2.as_os_str(),
            "--batches".as_ref(),
            "1,100%".as_ref(),
            "--min-healthy".as_ref(),
            "300ms".as_ref(),
        ])
        .await
        .expect_code(0);
    let rollout = controller.rollout("latest").await;
    assert_eq!(rollout.state, "succeeded");
    // Then a manual restart of node-1.
    controller
        .fleetctl(["restart", "node-1", "--reason", "by hand"])
        .await
        .expect_code(0);

    // The old workers' drain times arrive with later heartbeats.
    let history = eventually(
        WAIT,
        "node-1's two restarts with their drain times",
        async || {
            let ctl = controller.fleetctl(["node", "node-1", "-o", "json"]).await;
            let json: Value = ctl.json();
            let restarts = json["restarts"].as_array().cloned().unwrap_or_default();
            let drained = restarts
                .iter()
                .filter(|r| r["drain_us"].as_u64().unwrap_or(0) > 0)
                .count();
            if restarts.len() == 2 && drained == 2 {
                Ok(restarts)
            } else {
                Err(format!("{restarts:?}"))
            }
        },
    )
    .await;
    // Newest first: the manual restart, then the rollout's step.
    assert_eq!(history[0]["via"], "grpc");
    assert_eq!(history[0]["rollout_id"], "");
    assert_eq!(history[1]["via"], "rollout");
    assert_eq!(history[1]["rollout_id"], rollout.id.as_str());
    for r in &history {
        assert_eq!(r["actor"], "local", "{r}");
        assert_eq!(r["outcome"], "succeeded", "{r}");
        assert!(r["handoff_us"].as_u64().unwrap() > 0, "{r}");
        assert!(r["new_pid"].as_u64().unwrap() > 0, "{r}");
    }
    let table = controller.fleetctl(["node", "node-1"]).await;
    table.expect_code(0);
    assert!(
        table.output().contains("local (grpc)"),
        "{}",
        table.output()
    );
    assert!(
        table
            .output()
            .contains(&format!("local (rollout {})", rollout.id)),
        "{}",
        table.output()
    );

    let browser = Browser::start(1280, 900).await;

    // 1. The node's page: both restarts, with actor, via and non-zero timings.
    browser
        .goto(&format!("{}/nodes/node-1", controller.url()))
        .await;
    browser.wait_for("table#restarts", WAIT).await;
    let rows = browser.find_all("table#restarts tr.restart").await;
    assert_eq!(rows.len(), 2, "restart rows on node-1's page");
    let vias = browser
        .attrs_of("table#restarts tr.restart", "data-via")
        .await;
    assert_eq!(
        vias,
        [Some("grpc".to_string()), Some("rollout".to_string())]
    );
    for attr in ["data-handoff-us", "data-drain-us"] {
        for v in browser.attrs_of("table#restarts tr.restart", attr).await {
            let us: u64 = v.unwrap().parse().unwrap();
            assert!(us > 0, "{attr} is {us}");
        }
    }
    for actor in browser
        .attrs_of("table#restarts tr.restart", "data-actor")
        .await
    {
        assert_eq!(actor.as_deref(), Some("local"));
    }
    assert!(
        browser
            .text_of("table#restarts")
            .await
            .contains(&rollout.id),
        "the rollout's restart links its rollout"
    );
    // The charts: one sample per restart, in the bars too.
    assert_eq!(samples(&browser, "handoff-chart").await, 2);
    assert_eq!(charted(&browser, "handoff-chart").await, 2);
    assert_eq!(samples(&browser, "drain-chart").await, 2);
    assert_eq!(charted(&browser, "drain-chart").await, 2);
    // How the controller reaches it: on its heartbeat stream (this build's agents).
    assert_eq!(
        browser.text_of("#node-calls").await.trim(),
        "on its heartbeat stream"
    );
    // Its current generation, and its steps in the rollout.
    browser
        .wait_for("table#generations tr[data-generation]", WAIT)
        .await;
    assert!(!browser.find_all("ol#node-events li").await.is_empty());
    // Tall enough for the charts and the history in one picture.
    browser.set_window_size(1280, 2000).await;
    browser.screenshot("node-page.png").await;
    browser.set_window_size(390, 844).await;
    browser.screenshot("node-page-phone.png").await;
    browser.set_window_size(1280, 900).await;

    // 2. The rollout's timeline: one row per node, batch 1 first, each with a
    //    restart bar and a soak bar.
    browser
        .goto(&format!("{}/rollouts/{}", controller.url(), rollout.id))
        .await;
    browser.wait_for("figure#timeline svg", WAIT).await;
    let batches: Vec<u32> = browser
        .attrs_of("figure#timeline g.gantt-row", "data-batch")
        .await
        .into_iter()
        .map(|b| b.unwrap().parse().unwrap())
        .collect();
    assert_eq!(batches, [1, 2, 2], "timeline rows' batches");
    let first = browser
        .attrs_of("figure#timeline g.gantt-row", "data-node")
        .await;
    let batch1 = rollout
        .nodes
        .iter()
        .find(|n| n.batch == 0)
        .unwrap()
        .node_id
        .clone();
    assert_eq!(first[0].as_deref(), Some(batch1.as_str()));
    assert_eq!(
        browser
            .find_all("figure#timeline g.gantt-row rect.gantt-restart")
            .await
            .len(),
        NODES
    );
    assert_eq!(
        browser
            .find_all("figure#timeline g.gantt-row rect.gantt-soak")
            .await
            .len(),
        NODES
    );
    // Batch 2's bars start after batch 1's soak began (x grows with time).
    let xs: Vec<f64> = browser
        .attrs_of("figure#timeline g.gantt-row rect.gantt-restart", "x")
        .await
        .into_iter()
        .map(|x| x.unwrap().parse().unwrap())
        .collect();
    assert!(xs[1] > xs[0] && xs[2] > xs[0], "restart bars at {xs:?}");
    browser.screenshot("rollout-timeline.png").await;

    // 3. The nodes page: the fleet's handoff times, 3 rollout steps + 1 manual.
    browser.goto(&format!("{}/", controller.url())).await;
    browser.wait_for("figure#fleet-handoff-chart", WAIT).await;
    assert_eq!(samples(&browser, "fleet-handoff-chart").await, NODES + 1);
    assert_eq!(charted(&browser, "fleet-handoff-chart").await, NODES + 1);
    let link = browser
        .attrs_of("tr#node-node-2 a.node-link", "href")
        .await
        .pop()
        .flatten();
    assert_eq!(link.as_deref(), Some("/nodes/node-2"));
    browser.screenshot("nodes-handoff-chart.png").await;

    // 4. A restart from the dashboard is in the history too, with its actor.
    browser
        .goto(&format!("{}/nodes/node-2/restart", controller.url()))
        .await;
    browser.click_on("button#confirm", WAIT).await;
    browser
        .wait_for("h1#outcome[data-outcome=succeeded]", WAIT)
        .await;
    browser
        .goto(&format!("{}/nodes/node-2", controller.url()))
        .await;
    browser.wait_for("table#restarts", WAIT).await;
    let vias = browser
        .attrs_of("table#restarts tr.restart", "data-via")
        .await;
    assert_eq!(
        vias,
        [Some("dashboard".to_string()), Some("rollout".to_string())],
        "node-2's restarts"
    );
    assert_eq!(
        browser
            .attrs_of("table#restarts tr.restart", "data-actor")
            .await[0]
            .as_deref(),
        Some("local")
    );

    // 5. An unknown node is a 404 page, not an empty 200.
    let missing = http_send(controller.addr(), Method::GET, "/nodes/nope", &[], "")
        .await
        .unwrap();
    assert_eq!(missing.status, StatusCode::NOT_FOUND, "{}", missing.text());
    assert!(
        missing.text().contains("no node &quot;nope&quot;"),
        "{}",
        missing.text()
    );
}
