//! A node shut down on purpose says so in its last heartbeat: the controller shows it
//! as `stopped` — not `unreachable` once its heartbeats are overdue — and a rollout
//! over the fleet leaves it out instead of being refused in preflight because of it.
//! `fleetctl forget` then removes it for good (a live node is refused).

use std::ffi::OsStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fleet_tests::fleet::{Controller, ControllerOpts, agent_release, agent_status, exe_path};
use fleet_tests::harness::eventually;

const WAIT: Duration = Duration::from_secs(20);
/// The controller's `--heartbeat-ttl` in these tests (ControllerOpts' default).
const TTL: Duration = Duration::from_secs(2);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_node_stays_stopped_and_rollouts_leave_it_out() {
    let releases = tempfile::tempdir().unwrap();
    let v2 = agent_release(releases.path(), "fleet-agent-v2");
    let controller = Controller::start(ControllerOpts::default()).await;
    let agents = controller
        .start_nodes(2, |_, opts| {
            opts.arg("--allowed-exe-dir").arg(releases.path())
        })
        .await;

    controller
        .fleetctl(["shutdown", "node-2"])
        .await
        .expect_code(0);
    let status = agents[1].wait_exit(WAIT).await;
    assert!(status.success(), "node-2's agent exited with {status:?}");
    let node = eventually(WAIT, "node-2 listed as stopped", async || {
        let nodes = controller.nodes().await;
        let n = nodes.iter().find(|n| n.node_id == "node-2").cloned();
        match n {
            Some(n) if n.state == "stopped" => Ok(n),
            other => Err(format!("{:?}", other.map(|n| (n.state, n.reason)))),
        }
    })
    .await;

    // Once its heartbeats would be overdue, it is still stopped, not unreachable.
    let overdue = node.last_heartbeat_unix_ms + TTL.as_millis() as u64 + 500;
    eventually(WAIT, "node-2's heartbeat overdue", async || {
        if now_ms() > overdue {
            Ok(())
        } else {
            Err(format!("{} ms to go", overdue - now_ms()))
        }
    })
    .await;
    let nodes = controller.nodes().await;
    let n = nodes.iter().find(|n| n.node_id == "node-2").unwrap();
    assert_eq!((n.state.as_str(), n.reason.as_str()), ("stopped", ""));
    let table = controller.fleetctl(["nodes"]).await;
    table.expect_code(0);
    assert!(
        table
            .stdout
            .lines()
            .any(|l| l.starts_with("node-2") && l.contains("stopped")),
        "{}",
        table.stdout
    );

    // A rollout over every node moves node-1 and leaves node-2 out.
    let ctl = controller
        .fleetctl([OsStr::new("rollout"), "--exe".as_ref(), v2.as_os_str()])
        .await;
    ctl.expect_code(0);
    let rollout = controller.rollout("latest").await;
    let targets: Vec<&str> = rollout.nodes.iter().map(|n| n.node_id.as_str()).collect();
    assert_eq!(targets, ["node-1"], "{}", ctl.output());
    assert_eq!(
        exe_path(&agent_status(&agents[0]).await),
        v2.display().to_string()
    );

    // Forget: refused for a live node and an unknown one; the stopped one goes, for
    // good (also after the controller restarts).
    let live = controller.fleetctl(["forget", "node-1"]).await;
    live.expect_code(2);
    assert!(live.output().contains("heartbeating"), "{}", live.output());
    let unknown = controller.fleetctl(["forget", "node-9"]).await;
    unknown.expect_code(2);
    assert!(unknown.output().contains("no node"), "{}", unknown.output());
    let forgot = controller.fleetctl(["forget", "node-2"]).await;
    forgot.expect_code(0);
    assert!(
        forgot.output().contains("forgot node node-2"),
        "{}",
        forgot.output()
    );
    let listed = |nodes: Vec<fleet_proto::v1::Node>| -> Vec<String> {
        nodes.into_iter().map(|n| n.node_id).collect()
    };
    assert_eq!(listed(controller.nodes().await), ["node-1"]);
    controller.restart().await;
    controller
        .wait_nodes(&["node-1".to_string()], "serving", WAIT)
        .await;
    assert_eq!(
        listed(controller.nodes().await),
        ["node-1"],
        "after a restart"
    );
}
