//! A fleet larger than a screen: 300 nodes registered by heartbeats sent straight to
//! the real controller. `fleetctl nodes` shows the counts by state, the first 100
//! nodes by id and a line saying how to see the others; `--all` shows every one,
//! `--state` only those in that state; `-o json` prints every node as one JSON array,
//! fetched a page at a time (ListNodes is called once per page); `--summary` prints
//! the counts only. The dashboard's nodes page shows 200 rows and a link to the next.
//! `/api/nodes` gives every node, or a page with `?limit=`, `?after=` or `?state=` and
//! the next page's link in its `Link` header.

use std::collections::BTreeSet;

use fleet_proto::v1 as pb;
use fleet_tests::fleet::{Controller, ControllerOpts};
use fleet_tests::harness::http_get;

const NODES: usize = 300;

/// `node-001`…`node-300`: every third stopped (100), the rest serving; zone a or b.
fn status(i: usize) -> pb::StatusResponse {
    pb::StatusResponse {
        labels: [("zone".to_string(), ["a", "b"][i % 2].to_string())].into(),
        state: if i.is_multiple_of(3) {
            "stopped"
        } else {
            "serving"
        }
        .into(),
        ..fleet_tests::fleet::reported_status(&format!("node-{i:03}"))
    }
}

/// The controller, with every node registered (one heartbeat each; a TTL of an hour
/// keeps them from turning unreachable during the test).
async fn fleet() -> Controller {
    let controller = Controller::start(ControllerOpts {
        heartbeat_ttl: "1h".into(),
        ..Default::default()
    })
    .await;
    let mut grpc = controller.grpc();
    for i in 1..=NODES {
        grpc.heartbeat(pb::HeartbeatRequest {
            status: Some(status(i)),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| controller.fail(&format!("heartbeat of node {i}: {s}")));
    }
    controller
}

/// The node ids of a table's rows, in order.
fn rows(table: &str) -> Vec<&str> {
    table
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|id| id.starts_with("node-"))
        .collect()
}

fn ids(range: std::ops::RangeInclusive<usize>) -> Vec<String> {
    range.map(|i| format!("node-{i:03}")).collect()
}

/// The body of `GET path` from the controller.
async fn get(controller: &Controller, path: &str) -> String {
    http_get(controller.addr(), path)
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e:#}"))
        .text()
}

/// How many ListNodes calls the controller has answered, from its `/metrics`.
async fn list_calls(controller: &Controller) -> u64 {
    let metrics = get(controller, "/metrics").await;
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("fleet_controller_api_request_duration_seconds_count{")
                && l.contains("route=\"ListNodes\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleetctl_nodes_shows_the_counts_and_a_first_page_and_pages_through_every_node() {
    let controller = fleet().await;

    // The default table: the counts, then the first 100 by id, then how to see others.
    let table = controller.fleetctl(["nodes"]).await;
    table.expect_code(0);
    assert_eq!(
        table.stdout.lines().next(),
        Some("300 nodes: 200 serving, 100 stopped"),
        "{}",
        table.stdout
    );
    assert!(
        table
            .stdout
            .lines()
            .nth(1)
            .unwrap_or("")
            .starts_with("NODE ")
    );
    assert_eq!(rows(&table.stdout), ids(1..=100), "{}", table.stdout);
    assert_eq!(
        table.stderr,
        "showing 100 of 300 nodes: --all, --limit N, -l KEY=VALUE or --state STATE to see others\n"
    );

    // Every node, fetched 40 at a time: no counts line and no hint, nothing was left out.
    let before = list_calls(&controller).await;
    let all = controller
        .fleetctl(["nodes", "--all", "--page-size", "40"])
        .await;
    all.expect_code(0);
    assert_eq!(rows(&all.stdout), ids(1..=NODES));
    assert!(all.stdout.starts_with("NODE "), "{}", all.stdout);
    assert_eq!(all.stderr, "");
    assert_eq!(list_calls(&controller).await - before, 8, "300 nodes by 40");

    // A state: only the nodes in it, and the counts say of how many.
    let stopped = controller.fleetctl(["nodes", "--state", "stopped"]).await;
    stopped.expect_code(0);
    let stopped_ids: Vec<String> = (1..=NODES)
        .filter(|i| i.is_multiple_of(3))
        .map(|i| format!("node-{i:03}"))
        .collect();
    assert_eq!(rows(&stopped.stdout), stopped_ids, "{}", stopped.stdout);
    assert!(
        stopped
            .stdout
            .lines()
            .filter(|l| l.starts_with("node-"))
            .all(|l| l.split_whitespace().nth(1) == Some("stopped")),
        "{}",
        stopped.stdout
    );
    let some = controller
        .fleetctl([
            "nodes", "--state", "serving", "-l", "zone=a", "--limit", "5",
        ])
        .await;
    some.expect_code(0);
    // zone=a: the even ids, 150; serving: the 100 of them not a multiple of 3.
    assert_eq!(
        some.stdout.lines().next(),
        Some("100 serving nodes (of 150: 100 serving, 50 stopped)"),
        "{}",
        some.stdout
    );
    assert_eq!(
        rows(&some.stdout),
        ["node-002", "node-004", "node-008", "node-010", "node-014"]
    );
    assert!(
        some.stderr.starts_with("showing 5 of 100 nodes"),
        "{}",
        some.stderr
    );

    // JSON: one array of every node, fetched 7 at a time, each node as before paging.
    let before = list_calls(&controller).await;
    let json = controller
        .fleetctl(["nodes", "-o", "json", "--page-size", "7"])
        .await;
    let nodes = json.expect_code(0).json();
    assert_eq!(list_calls(&controller).await - before, 43, "300 nodes by 7");
    let nodes = nodes.as_array().expect("a JSON array of nodes");
    let listed: Vec<&str> = nodes.iter().filter_map(|n| n["node_id"].as_str()).collect();
    assert_eq!(listed, ids(1..=NODES));
    let keys: BTreeSet<&str> = nodes[0]
        .as_object()
        .expect("a node is an object")
        .keys()
        .map(String::as_str)
        .collect();
    let expected: BTreeSet<&str> = [
        "node_id",
        "labels",
        "state",
        "control_addr",
        "admin_url",
        "exe",
        "generation",
        "supervisor_pid",
        "worker_pid",
        "in_flight",
        "last_heartbeat_unix_ms",
        "last_heartbeat_rfc3339",
        "started_at_unix_ms",
        "started_at_rfc3339",
        "reason",
        "static_node",
        "calls_on_stream",
    ]
    .into();
    assert_eq!(keys, expected);
    assert_eq!(nodes[2]["state"], "stopped");
    assert_eq!(nodes[2]["labels"]["zone"], "b");
    assert!(
        json.stdout
            .starts_with("[\n  {\n    \"node_id\": \"node-001\"")
    );
    assert!(json.stdout.ends_with("\n  }\n]\n"));
    let limited = controller
        .fleetctl(["nodes", "-o", "json", "--limit", "12", "--page-size", "5"])
        .await;
    let limited = limited.expect_code(0).json();
    assert_eq!(limited.as_array().map(Vec::len), Some(12));

    // The counts only.
    let summary = controller
        .fleetctl(["nodes", "--summary", "-o", "json"])
        .await;
    assert_eq!(
        summary.expect_code(0).json(),
        serde_json::json!({
            "total": 300,
            "counts_by_state": {"serving": 200, "stopped": 100},
            "counts_by_label": {"zone=a": 150, "zone=b": 150},
        })
    );
    let summary = controller.fleetctl(["nodes", "--summary"]).await;
    let text = &summary.expect_code(0).stdout;
    assert!(
        text.starts_with("300 nodes: 200 serving, 100 stopped\n"),
        "{text}"
    );
    assert!(text.contains("\nstopped  100\n"), "{text}");
    assert!(text.contains("\nzone=a  150\n"), "{text}");

    // A state no node can be in is refused before any call (exit 2).
    let bad = controller.fleetctl(["nodes", "--state", "down"]).await;
    bad.expect_code(2);
    assert!(bad.stderr.contains("possible values"), "{}", bad.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_counts_by_state_and_200_nodes_a_page() {
    let controller = fleet().await;
    let page = get(&controller, "/nodes").await;
    assert_eq!(page.matches("data-node=\"").count(), 200);
    assert!(page.contains("Showing 1–200 of 300"), "{page}");
    assert!(page.contains("&amp;after=node-200\""), "{page}");
    assert!(
        page.contains("href=\"/nodes?label=&amp;state=stopped&amp;sort=id&amp;dir=asc\""),
        "the stopped count filters by it: {page}"
    );
    let next = get(&controller, "/nodes?after=node-200").await;
    assert_eq!(next.matches("data-node=\"").count(), 100);
    assert!(next.contains("data-node=\"node-201\""), "{next}");
    let stopped = get(&controller, "/nodes?state=stopped").await;
    let rows: Vec<&str> = stopped
        .split("<tr id=\"node-")
        .skip(1)
        .map(|r| r.split('>').next().unwrap_or(""))
        .collect();
    assert_eq!(rows.len(), 100, "{stopped}");
    assert!(
        rows.iter().all(|r| r.ends_with("data-state=\"stopped\"")),
        "{rows:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_nodes_pages_when_asked_and_links_the_next_page() {
    let controller = fleet().await;
    let listed = |body: &serde_json::Value| -> Vec<String> {
        body.as_array()
            .expect("an array")
            .iter()
            .map(|n| n["node_id"].as_str().unwrap().to_string())
            .collect()
    };
    // Unasked, every node (as before paging).
    let all = http_get(controller.addr(), "/api/nodes").await.unwrap();
    assert_eq!(listed(&all.json()), ids(1..=NODES));
    assert!(all.headers.get("link").is_none());

    // Serving nodes of zone a, 70 a page, following each page's link to the end.
    let mut path = "/api/nodes?selector=zone%3Da&state=serving&limit=70".to_string();
    let (mut seen, mut pages) = (Vec::new(), 0);
    loop {
        let page = http_get(controller.addr(), &path).await.unwrap();
        assert_eq!(page.status, 200, "{path}: {}", page.text());
        // zone a is the even nodes, a third of them stopped: 100 serving.
        assert_eq!(page.headers["x-total-count"], "100", "{path}");
        let got = listed(&page.json());
        assert!(got.len() <= 70, "{path}: {}", got.len());
        seen.extend(got);
        pages += 1;
        let Some(link) = page.headers.get("link") else {
            break;
        };
        let link = link.to_str().unwrap();
        assert!(link.ends_with(">; rel=\"next\""), "{link}");
        path = link
            .trim_start_matches('<')
            .trim_end_matches(">; rel=\"next\"")
            .to_string();
        assert!(
            path.contains("limit=70") && path.contains("state=serving"),
            "{path}"
        );
    }
    let want: Vec<String> = (1..=NODES)
        .filter(|i| i % 2 == 0 && !i.is_multiple_of(3))
        .map(|i| format!("node-{i:03}"))
        .collect();
    assert_eq!(seen, want);
    assert_eq!(pages, 2);

    // Bad values are refused with what to give.
    for bad in ["limit=0", "limit=5001", "limit=ten", "state=sleeping"] {
        let refused = http_get(controller.addr(), &format!("/api/nodes?{bad}"))
            .await
            .unwrap();
        assert_eq!(refused.status, 400, "{bad}");
        assert!(refused.text().contains("give"), "{bad}: {}", refused.text());
    }
}
