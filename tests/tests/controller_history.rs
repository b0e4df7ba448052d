//! History: every rollout keeps its spec (exe, sha256, actor, reason) and, for each
//! node, a timeline of its phases with their times and PIDs. `fleetctl rollout
//! history` lists the rollouts, newest first; `fleetctl rollout status ID -o json`
//! gives one in full.

use std::ffi::OsStr;

use fleet_proto::v1::StatusResponse;
use fleet_tests::fleet::{
    Controller, ControllerOpts, agent_release, agent_status, exe_path, node_id, worker_pid,
};
use fleet_tests::harness::sha256_hex;
use serde_json::Value;

const NODES: usize = 3;
const REASON: &str = "ship v2: fixes the slow checkout (CHG-1042)";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_history_keeps_each_rollouts_spec_and_per_node_timeline() {
    let releases = tempfile::tempdir().unwrap();
    let v2 = agent_release(releases.path(), "fleet-agent-v2");
    let sha256 = sha256_hex(&v2);
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

    controller
        .fleetctl([
            OsStr::new("rollout"),
            "--exe".as_ref(),
            v2.as_os_str(),
            "--sha256".as_ref(),
            sha256.as_ref(),
            "--reason".as_ref(),
            REASON.as_ref(),
            "--actor".as_ref(),
            "alice".as_ref(),
            "--max-parallel".as_ref(),
            "1".as_ref(),
        ])
        .await
        .expect_code(0);
    let mut after: Vec<StatusResponse> = Vec::new();
    for agent in &agents {
        after.push(agent_status(agent).await);
    }
    let first = controller.rollout("latest").await.id;
    controller
        .fleetctl(["rollout", "undo", &first, "--actor", "bob"])
        .await
        .expect_code(0);
    let undo = controller.rollout("latest").await.id;
    assert_ne!(undo, first);

    // The list: both rollouts, newest first.
    let table = controller.fleetctl(["rollout", "history"]).await;
    table.expect_code(0);
    let line_of = |id: &str| {
        table
            .stdout
            .lines()
            .position(|l| l.split_whitespace().next() == Some(id))
            .unwrap_or_else(|| panic!("rollout {id} is listed:\n{}", table.stdout))
    };
    assert!(
        line_of(&undo) < line_of(&first),
        "newest first:\n{}",
        table.stdout
    );
    let history = controller
        .fleetctl(["rollout", "history", "-o", "json"])
        .await;
    let history = history.expect_code(0).json();
    let ids: Vec<&str> = history
        .as_array()
        .expect("a JSON array of rollouts")
        .iter()
        .filter_map(|r| r["id"].as_str())
        .collect();
    assert_eq!(ids, [undo.as_str(), first.as_str()]);
    assert_eq!(history[0]["undo_of"], first.as_str(), "{history:#}");
    // A controller without a token: the caller is `local`; the --actor each gave is
    // kept beside it.
    assert_eq!(history[0]["spec"]["actor"], "local", "{history:#}");
    assert_eq!(history[0]["spec"]["declared_actor"], "bob", "{history:#}");
    assert_eq!(history[1]["spec"]["actor"], "local", "{history:#}");
    assert_eq!(history[1]["spec"]["declared_actor"], "alice", "{history:#}");
    assert!(
        table.stdout.contains("local (as \"alice\")"),
        "{}",
        table.stdout
    );

    // One rollout in full: its spec...
    let status = controller
        .fleetctl(["rollout", "status", &first, "-o", "json"])
        .await;
    let rollout = status.expect_code(0).json();
    assert_eq!(rollout["state"], "succeeded", "{rollout:#}");
    let spec = &rollout["spec"];
    assert_eq!(spec["exe"], v2.to_str().unwrap(), "{spec:#}");
    assert_eq!(spec["sha256"], sha256.as_str(), "{spec:#}");
    assert_eq!(spec["actor"], "local", "{spec:#}");
    assert_eq!(spec["declared_actor"], "alice", "{spec:#}");
    assert_eq!(spec["reason"], REASON, "{spec:#}");
    let created = rollout["created_unix_ms"]
        .as_u64()
        .expect("created_unix_ms");
    let finished = rollout["finished_unix_ms"]
        .as_u64()
        .expect("finished_unix_ms");
    assert!(created > 0 && created <= finished, "{rollout:#}");

    // ... and each node's timeline: its phases in order, each with a time within the
    // rollout, the old worker's pid while restarting and the new one's after.
    for i in 0..NODES {
        let id = node_id(i);
        let node = rollout["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .find(|n| n["node_id"] == id.as_str())
            .unwrap_or_else(|| panic!("{id} missing: {rollout:#}"));
        let (old, new) = (worker_pid(&before[i]), worker_pid(&after[i]));
        assert_ne!(old, new, "{id} got a new worker");
        assert_eq!(node["state"], "healthy", "{node:#}");
        assert_eq!(
            node["previous_exe"],
            exe_path(&before[i]).as_str(),
            "{node:#}"
        );
        assert_eq!(node["target_sha256"], sha256.as_str(), "{node:#}");
        assert_eq!(node["old_pid"].as_u64(), Some(old.into()), "{node:#}");
        assert_eq!(node["new_pid"].as_u64(), Some(new.into()), "{node:#}");

        let timeline = node["timeline"].as_array().expect("a timeline");
        let phases: Vec<&str> = timeline
            .iter()
            .filter_map(|t| t["state"].as_str())
            .collect();
        let position = |phase: &str| {
            phases
                .iter()
                .position(|p| *p == phase)
                .unwrap_or_else(|| panic!("{id}: no {phase} in {phases:?}"))
        };
        assert!(
            position("restarting") < position("soaking")
                && position("soaking") < position("healthy"),
            "{id}: phases in order: {phases:?}"
        );
        let mut last = created;
        for entry in timeline {
            let at = entry["unix_ms"].as_u64().expect("unix_ms");
            assert!(
                last <= at && at <= finished,
                "{id}: times in order: {timeline:#?}"
            );
            last = at;
            assert!(entry["message"].is_string(), "{entry:#}");
        }
        let pid = |phase: &str| -> &Value { &timeline[position(phase)]["pid"] };
        assert_eq!(
            pid("restarting").as_u64(),
            Some(old.into()),
            "{timeline:#?}"
        );
        assert_eq!(pid("soaking").as_u64(), Some(new.into()), "{timeline:#?}");
        assert_eq!(pid("healthy").as_u64(), Some(new.into()), "{timeline:#?}");
    }
}
