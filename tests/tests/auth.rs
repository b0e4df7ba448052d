//! With a token, the control surfaces need `Authorization: Bearer TOKEN`: without
//! it every admin route and /metrics answers 401 and changes nothing, gRPC answers
//! UNAUTHENTICATED. And the agent refuses to expose control beyond loopback
//! without a token.

use std::time::Duration;

use fleet_proto::v1::{Outcome, RestartRequest, ShutdownRequest, StatusRequest};
use fleet_tests::harness::{http_request, http_send};
use fleet_tests::{Agent, AgentOpts};
use http::Method;
use tonic::Code;

const TOKEN: &str = "s3cret-t0ken";

async fn node_with_token() -> Agent {
    Agent::start(AgentOpts {
        token: Some(TOKEN.into()),
        ..Default::default()
    })
    .await
}

#[tokio::test]
async fn http_admin_routes_and_metrics_need_the_token_and_change_nothing_without_it() {
    let agent = node_with_token().await;
    let status = agent.status().await; // with the token
    let generation = status["generation"].as_u64().unwrap();
    let worker = agent.worker_pid().await;

    let routes = [
        "/debug/admin",
        "/debug/admin/status",
        "/debug/admin/restart",
        "/debug/admin/reload",
        "/debug/admin/shutdown",
        "/metrics",
    ];
    for (addr, where_) in [(agent.control(), "control port"), (agent.app(), "app port")] {
        for route in routes {
            if where_ == "app port" && route == "/metrics" {
                continue; // /metrics is a control-port route only
            }
            for method in [Method::GET, Method::POST] {
                for token in [None, Some("wrong-token")] {
                    let response = http_request(addr, method.clone(), route, token)
                        .await
                        .unwrap_or_else(|e| agent.fail(&e));
                    // The HTML page may send a browser to its login form instead.
                    let to_login = method == Method::GET
                        && route == "/debug/admin"
                        && response.status == 303
                        && response
                            .headers
                            .get("location")
                            .is_some_and(|l| l == "/debug/admin/login");
                    assert!(
                        response.status == 401 || to_login,
                        "{method} {route} on the {where_} with token {token:?}: {} {}",
                        response.status,
                        response.text()
                    );
                }
            }
        }
    }
    let health = http_request(agent.control(), Method::GET, "/healthz", None)
        .await
        .unwrap_or_else(|e| agent.fail(&e));
    assert_eq!(health.status, 200, "/healthz needs no token");

    assert!(agent.try_exit().is_none(), "the node is still running");
    assert_eq!(agent.generation().await, generation, "nothing restarted");
    assert_eq!(agent.worker_pid().await, worker, "the same worker serves");

    let response = agent.action("/debug/admin/restart").await;
    assert_eq!(response.status, 200, "with the token: {}", response.text());
    assert_eq!(agent.generation().await, generation + 1);
    let metrics = agent.admin("/metrics").await;
    assert_eq!(metrics.status, 200, "with the token: {}", metrics.text());
}

#[tokio::test]
async fn grpc_needs_the_bearer_token() {
    let agent = node_with_token().await;
    let generation = agent.generation().await;
    let mut grpc = agent.grpc().await;

    for token in [None, Some("wrong-token")] {
        let status = grpc
            .status(with_token(StatusRequest {}, token))
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::Unauthenticated,
            "Status, token {token:?}: {status}"
        );
        let restart = grpc
            .restart(with_token(RestartRequest::default(), token))
            .await
            .unwrap_err();
        assert_eq!(
            restart.code(),
            Code::Unauthenticated,
            "Restart, token {token:?}: {restart}"
        );
        let shutdown = grpc
            .shutdown(with_token(ShutdownRequest::default(), token))
            .await
            .unwrap_err();
        assert_eq!(
            shutdown.code(),
            Code::Unauthenticated,
            "Shutdown, token {token:?}: {shutdown}"
        );
    }
    assert!(agent.try_exit().is_none(), "the node is still running");
    assert_eq!(agent.generation().await, generation, "nothing restarted");

    let response = grpc
        .restart(agent.request(RestartRequest::default()))
        .await
        .unwrap_or_else(|status| agent.fail(&format!("Restart with the token: {status}")))
        .into_inner();
    assert_eq!(response.outcome(), Outcome::Succeeded, "{response:?}");
    let status = grpc
        .status(agent.request(StatusRequest {}))
        .await
        .unwrap_or_else(|status| agent.fail(&format!("Status with the token: {status}")))
        .into_inner();
    assert_eq!(status.generation, generation + 1);
}

#[tokio::test]
async fn a_get_or_a_post_without_csrf_with_the_admin_session_cookie_changes_nothing() {
    let agent = node_with_token().await;
    let generation = agent.generation().await;
    // Log in the way the admin page does, and keep its session cookie.
    let login = http_send(
        agent.control(),
        Method::POST,
        "/debug/admin/login",
        &[("content-type", "application/x-www-form-urlencoded".into())],
        format!("token={TOKEN}"),
    )
    .await
    .unwrap_or_else(|e| agent.fail(&e));
    let cookie = login
        .headers
        .get("set-cookie")
        .and_then(|c| c.to_str().ok())
        .and_then(|c| c.split(';').next())
        .unwrap_or_else(|| agent.fail(&format!("login set no cookie: {login:?}")))
        .to_string();
    assert!(
        login.headers["set-cookie"]
            .to_str()
            .unwrap()
            .contains("SameSite=Strict"),
        "the session cookie is SameSite=Strict: {login:?}"
    );

    // A plain link (GET) to an action, even with the cookie, does nothing...
    for action in [
        "/debug/admin/restart",
        "/debug/admin/reload",
        "/debug/admin/shutdown",
    ] {
        let response = http_send(
            agent.control(),
            Method::GET,
            action,
            &[("cookie", cookie.clone())],
            "",
        )
        .await
        .unwrap_or_else(|e| agent.fail(&e));
        assert_eq!(
            response.status,
            405,
            "GET {action} with the session cookie: {}",
            response.text()
        );
    }
    // ...nor does a POST with the cookie but without the page's CSRF token...
    let response = http_send(
        agent.control(),
        Method::POST,
        "/debug/admin/restart",
        &[("cookie", cookie.clone())],
        "",
    )
    .await
    .unwrap_or_else(|e| agent.fail(&e));
    assert_eq!(response.status, 403, "no CSRF token: {}", response.text());
    assert!(agent.try_exit().is_none(), "the node is still running");
    assert_eq!(agent.generation().await, generation, "nothing restarted");

    // ...while the page's own POST, with the token its page carries, works.
    let page = http_send(
        agent.control(),
        Method::GET,
        "/debug/admin",
        &[("cookie", cookie.clone())],
        "",
    )
    .await
    .unwrap_or_else(|e| agent.fail(&e));
    let html = page.text();
    let csrf = html
        .split("name=csrf value='")
        .nth(1)
        .and_then(|rest| rest.split('\'').next())
        .unwrap_or_else(|| agent.fail(&format!("no CSRF token in the page: {html}")))
        .to_string();
    let response = http_send(
        agent.control(),
        Method::POST,
        "/debug/admin/restart",
        &[
            ("cookie", cookie),
            ("content-type", "application/x-www-form-urlencoded".into()),
        ],
        format!("csrf={csrf}"),
    )
    .await
    .unwrap_or_else(|e| agent.fail(&e));
    assert_eq!(
        response.status,
        200,
        "POST with the session cookie: {}",
        response.text()
    );
    assert_eq!(agent.generation().await, generation + 1);
}

fn with_token<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

#[tokio::test]
async fn control_beyond_loopback_without_a_token_is_refused_at_start() {
    let agent = Agent::spawn(AgentOpts {
        control: Some("0.0.0.0:0".into()),
        ..Default::default()
    });
    let status = agent.wait_exit(Duration::from_secs(20)).await;
    if status.code() != Some(2) {
        agent.fail(&format!("expected exit status 2, got {status}"));
    }
    agent
        .wait_for_log("without a token", Duration::from_secs(5))
        .await;
}
