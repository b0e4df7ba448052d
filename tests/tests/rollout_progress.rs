//! Honest progress and safe defaults, through fleetctl against the real controller and
//! agents: `fleetctl rollout status ID` exits as `--watch` does (0 succeeded, 1 failed,
//! 3 rolled back); progress counts only healthy nodes as done (failed and skipped
//! apart); a failure with nothing to roll back ends `failed` and says so instead of
//! `rolled-back`; the controller's log gives the same duration as fleetctl; a rollout
//! that gives no soak gets the controller's default (10 s), shown resolved, and an
//! explicit `--min-healthy 0s` is kept.

use std::ffi::OsStr;
use std::path::Path;
use std::time::Duration;

use fleet_proto::v1 as pb;
use fleet_tests::fleet::{
    Controller, ControllerOpts, agent_release, agent_status, describe, entered, rollout_node,
};
use fleet_tests::harness::{copy_agent_binary, http_get, install_fixture};

/// `fleetctl rollout --exe RELEASE ARGS...`
async fn rollout(
    controller: &Controller,
    release: &Path,
    args: &[&str],
) -> fleet_tests::fleet::Ctl {
    let mut all: Vec<&OsStr> = vec!["rollout".as_ref(), "--exe".as_ref(), release.as_os_str()];
    all.extend(args.iter().map(OsStr::new));
    controller.fleetctl(all).await
}

/// `fleetctl rollout status ID`, which must exit with `code`; its stdout.
async fn status(controller: &Controller, id: &str, code: i32) -> String {
    controller
        .fleetctl(["rollout", "status", id])
        .await
        .expect_code(code)
        .stdout
        .clone()
}

fn progress(r: &pb::Rollout) -> pb::RolloutProgress {
    r.progress
        .unwrap_or_else(|| panic!("the controller sent no progress: {}", describe(r)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_status_exits_as_the_watch_does_and_only_healthy_nodes_count_as_done() {
    // A release that execs a copy of the agent, except on the nodes listed in
    // crash-nodes (rewritten before each rollout).
    let releases = tempfile::tempdir().unwrap();
    copy_agent_binary(releases.path(), "fleet-agent-real");
    let crash = releases.path().join("crash-nodes");
    std::fs::write(&crash, "").unwrap();
    let release =
        std::fs::canonicalize(install_fixture(releases.path(), "crash_on_nodes.sh")).unwrap();
    let controller = Controller::start(ControllerOpts::default()).await;
    let agents = controller
        .start_nodes(3, |_, opts| {
            opts.arg("--allowed-exe-dir").arg(releases.path())
        })
        .await;
    // One node per batch: node-1, node-2, node-3.
    let one_by_one = ["--batches", "1,2,100%", "--max-failures", "0"];

    // Succeeded, with an explicit soak of 0: kept, not replaced by the default.
    let mut args = one_by_one.to_vec();
    args.extend(["--min-healthy", "0s"]);
    rollout(&controller, &release, &args).await.expect_code(0);
    let ok = controller.rollout("latest").await;
    assert_eq!(ok.state, "succeeded", "{}", describe(&ok));
    let spec = ok.spec.clone().unwrap();
    assert_eq!((spec.min_healthy_ms, spec.min_healthy_set), (0, true));
    let text = status(&controller, &ok.id, 0).await;
    assert!(text.contains("min-healthy 0s (no soak)"), "{text}");
    assert!(text.contains("Progress:  3/3 healthy (100%)"), "{text}");
    let p = progress(&ok);
    assert_eq!((p.total, p.healthy, p.failed, p.skipped), (3, 3, 0, 0));

    // Failed at node-2, no rollback: node-1 healthy, node-2 failed, node-3 skipped —
    // 33%, not "100% (3/3)"; `rollout status` exits 1 as the watch did.
    std::fs::write(&crash, "node-2\n").unwrap();
    rollout(&controller, &release, &one_by_one)
        .await
        .expect_code(1);
    let failed = controller.rollout("latest").await;
    assert_eq!(failed.state, "failed", "{}", describe(&failed));
    let p = progress(&failed);
    assert_eq!(
        (
            p.total,
            p.healthy,
            p.failed,
            p.skipped,
            p.rolled_back,
            p.active,
            p.pending
        ),
        (3, 1, 1, 1, 0, 0, 0),
        "{}",
        describe(&failed)
    );
    let text = status(&controller, &failed.id, 1).await;
    assert!(
        text.contains("Progress:  1/3 healthy (33%), 1 failed, 1 skipped"),
        "{text}"
    );
    // The HTTP API gives the same counts, and its times in RFC 3339 too.
    let api = http_get(controller.addr(), &format!("/api/rollouts/{}", failed.id))
        .await
        .unwrap();
    let api: serde_json::Value = serde_json::from_slice(&api.body).unwrap();
    assert_eq!(
        api["progress"],
        serde_json::json!({"total": 3, "healthy": 1, "failed": 1, "rolled_back": 0,
            "skipped": 1, "active": 0, "pending": 0}),
        "{api:#}"
    );
    // Stored with the header at its end, so a controller start needn't count its nodes.
    assert_eq!(api["final_counts"], api["progress"], "{api:#}");
    // The list: newest first, counts without nodes unless asked; a bad query says why.
    let get = async |path: &str| {
        let r = http_get(controller.addr(), path).await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        (r.status, body)
    };
    let (code, list) = get("/api/rollouts").await;
    assert_eq!(code, 200, "{list:#}");
    assert_eq!(list[0]["id"], failed.id.as_str(), "{list:#}");
    assert_eq!(list[1]["id"], ok.id.as_str(), "{list:#}");
    assert_eq!(list[0]["progress"], api["progress"], "{list:#}");
    assert!(list[0].get("nodes").is_none(), "{list:#}");
    let (code, whole) = get("/api/rollouts?nodes=1&limit=1").await;
    assert_eq!(code, 200, "{whole:#}");
    assert_eq!(whole.as_array().map(Vec::len), Some(1), "{whole:#}");
    assert_eq!(
        whole[0]["nodes"].as_array().map(Vec::len),
        Some(3),
        "{whole:#}"
    );
    for bad in ["limit=0", "limit=1001", "limit=all", "nodes=yes"] {
        let (code, body) = get(&format!("/api/rollouts?{bad}")).await;
        assert_eq!(code, 400, "{bad}: {body:#}");
        let key = bad.split('=').next().unwrap();
        let msg = body["error"].as_str().unwrap_or_default();
        assert!(msg.starts_with(key), "{bad}: {body:#}");
    }
    for (text, ms) in [
        (&api["created"], failed.created_unix_ms),
        (&api["finished"], failed.finished_unix_ms),
    ] {
        let at = humantime::parse_rfc3339(text.as_str().unwrap_or_default())
            .unwrap_or_else(|e| panic!("{text} is not RFC 3339: {e}"));
        let at_ms = at
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        assert_eq!(at_ms, ms, "{api:#}");
    }
    // Batches are numbered from 1 where people read them (node-3 is in the third).
    let row = text
        .lines()
        .find(|l| l.starts_with("node-3"))
        .unwrap_or_else(|| panic!("no node-3 row:\n{text}"));
    assert!(row.split_whitespace().nth(1) == Some("3"), "{row}");
    // One duration: the controller's log says what fleetctl says.
    let took_ms = failed.finished_unix_ms - failed.created_unix_ms;
    let needle = format!(
        "rollout {} failed after {:.1}s",
        failed.id,
        took_ms as f64 / 1000.0
    );
    assert!(
        controller.log_lines().iter().any(|l| l.contains(&needle)),
        "the log gives another duration than created → finished ({needle}):\n{}",
        controller.log_lines().join("\n")
    );

    // The same failure with --auto-rollback: node-1 is moved back, exit 3 both ways.
    let mut args = one_by_one.to_vec();
    args.push("--auto-rollback");
    rollout(&controller, &release, &args).await.expect_code(3);
    let rolled = controller.rollout("latest").await;
    assert_eq!(rolled.state, "rolled-back", "{}", describe(&rolled));
    assert!(
        rolled.reason.contains("rolled back 1 node(s)"),
        "{}",
        rolled.reason
    );
    let p = progress(&rolled);
    assert_eq!(
        (p.healthy, p.failed, p.skipped, p.rolled_back),
        (0, 1, 1, 1),
        "{}",
        describe(&rolled)
    );
    let text = status(&controller, &rolled.id, 3).await;
    assert!(
        text.contains("Progress:  0/3 healthy (0%), 1 failed, 1 rolled back, 1 skipped"),
        "{text}"
    );

    // The first node fails: nothing was changed, so nothing is rolled back — the
    // rollout is failed (exit 1), not rolled-back (exit 3), and says why.
    std::fs::write(&crash, "node-1\n").unwrap();
    let mut generations = Vec::new();
    for agent in &agents {
        generations.push(agent_status(agent).await.generation);
    }
    let ctl = rollout(&controller, &release, &args).await;
    ctl.expect_code(1);
    let nothing = controller.rollout("latest").await;
    assert_eq!(nothing.state, "failed", "{}", describe(&nothing));
    assert!(
        nothing
            .reason
            .contains("nothing to roll back: no node had been changed"),
        "{}",
        nothing.reason
    );
    assert!(
        ctl.stdout.contains("nothing to roll back"),
        "fleetctl says so:\n{}",
        ctl.stdout
    );
    status(&controller, &nothing.id, 1).await;
    for (agent, before) in agents.iter().zip(generations) {
        assert_eq!(
            agent_status(agent).await.generation,
            before,
            "a node was restarted"
        );
    }
    let p = progress(&nothing);
    assert_eq!((p.failed, p.skipped, p.rolled_back), (1, 2, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_without_a_soak_gets_the_controllers_default_shown_resolved() {
    let releases = tempfile::tempdir().unwrap();
    let v2 = agent_release(releases.path(), "fleet-agent-v2");
    // The controller's own default, not the harness's 0s.
    let controller = Controller::start(ControllerOpts {
        default_min_healthy: None,
        ..ControllerOpts::default()
    })
    .await;
    let _agents = controller
        .start_nodes(1, |_, opts| {
            opts.arg("--allowed-exe-dir").arg(releases.path())
        })
        .await;

    // --help names what happens, not a default that does not exist.
    let help = controller.fleetctl(["rollout", "--help"]).await;
    let help = help.expect_code(0).stdout.replace('\n', " ");
    assert!(
        help.contains("--default-min-healthy, 10s unless set otherwise"),
        "{help}"
    );

    // The plan shows the soak the rollout would get; an explicit 0s is kept.
    let plan = rollout(&controller, &v2, &["--dry-run"]).await;
    assert!(
        plan.expect_code(0).stdout.contains("min-healthy 10s"),
        "{}",
        plan.stdout
    );
    // So does the failure budget: 0, not "default".
    assert!(plan.stdout.contains("max-failures 0"), "{}", plan.stdout);
    let plan = rollout(&controller, &v2, &["--dry-run", "--min-healthy", "0s"]).await;
    assert!(
        plan.expect_code(0)
            .stdout
            .contains("min-healthy 0s (no soak)"),
        "{}",
        plan.stdout
    );

    // A real rollout soaks its node for the default 10 s, and says so afterwards.
    rollout(&controller, &v2, &["--detach"])
        .await
        .expect_code(0);
    let r = controller
        .wait_rollout_end("latest", Duration::from_secs(60))
        .await;
    assert_eq!(r.state, "succeeded", "{}", describe(&r));
    assert_eq!(r.spec.clone().unwrap().min_healthy_ms, 10_000);
    let node = rollout_node(&r, "node-1");
    let soaked = entered(node, "healthy").unwrap() - entered(node, "soaking").unwrap();
    assert!(
        (10_000..20_000).contains(&soaked),
        "soaked {soaked} ms, not the default 10 s: {}",
        describe(&r)
    );
    let text = status(&controller, &r.id, 0).await;
    assert!(text.contains("min-healthy 10s"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_resumed_after_a_controller_restart_logs_its_whole_duration() {
    // fleetctl and the dashboard count a rollout from its creation to its end; the
    // controller's log once counted from when its engine (re)started, so a rollout
    // resumed after a controller restart "took" less in the log than in fleetctl.
    let releases = tempfile::tempdir().unwrap();
    let v2 = agent_release(releases.path(), "fleet-agent-v2");
    let controller = Controller::start(ControllerOpts {
        default_min_healthy: Some("3s".into()),
        ..ControllerOpts::default()
    })
    .await;
    let _agents = controller
        .start_nodes(1, |_, opts| {
            opts.arg("--allowed-exe-dir").arg(releases.path())
        })
        .await;
    rollout(&controller, &v2, &["--detach"])
        .await
        .expect_code(0);
    let id = controller.rollout("latest").await.id;
    // Well into its soak (1.5 s of 3 s), the controller dies and comes back.
    controller
        .wait_rollout(
            &id,
            "node-1 soaking for 1.5 s",
            Duration::from_secs(30),
            |r| {
                let node = rollout_node(r, "node-1");
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_millis() as u64;
                node.state == "soaking"
                    && entered(node, "soaking").is_some_and(|t| now >= t + 1_500)
            },
        )
        .await;
    controller.restart().await;
    let r = controller
        .wait_rollout_end(&id, Duration::from_secs(60))
        .await;
    assert_eq!(r.state, "succeeded", "{}", describe(&r));
    let took_ms = r.finished_unix_ms - r.created_unix_ms;
    assert!(took_ms >= 4_500, "took {took_ms} ms: {}", describe(&r));
    let needle = format!(
        "rollout {id} succeeded after {:.1}s",
        took_ms as f64 / 1000.0
    );
    // The audit line is written just after the end is stored: wait for it (a wrong
    // duration never comes, and the wait fails showing the log).
    controller
        .wait_for_log_from(0, &needle, Duration::from_secs(10))
        .await;
    // fleetctl shows the same one.
    let text = status(&controller, &id, 0).await;
    let fleetctl_took = format!("(after {})", fleet_duration(took_ms));
    assert!(text.contains(&fleetctl_took), "{fleetctl_took}:\n{text}");
}

/// fleetctl's way of writing a duration of a few seconds ("4.6s").
fn fleet_duration(ms: u64) -> String {
    assert!((1_000..10_000).contains(&ms), "{ms} ms");
    format!("{:.1}s", ms as f64 / 1000.0)
}
