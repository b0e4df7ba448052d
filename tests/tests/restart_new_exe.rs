//! A restart can switch the node to a new executable at another path (a new
//! release): the new worker runs that file, and the status reports its path, its
//! sha256 and the new generation.

use std::path::Path;
use std::time::Duration;

use fleet_proto::v1::{Outcome, RestartRequest, StatusRequest};
use fleet_tests::harness::{copy_agent_binary, exe_of, restart_path, sha256_hex};
use fleet_tests::{Agent, AgentOpts};

/// A node whose allowed executables live in `releases`.
async fn node_with_releases_in(releases: &Path) -> Agent {
    Agent::start(AgentOpts::default().arg("--allowed-exe-dir").arg(releases)).await
}

#[tokio::test]
async fn http_restart_with_new_exe_file_path_runs_the_new_executable() {
    let releases = tempfile::tempdir().unwrap();
    let next = copy_agent_binary(releases.path(), "fleet-agent-next");
    let next = std::fs::canonicalize(next).unwrap();
    let sha256 = sha256_hex(&next);
    let agent = node_with_releases_in(releases.path()).await;
    let generation = agent.generation().await;
    let old = agent.worker_pid().await;

    let response = agent.action(&restart_path(Some(&next), None)).await;
    if response.status != 200 {
        agent.fail(&format!("restart: {} {}", response.status, response.text()));
    }
    let body = response.json();
    assert_eq!(body["outcome"], "succeeded", "{body}");
    assert_eq!(body["generation"].as_u64(), Some(generation + 1), "{body}");
    assert_eq!(
        body["exe"]["path"].as_str(),
        Some(next.to_str().unwrap()),
        "{body}"
    );
    assert_eq!(
        body["exe"]["sha256"].as_str(),
        Some(sha256.as_str()),
        "{body}"
    );

    let status = agent.status().await;
    assert_eq!(
        status["generation"].as_u64(),
        Some(generation + 1),
        "{status}"
    );
    assert_eq!(
        status["exe"]["path"].as_str(),
        Some(next.to_str().unwrap()),
        "{status}"
    );
    assert_eq!(
        status["exe"]["sha256"].as_str(),
        Some(sha256.as_str()),
        "{status}"
    );

    let new = agent.wait_worker_change(old, Duration::from_secs(20)).await;
    assert_eq!(exe_of(new), Some(next), "the new worker runs the new file");
}

#[tokio::test]
async fn grpc_restart_with_exe_and_sha256_runs_the_new_executable() {
    let releases = tempfile::tempdir().unwrap();
    let next = copy_agent_binary(releases.path(), "fleet-agent-v2");
    let next = std::fs::canonicalize(next).unwrap();
    let sha256 = sha256_hex(&next);
    let agent = node_with_releases_in(releases.path()).await;
    let mut grpc = agent.grpc().await;
    let before = grpc
        .status(agent.request(StatusRequest {}))
        .await
        .unwrap()
        .into_inner();

    let response = grpc
        .restart(agent.request(RestartRequest {
            exe: next.display().to_string(),
            sha256: sha256.clone(),
            reason: "release v2".into(),
            ..Default::default()
        }))
        .await
        .unwrap_or_else(|status| agent.fail(&format!("gRPC Restart: {status}")))
        .into_inner();
    assert_eq!(response.outcome(), Outcome::Succeeded, "{response:?}");
    assert_eq!(response.generation, before.generation + 1, "{response:?}");
    let exe = response
        .exe
        .clone()
        .expect("the response names the executable");
    assert_eq!(Path::new(&exe.path), next, "{response:?}");
    assert_eq!(exe.sha256, sha256, "{response:?}");

    let after = grpc
        .status(agent.request(StatusRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.generation, before.generation + 1, "{after:?}");
    let exe = after.exe.clone().expect("the status names the executable");
    assert_eq!(Path::new(&exe.path), next, "{after:?}");
    assert_eq!(exe.sha256, sha256, "{after:?}");
    assert_eq!(
        exe.size,
        std::fs::metadata(&next).unwrap().len(),
        "{after:?}"
    );
    assert!(
        after.workers.iter().any(
            |w| w.pid == response.new_pid && w.exe.as_ref().is_some_and(|e| e.path == exe.path)
        ),
        "the serving worker is listed with the new executable: {after:?}"
    );

    let new = agent
        .wait_worker_change(response.old_pid, Duration::from_secs(20))
        .await;
    assert_eq!(new, response.new_pid);
    assert_eq!(exe_of(new), Some(next), "the new worker runs the new file");
}
