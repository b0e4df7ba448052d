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
/// in an embedded SQLite file (--db), or in etcd (--store etcd://HOST:PORT,...); rollouts
/// in progress resume after a restart.
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

    /// SQLite database file (created if missing), when --store is not given.
    #[arg(long, value_name = "PATH", default_value = "fleet.db")]
    pub db: PathBuf,

    /// Where state is kept: `sqlite:PATH` (as --db PATH), or
    /// `etcd://HOST:PORT[,HOST:PORT...]`, the client URLs' hosts and ports of an etcd v3
    /// cluster (port 2379 when left out) [default: sqlite:fleet.db].
    #[arg(long, value_name = "URL", value_parser = parse_store, conflicts_with = "db")]
    pub store: Option<StoreUrl>,

    /// With an etcd store: every key the controller writes starts with this (a `/` is
    /// added at the end if missing). Controllers of different fleets on one etcd need
    /// different prefixes.
    #[arg(long, value_name = "PREFIX", default_value = "/fleet/")]
    pub etcd_prefix: String,

    /// With an etcd store: speak TLS to etcd (https), trusting this CA (PEM) for the
    /// members' server certificates.
    #[arg(long, value_name = "PATH")]
    pub etcd_ca_cert: Option<PathBuf>,

    /// With an etcd store and --etcd-ca-cert: the client certificate (PEM) for an etcd
    /// started with --client-cert-auth, with --etcd-key.
    #[arg(long, value_name = "PATH", requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,

    /// The private key (PEM) of --etcd-cert.
    #[arg(long, value_name = "PATH", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,

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
    /// At the cap, a new connection closes the one idle the longest, else the oldest
    /// holding only agents' heartbeat streams (they reconnect at their next beat).
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

    /// With an etcd store, controllers elect a leader with a lease this long: a
    /// leader that stops renewing it (dead, stopped, cut off) is replaced within
    /// about this time. etcd's smallest lease is 2 s.
    #[arg(long, value_name = "DURATION", default_value = "3s", value_parser = parse_duration)]
    pub lease_ttl: Duration,

    /// The URL other controllers give agents and fleetctl for this one, when it leads
    /// [default: http:// (https:// with --tls) and the --listen address].
    #[arg(long, value_name = "URL")]
    pub advertise_url: Option<String>,
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

/// `--store`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    Sqlite(PathBuf),
    /// `HOST:PORT` of each member.
    Etcd(Vec<String>),
}

const STORE_FORMS: &str = "write sqlite:PATH, or etcd://HOST:PORT[,HOST:PORT...] for an etcd \
                           cluster (e.g. etcd://10.0.0.1:2379,10.0.0.2:2379,10.0.0.3:2379)";

fn parse_store(s: &str) -> Result<StoreUrl, String> {
    if let Some(path) = s.strip_prefix("sqlite:") {
        if path.is_empty() {
            return Err(format!("{s:?} names no file: {STORE_FORMS}"));
        }
        return Ok(StoreUrl::Sqlite(PathBuf::from(path)));
    }
    let Some(hosts) = s.strip_prefix("etcd://") else {
        let hint = if s.starts_with("http://") || s.starts_with("https://") {
            " (TLS to etcd: etcd://… with --etcd-ca-cert)"
        } else {
            ""
        };
        return Err(format!("{s:?} is not a store URL: {STORE_FORMS}{hint}"));
    };
    if hosts.contains('/') {
        return Err(format!(
            "{s:?}: an etcd URL names hosts and ports only; the keys' prefix is \
             --etcd-prefix (default /fleet/): {STORE_FORMS}"
        ));
    }
    let mut endpoints = Vec::new();
    for host in hosts.split(',') {
        let endpoint = endpoint(host).map_err(|why| format!("{s:?}: {why}: {STORE_FORMS}"))?;
        endpoints.push(endpoint);
    }
    Ok(StoreUrl::Etcd(endpoints))
}

/// `HOST:PORT`, `HOST` (port 2379), `[V6]:PORT`.
fn endpoint(host: &str) -> Result<String, String> {
    if host.is_empty() {
        return Err("an empty host".into());
    }
    if host.contains(['@', '?', '#', ' ']) {
        return Err(format!("{host:?} is not HOST:PORT"));
    }
    let (name, port) = match host.rsplit_once(':') {
        Some((name, port))
            if !name.ends_with(':') && (!name.contains(':') || name.ends_with(']')) =>
        {
            (name, Some(port))
        }
        _ => (host, None),
    };
    if name.is_empty() || (name.contains(':') && !name.starts_with('[')) {
        return Err(format!(
            "{host:?} is not HOST:PORT (an IPv6 address in brackets: [::1]:2379)"
        ));
    }
    match port {
        None => Ok(format!("{name}:2379")),
        Some(port) => match port.parse::<u16>() {
            Ok(p) if p > 0 => Ok(format!("{name}:{p}")),
            _ => Err(format!("{port:?} in {host:?} is not a port")),
        },
    }
}

impl Cli {
    /// The store to open, its TLS flags checked.
    pub fn store(&self) -> anyhow::Result<StoreUrl> {
        let store = self
            .store
            .clone()
            .unwrap_or_else(|| StoreUrl::Sqlite(self.db.clone()));
        let tls_flags = self.etcd_ca_cert.is_some() || self.etcd_cert.is_some();
        match &store {
            StoreUrl::Sqlite(_) if tls_flags => anyhow::bail!(
                "--etcd-ca-cert, --etcd-cert and --etcd-key are for an etcd store: give \
                 --store etcd://HOST:PORT[,HOST:PORT...] too, or leave them out"
            ),
            StoreUrl::Etcd(_) if self.etcd_cert.is_some() && self.etcd_ca_cert.is_none() => {
                anyhow::bail!(
                    "--etcd-cert and --etcd-key need --etcd-ca-cert PATH too: the CA that \
                     signed the etcd members' server certificates (TLS to etcd checks them)"
                )
            }
            _ => {}
        }
        if matches!(store, StoreUrl::Etcd(_)) && self.etcd_prefix.trim_matches('/').is_empty() {
            anyhow::bail!(
                "--etcd-prefix {:?} would put the controller's keys at the root of etcd: \
                 give a prefix of its own, e.g. /fleet/",
                self.etcd_prefix
            );
        }
        Ok(store)
    }

    /// How to reach etcd at `endpoints` ([`Cli::store`] checked the flags).
    pub fn etcd_options(&self, endpoints: Vec<String>) -> crate::store::EtcdOptions {
        let mut prefix = self.etcd_prefix.clone();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        crate::store::EtcdOptions {
            endpoints,
            prefix,
            tls: self
                .etcd_ca_cert
                .clone()
                .map(|ca_cert| crate::store::EtcdTls {
                    ca_cert,
                    identity: self.etcd_cert.clone().zip(self.etcd_key.clone()),
                }),
            ..Default::default()
        }
    }

    /// The SQLite file, from --store sqlite:PATH or --db (also where --tls-dir is by
    /// default).
    pub fn db_path(&self) -> &std::path::Path {
        match &self.store {
            Some(StoreUrl::Sqlite(path)) => path,
            _ => &self.db,
        }
    }

    /// Whether the API speaks mutual TLS.
    /// The URL this controller is reached at (`--advertise-url`, else its listen
    /// address; a wildcard address cannot be advertised and must be given).
    pub fn advertise(&self, bound: SocketAddr) -> anyhow::Result<String> {
        if let Some(url) = &self.advertise_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                anyhow::bail!(
                    "--advertise-url {url:?} must be an http:// or https:// URL, e.g. https://10.0.0.2:7100"
                );
            }
            return Ok(url.trim_end_matches('/').to_string());
        }
        if bound.ip().is_unspecified() {
            anyhow::bail!(
                "--listen {bound} is a wildcard address: other controllers cannot send agents \
                 and fleetctl there; give this controller's reachable URL with --advertise-url"
            );
        }
        let scheme = if self.tls_enabled() { "https" } else { "http" };
        Ok(format!("{scheme}://{bound}"))
    }

    pub fn tls_enabled(&self) -> bool {
        self.tls || self.ca_cert.is_some()
    }

    /// The connection limits of the API port.
    pub fn limits(&self) -> fleet_net::Limits {
        fleet_net::Limits {
            max_connections: self.max_connections,
            idle_timeout: self.idle_timeout,
            header_timeout: self.header_timeout,
            // An agent whose stream is cut opens it again at its next beat.
            held_paths: &[crate::join::HEARTBEAT_STREAM_PATH],
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("fleet-controller").chain(args.iter().copied()))
    }

    #[test]
    fn store_urls_name_sqlite_or_etcd_members() {
        assert_eq!(
            parse_store("sqlite:/var/lib/fleet/fleet.db"),
            Ok(StoreUrl::Sqlite("/var/lib/fleet/fleet.db".into()))
        );
        assert_eq!(
            parse_store("etcd://10.0.0.1:2379,10.0.0.2,[::1]:2380,etcd-3:12379"),
            Ok(StoreUrl::Etcd(vec![
                "10.0.0.1:2379".into(),
                "10.0.0.2:2379".into(),
                "[::1]:2380".into(),
                "etcd-3:12379".into()
            ]))
        );
        for bad in [
            "postgres://db",
            "http://127.0.0.1:2379",
            "etcd://",
            "etcd://a:2379,,b:2379",
            "etcd://a:x",
            "etcd://a:0",
            "etcd://a:2379/fleet",
            "etcd://::1:2379",
            "sqlite:",
        ] {
            let e = parse_store(bad).unwrap_err();
            assert!(
                e.contains("write sqlite:PATH, or etcd://HOST:PORT"),
                "{bad}: {e}"
            );
        }
        assert!(
            parse_store("https://a:2379")
                .unwrap_err()
                .contains("--etcd-ca-cert")
        );
    }

    #[test]
    fn the_store_defaults_to_db_and_tls_flags_need_etcd_and_a_ca() {
        let c = cli(&[]).unwrap();
        assert_eq!(c.store().unwrap(), StoreUrl::Sqlite("fleet.db".into()));
        let c = cli(&["--db", "x.db"]).unwrap();
        assert_eq!(c.store().unwrap(), StoreUrl::Sqlite("x.db".into()));
        assert!(cli(&["--db", "x.db", "--store", "sqlite:y.db"]).is_err());
        let c = cli(&["--store", "sqlite:y.db"]).unwrap();
        assert_eq!(c.db_path(), std::path::Path::new("y.db"));

        let e = cli(&["--etcd-ca-cert", "ca.pem"])
            .unwrap()
            .store()
            .unwrap_err();
        assert!(e.to_string().contains("are for an etcd store"), "{e}");
        let e = cli(&["--store", "etcd://a", "--etcd-cert", "c", "--etcd-key", "k"])
            .unwrap()
            .store()
            .unwrap_err();
        assert!(e.to_string().contains("need --etcd-ca-cert"), "{e}");
        assert!(cli(&["--store", "etcd://a", "--etcd-cert", "c"]).is_err());
        let e = cli(&["--store", "etcd://a", "--etcd-prefix", "/"])
            .unwrap()
            .store()
            .unwrap_err();
        assert!(e.to_string().contains("root of etcd"), "{e}");

        let c = cli(&[
            "--store",
            "etcd://a:1,b:2",
            "--etcd-prefix",
            "/prod",
            "--etcd-ca-cert",
            "ca.pem",
        ])
        .unwrap();
        let StoreUrl::Etcd(endpoints) = c.store().unwrap() else {
            panic!("etcd")
        };
        let options = c.etcd_options(endpoints);
        assert_eq!(options.endpoints, ["a:1", "b:2"]);
        assert_eq!(options.prefix, "/prod/");
        assert!(options.tls.unwrap().identity.is_none());
        assert!(!options.require_fence);
    }
}
