//! Guard rails, through the real controller, agents and fleetctl:
//! - a manual restart or shutdown of a node that an active rollout has not finished
//!   with is refused naming the rollout; `--force` lets it through, the controller logs
//!   it with the caller and writes it into the node's timeline, and the rollout then
//!   does not restart that node a second time;
//! - a restart of a stopped node says it is stopped, where it was, and what to do,
//!   instead of a transport error;
//! - `--exclude NODE` and `--skip-unreachable` leave nodes out of the plan, and the
//!   rollout lists them with why;
//! - a dry run shows the plan even when preflight would refuse, marks the refusing
//!   nodes and exits 2 as the real run would;
//! - preflight refusals are grouped by reason.

use std::ffi::OsStr;
use std::time::Duration;

use fleet_tests::fleet::{
    Controller, ControllerOpts, agent_release, agent_status, exe_path, rollout_node,
};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const WAIT: Duration = Duration::from_secs(30);

/// A controller and three nodes that accept a v2 release (kept in the returned dir).
async fn three_nodes() -> (
    tempfile::TempDir,
    std::path::PathBuf,
    Controller,
    Vec<fleet_tests::Agent>,
) {
    let releases = tempfile::tempdir().unwrap();
    let v2 = agent_release(releases.path(), "fleet-agent-v2");
    let controller = Controller::start(ControllerOpts::default()).await;
    let agents = controller
        .start_nodes(3, |_, opts| {
            opts.arg("--allowed-exe-dir").arg(releases.path())
        })
        .await;
    (releases, v2, controller, agents)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_actions_during_a_rollout_are_refused_unless_forced_and_a_stopped_node_says_so() {
    let (_releases, v2, controller, agents) = three_nodes().await;

    // A rollout that pauses after its canary (node-1): node-2 and node-3 are pending.
    let started = controller
        .fleetctl([
            OsStr::new("rollout"),
            "--exe".as_ref(),
            v2.as_os_str(),
            "--canary".as_ref(),
            "1".as_ref(),
            "--pause-after-canary".as_ref(),
            "--detach".as_ref(),
        ])
        .await;
    started.expect_code(0);
    let rollout = controller
        .wait_rollout("latest", "paused after its canary", WAIT, |r| {
            r.state == "paused"
        })
        .await;
    let id = rollout.id.clone();
    assert_eq!(rollout_node(&rollout, "node-3").state, "pending");
    let generation_before = agent_status(&agents[2]).await.generation;

    for action in ["restart", "shutdown"] {
        let refused = controller.fleetctl([action, "node-3"]).await;
        refused.expect_code(2);
        let output = refused.output();
        for needle in [
            format!("node node-3 is in rollout {id}"),
            "paused".to_string(),
            format!("fleetctl rollout abort {id}"),
            "--force".to_string(),
        ] {
            assert!(
                output.contains(&needle),
                "{action} refused saying {needle:?}:\n{output}"
            );
        }
    }
    let status = agent_status(&agents[2]).await;
    assert_eq!(
        status.generation, generation_before,
        "the refused restart did not reach the agent"
    );
    assert!(
        agents[2].try_exit().is_none(),
        "the refused shutdown neither"
    );

    // --force: through, logged with the caller, and in the node's rollout timeline.
    let mark = controller.log_lines().len();
    let forced = controller
        .fleetctl([
            OsStr::new("restart"),
            "node-3".as_ref(),
            "--exe".as_ref(),
            v2.as_os_str(),
            "--force".as_ref(),
        ])
        .await;
    forced.expect_code(0);
    let line = controller
        .wait_for_log_from(mark, "manual restart forced by", WAIT)
        .await;
    assert!(
        line.contains("node-3") && line.contains(&format!("rollout {id}")),
        "{line}"
    );
    let forced_generation = agent_status(&agents[2]).await.generation;
    assert_eq!(forced_generation, generation_before + 1);
    let rollout = controller.rollout(&id).await;
    let node3 = rollout_node(&rollout, "node-3");
    assert!(
        node3
            .timeline
            .iter()
            .any(|t| t.message.contains("manual restart forced by")),
        "the forced restart is in node-3's timeline: {:?}",
        node3.timeline
    );
    // The controller learns node-3's new generation from its next heartbeat; the
    // rollout compares against it when it reaches node-3.
    controller
        .wait_nodes(&["node-3".to_string()], "serving", WAIT)
        .await;
    fleet_tests::harness::eventually(WAIT, "node-3's new generation heartbeated", async || {
        let nodes = controller.nodes().await;
        let n = nodes.iter().find(|n| n.node_id == "node-3").unwrap();
        if n.generation == forced_generation {
            Ok(())
        } else {
            Err(format!("generation {}", n.generation))
        }
    })
    .await;

    controller
        .fleetctl(["rollout", "resume", &id])
        .await
        .expect_code(0);
    let ended = controller.wait_rollout_end(&id, WAIT).await;
    assert_eq!(ended.state, "succeeded", "{}", ended.reason);
    let node3 = rollout_node(&ended, "node-3");
    assert_eq!(node3.state, "healthy");
    assert!(
        node3
            .timeline
            .iter()
            .any(|t| t.message.contains("not restarted again")),
        "{:?}",
        node3.timeline
    );
    assert_eq!(
        agent_status(&agents[2]).await.generation,
        forced_generation,
        "the rollout did not restart node-3 a second time"
    );
    for agent in &agents {
        assert_eq!(
            exe_path(&agent_status(agent).await),
            v2.display().to_string()
        );
    }

    // The rollout is done with node-3: a shutdown goes through. Then a restart of the
    // stopped node says so, with its address, before any connection is tried.
    controller
        .fleetctl(["shutdown", "node-3"])
        .await
        .expect_code(0);
    agents[2].wait_exit(WAIT).await;
    controller
        .wait_nodes(&["node-3".to_string()], "stopped", WAIT)
        .await;
    let stopped = controller.fleetctl(["restart", "node-3"]).await;
    stopped.expect_code(2);
    let output = stopped.output();
    let address = agents[2].control().to_string();
    for needle in [
        "node node-3 is stopped",
        "last heartbeat",
        address.as_str(),
        "start its agent again",
    ] {
        assert!(output.contains(needle), "{needle:?} in:\n{output}");
    }
    assert!(!output.contains("tcp connect"), "{output}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclude_skip_unreachable_dry_runs_and_grouped_refusals() {
    let (releases, v2, controller, agents) = three_nodes().await;

    // One reason shared by every node: one line naming them all.
    let missing = releases.path().join("fleet-agent-v9");
    let refused = controller
        .fleetctl([OsStr::new("rollout"), "--exe".as_ref(), missing.as_os_str()])
        .await;
    refused.expect_code(2);
    let output = refused.output();
    let line = output
        .lines()
        .find(|l| l.trim_start().starts_with("3 nodes: "))
        .unwrap_or_else(|| panic!("one line for the three refusals:\n{output}"));
    assert!(
        line.ends_with(": node-1, node-2, node-3") && line.contains("does not exist"),
        "{line}"
    );

    // An excluded id that no node has is a typo, refused.
    let typo = controller
        .fleetctl([
            OsStr::new("rollout"),
            "--exe".as_ref(),
            v2.as_os_str(),
            "--exclude".as_ref(),
            "node-9".as_ref(),
        ])
        .await;
    typo.expect_code(2);
    assert!(
        typo.output().contains("no node \"node-9\""),
        "{}",
        typo.output()
    );

    // node-3's agent freezes: its heartbeats stop, and it turns unreachable.
    let frozen = Pid::from_raw(agents[2].pid() as i32);
    kill(frozen, Signal::SIGSTOP).unwrap();
    controller
        .wait_nodes(&["node-3".to_string()], "unreachable", WAIT)
        .await;

    // A dry run shows the plan, node-3 marked with why, and exits 2 as the real run.
    let dry = controller
        .fleetctl([
            OsStr::new("rollout"),
            "--exe".as_ref(),
            v2.as_os_str(),
            "--dry-run".as_ref(),
        ])
        .await;
    dry.expect_code(2);
    let output = dry.output();
    for needle in [
        "batch 1/3",
        "node-1",
        "node-3*",
        "preflight would refuse 1 of 3 node(s)",
        "1 node: unreachable",
        "--skip-unreachable",
    ] {
        assert!(output.contains(needle), "{needle:?} in:\n{output}");
    }
    assert!(
        controller.rollouts().await.is_empty(),
        "a dry run starts nothing"
    );

    // --skip-unreachable and --exclude: only node-2 is planned, the others listed.
    let args = |dry_run: bool| {
        let mut args = vec![
            OsStr::new("rollout"),
            "--exe".as_ref(),
            v2.as_os_str(),
            "--exclude".as_ref(),
            "node-1".as_ref(),
            "--skip-unreachable".as_ref(),
        ];
        if dry_run {
            args.push("--dry-run".as_ref());
        }
        args
    };
    let dry = controller.fleetctl(args(true)).await;
    dry.expect_code(0);
    let output = dry.output();
    for needle in [
        "batch 1/1",
        "left out: 1 node: excluded by request (--exclude): node-1",
        "left out: 1 node: skipped by request (--skip-unreachable): unreachable",
    ] {
        assert!(output.contains(needle), "{needle:?} in:\n{output}");
    }
    assert!(!output.contains("node-3*"), "{output}");

    let run = controller.fleetctl(args(false)).await;
    run.expect_code(0);
    let rollout = controller.rollout("latest").await;
    assert_eq!(rollout.state, "succeeded", "{}", rollout.reason);
    let planned: Vec<&str> = rollout.nodes.iter().map(|n| n.node_id.as_str()).collect();
    assert_eq!(planned, ["node-2"]);
    let spec = rollout.spec.clone().unwrap();
    let left_out: Vec<(&str, bool)> = spec
        .left_out
        .iter()
        .map(|r| (r.node_id.as_str(), r.reason.contains("by request")))
        .collect();
    assert_eq!(left_out, [("node-1", true), ("node-3", true)]);
    assert_eq!(spec.exclude, ["node-1"]);
    assert_eq!(
        exe_path(&agent_status(&agents[1]).await),
        v2.display().to_string()
    );
    assert_ne!(
        exe_path(&agent_status(&agents[0]).await),
        v2.display().to_string()
    );

    kill(frozen, Signal::SIGCONT).unwrap();
}

/// A node whose agent died since its last heartbeat still looks serving (a long
/// heartbeat ttl here); preflight cannot reach it. Without `--skip-unreachable` that
/// refuses the rollout; with it, the node is left out and the others move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_unreachable_also_leaves_out_a_node_that_preflight_cannot_reach() {
    let releases = tempfile::tempdir().unwrap();
    let v2 = agent_release(releases.path(), "fleet-agent-v2");
    let controller = Controller::start(ControllerOpts {
        heartbeat_ttl: "120s".into(),
        ..Default::default()
    })
    .await;
    let agents = controller
        .start_nodes(2, |_, opts| {
            opts.arg("--allowed-exe-dir").arg(releases.path())
        })
        .await;
    fleet_tests::harness::kill_tree(agents[1].pid());
    agents[1].wait_exit(WAIT).await;
    let nodes = controller.nodes().await;
    let node2 = nodes.iter().find(|n| n.node_id == "node-2").unwrap();
    assert_eq!(node2.state, "serving", "not yet overdue: {node2:?}");

    let refused = controller
        .fleetctl([OsStr::new("rollout"), "--exe".as_ref(), v2.as_os_str()])
        .await;
    refused.expect_code(2);
    assert!(
        refused.output().contains("1 node: unreachable"),
        "{}",
        refused.output()
    );

    let run = controller
        .fleetctl([
            OsStr::new("rollout"),
            "--exe".as_ref(),
            v2.as_os_str(),
            "--skip-unreachable".as_ref(),
        ])
        .await;
    run.expect_code(0);
    let rollout = controller.rollout("latest").await;
    assert_eq!(rollout.state, "succeeded", "{}", rollout.reason);
    let planned: Vec<&str> = rollout.nodes.iter().map(|n| n.node_id.as_str()).collect();
    assert_eq!(planned, ["node-1"]);
    let left_out = &rollout.spec.as_ref().unwrap().left_out;
    assert_eq!(left_out.len(), 1, "{left_out:?}");
    assert_eq!(left_out[0].node_id, "node-2");
    assert!(
        left_out[0]
            .reason
            .starts_with("skipped by request (--skip-unreachable): unreachable"),
        "{left_out:?}"
    );
    assert_eq!(
        exe_path(&agent_status(&agents[0]).await),
        v2.display().to_string()
    );
}
