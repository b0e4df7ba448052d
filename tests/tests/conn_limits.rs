//! Idle connections can't lock an operator out. An agent under `ulimit -n 1024` with
//! 2,000 idle connections open to its control port still answers an authorized
//! restart at once, still restarts on `SIGUSR1` (it keeps descriptors free for a new
//! worker), and closes the idle connections after its idle timeout; the controller
//! does the same for its API while its long event stream is never cut.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use fleet_proto::v1::ListNodesRequest;
use fleet_tests::fleet::{Controller, ControllerOpts};
use fleet_tests::harness::{http_request, send_signal};
use fleet_tests::{Agent, AgentOpts};
use http::Method;
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TOKEN: &str = "conn-limits-token-51c9";
/// How fast an operator's request must get through.
const PROMPT: Duration = Duration::from_secs(2);

/// Lets this test process hold `want` descriptors (its children lower their own).
fn raise_nofile(want: u64) {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    if soft < want {
        assert!(
            hard >= want,
            "this test needs {want} descriptors; the hard limit is {hard}: raise it (ulimit -Hn)"
        );
        setrlimit(Resource::RLIMIT_NOFILE, want, hard).expect("setrlimit");
    }
}

/// Opens `n` connections to `addr` and sends nothing on them (bounded: 60 s in all).
async fn open_idle(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut streams = Vec::with_capacity(n);
    for i in 0..n {
        let left = deadline.saturating_duration_since(Instant::now());
        let stream = tokio::time::timeout(left, TcpStream::connect(addr))
            .await
            .unwrap_or_else(|_| panic!("only {i} of {n} connections opened in 60 s"))
            .unwrap_or_else(|e| panic!("connection {i} to {addr}: {e}"));
        streams.push(stream);
    }
    streams
}

/// Waits until the server has closed every one of `streams` (EOF or reset); returns
/// how many were closed, or panics with the count still open after `timeout`.
async fn wait_all_closed(streams: Vec<TcpStream>, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    let n = streams.len();
    let mut open = 0;
    for mut stream in streams {
        let mut buf = [0u8; 64];
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {}
            Ok(Ok(got)) => panic!("an idle connection got {got} bytes: {:?}", &buf[..got]),
            Err(_) => open += 1,
        }
    }
    assert_eq!(
        open, 0,
        "{open} of {n} idle connections still open after {timeout:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_idle_connections_neither_block_a_restart_nor_exhaust_descriptors() {
    raise_nofile(4096);
    let agent = Agent::start(
        AgentOpts {
            token: Some(TOKEN.into()),
            wrapper: ["sh", "-c", "ulimit -n 1024 && exec \"$@\"", "sh"]
                .map(Into::into)
                .to_vec(),
            ..AgentOpts::default()
        }
        .arg("--control-idle-timeout")
        .arg("3s"),
    )
    .await;
    let cap = agent
        .wait_for_log("control endpoint: at most ", Duration::from_secs(5))
        .await;
    assert!(
        cap.contains("at most 896 connections (RLIMIT_NOFILE 1024 minus 128"),
        "the cap comes from the descriptor limit: {cap}"
    );
    let control = agent.control();
    let first_worker = agent.worker_pid().await;

    let started = Instant::now();
    let idle = open_idle(control, 2000).await;
    let opened = Instant::now();
    eprintln!("opened 2000 idle connections in {:?}", opened - started);

    // An authorized restart gets through at once: a new connection closes an idle one.
    let asked = Instant::now();
    let restart = tokio::time::timeout(
        PROMPT,
        http_request(control, Method::POST, "/debug/admin/restart", Some(TOKEN)),
    )
    .await
    .unwrap_or_else(|_| agent.fail("the restart was not answered within 2 s"))
    .unwrap_or_else(|e| agent.fail(&e));
    let http_took = asked.elapsed();
    assert!(
        restart.status.is_success(),
        "{} {}",
        restart.status,
        restart.text()
    );
    let reply = restart.json();
    assert_eq!(reply["outcome"], "succeeded", "{reply}");
    let second_worker = reply["new_pid"].as_u64().expect("new_pid") as u32;
    assert_ne!(second_worker, first_worker);
    eprintln!("authorized restart answered in {http_took:?} with 2000 idle connections open");

    // SIGUSR1 to the supervisor: it still has the descriptors a new worker needs.
    let signalled = Instant::now();
    send_signal(agent.pid(), Signal::SIGUSR1);
    let third_worker = agent.wait_worker_change(second_worker, PROMPT).await;
    eprintln!(
        "SIGUSR1 restart: worker {second_worker} -> {third_worker} in {:?}",
        signalled.elapsed()
    );

    // The idle connections are all closed: the first ones to make room, the rest by
    // the 3 s idle timeout.
    wait_all_closed(idle, Duration::from_secs(3) + Duration::from_secs(5)).await;
    eprintln!(
        "every idle connection closed {:?} after the last one opened",
        opened.elapsed()
    );
    let out_of_fds = agent.count_log("Too many open files");
    assert_eq!(out_of_fds, 0, "the agent ran out of descriptors");
    assert!(
        agent.count_log("closed the oldest idle connection") >= 1,
        "the cap was reached and said so"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_answers_with_many_idle_connections_open_and_closes_them() {
    raise_nofile(4096);
    let controller = Controller::start(ControllerOpts {
        args: ["--idle-timeout", "2s", "--max-connections", "64"]
            .map(Into::into)
            .to_vec(),
        ..ControllerOpts::default()
    })
    .await;
    let addr = controller.addr();

    // A dashboard's live event stream, open before and after the idle ones.
    let mut events = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET /api/events HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    events.write_all(request.as_bytes()).await.unwrap();
    let mut head = [0u8; 512];
    let n = tokio::time::timeout(PROMPT, events.read(&mut head))
        .await
        .expect("the event stream answers")
        .unwrap();
    assert!(head[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &head[..n]);

    let idle = open_idle(addr, 300).await;
    let opened = Instant::now();

    // gRPC (HTTP/2) and HTTP/1 calls get through at the cap.
    let asked = Instant::now();
    let nodes = tokio::time::timeout(
        PROMPT,
        controller.grpc().list_nodes(ListNodesRequest::default()),
    )
    .await
    .unwrap_or_else(|_| controller.fail("ListNodes not answered within 2 s"))
    .unwrap_or_else(|s| controller.fail(&format!("ListNodes: {s}")));
    assert!(nodes.into_inner().nodes.is_empty());
    let api = tokio::time::timeout(PROMPT, http_request(addr, Method::GET, "/api/nodes", None))
        .await
        .unwrap_or_else(|_| controller.fail("/api/nodes not answered within 2 s"))
        .unwrap();
    assert!(api.status.is_success(), "{}", api.status);
    eprintln!(
        "controller answered gRPC and HTTP in {:?} with 300 idle connections open (cap 64)",
        asked.elapsed()
    );

    wait_all_closed(idle, Duration::from_secs(2) + Duration::from_secs(5)).await;
    eprintln!(
        "idle connections closed {:?} after opening",
        opened.elapsed()
    );

    // The event stream is a request in progress: older than every idle connection,
    // it is still open (nothing to read, or an event; not EOF).
    let mut buf = [0u8; 512];
    match events.try_read(&mut buf) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        Ok(n) if n > 0 => {}
        other => controller.fail(&format!("the event stream was cut: {other:?}")),
    }
}

/// An agent's heartbeat stream on a connection of its own: the sender of its beats and
/// its answers.
struct Beating {
    beats: tokio::sync::mpsc::Sender<fleet_proto::v1::HeartbeatRequest>,
    answers: tonic::Streaming<fleet_proto::v1::HeartbeatResponse>,
    node: String,
}

impl Beating {
    async fn open(controller: &Controller, node: &str) -> Beating {
        let channel = tonic::transport::Endpoint::from_shared(controller.url())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let (beats, queue) = tokio::sync::mpsc::channel(1);
        let mut client =
            fleet_proto::v1::controller_service_client::ControllerServiceClient::new(channel);
        let answers = client
            .heartbeat_stream(tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(
                queue,
            ))
            .await
            .unwrap()
            .into_inner();
        let mut beating = Beating {
            beats,
            answers,
            node: node.to_string(),
        };
        beating.beat().await.expect("the first beat is taken");
        beating
    }

    /// One beat and its answer.
    async fn beat(&mut self) -> Result<(), String> {
        let beat = fleet_proto::v1::HeartbeatRequest {
            status: Some(fleet_tests::fleet::reported_status(&self.node)),
            ..Default::default()
        };
        // A send fails only once the call is over; the answer says why.
        let _ = self.beats.send(beat).await;
        match tokio::time::timeout(PROMPT, self.answers.message()).await {
            Ok(Ok(Some(_))) => Ok(()),
            Ok(Ok(None)) => Err("the call ended".into()),
            Ok(Err(status)) => Err(status.to_string()),
            Err(_) => Err(format!("no answer within {PROMPT:?}")),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_streams_outlive_the_idle_timeout_but_yield_to_an_operator_at_the_cap() {
    // The smallest cap the controller takes.
    const CAP: usize = 16;
    let controller = Controller::start(ControllerOpts {
        args: vec![
            "--idle-timeout".into(),
            "1s".into(),
            "--max-connections".into(),
            CAP.to_string().into(),
        ],
        ..ControllerOpts::default()
    })
    .await;
    let mut streams = Vec::new();
    for i in 0..CAP {
        streams.push(Beating::open(&controller, &format!("s-{i}")).await);
    }
    // Past the idle timeout (a wait for time itself: what is shown is that nothing
    // closes): every stream still takes beats.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for s in &mut streams {
        s.beat()
            .await
            .unwrap_or_else(|e| panic!("{} after the idle timeout: {e}", s.node));
    }
    // The controller is at its cap with streams only: an operator still gets in, and
    // the oldest stream is the one closed for it.
    let nodes = tokio::time::timeout(
        PROMPT,
        controller.grpc().list_nodes(ListNodesRequest::default()),
    )
    .await
    .unwrap_or_else(|_| controller.fail("ListNodes not answered within 2 s at the cap"))
    .unwrap_or_else(|s| controller.fail(&format!("ListNodes: {s}")));
    assert_eq!(nodes.into_inner().nodes.len(), CAP);
    let cut = streams[0].beat().await;
    assert!(cut.is_err(), "the oldest stream was closed: {cut:?}");
    for s in &mut streams[1..] {
        s.beat()
            .await
            .unwrap_or_else(|e| panic!("{}: only the oldest was closed: {e}", s.node));
    }
}
