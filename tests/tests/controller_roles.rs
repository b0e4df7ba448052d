//! Operator tokens with roles, on a real controller with real agents and `fleetctl`.
//!
//! A viewer token lists and watches, but every change it asks for — through gRPC
//! (`fleetctl restart`, `rollout`, `undo`, `forget`), the dashboard's confirmation
//! pages and POSTs — is refused with its role and the role needed, and nothing changes
//! on the nodes nor in the history. An operator rolls out and the history names it as
//! the actor, with the `--actor` it declared beside it. Tokens are created, listed and
//! revoked by admins only; a revoked or expired token is refused at its next call
//! with a message that says so; a join token is no operator credential; and no token
//! string is kept in the database or the log.

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use fleet_proto::v1 as pb;
use fleet_tests::fleet::{Controller, ControllerOpts, agent_release, agent_status, worker_pid};
use fleet_tests::harness::{eventually, http_send};
use http::{Method, StatusCode};
use serde_json::Value;
use tonic::Code;

const BOOTSTRAP: &str = "roles-bootstrap-token-5d1e";
const WAIT: Duration = Duration::from_secs(20);

async fn controller() -> Controller {
    Controller::start(ControllerOpts {
        token: Some(BOOTSTRAP.into()),
        ..ControllerOpts::default()
    })
    .await
}

/// `fleetctl token create ARGS -o json` with `token`; the new token's secret.
async fn create_token(controller: &Controller, token: &str, args: &[&str]) -> String {
    let mut all = vec!["-o", "json", "token", "create"];
    all.extend_from_slice(args);
    let ctl = controller.fleetctl_with_token(Some(token), &all).await;
    let created = ctl.expect_code(0).json();
    let secret = created["secret"].as_str().expect("a secret").to_string();
    let id = created["token"]["id"].as_str().expect("an id");
    assert!(
        secret.starts_with(&format!("fleet_{id}_")),
        "the secret names its id: {created}"
    );
    secret
}

/// A dashboard session logged in with `token`: its cookie.
async fn log_in(controller: &Controller, token: &str) -> String {
    let response = http_send(
        controller.addr(),
        Method::POST,
        "/login",
        &[("content-type", "application/x-www-form-urlencoded".into())],
        format!("token={token}&next=/nodes"),
    )
    .await
    .unwrap();
    assert_eq!(
        response.status,
        StatusCode::SEE_OTHER,
        "login: {}",
        response.text()
    );
    let cookie = response.headers["set-cookie"].to_str().unwrap();
    cookie.split(';').next().unwrap().to_string()
}

/// `GET path` with the session cookie.
async fn page(controller: &Controller, cookie: &str, path: &str) -> fleet_tests::HttpResponse {
    http_send(
        controller.addr(),
        Method::GET,
        path,
        &[("cookie", cookie.to_string())],
        Bytes::new(),
    )
    .await
    .unwrap()
}

/// The session's CSRF token, from the logout form every page carries.
fn csrf(html: &str) -> String {
    let at = html.find("name=\"csrf\" value=\"").expect("a csrf field") + 19;
    html[at..].split('"').next().unwrap().to_string()
}

/// A dashboard form POST with the session and its CSRF token.
async fn post(
    controller: &Controller,
    cookie: &str,
    path: &str,
    form: &str,
) -> fleet_tests::HttpResponse {
    http_send(
        controller.addr(),
        Method::POST,
        path,
        &[
            ("cookie", cookie.to_string()),
            ("content-type", "application/x-www-form-urlencoded".into()),
            ("origin", controller.url()),
        ],
        form.to_string(),
    )
    .await
    .unwrap()
}

/// The status and content type of a response that does not end (an event stream),
/// read from its head alone.
async fn stream_head(addr: SocketAddr, path: &str, token: &str) -> (StatusCode, String) {
    let response = fleet_tests::harness::http_open(addr, path, Some(token))
        .await
        .expect("a response head");
    let kind = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (response.status(), kind)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_reads_and_watches_but_changes_nothing_and_an_operator_is_the_actor() {
    let releases = tempfile::tempdir().unwrap();
    let v2 = agent_release(releases.path(), "fleet-agent-v2");
    let controller = controller().await;
    let agents = controller
        .start_nodes(2, |_, opts| {
            opts.arg("--allowed-exe-dir").arg(releases.path())
        })
        .await;
    let mut before = Vec::new();
    for agent in &agents {
        before.push(agent_status(agent).await);
    }
    let viewer = create_token(
        &controller,
        BOOTSTRAP,
        &["--role", "viewer", "--name", "wall"],
    )
    .await;
    let operator = create_token(
        &controller,
        BOOTSTRAP,
        &["--role", "operator", "--name", "ci-deploy"],
    )
    .await;

    // A viewer reads: nodes, history, the JSON API and its event stream.
    let nodes = controller
        .fleetctl_with_token(Some(&viewer), ["nodes", "-o", "json"])
        .await;
    assert_eq!(
        nodes.expect_code(0).json().as_array().map(Vec::len),
        Some(2)
    );
    controller
        .fleetctl_with_token(Some(&viewer), ["rollout", "history"])
        .await
        .expect_code(0);
    let api = fleet_tests::harness::http_request(
        controller.addr(),
        Method::GET,
        "/api/nodes",
        Some(&viewer),
    )
    .await
    .unwrap();
    assert_eq!(api.status, StatusCode::OK, "{}", api.text());
    let (status, kind) = stream_head(controller.addr(), "/api/events", &viewer).await;
    assert_eq!(status, StatusCode::OK);
    assert!(kind.starts_with("text/event-stream"), "{kind}");

    // Every change it asks for is refused with its role and the role needed.
    let refusals: [(&[&OsStr], &str); 4] = [
        (
            &["restart".as_ref(), "node-1".as_ref()],
            "RestartNode needs operator",
        ),
        (
            &["shutdown".as_ref(), "node-2".as_ref()],
            "ShutdownNode needs operator",
        ),
        (
            &["rollout".as_ref(), "--exe".as_ref(), v2.as_os_str()],
            "StartRollout needs operator",
        ),
        (
            &["forget".as_ref(), "node-1".as_ref()],
            "ForgetNode needs admin",
        ),
    ];
    for (args, needs) in refusals {
        let ctl = controller.fleetctl_with_token(Some(&viewer), args).await;
        ctl.expect_code(2);
        assert!(
            ctl.stderr
                .contains(&format!("token 'wall' has role viewer; {needs}")),
            "{}",
            ctl.stderr
        );
    }
    let refused = controller
        .grpc_with_token(Some(&viewer))
        .start_rollout(pb::RolloutSpec {
            exe: v2.to_str().unwrap().into(),
            ..Default::default()
        })
        .await
        .expect_err("StartRollout as a viewer");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused}");

    // The dashboard: the viewer sees the pages, without a button for a change; the
    // confirmation pages and the POSTs (with a good CSRF token) are refused.
    let cookie = log_in(&controller, &viewer).await;
    let nodes_page = page(&controller, &cookie, "/nodes").await;
    assert_eq!(nodes_page.status, StatusCode::OK);
    let html = nodes_page.text();
    assert!(html.contains("node-1") && html.contains("wall"), "{html}");
    assert!(
        !html.contains("/restart") && !html.contains("/rollouts/new"),
        "{html}"
    );
    let token = csrf(&html);
    let confirm = page(&controller, &cookie, "/nodes/node-1/restart").await;
    assert_eq!(confirm.status, StatusCode::FORBIDDEN, "{}", confirm.text());
    for (path, form, needs) in [
        ("/nodes/node-1/restart", "exe=&reason=x", "RestartNode"),
        ("/nodes/node-2/shutdown", "reason=x", "ShutdownNode"),
        ("/nodes/node-1/forget", "", "ForgetNode"),
    ] {
        let refused = post(&controller, &cookie, path, &format!("csrf={token}&{form}")).await;
        assert_eq!(
            refused.status,
            StatusCode::FORBIDDEN,
            "{path}: {}",
            refused.text()
        );
        assert!(refused.text().contains(needs), "{}", refused.text());
    }
    let form = format!("csrf={token}&step=start&exe={}", v2.display());
    let refused = post(&controller, &cookie, "/rollouts/new", &form).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.text());
    assert_eq!(
        refused.text().trim(),
        "token 'wall' has role viewer; StartRollout needs operator"
    );

    // Nothing changed: no rollout, every node as it was.
    assert!(controller.rollouts().await.is_empty(), "no rollout stored");
    for (i, agent) in agents.iter().enumerate() {
        let now = agent_status(agent).await;
        assert_eq!(now.generation, before[i].generation, "node-{}", i + 1);
        assert_eq!(worker_pid(&now), worker_pid(&before[i]), "node-{}", i + 1);
        assert_eq!(now.state, "serving", "node-{}", i + 1);
    }

    // An operator rolls out; the history names it, with what it declared beside it.
    controller
        .fleetctl_with_token(
            Some(&operator),
            [
                OsStr::new("rollout"),
                "--exe".as_ref(),
                v2.as_os_str(),
                "--actor".as_ref(),
                "alice".as_ref(),
            ],
        )
        .await
        .expect_code(0);
    let history = controller
        .fleetctl_with_token(Some(&viewer), ["rollout", "history", "-o", "json"])
        .await;
    let history = history.expect_code(0).json();
    assert_eq!(history[0]["spec"]["actor"], "ci-deploy", "{history:#}");
    assert_eq!(history[0]["spec"]["declared_actor"], "alice", "{history:#}");
    let table = controller
        .fleetctl_with_token(Some(&viewer), ["rollout", "history"])
        .await;
    assert!(
        table
            .expect_code(0)
            .stdout
            .contains("ci-deploy (as \"alice\")"),
        "{}",
        table.stdout
    );
    let rollouts_page = page(&controller, &cookie, "/rollouts").await.text();
    assert!(
        rollouts_page.contains("ci-deploy (as &quot;alice&quot;)"),
        "{rollouts_page}"
    );
    for (i, agent) in agents.iter().enumerate() {
        let now = agent_status(agent).await;
        assert_eq!(now.generation, before[i].generation + 1, "node-{}", i + 1);
    }

    // The viewer watches it (to its end) but may not undo it.
    let id = history[0]["id"].as_str().unwrap().to_string();
    controller
        .fleetctl_with_token(Some(&viewer), ["rollout", "status", &id, "--watch"])
        .await
        .expect_code(0);
    let ctl = controller
        .fleetctl_with_token(Some(&viewer), ["rollout", "undo", &id])
        .await;
    ctl.expect_code(2);
    assert!(
        ctl.stderr.contains("UndoRollout needs operator"),
        "{}",
        ctl.stderr
    );
    let refused = post(
        &controller,
        &cookie,
        &format!("/rollouts/{id}/undo"),
        &format!("csrf={token}"),
    )
    .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.text());
    assert_eq!(controller.rollouts().await.len(), 1, "no undo was started");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_managed_by_admins_and_refused_once_revoked_or_expired() {
    let controller = controller().await;
    let admin = create_token(
        &controller,
        BOOTSTRAP,
        &["--role", "admin", "--name", "alice-admin"],
    )
    .await;
    // An admin token manages tokens too; what it creates records it as the creator.
    let operator = create_token(&controller, &admin, &["--role", "operator", "--name", "ci"]).await;
    let short = create_token(
        &controller,
        &admin,
        &["--role", "viewer", "--name", "temp", "--ttl", "1s"],
    )
    .await;
    let join = create_token(
        &controller,
        &admin,
        &["--join", "--node-id-prefix", "web-", "--uses", "2"],
    )
    .await;

    // An operator may not manage tokens.
    for args in [
        &["token", "create", "--role", "admin", "--name", "me"][..],
        &["token", "list"][..],
        &["token", "revoke", "t00000000"][..],
    ] {
        let ctl = controller.fleetctl_with_token(Some(&operator), args).await;
        ctl.expect_code(2);
        assert!(
            ctl.stderr.contains("token 'ci' has role operator;")
                && ctl.stderr.contains("needs admin"),
            "{}",
            ctl.stderr
        );
    }

    let list = controller
        .fleetctl_with_token(Some(&admin), ["token", "list", "-o", "json"])
        .await;
    let list = list.expect_code(0).json();
    let tokens = list.as_array().unwrap();
    assert_eq!(tokens.len(), 4, "{list:#}");
    let by_name = |name: &str| -> &Value {
        tokens
            .iter()
            .find(|t| t["name"] == name)
            .unwrap_or_else(|| panic!("{name} in {list:#}"))
    };
    assert_eq!(by_name("alice-admin")["created_by"], "bootstrap");
    assert_eq!(by_name("ci")["created_by"], "alice-admin");
    assert_eq!(by_name("ci")["kind"], "operator");
    assert_eq!(by_name("join")["kind"], "join");
    assert_eq!(by_name("join")["max_uses"], 2);
    assert!(by_name("temp")["expires_unix_ms"].as_u64().unwrap() > 0);
    assert!(
        by_name("alice-admin")["last_used_unix_ms"]
            .as_u64()
            .unwrap()
            > 0
    );
    let table = controller
        .fleetctl_with_token(Some(&admin), ["token", "list"])
        .await;
    assert!(
        !table.expect_code(0).stdout.contains("fleet_"),
        "{}",
        table.stdout
    );

    // A join token is no operator credential: not for gRPC, not for the dashboard.
    let ctl = controller.fleetctl_with_token(Some(&join), ["nodes"]).await;
    ctl.expect_code(2);
    assert!(ctl.stderr.contains("is a join token"), "{}", ctl.stderr);
    let refused = controller
        .grpc_with_token(Some(&join))
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .expect_err("a join token lists nothing");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused}");
    let login = http_send(
        controller.addr(),
        Method::POST,
        "/login",
        &[("content-type", "application/x-www-form-urlencoded".into())],
        format!("token={join}&next=/"),
    )
    .await
    .unwrap();
    assert_eq!(login.status, StatusCode::UNAUTHORIZED);
    assert!(login.text().contains("is a join token"), "{}", login.text());
    // Heartbeats are the agents' (the bootstrap token) until node certificates.
    let refused = controller
        .grpc_with_token(Some(&admin))
        .heartbeat(pb::HeartbeatRequest::default())
        .await
        .expect_err("a role token sends no heartbeat");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused}");
    assert!(refused.message().contains("--token-file"), "{refused}");

    // A revoked token is refused from its next call on, saying so; so is its
    // dashboard session.
    let cookie = log_in(&controller, &operator).await;
    let mut ci = controller.grpc_with_token(Some(&operator));
    ci.list_nodes(pb::ListNodesRequest::default())
        .await
        .unwrap();
    let id = by_name("ci")["id"].as_str().unwrap().to_string();
    let ctl = controller
        .fleetctl_with_token(Some(&admin), ["token", "revoke", &id])
        .await;
    assert!(
        ctl.expect_code(0).stdout.contains("is revoked"),
        "{}",
        ctl.stdout
    );
    let refused = ci
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .expect_err("a revoked token lists nothing");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused}");
    assert!(
        refused
            .message()
            .starts_with(&format!("token {id} ('ci') was revoked at ")),
        "{refused}"
    );
    let ctl = controller
        .fleetctl_with_token(Some(&operator), ["nodes"])
        .await;
    ctl.expect_code(2);
    assert!(ctl.stderr.contains("was revoked at"), "{}", ctl.stderr);
    let after = page(&controller, &cookie, "/nodes").await;
    assert_eq!(after.status, StatusCode::SEE_OTHER, "sent back to log in");

    // An expired token: refused once its second is over.
    let mut temp = controller.grpc_with_token(Some(&short));
    let refused = eventually(WAIT, "the 1s token expires", async || {
        match temp.list_nodes(pb::ListNodesRequest::default()).await {
            Ok(_) => Err("still accepted".to_string()),
            Err(status) => Ok(status),
        }
    })
    .await;
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused}");
    assert!(
        refused.message().contains("('temp') expired at"),
        "{refused}"
    );

    // No token string is kept in the database (nor its journal, nor etcd) or in the log.
    let secrets = [&admin, &operator, &short, &join];
    let stored = controller.stored_bytes().await;
    let contains =
        |hay: &[u8], needle: &str| hay.windows(needle.len()).any(|w| w == needle.as_bytes());
    assert!(
        contains(&stored, &id),
        "the database holds the tokens' records"
    );
    for secret in secrets {
        let (_, random) = secret.rsplit_once('_').unwrap();
        assert!(
            !contains(&stored, random),
            "a token string is in the database"
        );
        assert!(
            !controller.log_lines().iter().any(|l| l.contains(random)),
            "a token string is in the log"
        );
    }

    // After a restart of the controller: the revocation holds, the admin still works.
    controller.restart().await;
    let ctl = controller
        .fleetctl_with_token(Some(&operator), ["nodes"])
        .await;
    ctl.expect_code(2);
    assert!(ctl.stderr.contains("was revoked at"), "{}", ctl.stderr);
    controller
        .fleetctl_with_token(Some(&admin), ["token", "list"])
        .await
        .expect_code(0);
}
