//! A fleet across hosts: the controller and three agents each in a network namespace
//! of their own on one bridge (10.77.0.0/24, built and removed by the test), joined
//! with a join token over mutual TLS. A rollout under load on every agent loses no
//! request; a host cut off mid-rollout turns unreachable, counts against the failure
//! budget, and serves again once its link is back, with no node restarted twice. A
//! host whose control port the controller cannot reach (it listens on the host's own
//! loopback, as behind NAT) is driven on its heartbeat stream. Agents without a token
//! that talk to a controller in clear beyond loopback take no command on their
//! streams, from the real controller or from a forger.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fleet_proto::v1 as pb;
use fleet_proto::v1::controller_service_server::{ControllerService, ControllerServiceServer};
use fleet_tests::fleet::{Controller, ControllerOpts, agent_release};
use fleet_tests::netns::Lan;
use fleet_tests::{Agent, Load, LoadOptions, LoadSpec};
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

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

/// A careless set-up: a controller in clear on the LAN (`--insecure`, no token) and
/// agents without a token that were told `--insecure-control`. Anyone on the path could
/// forge what such a controller sends, so the agents take no command on their
/// heartbeat streams; the controller dials a node's control port instead, and a node
/// whose control port it cannot reach is refused with its name and address, not
/// restarted over the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tokenless_agent_talking_in_clear_beyond_loopback_takes_no_command_on_its_stream() {
    let lan = Lan::new(&["ctl", "web-1", "web-2"]);
    let controller = Controller::start(ControllerOpts {
        listen: format!("{}:0", lan.addr("ctl")),
        args: vec!["--insecure".into()],
        wrapper: lan.wrapper("ctl"),
        ..Default::default()
    })
    .await;
    assert!(
        controller.url().starts_with("http://10."),
        "{}",
        controller.url()
    );
    let mut agents = Vec::new();
    for (id, control) in [
        ("web-1", format!("{}:0", lan.addr("web-1"))),
        // On its own host's loopback: nothing the controller's host reaches.
        ("web-2", "127.0.0.1:0".to_string()),
    ] {
        let mut opts = controller.agent_opts(id).arg("--insecure-control");
        assert_eq!(opts.token, None);
        opts.listen = vec![format!("{}:0", lan.addr(id))];
        opts.control = Some(control);
        opts.wrapper = lan.wrapper(id);
        agents.push(Agent::start(opts).await);
    }
    let before = wait_state(&controller, &["web-1", "web-2"], "serving").await;
    for node in &before {
        assert_eq!(field(node, "calls_on_stream"), false, "{before:#?}");
    }

    // Reachable: dialled, and restarted.
    controller
        .fleetctl(["restart", "web-1"])
        .await
        .expect_code(0);
    // Not reachable: refused, naming the node and where it was looked for.
    let refused = controller.fleetctl(["restart", "web-2"]).await;
    assert!(
        matches!(refused.code, Some(c) if c != 0),
        "{}",
        refused.output()
    );
    let control_2 = before
        .iter()
        .find(|n| field(n, "node_id") == "web-2")
        .map(|n| {
            field(n, "control_addr")
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .unwrap_or_default();
    assert!(control_2.starts_with("127.0.0.1:"), "{before:#?}");
    assert!(
        refused.output().contains("cannot reach node web-2")
            && refused.output().contains(&control_2)
            && refused.output().contains("Connection refused"),
        "{}",
        refused.output()
    );

    let after = wait_state(&controller, &["web-1", "web-2"], "serving").await;
    assert_eq!(
        generation(&after, "web-1"),
        generation(&before, "web-1") + 1
    );
    assert_eq!(generation(&after, "web-2"), generation(&before, "web-2"));
    drop(agents);
}

/// A controller as anyone on the path of a clear-text stream could play it: it answers
/// beats, forges a `Restart` on each new stream (with a made-up token), and hands every
/// message it reads to the test.
#[derive(Clone)]
struct Forger {
    seen: tokio::sync::mpsc::UnboundedSender<pb::HeartbeatRequest>,
}

/// The command the forger sends.
const FORGED: u64 = 4242;

/// The forger's service: only `HeartbeatStream` is written out, the rest answer
/// `UNIMPLEMENTED` (a macro around the whole impl, so `async_trait` sees each method).
macro_rules! forger {
    ($($method:ident($request:ty) -> $response:ty;)* { $($written:tt)* }) => {
        #[tonic::async_trait]
        impl ControllerService for Forger {
            $(
                async fn $method(&self, _: Request<$request>) -> Result<Response<$response>, Status> {
                    Err(Status::unimplemented("a forger"))
                }
            )*
            $($written)*
        }
    };
}

forger! {
    heartbeat(pb::HeartbeatRequest) -> pb::HeartbeatResponse;
    list_nodes(pb::ListNodesRequest) -> pb::ListNodesResponse;
    get_node(pb::GetNodeRequest) -> pb::Node;
    restart_node(pb::RestartNodeRequest) -> pb::RestartResponse;
    shutdown_node(pb::ShutdownNodeRequest) -> pb::ShutdownResponse;
    forget_node(pb::ForgetNodeRequest) -> pb::Node;
    start_rollout(pb::RolloutSpec) -> pb::Rollout;
    get_rollout(pb::GetRolloutRequest) -> pb::Rollout;
    list_rollouts(pb::ListRolloutsRequest) -> pb::ListRolloutsResponse;
    pause_rollout(pb::RolloutActionRequest) -> pb::Rollout;
    resume_rollout(pb::RolloutActionRequest) -> pb::Rollout;
    abort_rollout(pb::RolloutActionRequest) -> pb::Rollout;
    undo_rollout(pb::RolloutActionRequest) -> pb::Rollout;
    create_token(pb::CreateTokenRequest) -> pb::CreateTokenResponse;
    list_tokens(pb::ListTokensRequest) -> pb::ListTokensResponse;
    revoke_token(pb::RevokeTokenRequest) -> pb::Token;
    get_version(pb::GetVersionRequest) -> pb::VersionResponse;
    get_node_history(pb::GetNodeHistoryRequest) -> pb::NodeHistory;
    get_controllers(pb::GetControllersRequest) -> pb::ControllersResponse;
    {
        type WatchRolloutStream = ReceiverStream<Result<pb::Rollout, Status>>;

        async fn watch_rollout(
            &self,
            _: Request<pb::GetRolloutRequest>,
        ) -> Result<Response<Self::WatchRolloutStream>, Status> {
            Err(Status::unimplemented("a forger"))
        }

        type HeartbeatStreamStream = ReceiverStream<Result<pb::HeartbeatResponse, Status>>;

        async fn heartbeat_stream(
            &self,
            request: Request<tonic::Streaming<pb::HeartbeatRequest>>,
        ) -> Result<Response<Self::HeartbeatStreamStream>, Status> {
            let mut incoming = request.into_inner();
            let (out, queue) = tokio::sync::mpsc::channel(4);
            let seen = self.seen.clone();
            tokio::spawn(async move {
                let mut forged = false;
                while let Ok(Some(message)) = incoming.message().await {
                    // An answer to a command gets no reply; a beat gets its ack, and
                    // the first one the forged command after it.
                    let beat = message.answer.is_none();
                    let _ = seen.send(message);
                    if !beat {
                        continue;
                    }
                    let ack = pb::HeartbeatResponse { interval_ms: 200, ..Default::default() };
                    if out.send(Ok(ack)).await.is_err() {
                        return;
                    }
                    if !std::mem::replace(&mut forged, true) {
                        let command = pb::Command {
                            id: FORGED,
                            token: "a-token-the-forger-made-up".into(),
                            call: Some(pb::command::Call::Restart(pb::RestartRequest {
                                reason: "forged".into(),
                                ..Default::default()
                            })),
                        };
                        let forged = pb::HeartbeatResponse { interval_ms: 0, command: Some(command), ..Default::default() };
                        if out.send(Ok(forged)).await.is_err() {
                            return;
                        }
                    }
                }
            });
            Ok(Response::new(ReceiverStream::new(queue)))
        }
    }
}

/// The next message the forger read from the agent.
async fn next_message(
    seen: &mut tokio::sync::mpsc::UnboundedReceiver<pb::HeartbeatRequest>,
) -> pb::HeartbeatRequest {
    tokio::time::timeout(WAIT, seen.recv())
        .await
        .expect("a message from the agent in time")
        .expect("the forger runs")
}

/// The hostile case of the test above: a forged command on a tokenless agent's
/// clear-text stream is answered PERMISSION_DENIED with what to do, and the node does
/// not restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_forged_on_a_clear_text_stream_beyond_loopback_is_refused() {
    let lan = Lan::new(&["ctl", "web-1"]);
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let ctl = lan.addr("ctl");
    let forger = lan.spawn_in("ctl", move || async move {
        let listener = tokio::net::TcpListener::bind((ctl, 0)).await.unwrap();
        addr_tx.send(listener.local_addr().unwrap()).unwrap();
        tonic::transport::Server::builder()
            .add_service(ControllerServiceServer::new(Forger { seen: seen_tx }))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                async {
                    let _ = stop_rx.await;
                },
            )
            .await
            .unwrap();
    });
    let addr = addr_rx.await.unwrap();
    let mut opts = fleet_tests::AgentOpts::default()
        .arg("--controller")
        .arg(format!("http://{addr}"))
        .arg("--node-id")
        .arg("web-1")
        .arg("--insecure-control");
    opts.listen = vec![format!("{}:0", lan.addr("web-1"))];
    opts.control = Some(format!("{}:0", lan.addr("web-1")));
    opts.wrapper = lan.wrapper("web-1");
    let agent = Agent::start(opts).await;

    let first = next_message(&mut seen).await;
    assert!(!first.takes_commands, "{first:#?}");
    let generation = first
        .status
        .as_ref()
        .map(|s| s.generation)
        .unwrap_or_default();
    assert!(generation >= 1, "{first:#?}");
    let answer = loop {
        let message = next_message(&mut seen).await;
        if let Some(answer) = message.answer {
            break answer;
        }
    };
    assert_eq!(answer.id, FORGED);
    let Some(pb::command_answer::Answer::Error(error)) = &answer.answer else {
        panic!("the forged restart was not refused: {answer:#?}");
    };
    assert_eq!(
        error.code,
        tonic::Code::PermissionDenied as i32,
        "{error:#?}"
    );
    assert!(error.message.contains("takes no commands"), "{error:#?}");
    // Beats go on, and the node is where it was (two more, so the forged command had
    // its time).
    for _ in 0..2 {
        let beat = loop {
            let message = next_message(&mut seen).await;
            if message.answer.is_none() {
                break message;
            }
        };
        let status = beat.status.unwrap_or_default();
        assert_eq!(status.generation, generation, "{status:#?}");
        assert_eq!(status.state, "serving", "{status:#?}");
    }
    drop(agent);
    let _ = stop_tx.send(());
    tokio::task::spawn_blocking(move || forger.join())
        .await
        .unwrap()
        .expect("the forger thread");
}
