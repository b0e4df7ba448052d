//! The failover rules against tiny in-process controllers: a leader, a follower
//! naming a leader, a store without quorum, one that takes a change and then loses
//! the connection, and URLs where nothing listens.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use fleet_proto::v1 as pb;
use fleet_proto::v1::controller_service_server::{ControllerService, ControllerServiceServer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tonic::codegen::tokio_stream::{self, Stream, wrappers::TcpListenerStream};
use tonic::{Request, Response, Status};

use super::*;
use crate::client::Controller;
use crate::exit::code_of;

/// How a fake controller answers.
#[derive(Debug, Clone)]
enum Role {
    /// Answers: `ListNodes` with one node named after the fake, `RestartNode` with
    /// success, `WatchRollout` with `snapshots` rollouts and then the end (or, with
    /// `hang_watch`, nothing more).
    Leader,
    /// Every call: `UNAVAILABLE` with `fleet-leader: <this>` ("" for no leader).
    Follower(String),
    /// Every call: `UNAVAILABLE` with `fleet-no-quorum: 1`.
    NoQuorum,
    /// `RestartNode` is taken and never answered (the test then cuts the connection).
    Hang,
    /// `RestartNode`: `UNAVAILABLE` from the controller itself, as for an agent it
    /// cannot reach: an answer, not a reason to try elsewhere.
    AgentUnreachable,
    /// `GetRollout`: one node and the same next page token, every time.
    StuckPaging,
}

#[derive(Debug)]
struct Fake {
    name: String,
    role: Role,
    /// Each call's method, in order.
    calls: Mutex<Vec<&'static str>>,
    /// Notified when a call hangs.
    hung: Notify,
    /// The first watch sends one snapshot and then hangs (as a dying controller would).
    hang_watch: bool,
}

impl Fake {
    fn new(name: &str, role: Role) -> Fake {
        Fake {
            name: name.into(),
            role,
            calls: Mutex::default(),
            hung: Notify::new(),
            hang_watch: false,
        }
    }

    fn calls(&self) -> Vec<&'static str> {
        self.calls.lock().unwrap().clone()
    }

    /// Records the call; a follower or a store without quorum refuses it here.
    fn enter(&self, method: &'static str) -> Result<(), Status> {
        self.calls.lock().unwrap().push(method);
        match &self.role {
            Role::Follower(leader) => {
                let mut status = Status::unavailable(format!(
                    "this controller ({}) is a follower; the leader is {leader}",
                    self.name
                ));
                status
                    .metadata_mut()
                    .insert(fleet_proto::ha::LEADER_METADATA, leader.parse().unwrap());
                Err(status)
            }
            Role::NoQuorum => {
                let mut status = Status::unavailable("etcd at 127.0.0.1:2379 does not answer");
                status
                    .metadata_mut()
                    .insert(fleet_proto::ha::NO_QUORUM_METADATA, "1".parse().unwrap());
                Err(status)
            }
            _ => Ok(()),
        }
    }

    fn rollout(&self, state: &str) -> pb::Rollout {
        pb::Rollout {
            id: "r1".into(),
            state: state.into(),
            reason: self.name.clone(),
            ..Default::default()
        }
    }
}

/// The service: the methods these tests do not call answer `UNIMPLEMENTED`, then the
/// ones written out. (A macro around the whole impl, so `async_trait` sees every
/// method.)
macro_rules! service {
    ($($method:ident($request:ty) -> $response:ty;)* { $($written:tt)* }) => {
        #[tonic::async_trait]
        impl ControllerService for Fake {
            $(
                async fn $method(
                    &self,
                    _: Request<$request>,
                ) -> Result<Response<$response>, Status> {
                    Err(Status::unimplemented("not in this fake"))
                }
            )*
            $($written)*
        }
    };
}

service! {
        heartbeat(pb::HeartbeatRequest) -> pb::HeartbeatResponse;
        get_node(pb::GetNodeRequest) -> pb::Node;
        shutdown_node(pb::ShutdownNodeRequest) -> pb::ShutdownResponse;
        forget_node(pb::ForgetNodeRequest) -> pb::Node;
        start_rollout(pb::RolloutSpec) -> pb::Rollout;
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

    async fn list_nodes(
        &self,
        _: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        self.enter("ListNodes")?;
        Ok(Response::new(pb::ListNodesResponse {
            nodes: vec![pb::Node {
                node_id: self.name.clone(),
                ..Default::default()
            }],
            ..Default::default()
        }))
    }

    async fn restart_node(
        &self,
        _: Request<pb::RestartNodeRequest>,
    ) -> Result<Response<pb::RestartResponse>, Status> {
        self.enter("RestartNode")?;
        match self.role {
            Role::Hang => {
                self.hung.notify_one();
                std::future::pending().await
            }
            Role::AgentUnreachable => Err(Status::unavailable(
                "node n1 is unreachable: connection refused",
            )),
            _ => Ok(Response::new(pb::RestartResponse {
                reason: self.name.clone(),
                ..Default::default()
            })),
        }
    }

    async fn get_rollout(
        &self,
        _: Request<pb::GetRolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        self.enter("GetRollout")?;
        let mut rollout = self.rollout("running");
        if matches!(self.role, Role::StuckPaging) {
            rollout.nodes = vec![pb::RolloutNode {
                node_id: "n1".into(),
                ..Default::default()
            }];
            rollout.next_page_token = "n1".into();
        }
        Ok(Response::new(rollout))
    }

    type HeartbeatStreamStream =
        Pin<Box<dyn Stream<Item = Result<pb::HeartbeatResponse, Status>> + Send>>;

    async fn heartbeat_stream(
        &self,
        _: Request<tonic::Streaming<pb::HeartbeatRequest>>,
    ) -> Result<Response<Self::HeartbeatStreamStream>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }

    type WatchRolloutStream = Pin<Box<dyn Stream<Item = Result<pb::Rollout, Status>> + Send>>;

    async fn watch_rollout(
        &self,
        _: Request<pb::GetRolloutRequest>,
    ) -> Result<Response<Self::WatchRolloutStream>, Status> {
        self.enter("WatchRollout")?;
        use tokio_stream::StreamExt as _;
        if self.hang_watch {
            self.hung.notify_one();
            let first = tokio_stream::iter([Ok(self.rollout("running"))]);
            return Ok(Response::new(Box::pin(first.chain(tokio_stream::pending()))));
        }
        let all = [self.rollout("running"), self.rollout("succeeded")];
        Ok(Response::new(Box::pin(tokio_stream::iter(all.map(Ok)))))
    }
    }
}

/// Serves `fake` on a free loopback port: its URL.
async fn serve(fake: Arc<Fake>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ControllerServiceServer::from_arc(fake))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    format!("http://{addr}")
}

/// A URL where nothing listens: a port that was free a moment ago.
fn dead() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}", listener.local_addr().unwrap())
}

/// A TCP relay in front of a fake whose connections can be cut, as a crash cuts them.
struct Proxy {
    url: String,
    relays: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Proxy {
    async fn start(backend: &str) -> Proxy {
        let backend: SocketAddr = backend.trim_start_matches("http://").parse().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let relays: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let tracked = relays.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                tracked.lock().unwrap().push(tokio::spawn(async move {
                    let mut outbound = TcpStream::connect(backend).await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }));
            }
        });
        Proxy { url, relays }
    }

    fn cut(&self) {
        for relay in self.relays.lock().unwrap().drain(..) {
            relay.abort();
        }
    }
}

fn controller(urls: &[&str]) -> Controller {
    Controller::new(urls.iter().map(|u| u.to_string()).collect(), None, None).unwrap()
}

fn restart() -> pb::RestartNodeRequest {
    pb::RestartNodeRequest {
        node_id: "n1".into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_read_skips_a_dead_controller_and_sticks_with_the_one_that_answers() {
    let (a, b) = (
        Arc::new(Fake::new("a", Role::Leader)),
        Arc::new(Fake::new("b", Role::Leader)),
    );
    let (dead, url_a, url_b) = (dead(), serve(a.clone()).await, serve(b.clone()).await);
    let mut c = controller(&[&dead, &url_a, &url_b]);
    let nodes = c
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .unwrap()
        .nodes;
    assert_eq!(nodes[0].node_id, "a");
    assert_eq!(c.url(), url_a);
    // The next call goes straight there.
    c.restart_node(restart()).await.unwrap();
    assert_eq!(a.calls(), ["ListNodes", "RestartNode"]);
    assert!(b.calls().is_empty());
}

#[tokio::test]
async fn a_change_refused_by_a_follower_goes_to_the_leader_it_names_even_unlisted() {
    let leader = Arc::new(Fake::new("leader", Role::Leader));
    let leader_url = serve(leader.clone()).await;
    let follower = Arc::new(Fake::new("f", Role::Follower(leader_url.clone())));
    let follower_url = serve(follower.clone()).await;
    let mut c = controller(&[&follower_url]);
    let response = c.restart_node(restart()).await.unwrap();
    assert_eq!(response.reason, "leader");
    assert_eq!(follower.calls(), ["RestartNode"]);
    assert_eq!(leader.calls(), ["RestartNode"]);
    // It sticks with the leader.
    assert_eq!(c.url(), leader_url);
    c.list_nodes(pb::ListNodesRequest::default()).await.unwrap();
    assert_eq!(follower.calls().len(), 1);
}

#[tokio::test]
async fn a_dead_leader_hint_moves_on_down_the_list() {
    let dead_leader = dead();
    let follower = Arc::new(Fake::new("f", Role::Follower(dead_leader.clone())));
    let other = Arc::new(Fake::new("other", Role::Leader));
    let (url_f, url_o) = (serve(follower).await, serve(other.clone()).await);
    let mut c = controller(&[&url_f, &url_o]);
    let response = c.restart_node(restart()).await.unwrap();
    assert_eq!(response.reason, "other");
}

#[tokio::test]
async fn when_every_controller_fails_the_error_names_each_and_why() {
    let https_leader = "https://10.0.0.9:7100";
    let follower = Arc::new(Fake::new("f", Role::Follower(https_leader.into())));
    let electing = Arc::new(Fake::new("e", Role::Follower(String::new())));
    let dead = dead();
    let (url_f, url_e) = (serve(follower).await, serve(electing).await);
    let mut c = controller(&[&dead, &url_f, &url_e]);
    let err = c.restart_node(restart()).await.unwrap_err();
    assert_eq!(code_of(&err), Exit::Failed);
    let text = format!("{err:#}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "no controller took the call (3 tried):", "{text}");
    assert!(lines[1].starts_with(&format!("  {dead}: ")), "{text}");
    assert!(lines[1].contains("onnection refused"), "{text}");
    // A leader over another scheme is not followed: the token would go elsewhere.
    assert!(lines[2].starts_with(&format!("  {url_f}: this controller (f) is a follower")));
    assert!(
        lines[2].contains("https://10.0.0.9:7100, is not followed"),
        "{text}"
    );
    assert!(lines[3].starts_with(&format!("  {url_e}: ")), "{text}");
    assert!(
        lines[4].starts_with("set --controller or FLEET_CONTROLLER"),
        "{text}"
    );
}

#[tokio::test]
async fn one_dead_url_keeps_the_single_controller_message() {
    let dead = dead();
    let mut c = controller(&[&dead]);
    let err = c
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with(&format!("cannot reach the controller at {dead}: ")),
        "{text}"
    );
    assert!(
        text.ends_with("(set --controller or FLEET_CONTROLLER)"),
        "{text}"
    );
}

#[tokio::test]
async fn a_store_without_quorum_ends_the_command_and_nothing_else_is_tried() {
    let lost = Arc::new(Fake::new("q", Role::NoQuorum));
    let other = Arc::new(Fake::new("other", Role::Leader));
    let (url_q, url_o) = (serve(lost).await, serve(other.clone()).await);
    let mut c = controller(&[&url_q, &url_o]);
    let err = c.restart_node(restart()).await.unwrap_err();
    assert_eq!(code_of(&err), Exit::Failed);
    let text = err.to_string();
    assert!(
        text.contains(
            "its store has no quorum (etcd at 127.0.0.1:2379 does not answer); nothing was changed"
        ),
        "{text}"
    );
    assert!(other.calls().is_empty());
}

#[tokio::test]
async fn an_unavailable_without_a_leader_hint_is_the_controllers_answer() {
    let busy = Arc::new(Fake::new("busy", Role::AgentUnreachable));
    let other = Arc::new(Fake::new("other", Role::Leader));
    let (url_b, url_o) = (serve(busy).await, serve(other.clone()).await);
    let mut c = controller(&[&url_b, &url_o]);
    let err = c.restart_node(restart()).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "node n1 is unreachable: connection refused"
    );
    assert!(other.calls().is_empty());
}

#[tokio::test]
async fn a_change_cut_off_after_it_was_sent_is_not_sent_again() {
    let hang = Arc::new(Fake::new("hang", Role::Hang));
    let proxy = Proxy::start(&serve(hang.clone()).await).await;
    let other = Arc::new(Fake::new("other", Role::Leader));
    let url_o = serve(other.clone()).await;
    let mut c = controller(&[&proxy.url, &url_o]);
    let call = c.restart_node(restart());
    let cut = async {
        hang.hung.notified().await;
        proxy.cut();
    };
    let (result, ()) = tokio::join!(call, cut);
    let err = result.unwrap_err();
    assert_eq!(code_of(&err), Exit::Failed);
    let text = err.to_string();
    assert!(
        text.starts_with(&format!(
            "the connection to the controller at {} failed after the call was sent",
            proxy.url
        )),
        "{text}"
    );
    assert!(
        text.contains("see what happened with `fleetctl node n1`"),
        "{text}"
    );
    assert!(other.calls().is_empty(), "{:?}", other.calls());
}

#[tokio::test]
async fn a_read_cut_off_mid_call_is_asked_again_elsewhere() {
    let hang = Arc::new(Fake {
        hang_watch: true,
        ..Fake::new("hang", Role::Leader)
    });
    let proxy = Proxy::start(&serve(hang.clone()).await).await;
    let other = Arc::new(Fake::new("other", Role::Leader));
    let url_o = serve(other.clone()).await;
    let mut c = controller(&[&proxy.url, &url_o]);
    let mut stream = c.watch_rollout("r1".into()).await.unwrap();
    assert_eq!(stream.message().await.unwrap().unwrap().reason, "hang");
    proxy.cut();
    let status = stream.message().await.unwrap_err();
    assert!(crate::client::is_unreachable(&status), "{status:?}");
    // What the watcher does: the stream is lost, the next one opens on the next URL.
    c.lost();
    let mut stream = c.watch_rollout("r1".into()).await.unwrap();
    assert_eq!(stream.message().await.unwrap().unwrap().reason, "other");
    assert_eq!(c.url(), url_o);
}

#[test]
fn how_far_a_failed_call_got() {
    let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
    let refused = Status::from_error(Box::new(tonic::ConnectError(Box::new(io))));
    assert_eq!(delivery(&refused), Delivery::NotSent);
    let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
    assert_eq!(
        delivery(&Status::from_error(Box::new(reset))),
        Delivery::MaybeSent
    );
    assert_eq!(
        delivery(&Status::unknown("Service was not ready: transport error")),
        Delivery::NotSent
    );
    assert_eq!(
        delivery(&Status::internal("Unexpected EOF decoding stream.")),
        Delivery::MaybeSent
    );
    assert_eq!(
        delivery(&Status::unavailable("a follower")),
        Delivery::Answered
    );
}

#[test]
fn a_leader_is_followed_only_over_the_same_scheme() {
    assert_eq!(
        leader_url("http://10.0.0.1:7100", "http://10.0.0.2:7100/").unwrap(),
        "http://10.0.0.2:7100"
    );
    assert!(leader_url("https://10.0.0.1:7100", "http://10.0.0.2:7100").is_err());
    assert!(leader_url("http://10.0.0.1:7100", "not a url/x").is_err());
}

#[tokio::test]
async fn a_controller_that_gives_the_same_page_again_is_not_asked_forever() {
    let stuck = Arc::new(Fake::new("stuck", Role::StuckPaging));
    let mut c = controller(&[&serve(stuck.clone()).await]);
    let e = c.get_rollout("r1".into(), 10).await.unwrap_err();
    assert!(e.to_string().contains("not paging"), "{e:#}");
    assert_eq!(stuck.calls(), ["GetRollout", "GetRollout"]);
}
