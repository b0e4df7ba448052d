//! The controller can be watched: its `/metrics`, scraped after a rollout, a manual
//! restart, a shutdown and refused heartbeats, parses as Prometheus text and counts
//! exactly what happened; a path it does not serve is a 404 (and an unknown gRPC method
//! `UNIMPLEMENTED`); every state change has an audit line naming who made it;
//! `--log-format json` writes one JSON object per line on the controller and the
//! agent; `fleetctl version` shows the client's and the controller's versions.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use fleet_proto::v1 as pb;
use fleet_tests::fleet::{Controller, ControllerOpts, agent_release, agent_status, binary};
use fleet_tests::harness::{eventually, http_request, http_send};
use fleet_tests::{Agent, AgentOpts};
use http::{Method, StatusCode};
use prometheus_parse::{LineInfo, Scrape, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BOOTSTRAP: &str = "metrics-bootstrap-token-7c2a";
const WAIT: Duration = Duration::from_secs(30);

/// `/metrics` with `token`, checked line by line (a line the parser would skip fails
/// the test), then parsed.
async fn scrape(controller: &Controller, token: &str) -> Metrics {
    let response = http_request(controller.addr(), Method::GET, "/metrics", Some(token))
        .await
        .expect("GET /metrics");
    assert_eq!(response.status, StatusCode::OK, "{}", response.text());
    let content_type = response.headers["content-type"].to_str().unwrap();
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    let text = response.text();
    assert_eq!(
        text.lines().last(),
        Some("# EOF"),
        "ends as OpenMetrics does"
    );
    for line in text.lines() {
        let ok = match LineInfo::parse(line) {
            LineInfo::Doc { .. } | LineInfo::Type { .. } => true,
            LineInfo::Sample { value, .. } => value.parse::<f64>().is_ok(),
            LineInfo::Empty => false,
            LineInfo::Ignored => line == "# EOF" || line.starts_with("# UNIT "),
        };
        assert!(ok, "not a Prometheus text line: {line:?}\nin\n{text}");
    }
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("parse");
    Metrics { scrape, text }
}

struct Metrics {
    scrape: Scrape,
    text: String,
}

impl Metrics {
    /// The value of the one sample named `name` whose labels include `labels`; 0 when
    /// there is none. (Counters may be untyped to the parser: OpenMetrics types the
    /// family, the sample ends in `_total`.)
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let matching: Vec<f64> = self
            .scrape
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match &s.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
                other => panic!("{name}: not a number: {other:?}"),
            })
            .collect();
        assert!(
            matching.len() <= 1,
            "{name} {labels:?}: {} samples\n{}",
            matching.len(),
            self.text
        );
        matching.first().copied().unwrap_or(0.0)
    }

    /// The sum over every sample named `name` whose labels include `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.scrape
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match &s.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
                other => panic!("{name}: not a number: {other:?}"),
            })
            .sum()
    }

    fn transitions(&self) -> BTreeMap<(String, String), f64> {
        self.scrape
            .samples
            .iter()
            .filter(|s| s.metric == "fleet_controller_node_transitions_total")
            .map(|s| {
                let v = match &s.value {
                    Value::Counter(v) | Value::Untyped(v) => *v,
                    other => panic!("transitions: {other:?}"),
                };
                (
                    (
                        s.labels.get("from").unwrap_or("").to_string(),
                        s.labels.get("to").unwrap_or("").to_string(),
                    ),
                    v,
                )
            })
            .collect()
    }
}

async fn create_token(controller: &Controller, args: &[&str]) -> String {
    let mut all = vec!["-o", "json", "token", "create"];
    all.extend_from_slice(args);
    let ctl = controller.fleetctl(&all).await;
    ctl.expect_code(0).json()["secret"]
        .as_str()
        .expect("a secret")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_after_a_rollout_a_restart_and_refused_heartbeats_count_what_happened() {
    let releases = tempfile::tempdir().unwrap();
    let v2 = agent_release(releases.path(), "fleet-agent-v2");
    let controller = Controller::start(ControllerOpts {
        token: Some(BOOTSTRAP.into()),
        ..ControllerOpts::default()
    })
    .await;
    let agents = controller
        .start_nodes(3, |_, opts| {
            opts.arg("--allowed-exe-dir").arg(releases.path())
        })
        .await;
    let viewer = create_token(&controller, &["--role", "viewer", "--name", "wall"]).await;
    let ci = create_token(&controller, &["--role", "operator", "--name", "ci"]).await;

    // Who may scrape: a viewer, not an anonymous caller.
    let anonymous = http_request(controller.addr(), Method::GET, "/metrics", None)
        .await
        .unwrap();
    assert_eq!(
        anonymous.status,
        StatusCode::UNAUTHORIZED,
        "{}",
        anonymous.text()
    );

    // A rollout that succeeds.
    let rollout = controller
        .fleetctl_with_token(
            Some(&ci),
            [
                "rollout".as_ref(),
                "--exe".as_ref(),
                v2.as_os_str(),
                "--min-healthy".as_ref(),
                "200ms".as_ref(),
            ],
        )
        .await;
    rollout.expect_code(0);

    // A manual restart by the operator token "ci": an audit line names it.
    let mark = controller.log_lines().len();
    controller
        .fleetctl_with_token(Some(&ci), ["restart", "node-1"])
        .await
        .expect_code(0);
    let audit = controller
        .wait_for_log_from(mark, "node.restart", WAIT)
        .await;
    assert!(audit.contains("actor=\"ci\""), "{audit}");
    assert!(audit.contains("node=\"node-1\""), "{audit}");
    assert!(audit.contains("OUTCOME_SUCCEEDED"), "{audit}");

    // Two refused heartbeats: one without a token, one without a node id.
    let status = agent_status(&agents[0]).await;
    let refused = controller
        .grpc_with_token(None)
        .heartbeat(pb::HeartbeatRequest {
            status: Some(status),
            ..Default::default()
        })
        .await
        .expect_err("a heartbeat without a token");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    let refused = controller
        .grpc()
        .heartbeat(pb::HeartbeatRequest {
            status: Some(pb::StatusResponse::default()),
            ..Default::default()
        })
        .await
        .expect_err("a heartbeat without a node id");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");

    // A shutdown: the node ends `stopped`.
    controller
        .fleetctl_with_token(Some(&ci), ["shutdown", "node-3"])
        .await
        .expect_code(0);
    controller
        .wait_nodes(&["node-3".to_string()], "stopped", WAIT)
        .await;
    agents[2].wait_exit(WAIT).await;

    // An event-stream client is counted while it is connected.
    let mut events = tokio::net::TcpStream::connect(controller.addr())
        .await
        .unwrap();
    events
        .write_all(
            format!(
                "GET /api/events HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer {viewer}\r\n\r\n",
                controller.addr()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut head = [0u8; 12];
    events.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200", "the event stream answers");

    let m = scrape(&controller, &viewer).await;
    let text = &m.text;
    assert_eq!(
        m.value(
            "fleet_controller_build_info",
            &[
                ("version", env!("CARGO_PKG_VERSION")),
                ("protocol", "fleet.v1")
            ]
        ),
        1.0,
        "{text}"
    );
    // Nodes and rollouts by state, as the API shows them.
    assert_eq!(
        m.value("fleet_controller_nodes", &[("state", "serving")]),
        2.0,
        "{text}"
    );
    assert_eq!(
        m.value("fleet_controller_nodes", &[("state", "stopped")]),
        1.0,
        "{text}"
    );
    assert_eq!(
        m.value("fleet_controller_nodes", &[("state", "unreachable")]),
        0.0,
        "{text}"
    );
    assert_eq!(
        m.value("fleet_controller_rollouts", &[("state", "succeeded")]),
        1.0,
        "{text}"
    );
    assert_eq!(m.sum("fleet_controller_rollouts", &[]), 1.0, "{text}");
    // Transitions: three nodes joined, one stopped, none went unreachable.
    let transitions = m.transitions();
    let joined: f64 = transitions
        .iter()
        .filter(|((from, _), _)| from == "new")
        .map(|(_, v)| v)
        .sum();
    assert_eq!(joined, 3.0, "{transitions:?}");
    let stopped: f64 = transitions
        .iter()
        .filter(|((_, to), _)| to == "stopped")
        .map(|(_, v)| v)
        .sum();
    assert_eq!(stopped, 1.0, "{transitions:?}");
    assert!(
        !transitions.keys().any(|(_, to)| to == "unreachable"),
        "{transitions:?}"
    );
    // Heartbeats: every agent's accepted, the two refused ones by reason.
    assert!(
        m.value(
            "fleet_controller_heartbeats_total",
            &[("result", "accepted")]
        ) >= 3.0,
        "{text}"
    );
    assert_eq!(
        m.value(
            "fleet_controller_heartbeats_total",
            &[("result", "refused"), ("reason", "unauthenticated")]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        m.value(
            "fleet_controller_heartbeats_total",
            &[("result", "refused"), ("reason", "invalid")]
        ),
        1.0,
        "{text}"
    );
    // API latency, by route: one StartRollout, one RestartNode, one ShutdownNode.
    for route in ["StartRollout", "RestartNode", "ShutdownNode"] {
        assert_eq!(
            m.value(
                "fleet_controller_api_request_duration_seconds_count",
                &[("route", route), ("code", "2xx")]
            ),
            1.0,
            "{route}\n{text}"
        );
    }
    assert!(
        m.value("fleet_controller_store_write_duration_seconds_count", &[]) >= 1.0,
        "{text}"
    );
    assert_eq!(m.value("fleet_controller_sse_clients", &[]), 1.0, "{text}");
    // Every call to an agent went on its heartbeat stream (agents of this build take
    // commands there): three preflights and three restarts of the rollout, the manual
    // restart, the shutdown; no connection to a control address.
    for (call, count) in [("Preflight", 3.0), ("Restart", 4.0), ("Shutdown", 1.0)] {
        assert_eq!(
            m.value(
                "fleet_controller_agent_calls_total",
                &[("call", call), ("via", "stream")]
            ),
            count,
            "{call}\n{text}"
        );
    }
    assert_eq!(
        m.sum("fleet_controller_agent_calls_total", &[("via", "dial")]),
        0.0,
        "{text}"
    );

    // The client goes away: the gauge follows.
    drop(events);
    eventually(
        WAIT,
        "the event-stream client is no longer counted",
        async || match scrape(&controller, &viewer)
            .await
            .value("fleet_controller_sse_clients", &[])
        {
            0.0 => Ok(()),
            n => Err(format!("sse_clients {n}")),
        },
    )
    .await;

    // Audit lines for the rollout's start and end, and the tokens, with their actors.
    let log = controller.log_lines().join("\n");
    for needle in [
        "event=\"rollout.started\" actor=\"ci\"",
        "event=\"rollout.finished\" actor=\"controller\"",
        "event=\"token.created\" actor=\"bootstrap\"",
        "event=\"node.shutdown\" actor=\"ci\"",
        "event=\"node.joined\" actor=\"agent\"",
    ] {
        assert!(log.contains(needle), "no {needle:?} in the log:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_are_404_and_unknown_grpc_methods_unimplemented() {
    let controller = Controller::start(ControllerOpts {
        token: Some(BOOTSTRAP.into()),
        ..ControllerOpts::default()
    })
    .await;
    for path in [
        "/nope",
        "/assets/nope.js",
        "/metrics/x",
        "/api/nodes/a/b",
        "/nodes/web-1/nonsense",
    ] {
        for method in [Method::GET, Method::POST] {
            for token in [None, Some(BOOTSTRAP)] {
                let r = http_request(controller.addr(), method.clone(), path, token)
                    .await
                    .unwrap();
                assert_eq!(
                    r.status,
                    StatusCode::NOT_FOUND,
                    "{method} {path} (token: {}): {}",
                    token.is_some(),
                    r.text()
                );
                assert!(
                    r.text().contains(path),
                    "{method} {path}: the body names the path: {:?}",
                    r.text()
                );
                assert!(
                    r.headers["content-type"]
                        .to_str()
                        .unwrap()
                        .starts_with("text/plain"),
                    "{method} {path}: {:?}",
                    r.headers
                );
            }
        }
    }
    // gRPC keeps answering as gRPC: UNIMPLEMENTED, on a path that is no method and on
    // one that the table of roles lets through.
    for path in ["/fleet.v1.ControllerService/Nope", "/assets/nope.js"] {
        let r = http_send(
            controller.addr(),
            Method::POST,
            path,
            &[
                ("content-type", "application/grpc".into()),
                ("authorization", format!("Bearer {BOOTSTRAP}")),
            ],
            bytes::Bytes::new(),
        )
        .await
        .unwrap();
        assert_eq!(r.headers["grpc-status"], "12", "{path}: {:?}", r.headers);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleetctl_version_shows_the_client_and_the_controller() {
    let controller = Controller::start(ControllerOpts {
        token: Some(BOOTSTRAP.into()),
        ..ControllerOpts::default()
    })
    .await;
    let version = env!("CARGO_PKG_VERSION");
    for args in [&["version"][..], &["--version"][..]] {
        let ctl = controller.fleetctl(args).await;
        ctl.expect_code(0);
        let client = format!("client:     fleetctl {version} (fleet.v1");
        let server = format!("controller: fleet-controller {version} (fleet.v1");
        assert!(ctl.stdout.contains(&client), "{args:?}: {}", ctl.output());
        assert!(ctl.stdout.contains(&server), "{args:?}: {}", ctl.output());
    }
    let json = controller.fleetctl(["-o", "json", "version"]).await;
    let json = json.expect_code(0).json();
    assert_eq!(json["client"]["version"], version, "{json}");
    assert_eq!(json["controller"]["version"], version, "{json}");
    assert_eq!(json["controller"]["protocol"], "fleet.v1", "{json}");
    // A viewer may ask; no token may not (and says so, after the client's version).
    let anonymous = controller.fleetctl_with_token(None, ["version"]).await;
    anonymous.expect_code(2);
    assert!(
        anonymous.stdout.contains("fleetctl 0"),
        "{}",
        anonymous.output()
    );
    assert!(
        anonymous.stderr.contains("version is unknown"),
        "{}",
        anonymous.output()
    );

    // A controller that is gone: the client's version, why the other is missing, exit 1.
    let addr = controller.addr();
    controller.kill();
    let gone = Command::new(binary("fleetctl"))
        .args(["--controller", &format!("http://{addr}"), "--version"])
        .env_remove("FLEET_TOKEN")
        .output()
        .expect("run fleetctl");
    let stdout = String::from_utf8_lossy(&gone.stdout);
    let stderr = String::from_utf8_lossy(&gone.stderr);
    assert_eq!(gone.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stdout.contains(&format!("fleetctl {version}")), "{stdout}");
    assert!(stderr.contains("cannot reach the controller"), "{stderr}");
}

/// A controller of our own with `--log-format json` (the harness reads text lines):
/// killed on drop.
struct JsonController {
    child: Child,
    lines: mpsc::Receiver<String>,
    _dir: tempfile::TempDir,
}

impl Drop for JsonController {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl JsonController {
    fn start() -> (JsonController, SocketAddr, Vec<serde_json::Value>) {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(binary("fleet-controller"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--heartbeat-ttl",
                "2s",
                "--log-format",
                "json",
            ])
            .arg("--db")
            .arg(dir.path().join("fleet.db"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn fleet-controller");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[controller] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut controller = JsonController {
            child,
            lines,
            _dir: dir,
        };
        let seen = controller.wait_json(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("controller listening on "))
        });
        let message = seen.last().unwrap()["message"]
            .as_str()
            .unwrap()
            .to_string();
        let addr = message["controller listening on ".len()..].parse().unwrap();
        (controller, addr, seen)
    }

    /// Every line until one matches `want`, each parsed as a JSON object (one that is
    /// not fails the test).
    fn wait_json(&mut self, want: impl Fn(&serde_json::Value) -> bool) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + WAIT;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no such line within {WAIT:?}; saw {seen:#?}"));
            let value: serde_json::Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}"));
            assert!(value.is_object(), "{line}");
            for key in ["timestamp", "level", "target", "message"] {
                assert!(value.get(key).is_some(), "no {key:?} in {line}");
            }
            let found = want(&value);
            seen.push(value);
            if found {
                return seen;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_format_json_writes_one_object_per_line_on_the_controller_and_the_agent() {
    let (mut controller, addr, _) = JsonController::start();
    // Spawned, not started: the harness parses text lines for the ports, and this
    // test needs none of them.
    let agent = Agent::spawn(
        AgentOpts {
            control: Some("127.0.0.1:0".into()),
            listen: vec!["127.0.0.1:0".into()],
            ..AgentOpts::default()
        }
        .arg("--node-id")
        .arg("json-1")
        .arg("--controller")
        .arg(format!("http://{addr}"))
        .arg("--log-format")
        .arg("json"),
    );
    agent
        .wait_for_log("control endpoint listening on", WAIT)
        .await;
    // The controller's audit line of the node joining, as JSON with its fields.
    let seen = controller.wait_json(|v| v["event"] == "node.joined");
    let joined = seen.last().unwrap();
    assert_eq!(joined["target"], "fleet::audit", "{joined}");
    assert_eq!(joined["actor"], "agent", "{joined}");
    assert_eq!(joined["node"], "json-1", "{joined}");

    // A manual restart through the controller: its audit line carries the actor (an
    // open controller's caller is `local`) and the outcome.
    let restart = Command::new(binary("fleetctl"))
        .args([
            "--controller",
            &format!("http://{addr}"),
            "restart",
            "json-1",
        ])
        .env_remove("FLEET_TOKEN")
        .output()
        .expect("run fleetctl");
    assert!(restart.status.success(), "{restart:?}");
    let seen = controller.wait_json(|v| v["event"] == "node.restart");
    let line = seen.last().unwrap();
    assert_eq!(line["actor"], "local", "{line}");
    assert_eq!(line["node"], "json-1", "{line}");
    assert!(
        line["outcome"]
            .as_str()
            .unwrap()
            .contains("OUTCOME_SUCCEEDED"),
        "{line}"
    );

    // The agent: every line it (and its workers) wrote is one JSON object naming the
    // process that wrote it.
    // A worker logs an ignored stray signal: its line too.
    let restarted = agent.wait_for_log("restart succeeded", WAIT).await;
    let worker: u32 = restarted
        .split("gen 2 pid ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no worker pid in {restarted}"));
    let kill = Command::new("kill")
        .args(["-USR2", &worker.to_string()])
        .status()
        .expect("run kill");
    assert!(kill.success());
    agent.wait_for_log("\"process\":\"worker\"", WAIT).await;
    let lines = agent.log_lines();
    assert!(!lines.is_empty());
    let mut processes = std::collections::BTreeSet::new();
    for line in &lines {
        let value: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("agent line not JSON ({e}): {line:?}"));
        for key in ["timestamp", "level", "message", "process", "pid"] {
            assert!(value.get(key).is_some(), "no {key:?} in {line}");
        }
        processes.insert(value["process"].as_str().unwrap().to_string());
    }
    assert!(processes.contains("supervisor"), "{processes:?}");
    assert!(processes.contains("worker"), "{processes:?}");

    // The same from the agent's configuration file, without the flag.
    let from_file = Agent::spawn(AgentOpts {
        control: Some("127.0.0.1:0".into()),
        listen: vec!["127.0.0.1:0".into()],
        config: Some("log_format = \"json\"\n".into()),
        ..AgentOpts::default()
    });
    let line = from_file
        .wait_for_log("control endpoint listening on", WAIT)
        .await;
    let value: serde_json::Value = serde_json::from_str(&line)
        .unwrap_or_else(|e| panic!("log_format = \"json\" in the file: not JSON ({e}): {line:?}"));
    assert_eq!(value["process"], "supervisor", "{line}");
}

/// A restart the controller asks for on a node's heartbeat stream is reported by the
/// status its answer carries: the node shows its new generation as soon as the restart
/// returns, though its next beat is minutes away (a 10-minute TTL: a beat every 200
/// s), and the agent sends no beat of its own for the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_on_the_stream_is_reported_by_its_answers_status_not_by_a_beat() {
    let controller = Controller::start(ControllerOpts {
        token: Some(BOOTSTRAP.into()),
        heartbeat_ttl: "10m".into(),
        ..ControllerOpts::default()
    })
    .await;
    let _agents = controller.start_nodes(1, |_, opts| opts).await;
    let node = |id: &str| {
        let mut grpc = controller.grpc();
        let id = id.to_string();
        async move {
            grpc.get_node(pb::GetNodeRequest { node_id: id })
                .await
                .expect("GetNode")
                .into_inner()
        }
    };
    eventually(
        WAIT,
        "node-1 takes calls on its heartbeat stream",
        async || {
            let n = node("node-1").await;
            if n.calls_on_stream {
                Ok(())
            } else {
                Err(format!("{n:?}"))
            }
        },
    )
    .await;
    let generation = node("node-1").await.generation;
    let accepted = |m: &Metrics| {
        m.value(
            "fleet_controller_heartbeats_total",
            &[("result", "accepted")],
        )
    };
    let with_answers = |m: &Metrics| m.value("fleet_controller_answer_statuses_total", &[]);
    let before = scrape(&controller, BOOTSTRAP).await;

    controller
        .fleetctl(["restart", "node-1"])
        .await
        .expect_code(0);
    eventually(
        Duration::from_secs(5),
        "the controller shows node-1's new generation",
        async || {
            let n = node("node-1").await;
            if n.generation == generation + 1 {
                Ok(())
            } else {
                Err(format!("{n:?}"))
            }
        },
    )
    .await;

    let after = scrape(&controller, BOOTSTRAP).await;
    let statuses = with_answers(&after) - with_answers(&before);
    assert!(statuses >= 1.0, "{}", after.text);
    assert_eq!(
        accepted(&after) - accepted(&before),
        statuses,
        "every status the controller took since came with an answer: no beat of its own\n{}",
        after.text
    );
}

/// At its connection cap the controller closes the connection idle the longest to let a
/// new one in: `/metrics` counts it by reason beside the connections open, so an
/// operator sees an undersized `--max-connections` (or descriptor limit) before the
/// agents' reconnects pile up. Only the scrape's own connection ever sends a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_closed_at_the_cap_are_counted_by_reason() {
    let controller = Controller::start(ControllerOpts {
        token: Some(BOOTSTRAP.into()),
        args: vec!["--max-connections".into(), "16".into()],
        ..ControllerOpts::default()
    })
    .await;
    let before = scrape(&controller, BOOTSTRAP).await;
    assert_eq!(
        before.value(
            "fleet_controller_connections_closed_total",
            &[("reason", "evicted")]
        ),
        0.0,
        "{}",
        before.text
    );
    // Twenty connections that never send a request: the cap is 16, so each past it
    // closes an older one.
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(
            tokio::net::TcpStream::connect(controller.addr())
                .await
                .expect("connect"),
        );
    }
    let after = scrape(&controller, BOOTSTRAP).await;
    let evicted = after.value(
        "fleet_controller_connections_closed_total",
        &[("reason", "evicted")],
    );
    assert!(evicted >= 5.0, "evicted {evicted}\n{}", after.text);
    let open = after.value("fleet_controller_connections", &[]);
    assert!((1.0..=17.0).contains(&open), "open {open}\n{}", after.text);
    // The first of them was one of those closed: it reads the end of the stream.
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(WAIT, idle[0].read(&mut buf))
        .await
        .expect("the oldest idle connection is closed");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}
