//! Canary with pause: `--canary 1 --pause-after-canary` restarts one node and then
//! waits. `fleetctl rollout resume ID` carries on to success; `fleetctl rollout abort
//! ID` ends it with the remaining nodes untouched; `fleetctl rollout undo ID` moves
//! the nodes of a finished rollout back to their previous executable.

use std::ffi::OsStr;
use std::path::Path;
use std::time::{Duration, Instant};

use fleet_proto::v1::Rollout;
use fleet_tests::Agent;
use fleet_tests::fleet::{
    Controller, ControllerOpts, agent_release, agent_status, describe, exe_path, node_id,
};

const NODES: usize = 3;
/// How long a paused rollout is watched to see that it really waits.
const HOLD: Duration = Duration::from_secs(1);

/// Start a rollout to `exe` that pauses after a one-node canary; returns its id once
/// it is paused.
async fn start_paused_canary(controller: &Controller, exe: &Path) -> Rollout {
    let ctl = controller
        .fleetctl([
            OsStr::new("rollout"),
            "--exe".as_ref(),
            exe.as_os_str(),
            "--canary".as_ref(),
            "1".as_ref(),
            "--pause-after-canary".as_ref(),
            "--detach".as_ref(),
            "-o".as_ref(),
            "json".as_ref(),
        ])
        .await;
    let started = ctl.expect_code(0).json();
    let id = started["id"]
        .as_str()
        .expect("the rollout's id")
        .to_string();
    controller
        .wait_rollout(&id, "paused", Duration::from_secs(30), |r| {
            r.state == "paused"
        })
        .await
}

/// The canary (the one node of the first batch) and the others, by node index.
fn canary_and_rest(rollout: &Rollout) -> (usize, Vec<usize>) {
    let first = rollout.nodes.iter().map(|n| n.batch).min().expect("nodes");
    let index = |id: &str| {
        (0..NODES)
            .find(|&i| node_id(i) == id)
            .expect("a node of ours")
    };
    let canary: Vec<usize> = rollout
        .nodes
        .iter()
        .filter(|n| n.batch == first)
        .map(|n| index(&n.node_id))
        .collect();
    assert_eq!(canary.len(), 1, "one canary: {}", describe(rollout));
    let rest = (0..NODES).filter(|i| *i != canary[0]).collect();
    (canary[0], rest)
}

async fn exes(agents: &[Agent]) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for agent in agents {
        let status = agent_status(agent).await;
        out.push((exe_path(&status), status.generation));
    }
    out
}

/// For `HOLD`, the paused rollout stays paused with only its canary done, and the
/// agents keep running what they ran.
async fn assert_waits(controller: &Controller, agents: &[Agent], id: &str, canary: usize) {
    let running = exes(agents).await;
    let until = Instant::now() + HOLD;
    while Instant::now() < until {
        let rollout = controller.rollout(id).await;
        assert_eq!(rollout.state, "paused", "{}", describe(&rollout));
        for node in &rollout.nodes {
            let expected = if node.node_id == node_id(canary) {
                "healthy"
            } else {
                "pending"
            };
            assert_eq!(node.state, expected, "{}", describe(&rollout));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        exes(agents).await,
        running,
        "nothing restarted while paused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_canary_pause_waits_for_resume_and_undo_moves_the_nodes_back() {
    let releases = tempfile::tempdir().unwrap();
    let v2 = agent_release(releases.path(), "fleet-agent-v2");
    let controller = Controller::start(ControllerOpts::default()).await;
    let agents = controller
        .start_nodes(NODES, |_, opts| {
            opts.arg("--allowed-exe-dir").arg(releases.path())
        })
        .await;
    let before = exes(&agents).await;

    let paused = start_paused_canary(&controller, &v2).await;
    let id = paused.id.clone();
    let (canary, rest) = canary_and_rest(&paused);
    assert_eq!(
        exes(&agents).await[canary].0,
        v2.to_str().unwrap(),
        "the canary moved"
    );
    for &i in &rest {
        assert_eq!(exes(&agents).await[i], before[i], "{} waits", node_id(i));
    }
    assert_waits(&controller, &agents, &id, canary).await;

    controller
        .fleetctl(["rollout", "resume", &id])
        .await
        .expect_code(0);
    let watched = controller
        .fleetctl(["rollout", "status", &id, "--watch"])
        .await;
    watched.expect_code(0);
    let done = controller.rollout(&id).await;
    assert_eq!(done.state, "succeeded", "{}", describe(&done));
    for (i, (exe, generation)) in exes(&agents).await.into_iter().enumerate() {
        assert_eq!(exe, v2.to_str().unwrap(), "{}", node_id(i));
        assert_eq!(generation, before[i].1 + 1, "{}", node_id(i));
    }

    // Undo the finished rollout: every node back on the executable it ran before.
    let undo = controller.fleetctl(["rollout", "undo", &id]).await;
    undo.expect_code(0);
    let undone = controller.rollout("latest").await;
    assert_eq!(undone.undo_of, id, "{}", describe(&undone));
    assert_eq!(undone.state, "succeeded", "{}", describe(&undone));
    for (i, (exe, generation)) in exes(&agents).await.into_iter().enumerate() {
        assert_eq!(
            exe,
            before[i].0,
            "{} is back on its previous exe",
            node_id(i)
        );
        assert_eq!(generation, before[i].1 + 2, "{}", node_id(i));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_abort_after_the_canary_leaves_the_remaining_nodes_untouched() {
    let releases = tempfile::tempdir().unwrap();
    let v2 = agent_release(releases.path(), "fleet-agent-v2");
    let controller = Controller::start(ControllerOpts::default()).await;
    let agents = controller
        .start_nodes(NODES, |_, opts| {
            opts.arg("--allowed-exe-dir").arg(releases.path())
        })
        .await;
    let before = exes(&agents).await;

    let paused = start_paused_canary(&controller, &v2).await;
    let id = paused.id.clone();
    let (canary, rest) = canary_and_rest(&paused);

    controller
        .fleetctl(["rollout", "abort", &id])
        .await
        .expect_code(0);
    let aborted = controller
        .wait_rollout_end(&id, Duration::from_secs(30))
        .await;
    assert_eq!(aborted.state, "aborted", "{}", describe(&aborted));
    let status = controller
        .fleetctl(["rollout", "status", &id, "-o", "json"])
        .await;
    // An aborted rollout is a failure for `rollout status` too, as for `--watch`.
    let json = status.expect_code(1).json();
    assert_eq!(json["state"], "aborted", "{json:#}");
    for node in json["nodes"].as_array().expect("nodes") {
        let expected = if node["node_id"] == node_id(canary).as_str() {
            "healthy"
        } else {
            "skipped"
        };
        assert_eq!(node["state"], expected, "{node:#}");
    }

    let now = exes(&agents).await;
    assert_eq!(
        now[canary].0,
        v2.to_str().unwrap(),
        "the canary stays on the new exe"
    );
    for &i in &rest {
        assert_eq!(now[i], before[i], "{} was not touched", node_id(i));
    }
    // Watching an aborted rollout ends at once, as a failure.
    controller
        .fleetctl(["rollout", "status", &id, "--watch"])
        .await
        .expect_code(1);
}
