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
/// The token check.
pub mod auth;
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
/// Persistence (SQLite).
pub mod store;

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

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// Every route: the API behind the token check, the dashboard behind its sessions.
pub fn router(fleet: Arc<Fleet>, token: Option<String>) -> axum::Router {
    let token = token.map(Arc::new);
    let sessions = Arc::new(dashboard::session::Sessions::new(token.clone()));
    let grpc = tonic::service::Routes::new(
        fleet_proto::v1::controller_service_server::ControllerServiceServer::new(api::Api {
            fleet: fleet.clone(),
        })
        // One bound for every request of the service, heartbeats included: 1 MiB is
        // three times the largest status fleet_proto::limits allows (a rollout spec or
        // an id is a few KiB at most). A bigger request is refused by its length prefix,
        // before it is read into memory.
        .max_decoding_message_size(fleet_proto::limits::MAX_MESSAGE)
        .max_encoding_message_size(256 * 1024 * 1024),
    )
    .into_axum_router();
    http::router(fleet.clone())
        .merge(grpc)
        .layer(axum::middleware::from_fn_with_state(
            auth::Token {
                token,
                sessions: sessions.clone(),
            },
            auth::require_token,
        ))
        .merge(dashboard::router(fleet, sessions))
        .layer(axum::middleware::from_fn(dashboard::security_headers))
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
    if cli.max_nodes == 0 {
        anyhow::bail!("--max-nodes must be at least 1 (default 100000)");
    }
    let store = store::SqliteStore::open(&cli.db)
        .with_context(|| format!("cannot open the database {}", cli.db.display()))?;
    let fleet = Fleet::new(Arc::new(store), cli.heartbeat_ttl, agent_token.as_deref())?;
    fleet.inventory.set_max_nodes(cli.max_nodes);
    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("cannot listen on {} (use --listen ADDR)", cli.listen))?;
    let addr: SocketAddr = listener.local_addr()?;
    tokio::spawn(fleet.inventory.clone().watch_staleness());
    for node in &cli.nodes {
        tokio::spawn(poll_static_node(fleet.clone(), node.clone()));
    }
    fleet.resume_unfinished();
    if cli.idle_timeout.is_zero() || cli.header_timeout.is_zero() {
        anyhow::bail!(
            "--idle-timeout and --header-timeout must be greater than zero, e.g. 60s and 10s"
        );
    }
    // fleet-net gives every request the peer's address (`ConnectInfo`): it tells the
    // dashboard whether a browser is on loopback.
    let server = fleet_net::Server::new(listener, router(fleet, token), cli.limits());
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
async fn poll_static_node(fleet: Arc<Fleet>, addr: String) {
    let interval = (fleet.inventory.ttl() / 3).max(Duration::from_millis(100));
    let mut known: Option<String> = None;
    loop {
        match fleet.agents.status(&addr, Duration::from_secs(5)).await {
            Ok(status) => {
                known = Some(status.node_id.clone());
                if let Err(e) = fleet.inventory.report(&status, true) {
                    tracing::warn!("static node {addr}: {e}");
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
