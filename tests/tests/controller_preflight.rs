//! Preflight: before any node is touched, every target checks the new executable
//! (it exists, is under an allowed directory, is executable, has the given sha256).
//! One node that refuses refuses the whole rollout: `fleetctl rollout` exits 2 naming
//! that node and its reason, and no node was restarted.

use std::ffi::OsStr;

use fleet_proto::v1::StatusResponse;
use fleet_tests::Agent;
use fleet_tests::fleet::{
    Controller, ControllerOpts, agent_release, agent_status, exe_path, node_id, worker_pid,
};

/// What each node runs, as (generation, worker pid, exe path).
async fn what_runs(agents: &[Agent]) -> Vec<(u64, u32, String)> {
    let mut out = Vec::new();
    for agent in agents {
        let status: StatusResponse = agent_status(agent).await;
        out.push((status.generation, worker_pid(&status), exe_path(&status)));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_preflight_refusal_by_one_node_stops_the_rollout_before_any_node_is_touched() {
    let releases = tempfile::tempdir().unwrap();
    let v2 = agent_release(releases.path(), "fleet-agent-v2");
    let controller = Controller::start(ControllerOpts::default()).await;
    // node-2 is not told about the releases directory, so it refuses the new exe.
    let agents = controller
        .start_nodes(3, |i, opts| {
            if i == 1 {
                opts
            } else {
                opts.arg("--allowed-exe-dir").arg(releases.path())
            }
        })
        .await;
    let before = what_runs(&agents).await;

    let ctl = controller
        .fleetctl([OsStr::new("rollout"), "--exe".as_ref(), v2.as_os_str()])
        .await;
    ctl.expect_code(2);
    let output = ctl.output();
    let refusal = output
        .lines()
        .find(|l| l.contains("node-2"))
        .unwrap_or_else(|| panic!("the refusing node is named:\n{output}"));
    assert!(
        refusal.contains("not under an allowed directory"),
        "node-2's line gives its reason: {refusal:?}\n{output}"
    );
    for accepted in ["node-1", "node-3"] {
        assert!(
            !output.contains(accepted),
            "{accepted} accepted the exe and is not named as refusing:\n{output}"
        );
    }
    assert_eq!(what_runs(&agents).await, before, "no node was restarted");

    // A sha256 that no node's copy has: every node refuses, saying so.
    let wrong_sha256 = "0".repeat(64);
    let ctl = controller
        .fleetctl([
            OsStr::new("rollout"),
            "--exe".as_ref(),
            v2.as_os_str(),
            "--sha256".as_ref(),
            wrong_sha256.as_ref(),
        ])
        .await;
    ctl.expect_code(2);
    let output = ctl.output();
    for i in [0, 2] {
        let line = output
            .lines()
            .find(|l| l.contains(&node_id(i)))
            .unwrap_or_else(|| panic!("{} is named:\n{output}", node_id(i)));
        assert!(line.contains("sha256"), "{line:?}");
    }

    // An executable that does not exist.
    let missing = releases.path().join("fleet-agent-v3");
    let ctl = controller
        .fleetctl([OsStr::new("rollout"), "--exe".as_ref(), missing.as_os_str()])
        .await;
    ctl.expect_code(2);
    assert!(
        ctl.output().contains("does not exist"),
        "the reason says the exe is missing:\n{}",
        ctl.output()
    );

    assert_eq!(what_runs(&agents).await, before, "no node was restarted");
    for agent in &agents {
        let status = agent_status(agent).await;
        assert_eq!(
            status.restarts_succeeded + status.restarts_failed,
            0,
            "{status:?}"
        );
    }
}
