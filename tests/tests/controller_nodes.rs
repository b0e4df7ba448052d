//! Agents started with `--controller URL` register with the controller:
//! `fleetctl nodes` lists every one with its labels, state, executable, generation
//! and admin URL — as a table for people and as JSON for programs, with the same
//! facts the agents report about themselves.

use std::collections::BTreeMap;

use fleet_proto::v1::StatusResponse;
use fleet_tests::fleet::{Controller, ControllerOpts, agent_status, exe_path, node_id};

fn zone(i: usize) -> &'static str {
    if i.is_multiple_of(2) { "a" } else { "b" }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_lists_five_registered_agents_with_their_facts_as_a_table_and_as_json() {
    let controller = Controller::start(ControllerOpts::default()).await;
    let agents = controller
        .start_nodes(5, |i, opts| {
            opts.arg("--label")
                .arg(format!("zone={}", zone(i)))
                .arg("--label")
                .arg("role=web")
        })
        .await;
    let mut statuses: Vec<StatusResponse> = Vec::new();
    for agent in &agents {
        statuses.push(agent_status(agent).await);
    }

    // The table: one line per node, carrying each of its facts.
    let table = controller.fleetctl(["nodes"]).await;
    table.expect_code(0);
    for (i, status) in statuses.iter().enumerate() {
        let id = node_id(i);
        let line = table
            .stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(id.as_str()))
            .unwrap_or_else(|| panic!("no line for {id} in:\n{}", table.stdout));
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert!(!status.admin_url.is_empty(), "{status:?}");
        for fact in [
            "serving",
            exe_path(status).as_str(),
            status.generation.to_string().as_str(),
            status.admin_url.as_str(),
        ] {
            assert!(cells.contains(&fact), "{id}: {fact:?} missing in {line:?}");
        }
        for label in [format!("zone={}", zone(i)), "role=web".to_string()] {
            assert!(
                line.contains(&label),
                "{id}: label {label} missing in {line:?}"
            );
        }
    }
    assert_eq!(
        table.stdout.lines().filter(|l| l.contains("node-")).count(),
        5,
        "five nodes:\n{}",
        table.stdout
    );

    // JSON: the same facts, as the agents report them.
    let json = controller.fleetctl(["nodes", "-o", "json"]).await;
    let nodes = json.expect_code(0).json();
    let nodes = nodes.as_array().expect("a JSON array of nodes");
    assert_eq!(nodes.len(), 5, "{nodes:#?}");
    for (i, status) in statuses.iter().enumerate() {
        let id = node_id(i);
        let node = nodes
            .iter()
            .find(|n| n["node_id"] == id.as_str())
            .unwrap_or_else(|| panic!("{id} missing in {nodes:#?}"));
        assert_eq!(node["state"], "serving", "{node}");
        let labels: BTreeMap<String, String> =
            serde_json::from_value(node["labels"].clone()).expect("labels are a string map");
        let expected: BTreeMap<String, String> = [
            ("zone".to_string(), zone(i).to_string()),
            ("role".to_string(), "web".to_string()),
        ]
        .into();
        assert_eq!(labels, expected, "{node}");
        assert_eq!(node["exe"]["path"], exe_path(status).as_str(), "{node}");
        let sha256 = status.exe.as_ref().map(|e| e.sha256.as_str());
        assert_eq!(node["exe"]["sha256"].as_str(), sha256, "{node}");
        assert_eq!(
            node["generation"].as_u64(),
            Some(status.generation),
            "{node}"
        );
        assert_eq!(node["admin_url"], status.admin_url.as_str(), "{node}");
        assert_eq!(node["control_addr"], status.control_addr.as_str(), "{node}");
        assert_eq!(
            node["supervisor_pid"].as_u64(),
            Some(status.supervisor_pid.into())
        );
    }

    // A label selector narrows the list.
    let zone_a = controller
        .fleetctl(["nodes", "-l", "zone=a", "-o", "json"])
        .await;
    let zone_a = zone_a.expect_code(0).json();
    let mut ids: Vec<&str> = zone_a
        .as_array()
        .expect("a JSON array")
        .iter()
        .filter_map(|n| n["node_id"].as_str())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["node-1", "node-3", "node-5"]);
}
