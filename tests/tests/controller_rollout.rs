//! The promise of the controller: `fleetctl rollout --exe NEW` moves every selected
//! node to the new executable, batch by batch as planned — every node of a batch is
//! healthy before any node of the next one starts restarting — while clients hitting
//! every node's app port (keep-alive and fresh connections) lose not one request.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fleet_proto::v1::StatusResponse;
use fleet_tests::fleet::{
    Controller, ControllerOpts, agent_release, agent_status, describe, entered, exe_path, node_id,
    rollout_node,
};
use fleet_tests::{Load, LoadOptions, LoadSpec, Span, ZeroLoss};

const NODES: usize = 5;
/// No request may take longer (a stall of a second is a failure, not a slow pass).
const MAX_LATENCY: Duration = Duration::from_secs(1);
/// Requests that must complete on a node while it restarts (from `restarting` to
/// `soaking` in the rollout's timeline, at least 250 ms: see restart_under_load.rs).
const MIN_IN_RESTART: u64 = 3;
const SPAN_FLOOR: Duration = Duration::from_millis(250);

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
            Load::start_with(
                LoadSpec {
                    target: agent.app(),
                    path: "/".into(),
                    keepalive_connections: 2,
                    fresh_connections: 2,
                    max_requests: 5_000_000,
                    max_duration: Duration::from_secs(120),
                    ..Default::default()
                },
                LoadOptions {
                    // Far above the latency bound, so that a stall shows as a latency.
                    request_timeout: Duration::from_secs(10),
                    ..LoadOptions::default()
                },
            )
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
    let mut reports = Vec::new();
    for load in loads {
        reports.push(load.finish().await);
    }

    // The plan: 1 node, then up to 40% (2 of 5), then the rest.
    let rollout = controller.rollout("latest").await;
    // Every node's load: no failure, no request over the bound, and requests kept
    // completing on the node while it restarted (its restarting..soaking span).
    for (i, report) in reports.iter().enumerate() {
        let node = rollout_node(&rollout, &node_id(i));
        let at = |state| {
            entered(node, state)
                .map(instant_of)
                .unwrap_or_else(|| panic!("{node:?}"))
        };
        let (from, to) = (at("restarting"), at("soaking"));
        eprintln!("load on {}:", node_id(i));
        report.assert_zero_loss(&ZeroLoss {
            // Sized to the load that ran: 100 requests a second per node over the
            // whole run (measured: ~900 a second, ~2,000 in all).
            min_requests: (report.elapsed.as_millis() as u64 / 10).max(300),
            spans: vec![Span {
                label: format!("{} restarting", node_id(i)),
                from,
                to: to.max(from + SPAN_FLOOR),
            }],
            min_in_span: MIN_IN_RESTART,
            max_latency: MAX_LATENCY,
        });
    }
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

    // Every node now runs the new executable, one generation later, in a new worker.
    for (i, agent) in agents.iter().enumerate() {
        let status = agent_status(agent).await;
        let pids = |s: &StatusResponse| s.workers.iter().map(|w| w.pid).collect::<Vec<_>>();
        let (old, new) = (pids(&before[i]), pids(&status));
        assert!(
            new.len() == 1 && !old.contains(&new[0]),
            "{}: workers {old:?} before, {new:?} after",
            node_id(i)
        );
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

/// The `Instant` of a wall-clock time in Unix milliseconds (the rollout's timeline),
/// by the offset between the two clocks now.
fn instant_of(unix_ms: u64) -> Instant {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64;
    Instant::now() - Duration::from_millis(now_ms.saturating_sub(unix_ms))
}
