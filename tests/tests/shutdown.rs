//! Every way to stop a node is graceful: the request in flight completes, the
//! supervisor exits with status 0, every port it had refuses connections
//! afterwards, and no worker is left running.

use std::net::SocketAddr;
use std::time::Duration;

use fleet_proto::v1::ShutdownRequest;
use fleet_tests::harness::{send_signal, wait_not_running};
use fleet_tests::{Agent, AgentOpts};
use nix::sys::signal::Signal;

async fn shuts_down_gracefully(trigger: impl AsyncFnOnce(&Agent)) {
    let agent = Agent::start(AgentOpts::default()).await;
    let worker = agent.worker_pid().await;
    let mut ports: Vec<SocketAddr> = vec![agent.control()];
    ports.extend(agent.servers().iter().flat_map(|s| s.addrs.iter().copied()));
    let sleeping = agent.start_sleep(2).await;

    trigger(&agent).await;

    let status = agent.wait_exit(Duration::from_secs(30)).await;
    if status.code() != Some(0) {
        agent.fail(&format!(
            "the supervisor exited with {status}, expected status 0"
        ));
    }
    let finished = sleeping.finish(Duration::from_secs(10)).await;
    assert_eq!(finished.status, 200);
    assert_eq!(finished.error, None, "the in-flight request was cut");
    assert_eq!(finished.body, format!("{worker}\n{worker}\n"));
    agent
        .wait_for_log("all servers shutdown", Duration::from_secs(5))
        .await;

    for port in ports {
        match tokio::net::TcpStream::connect(port).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
            other => agent.fail(&format!(
                "{port} should refuse connections after the shutdown, got {other:?}"
            )),
        }
    }
    if wait_not_running(worker, Duration::from_secs(1))
        .await
        .is_none()
    {
        agent.fail(&format!(
            "worker {worker} is still running after the shutdown"
        ));
    }
}

#[tokio::test]
async fn sigterm_shuts_down_gracefully() {
    shuts_down_gracefully(async |agent| send_signal(agent.pid(), Signal::SIGTERM)).await;
}

#[tokio::test]
async fn sigint_shuts_down_gracefully() {
    shuts_down_gracefully(async |agent| send_signal(agent.pid(), Signal::SIGINT)).await;
}

#[tokio::test]
async fn sigquit_shuts_down_gracefully() {
    shuts_down_gracefully(async |agent| send_signal(agent.pid(), Signal::SIGQUIT)).await;
}

#[tokio::test]
async fn sighup_shuts_down_gracefully() {
    shuts_down_gracefully(async |agent| send_signal(agent.pid(), Signal::SIGHUP)).await;
}

#[tokio::test]
async fn http_shutdown_shuts_down_gracefully() {
    shuts_down_gracefully(async |agent| {
        let response = agent.action("/debug/admin/shutdown").await;
        assert_eq!(response.status, 200, "{}", response.text());
    })
    .await;
}

#[tokio::test]
async fn grpc_shutdown_shuts_down_gracefully() {
    shuts_down_gracefully(async |agent| {
        agent
            .grpc()
            .await
            .shutdown(agent.request(ShutdownRequest {
                reason: "grpc_shutdown_shuts_down_gracefully".into(),
            }))
            .await
            .unwrap_or_else(|status| agent.fail(&format!("gRPC Shutdown: {status}")));
    })
    .await;
}

/// `fleet-agent --health-check` with the agent's own flags: `healthy` and 0 while it
/// serves, `unhealthy` and 1 once it is gone (the container image's HEALTHCHECK).
#[tokio::test]
async fn the_health_check_says_whether_the_agent_serves() {
    let agent = Agent::start(AgentOpts::default()).await;
    let control = agent.control();
    // The wildcard address the image uses, with the agent's port: asked on loopback.
    let wildcard = SocketAddr::from(([0, 0, 0, 0], control.port()));
    let check = |addr: SocketAddr| {
        let out = std::process::Command::new(fleet_tests::harness::agent_binary())
            .args(["--health-check", "--control", &addr.to_string()])
            .output()
            .expect("run fleet-agent --health-check");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.code(), stdout)
    };
    for addr in [control, wildcard] {
        let (code, stdout) = check(addr);
        assert_eq!(code, Some(0), "{stdout}");
        assert!(stdout.starts_with("healthy: "), "{stdout}");
        assert!(stdout.contains("/healthz answered 200 ok"), "{stdout}");
    }

    send_signal(agent.pid(), Signal::SIGTERM);
    agent.wait_exit(Duration::from_secs(30)).await;
    let (code, stdout) = check(control);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains("unhealthy: "), "{stdout}");
    assert!(stdout.contains("is the agent running?"), "{stdout}");
}
