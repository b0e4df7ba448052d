//! With a token on the controller (`--token-file`) and on the agents, every call must
//! carry it: fleetctl without `FLEET_TOKEN`, or with a wrong one, exits 2 saying
//! the token is missing or wrong, and nothing changes; with it, everything works.

use std::ffi::OsStr;

use fleet_proto::v1::ListNodesRequest;
use fleet_tests::fleet::{
    Controller, ControllerOpts, agent_release, agent_status, exe_path, node_id,
};

const TOKEN: &str = "fleet-e2e-token-7c1d2a";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_with_a_token_refuses_calls_without_it_and_nothing_changes() {
    let releases = tempfile::tempdir().unwrap();
    let v2 = agent_release(releases.path(), "fleet-agent-v2");
    let controller = Controller::start(ControllerOpts {
        token: Some(TOKEN.into()),
        ..ControllerOpts::default()
    })
    .await;
    // The agents get the same token: their heartbeats and the controller's calls to
    // them carry it.
    let agents = controller
        .start_nodes(2, |_, opts| {
            opts.arg("--allowed-exe-dir").arg(releases.path())
        })
        .await;
    let mut before = Vec::new();
    for agent in &agents {
        before.push(agent_status(agent).await);
    }
    let rollout = [OsStr::new("rollout"), "--exe".as_ref(), v2.as_os_str()];

    for token in [None, Some("not-the-token")] {
        for args in [&["nodes"][..], &["rollout", "history"][..]] {
            let ctl = controller.fleetctl_with_token(token, args).await;
            ctl.expect_code(2);
            assert!(
                ctl.stderr.contains("token"),
                "fleetctl says the token is missing or wrong:\n{}",
                ctl.stderr
            );
        }
        let ctl = controller.fleetctl_with_token(token, rollout).await;
        ctl.expect_code(2);
        assert!(ctl.stderr.contains("token"), "{}", ctl.stderr);
    }
    let refused = controller
        .grpc_with_token(None)
        .list_nodes(ListNodesRequest::default())
        .await
        .expect_err("ListNodes without the token is refused");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused}");

    // Nothing changed: no rollout, every node as it was.
    assert!(
        controller.rollouts().await.is_empty(),
        "no rollout was recorded"
    );
    for (i, agent) in agents.iter().enumerate() {
        let status = agent_status(agent).await;
        assert_eq!(status.generation, before[i].generation, "{}", node_id(i));
        assert_eq!(exe_path(&status), exe_path(&before[i]), "{}", node_id(i));
    }

    // With the token: the nodes are listed and a rollout goes through.
    let nodes = controller.fleetctl(["nodes", "-o", "json"]).await;
    assert_eq!(
        nodes.expect_code(0).json().as_array().map(Vec::len),
        Some(2)
    );
    controller.fleetctl(rollout).await.expect_code(0);
    for (i, agent) in agents.iter().enumerate() {
        let status = agent_status(agent).await;
        assert_eq!(exe_path(&status), v2.to_str().unwrap(), "{}", node_id(i));
        assert_eq!(
            status.generation,
            before[i].generation + 1,
            "{}",
            node_id(i)
        );
    }

    // Undoing it without the token is refused too, and moves nothing back.
    let id = controller.rollout("latest").await.id;
    let ctl = controller
        .fleetctl_with_token(None, ["rollout", "undo", &id])
        .await;
    ctl.expect_code(2);
    assert_eq!(
        controller.rollouts().await.len(),
        1,
        "no undo rollout was started"
    );
    for (i, agent) in agents.iter().enumerate() {
        let status = agent_status(agent).await;
        assert_eq!(exe_path(&status), v2.to_str().unwrap(), "{}", node_id(i));
    }
}
