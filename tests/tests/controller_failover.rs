//! Several controllers in `--controller`: fleetctl and agents pass over one that is
//! down and follow a follower's `fleet-leader` hint to the leader. Two real
//! controllers cannot be leader and follower here (each has its own SQLite store), so
//! the follower is a fake: a small HTTP/2 server that answers every gRPC call
//! `UNAVAILABLE` with `fleet-leader: <the real controller's URL>`, as a follower does.
//! An agent follows such a hint only to one of its own configured controllers.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet_tests::AgentOpts;
use fleet_tests::fleet::{Controller, ControllerOpts, agent_release, agent_status, node_id};
use fleet_tests::harness::eventually;
use fleet_tests::{Agent, fleet};

const WAIT: Duration = Duration::from_secs(30);
/// Where agents send their beats: a follower refuses the call, so each beat to it
/// opens one.
const HEARTBEAT: &str = "/fleet.v1.ControllerService/HeartbeatStream";

/// A fake follower: every gRPC call is answered as a follower answers a change:
/// `UNAVAILABLE` and `fleet-leader: LEADER` (a trailers-only response, as tonic sends
/// an error). It records each call's path.
struct Follower {
    url: String,
    calls: Arc<Mutex<Vec<String>>>,
}

impl Follower {
    async fn start(leader: &str) -> Follower {
        let calls: Arc<Mutex<Vec<String>>> = Arc::default();
        let recorded = calls.clone();
        let leader = leader.to_string();
        let app = axum::Router::new().fallback(move |request: axum::extract::Request| {
            let (recorded, leader) = (recorded.clone(), leader.clone());
            async move {
                let path = request.uri().path().to_string();
                recorded.lock().unwrap().push(path.clone());
                // Read a unary request whole before answering, as a real server would;
                // a stream's request does not end, and the real controller refuses it
                // from its headers.
                if path != HEARTBEAT {
                    let _ = axum::body::to_bytes(request.into_body(), 1 << 20).await;
                }
                (
                    [
                        ("content-type", "application/grpc".to_string()),
                        ("grpc-status", "14".to_string()),
                        (
                            "grpc-message",
                            "this controller is a follower (fake)".to_string(),
                        ),
                        (fleet_proto::ha::LEADER_METADATA, leader),
                    ],
                    (),
                )
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Follower { url, calls }
    }

    /// How many calls it was sent at `path`.
    fn calls_to(&self, path: &str) -> usize {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|p| p.as_str() == path)
            .count()
    }
}

/// A URL where nothing listens: a loopback port that was free a moment ago.
fn dead_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}", listener.local_addr().unwrap())
}

/// An agent registering as `id` with the controllers in `urls` (comma-separated).
async fn agent(urls: &str, id: &str, releases: &std::path::Path) -> Agent {
    let opts = AgentOpts::default()
        .arg("--controller")
        .arg(urls)
        .arg("--node-id")
        .arg(id)
        .arg("--allowed-exe-dir")
        .arg(releases);
    Agent::start(opts).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleetctl_and_an_agent_pass_over_a_controller_that_is_down() {
    let controller = Controller::start(ControllerOpts::default()).await;
    let releases = tempfile::tempdir().unwrap();
    let urls = format!("{},{}", dead_url(), controller.url());

    let agent = agent(&urls, "node-1", releases.path()).await;
    controller
        .wait_nodes(&[node_id(0)], "serving", fleet::START_TIMEOUT)
        .await;
    agent
        .wait_for_log(&format!("heartbeats now go to {}", controller.url()), WAIT)
        .await;

    let listed = controller
        .fleetctl(["--controller", urls.as_str(), "nodes"])
        .await;
    listed.expect_code(0);
    assert!(listed.stdout.contains("node-1"), "{}", listed.stdout);
    // The dead one is passed over silently.
    assert_eq!(listed.stderr, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_refused_by_a_follower_are_carried_out_by_the_leader_it_names() {
    let controller = Controller::start(ControllerOpts::default()).await;
    let follower = Follower::start(&controller.url()).await;
    let releases = tempfile::tempdir().unwrap();
    let v2 = agent_release(releases.path(), "fleet-agent-v2");
    let agent = agent(&controller.url(), "node-1", releases.path()).await;
    controller
        .wait_nodes(&[node_id(0)], "serving", fleet::START_TIMEOUT)
        .await;
    let before = agent_status(&agent).await;

    // Only the follower is given: the leader it names need not be in the list.
    let restarted = controller
        .fleetctl(["--controller", follower.url.as_str(), "restart", "node-1"])
        .await;
    restarted.expect_code(0);
    assert_eq!(
        follower.calls_to("/fleet.v1.ControllerService/RestartNode"),
        1
    );
    let after = agent_status(&agent).await;
    assert_eq!(after.generation, before.generation + 1, "{after:?}");

    // First in the list, before the real controller: the rollout starts on the
    // leader, and is watched there to its end.
    let urls = format!("{},{}", follower.url, controller.url());
    let v2 = v2.to_str().unwrap();
    let rollout = controller
        .fleetctl(["--controller", urls.as_str(), "rollout", "--exe", v2])
        .await;
    rollout.expect_code(0);
    assert!(rollout.stdout.contains("succeeded"), "{}", rollout.stdout);
    assert_eq!(
        follower.calls_to("/fleet.v1.ControllerService/StartRollout"),
        1
    );
    let status = agent_status(&agent).await;
    assert_eq!(status.generation, before.generation + 2, "{status:?}");
    assert_eq!(fleet::exe_path(&status), v2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_follows_a_leader_hint_only_to_one_of_its_controllers() {
    let controller = Controller::start(ControllerOpts::default()).await;
    let follower = Follower::start(&controller.url()).await;
    let releases = tempfile::tempdir().unwrap();

    // The leader it names is configured (after a dead URL): the heartbeats go
    // straight there.
    let urls = format!("{},{},{}", follower.url, dead_url(), controller.url());
    let listed = agent(&urls, "node-1", releases.path()).await;
    listed
        .wait_for_log(
            &format!("heartbeats now go to {} (the leader)", controller.url()),
            WAIT,
        )
        .await;
    controller
        .wait_nodes(&[node_id(0)], "serving", fleet::START_TIMEOUT)
        .await;

    // The leader it names is not configured: the agent keeps to its own list (here the
    // follower alone) and says why it does not follow.
    let stray = agent(&follower.url, "node-2", releases.path()).await;
    stray
        .wait_for_log(
            &format!(
                "names {} as the leader, which is not one of this node's controllers",
                controller.url()
            ),
            WAIT,
        )
        .await;
    // Several rounds later it still beats only to the follower, never the leader.
    let before = follower.calls_to(HEARTBEAT);
    eventually(WAIT, "two more heartbeats to the follower", async || {
        let now = follower.calls_to(HEARTBEAT);
        if now >= before + 2 {
            Ok(())
        } else {
            Err(format!("{now} heartbeats"))
        }
    })
    .await;
    let nodes: Vec<String> = controller
        .nodes()
        .await
        .into_iter()
        .map(|n| n.node_id)
        .collect();
    assert_eq!(nodes, [node_id(0)]);
    assert_eq!(
        stray.count_log("not one of this node's controllers"),
        1,
        "the hint is warned about once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_mutual_tls_a_node_joins_past_a_controller_that_is_down() {
    const ADMIN: &str = "admin-token-for-the-failover-test";
    let controller = Controller::start(ControllerOpts {
        tls: true,
        token: Some(ADMIN.into()),
        ..Default::default()
    })
    .await;
    let dead = dead_url().replace("http://", "https://");
    let urls = format!("{dead},{}", controller.url());

    // fleetctl: the same CA for every URL.
    let created = controller
        .fleetctl([
            "--controller",
            urls.as_str(),
            "-o",
            "json",
            "token",
            "create",
            "--join",
        ])
        .await;
    let secret = created.expect_code(0).json()["secret"]
        .as_str()
        .expect("a secret")
        .to_string();
    assert_eq!(created.stderr, "");
    let token_file = controller.dir().join("join-token");
    std::fs::write(&token_file, secret).unwrap();

    // The agent joins (pinning the one fleet CA) and heartbeats past the dead one.
    let opts = AgentOpts::default()
        .arg("--controller")
        .arg(&urls)
        .arg("--node-id")
        .arg("web-1")
        .arg("--identity-dir")
        .arg("id")
        .arg("--join-token-file")
        .arg(&token_file)
        .arg("--ca-hash")
        .arg(controller.ca_hash());
    let agent = Agent::start(opts).await;
    agent
        .wait_for_log(&format!("joined the fleet at {}", controller.url()), WAIT)
        .await;
    controller
        .wait_nodes(&["web-1".to_string()], "serving", fleet::START_TIMEOUT)
        .await;
    // And the controller reaches it back over mutual TLS.
    let restarted = controller
        .fleetctl(["--controller", urls.as_str(), "restart", "web-1"])
        .await;
    restarted.expect_code(0);
}
