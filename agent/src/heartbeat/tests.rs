//! The heartbeat's choice of controller against tiny in-process controllers: a
//! leader, a follower naming a leader (configured or not), one that refuses the token,
//! and URLs where nothing listens.

use std::sync::Mutex;

use fleet_proto::v1::controller_service_server::{ControllerService, ControllerServiceServer};
use tokio::net::TcpListener;
use tonic::codegen::tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

use super::*;
use crate::commands::Trust;

/// How a fake controller answers a heartbeat.
#[derive(Debug, Clone)]
enum Role {
    /// Takes it, asking for beats every 250 ms.
    Leader,
    /// `UNAVAILABLE` with `fleet-leader: <this>`.
    Follower(String),
    /// `UNAUTHENTICATED`: another controller would say the same.
    WrongToken,
}

/// `takes_commands` and `working` of each beat a fake received on a stream.
type Offers = Arc<Mutex<Vec<(bool, Vec<u64>)>>>;

#[derive(Debug)]
struct Fake {
    role: Arc<Mutex<Role>>,
    /// Whether it takes `HeartbeatStream` (else UNIMPLEMENTED, as an older controller).
    streams: std::sync::atomic::AtomicBool,
    /// The node ids of the beats it received, on either call.
    beats: Arc<Mutex<Vec<String>>>,
    /// The calls it was sent (a stream counts once).
    calls: std::sync::atomic::AtomicUsize,
    /// Commands to send on the next stream, after the answer to its next beat.
    commands: Arc<Mutex<Vec<pb::Command>>>,
    /// The answers to commands it received, and a wake-up for each.
    answers: Arc<(Mutex<Vec<pb::CommandAnswer>>, tokio::sync::Notify)>,
    /// `takes_commands` and `working` of each beat on a stream.
    offers: Offers,
    /// Says `status_with_answers` in its answers to beats on a stream.
    takes_status: Arc<std::sync::atomic::AtomicBool>,
    /// The node id of the status each answer carried ("" for none), by command id.
    answer_statuses: Arc<Mutex<Vec<(u64, String)>>>,
}

impl Fake {
    fn beats(&self) -> usize {
        self.beats.lock().unwrap().len()
    }

    fn calls(&self) -> usize {
        self.calls.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn set_role(&self, role: Role) {
        *self.role.lock().unwrap() = role;
    }

    /// The answer to command `id`, once it has come (within 10 s).
    async fn answer_to(&self, id: u64) -> pb::command_answer::Answer {
        let (answers, arrived) = &*self.answers;
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let wake = arrived.notified();
                if let Some(a) = answers.lock().unwrap().iter().find(|a| a.id == id) {
                    return a.answer.clone().expect("an answer");
                }
                wake.await;
            }
        })
        .await
        .expect("the agent answers within 10 s")
    }
}

/// What a controller in `role` answers to `beat`.
fn answer(
    role: &Mutex<Role>,
    beats: &Mutex<Vec<String>>,
    beat: pb::HeartbeatRequest,
) -> Result<pb::HeartbeatResponse, Status> {
    let role = role.lock().unwrap().clone();
    match role {
        Role::Leader => {
            let node = beat.status.unwrap_or_default().node_id;
            beats.lock().unwrap().push(node);
            Ok(pb::HeartbeatResponse {
                interval_ms: 250,
                ..Default::default()
            })
        }
        Role::Follower(leader) => {
            let mut status = Status::unavailable(format!(
                "this controller is a follower; the leader is {leader}"
            ));
            status
                .metadata_mut()
                .insert(fleet_proto::ha::LEADER_METADATA, leader.parse().unwrap());
            Err(status)
        }
        Role::WrongToken => Err(Status::unauthenticated("missing or wrong token")),
    }
}

/// The service: only `Heartbeat` is written out; the rest answer `UNIMPLEMENTED`. (A
/// macro around the whole impl, so `async_trait` sees every method.)
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
        type WatchRolloutStream = tonic::codegen::tokio_stream::Empty<Result<pb::Rollout, Status>>;

        async fn watch_rollout(
            &self,
            _: Request<pb::GetRolloutRequest>,
        ) -> Result<Response<Self::WatchRolloutStream>, Status> {
            Err(Status::unimplemented("not in this fake"))
        }

        async fn heartbeat(
            &self,
            request: Request<pb::HeartbeatRequest>,
        ) -> Result<Response<pb::HeartbeatResponse>, Status> {
            self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            answer(&self.role, &self.beats, request.into_inner()).map(Response::new)
        }

        type HeartbeatStreamStream = std::pin::Pin<Box<
            dyn tokio_stream::Stream<Item = Result<pb::HeartbeatResponse, Status>> + Send,
        >>;

        async fn heartbeat_stream(
            &self,
            request: Request<tonic::Streaming<pb::HeartbeatRequest>>,
        ) -> Result<Response<Self::HeartbeatStreamStream>, Status> {
            if !self.streams.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(Status::unimplemented("not in this fake"));
            }
            self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let (role, beats) = (self.role.clone(), self.beats.clone());
            let (commands, answers, offers) =
                (self.commands.clone(), self.answers.clone(), self.offers.clone());
            let (takes_status, answer_statuses) =
                (self.takes_status.clone(), self.answer_statuses.clone());
            // Each beat answered as a Heartbeat would be, then the commands queued; the
            // call ends at the first refusal, as the controller's does.
            type State = (
                Option<tonic::Streaming<pb::HeartbeatRequest>>,
                std::collections::VecDeque<pb::HeartbeatResponse>,
            );
            let answers = futures_util::stream::unfold(
                (Some(request.into_inner()), Default::default()),
                move |(incoming, mut queue): State| {
                    let (role, beats) = (role.clone(), beats.clone());
                    let (commands, answers, offers) =
                        (commands.clone(), answers.clone(), offers.clone());
                    let (takes_status, answer_statuses) =
                        (takes_status.clone(), answer_statuses.clone());
                    async move {
                        if let Some(next) = queue.pop_front() {
                            return Some((Ok(next), (incoming, queue)));
                        }
                        let mut incoming = incoming?;
                        loop {
                            let beat = incoming.message().await.ok()??;
                            if let Some(a) = beat.answer {
                                let node = beat.status.map(|s| s.node_id).unwrap_or_default();
                                answer_statuses.lock().unwrap().push((a.id, node));
                                answers.0.lock().unwrap().push(a);
                                answers.1.notify_waiters();
                                continue;
                            }
                            offers
                                .lock()
                                .unwrap()
                                .push((beat.takes_commands, beat.working.clone()));
                            let takes = takes_status.load(std::sync::atomic::Ordering::SeqCst);
                            let answer = answer(&role, &beats, beat).map(|mut r| {
                                r.status_with_answers = takes;
                                r
                            });
                            let next = answer.is_ok().then_some(incoming);
                            queue.extend(commands.lock().unwrap().drain(..).map(|c| {
                                pb::HeartbeatResponse {
                                    command: Some(c),
                                    ..Default::default()
                                }
                            }));
                            return Some((answer, (next, queue)));
                        }
                    }
                },
            );
            Ok(Response::new(Box::pin(answers)))
        }
    }
}

/// Serves a fake with `role` on a free loopback port: it and its URL.
async fn serve(role: Role) -> (Arc<Fake>, String) {
    serve_calls(role, true).await
}

/// [`serve`], with or without `HeartbeatStream` (`streams`).
async fn serve_calls(role: Role, streams: bool) -> (Arc<Fake>, String) {
    let fake = Arc::new(Fake {
        role: Arc::new(Mutex::new(role)),
        streams: streams.into(),
        beats: Arc::default(),
        calls: Default::default(),
        commands: Arc::default(),
        answers: Arc::default(),
        offers: Arc::default(),
        takes_status: Arc::default(),
        answer_statuses: Arc::default(),
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ControllerServiceServer::from_arc(fake.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (fake, url)
}

/// A URL where nothing listens: a port that was free a moment ago.
fn dead() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}", listener.local_addr().unwrap())
}

fn beater(urls: &[&str]) -> Beater {
    let (commands, _dir) = commands(None);
    Beater::new(urls.iter().map(|u| u.to_string()).collect(), None, commands).unwrap()
}

/// The commands of a node with no worker, with `token` or none (the directory holds
/// the token file until dropped: the token is read at once).
fn commands(token: Option<&str>) -> (Arc<Commands>, tempfile::TempDir) {
    use crate::config::{Config, ControlConfig, ServerConfig};
    let dir = tempfile::tempdir().unwrap();
    let token_file = token.map(|t| {
        let path = dir.path().join("token");
        std::fs::write(&path, t).unwrap();
        path
    });
    let config = Config {
        node_id: "web-1".into(),
        servers: vec![ServerConfig {
            listen: vec!["127.0.0.1:0".parse().unwrap()],
            ..Default::default()
        }],
        control: ControlConfig {
            token_file,
            ..Default::default()
        },
        ..Default::default()
    };
    let supervisor = Supervisor::new(
        config,
        "/bin/sh".into(),
        Vec::new(),
        crate::supervisor::WorkerKind::Exec,
    )
    .unwrap();
    (Commands::new(supervisor), dir)
}

fn beat() -> pb::HeartbeatRequest {
    pb::HeartbeatRequest {
        status: Some(pb::StatusResponse {
            node_id: "web-1".into(),
            ..Default::default()
        }),
        in_flight: 0,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_follower_sends_the_beats_to_the_leader_it_names() {
    let (leader, leader_url) = serve(Role::Leader).await;
    let (follower, follower_url) = serve(Role::Follower(leader_url.clone())).await;
    let mut b = beater(&[&follower_url, &dead(), &leader_url]);
    // The follower refuses: the next beat goes at once to the leader it named, not to
    // the next URL.
    assert_eq!(
        b.beat(beat(), &None).await,
        Some(Beat::Failed(Next::Now, Duration::ZERO))
    );
    assert_eq!(b.controllers.current(), leader_url);
    assert_eq!(b.beat(beat(), &None).await, Some(Beat::Taken));
    assert!(b.controllers.is_leader());
    // It stays there, at the interval the leader asked for.
    assert_eq!(b.beat(beat(), &None).await, Some(Beat::Taken));
    assert_eq!(b.interval, Duration::from_millis(250));
    assert_eq!(*leader.beats.lock().unwrap(), ["web-1", "web-1"]);
    assert_eq!(follower.beats(), 0);
}

#[tokio::test]
async fn a_leader_hint_naming_an_unconfigured_address_is_not_followed() {
    let (stranger, stranger_url) = serve(Role::Leader).await;
    let (_, follower_url) = serve(Role::Follower(stranger_url)).await;
    let (other, other_url) = serve(Role::Leader).await;
    let mut b = beater(&[&follower_url, &other_url]);
    assert_eq!(
        b.beat(beat(), &None).await,
        Some(Beat::Failed(Next::Now, Duration::ZERO))
    );
    // The next configured controller instead.
    assert_eq!(b.controllers.current(), other_url);
    assert_eq!(b.beat(beat(), &None).await, Some(Beat::Taken));
    assert!(!b.controllers.is_leader());
    assert_eq!(other.beats(), 1);
    assert_eq!(stranger.beats(), 0);
}

#[tokio::test]
async fn dead_controllers_are_passed_over_and_a_failed_round_backs_off() {
    let (leader, leader_url) = serve(Role::Leader).await;
    let mut b = beater(&[&dead(), &leader_url]);
    assert_eq!(
        b.beat(beat(), &None).await,
        Some(Beat::Failed(Next::Now, Duration::ZERO))
    );
    assert_eq!(b.beat(beat(), &None).await, Some(Beat::Taken));
    assert_eq!(leader.beats(), 1);

    let mut b = beater(&[&dead(), &dead()]);
    assert_eq!(
        b.beat(beat(), &None).await,
        Some(Beat::Failed(Next::Now, Duration::ZERO))
    );
    let Some(Beat::Failed(Next::RoundOver { rounds: 1 }, wait)) = b.beat(beat(), &None).await
    else {
        panic!("every controller failed: a round is over");
    };
    // The first wait is about the interval, never nothing: no tight loop.
    assert!(
        wait >= DEFAULT_INTERVAL / 2 && wait <= DEFAULT_INTERVAL,
        "{wait:?}"
    );
}

#[tokio::test]
async fn a_refusal_every_controller_would_give_stays_at_the_interval() {
    let (_, refusing) = serve(Role::WrongToken).await;
    let (other, other_url) = serve(Role::Leader).await;
    let mut b = beater(&[&refusing, &other_url]);
    assert_eq!(
        b.beat(beat(), &None).await,
        Some(Beat::Failed(Next::Stay, DEFAULT_INTERVAL))
    );
    assert_eq!(b.controllers.index(), 0);
    assert_eq!(other.beats(), 0);
}

#[tokio::test]
async fn the_beats_to_a_controller_go_on_one_call() {
    let (leader, url) = serve(Role::Leader).await;
    let mut b = beater(&[&url]);
    for _ in 0..5 {
        assert_eq!(b.beat(beat(), &None).await, Some(Beat::Taken));
    }
    assert_eq!(leader.beats(), 5);
    assert_eq!(leader.calls(), 1, "one HeartbeatStream call for every beat");
}

#[tokio::test]
async fn a_controller_without_streams_gets_a_call_per_beat() {
    let (old, url) = serve_calls(Role::Leader, false).await;
    let mut b = beater(&[&url]);
    for _ in 0..3 {
        assert_eq!(b.beat(beat(), &None).await, Some(Beat::Taken));
    }
    assert_eq!(old.beats(), 3);
    // The stream was asked for once (refused before the count), then Heartbeat each time.
    assert_eq!(old.calls(), 3);
    assert!(matches!(b.calls[0], Call::Unary));

    // Upgraded in place: the next failed call (here a refusal) makes the agent ask for
    // a stream again, and it takes it.
    old.streams.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        b.beat(beat(), &None).await,
        Some(Beat::Taken),
        "still a call"
    );
    old.set_role(Role::WrongToken);
    assert!(matches!(
        b.beat(beat(), &None).await,
        Some(Beat::Failed(..))
    ));
    old.set_role(Role::Leader);
    assert_eq!(b.beat(beat(), &None).await, Some(Beat::Taken));
    assert!(matches!(b.calls[0], Call::Stream(_)));
    assert!(!b.said_unary[0]);
}

#[tokio::test]
async fn a_stream_ended_by_a_leader_that_stepped_down_moves_to_the_new_leader() {
    let (first, first_url) = serve(Role::Leader).await;
    let (second, second_url) = serve(Role::Follower(first_url.clone())).await;
    let mut b = beater(&[&first_url, &second_url]);
    assert_eq!(b.beat(beat(), &None).await, Some(Beat::Taken));
    // Leadership moves while the stream is open: the old leader ends the call naming
    // the new one, and the next beat opens a stream there.
    first.set_role(Role::Follower(second_url.clone()));
    second.set_role(Role::Leader);
    assert_eq!(
        b.beat(beat(), &None).await,
        Some(Beat::Failed(Next::Now, Duration::ZERO))
    );
    assert_eq!(b.controllers.current(), second_url);
    assert_eq!(b.beat(beat(), &None).await, Some(Beat::Taken));
    assert_eq!(b.beat(beat(), &None).await, Some(Beat::Taken));
    assert!(b.controllers.is_leader());
    assert_eq!((first.beats(), second.beats()), (1, 2));
    assert_eq!((first.calls(), second.calls()), (1, 1));
}

#[tokio::test]
async fn a_controller_that_stops_answering_costs_one_wait_and_a_new_stream() {
    // A listener that accepts and never speaks HTTP/2: the stream's opening hangs.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hung = format!("http://{}", listener.local_addr().unwrap());
    let _keep = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            open.push(conn);
        }
    });
    let (leader, leader_url) = serve(Role::Leader).await;
    let mut b = beater(&[&hung, &leader_url]);
    let started = std::time::Instant::now();
    let Some(Beat::Failed(..)) = b.beat(beat(), &None).await else {
        panic!("a controller that never answers fails the beat");
    };
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(matches!(b.calls[0], Call::Untried));
    assert_eq!(b.controllers.current(), leader_url);
    assert_eq!(b.beat(beat(), &None).await, Some(Beat::Taken));
    assert_eq!(leader.beats(), 1);
}

/// The error of a refused command, checked to carry `code`.
fn refused_with(answer: pb::command_answer::Answer, code: tonic::Code) -> pb::CommandError {
    match answer {
        pb::command_answer::Answer::Error(e) => {
            assert_eq!(e.code, code as i32, "{e:?}");
            e
        }
        other => panic!("not refused: {other:?}"),
    }
}

fn status_command(id: u64, token: &str) -> pb::Command {
    pb::Command {
        id,
        token: token.into(),
        call: Some(pb::command::Call::Status(pb::StatusRequest {})),
    }
}

#[tokio::test]
async fn a_command_on_the_stream_is_answered_on_it_when_it_carries_the_token() {
    let (fake, url) = serve(Role::Leader).await;
    let (commands, _dir) = commands(Some("s3cret"));
    let mut b = Beater::new(vec![url], None, commands).unwrap();
    fake.commands
        .lock()
        .unwrap()
        .extend([status_command(7, "s3cret"), status_command(8, "guess")]);
    assert_eq!(b.beat(beat(), &None).await, Some(Beat::Taken));
    // The first beat of the stream offered commands (a token), listing none at work.
    assert_eq!(fake.offers.lock().unwrap()[0], (true, Vec::new()));
    match fake.answer_to(7).await {
        pb::command_answer::Answer::Status(s) => assert_eq!(s.node_id, "web-1"),
        other => panic!("{other:?}"),
    }
    // The wrong token changes nothing and is told so.
    let refused = refused_with(fake.answer_to(8).await, tonic::Code::Unauthenticated);
    assert!(refused.message.contains("token"), "{refused:?}");
    // Later beats on the same stream offer nothing again.
    assert_eq!(b.beat(beat(), &None).await, Some(Beat::Taken));
    assert_eq!(fake.offers.lock().unwrap()[1], (false, Vec::new()));
}

#[test]
fn commands_are_taken_only_where_the_control_endpoint_would_take_the_call() {
    let (open, _dir) = commands(None);
    assert_eq!(
        open.taken_from("http://127.0.0.1:7100", false),
        Trust::Token
    );
    assert_eq!(
        open.taken_from("http://localhost:7100", false),
        Trust::Token
    );
    assert_eq!(open.taken_from("http://[::1]:7100", false), Trust::Token);
    // Without a token, a controller elsewhere is taken only over mutual TLS.
    assert_eq!(open.taken_from("http://10.1.2.3:7100", false), Trust::None);
    assert_eq!(
        open.taken_from("http://controller.example:7100", false),
        Trust::None
    );
    assert_eq!(
        open.taken_from("https://controller.example:7100", true),
        Trust::Certificate
    );
    let (guarded, _dir) = commands(Some("s3cret"));
    assert_eq!(
        guarded.taken_from("http://10.1.2.3:7100", false),
        Trust::Token
    );
    assert_eq!(
        guarded.taken_from("https://10.1.2.3:7100", true),
        Trust::Certificate
    );
}

#[tokio::test]
async fn a_command_on_a_stream_that_takes_none_is_refused() {
    let (commands, _dir) = commands(None);
    let (out, mut sent) = mpsc::unbounded_channel();
    let line = Arc::new(Line::new(out, commands.clone()));
    commands.receive(status_command(3, ""), line, Trust::None);
    let answer = sent.recv().await.unwrap().answer.unwrap();
    refused_with(answer.answer.unwrap(), tonic::Code::PermissionDenied);
}

#[tokio::test]
async fn an_answer_not_known_to_be_read_goes_out_again_on_the_next_stream() {
    let (commands, _dir) = commands(None);
    let (out, mut first) = mpsc::unbounded_channel();
    let line = Arc::new(Line::new(out, commands.clone()));
    commands.receive(status_command(1, ""), line.clone(), Trust::Token);
    assert_eq!(first.recv().await.unwrap().answer.unwrap().id, 1);
    // A beat after it goes out, but the stream ends before the beat is answered.
    let _mark = line.send_beat(beat());
    line.close();
    assert_eq!(
        commands.listed(),
        vec![1],
        "listed in the next stream's first beat"
    );
    // Sent again on the next stream, and known read once a later beat is answered.
    let (out, mut second) = mpsc::unbounded_channel();
    let next = Arc::new(Line::new(out, commands.clone()));
    let mark = next.send_beat(beat());
    commands.taking(&next);
    assert!(second.recv().await.unwrap().status.is_some());
    assert_eq!(second.recv().await.unwrap().answer.unwrap().id, 1);
    assert!(commands.listed().is_empty());
    next.confirm(mark);
    let mark = next.send_beat(beat());
    next.confirm(mark);
    next.close();
    assert!(commands.listed().is_empty(), "read: not sent a third time");
    // A command received again while its answer waits is not run twice.
    let (out, _third) = mpsc::unbounded_channel();
    let closed = Arc::new(Line::new(out, commands.clone()));
    closed.close();
    commands.receive(status_command(2, ""), closed.clone(), Trust::Token);
    tokio::time::timeout(Duration::from_secs(10), async {
        while commands.listed() != vec![2] || commands.working.lock().unwrap().contains(&2) {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("answered into the outbox");
    commands.receive(status_command(2, ""), closed, Trust::Token);
    assert_eq!(commands.listed(), vec![2]);
    assert!(commands.working.lock().unwrap().is_empty());
}

#[tokio::test]
async fn over_mutual_tls_the_controllers_certificate_stands_for_the_token() {
    let (commands, _dir) = commands(Some("s3cret"));
    let (out, mut sent) = mpsc::unbounded_channel();
    let line = Arc::new(Line::new(out, commands.clone()));
    // As the control endpoint takes the controller's certificate without a token.
    commands.receive(status_command(4, ""), line, Trust::Certificate);
    let answer = sent.recv().await.unwrap().answer.unwrap();
    assert!(
        matches!(answer.answer, Some(pb::command_answer::Answer::Status(_))),
        "{answer:?}"
    );
}

#[tokio::test]
async fn commands_past_the_bound_are_refused_not_queued() {
    let (commands, _dir) = commands(None);
    commands.working.lock().unwrap().extend(1000..1064);
    let (out, mut sent) = mpsc::unbounded_channel();
    let line = Arc::new(Line::new(out, commands.clone()));
    commands.receive(status_command(5, ""), line, Trust::Token);
    let answer = sent.recv().await.unwrap().answer.unwrap();
    refused_with(answer.answer.unwrap(), tonic::Code::ResourceExhausted);
    assert!(!commands.working.lock().unwrap().contains(&5));
}

#[tokio::test]
async fn an_answer_whose_stream_ended_goes_out_on_the_stream_open_now() {
    let (commands, _dir) = commands(None);
    // The command came on a stream that ended while it was worked on...
    let (out, _first) = mpsc::unbounded_channel();
    let old = Arc::new(Line::new(out, commands.clone()));
    old.close();
    // ...and a new stream has said so (`working`) and takes commands now.
    let (out, mut second) = mpsc::unbounded_channel();
    let new = Arc::new(Line::new(out, commands.clone()));
    let _mark = new.send_beat(beat());
    commands.taking(&new);
    assert!(second.recv().await.unwrap().status.is_some());
    commands.receive(status_command(6, ""), old, Trust::Token);
    // Its answer goes out on the new stream, not into a box for a stream to come.
    let answer = tokio::time::timeout(Duration::from_secs(10), second.recv())
        .await
        .expect("the answer goes out on the stream open now")
        .unwrap()
        .answer
        .unwrap();
    assert_eq!(answer.id, 6);
    assert!(commands.listed().is_empty());
}

#[tokio::test]
async fn answers_carry_the_status_only_where_the_controller_takes_it() {
    let (fake, url) = serve(Role::Leader).await;
    let (commands, _dir) = commands(None);
    let activity = commands.activity();
    let mut b = Beater::new(vec![url], None, commands).unwrap();
    // A controller from before statuses with answers: the answer comes alone.
    fake.commands.lock().unwrap().push(status_command(1, ""));
    assert_eq!(b.beat(beat(), &None).await, Some(Beat::Taken));
    fake.answer_to(1).await;
    assert!(!b.status_with_answers());
    assert_eq!(fake.answer_statuses.lock().unwrap()[0], (1, String::new()));
    assert_eq!(activity.borrow().status_sent, None);
    // It says it takes them: the next answer carries the node's own status.
    fake.takes_status
        .store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(b.beat(beat(), &None).await, Some(Beat::Taken));
    assert!(b.status_with_answers());
    fake.commands.lock().unwrap().push(status_command(2, ""));
    assert_eq!(b.beat(beat(), &None).await, Some(Beat::Taken));
    fake.answer_to(2).await;
    assert_eq!(
        fake.answer_statuses.lock().unwrap()[1],
        (2, "web-1".to_string())
    );
    // Nothing at work once the answer is out, and the status's time is known.
    let after = *tokio::time::timeout(
        Duration::from_secs(10),
        activity.clone().wait_for(|a| a.working == 0),
    )
    .await
    .expect("the command is done within 10 s")
    .unwrap();
    assert!(after.status_sent.is_some(), "{after:?}");
    // And says so no more (a controller rolled back to an older build).
    fake.takes_status
        .store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(b.beat(beat(), &None).await, Some(Beat::Taken));
    assert!(!b.status_with_answers());
}

#[test]
fn a_beat_is_left_out_only_where_an_answers_status_stands_for_it() {
    use tokio::time::Instant;
    let now = Instant::now();
    let interval = Duration::from_secs(4);
    let working = |n: usize, sent: Option<Instant>| Activity {
        working: n,
        status_sent: sent,
    };
    // A controller that does not take statuses with answers gets every beat.
    let mut off = Quiet::new(false);
    assert!(!off.owe(working(1, None), now));
    assert!(!off.due_is_needless(working(0, Some(now)), now, interval));

    // A change with no command at work: the beat goes at once.
    let mut quiet = Quiet::new(true);
    assert!(!quiet.owe(working(0, Some(now)), now));
    // With a command at work, it waits for its answer...
    assert!(quiet.owe(working(1, None), now));
    assert!(quiet.owed());
    assert!(!quiet.still_owed(working(1, None)));
    // ...which, sent with a status taken after the change, stands for it.
    let later = now + Duration::from_millis(80);
    assert!(!quiet.still_owed(working(0, Some(later))));
    assert!(!quiet.owed());

    // Answered with no status after the change (an older stream's, none at all): the
    // beat goes once nothing is at work.
    let mut quiet = Quiet::new(true);
    let before = now.checked_sub(Duration::from_secs(1)).unwrap_or(now);
    assert!(quiet.owe(working(2, Some(before)), now));
    assert!(!quiet.still_owed(working(1, Some(before))));
    assert!(quiet.still_owed(working(0, Some(before))));

    // A periodic beat within half an interval of an answer's status is left out;
    // later than that, or while a beat is owed, it goes.
    let quiet = Quiet::new(true);
    let due = now + Duration::from_secs(10);
    assert!(quiet.due_is_needless(
        working(0, Some(due - Duration::from_secs(1))),
        due,
        interval
    ));
    assert!(!quiet.due_is_needless(
        working(0, Some(due - Duration::from_secs(2))),
        due,
        interval
    ));
    assert!(!quiet.due_is_needless(working(0, None), due, interval));
    let mut owing = Quiet::new(true);
    assert!(owing.owe(working(1, None), due));
    assert!(!owing.due_is_needless(working(1, Some(due)), due, interval));
}
