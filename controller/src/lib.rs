//! Fleet's controller: the inventory of agents and health-gated rolling restarts
//! across them.
//!
//! Agents heartbeat their status in; `fleetctl` starts a rollout; the engine moves the
//! selected nodes batch by batch, each node through `restarting → soaking → healthy`,
//! stopping at the failure budget (and rolling back if asked), persisting every
//! transition so a restarted controller resumes where it stopped.
//!
//! Modules, in the order data flows through them:

/// Command-line flags.
pub mod config;
/// Who is calling, and the role each route needs.
pub mod auth;
/// Operator tokens with a role, and join tokens for agents.
pub mod tokens;
/// gRPC `ControllerService`.
pub mod api;
/// HTTP JSON and Server-Sent Events for the dashboard.
pub mod http;
/// The web dashboard (server-rendered pages, live through Server-Sent Events).
pub mod dashboard;
/// The controller's shared state and operations.
pub mod fleet;
/// Nodes and their heartbeats.
pub mod inventory;
/// Rollout specs, plans, states, and the engine.
pub mod rollout;
/// Clients for the agents.
pub mod agents;
/// The fleet CA: node certificates from join requests.
pub mod ca;
/// gRPC `JoinService`: join tokens and certificate requests in, node certificates out.
pub mod join;
/// `--tls`: the CA and the controller's own certificate.
pub mod tls;
/// Persistence (SQLite, or etcd shared by several controllers).
pub mod store;
/// Several controllers on one etcd store: leader election, fencing, followers.
pub mod ha;
/// A follower's state kept current from etcd's watch, key by key.
pub mod follow;
/// Prometheus metrics (`/metrics`).
pub mod metrics;
/// Audit log lines (`fleet::audit`): every state change and who made it.
pub mod audit;
#[cfg(test)]
mod testing;

pub mod history;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use fleet::Fleet;

/// What changed, for live views (Watch streams, Server-Sent Events).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Node(String),
    Rollout(String),
}

/// A status's message and its deepest cause (`tcp connect error: Connection refused
/// (os error 111)`), without the debug dump.
pub fn with_cause(status: &tonic::Status) -> String {
    let mut cause: Option<&dyn std::error::Error> = std::error::Error::source(status);
    let mut deepest = None;
    while let Some(c) = cause {
        deepest = Some(c);
        cause = c.source();
    }
    match deepest {
        Some(root) if root.to_string() != status.message() => {
            format!("{}: {root}", status.message())
        }
        _ => status.message().to_string(),
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// Every route, behind the auth layer (caller and role); the dashboard also behind
/// its sessions. `token`: the bootstrap admin token (`--token-file`); without one the
/// controller is open.
pub fn router(fleet: Arc<Fleet>, token: Option<String>) -> axum::Router {
    router_with(fleet, token, None)
}

/// [`router`], plus `JoinService` when the controller runs with `--tls`.
pub fn router_with(
    fleet: Arc<Fleet>,
    token: Option<String>,
    join: Option<join::Join>,
) -> axum::Router {
    let auth = Arc::new(auth::Auth::new(token, fleet.tokens.clone()));
    let mut routes = tonic::service::Routes::new(
        fleet_proto::v1::controller_service_server::ControllerServiceServer::new(api::Api {
            fleet: fleet.clone(),
        })
        // One bound for every request of the service, heartbeats included: 1 MiB is
        // three times the largest status fleet_proto::limits allows (a rollout spec or
        // an id is a few KiB at most). A bigger request is refused by its length prefix,
        // before it is read into memory.
        .max_decoding_message_size(fleet_proto::limits::MAX_MESSAGE)
        .max_encoding_message_size(256 * 1024 * 1024),
    );
    if let Some(join) = join {
        routes = routes.add_service(
            fleet_proto::v1::join_service_server::JoinServiceServer::new(join)
                .max_decoding_message_size(64 * 1024),
        );
    }
    let grpc = routes.into_axum_router();
    http::router(fleet.clone())
        .merge(grpc)
        .merge(dashboard::router(fleet.clone(), auth.clone()))
        .fallback(http::not_found)
        .layer(axum::middleware::from_fn_with_state(auth, auth::authorize))
        // Before the caller is checked: a follower names the leader to anyone.
        .layer(axum::middleware::from_fn_with_state(fleet, ha::leader_only))
        .layer(axum::middleware::from_fn(dashboard::security_headers))
        .layer(axum::middleware::from_fn(metrics::time_requests))
}

/// Runs the controller until the process is stopped.
pub async fn serve(cli: config::Cli) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let token = config::read_token(&cli.token_file)?;
    let agent_token = match &cli.agent_token_file {
        Some(_) => config::read_token(&cli.agent_token_file)?,
        None => token.clone(),
    };
    if token.is_none() && !cli.insecure && !cli.listen.ip().is_loopback() {
        anyhow::bail!(
            "refusing to listen on {} without a token: set --token-file, listen on 127.0.0.1, or pass --insecure",
            cli.listen
        );
    }
    if !cli.tls_enabled() && !cli.insecure && !cli.listen.ip().is_loopback() {
        anyhow::bail!(
            "refusing to listen on {} without TLS: agents' heartbeats and the token would cross \
             the network in clear, and any host could speak for any node; pass --tls (the fleet CA \
             is created in --tls-dir), listen on 127.0.0.1, or pass --insecure",
            cli.listen
        );
    }
    if cli.max_nodes == 0 {
        anyhow::bail!("--max-nodes must be at least 1 (default 100000)");
    }
    if cli.lease_ttl < Duration::from_secs(2) {
        anyhow::bail!(
            "--lease-ttl {} is below etcd's smallest lease, 2s: give 2s or more",
            humantime::format_duration(cli.lease_ttl)
        );
    }
    // An etcd store may be shared by several controllers: they elect a leader, and
    // every write is fenced by that leadership (crate::ha).
    let (store, etcd): (Arc<dyn store::Store>, Option<Arc<store::EtcdStore>>) = match cli.store()? {
        config::StoreUrl::Sqlite(path) => (
            Arc::new(
                store::SqliteStore::open(&path)
                    .with_context(|| format!("cannot open the database {}", path.display()))?,
            ),
            None,
        ),
        config::StoreUrl::Etcd(endpoints) => {
            let mut options = cli.etcd_options(endpoints);
            options.require_fence = true;
            let etcd = Arc::new(
                store::EtcdStore::connect(options)
                    .await
                    .context("cannot use etcd as the store")?,
            );
            (etcd.clone(), Some(etcd))
        }
    };
    let fleet = Fleet::new(store, cli.heartbeat_ttl, agent_token.as_deref())?;
    fleet.inventory.set_max_nodes(cli.max_nodes);
    fleet.set_default_min_healthy(cli.default_min_healthy);
    let tls = if cli.tls_enabled() {
        Some(tls::start(&cli, &fleet)?)
    } else {
        None
    };
    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("cannot listen on {} (use --listen ADDR)", cli.listen))?;
    let addr: SocketAddr = listener.local_addr()?;
    let ha = match etcd {
        Some(etcd) => {
            let ha = ha::Ha::new(etcd, cli.advertise(addr)?, cli.lease_ttl);
            ha.install();
            fleet.set_ha(ha.clone());
            Some(ha)
        }
        None => None,
    };
    tokio::spawn(fleet.inventory.clone().watch_staleness());
    for node in &cli.nodes {
        let (id, addr) = match node.split_once('=') {
            Some((id, addr)) => (Some(id.to_string()), addr.to_string()),
            None if tls.is_some() => anyhow::bail!(
                "--node {node}: with --tls a static node is given as NODE_ID=ADDR \
                 (e.g. web-1=10.0.0.5:7101), so that its certificate can be checked"
            ),
            None => (None, node.clone()),
        };
        tokio::spawn(poll_static_node(fleet.clone(), id, addr));
    }
    match ha {
        // Rollouts are resumed by whichever controller is elected.
        Some(ha) => {
            tracing::info!(
                "following until elected: lease TTL {}, advertised as {}",
                humantime::format_duration(cli.lease_ttl),
                ha.advertise()
            );
            tokio::spawn(ha::run(ha, fleet.clone()));
        }
        None => fleet.resume_unfinished(),
    }
    if cli.idle_timeout.is_zero() || cli.header_timeout.is_zero() {
        anyhow::bail!(
            "--idle-timeout and --header-timeout must be greater than zero, e.g. 60s and 10s"
        );
    }
    // fleet-net gives every request the peer's address (`ConnectInfo`): it tells the
    // dashboard whether a browser is on loopback.
    let (join, tls_config) = match tls {
        Some(t) => (Some(t.join), Some(t.server)),
        None => (None, None),
    };
    let mut server =
        fleet_net::Server::new(listener, router_with(fleet, token, join), cli.limits());
    if let Some(config) = tls_config {
        server = server.with_tls(config);
    }
    crate::metrics::global().watch_connections(server.connections());
    tracing::info!("controller listening on {addr}");
    tracing::info!(
        "connections: {}, idle timeout {}, header timeout {}",
        server.cap(),
        humantime::format_duration(cli.idle_timeout),
        humantime::format_duration(cli.header_timeout)
    );
    server.run().await;
    Ok(())
}

/// A static node has no heartbeat: the controller asks for its status instead.
async fn poll_static_node(fleet: Arc<Fleet>, id: Option<String>, addr: String) {
    let interval = (fleet.inventory.ttl() / 3).max(Duration::from_millis(100));
    let mut known: Option<String> = None;
    loop {
        if !fleet.may_act() {
            // Only the leader asks (and records what it hears).
            tokio::time::sleep(interval).await;
            continue;
        }
        let asked = id.as_deref().unwrap_or("");
        match fleet
            .agents
            .status(asked, &addr, Duration::from_secs(5))
            .await
        {
            Ok(status) if id.as_ref().is_some_and(|id| *id != status.node_id) => {
                tracing::warn!(
                    "static node {addr} says it is {:?}, not {asked:?}: ignored",
                    status.node_id
                );
            }
            Ok(status) => {
                known = Some(status.node_id.clone());
                match fleet.inventory.report(&status, true) {
                    Ok(()) => fleet.history.heard(&status),
                    Err(e) => tracing::warn!("static node {addr}: {e}"),
                }
            }
            Err(e) => {
                if let Some(id) = &known {
                    fleet
                        .inventory
                        .unreachable(id, format!("status call failed: {}", e.message()));
                } else {
                    tracing::warn!("static node {addr} does not answer: {}", e.message());
                }
            }
        }
        tokio::time::sleep(interval).await;
    }
}
