//! A fleet across hosts: the controller and three agents each in a network namespace
//! of their own on one bridge (10.77.0.0/24, built and removed by the test), joined
//! with a join token over mutual TLS. A rollout under load on every agent loses no
//! request; a host cut off mid-rollout turns unreachable, counts against the failure
//! budget, and serves again once its link is back, with no node restarted twice. A
//! host whose control port the controller cannot reach (it listens on the host's own
//! loopback, as behind NAT) is driven on its heartbeat stream.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fleet_tests::fleet::{Controller, ControllerOpts, agent_release};
use fleet_tests::netns::Lan;
use fleet_tests::{Agent, Load, LoadOptions, LoadSpec};

const ADMIN: &str = "admin-token-for-the-hosts-test";
const NODES: [&str; 3] = ["web-1", "web-2", "web-3"];
const WAIT: Duration = Duration::from_secs(30);

/// The controller on host `ctl`, mutual TLS, listening on the LAN.
async fn controller(lan: &Lan) -> Controller {
    Controller::start(ControllerOpts {
        listen: format!("{}:0", lan.addr("ctl")),
        tls: true,
        token: Some(ADMIN.into()),
        wrapper: lan.wrapper("ctl"),
        ..Default::default()
    })
    .await
}

/// A join token for node ids starting `prefix`, written to a file in `dir`.
pub async fn join_token_file(controller: &Controller, prefix: &str, dir: &Path) -> PathBuf {
    let ctl = controller
        .fleetctl([
            "token",
            "create",
            "--join",
            "--ttl",
            "1h",
            "--node-id-prefix",
            prefix,
        ])
        .await;
    ctl.expect_code(0);
    let secret = ctl
        .stdout
        .split_whitespace()
        .find(|w| w.starts_with("fleet_"))
        .unwrap_or_else(|| panic!("no token in {:?}", ctl.stdout))
        .to_string();
    let path = dir.join(format!("join-{prefix}"));
    std::fs::write(&path, secret).unwrap();
    path
}

/// Each agent on its own host, joined over mutual TLS.
async fn agents(lan: &Lan, controller: &Controller, token: &Path, releases: &Path) -> Vec<Agent> {
    let mut agents = Vec::new();
    for id in NODES {
        let addr = lan.addr(id);
        let mut opts = controller
            .join_opts(id, token)
            .arg("--allowed-exe-dir")
            .arg(releases);
        opts.listen = vec![format!("{addr}:0")];
        opts.control = Some(format!("{addr}:0"));
        opts.wrapper = lan.wrapper(id);
        agents.push(Agent::start(opts).await);
    }
    agents
}

/// `fleetctl nodes -o json`, run on the controller's host.
async fn nodes(controller: &Controller) -> Vec<serde_json::Value> {
    let ctl = controller.fleetctl(["nodes", "-o", "json"]).await;
    ctl.expect_code(0);
    ctl.json().as_array().cloned().unwrap_or_default()
}

fn field<'a>(node: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    &node[name]
}

/// Polls `fleetctl nodes` until `ids` are all in `state`.
async fn wait_state(controller: &Controller, ids: &[&str], state: &str) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let nodes = nodes(controller).await;
        let ok = ids.iter().all(|id| {
            nodes
                .iter()
                .any(|n| field(n, "node_id") == *id && field(n, "state") == state)
        });
        if ok {
            return nodes;
        }
        assert!(
            Instant::now() < deadline,
            "{ids:?} not all {state} within {WAIT:?}: {nodes:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn generation(nodes: &[serde_json::Value], id: &str) -> u64 {
    let node = nodes
        .iter()
        .find(|n| field(n, "node_id") == id)
        .unwrap_or_else(|| panic!("no {id} in {nodes:#?}"));
    let g = field(node, "generation");
    g.as_u64()
        .or_else(|| g.as_str().and_then(|s| s.parse().ok()))
        .unwrap_or_else(|| panic!("generation of {node:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_across_hosts_over_mutual_tls_loses_no_request() {
    let lan = Lan::new(&["ctl", "web-1", "web-2", "web-3", "client"]);
    let releases = tempfile::tempdir().unwrap();
    let v2 = agent_release(releases.path(), "fleet-agent-v2");
    let controller = controller(&lan).await;
    let token = join_token_file(&controller, "web-", controller.dir()).await;
    let agents = agents(&lan, &controller, &token, releases.path()).await;
    wait_state(&controller, &NODES, "serving").await;

    // Clients on their own host, one load per node, until told to stop.
    let targets: Vec<_> = agents.iter().map(Agent::app).collect();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (progress_tx, mut progress_rx) = tokio::sync::watch::channel(0u64);
    let load = lan.spawn_in("client", move || async move {
        let loads: Vec<Load> = targets
            .iter()
            .map(|&target| {
                Load::start_with(
                    LoadSpec {
                        target,
                        keepalive_connections: 2,
                        fresh_connections: 2,
                        max_requests: 2_000_000,
                        max_duration: Duration::from_secs(120),
                        ..Default::default()
                    },
                    LoadOptions {
                        request_timeout: Duration::from_secs(10),
                        ..Default::default()
                    },
                )
            })
            .collect();
        let mut stop_rx = stop_rx;
        loop {
            tokio::select! {
                _ = stop_rx.wait_for(|s| *s) => break,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {
                    let done = loads.iter().map(Load::snapshot_requests).min().unwrap_or(0);
                    let _ = progress_tx.send(done);
                }
            }
        }
        let mut reports = Vec::new();
        for load in loads {
            reports.push(load.finish().await);
        }
        reports
    });
    progress_rx
        .wait_for(|n| *n >= 50)
        .await
        .expect("the load runs");

    let ctl = controller
        .fleetctl([
            "rollout".as_ref(),
            "--exe".as_ref(),
            v2.as_os_str(),
            "--reason".as_ref(),
            "v2 across hosts".as_ref(),
            "--min-healthy".as_ref(),
            "1s".as_ref(),
        ])
        .await;
    ctl.expect_code(0);
    let after = *progress_rx.borrow();
    progress_rx
        .wait_for(|n| *n >= after + 50)
        .await
        .expect("the load runs on");
    stop_tx.send(true).unwrap();
    let reports = tokio::task::spawn_blocking(move || load.join().expect("the load thread"))
        .await
        .unwrap();
    for (id, report) in NODES.iter().zip(&reports) {
        eprintln!("load on {id}:");
        report.assert_no_failures(100);
    }
    let nodes = wait_state(&controller, &NODES, "serving").await;
    for node in &nodes {
        let exe = field(node, "exe")["path"].as_str().unwrap_or_default();
        assert!(exe.ends_with("fleet-agent-v2"), "{node:#?}");
    }
    drop(agents);
}

/// `fleetctl rollout status ID -o json`, polled until the rollout ends.
async fn wait_rollout_end(controller: &Controller, id: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let ctl = controller
            .fleetctl(["rollout", "status", id, "-o", "json"])
            .await;
        let rollout = ctl.json();
        let state = rollout["state"].as_str().unwrap_or_default().to_string();
        if fleet_tests::fleet::FINISHED.contains(&state.as_str()) {
            return rollout;
        }
        assert!(
            Instant::now() < deadline,
            "rollout {id} did not end: {rollout:#}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_cut_off_mid_rollout_counts_against_the_budget_and_comes_back() {
    let lan = Lan::new(&["ctl", "web-1", "web-2", "web-3"]);
    let releases = tempfile::tempdir().unwrap();
    let v2 = agent_release(releases.path(), "fleet-agent-v2");
    let controller = controller(&lan).await;
    let token = join_token_file(&controller, "web-", controller.dir()).await;
    let agents = agents(&lan, &controller, &token, releases.path()).await;
    let before = wait_state(&controller, &NODES, "serving").await;

    // One node at a time, each soaking 3 s: web-3's turn comes after 6 s.
    controller
        .fleetctl([
            "rollout".as_ref(),
            "--exe".as_ref(),
            v2.as_os_str(),
            "--min-healthy".as_ref(),
            "3s".as_ref(),
            "--max-failures".as_ref(),
            "1".as_ref(),
            "--detach".as_ref(),
        ])
        .await
        .expect_code(0);
    lan.cut("web-3");
    let cut = wait_state(&controller, &["web-3"], "unreachable").await;
    eprintln!("web-3 cut off: {cut:#?}");

    let rollout = wait_rollout_end(&controller, "latest").await;
    let node = |id: &str| {
        rollout["nodes"]
            .as_array()
            .and_then(|nodes| nodes.iter().find(|n| n["node_id"] == id))
            .cloned()
            .unwrap_or_else(|| panic!("no {id} in {rollout:#}"))
    };
    assert_eq!(node("web-1")["state"], "healthy", "{rollout:#}");
    assert_eq!(node("web-2")["state"], "healthy", "{rollout:#}");
    let web3 = node("web-3");
    assert_eq!(web3["state"], "failed", "{rollout:#}");
    assert!(
        web3["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("unreachable"),
        "{web3:#}"
    );

    lan.restore("web-3");
    let after = wait_state(&controller, &NODES, "serving").await;
    // Restarted once each, and web-3 not at all.
    for (id, more) in [("web-1", 1), ("web-2", 1), ("web-3", 0)] {
        assert_eq!(
            generation(&after, id),
            generation(&before, id) + more,
            "{id}: {after:#?}"
        );
    }
    drop(agents);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_the_controller_cannot_dial_is_rolled_out_restarted_and_shut_down_on_its_heartbeat_stream()
 {
    let lan = Lan::new(&["ctl", "web-1"]);
    let releases = tempfile::tempdir().unwrap();
    let v2 = agent_release(releases.path(), "fleet-agent-v2");
    let controller = controller(&lan).await;
    let token = join_token_file(&controller, "web-", controller.dir()).await;
    // Its control port on its own host's loopback: the address it reports
    // (127.0.0.1:PORT) is nothing the controller's host can reach it at.
    let mut opts = controller
        .join_opts("web-1", &token)
        .arg("--allowed-exe-dir")
        .arg(releases.path());
    opts.listen = vec![format!("{}:0", lan.addr("web-1"))];
    opts.control = Some("127.0.0.1:0".into());
    opts.wrapper = lan.wrapper("web-1");
    let agent = Agent::start(opts).await;
    let before = wait_state(&controller, &["web-1"], "serving").await;
    let control = field(&before[0], "control_addr")
        .as_str()
        .unwrap_or_default();
    assert!(control.starts_with("127.0.0.1:"), "{before:#?}");
    assert_eq!(field(&before[0], "calls_on_stream"), true, "{before:#?}");
    let shown = controller.fleetctl(["node", "web-1"]).await;
    shown.expect_code(0);
    assert!(
        shown.stdout.contains("Calls:") && shown.stdout.contains("on its heartbeat stream"),
        "{}",
        shown.stdout
    );

    controller
        .fleetctl([
            "rollout".as_ref(),
            "--exe".as_ref(),
            v2.as_os_str(),
            "--reason".as_ref(),
            "behind NAT".as_ref(),
        ])
        .await
        .expect_code(0);
    controller
        .fleetctl(["restart", "web-1"])
        .await
        .expect_code(0);
    let after = wait_state(&controller, &["web-1"], "serving").await;
    assert_eq!(
        generation(&after, "web-1"),
        generation(&before, "web-1") + 2,
        "{after:#?}"
    );
    let exe = field(&after[0], "exe")["path"].as_str().unwrap_or_default();
    assert!(exe.ends_with("fleet-agent-v2"), "{after:#?}");
    controller
        .fleetctl(["shutdown", "web-1"])
        .await
        .expect_code(0);
    agent.wait_exit(WAIT).await;
}
