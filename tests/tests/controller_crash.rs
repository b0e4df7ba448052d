//! Crashes mid-rollout. A controller killed with SIGKILL and started again on the same
//! database resumes the rollout and finishes it without restarting any node twice. An
//! agent killed mid-rollout is reported `unreachable` with a reason, and its failure
//! counts against the rollout's failure budget.

use std::ffi::OsStr;
use std::path::Path;
use std::time::Duration;

use fleet_proto::v1::{Rollout, StatusResponse};
use fleet_tests::fleet::{
    Controller, ControllerOpts, agent_release, agent_status, describe, exe_path, node_id,
    restarted_exactly_once, rollout_node,
};
use fleet_tests::harness::kill_tree;

const NODES: usize = 3;

/// `fleetctl rollout --exe EXE --max-parallel 1 EXTRA... --detach`: the rollout's id.
async fn start_detached(controller: &Controller, exe: &Path, extra: &[&str]) -> String {
    let mut args: Vec<&OsStr> = vec![
        "rollout".as_ref(),
        "--exe".as_ref(),
        exe.as_os_str(),
        "--max-parallel".as_ref(),
        "1".as_ref(),
    ];
    args.extend(extra.iter().map(OsStr::new));
    args.extend(["--detach", "-o", "json"].map(OsStr::new));
    let ctl = controller.fleetctl(args).await;
    let started = ctl.expect_code(0).json();
    started["id"]
        .as_str()
        .expect("the rollout's id")
        .to_string()
}

/// The ids of the nodes of the rollout's `k`-th batch (0-based, in batch order).
fn batch(rollout: &Rollout, k: usize) -> Vec<String> {
    let mut batches: Vec<u32> = rollout.nodes.iter().map(|n| n.batch).collect();
    batches.sort_unstable();
    batches.dedup();
    rollout
        .nodes
        .iter()
        .filter(|n| Some(&n.batch) == batches.get(k))
        .map(|n| n.node_id.clone())
        .collect()
}

fn all_in(rollout: &Rollout, ids: &[String], state: &str) -> bool {
    !ids.is_empty()
        && ids
            .iter()
            .all(|id| rollout_node(rollout, id).state == state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_killed_mid_rollout_resumes_from_its_database_without_restarting_a_node_twice() {
    let releases = tempfile::tempdir().unwrap();
    let v2 = agent_release(releases.path(), "fleet-agent-v2");
    // The kernel picks the port (bound once, by the controller itself); the restart
    // below brings the controller back on that same port, so the agents find it again.
    let controller = Controller::start(ControllerOpts::default()).await;
    let agents = controller
        .start_nodes(NODES, |_, opts| {
            opts.arg("--allowed-exe-dir").arg(releases.path())
        })
        .await;
    let mut before: Vec<StatusResponse> = Vec::new();
    for agent in &agents {
        before.push(agent_status(agent).await);
    }

    // Each node soaks 2 s: kill the controller once the first batch is healthy and
    // the second node is soaking (restarted, but not yet known to be healthy).
    let id = start_detached(&controller, &v2, &["--min-healthy", "2s"]).await;
    let mid = controller
        .wait_rollout(
            &id,
            "batch 1 healthy and batch 2 soaking",
            Duration::from_secs(30),
            |r| all_in(r, &batch(r, 0), "healthy") && all_in(r, &batch(r, 1), "soaking"),
        )
        .await;
    controller.kill();
    eprintln!("killed the controller at: {}", describe(&mid));

    controller.restart().await;
    let watched = controller
        .fleetctl(["rollout", "status", &id, "--watch"])
        .await;
    watched.expect_code(0);
    let done = controller.rollout(&id).await;
    assert_eq!(done.state, "succeeded", "{}", describe(&done));
    assert!(all_in(
        &done,
        &(0..NODES).map(node_id).collect::<Vec<_>>(),
        "healthy"
    ));

    restarted_exactly_once(&agents, &before, &v2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_reports_an_agent_killed_mid_rollout_unreachable_and_counts_it_against_the_budget()
 {
    let releases = tempfile::tempdir().unwrap();
    let v2 = agent_release(releases.path(), "fleet-agent-v2");
    let controller = Controller::start(ControllerOpts::default()).await;
    let agents = controller
        .start_nodes(NODES, |_, opts| {
            opts.arg("--allowed-exe-dir").arg(releases.path())
        })
        .await;
    let mut before: Vec<StatusResponse> = Vec::new();
    for agent in &agents {
        before.push(agent_status(agent).await);
    }

    let id = start_detached(
        &controller,
        &v2,
        &["--min-healthy", "3s", "--max-failures", "0"],
    )
    .await;
    let soaking = controller
        .wait_rollout(&id, "batch 1 soaking", Duration::from_secs(30), |r| {
            all_in(r, &batch(r, 0), "soaking")
        })
        .await;
    let victim_id = batch(&soaking, 0).remove(0);
    let victim = (0..NODES).find(|&i| node_id(i) == victim_id).unwrap();
    // SIGKILL the supervisor and its workers: the node is gone without a word.
    kill_tree(agents[victim].pid());

    let ended = controller
        .wait_rollout_end(&id, Duration::from_secs(30))
        .await;
    assert_eq!(ended.state, "failed", "{}", describe(&ended));
    assert!(
        ended.reason.contains("budget"),
        "the rollout stopped at its failure budget: {}",
        describe(&ended)
    );
    let failed = rollout_node(&ended, &victim_id);
    assert_eq!(failed.state, "failed", "{failed:?}");
    assert!(
        failed.reason.contains("unreachable"),
        "the killed node's reason says it is unreachable: {failed:?}"
    );
    for i in (0..NODES).filter(|&i| i != victim) {
        let node = rollout_node(&ended, &node_id(i));
        assert_eq!(node.state, "skipped", "{node:?}");
        let status = agent_status(&agents[i]).await;
        assert_eq!(status.generation, before[i].generation, "{}", node_id(i));
        assert_eq!(exe_path(&status), exe_path(&before[i]), "{}", node_id(i));
    }

    // The inventory: once its heartbeats stop, the node is unreachable, with why.
    let nodes = controller
        .wait_nodes(
            std::slice::from_ref(&victim_id),
            "unreachable",
            Duration::from_secs(15),
        )
        .await;
    let node = nodes.iter().find(|n| n.node_id == victim_id).unwrap();
    assert!(!node.reason.is_empty(), "{node:?}");
    let listed = controller.fleetctl(["nodes"]).await;
    listed.expect_code(0);
    let line = listed
        .stdout
        .lines()
        .find(|l| l.starts_with(&victim_id))
        .unwrap_or_else(|| panic!("{victim_id} listed:\n{}", listed.stdout));
    assert!(line.contains("unreachable"), "{line:?}");
    let listed = controller.fleetctl(["nodes", "-o", "json"]).await;
    let listed = listed.expect_code(0).json();
    let entry = listed
        .as_array()
        .expect("a JSON array of nodes")
        .iter()
        .find(|n| n["node_id"] == victim_id.as_str())
        .unwrap_or_else(|| panic!("{victim_id} listed: {listed:#}"));
    assert_eq!(entry["state"], "unreachable", "{entry:#}");
    assert!(
        entry["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{entry:#}"
    );
    controller
        .fleetctl(["rollout", "status", &id, "--watch"])
        .await
        .expect_code(1);
}
