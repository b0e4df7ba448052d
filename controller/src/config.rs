//! The controller's flags.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// fleet-controller: inventory of fleet agents and health-gated rolling restarts.
///
/// Agents started with `fleet-agent --controller http://ADDR` register and heartbeat;
/// `fleetctl` drives rollouts through the same port (gRPC ControllerService), and the
/// HTTP API (/api/nodes, /api/rollouts, /api/events) serves the dashboard. State is kept
/// in an embedded SQLite file; rollouts in progress resume after a restart.
#[derive(Debug, Clone, Parser)]
#[command(name = "fleet-controller", version, about, long_about)]
pub struct Cli {
    /// API address (gRPC + HTTP).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7100")]
    pub listen: SocketAddr,

    /// Log lines as text, or as one JSON object per line (`timestamp`, `level`,
    /// `target`, `message` and the event's fields; the audit lines have target
    /// `fleet::audit`).
    #[arg(
        long,
        value_name = "FORMAT",
        value_enum,
        default_value_t,
        env = "FLEET_LOG_FORMAT"
    )]
    pub log_format: LogFormat,

    /// SQLite database file (created if missing).
    #[arg(long, value_name = "PATH", default_value = "fleet.db")]
    pub db: PathBuf,

    /// File with the bearer token every API call must carry (agents and fleetctl).
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,

    /// Token for calling the agents' control endpoints [default: the --token-file token].
    #[arg(long, value_name = "PATH")]
    pub agent_token_file: Option<PathBuf>,

    /// A node that misses heartbeats this long is `unreachable`.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub heartbeat_ttl: Duration,

    /// A static node: an agent control address polled by the controller instead of
    /// heartbeating (repeatable).
    #[arg(long = "node", value_name = "ADDR")]
    pub nodes: Vec<String>,

    /// Allow listening beyond loopback without a token or without TLS.
    #[arg(long)]
    pub insecure: bool,

    /// How long a restarted node must keep serving its new generation before a rollout
    /// counts it healthy, when the rollout does not say (`fleetctl rollout
    /// --min-healthy`, the dashboard's form). `0s` turns the soak off by default.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub default_min_healthy: Duration,

    /// Most nodes the inventory holds. A heartbeat of a node not yet known is refused
    /// (RESOURCE_EXHAUSTED) at this many; known nodes keep heartbeating. `fleetctl
    /// forget NODE` makes room.
    #[arg(long, value_name = "N", default_value_t = crate::inventory::DEFAULT_MAX_NODES)]
    pub max_nodes: usize,

    /// Serve mutual TLS with the fleet CA kept in --tls-dir (created on first start):
    /// agents join with a join token and the CA's fingerprint, and every node speaks
    /// with its own certificate. Plain HTTP is then served to loopback peers only.
    #[arg(long)]
    pub tls: bool,

    /// Where the fleet CA is kept (ca.crt, ca.key) [default: fleet-tls beside --db].
    #[arg(long, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,

    /// The fleet CA's certificate, instead of the one in --tls-dir (implies --tls).
    #[arg(long, value_name = "PATH", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,

    /// The fleet CA's private key (owner-only), with --ca-cert.
    #[arg(long, value_name = "PATH", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,

    /// A DNS name or IP address to put in the controller's certificate besides
    /// controller.fleet, for browsers and tools that check the address they dial
    /// (repeatable).
    #[arg(long = "tls-name", value_name = "NAME")]
    pub tls_names: Vec<String>,

    /// How long a node certificate is valid; agents renew at two thirds of it.
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_duration)]
    pub cert_ttl: Duration,

    /// Most client connections open at once (agents' heartbeats, fleetctl, browsers);
    /// fewer where the descriptor limit (RLIMIT_NOFILE, minus 128 kept free) is lower.
    /// At the cap, a new connection closes the one idle the longest.
    #[arg(long, value_name = "N", default_value_t = 16384)]
    pub max_connections: usize,

    /// A connection with no request in progress this long is closed (a Watch stream
    /// or the dashboard's event stream is a request in progress: never cut).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// A connection must send a whole request head this soon after it opens (and
    /// HTTP/1 after each response).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub header_timeout: Duration,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl LogFormat {
    /// Installs the global subscriber (stderr; `FLEET_LOG` sets the level, e.g.
    /// `debug` or `info,fleet::audit=off`).
    pub fn init(self) {
        let filter: tracing_subscriber::filter::Targets = std::env::var("FLEET_LOG")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO)
            });
        use tracing_subscriber::layer::SubscriberExt as _;
        use tracing_subscriber::util::SubscriberInitExt as _;
        let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
        let _ = match self {
            LogFormat::Text => tracing_subscriber::registry()
                .with(layer.with_target(false))
                .with(filter)
                .try_init(),
            LogFormat::Json => tracing_subscriber::registry()
                .with(
                    layer
                        .json()
                        .flatten_event(true)
                        .with_current_span(false)
                        .with_span_list(false),
                )
                .with(filter)
                .try_init(),
        };
    }
}

impl Cli {
    /// Whether the API speaks mutual TLS.
    pub fn tls_enabled(&self) -> bool {
        self.tls || self.ca_cert.is_some()
    }

    /// The connection limits of the API port.
    pub fn limits(&self) -> fleet_net::Limits {
        fleet_net::Limits {
            max_connections: self.max_connections,
            idle_timeout: self.idle_timeout,
            header_timeout: self.header_timeout,
            ..fleet_net::Limits::default()
        }
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration ({e}); write e.g. 500ms, 10s or 1m"))
}

pub fn read_token(path: &Option<PathBuf>) -> anyhow::Result<Option<String>> {
    let Some(path) = path else { return Ok(None) };
    let token = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read token file {}: {e}", path.display()))?
        .trim()
        .to_string();
    if token.is_empty() {
        anyhow::bail!(
            "token file {} is empty: write a token into it",
            path.display()
        );
    }
    Ok(Some(token))
}
