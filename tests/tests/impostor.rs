//! With `--tls` a node's identity is its certificate, never a field of its message.
//! An impostor — with a join token of its own, with the fleet's bootstrap token (a
//! stolen token file), with another node's certificate, or with none — cannot join as
//! `web-1`, heartbeat as `web-1` or move `web-1`'s address; `fleetctl restart web-1`
//! restarts the real `web-1`; a controller told that `web-9` lives at `web-2`'s address
//! reaches nobody; a revoked join token and an expired certificate are refused with
//! their reason.

use std::path::Path;
use std::time::{Duration, SystemTime};

use fleet_proto::v1 as pb;
use fleet_proto::v1::controller_service_client::ControllerServiceClient;
use fleet_proto::v1::join_service_client::JoinServiceClient;
use fleet_tests::Agent;
use fleet_tests::fleet::{Controller, ControllerOpts, agent_status};
use tonic::transport::{Channel, Endpoint};

const ADMIN: &str = "admin-token-for-the-impostor-test";

async fn controller(args: &[&str]) -> Controller {
    Controller::start(ControllerOpts {
        tls: true,
        token: Some(ADMIN.into()),
        args: args.iter().map(Into::into).collect(),
        ..Default::default()
    })
    .await
}

/// `fleetctl -o json token create ARGS`: (id, secret).
async fn create_token(controller: &Controller, args: &[&str]) -> (String, String) {
    let mut all = vec!["-o", "json", "token", "create"];
    all.extend_from_slice(args);
    let created = controller.fleetctl(&all).await.expect_code(0).json();
    (
        created["token"]["id"].as_str().expect("an id").to_string(),
        created["secret"].as_str().expect("a secret").to_string(),
    )
}

async fn join_token_file(controller: &Controller, args: &[&str]) -> std::path::PathBuf {
    let (id, secret) = create_token(controller, args).await;
    let path = controller.dir().join(format!("join-{id}"));
    std::fs::write(&path, secret).unwrap();
    path
}

/// A channel to the controller over TLS, presenting `identity` (or no certificate).
fn channel(controller: &Controller, identity: Option<fleet_net::tls::Identity>) -> Channel {
    Endpoint::from_shared(controller.url())
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector_lazy(controller.tls_connector(identity))
}

/// A new key and a certificate request for `node_id`.
fn csr(node_id: &str) -> (rcgen::KeyPair, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(vec![fleet_net::tls::node_name(node_id)])
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    (key, csr)
}

async fn join(
    controller: &Controller,
    token: &str,
    node_id: &str,
) -> Result<fleet_net::tls::Identity, tonic::Status> {
    let (key, csr) = csr(node_id);
    let response = JoinServiceClient::new(channel(controller, None))
        .join(pb::JoinRequest {
            token: token.into(),
            node_id: node_id.into(),
            csr_pem: csr,
        })
        .await?
        .into_inner();
    Ok(fleet_net::tls::Identity {
        chain: fleet_net::tls::read_certs(response.cert_pem.as_bytes()).unwrap(),
        key: fleet_net::tls::read_key(key.serialize_pem().as_bytes()).unwrap(),
    })
}

/// The identity a joined agent keeps in `<its dir>/id`.
fn identity_of(agent: &Agent) -> fleet_net::tls::Identity {
    let dir = agent.dir().join("id");
    let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
    fleet_net::tls::Identity {
        chain: fleet_net::tls::read_certs(&read("node.crt")).unwrap(),
        key: fleet_net::tls::read_key(&read("node.key")).unwrap(),
    }
}

/// A heartbeat saying `node_id` is at `control_addr`, with the bootstrap token.
fn forged(node_id: &str, control_addr: &str) -> tonic::Request<pb::HeartbeatRequest> {
    let mut request = tonic::Request::new(pb::HeartbeatRequest {
        status: Some(pb::StatusResponse {
            node_id: node_id.into(),
            state: "serving".into(),
            control_addr: control_addr.into(),
            ..Default::default()
        }),
        in_flight: 0,
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {ADMIN}").parse().unwrap());
    request
}

/// Sends `beats` (node id, control address) on one `HeartbeatStream` call with the
/// bootstrap token, one at a time: each answer, up to the first refusal (which ends
/// the call).
async fn stream_beats(
    client: &mut ControllerServiceClient<Channel>,
    beats: &[(&str, &str)],
) -> Vec<Result<pb::HeartbeatResponse, tonic::Status>> {
    let messages = beats
        .iter()
        .map(|(node, addr)| forged(node, addr).into_inner())
        .collect();
    stream_messages(client, messages).await
}

/// [`stream_beats`] of any messages.
async fn stream_messages(
    client: &mut ControllerServiceClient<Channel>,
    messages: Vec<pb::HeartbeatRequest>,
) -> Vec<Result<pb::HeartbeatResponse, tonic::Status>> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut request = tonic::Request::new(
        tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(rx),
    );
    *request.metadata_mut() = forged("", "").metadata().clone();
    let mut answers = match client.heartbeat_stream(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => return vec![Err(status)],
    };
    let mut got = Vec::new();
    for message in messages {
        tx.send(message).await.unwrap();
        match answers.message().await {
            Ok(Some(answer)) => got.push(Ok(answer)),
            Ok(None) => panic!("the call ended without a status after {got:?}"),
            Err(status) => {
                got.push(Err(status));
                break;
            }
        }
    }
    got
}

async fn control_addr_of(controller: &Controller, id: &str) -> String {
    controller
        .grpc()
        .get_node(pb::GetNodeRequest { node_id: id.into() })
        .await
        .unwrap()
        .into_inner()
        .control_addr
}

fn start_joined(controller: &Controller, id: &str, token: &Path) -> impl Future<Output = Agent> {
    Agent::start(controller.join_opts(id, token))
}

/// Every transport cause of a failed call, in one line.
fn chain(status: &tonic::Status) -> String {
    use std::error::Error as _;
    let mut text = status.to_string();
    let mut source = status.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_one_but_web_1_speaks_for_web_1() {
    let controller = controller(&[]).await;
    let token = join_token_file(&controller, &["--join", "--node-id-prefix", "web-"]).await;
    let web1 = start_joined(&controller, "web-1", &token).await;
    let web2 = start_joined(&controller, "web-2", &token).await;
    controller
        .wait_nodes(
            &["web-1".into(), "web-2".into()],
            "serving",
            Duration::from_secs(20),
        )
        .await;
    let real_addr = control_addr_of(&controller, "web-1").await;
    let elsewhere = web2.control().to_string();

    // A join token of its own does not give web-1's name while web-1 holds it.
    let (_, own) = create_token(&controller, &["--join", "--node-id-prefix", "web-"]).await;
    let refused = join(&controller, &own, "web-1").await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::AlreadyExists, "{refused}");
    assert!(refused.message().contains("already joined"), "{refused}");
    // Nor does one for other names.
    let (_, db) = create_token(&controller, &["--join", "--node-id-prefix", "db-"]).await;
    let refused = join(&controller, &db, "web-7").await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused}");
    assert!(refused.message().contains("prefix db-"), "{refused}");

    // The bootstrap token (a stolen token file) without web-1's key, over TLS…
    let mut no_cert = ControllerServiceClient::new(channel(&controller, None));
    let refused = no_cert
        .heartbeat(forged("web-1", &elsewhere))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused}");
    assert!(
        refused.message().contains("no node certificate"),
        "{refused}"
    );
    // …and in clear from this very host (a hollow agent, a local process).
    let plain = Endpoint::from_shared(format!("http://{}", controller.addr()))
        .unwrap()
        .connect_lazy();
    let refused = ControllerServiceClient::new(plain)
        .heartbeat(forged("web-1", &elsewhere))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused}");
    // web-2's own certificate speaks for web-2 only.
    let mut as_web2 = ControllerServiceClient::new(channel(&controller, Some(identity_of(&web2))));
    let refused = as_web2
        .heartbeat(forged("web-1", &elsewhere))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused}");
    assert!(
        refused.message().contains("does not name node"),
        "{refused}"
    );

    // The same on a HeartbeatStream, where each beat is checked, not the call: no
    // certificate, another node's certificate, and a stream that began as web-2 (its
    // own name) and goes on as web-1.
    let as_web1 = [("web-1", elsewhere.as_str())];
    let cases: [(_, &[(&str, &str)], _, _); 3] = [
        (
            no_cert.clone(),
            &as_web1,
            tonic::Code::Unauthenticated,
            "no node certificate",
        ),
        (
            as_web2.clone(),
            &as_web1,
            tonic::Code::PermissionDenied,
            "does not name node",
        ),
        (
            as_web2.clone(),
            &[("web-2", &elsewhere), ("web-1", &elsewhere)],
            tonic::Code::InvalidArgument,
            "speaks for node \"web-2\"",
        ),
    ];
    for (mut client, beats, code, why) in cases {
        let answers = stream_beats(&mut client, beats).await;
        assert_eq!(answers.len(), beats.len(), "{answers:?}");
        assert!(
            answers[..beats.len() - 1].iter().all(Result::is_ok),
            "{answers:?}"
        );
        let refused = answers[beats.len() - 1].as_ref().unwrap_err();
        assert_eq!(refused.code(), code, "{refused}");
        assert!(refused.message().contains(why), "{refused}");
    }

    // An answer to a command before any beat has named the stream's node counts for
    // no one: refused, and the call ends.
    let answer = pb::HeartbeatRequest {
        answer: Some(pb::CommandAnswer {
            id: 1,
            answer: Some(pb::command_answer::Answer::Shutdown(
                pb::ShutdownResponse {},
            )),
        }),
        ..Default::default()
    };
    let answers = stream_messages(&mut as_web2.clone(), vec![answer]).await;
    let refused = answers[0].as_ref().unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused}");
    assert!(
        refused
            .message()
            .contains("an answer before the stream's first beat"),
        "{refused}"
    );

    // Nor does a status sent with an answer on web-2's stream speak for web-1: the
    // call ends, and web-1's record keeps its address (checked below).
    let mut forged_answer = forged("web-1", &elsewhere).into_inner();
    forged_answer.answer = Some(pb::CommandAnswer {
        id: 2,
        answer: Some(pb::command_answer::Answer::Status(
            pb::StatusResponse::default(),
        )),
    });
    let messages = vec![forged("web-2", &elsewhere).into_inner(), forged_answer];
    let answers = stream_messages(&mut as_web2.clone(), messages).await;
    assert!(answers[0].is_ok(), "{answers:?}");
    let refused = answers[1].as_ref().unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused}");
    assert!(
        refused
            .message()
            .contains("an answer's status must be its own node's"),
        "{refused}"
    );

    assert_eq!(control_addr_of(&controller, "web-1").await, real_addr);
    // fleetctl restart web-1 restarts web-1, and only web-1.
    let (g1, g2) = (
        agent_status(&web1).await.generation,
        agent_status(&web2).await.generation,
    );
    controller
        .fleetctl(["restart", "web-1"])
        .await
        .expect_code(0);
    assert_eq!(agent_status(&web1).await.generation, g1 + 1);
    assert_eq!(agent_status(&web2).await.generation, g2);

    // A second controller of the same fleet, told web-9 is at web-2's address: the
    // agent there cannot prove it is web-9, so web-9 never appears.
    let tls = controller.dir().join("fleet-tls");
    let second = Controller::start(ControllerOpts {
        tls: true,
        args: vec![
            "--ca-cert".into(),
            tls.join("ca.crt").into(),
            "--ca-key".into(),
            tls.join("ca.key").into(),
            "--node".into(),
            format!("web-9={elsewhere}").into(),
        ],
        ..Default::default()
    })
    .await;
    let line = second
        .wait_for_log_from(0, "does not answer", Duration::from_secs(20))
        .await;
    assert!(
        line.contains("web-9") || line.contains(&elsewhere),
        "{line}"
    );
    assert!(
        second.nodes().await.is_empty(),
        "{:?}",
        second.nodes().await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_join_tokens_and_expired_certificates_are_refused_with_their_reason() {
    let controller = controller(&["--cert-ttl", "2s"]).await;
    let (id, secret) = create_token(&controller, &["--join"]).await;
    controller
        .fleetctl(["token", "revoke", id.as_str()])
        .await
        .expect_code(0);
    let refused = join(&controller, &secret, "web-1").await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused}");
    assert!(refused.message().contains("revoked"), "{refused}");

    let (_, secret) = create_token(&controller, &["--join"]).await;
    let identity = join(&controller, &secret, "web-1").await.unwrap();
    let not_after = fleet_net::tls::not_after(&identity.chain[0]).unwrap();
    let mut client = ControllerServiceClient::new(channel(&controller, Some(identity.clone())));
    let mut beat = forged("web-1", "127.0.0.1:1");
    beat.metadata_mut().remove("authorization");
    client
        .heartbeat(beat)
        .await
        .expect("a current certificate is taken");

    // Past its end (whole seconds), the same certificate on a new connection.
    while SystemTime::now() <= not_after + Duration::from_secs(1) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut client = ControllerServiceClient::new(channel(&controller, Some(identity)));
    let mut beat = forged("web-1", "127.0.0.1:1");
    beat.metadata_mut().remove("authorization");
    // Refused in the handshake. Under TLS 1.3 the client may finish its side before
    // the server's alert arrives, so what the client sees is the alert or a closed
    // connection; the reason is in the controller's log (and the agent logs its own
    // certificate's expiry).
    let refused = client.heartbeat(beat).await.unwrap_err();
    eprintln!("refused: {}", chain(&refused));
    let logged = controller
        .wait_for_log_from(0, "TLS handshake with", Duration::from_secs(5))
        .await;
    assert!(logged.to_lowercase().contains("expired"), "{logged}");
}
