//! `/api/events` on the real controller: every change its own event by default; with
//! `?coalesce_ms=N` (what the dashboard asks for) the changes of a window as one `node`
//! event and one `rollout` event per rollout that changed; a bad window refused with
//! what to give; the stream still needs a viewer's token.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use fleet_tests::fleet::{Controller, ControllerOpts};
use fleet_tests::harness::{http_open, http_request};
use fleet_tests::hollow::{HollowConfig, HollowFleet};
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use tokio::sync::mpsc;

const TOKEN: &str = "controller-events-token-81c2";
const AGENTS: usize = 200;
const WAIT: Duration = Duration::from_secs(60);

/// Opens `path` as an event stream; its events (`event`, `data`) as they come.
async fn subscribe(addr: SocketAddr, path: &str) -> mpsc::UnboundedReceiver<(String, String)> {
    let response = http_open(addr, path, Some(TOKEN))
        .await
        .expect("a response head");
    let (tx, rx) = mpsc::unbounded_channel();
    let mut body = response.into_body();
    tokio::spawn(async move {
        let mut text = String::new();
        while let Some(Ok(frame)) = body.frame().await {
            let Ok(data) = frame.into_data() else {
                continue;
            };
            text.push_str(&String::from_utf8_lossy(&data));
            // An event ends with an empty line.
            while let Some(end) = text.find("\n\n") {
                let block: String = text.drain(..end + 2).collect();
                let mut event = (String::new(), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event.0 = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        event.1 = v.trim().to_string();
                    }
                }
                if !event.0.is_empty() && tx.send(event).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

/// Events from `rx` until `done` holds for the one just taken (or [`WAIT`] passes).
async fn until(
    rx: &mut mpsc::UnboundedReceiver<(String, String)>,
    seen: &mut Vec<(String, String)>,
    what: &str,
    mut done: impl FnMut(&(String, String)) -> bool,
) {
    let waited = tokio::time::timeout(WAIT, async {
        while let Some(event) = rx.recv().await {
            let stop = done(&event);
            seen.push(event);
            if stop {
                return;
            }
        }
        panic!("the event stream ended before {what}");
    })
    .await;
    assert!(waited.is_ok(), "no {what} within {WAIT:?}: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coalesced_event_stream_sends_a_windows_changes_as_one_event_each() {
    let controller = Controller::start(ControllerOpts {
        token: Some(TOKEN.into()),
        ..ControllerOpts::default()
    })
    .await;
    let addr = controller.addr();

    // A bad window is refused with what to give; no token, no stream.
    for bad in ["soon", "-5", "10001"] {
        let path = format!("/api/events?coalesce_ms={bad}");
        let r = http_request(addr, Method::GET, &path, Some(TOKEN))
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}: {}", r.text());
        assert!(
            r.text()
                .contains("from 0 (every change its own event) to 10000")
        );
    }
    let r = http_request(addr, Method::GET, "/api/events?coalesce_ms=250", None)
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());

    let subscribed = std::time::Instant::now();
    let mut each = subscribe(addr, "/api/events").await;
    let mut gathered = subscribe(addr, "/api/events?coalesce_ms=2000").await;

    let fleet = HollowFleet::start_registered(
        HollowConfig {
            count: AGENTS,
            controller: Some(controller.url()),
            token: Some(TOKEN.into()),
            agent_token: Some(TOKEN.into()),
            ..HollowConfig::default()
        },
        WAIT,
    )
    .await
    .expect("hollow agents that register");
    // A rollout after the arrivals: its first event comes after theirs on each stream.
    controller
        .fleetctl(["rollout", "--exe", "/opt/app-v2", "--batches", "100%"])
        .await
        .expect_code(0);
    let history = controller
        .fleetctl(["rollout", "history", "-o", "json"])
        .await;
    history.expect_code(0);
    let id = history.json()[0]["id"]
        .as_str()
        .expect("the rollout's id")
        .to_string();
    let is_rollout = |(kind, data): &(String, String)| kind == "rollout" && *data == id;

    // Every node's arrival is an event of its own on the plain stream…
    let mut plain = Vec::new();
    until(&mut each, &mut plain, "the rollout's event", is_rollout).await;
    let arrivals: HashSet<&str> = plain
        .iter()
        .filter(|(kind, _)| kind == "node")
        .map(|(_, id)| id.as_str())
        .collect();
    assert_eq!(arrivals.len(), AGENTS, "{plain:?}");
    // …and on the coalesced one a node event per 2 s window at most, its data a node:
    // the windows' events go out at least 2 s apart, however many nodes arrived.
    let mut coalesced = Vec::new();
    until(
        &mut gathered,
        &mut coalesced,
        "the rollout's event",
        is_rollout,
    )
    .await;
    let windows = subscribed.elapsed().as_secs() / 2 + 1;
    let nodes: Vec<&str> = coalesced
        .iter()
        .filter(|(kind, _)| kind == "node")
        .map(|(_, id)| id.as_str())
        .collect();
    assert!(
        !nodes.is_empty() && nodes.len() as u64 <= windows,
        "{} node events in {windows} windows of 2 s, for {} on the plain stream: {coalesced:?}",
        nodes.len(),
        plain.len()
    );
    assert!(nodes.iter().all(|id| arrivals.contains(id)), "{nodes:?}");
    fleet.shutdown().await;
}
