//! An embedded app restarts and shuts down its own node through the library API
//! (`fleet_agent::Node`), as `Server.Restart(newExeFilePath)` and `Shutdown()` do in
//! GoFrame. The app is `agent/examples/embed.rs` itself, built as `embed-example`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fleet_tests::harness::{http_send, percent_encode, wait_gone};
use fleet_tests::{Agent, AgentOpts};
use http::Method;

const OPS_TOKEN: &str = "ops-secret";

/// The example app, copied under `name` into `dir` (so `dir` is its allowed directory).
fn install_example(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::copy(env!("CARGO_BIN_EXE_embed-example"), &path).unwrap();
    path
}

async fn embedded_node(releases: &Path) -> Agent {
    let program = install_example(releases, "app-v1");
    Agent::start(AgentOpts {
        program: Some(program),
        env: vec![("EMBED_OPS_TOKEN".into(), OPS_TOKEN.into())],
        ..Default::default()
    })
    .await
}

async fn ops(agent: &Agent, path: &str, token: Option<&str>) -> fleet_tests::harness::HttpResponse {
    let headers: Vec<(&str, String)> = token
        .map(|t| ("x-ops-token", t.to_string()))
        .into_iter()
        .collect();
    http_send(agent.app(), Method::POST, path, &headers, Vec::new())
        .await
        .unwrap_or_else(|e| agent.fail(&e))
}

#[tokio::test]
async fn the_app_restarts_its_own_node_into_a_new_executable() {
    let releases = tempfile::tempdir().unwrap();
    let agent = embedded_node(releases.path()).await;
    let old = agent.worker_pid().await;
    let v2 = install_example(releases.path(), "app-v2");
    let path = format!(
        "/ops/upgrade?exe={}",
        percent_encode(&v2.display().to_string())
    );

    let refused = ops(&agent, &path, None).await;
    assert_eq!(
        refused.status,
        401,
        "the app's own guard: {}",
        refused.text()
    );

    let response = ops(&agent, &path, Some(OPS_TOKEN)).await;
    assert_eq!(response.status, 200, "{}", response.text());
    let report = response.json();
    println!("report: {report}");
    assert_eq!(report["outcome"], "succeeded", "{report}");
    assert_eq!(report["old_pid"].as_u64(), Some(u64::from(old)), "{report}");
    let new = report["new_pid"].as_u64().unwrap() as u32;
    assert_ne!(new, old, "{report}");
    assert_eq!(report["generation"], 2, "{report}");
    assert!(
        report["timings"]["ready_us"].as_u64().unwrap() > 0,
        "{report}"
    );
    assert_eq!(
        report["exe"]["path"].as_str(),
        Some(v2.canonicalize().unwrap().to_str().unwrap()),
        "{report}"
    );
    assert_eq!(
        report["exe"]["sha256"].as_str().map(str::len),
        Some(64),
        "{report}"
    );

    // The worker that asked was drained after it answered, and is gone.
    assert!(wait_gone(old, Duration::from_secs(10)).await.is_some());
    assert_eq!(agent.worker_pid().await, new);
    let status = agent.status().await;
    assert_eq!(status["restarts_succeeded"], 1, "{status}");

    // A refusal reaches the app with the supervisor's reason and status.
    let outside = tempfile::tempdir().unwrap();
    let foreign = install_example(outside.path(), "app-evil");
    let path = format!(
        "/ops/upgrade?exe={}",
        percent_encode(&foreign.display().to_string())
    );
    let refused = ops(&agent, &path, Some(OPS_TOKEN)).await;
    assert_eq!(refused.status, 403, "{}", refused.text());
    assert!(
        refused.text().contains("not under an allowed directory"),
        "{}",
        refused.text()
    );
    assert_eq!(agent.worker_pid().await, new);
}

#[tokio::test]
async fn the_app_shuts_its_own_node_down() {
    let releases = tempfile::tempdir().unwrap();
    let agent = embedded_node(releases.path()).await;
    let worker = agent.worker_pid().await;
    let response = ops(&agent, "/ops/shutdown", Some(OPS_TOKEN)).await;
    assert_eq!(response.status, 200, "{}", response.text());
    let status = agent.wait_exit(Duration::from_secs(20)).await;
    assert!(
        status.success(),
        "the supervisor exits 0 after a graceful shutdown: {status:?}"
    );
    assert!(wait_gone(worker, Duration::from_secs(5)).await.is_some());
    agent
        .wait_for_log(
            "shutting down (the app asked: requested through /ops/shutdown)",
            Duration::from_secs(1),
        )
        .await;
}
