//! High availability: three controllers on a three-member etcd cluster (real `etcd`
//! processes on loopback), real agents. One controller leads; killing it mid-rollout
//! hands the rollout to another, which finishes it without restarting any node twice;
//! a leader stopped (`SIGSTOP`) past its lease is replaced and, woken, changes nothing
//! and comes back as a follower; `fleetctl` works against any controller, and so does
//! the dashboard in headless Chromium (a follower's action pages are the leader's).

use std::ffi::{OsStr, OsString};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_proto::v1::StatusResponse;
use fleet_tests::etcd::EtcdCluster;
use fleet_tests::fleet::{
    Controller, ControllerOpts, Ctl, TestStore, agent_release, agent_status, describe, node_id,
    restarted_exactly_once, rollout_node,
};
use fleet_tests::harness::send_signal;
use fleet_tests::{Agent, AgentOpts, Load, LoadOptions, LoadSpec, ZeroLoss};
use nix::sys::signal::Signal;

/// The lease TTL the controllers run with: a dead leader is replaced within it.
const LEASE_TTL: &str = "2s";
const ELECTED: &str = "elected leader";

/// Three controllers sharing `etcd` (one key prefix for the three).
struct Group {
    controllers: Vec<Controller>,
}

impl Group {
    async fn start(etcd: &Arc<EtcdCluster>, n: usize) -> Group {
        let prefix = format!("/fleet-ha-{}/", std::process::id());
        let mut controllers = Vec::new();
        for _ in 0..n {
            let opts = ControllerOpts {
                args: ["--lease-ttl", LEASE_TTL].map(OsString::from).to_vec(),
                store: TestStore::Shared(etcd.clone(), prefix.clone()),
                ..ControllerOpts::default()
            };
            controllers.push(Controller::start(opts).await);
        }
        Group { controllers }
    }

    /// Every controller's URL, comma-separated (`--controller`).
    fn urls(&self) -> String {
        self.controllers
            .iter()
            .map(|c| c.url())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The controller that logged its election after line `marks[i]` of each log.
    async fn leader_since(&self, marks: &[usize], skip: Option<usize>) -> usize {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            for (i, c) in self.controllers.iter().enumerate() {
                if Some(i) == skip {
                    continue;
                }
                if c.log_lines()
                    .iter()
                    .skip(marks[i])
                    .any(|l| l.contains(ELECTED))
                {
                    return i;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no controller was elected within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn leader(&self) -> usize {
        self.leader_since(&vec![0; self.controllers.len()], None)
            .await
    }

    fn marks(&self) -> Vec<usize> {
        self.controllers
            .iter()
            .map(|c| c.log_lines().len())
            .collect()
    }

    /// `fleetctl --controller URLS ARGS` (through controller `via`'s harness).
    async fn fleetctl(&self, urls: &str, args: &[&OsStr]) -> Ctl {
        let mut all: Vec<&OsStr> = vec!["--controller".as_ref(), urls.as_ref()];
        all.extend_from_slice(args);
        self.controllers[0].fleetctl(all).await
    }

    /// Agents `node-1..node-n` heartbeating to every controller's URL.
    async fn start_nodes(&self, n: usize, releases: &Path) -> Vec<Agent> {
        let mut starting = tokio::task::JoinSet::new();
        for i in 0..n {
            let opts = AgentOpts::default()
                .arg("--controller")
                .arg(self.urls())
                .arg("--node-id")
                .arg(node_id(i))
                .arg("--allowed-exe-dir")
                .arg(releases);
            starting.spawn(async move { (i, Agent::start(opts).await) });
        }
        let mut agents = starting.join_all().await;
        agents.sort_by_key(|(i, _)| *i);
        let leader = self.leader().await;
        let ids: Vec<String> = (0..n).map(node_id).collect();
        self.controllers[leader]
            .wait_nodes(&ids, "serving", Duration::from_secs(30))
            .await;
        agents.into_iter().map(|(_, a)| a).collect()
    }
}

async fn statuses(agents: &[Agent]) -> Vec<StatusResponse> {
    let mut out = Vec::new();
    for agent in agents {
        out.push(agent_status(agent).await);
    }
    out
}

async fn start_rollout(group: &Group, exe: &Path, soak: &str) -> String {
    let ctl = group
        .fleetctl(
            &group.urls(),
            &[
                "rollout".as_ref(),
                "--exe".as_ref(),
                exe.as_os_str(),
                "--max-parallel".as_ref(),
                "1".as_ref(),
                "--min-healthy".as_ref(),
                soak.as_ref(),
                "--detach".as_ref(),
                "-o".as_ref(),
                "json".as_ref(),
            ],
        )
        .await;
    ctl.expect_code(0).json()["id"]
        .as_str()
        .expect("the rollout's id")
        .to_string()
}

fn healthy(r: &fleet_proto::v1::Rollout) -> usize {
    r.nodes.iter().filter(|n| n.state == "healthy").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_killed_mid_rollout_is_replaced_and_the_rollout_finishes_restarting_each_node_once()
 {
    let etcd = Arc::new(EtcdCluster::start(3).await);
    let group = Group::start(&etcd, 3).await;
    let releases = tempfile::tempdir().unwrap();
    let v2 = agent_release(releases.path(), "fleet-agent-v2");
    let agents = group.start_nodes(5, releases.path()).await;
    let before = statuses(&agents).await;
    let loads: Vec<Load> = agents
        .iter()
        .map(|agent| {
            Load::start_with(
                LoadSpec {
                    target: agent.app(),
                    path: "/".into(),
                    keepalive_connections: 1,
                    fresh_connections: 1,
                    max_requests: 2_000_000,
                    max_duration: Duration::from_secs(90),
                    ..Default::default()
                },
                LoadOptions {
                    request_timeout: Duration::from_secs(10),
                    ..LoadOptions::default()
                },
            )
        })
        .collect();
    for load in &loads {
        load.wait_progress(20, Duration::from_secs(20)).await;
    }

    let leader = group.leader().await;
    let id = start_rollout(&group, &v2, "1s").await;
    let reader = (leader + 1) % 3;
    let mid = group.controllers[reader]
        .wait_rollout(&id, "two nodes healthy", Duration::from_secs(60), |r| {
            healthy(r) >= 2
        })
        .await;
    let marks = group.marks();
    group.controllers[leader].kill();
    eprintln!(
        "killed the leader (controller {leader}) at: {}",
        describe(&mid)
    );
    let successor = group.leader_since(&marks, Some(leader)).await;
    eprintln!("controller {successor} took over");

    let watched = group
        .fleetctl(
            &group.urls(),
            &[
                "rollout".as_ref(),
                "status".as_ref(),
                id.as_ref(),
                "--watch".as_ref(),
            ],
        )
        .await;
    watched.expect_code(0);
    for load in &loads {
        load.wait_progress(100, Duration::from_secs(20)).await;
    }
    for (i, load) in loads.into_iter().enumerate() {
        let report = load.finish().await;
        eprintln!("load on {}:", node_id(i));
        report.assert_zero_loss(&ZeroLoss {
            min_requests: 100,
            spans: Vec::new(),
            min_in_span: 0,
            max_latency: Duration::from_secs(1),
        });
    }
    let done = group.controllers[successor].rollout(&id).await;
    assert_eq!(done.state, "succeeded", "{}", describe(&done));
    restarted_exactly_once(&agents, &before, &v2).await;
    // The takeover is in the timeline of the nodes it found unfinished.
    let noted = done.nodes.iter().any(|n| {
        n.timeline.iter().any(|t| {
            t.message.contains("leader change") && t.message.contains("took the rollout over")
        })
    });
    assert!(noted, "no takeover in the timeline: {done:#?}");
    let status = group
        .fleetctl(
            &group.urls(),
            &["rollout".as_ref(), "status".as_ref(), id.as_ref()],
        )
        .await;
    assert!(
        status.expect_code(0).stdout.contains("leader change"),
        "{}",
        status.stdout
    );
    let node = rollout_node(&done, &node_id(4));
    assert_eq!(node.state, "healthy", "{node:?}");

    // The third controller followed all of it from etcd's events, key by key: it shows
    // every node as the leader does.
    let third = (0..3)
        .find(|&i| i != leader && i != successor)
        .expect("a third controller");
    let states = |r: &fleet_proto::v1::Rollout| {
        r.nodes
            .iter()
            .map(|n| (n.node_id.clone(), n.state.clone(), n.timeline.len()))
            .collect::<Vec<_>>()
    };
    let leaders = states(&done);
    group.controllers[third]
        .wait_rollout(
            &id,
            "every node as the leader has it",
            Duration::from_secs(10),
            |r| r.state == "succeeded" && states(r) == leaders,
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stopped_past_its_lease_is_fenced_off_and_comes_back_as_a_follower() {
    let etcd = Arc::new(EtcdCluster::start(3).await);
    let group = Group::start(&etcd, 3).await;
    let releases = tempfile::tempdir().unwrap();
    let v2 = agent_release(releases.path(), "fleet-agent-v2");
    let agents = group.start_nodes(3, releases.path()).await;
    let before = statuses(&agents).await;

    let leader = group.leader().await;
    let old = &group.controllers[leader];
    let pid = old.pid();
    let id = start_rollout(&group, &v2, "2s").await;
    let reader = (leader + 1) % 3;
    group.controllers[reader]
        .wait_rollout(
            &id,
            "the first node soaking",
            Duration::from_secs(30),
            |r| r.nodes.iter().any(|n| n.state == "soaking"),
        )
        .await;
    let marks = group.marks();
    send_signal(pid, Signal::SIGSTOP);
    let successor = group.leader_since(&marks, Some(leader)).await;
    eprintln!("controller {successor} took over from the stopped controller {leader}");
    // Let the new leader move the rollout on while the old one sleeps, then wake it.
    group.controllers[successor]
        .wait_rollout(&id, "one more node healthy", Duration::from_secs(30), |r| {
            healthy(r) >= 2
        })
        .await;
    send_signal(pid, Signal::SIGCONT);
    old.wait_for_log_from(
        marks[leader],
        "lost the leadership",
        Duration::from_secs(10),
    )
    .await;
    // Same process, back as a follower that knows who leads.
    let back = old
        .wait_for_log_from(marks[leader], "the leader is ", Duration::from_secs(20))
        .await;
    assert!(back.contains(&group.controllers[successor].url()), "{back}");
    assert_eq!(old.pid(), pid);

    let done = group.controllers[successor]
        .wait_rollout_end(&id, Duration::from_secs(60))
        .await;
    assert_eq!(done.state, "succeeded", "{}", describe(&done));
    restarted_exactly_once(&agents, &before, &v2).await;

    // The follower serves reads, and refuses changes naming the leader.
    let follower_url = old.url();
    let nodes = group.fleetctl(&follower_url, &["nodes".as_ref()]).await;
    assert!(
        nodes.expect_code(0).stdout.contains("node-1"),
        "{}",
        nodes.stdout
    );
    let mut client = old.grpc();
    let refused = client
        .restart_node(fleet_proto::v1::RestartNodeRequest {
            node_id: node_id(0),
            ..Default::default()
        })
        .await
        .expect_err("a follower refuses a restart");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert_eq!(
        refused
            .metadata()
            .get(fleet_proto::ha::LEADER_METADATA)
            .and_then(|v| v.to_str().ok()),
        Some(group.controllers[successor].url().as_str()),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleetctl_works_against_a_follower_and_falls_over_when_the_leader_is_down() {
    let etcd = Arc::new(EtcdCluster::start(3).await);
    let group = Group::start(&etcd, 3).await;
    let releases = tempfile::tempdir().unwrap();
    let agents = group.start_nodes(2, releases.path()).await;
    let before = statuses(&agents).await;
    let leader = group.leader().await;
    let follower = (leader + 1) % 3;
    let follower_url = group.controllers[follower].url();

    // Reads answered by the follower itself, from etcd (once its watch saw the
    // leader's writes: a follower lags the leader by a write and a reload).
    group.controllers[follower]
        .wait_nodes(
            &[node_id(0), node_id(1)],
            "serving",
            Duration::from_secs(10),
        )
        .await;
    let listed = group.fleetctl(&follower_url, &["nodes".as_ref()]).await;
    assert!(
        listed.expect_code(0).stdout.contains("node-2"),
        "{}",
        listed.stdout
    );
    // A change sent to the follower is carried out by the leader.
    let restarted = group
        .fleetctl(&follower_url, &["restart".as_ref(), "node-1".as_ref()])
        .await;
    restarted.expect_code(0);
    let status = agent_status(&agents[0]).await;
    assert_eq!(status.generation, before[0].generation + 1, "{status:?}");

    // A dashboard form posted to the follower (here by a page with no session at all)
    // changes nothing there: it is sent on to the same action on the leader, which
    // checks the caller and its CSRF token itself.
    let form = fleet_tests::harness::http_send(
        group.controllers[follower].addr(),
        http::Method::POST,
        "/nodes/node-1/restart",
        &[("content-type", "application/x-www-form-urlencoded".into())],
        "csrf=forged",
    )
    .await
    .expect("the follower answers");
    assert_eq!(form.status, 307, "{}", form.text());
    assert_eq!(
        form.headers["location"].to_str().unwrap(),
        format!("{}/nodes/node-1/restart", group.controllers[leader].url())
    );
    let unchanged = agent_status(&agents[0]).await;
    assert_eq!(unchanged.generation, status.generation, "{unchanged:?}");

    // An agent goes quiet: the leader writes it unreachable once, so the follower,
    // which hears no heartbeats, shows it so too; woken, it is serving on both again.
    send_signal(agents[1].pid(), Signal::SIGSTOP);
    group.controllers[follower]
        .wait_nodes(&[node_id(1)], "unreachable", Duration::from_secs(15))
        .await;
    let listed = group.fleetctl(&follower_url, &["nodes".as_ref()]).await;
    let row = listed
        .expect_code(0)
        .stdout
        .lines()
        .find(|l| l.contains("node-2"))
        .unwrap_or_default()
        .to_string();
    assert!(row.contains("unreachable"), "{}", listed.stdout);
    send_signal(agents[1].pid(), Signal::SIGCONT);
    group.controllers[follower]
        .wait_nodes(&[node_id(1)], "serving", Duration::from_secs(15))
        .await;

    // The leader down: the first URL is dead, the next ones answer; no error.
    let leader_url = group.controllers[leader].url();
    group.controllers[leader].kill();
    let others: Vec<String> = (0..3)
        .filter(|&i| i != leader)
        .map(|i| group.controllers[i].url())
        .collect();
    let urls = format!("{leader_url},{}", others.join(","));
    let listed = group.fleetctl(&urls, &["nodes".as_ref()]).await;
    listed.expect_code(0);
    assert!(listed.stderr.is_empty(), "{}", listed.stderr);
}

/// A browser on a follower's dashboard: it shows the fleet and its role there; the
/// Restart link of a node leads to the leader's own confirmation page (a form posted
/// from the follower's page would cross origins, which the session, the CSRF check
/// and `form-action 'self'` refuse), and confirming there restarts the node once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_of_a_follower_shows_the_fleet_and_its_actions_are_made_on_the_leader() {
    const WAIT: Duration = Duration::from_secs(30);
    let etcd = Arc::new(EtcdCluster::start(3).await);
    let group = Group::start(&etcd, 2).await;
    let releases = tempfile::tempdir().unwrap();
    let agents = group.start_nodes(2, releases.path()).await;
    let before = agent_status(&agents[0]).await;
    let leader = group.leader().await;
    let follower = 1 - leader;
    let (leader_url, follower_url) = (
        group.controllers[leader].url(),
        group.controllers[follower].url(),
    );
    group.controllers[follower]
        .wait_nodes(&[node_id(0), node_id(1)], "serving", WAIT)
        .await;

    let browser = fleet_tests::browser::Browser::start(1280, 900).await;
    browser.goto(&format!("{follower_url}/")).await;
    browser.wait_for("tr#node-node-1", WAIT).await;
    let role = browser.text_of("#ha-role").await;
    assert!(
        role.contains("follower") && role.contains(&leader_url),
        "{role}"
    );
    browser
        .click_on("tr#node-node-1 td.actions a[href$='/node-1/restart']", WAIT)
        .await;
    browser.wait_for("button#confirm", WAIT).await;
    let at = browser.url().await;
    assert!(
        at.starts_with(&format!("{leader_url}/nodes/node-1/restart")),
        "the confirmation page is {at}, not the leader's"
    );
    browser.click_on("button#confirm", WAIT).await;
    let outcome = browser.wait_for("h1#outcome", WAIT).await;
    assert_eq!(
        browser.attr(&outcome, "data-outcome").await.as_deref(),
        Some("succeeded"),
        "{}",
        browser.text_of("main").await
    );
    browser
        .screenshot("controller-ha-follower-restart.png")
        .await;
    let after = agent_status(&agents[0]).await;
    assert_eq!(after.generation, before.generation + 1, "{after:?}");
    assert_eq!(
        agent_status(&agents[1]).await.generation,
        1,
        "node-2 was not touched"
    );
}

/// How many nodes of the rollout are healthy, as the controller `c` shows it.
async fn healthy_on(c: &Controller, id: &str) -> usize {
    healthy(&c.rollout(id).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_etcd_member_down_the_rollout_goes_on_two_down_nothing_changes_one_back_it_finishes() {
    let etcd = Arc::new(EtcdCluster::start(3).await);
    let group = Group::start(&etcd, 3).await;
    let releases = tempfile::tempdir().unwrap();
    let v2 = agent_release(releases.path(), "fleet-agent-v2");
    let agents = group.start_nodes(4, releases.path()).await;
    let before = statuses(&agents).await;
    let id = start_rollout(&group, &v2, "1s").await;
    let leader = group.leader().await;
    let reader = (leader + 1) % 3;

    // One member of three gone: a quorum is left, the rollout goes on.
    let first = group.controllers[reader]
        .wait_rollout(&id, "one node healthy", Duration::from_secs(30), |r| {
            healthy(r) >= 1
        })
        .await;
    let (a, b) = match etcd.leader().await {
        // Kill the others first: the leader last (a harder case would be fine too).
        0 => (1, 2),
        1 => (0, 2),
        _ => (0, 1),
    };
    etcd.kill(a);
    eprintln!("killed etcd member {a} at: {}", describe(&first));
    group.controllers[reader]
        .wait_rollout(&id, "one more node healthy", Duration::from_secs(30), |r| {
            healthy(r) > healthy(&first)
        })
        .await;

    // Two of three gone: no quorum. Every controller says so and changes nothing.
    let marks = group.marks();
    etcd.kill(b);
    eprintln!("killed etcd member {b}: no quorum");
    // Every controller sees the members gone (GetControllers asks each member).
    for c in &group.controllers {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let group = c
                .grpc()
                .get_controllers(fleet_proto::v1::GetControllersRequest {})
                .await
                .expect("GetControllers")
                .into_inner();
            if !group.quorum {
                break;
            }
            assert!(Instant::now() < deadline, "{} still sees a quorum", c.url());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // The leader gave its leadership up when its lease could not be renewed; no
    // other can be elected without a quorum: from then on no controller calls an agent.
    group.controllers[leader]
        .wait_for_log_from(
            marks[leader],
            "lost the leadership",
            Duration::from_secs(20),
        )
        .await;
    let stopped_at = healthy_on(&group.controllers[reader], &id).await;
    let generations: Vec<u64> = statuses(&agents)
        .await
        .iter()
        .map(|s| s.generation)
        .collect();
    let listed = group
        .fleetctl(
            &group.urls(),
            &["controllers".as_ref(), "-o".as_ref(), "json".as_ref()],
        )
        .await;
    let json = listed.expect_code(1).json();
    assert_eq!(json["quorum"], false, "{json}");
    assert!(
        json["controllers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["leader"] == false),
        "a leader without a quorum: {json}"
    );
    // Reads are answered, and say they may be stale once the controller has found
    // no quorum for a lease TTL (a member dying fails a call or two: no alarm for that).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let nodes = group.fleetctl(&group.urls(), &["nodes".as_ref()]).await;
        nodes.expect_code(0);
        assert!(nodes.stdout.contains("node-1"), "{}", nodes.stdout);
        if nodes.stderr.contains("quorum") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the read does not say it may be stale: {}",
            nodes.stderr
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let refused = group
        .fleetctl(&group.urls(), &["restart".as_ref(), "node-1".as_ref()])
        .await;
    refused.expect_code(1);
    assert!(refused.stderr.contains("quorum"), "{}", refused.stderr);
    let still: Vec<u64> = statuses(&agents)
        .await
        .iter()
        .map(|s| s.generation)
        .collect();
    assert_eq!(generations, still, "a node was restarted without a quorum");

    // With one member down the rollout went on; no node was restarted twice.
    assert!(stopped_at >= 2, "{stopped_at} node(s) healthy");
    for (i, (now, then)) in still.iter().zip(&before).enumerate() {
        assert!(
            *now <= then.generation + 1,
            "{} restarted twice",
            node_id(i)
        );
    }

    // A member back: a quorum again, a leader, and the rollout finishes where it
    // stopped, each node restarted once.
    etcd.restart(b).await;
    let done = group.controllers[reader]
        .wait_rollout_end(&id, Duration::from_secs(60))
        .await;
    assert_eq!(done.state, "succeeded", "{}", describe(&done));
    restarted_exactly_once(&agents, &before, &v2).await;
}
