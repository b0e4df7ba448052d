//! Prometheus metrics of the controller, served on `GET /metrics` (viewer role; open on
//! a controller without `--token-file`, as every route is).
//!
//! Counters and histograms are recorded where things happen (heartbeats, node state
//! changes, API calls, store commits, event-stream clients); the gauges of nodes and
//! rollouts by state are counted from the inventory and the rollouts at each scrape,
//! so they cannot drift from what the API shows. One set per process: a process runs
//! one controller, and the store's writer thread and the inventory record into it
//! without a handle threaded through them.

use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::Fleet;
use crate::rollout::RolloutState;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionLabels {
    pub from: String,
    pub to: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HeartbeatLabels {
    /// `accepted` or `refused`.
    pub result: &'static str,
    /// Why a refused heartbeat was refused (`invalid`, `full`, `certificate`,
    /// `unauthenticated`, `forbidden`); empty for an accepted one.
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AgentCallLabels {
    /// `Restart`, `Preflight`, `Status`, `Shutdown`.
    pub call: &'static str,
    /// `stream`: on the agent's heartbeat stream; `dial`: a connection to its control
    /// address.
    pub via: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// The route's name in the table of roles (`StartRollout`, `GET /api/nodes`), so
    /// a path with an id in it is one series, and a request for a path the controller
    /// does not serve is `unknown`.
    pub route: &'static str,
    /// The HTTP status class (`2xx`, `4xx`) or, for gRPC, the status code name.
    pub code: String,
}

/// Every node state a scrape reports even when no node is in it, so a rate or an
/// alert on it has a series to look at: the agent's states, and the controller's own
/// `unreachable`.
const NODE_STATES: &[&str] = &[
    "starting",
    "serving",
    "restarting",
    "degraded",
    "shutting-down",
    "stopped",
    "unreachable",
];

/// A state as a label value: one of [`NODE_STATES`] (or `new`), else `other`. The state
/// comes from the agent's heartbeat, and a label takes a new series per value: an
/// agent (or anything holding the agents' credential) that reported a new word each
/// beat would otherwise grow the controller's memory and every scrape without bound.
fn node_state_label(state: &str) -> &str {
    if state == "new" || NODE_STATES.contains(&state) {
        state
    } else {
        "other"
    }
}
const ROLLOUT_STATES: &[RolloutState] = &[
    RolloutState::Planned,
    RolloutState::Running,
    RolloutState::Paused,
    RolloutState::Succeeded,
    RolloutState::Failed,
    RolloutState::RolledBack,
    RolloutState::Aborted,
];

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

#[derive(Debug)]
pub struct Metrics {
    /// Held while the gauges are refreshed and the text encoded, so two scrapes at
    /// once do not see each other's half-refreshed gauges.
    registry: Mutex<Registry>,
    nodes: Family<StateLabel, Gauge>,
    rollouts: Family<StateLabel, Gauge>,
    transitions: Family<TransitionLabels, Counter>,
    heartbeats: Family<HeartbeatLabels, Counter>,
    answer_statuses: Counter,
    agent_calls: Family<AgentCallLabels, Counter>,
    api: HistogramFamily<RouteLabels>,
    store_writes: Histogram,
    sse_clients: Gauge,
    leader_changes: Counter,
    lease_renew_failures: Counter,
    connections: Gauge,
    connections_closed: Family<ClosedLabel, Counter>,
    /// The API server's connections, once it serves ([`Metrics::watch_connections`]).
    server: std::sync::OnceLock<fleet_net::Connections>,
}

fn api_histogram() -> Histogram {
    // 100 µs .. ~6.5 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

impl Default for Metrics {
    fn default() -> Self {
        let nodes = Family::<StateLabel, Gauge>::default();
        let rollouts = Family::<StateLabel, Gauge>::default();
        let transitions = Family::<TransitionLabels, Counter>::default();
        let heartbeats = Family::<HeartbeatLabels, Counter>::default();
        let answer_statuses = Counter::default();
        let agent_calls = Family::<AgentCallLabels, Counter>::default();
        let api: HistogramFamily<RouteLabels> = Family::new_with_constructor(api_histogram);
        // 50 µs .. ~3.3 s: one group commit of the store's writer thread.
        let store_writes = Histogram::new(exponential_buckets(0.00005, 2.0, 17));
        let sse_clients = Gauge::default();
        let leader_changes = Counter::default();
        let lease_renew_failures = Counter::default();
        let connections = Gauge::default();
        let connections_closed = Family::<ClosedLabel, Counter>::default();
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                commit: option_env!("FLEET_GIT_COMMIT").unwrap_or(""),
                protocol: fleet_proto::PROTOCOL,
            })
            .set(1);
        let mut registry = Registry::with_prefix("fleet_controller");
        registry.register(
            "build_info",
            "The controller's version, git commit (FLEET_GIT_COMMIT at build time) and protocol (always 1)",
            build_info,
        );
        registry.register(
            "nodes",
            "Nodes in the inventory by state (as the API shows them: a node that missed its heartbeats is unreachable)",
            nodes.clone(),
        );
        registry.register(
            "rollouts",
            "Rollouts the controller keeps, by state",
            rollouts.clone(),
        );
        registry.register(
            "node_transitions",
            "Node state changes, by the state left and the state entered (from=\"new\" for a node's first heartbeat, to=\"forgotten\" for fleetctl forget)",
            transitions.clone(),
        );
        registry.register(
            "heartbeats",
            "Heartbeats (and static nodes' status polls) by result, and why refused ones were refused",
            heartbeats.clone(),
        );
        registry.register(
            "answer_statuses",
            "Statuses agents sent with their answers to commands on heartbeat streams, taken as heartbeats (counted in heartbeats_total too): each stands for a beat the agent left out",
            answer_statuses.clone(),
        );
        registry.register(
            "agent_calls",
            "Calls to agents (Restart, Preflight, Status, Shutdown) by how they went: on the agent's heartbeat stream, or dialled at its control address",
            agent_calls.clone(),
        );
        registry.register(
            "api_request_duration_seconds",
            "Time to answer a gRPC call or an HTTP request, by route and status (a stream: until its headers)",
            api.clone(),
        );
        registry.register(
            "store_write_duration_seconds",
            "Time to commit one transaction of the store's writer thread (group commit of every queued write)",
            store_writes.clone(),
        );
        registry.register(
            "sse_clients",
            "Clients connected to the event stream (/api/events)",
            sse_clients.clone(),
        );
        registry.register(
            "leader_changes",
            "Leaders this controller saw elected, itself included (several controllers on etcd)",
            leader_changes.clone(),
        );
        registry.register(
            "lease_renew_failures",
            "Failed renewals of this controller's election lease (several controllers on etcd)",
            lease_renew_failures.clone(),
        );
        registry.register(
            "connections",
            "Connections open to the controller's port now (agents' heartbeat streams included)",
            connections.clone(),
        );
        registry.register(
            "connections_closed",
            "Connections the controller closed by reason: evicted (idle, to let a new one in at \
             the connection cap), refused (new, at the cap with none idle), idle (idle timeout), \
             header_timeout (no request head in time)",
            connections_closed.clone(),
        );
        Metrics {
            registry: Mutex::new(registry),
            nodes,
            rollouts,
            transitions,
            heartbeats,
            answer_statuses,
            agent_calls,
            api,
            store_writes,
            sse_clients,
            leader_changes,
            lease_renew_failures,
            connections,
            connections_closed,
            server: std::sync::OnceLock::new(),
        }
    }
}

/// Why the controller closed a connection (`fleet_controller_connections_closed_total`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClosedLabel {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    /// `FLEET_GIT_COMMIT` at build time; empty without.
    commit: &'static str,
    protocol: &'static str,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::default);

/// The process's metrics.
pub fn global() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    /// A leader was elected (this controller or another, as the election showed it).
    pub fn leader_changed(&self) {
        self.leader_changes.inc();
    }

    /// A renewal of this controller's election lease failed.
    pub fn lease_renew_failed(&self) {
        self.lease_renew_failures.inc();
    }

    /// A node went from one state to another (`from` is `new` for its first heartbeat).
    pub fn transition(&self, from: &str, to: &str) {
        if from == to {
            return;
        }
        self.transitions
            .get_or_create(&TransitionLabels {
                from: node_state_label(from).to_string(),
                to: node_state_label(to).to_string(),
            })
            .inc();
    }

    pub fn heartbeat_accepted(&self) {
        self.heartbeats
            .get_or_create(&HeartbeatLabels {
                result: "accepted",
                reason: "",
            })
            .inc();
    }

    /// A status that came with an answer to a command was taken.
    pub fn answer_status(&self) {
        self.answer_statuses.inc();
    }

    pub fn heartbeat_refused(&self, reason: &'static str) {
        self.heartbeats
            .get_or_create(&HeartbeatLabels {
                result: "refused",
                reason,
            })
            .inc();
    }

    pub fn agent_call(&self, call: &'static str, via: &'static str) {
        self.agent_calls
            .get_or_create(&AgentCallLabels { call, via })
            .inc();
    }

    pub fn api_request(&self, route: &'static str, code: String, took: Duration) {
        self.api
            .get_or_create(&RouteLabels { route, code })
            .observe(took.as_secs_f64());
    }

    pub fn store_write(&self, took: Duration) {
        self.store_writes.observe(took.as_secs_f64());
    }

    /// One more event-stream client until the guard is dropped.
    pub fn sse_client(&'static self) -> SseClient {
        self.sse_clients.inc();
        SseClient(self)
    }

    /// Reports the API server's connections from now on (the first server only).
    pub fn watch_connections(&self, conns: fleet_net::Connections) {
        let _ = self.server.set(conns);
    }

    /// The text exposition format, with the gauges of nodes and rollouts counted now.
    pub fn render(&self, fleet: &Fleet) -> String {
        let registry = self.registry.lock().expect("metrics lock");
        self.nodes.clear();
        for state in NODE_STATES {
            self.nodes.get_or_create(&state_label(state)).set(0);
        }
        // Counted in one walk under the inventory's read lock: no node is copied (a
        // copy of every record per scrape was ~140 MB of transient memory at 100,000
        // nodes), and each gauge is set once, not once per node.
        {
            let view = fleet.inventory.view();
            let mut counts: std::collections::BTreeMap<&str, i64> = Default::default();
            for (_, state) in view.iter() {
                *counts.entry(node_state_label(state)).or_default() += 1;
            }
            for (state, n) in counts {
                self.nodes.get_or_create(&state_label(state)).set(n);
            }
        }
        self.rollouts.clear();
        for state in ROLLOUT_STATES {
            self.rollouts
                .get_or_create(&state_label(state.as_str()))
                .set(0);
        }
        for handle in fleet.rollout_handles(0) {
            let state = handle.view.lock().expect("view lock").rollout.state;
            self.rollouts
                .get_or_create(&state_label(state.as_str()))
                .inc();
        }
        if let Some(conns) = self.server.get() {
            let stats = conns.stats();
            self.connections
                .set(i64::try_from(stats.open).unwrap_or(i64::MAX));
            for (reason, total) in [
                ("evicted", stats.evicted),
                ("refused", stats.refused),
                ("idle", stats.idle_closed),
                ("header_timeout", stats.header_timeouts),
            ] {
                // The server counts; the counter catches up with it at each scrape.
                let counter = self
                    .connections_closed
                    .get_or_create(&ClosedLabel { reason });
                counter.inc_by(total.saturating_sub(counter.get()));
            }
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

fn state_label(state: &str) -> StateLabel {
    StateLabel {
        state: state.to_string(),
    }
}

/// Counts an event-stream client while it lives.
#[derive(Debug)]
pub struct SseClient(&'static Metrics);

impl Drop for SseClient {
    fn drop(&mut self) {
        self.0.sse_clients.dec();
    }
}

/// The middleware that times every request, by its row in the table of roles.
pub async fn time_requests(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let route = crate::auth::route(request.method(), request.uri().path())
        .map(|r| r.name)
        .unwrap_or("unknown");
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    let code = match response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
    {
        // A unary gRPC error answers in the headers; a success puts its status in the
        // trailers, which this layer does not wait for.
        Some(code) => format!("{:?}", tonic::Code::from(code)),
        None => format!("{}xx", response.status().as_u16() / 100),
    };
    if route == "Heartbeat" || route == "HeartbeatStream" {
        // Refused before the handler (no or a wrong credential, or another node's
        // certificate); the inventory counts the ones it refuses itself.
        match code.as_str() {
            "Unauthenticated" => global().heartbeat_refused("unauthenticated"),
            "PermissionDenied" => global().heartbeat_refused("forbidden"),
            _ => {}
        }
    }
    global().api_request(route, code, started.elapsed());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_are_counted_once_each_and_not_for_the_same_state() {
        let m = Metrics::default();
        m.transition("new", "serving");
        m.transition("serving", "serving");
        m.transition("serving", "restarting");
        m.transition("serving", "restarting");
        let registry = m.registry.lock().unwrap();
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        assert!(
            out.contains(
                "fleet_controller_node_transitions_total{from=\"serving\",to=\"restarting\"} 2\n"
            ),
            "{out}"
        );
        assert!(
            out.contains(
                "fleet_controller_node_transitions_total{from=\"new\",to=\"serving\"} 1\n"
            ),
            "{out}"
        );
        assert!(!out.contains("from=\"serving\",to=\"serving\""), "{out}");
        // A state no agent has is one series, whatever it says.
        m.transition("serving", "x1");
        m.transition("serving", "x2");
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        assert!(
            out.contains(
                "fleet_controller_node_transitions_total{from=\"serving\",to=\"other\"} 2\n"
            ),
            "{out}"
        );
    }
}
