//! The promise of the controller: `fleetctl rollout --exe NEW` moves every selected
//! node to the new executable, batch by batch as planned — every node of a batch is
//! healthy before any node of the next one starts restarting — while clients hitting
//! every node's app port (keep-alive and fresh connections) lose not one request.

use std::time::Duration;

use fleet_proto::v1::StatusResponse;
use fleet_tests::fleet::{
    Controller, ControllerOpts, agent_release, agent_status, describe, entered, exe_path, node_id,
    rollout_node,
};
use fleet_tests::{Load, LoadSpec};

const NODES: usize = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_rollout_moves_every_node_batch_by_batch_under_load_without_losing_a_request() {
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
    let loads: Vec<Load> = agents
        .iter()
        .map(|agent| {
            Load::start(LoadSpec {
                target: agent.app(),
                path: "/".into(),
                keepalive_connections: 2,
                fresh_connections: 2,
                max_requests: 5_000_000,
                max_duration: Duration::from_secs(120),
            })
        })
        .collect();
    for load in &loads {
        load.wait_progress(20, Duration::from_secs(20)).await;
    }

    let ctl = controller
        .fleetctl([
            "rollout".as_ref(),
            "--exe".as_ref(),
            v2.as_os_str(),
            "--batches".as_ref(),
            "1,40%,100%".as_ref(),
            "--reason".as_ref(),
            "ship v2".as_ref(),
        ])
        .await;
    ctl.expect_code(0);
    // The old workers drain while the load still runs (their idle keep-alive
    // connections are closed within a second).
    for load in &loads {
        load.wait_progress(300, Duration::from_secs(20)).await;
    }
    for (i, load) in loads.into_iter().enumerate() {
        let report = load.finish().await;
        eprintln!("load on {}: {}", node_id(i), report.summary());
        report.assert_no_failures(100);
    }

    // The plan: 1 node, then up to 40% (2 of 5), then the rest.
    let rollout = controller.rollout("latest").await;
    assert_eq!(rollout.state, "succeeded", "{}", describe(&rollout));
    assert_eq!(rollout.batch_sizes, [1, 1, 3], "{}", describe(&rollout));
    for (batch, size) in rollout.batch_sizes.iter().enumerate() {
        let members = rollout
            .nodes
            .iter()
            .filter(|n| n.batch as usize == batch)
            .count();
        assert_eq!(
            members,
            *size as usize,
            "batch {batch}: {}",
            describe(&rollout)
        );
    }

    // Each node went restarting -> soaking -> healthy; batch k+1 started only after
    // every node of batch k was healthy.
    let mut healthy_by_batch = [0u64; 3];
    let mut restarting_by_batch = [u64::MAX; 3];
    for i in 0..NODES {
        let node = rollout_node(&rollout, &node_id(i));
        assert_eq!(node.state, "healthy", "{node:?}");
        let restarting = entered(node, "restarting").unwrap_or_else(|| panic!("{node:?}"));
        let soaking = entered(node, "soaking").unwrap_or_else(|| panic!("{node:?}"));
        let healthy = entered(node, "healthy").unwrap_or_else(|| panic!("{node:?}"));
        assert!(restarting <= soaking && soaking <= healthy, "{node:?}");
        let b = node.batch as usize;
        healthy_by_batch[b] = healthy_by_batch[b].max(healthy);
        restarting_by_batch[b] = restarting_by_batch[b].min(restarting);
    }
    for k in 0..2 {
        assert!(
            healthy_by_batch[k] <= restarting_by_batch[k + 1],
            "batch {} started restarting at {} before batch {} was all healthy at {}: {}",
            k + 2,
            restarting_by_batch[k + 1],
            k + 1,
            healthy_by_batch[k],
            describe(&rollout)
        );
    }

    // Every node now runs the new executable, one generation later.
    for (i, agent) in agents.iter().enumerate() {
        let status = agent_status(agent).await;
        assert_eq!(exe_path(&status), v2.to_str().unwrap(), "{}", node_id(i));
        assert_eq!(
            status.generation,
            before[i].generation + 1,
            "{}",
            node_id(i)
        );
    }
    // The watch printed the batches and every node.
    for i in 0..NODES {
        assert!(ctl.stdout.contains(&node_id(i)), "{}", ctl.stdout);
    }
}
