//! The real `fleetctl` binary against a scripted in-process `ControllerService`: what it
//! prints and how it exits for each kind of answer. The fake knows nothing of agents; it
//! answers each call from a script chosen by the rollout's exe path.

use std::net::SocketAddr;
use std::pin::Pin;
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet_proto::v1::controller_service_server::{ControllerService, ControllerServiceServer};
use fleet_proto::v1::{
    CreateTokenRequest, CreateTokenResponse, ExeInfo, ForgetNodeRequest, GetNodeRequest,
    GetRolloutRequest, HeartbeatRequest, HeartbeatResponse, ListNodesRequest, ListNodesResponse,
    ListRolloutsRequest, ListRolloutsResponse, ListTokensRequest, ListTokensResponse, Node,
    RestartNodeRequest, RestartResponse, RevokeTokenRequest, Rollout, RolloutActionRequest,
    RolloutNode, RolloutSpec, ShutdownNodeRequest, ShutdownResponse, Token,
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tonic::codegen::tokio_stream::{self, Stream, StreamExt, wrappers::TcpListenerStream};
use tonic::{Request, Response, Status};

const TOKEN: &str = "s3cret";
/// A token of role viewer: refused every change, as the controller would.
const VIEWER: &str = "fleet_t0000beef_viewer";

#[derive(Debug, Default)]
struct Fake {
    /// The first WatchRollout sends two snapshots and then nothing, as a controller
    /// that is about to crash would.
    hang_first_watch: bool,
    watches: AtomicUsize,
}

fn authorized<T>(request: &Request<T>) -> Result<(), Status> {
    match request.metadata().get("authorization") {
        Some(v) if v == format!("Bearer {TOKEN}").as_str() => Ok(()),
        _ => Err(Status::unauthenticated("missing or wrong bearer token")),
    }
}

/// Admin calls: the admin token passes, the viewer's is refused with the controller's
/// wording.
fn admin<T>(request: &Request<T>, method: &str) -> Result<(), Status> {
    match request.metadata().get("authorization") {
        Some(v) if v == format!("Bearer {VIEWER}").as_str() => Err(Status::permission_denied(
            format!("token 'wall' has role viewer; {method} needs admin"),
        )),
        _ => authorized(request),
    }
}

fn token(id: &str, kind: &str) -> Token {
    Token {
        id: id.into(),
        name: "ci".into(),
        kind: kind.into(),
        created_unix_ms: 1_700_000_000_000,
        created_by: "bootstrap".into(),
        ..Default::default()
    }
}

fn node(id: &str, zone: &str) -> Node {
    let mut node = Node {
        node_id: id.into(),
        state: "serving".into(),
        admin_url: format!("http://{id}.invalid/debug/admin"),
        exe: Some(ExeInfo {
            path: "/opt/app/app-v1".into(),
            ..Default::default()
        }),
        generation: 1,
        worker_pid: 100,
        ..Default::default()
    };
    node.labels.insert("zone".into(), zone.into());
    node
}

/// r1: /opt/ok, 3 nodes in batches [n1] [n2, n3], pausing after the canary, succeeds.
/// r2: /opt/crash, fails on n1 and rolls back.
fn snapshots(exe: &str) -> Vec<Rollout> {
    let base = |id: &str, state: &str, nodes: &[(&str, u32, &str)]| Rollout {
        id: id.into(),
        state: state.into(),
        spec: Some(RolloutSpec {
            exe: exe.into(),
            actor: "alice".into(),
            ..Default::default()
        }),
        created_unix_ms: 1_000,
        nodes: nodes
            .iter()
            .map(|(n, b, s)| RolloutNode {
                node_id: n.to_string(),
                batch: *b,
                state: s.to_string(),
                old_pid: 100,
                new_pid: if *s == "healthy" { 200 } else { 0 },
                reason: if *s == "failed" {
                    "exited with status 1 before READY".into()
                } else {
                    String::new()
                },
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    if exe == "/opt/crash" {
        let mut last = base(
            "r2",
            "rolled-back",
            &[("n1", 0, "failed"), ("n2", 1, "pending")],
        );
        last.reason = "failure budget (0) spent".into();
        last.finished_unix_ms = 3_000;
        return vec![
            base(
                "r2",
                "running",
                &[("n1", 0, "pending"), ("n2", 1, "pending")],
            ),
            base(
                "r2",
                "running",
                &[("n1", 0, "restarting"), ("n2", 1, "pending")],
            ),
            last,
        ];
    }
    let mut last = base(
        "r1",
        "succeeded",
        &[
            ("n1", 0, "healthy"),
            ("n2", 1, "healthy"),
            ("n3", 1, "healthy"),
        ],
    );
    last.finished_unix_ms = 42_000;
    vec![
        base(
            "r1",
            "running",
            &[
                ("n1", 0, "pending"),
                ("n2", 1, "pending"),
                ("n3", 1, "pending"),
            ],
        ),
        base(
            "r1",
            "running",
            &[
                ("n1", 0, "restarting"),
                ("n2", 1, "pending"),
                ("n3", 1, "pending"),
            ],
        ),
        base(
            "r1",
            "paused",
            &[
                ("n1", 0, "healthy"),
                ("n2", 1, "pending"),
                ("n3", 1, "pending"),
            ],
        ),
        base(
            "r1",
            "running",
            &[
                ("n1", 0, "healthy"),
                ("n2", 1, "restarting"),
                ("n3", 1, "restarting"),
            ],
        ),
        last,
    ]
}

fn exe_of(id: &str) -> Result<&'static str, Status> {
    match id {
        "r1" | "latest" => Ok("/opt/ok"),
        "r2" => Ok("/opt/crash"),
        _ => Err(Status::not_found(format!("no rollout {id:?}"))),
    }
}

#[tonic::async_trait]
impl ControllerService for Fake {
    /// An older controller that speaks another protocol.
    async fn get_version(
        &self,
        request: Request<fleet_proto::v1::GetVersionRequest>,
    ) -> Result<Response<fleet_proto::v1::VersionResponse>, Status> {
        authorized(&request)?;
        Ok(Response::new(fleet_proto::v1::VersionResponse {
            version: "0.0.9".into(),
            git_commit: "0123456789abcdef0123".into(),
            protocol: "fleet.v0".into(),
        }))
    }

    async fn heartbeat(
        &self,
        _: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }

    type HeartbeatStreamStream =
        Pin<Box<dyn Stream<Item = Result<HeartbeatResponse, Status>> + Send>>;

    async fn heartbeat_stream(
        &self,
        _: Request<tonic::Streaming<HeartbeatRequest>>,
    ) -> Result<Response<Self::HeartbeatStreamStream>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }

    async fn list_nodes(
        &self,
        request: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        authorized(&request)?;
        let nodes = vec![node("n1", "a"), node("n2", "b")]
            .into_iter()
            .filter(|n| {
                let selector = &request.get_ref().selector;
                selector.is_empty() || selector == &format!("zone={}", n.labels["zone"])
            })
            .collect();
        // As a controller from before paging: every node, no counts, no state filter.
        Ok(Response::new(ListNodesResponse {
            nodes,
            ..Default::default()
        }))
    }

    async fn get_node(&self, request: Request<GetNodeRequest>) -> Result<Response<Node>, Status> {
        authorized(&request)?;
        match request.get_ref().node_id.as_str() {
            "n1" => Ok(Response::new(node("n1", "a"))),
            other => Err(Status::not_found(format!("no node {other:?}"))),
        }
    }

    async fn get_controllers(
        &self,
        request: Request<fleet_proto::v1::GetControllersRequest>,
    ) -> Result<Response<fleet_proto::v1::ControllersResponse>, Status> {
        authorized(&request)?;
        use fleet_proto::v1::{ControllerInfo, ControllersResponse, StoreMember};
        let controller = |url: &str, leader: bool| ControllerInfo {
            url: url.into(),
            leader,
            leader_since_unix_ms: if leader { 1_700_000_000_000 } else { 0 },
            version: "0.1.0".into(),
            started_unix_ms: 1_690_000_000_000,
        };
        let member = |name: &str, port: u16, error: &str| StoreMember {
            name: name.into(),
            endpoint: format!("127.0.0.1:{port}"),
            healthy: error.is_empty(),
            error: error.into(),
            leader: name == "e1",
        };
        Ok(Response::new(ControllersResponse {
            store: "etcd://127.0.0.1:2379,127.0.0.1:2479,127.0.0.1:2579".into(),
            answered_by: "http://c2:7100".into(),
            controllers: vec![
                controller("http://c1:7100", true),
                controller("http://c2:7100", false),
            ],
            members: vec![
                member("e1", 2379, ""),
                member("", 2479, "connection refused"),
                member("", 2579, "connection refused"),
            ],
            quorum: false,
        }))
    }

    async fn get_node_history(
        &self,
        request: Request<fleet_proto::v1::GetNodeHistoryRequest>,
    ) -> Result<Response<fleet_proto::v1::NodeHistory>, Status> {
        authorized(&request)?;
        match request.get_ref().node_id.as_str() {
            "n1" => Ok(Response::new(fleet_proto::v1::NodeHistory {
                node: Some(node("n1", "a")),
                restarts: vec![fleet_proto::v1::NodeRestart {
                    at_unix_ms: 1_700_000_000_000,
                    kind: "restart".into(),
                    actor: "alice".into(),
                    via: "grpc".into(),
                    outcome: "succeeded".into(),
                    generation: 2,
                    old_pid: 7,
                    new_pid: 8,
                    handoff_us: 4_500,
                    drain_us: 900,
                    ..Default::default()
                }],
                workers: Vec::new(),
            })),
            other => Err(Status::not_found(format!("no node {other:?}"))),
        }
    }

    async fn restart_node(
        &self,
        _: Request<RestartNodeRequest>,
    ) -> Result<Response<RestartResponse>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }

    async fn shutdown_node(
        &self,
        _: Request<ShutdownNodeRequest>,
    ) -> Result<Response<ShutdownResponse>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }

    async fn forget_node(&self, _: Request<ForgetNodeRequest>) -> Result<Response<Node>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }

    async fn create_token(
        &self,
        request: Request<CreateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        admin(&request, "CreateToken")?;
        let r = request.into_inner();
        let mut t = token("t1a2b3c4d", &r.role);
        t.name = r.name;
        if r.join {
            t.kind = "join".into();
            t.id = "j1a2b3c4d".into();
            t.node_id_prefix = r.node_id_prefix;
            t.max_uses = r.max_uses;
            t.expires_unix_ms = t.created_unix_ms + r.ttl_ms;
        }
        let secret = format!("fleet_{}_{}", t.id, "ab".repeat(32));
        Ok(Response::new(CreateTokenResponse {
            token: Some(t),
            secret,
        }))
    }

    async fn list_tokens(
        &self,
        request: Request<ListTokensRequest>,
    ) -> Result<Response<ListTokensResponse>, Status> {
        admin(&request, "ListTokens")?;
        let mut revoked = token("t5", "viewer");
        revoked.revoked_unix_ms = 1_700_000_000_500;
        Ok(Response::new(ListTokensResponse {
            tokens: vec![token("t1a2b3c4d", "operator"), revoked],
        }))
    }

    async fn revoke_token(
        &self,
        request: Request<RevokeTokenRequest>,
    ) -> Result<Response<Token>, Status> {
        admin(&request, "RevokeToken")?;
        match request.get_ref().id.as_str() {
            "t1a2b3c4d" => {
                let mut t = token("t1a2b3c4d", "operator");
                t.revoked_unix_ms = 1_700_000_000_900;
                Ok(Response::new(t))
            }
            other => Err(Status::not_found(format!(
                "no token {other:?}: list them with `fleetctl token list`"
            ))),
        }
    }

    async fn start_rollout(
        &self,
        request: Request<RolloutSpec>,
    ) -> Result<Response<Rollout>, Status> {
        authorized(&request)?;
        let spec = request.into_inner();
        if spec.exe == "/opt/refused" {
            return Err(Status::failed_precondition(
                "node n2: /opt/refused does not exist\nnode n3: /opt/refused does not exist",
            ));
        }
        let mut rollout = snapshots(&spec.exe).remove(0);
        if spec.dry_run {
            rollout.id.clear();
            rollout.state = "planned".into();
            rollout.spec = Some(spec);
        }
        Ok(Response::new(rollout))
    }

    async fn get_rollout(
        &self,
        request: Request<GetRolloutRequest>,
    ) -> Result<Response<Rollout>, Status> {
        authorized(&request)?;
        let exe = exe_of(&request.get_ref().id)?;
        Ok(Response::new(snapshots(exe).pop().unwrap()))
    }

    async fn list_rollouts(
        &self,
        request: Request<ListRolloutsRequest>,
    ) -> Result<Response<ListRolloutsResponse>, Status> {
        authorized(&request)?;
        let rollouts = vec![
            snapshots("/opt/crash").pop().unwrap(),
            snapshots("/opt/ok").pop().unwrap(),
        ];
        Ok(Response::new(ListRolloutsResponse { rollouts }))
    }

    type WatchRolloutStream = Pin<Box<dyn Stream<Item = Result<Rollout, Status>> + Send>>;

    async fn watch_rollout(
        &self,
        request: Request<GetRolloutRequest>,
    ) -> Result<Response<Self::WatchRolloutStream>, Status> {
        authorized(&request)?;
        let exe = exe_of(&request.get_ref().id)?;
        let mut items = snapshots(exe);
        if self.hang_first_watch {
            if self.watches.fetch_add(1, Ordering::SeqCst) == 0 {
                items.truncate(2);
                let hang =
                    tokio_stream::iter(items.into_iter().map(Ok)).chain(tokio_stream::pending());
                return Ok(Response::new(Box::pin(hang)));
            }
            // Later watches start from where the rollout stands.
            items.remove(0);
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(
            items.into_iter().map(Ok),
        ))))
    }

    async fn pause_rollout(
        &self,
        request: Request<RolloutActionRequest>,
    ) -> Result<Response<Rollout>, Status> {
        authorized(&request)?;
        let mut rollout = snapshots(exe_of(&request.get_ref().id)?).remove(2);
        rollout.reason = format!("paused by {}", request.get_ref().actor);
        Ok(Response::new(rollout))
    }

    async fn resume_rollout(
        &self,
        _: Request<RolloutActionRequest>,
    ) -> Result<Response<Rollout>, Status> {
        Err(Status::failed_precondition("rollout r1 is not paused"))
    }

    async fn abort_rollout(
        &self,
        _: Request<RolloutActionRequest>,
    ) -> Result<Response<Rollout>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }

    async fn undo_rollout(
        &self,
        _: Request<RolloutActionRequest>,
    ) -> Result<Response<Rollout>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }
}

async fn serve() -> SocketAddr {
    serve_fake(Fake::default()).await
}

async fn serve_fake(fake: Fake) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ControllerServiceServer::new(fake))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    addr
}

/// A TCP proxy in front of the fake whose connections can be cut, as a controller
/// crash would cut them, while it keeps accepting new ones.
struct Proxy {
    addr: SocketAddr,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Proxy {
    async fn start(backend: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let tracked = connections.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let relay = tokio::spawn(async move {
                    let mut outbound = TcpStream::connect(backend).await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                });
                tracked.lock().unwrap().push(relay);
            }
        });
        Proxy { addr, connections }
    }

    fn cut(&self) {
        for relay in self.connections.lock().unwrap().drain(..) {
            relay.abort();
        }
    }
}

/// Runs fleetctl against `addr` with the token in FLEET_TOKEN (unless `token` is None).
async fn fleetctl(addr: SocketAddr, token: Option<&str>, args: &[&str]) -> Output {
    fleetctl_at(&format!("http://{addr}"), token, args).await
}

/// Runs fleetctl with FLEET_CONTROLLER set to `urls` (one URL, or several separated
/// by commas).
async fn fleetctl_at(urls: &str, token: Option<&str>, args: &[&str]) -> Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_fleetctl"));
    command
        .args(args)
        .env("FLEET_CONTROLLER", urls)
        .env_remove("FLEET_TOKEN")
        .env("USER", "alice");
    if let Some(token) = token {
        command.env("FLEET_TOKEN", token);
    }
    command.output().await.unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn nodes_as_a_table_and_as_json_and_only_with_the_token() {
    let addr = serve().await;
    let out = fleetctl(addr, Some(TOKEN), &["nodes"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("NODE  STATE    LABELS  EXE"), "{text}");
    assert!(
        text.contains("n2    serving  zone=b  /opt/app/app-v1  1    100"),
        "{text}"
    );

    let out = fleetctl(addr, Some(TOKEN), &["nodes", "-l", "zone=a", "-o", "json"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let nodes: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(nodes.as_array().unwrap().len(), 1);
    assert_eq!(nodes[0]["labels"]["zone"], "a");
    assert_eq!(nodes[0]["exe"]["path"], "/opt/app/app-v1");

    let out = fleetctl(addr, None, &["nodes"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("missing or wrong bearer token (set FLEET_TOKEN"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn a_controller_from_before_paging_is_counted_filtered_and_cut_by_fleetctl() {
    let addr = serve().await;
    let out = fleetctl(addr, Some(TOKEN), &["nodes", "--limit", "1"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("2 nodes: 2 serving\nNODE "), "{text}");
    assert!(text.contains("\nn1 ") && !text.contains("n2"), "{text}");
    assert_eq!(
        stderr(&out),
        "showing 1 of 2 nodes: --all, --limit N, -l KEY=VALUE or --state STATE to see others\n"
    );

    let out = fleetctl(addr, Some(TOKEN), &["nodes", "--state", "stopped"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "");
    assert_eq!(
        stderr(&out),
        "no nodes: 0 stopped nodes (of 2: 2 serving)\n"
    );

    let out = fleetctl(addr, Some(TOKEN), &["nodes", "--summary", "-o", "json"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        summary,
        serde_json::json!({
            "total": 2,
            "counts_by_state": {"serving": 2},
            "counts_by_label": {"zone=a": 1, "zone=b": 1},
        })
    );

    let out = fleetctl(
        addr,
        Some(TOKEN),
        &["nodes", "-o", "json", "--limit", "1", "--page-size", "1"],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let nodes: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(nodes.as_array().map(Vec::len), Some(1), "{nodes}");
    assert_eq!(nodes[0]["node_id"], "n1");
}

#[tokio::test]
async fn an_unknown_node_or_rollout_is_bad_input() {
    let addr = serve().await;
    let out = fleetctl(addr, Some(TOKEN), &["node", "n9"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(stderr(&out), "error: no node \"n9\"\n");
    // A known node is exit 0 with its details: the contrast that makes the 2 above
    // mean "unknown" rather than "anything goes wrong".
    let out = fleetctl(addr, Some(TOKEN), &["node", "n1"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("Admin:"), "{}", stdout(&out));
    // Its restart history under the facts, with who asked and the timings.
    assert!(stdout(&out).contains("alice (grpc)"), "{}", stdout(&out));
    assert!(stdout(&out).contains("4.5 ms"), "{}", stdout(&out));
    let out = fleetctl(addr, Some(TOKEN), &["node", "n1", "-o", "json"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(json["node_id"], "n1");
    assert_eq!(json["restarts"][0]["actor"], "alice");
    assert_eq!(json["restarts"][0]["handoff_us"], 4500);
    let out = fleetctl(addr, Some(TOKEN), &["rollout", "status", "r7"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(stderr(&out), "error: no rollout \"r7\"\n");
}

#[tokio::test]
async fn a_rollout_is_watched_batch_by_batch_to_success() {
    let addr = serve().await;
    let out = fleetctl(
        addr,
        Some(TOKEN),
        &["rollout", "--exe", "/opt/ok", "--canary", "1"],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[..4],
        [
            "rollout r1 running: /opt/ok to 3 nodes in 2 batches (1, 2), by alice",
            "batch 1/2 started: n1",
            "  n1  restarting   pid 100",
            "  n1  healthy      pid 100 -> 200",
        ],
        "{text}"
    );
    assert!(lines[4].starts_with("rollout r1 paused; resume it with `fleetctl rollout resume r1`"));
    assert_eq!(lines[5], "rollout r1 resumed");
    assert_eq!(lines[6], "batch 2/2 started: n2, n3");
    assert_eq!(
        lines.last().unwrap(),
        &"rollout r1 succeeded after 41s (3 healthy)"
    );
}

#[tokio::test]
async fn a_rolled_back_rollout_exits_3_with_each_nodes_reason() {
    let addr = serve().await;
    let out = fleetctl(
        addr,
        Some(TOKEN),
        &["rollout", "--exe", "/opt/crash", "--auto-rollback"],
    )
    .await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("  n1  failed       pid 100: exited with status 1 before READY"),
        "{text}"
    );
    assert!(text.contains(
        "rollout r2 rolled-back after 2.0s: failure budget (0) spent (1 failed, 1 pending)"
    ));

    // The same with JSON: progress on stderr, the final rollout on stdout.
    let out = fleetctl(
        addr,
        Some(TOKEN),
        &["rollout", "status", "r2", "--watch", "-o", "json"],
    )
    .await;
    assert_eq!(out.status.code(), Some(3));
    let rollout: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rollout["state"], "rolled-back");
    assert!(stderr(&out).contains("batch 1/2 started: n1"));
}

#[tokio::test]
async fn a_refused_preflight_lists_each_node_and_exits_2() {
    let addr = serve().await;
    let out = fleetctl(addr, Some(TOKEN), &["rollout", "--exe", "/opt/refused"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        stderr(&out),
        "error: the rollout was refused, no node was touched:\n  \
         node n2: /opt/refused does not exist\n  node n3: /opt/refused does not exist\n"
    );
}

#[tokio::test]
async fn dry_run_prints_the_plan_and_detach_returns_at_once() {
    let addr = serve().await;
    let out = fleetctl(
        addr,
        Some(TOKEN),
        &["rollout", "--exe", "/opt/ok", "--dry-run"],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("Dry run, nothing was changed: /opt/ok to 3 nodes in 2 batches"));
    assert!(text.contains("batch 2/2  2 nodes  n2, n3"), "{text}");

    let out = fleetctl(
        addr,
        Some(TOKEN),
        &["rollout", "--exe", "/opt/ok", "--detach"],
    )
    .await;
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("follow it with: fleetctl rollout status r1 --watch"));
}

#[tokio::test]
async fn status_history_and_actions() {
    let addr = serve().await;
    let out = fleetctl(addr, Some(TOKEN), &["rollout", "status"]).await;
    assert_eq!(out.status.code(), Some(0));
    assert!(
        stdout(&out).contains("State:     succeeded"),
        "{}",
        stdout(&out)
    );

    let out = fleetctl(addr, Some(TOKEN), &["rollout", "history"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(
        text.lines().nth(1).unwrap().starts_with("r2  rolled-back"),
        "{text}"
    );

    let out = fleetctl(addr, Some(TOKEN), &["rollout", "pause", "r1"]).await;
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).starts_with("rollout r1 is paused: paused by alice"));

    let out = fleetctl(addr, Some(TOKEN), &["rollout", "resume", "r1"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(stderr(&out), "error: rollout r1 is not paused\n");
}

#[tokio::test]
async fn tokens_are_created_once_listed_and_revoked_by_an_admin_only() {
    let addr = serve().await;
    let out = fleetctl(
        addr,
        Some(TOKEN),
        &[
            "token", "create", "--role", "operator", "--name", "ci", "--ttl", "30d",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    let secret = format!("fleet_t1a2b3c4d_{}", "ab".repeat(32));
    assert!(text.contains(&format!("\n  {secret}\n")), "{text}");
    assert!(
        text.contains(&format!("FLEET_TOKEN={secret} fleetctl nodes")),
        "{text}"
    );

    let out = fleetctl(
        addr,
        Some(TOKEN),
        &[
            "-o",
            "json",
            "token",
            "create",
            "--join",
            "--node-id-prefix",
            "web-",
            "--uses",
            "2",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let created: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(created["token"]["kind"], "join");
    assert_eq!(created["token"]["node_id_prefix"], "web-");
    assert_eq!(created["token"]["max_uses"], 2);
    assert!(
        created["secret"]
            .as_str()
            .unwrap()
            .starts_with("fleet_j1a2b3c4d_")
    );

    let out = fleetctl(addr, Some(TOKEN), &["token", "list"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.starts_with("ID         NAME  ROLE      STATUS"),
        "{text}"
    );
    assert!(text.contains("revoked"), "{text}");
    assert!(!text.contains("fleet_"), "a list shows no secret: {text}");

    let out = fleetctl(addr, Some(TOKEN), &["token", "revoke", "t1a2b3c4d"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("is revoked"), "{}", stdout(&out));
    let out = fleetctl(addr, Some(TOKEN), &["token", "revoke", "t9"]).await;
    assert_eq!(out.status.code(), Some(2));

    // A viewer is refused, with the controller's reason, exit 2.
    let out = fleetctl(addr, Some(VIEWER), &["token", "list"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("token 'wall' has role viewer; ListTokens needs admin"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn an_unreachable_controller_is_exit_1_and_says_how_to_set_it() {
    // A port that was free a moment ago.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let out = fleetctl(addr, None, &["nodes"]).await;
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.starts_with(&format!(
            "error: cannot reach the controller at http://{addr}: "
        )),
        "{err}"
    );
    assert!(
        err.ends_with("(set --controller or FLEET_CONTROLLER)\n"),
        "{err}"
    );
}

#[tokio::test]
async fn a_watch_survives_a_lost_connection_to_the_controller() {
    let backend = serve_fake(Fake {
        hang_first_watch: true,
        ..Default::default()
    })
    .await;
    let proxy = Proxy::start(backend).await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_fleetctl"))
        .args(["rollout", "status", "r1", "--watch"])
        .env("FLEET_CONTROLLER", format!("http://{}", proxy.addr))
        .env("FLEET_TOKEN", TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    while let Some(line) = lines.next_line().await.unwrap() {
        let restarting = line.contains("n1  restarting");
        seen.push(line);
        if restarting {
            break;
        }
    }
    proxy.cut();
    while let Some(line) = lines.next_line().await.unwrap() {
        seen.push(line);
    }
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("fleetctl reconnects within 30s")
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{seen:?}\n{err}");
    assert!(err.contains("lost the controller at http://"), "{err}");
    assert!(err.contains("reconnected to the controller"), "{err}");
    // Each change is printed once, across the two streams.
    assert_eq!(
        seen.iter().filter(|l| l.contains("n1  restarting")).count(),
        1,
        "{seen:?}"
    );
    assert_eq!(
        seen.last().unwrap(),
        "rollout r1 succeeded after 41s (3 healthy)"
    );
}

#[tokio::test]
async fn a_dead_controller_in_the_list_is_passed_over_silently() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let addr = serve().await;
    let urls = format!("http://{dead},http://{addr}");
    let out = fleetctl_at(&urls, Some(TOKEN), &["nodes"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("n2    serving"), "{}", stdout(&out));
    assert_eq!(stderr(&out), "");
    // The flag as well as the variable; `version` says which controller answered.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_fleetctl"))
        .args(["--controller", &urls, "version"])
        .env("FLEET_TOKEN", TOKEN)
        .output()
        .await
        .unwrap();
    assert!(
        stdout(&out).contains(&format!("at http://{addr}\n")),
        "{}",
        stdout(&out)
    );
}

#[tokio::test]
async fn a_watch_whose_controller_dies_goes_on_with_the_next_one() {
    let first = serve_fake(Fake {
        hang_first_watch: true,
        ..Default::default()
    })
    .await;
    let proxy = Proxy::start(first).await;
    // The other controller of the same store: its watch starts where the rollout stands.
    let second = serve_fake(Fake {
        hang_first_watch: true,
        watches: AtomicUsize::new(1),
    })
    .await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_fleetctl"))
        .args(["rollout", "status", "r1", "--watch"])
        .env(
            "FLEET_CONTROLLER",
            format!("http://{},http://{second}", proxy.addr),
        )
        .env("FLEET_TOKEN", TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    while let Some(line) = lines.next_line().await.unwrap() {
        let restarting = line.contains("n1  restarting");
        seen.push(line);
        if restarting {
            break;
        }
    }
    // The first controller's connections are cut; it would accept new ones, but the
    // watch goes to the next controller first.
    proxy.cut();
    while let Some(line) = lines.next_line().await.unwrap() {
        seen.push(line);
    }
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("fleetctl reconnects within 30s")
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{seen:?}\n{err}");
    assert!(
        err.contains(&format!("lost the controller at http://{}", proxy.addr)),
        "{err}"
    );
    assert!(
        err.contains(&format!("reconnected to the controller at http://{second}")),
        "{err}"
    );
    assert_eq!(
        seen.iter().filter(|l| l.contains("n1  restarting")).count(),
        1,
        "{seen:?}"
    );
    assert_eq!(
        seen.last().unwrap(),
        "rollout r1 succeeded after 41s (3 healthy)"
    );
}

#[tokio::test]
async fn version_shows_both_builds_and_warns_of_another_protocol() {
    let addr = serve().await;
    for args in [&["version"][..], &["--version"][..], &["-V"][..]] {
        let out = fleetctl(addr, Some(TOKEN), args).await;
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        assert_eq!(
            stdout(&out),
            format!(
                "client:     fleetctl {} (fleet.v1)\ncontroller: fleet-controller 0.0.9 (fleet.v0, commit 0123456789ab) at http://{addr}\n",
                env!("CARGO_PKG_VERSION")
            ),
            "{args:?}"
        );
        assert!(
            stderr(&out).contains("the controller speaks fleet.v0 and this fleetctl fleet.v1"),
            "{}",
            stderr(&out)
        );
    }
    // Without the token: the client's version, and why the controller's is missing.
    let out = fleetctl(addr, None, &["version"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("client:     fleetctl "),
        "{}",
        stdout(&out)
    );
    assert!(
        stderr(&out).starts_with("error: the controller's version is unknown: "),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn controllers_show_the_leader_and_the_members_and_no_quorum_exits_1() {
    let addr = serve().await;
    let out = fleetctl(addr, Some(TOKEN), &["controllers"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("NO QUORUM"), "{text}");
    assert!(text.contains("http://c1:7100"), "{text}");
    let leader = text
        .lines()
        .find(|l| l.starts_with("http://c1:7100"))
        .unwrap();
    assert!(leader.contains("leader"), "{leader}");
    let answered = text.lines().find(|l| l.contains("(answered)")).unwrap();
    assert!(answered.contains("follower"), "{answered}");
    assert!(text.contains("unhealthy: connection refused"), "{text}");

    let out = fleetctl(addr, Some(TOKEN), &["controllers", "-o", "json"]).await;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["quorum"], false);
    assert_eq!(json["controllers"][0]["leader"], true);
    assert_eq!(json["members"][1]["healthy"], false);
}
