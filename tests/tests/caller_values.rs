//! What a caller sends is bounded and never forges a log line: a `reason` over 1 KiB
//! or an executable path over 4 KiB is refused with 400 / `INVALID_ARGUMENT` before
//! anything is looked at, and control characters in logged values are escaped.

use fleet_proto::v1::{RestartRequest, ShutdownRequest};
use fleet_tests::harness::{http_request, percent_encode};
use fleet_tests::{Agent, AgentOpts};
use http::Method;

#[tokio::test]
async fn oversized_reasons_and_paths_are_refused_on_every_surface() {
    let agent = Agent::start(AgentOpts::default()).await;
    let worker = agent.worker_pid().await;

    let long_reason = "r".repeat(1025);
    let path = format!("/debug/admin/restart?reason={long_reason}");
    let response = http_request(agent.control(), Method::POST, &path, agent.token())
        .await
        .unwrap();
    assert_eq!(response.status, 400, "{}", response.text());
    assert!(
        response.text().contains("at most 1024"),
        "{}",
        response.text()
    );

    let long_path = format!("/{}", "p".repeat(4096));
    let path = format!("/debug/admin/restart?newExeFilePath={long_path}");
    let response = http_request(agent.control(), Method::POST, &path, agent.token())
        .await
        .unwrap();
    assert_eq!(response.status, 400, "{}", response.text());
    assert!(
        response.text().contains("at most 4096"),
        "{}",
        response.text()
    );

    let status = agent
        .grpc()
        .await
        .restart(agent.request(RestartRequest {
            reason: long_reason.clone(),
            ..Default::default()
        }))
        .await
        .expect_err("refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");

    // The whole reason is never logged.
    assert!(!agent.log_lines().iter().any(|l| l.contains(&long_reason)));
    assert_eq!(agent.worker_pid().await, worker);
    let status = agent.status().await;
    assert_eq!(status["restarts_succeeded"], 0, "{status}");
}

#[tokio::test]
async fn newlines_in_caller_values_cannot_forge_log_lines() {
    let agent = Agent::start(AgentOpts::default()).await;
    let forged = "ok\n2026-12-04T00:00:00.000000Z  INFO supervisor[1]: forged line";
    let path = format!("/debug/admin/restart?reason={}", percent_encode(forged));
    let response = http_request(agent.control(), Method::POST, &path, agent.token())
        .await
        .unwrap();
    assert_eq!(response.status, 200, "{}", response.text());
    let line = agent
        .wait_for_log(
            "server reloading (http: ok",
            std::time::Duration::from_secs(10),
        )
        .await;
    assert!(line.contains("ok\\n2026-12-04"), "escaped in place: {line}");
    assert!(
        !agent
            .log_lines()
            .iter()
            .any(|l| l.starts_with("2026-12-04T00:00:00")),
        "a caller forged a log line"
    );

    // A shutdown reason too.
    agent
        .grpc()
        .await
        .shutdown(agent.request(ShutdownRequest {
            reason: "bye\nforged shutdown line".into(),
        }))
        .await
        .unwrap();
    let line = agent
        .wait_for_log("shutting down (bye", std::time::Duration::from_secs(10))
        .await;
    assert!(line.contains("bye\\nforged"), "{line}");
    assert!(!agent.log_lines().iter().any(|l| l.starts_with("forged")));
}
