//! A release that crashes at start on two nodes: the rollout stops at its failure
//! budget, the nodes it had not reached stay untouched, `--auto-rollback` returns the
//! nodes it restarted to their previous executable, `fleetctl rollout` exits 3, and
//! `fleetctl rollout status ID -o json` gives each node's state and reason (the failed
//! ones carry the exit status and the release's last stderr line).

use std::ffi::OsStr;

use fleet_proto::v1::StatusResponse;
use fleet_tests::fleet::{Controller, ControllerOpts, agent_status, exe_path, node_id};
use fleet_tests::harness::{copy_agent_binary, install_fixture};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_rollout_crashing_on_two_nodes_stops_at_its_failure_budget_and_rolls_back() {
    // The release execs a copy of the agent, except on node-2 and node-3.
    let releases = tempfile::tempdir().unwrap();
    copy_agent_binary(releases.path(), "fleet-agent-real");
    std::fs::write(releases.path().join("crash-nodes"), "node-2\nnode-3\n").unwrap();
    let release = install_fixture(releases.path(), "crash_on_nodes.sh");
    let release = std::fs::canonicalize(release).unwrap();

    let controller = Controller::start(ControllerOpts::default()).await;
    let agents = controller
        .start_nodes(5, |_, opts| {
            opts.arg("--allowed-exe-dir").arg(releases.path())
        })
        .await;
    let mut before: Vec<StatusResponse> = Vec::new();
    for agent in &agents {
        before.push(agent_status(agent).await);
    }

    // Batches of 1 (node-1: fine), 2 (node-2 and node-3: both crash, budget 1
    // exceeded) and 2 (node-4 and node-5: never reached).
    let ctl = controller
        .fleetctl([
            OsStr::new("rollout"),
            "--exe".as_ref(),
            release.as_os_str(),
            "--batches".as_ref(),
            "1,3,100%".as_ref(),
            "--max-failures".as_ref(),
            "1".as_ref(),
            "--auto-rollback".as_ref(),
        ])
        .await;
    ctl.expect_code(3);
    for failed in ["node-2", "node-3"] {
        let line = ctl
            .stdout
            .lines()
            .find(|l| l.contains(failed) && l.contains("failed"))
            .unwrap_or_else(|| panic!("the watch shows {failed} failing:\n{}", ctl.stdout));
        assert!(
            line.contains("cannot start on"),
            "with its reason: {line:?}"
        );
    }

    let id = controller.rollout("latest").await.id;
    let status = controller
        .fleetctl(["rollout", "status", &id, "-o", "json"])
        .await;
    // `rollout status` of a rolled-back rollout exits 3, as the watch did.
    let rollout = status.expect_code(3).json();
    assert_eq!(rollout["state"], "rolled-back", "{rollout:#}");
    let node = |id: &str| {
        rollout["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .find(|n| n["node_id"] == id)
            .unwrap_or_else(|| panic!("{id} missing: {rollout:#}"))
            .clone()
    };
    let restarted = node("node-1");
    assert_eq!(restarted["state"], "rolled-back", "{restarted:#}");
    assert!(
        restarted["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{restarted:#}"
    );
    for id in ["node-2", "node-3"] {
        let failed = node(id);
        assert_eq!(failed["state"], "failed", "{failed:#}");
        let reason = failed["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("exit") && reason.contains('7'),
            "{id}'s reason gives the exit status 7: {reason:?}"
        );
        assert!(
            reason.contains(&format!("cannot start on {id}")),
            "{id}'s reason carries the release's stderr: {reason:?}"
        );
    }
    for id in ["node-4", "node-5"] {
        let skipped = node(id);
        assert_eq!(skipped["state"], "skipped", "{skipped:#}");
        assert!(
            skipped["reason"].as_str().is_some_and(|r| !r.is_empty()),
            "{skipped:#}"
        );
    }

    // Every node runs its previous executable again; only node-1 went through two
    // generations (the release, then the rollback); the others serve the same one.
    for (i, agent) in agents.iter().enumerate() {
        let now = agent_status(agent).await;
        assert_eq!(exe_path(&now), exe_path(&before[i]), "{}", node_id(i));
        let expected = before[i].generation + if i == 0 { 2 } else { 0 };
        assert_eq!(now.generation, expected, "{}: {now:?}", node_id(i));
    }
}
