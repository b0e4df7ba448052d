//! What an agent reports is bounded (`fleet_proto::limits`), end to end against the
//! real controller: a heartbeat with a field over its limit is refused with the field,
//! the limit and the size seen, and nothing of it is kept (not listed by `ListNodes` nor
//! `/api/nodes`, no memory held); a new node beyond `--max-nodes` is refused with what
//! to do, while known nodes keep heartbeating; an agent with a node id or labels the
//! controller would refuse does not start; the dashboard links a node's admin page only
//! on the node's own address, and every page carries its Content-Security-Policy.

use std::time::{Duration, Instant};

use fleet_proto::v1 as pb;
use fleet_tests::Agent;
use fleet_tests::fleet::{Controller, ControllerOpts, reported_status};
use fleet_tests::footprint::mem;
use fleet_tests::harness::http_get;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(30);

async fn heartbeat(
    controller: &Controller,
    status: pb::StatusResponse,
) -> Result<(), tonic::Status> {
    controller
        .grpc()
        .heartbeat(pb::HeartbeatRequest {
            status: Some(status),
            ..Default::default()
        })
        .await
        .map(|_| ())
}

/// The ids `ListNodes` and `/api/nodes` show (both must agree).
async fn listed(controller: &Controller) -> Vec<String> {
    let grpc: Vec<String> = controller
        .nodes()
        .await
        .into_iter()
        .map(|n| n.node_id)
        .collect();
    let api = http_get(controller.addr(), "/api/nodes")
        .await
        .unwrap()
        .json();
    let http: Vec<String> = api
        .as_array()
        .expect("a JSON array")
        .iter()
        .map(|n| n["node_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(grpc, http, "ListNodes and /api/nodes differ");
    grpc
}

#[tokio::test]
async fn each_field_over_its_limit_is_refused_with_its_reason_and_nothing_is_kept() {
    let controller = Controller::start(ControllerOpts::default()).await;
    heartbeat(&controller, reported_status("known"))
        .await
        .unwrap();

    let with = |f: &dyn Fn(&mut pb::StatusResponse)| {
        let mut s = reported_status("fresh");
        f(&mut s);
        s
    };
    let cases: Vec<(&str, pb::StatusResponse, Code, Vec<&str>)> = vec![
        (
            "oversize label value",
            with(&|s| {
                s.labels.insert("team".into(), "x".repeat(300));
            }),
            Code::InvalidArgument,
            vec![
                r#"label "team" value"#,
                "is 300 bytes, over the limit of 256",
            ],
        ),
        (
            "too many labels",
            with(&|s| s.labels = (0..65).map(|i| (format!("k{i}"), "v".into())).collect()),
            Code::InvalidArgument,
            vec!["labels are 65 labels, over the limit of 64"],
        ),
        (
            "label key with '='",
            with(&|s| {
                s.labels.insert("a=b".into(), "v".into());
            }),
            Code::InvalidArgument,
            vec![r#"label key "a=b" holds '='"#],
        ),
        (
            "bad node id",
            with(&|s| s.node_id = "web 1".into()),
            Code::InvalidArgument,
            vec![r#"node_id "web 1" holds ' '"#, "1 to 63 letters, digits"],
        ),
        (
            "over-long node id",
            with(&|s| s.node_id = "n".repeat(64)),
            Code::InvalidArgument,
            vec!["node_id", "is 64 bytes, over the limit of 63"],
        ),
        (
            "over-long exe path",
            with(&|s| s.exe.as_mut().unwrap().path = format!("/{}", "a".repeat(5000))),
            Code::InvalidArgument,
            vec!["exe.path", "is 5001 bytes, over the limit of 4096"],
        ),
        (
            "over-long admin URL",
            with(&|s| s.admin_url = format!("http://127.0.0.1:9/{}", "a".repeat(3000))),
            Code::InvalidArgument,
            vec!["admin_url", "is 3019 bytes, over the limit of 2048"],
        ),
        (
            "javascript: admin URL",
            with(&|s| s.admin_url = "javascript:alert(1)".into()),
            Code::InvalidArgument,
            vec![r#"admin_url "javascript:alert(1)" must start with http:// or https://"#],
        ),
        (
            "control address not host:port",
            with(&|s| s.control_addr = "nowhere".into()),
            Code::InvalidArgument,
            vec![r#"control_addr "nowhere" must be host:port"#],
        ),
        (
            "unknown state",
            with(&|s| s.state = "pwned".into()),
            Code::InvalidArgument,
            vec![r#"state "pwned" is not one of starting, serving"#],
        ),
        (
            "sha256 not hex",
            with(&|s| s.exe.as_mut().unwrap().sha256 = "z".repeat(64)),
            Code::InvalidArgument,
            vec!["exe.sha256", "must be 64 hex digits or empty"],
        ),
        (
            "too many workers",
            with(&|s| s.workers = vec![s.workers[0].clone(); 65]),
            Code::InvalidArgument,
            vec!["workers are 65 workers, over the limit of 64"],
        ),
        (
            // Refused by its length prefix, before it is read.
            "message over 1 MiB",
            with(&|s| {
                s.labels.insert("team".into(), "x".repeat(16 << 20));
            }),
            Code::OutOfRange,
            vec![
                "decoded message length too large",
                "the limit is: 1048576 bytes",
            ],
        ),
    ];
    for (what, s, code, needles) in cases {
        let refused = heartbeat(&controller, s)
            .await
            .expect_err(&format!("{what}: accepted"));
        assert_eq!(refused.code(), code, "{what}: {refused:?}");
        let message = refused.message();
        for needle in needles {
            assert!(
                message.contains(needle),
                "{what}: {message:?} does not say {needle:?}"
            );
        }
        // Short, whatever the size of the field: the value is never echoed whole.
        assert!(
            message.len() < 400,
            "{what}: {} bytes of message",
            message.len()
        );
        if code == Code::InvalidArgument && what != "bad node id" && what != "over-long node id" {
            assert!(
                message.starts_with("heartbeat of node fresh refused: "),
                "{message}"
            );
        }
    }
    // Over a limit, a known node is not changed either.
    let mut big = reported_status("known");
    big.labels.insert("team".into(), "x".repeat(300));
    big.exe.as_mut().unwrap().path = "/opt/app-v2".into();
    heartbeat(&controller, big).await.unwrap_err();

    assert_eq!(listed(&controller).await, ["known"]);
    let known = &controller.nodes().await[0];
    assert_eq!(known.labels, [("zone".to_string(), "a".to_string())].into());
    assert_eq!(known.exe.as_ref().unwrap().path, "/opt/app-v1");
}

#[tokio::test]
async fn new_nodes_beyond_max_nodes_are_refused_until_one_is_forgotten() {
    let controller = Controller::start(ControllerOpts {
        args: vec!["--max-nodes".into(), "2".into()],
        ..Default::default()
    })
    .await;
    heartbeat(&controller, reported_status("a")).await.unwrap();
    heartbeat(&controller, reported_status("b")).await.unwrap();

    let refused = heartbeat(&controller, reported_status("c"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    for needle in [
        "node c is not registered",
        "already holds 2 nodes, its limit (--max-nodes 2)",
        "fleetctl forget NODE",
        "a larger --max-nodes",
    ] {
        assert!(
            refused.message().contains(needle),
            "{:?}",
            refused.message()
        );
    }
    // Known nodes keep heartbeating, their changes recorded.
    let mut a = reported_status("a");
    a.generation = 2;
    heartbeat(&controller, a).await.unwrap();
    assert_eq!(listed(&controller).await, ["a", "b"]);
    assert_eq!(controller.nodes().await[0].generation, 2);

    // A real agent beyond the cap says why it is not registered, and keeps trying.
    let agent = Agent::start(controller.agent_opts("real-1")).await;
    let line = agent
        .wait_for_log("heartbeat to the controller", WAIT)
        .await;
    assert!(line.contains("--max-nodes 2"), "{line}");

    // Node b stops (its last heartbeat says so) and is forgotten: room for the agent.
    let mut b = reported_status("b");
    b.state = "stopped".into();
    heartbeat(&controller, b).await.unwrap();
    controller
        .grpc()
        .forget_node(pb::ForgetNodeRequest {
            node_id: "b".into(),
        })
        .await
        .unwrap();
    controller
        .wait_nodes(&["real-1".to_string()], "serving", WAIT)
        .await;
    assert_eq!(listed(&controller).await, ["a", "real-1"]);
    let refused = heartbeat(&controller, reported_status("c"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
}

#[tokio::test]
async fn refused_900_kib_heartbeats_leave_the_controllers_memory_as_it_was() {
    const FLOOD: usize = 200;
    // "A few MB": what the allocator keeps of the freed buffers varies from run to
    // run (1 to 4 MB here); kept heartbeats would be 180 MB.
    const GROWTH_ALLOWED: u64 = 8 << 20;
    let controller = Controller::start(ControllerOpts::default()).await;
    let pid = controller.pid();
    // 900 KiB: under the 1 MiB message bound, so each is read and decoded, then refused
    // by the label value limit. Each from another node: were any kept, all would be.
    let client = controller.grpc();
    let send = |i: usize| {
        let mut client = client.clone();
        let mut status = reported_status(&format!("flood-{i}"));
        status.labels.insert("team".into(), "x".repeat(900 << 10));
        async move {
            let refused = client
                .heartbeat(pb::HeartbeatRequest {
                    status: Some(status),
                    ..Default::default()
                })
                .await
                .unwrap_err();
            assert!(
                refused.message().contains("over the limit of 256"),
                "{refused:?}"
            );
        }
    };
    // Warm up the connection, its buffers and every worker thread's allocator arena:
    // a few rounds of eight at once.
    for round in 0..4 {
        futures_join(
            (0..8)
                .map(|i| tokio::spawn(send(1000 + round * 8 + i)))
                .collect(),
        )
        .await;
    }
    let before = mem(pid).expect("the controller runs");
    let started = Instant::now();
    for i in 0..FLOOD {
        send(i).await;
    }
    let took = started.elapsed();
    let after = mem(pid).expect("the controller runs");
    eprintln!(
        "[limits] {FLOOD} refused 900 KiB heartbeats in {took:?} ({:?} each): controller RSS {} kB before, {} kB after (peak {} kB)",
        took / FLOOD as u32,
        before.rss / 1024,
        after.rss / 1024,
        after.hwm / 1024
    );
    assert!(
        after.rss <= before.rss + GROWTH_ALLOWED,
        "the controller's RSS grew from {} kB to {} kB over {FLOOD} refused heartbeats",
        before.rss / 1024,
        after.rss / 1024
    );
    assert!(listed(&controller).await.is_empty());
}

/// Wait for every task; a panic in one fails the test.
async fn futures_join(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for task in tasks {
        task.await.unwrap();
    }
}

#[tokio::test]
async fn an_agent_with_a_node_id_or_labels_the_controller_would_refuse_does_not_start() {
    let controller = Controller::start(ControllerOpts::default()).await;
    let long_value = format!("team={}", "x".repeat(300));
    for (opts, says) in [
        (
            controller.agent_opts("web 1"),
            vec![r#"node_id "web 1" holds ' '"#, "set --node-id"],
        ),
        (
            controller
                .agent_opts("web-1")
                .arg("--label")
                .arg(&long_value),
            vec![
                r#"label "team" value"#,
                "is 300 bytes, over the limit of 256",
                "--label",
            ],
        ),
    ] {
        let agent = Agent::spawn(opts);
        let exit = agent.wait_exit(WAIT).await;
        assert!(!exit.success(), "{exit:?}");
        let log = agent.log_lines().join("\n");
        for needle in says {
            assert!(log.contains(needle), "{log}");
        }
    }
    assert!(listed(&controller).await.is_empty());
}

#[tokio::test]
async fn the_dashboard_links_only_a_nodes_own_admin_page_and_sends_its_csp() {
    let controller = Controller::start(ControllerOpts::default()).await;
    let agents = controller.start_nodes(1, |_, opts| opts).await;
    let own = format!("http://{}/debug/admin", agents[0].control());
    // A valid http URL, but not on the node's own address: kept, shown, not linked.
    let mut elsewhere = reported_status("elsewhere");
    elsewhere.admin_url = "http://evil.example/debug/admin".into();
    heartbeat(&controller, elsewhere).await.unwrap();
    // Another scheme is refused outright (see above); nothing to render.
    let mut js = reported_status("js");
    js.admin_url = "javascript:alert(1)".into();
    heartbeat(&controller, js).await.unwrap_err();

    for path in ["/", "/nodes?fragment=1"] {
        let page = http_get(controller.addr(), path).await.unwrap();
        assert_eq!(page.status, 200, "{path}: {}", page.text());
        let csp = page.headers["content-security-policy"].to_str().unwrap();
        for directive in [
            "frame-ancestors 'none'",
            "script-src 'self'",
            "default-src 'none'",
        ] {
            assert!(csp.contains(directive), "{path}: {csp}");
        }
        assert_eq!(page.headers["x-frame-options"], "DENY", "{path}");
        assert_eq!(page.headers["x-content-type-options"], "nosniff", "{path}");
        let html = page.text();
        assert!(
            html.contains(&format!("href=\"{own}\"")),
            "{path}: no link to {own}:\n{html}"
        );
        assert!(
            !html.contains("href=\"http://evil.example"),
            "{path}: {html}"
        );
        assert!(!html.contains("javascript:"), "{path}: {html}");
        assert!(
            html.contains("<span class=\"admin unlinked\"")
                && html.contains(">http://evil.example/debug/admin</span>"),
            "{path}: the foreign URL is shown as text: {html}"
        );
    }
    let api = http_get(controller.addr(), "/api/nodes").await.unwrap();
    assert!(api.headers.contains_key("content-security-policy"));
}
