//! What an agent may report is bounded: a bad node id, an oversize label, too many
//! labels, an over-long field, a foreign admin URL scheme and one node more than
//! `--max-nodes` are each refused with their reason and nothing of them is kept; a
//! flood of large refused heartbeats does not grow the controller; every response
//! carries the headers that keep the dashboard out of frames.

use std::collections::HashMap;

use fleet_proto::v1 as pb;
use fleet_tests::fleet::{Controller, ControllerOpts};
use fleet_tests::footprint;
use fleet_tests::harness::http_get;

fn beat(id: &str, labels: HashMap<String, String>) -> pb::HeartbeatRequest {
    pb::HeartbeatRequest {
        status: Some(pb::StatusResponse {
            node_id: id.into(),
            labels,
            state: "serving".into(),
            control_addr: "127.0.0.1:1".into(),
            admin_url: "http://127.0.0.1:1/debug/admin".into(),
            ..Default::default()
        }),
        in_flight: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_excess_is_refused_with_its_reason_and_nothing_is_kept() {
    let controller = Controller::start(ControllerOpts {
        args: vec!["--max-nodes".into(), "2".into()],
        ..Default::default()
    })
    .await;
    let mut api = controller.grpc();
    let label = |k: &str, v: String| HashMap::from([(k.to_string(), v)]);
    let many: HashMap<String, String> = (0..65).map(|i| (format!("k{i}"), "v".into())).collect();
    let mut javascript = beat("web-5", HashMap::new());
    javascript.status.as_mut().unwrap().admin_url = "javascript:alert(1)".into();
    let mut long_version = beat("web-6", HashMap::new());
    long_version.status.as_mut().unwrap().version = "v".repeat(10_000);
    let cases = [
        (beat("bad id", HashMap::new()), "node id"),
        (
            beat("web-1", label("big", "x".repeat(900 * 1024))),
            "921600 bytes",
        ),
        (beat("web-2", many), "65 labels"),
        (beat("web-3", label("bad key!", "v".into())), "label key"),
        (javascript, "neither http"),
        (long_version, "version"),
    ];
    for (request, reason) in cases {
        let refused = api.heartbeat(request).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused}");
        assert!(refused.message().contains(reason), "{reason}: {refused}");
    }
    // A message beyond the 1 MiB request limit never reaches the checks.
    let refused = api
        .heartbeat(beat("web-4", label("huge", "x".repeat(2 << 20))))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::OutOfRange, "{refused}");
    assert!(controller.nodes().await.is_empty(), "nothing kept");

    // The cap: two nodes, the third refused, the first two keep beating.
    for id in ["web-1", "web-2"] {
        api.heartbeat(beat(id, HashMap::new())).await.unwrap();
    }
    let refused = api
        .heartbeat(beat("web-3", HashMap::new()))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused}");
    assert!(refused.message().contains("--max-nodes"), "{refused}");
    api.heartbeat(beat("web-1", HashMap::new())).await.unwrap();
    let ids: Vec<String> = controller
        .nodes()
        .await
        .into_iter()
        .map(|n| n.node_id)
        .collect();
    assert_eq!(ids, ["web-1", "web-2"]);

    // A flood of refused 900 KiB heartbeats costs no lasting memory.
    let rss = || {
        footprint::mem(controller.pid())
            .expect("the controller runs")
            .rss
    };
    let before = rss();
    for i in 0..200 {
        let id = format!("flood-{i}");
        let refused = api
            .heartbeat(beat(&id, label("big", "y".repeat(900 * 1024))))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    }
    let after = rss();
    eprintln!(
        "controller RSS {} kB before 200 refused 900 KiB heartbeats, {} kB after",
        before / 1024,
        after / 1024
    );
    assert!(
        after < before + 16 * 1024 * 1024,
        "RSS grew from {before} to {after} bytes"
    );
    assert_eq!(controller.nodes().await.len(), 2);

    // Every response: no framing, own scripts only, no sniffing.
    let page = http_get(controller.addr(), "/").await.unwrap();
    let csp = page.headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert_eq!(page.headers["x-frame-options"], "DENY");
    assert_eq!(page.headers["x-content-type-options"], "nosniff");
}
