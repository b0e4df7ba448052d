//! The controller on etcd (`--store etcd://…`): a three-member cluster keeps the
//! controller's state across a SIGKILL and restart (rollouts, each node's restart
//! history with its drain times, tokens), the controller keeps writing with the etcd
//! leader killed, and a controller whose etcd does not answer exits at once with an error
//! saying which endpoints and what to check.
//!
//! The rest of the controller suite runs on etcd too with `FLEET_TEST_STORE=etcd`
//! (`scripts/test.sh`).

use std::ffi::OsStr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use fleet_tests::etcd::{self, EtcdCluster};
use fleet_tests::fleet::{Controller, ControllerOpts, TestStore, agent_release, binary};
use fleet_tests::harness::eventually;
use serde_json::Value;

const NODES: usize = 3;
const TOKEN: &str = "etcd-store-bootstrap";
const WAIT: Duration = Duration::from_secs(30);

/// What survives a restart: the rollouts (id, state), node-1's restarts (at, old pid,
/// drain), the tokens (id, name).
async fn state(controller: &Controller) -> (Vec<(String, String)>, Vec<Value>, Vec<Value>) {
    let history = controller
        .fleetctl(["rollout", "history", "-o", "json"])
        .await;
    let rollouts = history
        .expect_code(0)
        .json()
        .as_array()
        .expect("rollouts")
        .iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap_or_default().to_string(),
                r["state"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let node = controller.fleetctl(["node", "node-1", "-o", "json"]).await;
    let restarts = node.expect_code(0).json()["restarts"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|r| serde_json::json!([r["at_unix_ms"], r["old_pid"], r["drain_us"]]))
        .collect();
    let tokens = controller.fleetctl(["token", "list", "-o", "json"]).await;
    let tokens = tokens
        .expect_code(0)
        .json()
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|t| serde_json::json!([t["id"], t["name"]]))
        .collect();
    (rollouts, restarts, tokens)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_on_a_three_member_etcd_keeps_its_history_across_restarts_and_a_lost_member() {
    if !etcd::installed("etcd_store") {
        return;
    }
    let cluster = Arc::new(EtcdCluster::start(3).await);
    let releases = tempfile::tempdir().unwrap();
    let v2 = agent_release(releases.path(), "fleet-agent-v2");
    let controller = Controller::start(ControllerOpts {
        token: Some(TOKEN.into()),
        store: TestStore::Etcd(cluster.clone()),
        ..ControllerOpts::default()
    })
    .await;
    let prefix = controller.etcd().expect("on etcd").prefix.clone();
    let _agents = controller
        .start_nodes(NODES, |_, opts| {
            opts.arg("--allowed-exe-dir").arg(releases.path())
        })
        .await;
    controller
        .fleetctl(["token", "create", "--role", "viewer", "--name", "grafana"])
        .await
        .expect_code(0);
    controller
        .fleetctl([
            OsStr::new("rollout"),
            "--exe".as_ref(),
            v2.as_os_str(),
            "--max-parallel".as_ref(),
            "1".as_ref(),
            "--reason".as_ref(),
            "v2 on etcd".as_ref(),
        ])
        .await
        .expect_code(0);
    // The old workers' drain times come with later heartbeats.
    let before = eventually(WAIT, "node-1's restart with its drain time", async || {
        let s = state(&controller).await;
        let drained = s.1.first().is_some_and(|r| r[2].as_u64().unwrap_or(0) > 0);
        if drained {
            Ok(s)
        } else {
            Err(format!("{s:?}"))
        }
    })
    .await;
    assert_eq!(before.0.len(), 1, "{before:?}");
    assert_eq!(before.0[0].1, "succeeded", "{before:?}");
    assert_eq!(before.1.len(), 1, "{before:?}");
    assert!(before.2.iter().any(|t| t[1] == "grafana"), "{:?}", before.2);

    // It is all in etcd, under the controller's prefix, as JSON documents.
    let keys: Vec<String> = cluster
        .dump(&prefix)
        .await
        .into_iter()
        .map(|(k, _)| k[prefix.len()..].to_string())
        .collect();
    for expected in [
        "nodes/node-1",
        "rollouts/",
        "rollout_nodes/",
        "tokens/",
        "restarts/node-1/",
    ] {
        assert!(
            keys.iter().any(|k| k.starts_with(expected)),
            "no key {prefix}{expected}…: {keys:?}"
        );
    }

    // SIGKILL and start again on the same etcd: everything is back.
    controller.restart().await;
    assert_eq!(state(&controller).await, before);

    // The leader of three members down: the other two elect one, and the controller
    // writes on (its requests to the dead member fail and are tried again).
    let leader = cluster.leader().await;
    cluster.kill(leader);
    controller
        .fleetctl(["rollout", "undo", &before.0[0].0])
        .await
        .expect_code(0);
    controller
        .fleetctl([
            "token",
            "create",
            "--role",
            "viewer",
            "--name",
            "after-kill",
        ])
        .await
        .expect_code(0);
    let during = state(&controller).await;
    assert_eq!(during.0.len(), 2, "{during:?}");
    assert!(during.0.iter().all(|(_, s)| s == "succeeded"), "{during:?}");
    assert!(
        during.2.iter().any(|t| t[1] == "after-kill"),
        "{:?}",
        during.2
    );

    // The member comes back and catches up; a restarted controller reads it all.
    cluster.restart(leader).await;
    controller.restart().await;
    let after = state(&controller).await;
    assert_eq!(after.0, during.0);
    assert_eq!(after.2, during.2);
    assert!(after.1.len() >= 2, "node-1 restarted twice: {after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_whose_etcd_does_not_answer_exits_naming_the_endpoints() {
    // Nothing listens on these ports: bound, read, released.
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let url = format!("etcd://127.0.0.1:{},127.0.0.1:{}", free(), free());
    let dir = tempfile::tempdir().unwrap();
    let run = |args: Vec<String>| {
        let mut command = tokio::process::Command::new(binary("fleet-controller"));
        command
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        async move {
            let output = tokio::time::timeout(WAIT, command.output())
                .await
                .expect("the controller exits")
                .expect("run fleet-controller");
            (
                output.status.code(),
                String::from_utf8_lossy(&output.stderr).into_owned(),
            )
        }
    };

    let started = std::time::Instant::now();
    let (code, stderr) = run(vec!["--store".into(), url.clone()]).await;
    assert_eq!(code, Some(1), "{stderr}");
    let endpoints = url.trim_start_matches("etcd://");
    assert!(
        stderr.contains(&format!(
            "cannot use etcd as the store: etcd at {endpoints}: no member answered within 5s"
        )),
        "{stderr}"
    );
    assert!(stderr.contains("etcdctl --endpoints"), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    // Nothing was created beside it: no SQLite file by mistake.
    assert!(!dir.path().join("fleet.db").exists());

    // A URL that is neither: refused before anything, saying what to write.
    let (code, stderr) = run(vec!["--store".into(), "etcd:/127.0.0.1".into()]).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("write sqlite:PATH, or etcd://HOST:PORT[,HOST:PORT...]"),
        "{stderr}"
    );
}
