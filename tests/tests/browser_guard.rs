//! No web page can drive a node: against a real agent without a token, what a
//! browser can send on a page's behalf — a GET to an action (an `<img src>`), a
//! cross-site POST, a POST to a rebound name, gRPC as a no-cors `fetch` (HTTP/1.1,
//! `text/plain`) — changes nothing, while `curl -X POST` and a real gRPC client still
//! restart. On the app ports the admin routes are off without a token, and with one
//! they are never served through a proxy.

use std::time::Duration;

use fleet_proto::v1::{Outcome, RestartRequest};
use fleet_tests::harness::{HttpResponse, http_send};
use fleet_tests::{Agent, AgentOpts};
use http::Method;

/// What must not change: the serving worker, the generation, the restart counters,
/// and the node being up.
#[derive(Debug, PartialEq)]
struct Snapshot {
    worker: u32,
    generation: u64,
    succeeded: u64,
    failed: u64,
}

async fn snapshot(agent: &Agent) -> Snapshot {
    assert!(agent.try_exit().is_none(), "the node is still running");
    let status = agent.status().await;
    Snapshot {
        // Not `GET /pid`: right after a restart the old worker may still answer it.
        worker: agent.serving_worker().await,
        generation: status["generation"].as_u64().unwrap(),
        succeeded: status["restarts_succeeded"].as_u64().unwrap(),
        failed: status["restarts_failed"].as_u64().unwrap(),
    }
}

async fn send(
    agent: &Agent,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &'static str,
) -> HttpResponse {
    let headers: Vec<(&str, String)> = headers.iter().map(|(k, v)| (*k, v.to_string())).collect();
    http_send(agent.control(), method, path, &headers, body)
        .await
        .unwrap_or_else(|e| agent.fail(&e))
}

#[tokio::test]
async fn what_a_web_page_can_send_changes_nothing_while_curl_and_grpc_still_restart() {
    let agent = Agent::start(AgentOpts::default()).await;
    let before = snapshot(&agent).await;
    let own = format!("http://{}", agent.control());

    // An <img src> or a link: a GET to each action.
    for action in ["restart", "reload", "shutdown", "logout"] {
        let path = format!("/debug/admin/{action}");
        let response = send(&agent, Method::GET, &path, &[], "").await;
        assert_eq!(response.status, 405, "GET {path}: {}", response.text());
        assert!(
            response
                .text()
                .contains(&format!("curl -X POST {own}{path}")),
            "the refusal says what to do: {}",
            response.text()
        );
    }
    // A form or fetch posted from another site.
    for (header, value) in [
        ("sec-fetch-site", "cross-site"),
        ("sec-fetch-site", "same-site"),
        ("origin", "http://evil.example"),
        ("origin", "null"),
    ] {
        for action in ["/debug/admin/restart", "/debug/admin/shutdown"] {
            let response = send(&agent, Method::POST, action, &[(header, value)], "").await;
            assert_eq!(
                response.status,
                403,
                "POST {action} with {header}: {value}: {}",
                response.text()
            );
        }
    }
    // DNS rebinding: a name of the attacker's that now points at 127.0.0.1.
    let port = agent.control().port();
    let rebound = format!("rebind.example:{port}");
    for (method, path) in [
        (Method::POST, "/debug/admin/restart"),
        (Method::POST, "/debug/admin/shutdown"),
        (Method::GET, "/debug/admin"),
        (Method::GET, "/debug/admin/status"),
    ] {
        let response = send(&agent, method.clone(), path, &[("host", &rebound)], "").await;
        assert_eq!(response.status, 403, "{method} {path}: {}", response.text());
        assert!(
            response.text().contains("DNS rebinding"),
            "{}",
            response.text()
        );
    }
    // gRPC as a no-cors fetch: HTTP/1.1, text/plain, a body of the attacker's choosing.
    for method in ["Restart", "Shutdown"] {
        let path = format!("/fleet.v1.AgentService/{method}");
        let response = send(
            &agent,
            Method::POST,
            &path,
            &[("content-type", "text/plain;charset=UTF-8")],
            "\0\0\0\0\0",
        )
        .await;
        assert_eq!(response.status, 415, "{path}: {}", response.text());
        // Even with the right content type, HTTP/1.1 is not gRPC.
        let response = send(
            &agent,
            Method::POST,
            &path,
            &[("content-type", "application/grpc")],
            "\0\0\0\0\0",
        )
        .await;
        assert_eq!(response.status, 400, "{path}: {}", response.text());
    }
    assert_eq!(snapshot(&agent).await, before, "nothing changed");

    // curl -X POST still restarts...
    let response = agent.action("/debug/admin/restart").await;
    assert_eq!(response.status, 200, "curl -X POST: {}", response.text());
    let after_curl = snapshot(&agent).await;
    assert_ne!(after_curl.worker, before.worker);
    assert_eq!(after_curl.generation, before.generation + 1);
    assert_eq!(after_curl.succeeded, before.succeeded + 1);

    // ...and so does a real gRPC client (HTTP/2, application/grpc).
    let reply = agent
        .grpc()
        .await
        .restart(agent.request(RestartRequest::default()))
        .await
        .unwrap_or_else(|status| agent.fail(&format!("gRPC Restart: {status}")))
        .into_inner();
    assert_eq!(reply.outcome(), Outcome::Succeeded, "{reply:?}");
    let after_grpc = snapshot(&agent).await;
    assert_ne!(after_grpc.worker, after_curl.worker);
    assert_eq!(after_grpc.generation, before.generation + 2);
}

#[tokio::test]
async fn without_a_token_the_app_port_serves_no_admin_routes() {
    let agent = Agent::start(AgentOpts::default()).await;
    let before = snapshot(&agent).await;
    for (method, path) in [
        (Method::GET, "/debug/admin"),
        (Method::GET, "/debug/admin/status"),
        (Method::POST, "/debug/admin/restart"),
        (Method::POST, "/debug/admin/shutdown"),
    ] {
        let response = http_send(agent.app(), method.clone(), path, &[], "")
            .await
            .unwrap_or_else(|e| agent.fail(&e));
        assert_eq!(
            response.status,
            404,
            "{method} {path} on the app port: {}",
            response.text()
        );
    }
    assert_eq!(snapshot(&agent).await, before, "nothing changed");
}

#[tokio::test]
async fn with_a_token_app_port_admin_through_a_proxy_is_refused() {
    let agent = Agent::start(AgentOpts {
        token: Some("s3cret-t0ken".into()),
        ..Default::default()
    })
    .await;
    let before = snapshot(&agent).await;
    let bearer = "Bearer s3cret-t0ken".to_string();
    for proxy in [
        ("x-forwarded-for", "203.0.113.7"),
        ("forwarded", "for=203.0.113.7"),
        ("via", "1.1 proxy"),
    ] {
        let response = http_send(
            agent.app(),
            Method::POST,
            "/debug/admin/restart",
            &[("authorization", bearer.clone()), (proxy.0, proxy.1.into())],
            "",
        )
        .await
        .unwrap_or_else(|e| agent.fail(&e));
        assert_eq!(response.status, 403, "{proxy:?}: {}", response.text());
        assert!(
            response.text().contains("use the control endpoint"),
            "{}",
            response.text()
        );
    }
    assert_eq!(snapshot(&agent).await, before, "nothing changed");

    // Straight to the app port, with the token, it restarts.
    let response = agent.action_on(agent.app(), "/debug/admin/restart").await;
    assert_eq!(response.status, 200, "{}", response.text());
    let new = agent
        .wait_worker_change(before.worker, Duration::from_secs(20))
        .await;
    assert_ne!(new, before.worker);
}
