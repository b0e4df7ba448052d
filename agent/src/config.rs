//! The agent's configuration: one documented serde struct, loaded from TOML, with
//! command-line flags merged on top (see [`crate::cli`]) and checked by [`Config::validate`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Everything the agent needs to know. Every field has a default, so an empty file
/// (or no file) runs the demo on `127.0.0.1:8199` with control on `127.0.0.1:7101`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The node's name in the fleet; defaults to the host name.
    pub node_id: String,
    /// Free-form labels the controller selects nodes by (`zone = "a"`).
    pub labels: BTreeMap<String, String>,
    /// The control endpoint: gRPC `AgentService`, `/debug/admin`, `/healthz`, `/metrics`.
    pub control: ControlConfig,
    /// Where `/debug/admin` is mounted and whether app ports serve it too.
    pub admin: AdminConfig,
    /// Timeouts and the executable policy of restarts.
    pub restart: RestartConfig,
    /// The HTTP(S) servers the workers serve, each with one or more ports.
    pub servers: Vec<ServerConfig>,
    /// The controllers to register with and heartbeat to, in order of preference:
    /// one URL (`"http://127.0.0.1:7100"`), several separated by commas, or a list.
    /// Heartbeats go to one at a time and move on when it fails (see
    /// `heartbeat`); `https://…` speaks mutual TLS with the node's certificate (see
    /// [`JoinConfig`]). Empty: the node registers nowhere.
    #[serde(
        deserialize_with = "controller_urls",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub controller: Vec<String>,
    /// How this node gets and keeps its certificate for an `https://` controller.
    pub join: JoinConfig,
    /// Supervise this program instead of this binary's own app (socket activation + sd_notify).
    pub exec: Option<ExecConfig>,
    /// `text` (the default) or `json`: one JSON object per log line.
    pub log_format: crate::logging::LogFormat,
    /// Threads of each worker generation's runtime when the agent runs its own app
    /// (not with `exec`, whose program runs as it likes): 0, the default, is one per
    /// CPU. Fewer can serve more where the worker shares few cores with other busy
    /// processes (README, "Worker threads").
    pub worker_threads: usize,
    /// Listening sockets per address, in one `SO_REUSEPORT` group: the kernel spreads
    /// new connections over them and each has its own accept loop in the worker, so
    /// accepting is not one thread's work. 1, the default, is one plain socket; 0 is
    /// one per CPU. Every socket is handed to every generation and kept open by the
    /// supervisor, so none of the group's accept queues is lost in a restart. With
    /// `exec`, the program must accept on every fd it is given.
    pub sockets_per_port: usize,
}

/// The most `worker_threads` a worker may ask for.
pub const MAX_WORKER_THREADS: usize = 1024;
/// The most `sockets_per_port` a node may ask for.
pub const MAX_SOCKETS_PER_PORT: usize = 256;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControlConfig {
    /// Address of the control endpoint.
    pub listen: SocketAddr,
    /// File holding the bearer token every control request must carry.
    pub token_file: Option<PathBuf>,
    /// Allow a non-loopback control endpoint (or app-port admin) without a token.
    pub insecure: bool,
    /// Most connections to the control port at once; fewer where the descriptor limit
    /// (RLIMIT_NOFILE minus 128 kept free for restarts) is lower. At the cap a new
    /// connection closes the one idle the longest, so a real request always gets in.
    pub max_connections: usize,
    /// A control connection with no request in progress this long is closed (a
    /// `Watch` stream is a request in progress: never cut).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A control connection must send a whole request head this soon after it opens
    /// (and, over HTTP/1, after each response).
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
}

/// The node's certificate for mutual TLS with the controller.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JoinConfig {
    /// Where the node keeps its key (owner-only), certificate and the fleet CA.
    pub identity_dir: Option<PathBuf>,
    /// File with the join token an operator created (`fleetctl token create --join`);
    /// needed only until the node has a certificate.
    pub join_token_file: Option<PathBuf>,
    /// The fleet CA's fingerprint (`sha256:…`, from the controller's log): the only CA
    /// trusted when joining.
    pub ca_hash: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// URL path of the admin page; its actions live below it (`/restart`, `/shutdown`).
    pub path: String,
    /// Also serve the admin routes on every app port (proxied to the supervisor).
    /// Unset: on when a token is configured, off without one (a page an operator opens
    /// could otherwise reach them through the app's own address).
    pub on_app_ports: Option<bool>,
}

impl Config {
    /// Whether the node speaks mutual TLS with its controllers (`https://` URLs;
    /// [`Config::validate`] refuses a mix).
    pub fn mtls(&self) -> bool {
        self.controller.iter().any(|u| u.starts_with("https://"))
    }

    /// Whether the workers serve the admin routes on the app ports.
    pub fn app_admin(&self) -> bool {
        self.admin
            .on_app_ports
            .unwrap_or(self.control.token_file.is_some())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RestartConfig {
    /// How long a new generation may take to send `READY=1`.
    #[serde(with = "humantime_serde")]
    pub ready_timeout: Duration,
    /// How long an old generation may take to finish its requests before `SIGKILL`.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// A new generation that dies this soon after READY is rolled back to the previous exe.
    #[serde(with = "humantime_serde")]
    pub probation: Duration,
    /// While draining, an HTTP/1 connection idle this long is closed (busy ones get `Connection: close`).
    #[serde(with = "humantime_serde")]
    pub idle_grace: Duration,
    /// Directories a restart may take its executable from; empty means the directory
    /// of the executable the agent started with.
    pub allowed_exe_dirs: Vec<PathBuf>,
    /// Executables larger than this many bytes are refused before they are read
    /// (hashing one takes about a second per GB).
    pub max_exe_size: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// The server's name; it is the fd name (`LISTEN_FDNAMES`) of each of its ports.
    pub name: String,
    /// The addresses it listens on; port 0 picks a free port.
    pub listen: Vec<SocketAddr>,
    /// Serve HTTPS (HTTP/1.1 and HTTP/2 by ALPN) with this certificate.
    pub tls: Option<TlsConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub args: Vec<String>,
}

pub const DEFAULT_APP_ADDR: &str = "127.0.0.1:8199";
pub const DEFAULT_CONTROL_ADDR: &str = "127.0.0.1:7101";
pub const DEFAULT_SERVER: &str = "default";
/// 512 MiB: several times the size of the largest server binaries; hashing that much
/// takes about a second.
pub const DEFAULT_MAX_EXE_SIZE: u64 = 512 * 1024 * 1024;

impl Default for Config {
    fn default() -> Self {
        Self {
            node_id: default_node_id(),
            labels: BTreeMap::new(),
            control: ControlConfig::default(),
            admin: AdminConfig::default(),
            restart: RestartConfig::default(),
            servers: vec![ServerConfig::default()],
            controller: Vec::new(),
            join: JoinConfig::default(),
            exec: None,
            log_format: crate::logging::LogFormat::Text,
            worker_threads: 0,
            sockets_per_port: 1,
        }
    }
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_CONTROL_ADDR.parse().expect("valid default"),
            token_file: None,
            insecure: false,
            max_connections: 1024,
            idle_timeout: Duration::from_secs(60),
            header_timeout: Duration::from_secs(10),
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            path: "/debug/admin".into(),
            on_app_ports: None,
        }
    }
}

impl Default for RestartConfig {
    fn default() -> Self {
        Self {
            ready_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(60),
            probation: Duration::from_secs(5),
            idle_grace: Duration::from_secs(1),
            allowed_exe_dirs: Vec::new(),
            max_exe_size: DEFAULT_MAX_EXE_SIZE,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            name: DEFAULT_SERVER.into(),
            listen: vec![DEFAULT_APP_ADDR.parse().expect("valid default")],
            tls: None,
        }
    }
}

/// Whether an `http://` URL names a loopback host (`127.x`, `[::1]`, `localhost`).
/// The `controller` key: one URL, several separated by commas, or a list (whose
/// entries may hold commas too). Spaces around each URL and a trailing `/` are dropped.
fn controller_urls<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Urls {
        One(String),
        Many(Vec<String>),
    }
    let given = match Urls::deserialize(d)? {
        Urls::One(s) => vec![s],
        Urls::Many(v) => v,
    };
    Ok(split_urls(given.iter().map(String::as_str)))
}

/// Each of `given`, split at commas, trimmed, without a trailing `/`; empty ones dropped.
pub fn split_urls<'a>(given: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    given
        .into_iter()
        .flat_map(|s| s.split(','))
        .map(|u| u.trim().trim_end_matches('/'))
        .filter(|u| !u.is_empty())
        .map(str::to_string)
        .collect()
}

/// Whether two controller URLs name the same controller: the same scheme and
/// authority (host names compared without case).
pub fn same_controller(a: &str, b: &str) -> bool {
    let parts = |u: &str| {
        let uri = u.trim().trim_end_matches('/').parse::<http::Uri>().ok()?;
        Some((
            uri.scheme_str()?.to_ascii_lowercase(),
            uri.authority()?.clone(),
        ))
    };
    match (parts(a), parts(b)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

pub(crate) fn loopback_url(url: &str) -> bool {
    let Ok(uri) = url.parse::<http::Uri>() else {
        return false;
    };
    let host = uri.host().unwrap_or("");
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn default_node_id() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// A configuration that cannot be used, and what to change.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{0}")]
    Invalid(String),
}

impl ControlConfig {
    /// The connection limits of the control port.
    pub fn limits(&self) -> fleet_net::Limits {
        fleet_net::Limits {
            max_connections: self.max_connections,
            idle_timeout: self.idle_timeout,
            header_timeout: self.header_timeout,
            ..fleet_net::Limits::default()
        }
    }
}

impl Config {
    /// Reads a TOML file; relative paths inside it (TLS files, token file, allowed dirs)
    /// are taken relative to the file's directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        let mut config: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.into(),
            source: Box::new(source),
        })?;
        if let Some(base) = path.parent() {
            config.resolve_relative(base);
        }
        Ok(config)
    }

    fn resolve_relative(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(t) = self.control.token_file.as_mut() {
            fix(t);
        }
        if let Some(d) = self.join.identity_dir.as_mut() {
            fix(d);
        }
        if let Some(t) = self.join.join_token_file.as_mut() {
            fix(t);
        }
        for dir in &mut self.restart.allowed_exe_dirs {
            fix(dir);
        }
        for server in &mut self.servers {
            if let Some(tls) = server.tls.as_mut() {
                fix(&mut tls.cert);
                fix(&mut tls.key);
            }
        }
    }

    /// Checks everything that can be checked without binding: names, paths, timeouts
    /// and the rule that control is never exposed beyond loopback without a token.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |msg: String| Err(ConfigError::Invalid(msg));
        // The controller refuses a heartbeat (or a static node's status) over these
        // limits: refuse to start with them rather than run unseen by it.
        if let Err(e) = fleet_proto::limits::check_node_id(&self.node_id) {
            return bad(format!(
                "{e}: set --node-id (or node_id in the config file; the default is the host name)"
            ));
        }
        if let Err(e) = fleet_proto::limits::check_labels(&self.labels) {
            return bad(format!("{e}: fix --label (or [labels] in the config file)"));
        }
        if self.servers.is_empty() {
            return bad("no servers configured: add a [[servers]] table or --listen ADDR".into());
        }
        if self.worker_threads > MAX_WORKER_THREADS {
            return bad(format!(
                "worker_threads {} is more than {MAX_WORKER_THREADS}: give the threads each \
                 worker runs (0: one per CPU)",
                self.worker_threads
            ));
        }
        if self.sockets_per_port > MAX_SOCKETS_PER_PORT {
            return bad(format!(
                "sockets_per_port {} is more than {MAX_SOCKETS_PER_PORT}: give the listening \
                 sockets each address gets (1: one, 0: one per CPU)",
                self.sockets_per_port
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        for server in &self.servers {
            if server.name.is_empty()
                || !server
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return bad(format!(
                    "server name {:?} is not valid: use letters, digits, '-', '_' or '.'",
                    server.name
                ));
            }
            if !names.insert(server.name.as_str()) {
                return bad(format!(
                    "server name {:?} is used twice: give each [[servers]] its own name",
                    server.name
                ));
            }
            if server.listen.is_empty() {
                return bad(format!(
                    "server {:?} has no listen address: add listen = [\"127.0.0.1:8199\"]",
                    server.name
                ));
            }
            if let Some(tls) = &server.tls {
                for (what, p) in [("cert", &tls.cert), ("key", &tls.key)] {
                    if !p.is_file() {
                        return bad(format!(
                            "server {:?}: TLS {what} file {} does not exist: give the path of a PEM file",
                            server.name,
                            p.display()
                        ));
                    }
                }
            }
        }
        if !self.admin.path.starts_with('/') || self.admin.path.len() < 2 {
            return bad(format!(
                "admin path {:?} must start with '/' and not be '/' alone, e.g. /debug/admin",
                self.admin.path
            ));
        }
        if !self
            .admin
            .path
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/-_.~".contains(c))
        {
            // It is also the session cookie's Path attribute.
            return bad(format!(
                "admin path {:?} may only hold letters, digits and / - _ . ~",
                self.admin.path
            ));
        }
        if self.admin.path.ends_with('/') {
            return bad(format!(
                "admin path {:?} must not end with '/'",
                self.admin.path
            ));
        }
        if self.restart.ready_timeout.is_zero() || self.restart.drain_timeout.is_zero() {
            return bad("ready_timeout and drain_timeout must be greater than zero".into());
        }
        if self.restart.max_exe_size == 0 {
            return bad(
                "restart.max_exe_size is 0, which refuses every executable: give a size in bytes, e.g. 536870912 (512 MiB)".into(),
            );
        }
        if self.control.idle_timeout.is_zero() || self.control.header_timeout.is_zero() {
            return bad(
                "control.idle_timeout and control.header_timeout must be greater than zero, \
                 e.g. \"60s\" and \"10s\""
                    .into(),
            );
        }
        if self.control.max_connections == 0 {
            return bad("control.max_connections must be at least 1".into());
        }
        if let Some(path) = &self.control.token_file
            && !path.is_file()
        {
            return bad(format!(
                "token file {} does not exist: write a token into it or drop --token-file",
                path.display()
            ));
        }
        // With mutual TLS the controller proves itself with its certificate; anyone
        // else beyond loopback still needs the token.
        if self.control.token_file.is_none() && !self.control.insecure {
            if !self.control.listen.ip().is_loopback() && !self.mtls() {
                return bad(format!(
                    "refusing to expose the control endpoint on {} without a token: set --token-file \
                     (or control.token_file), listen on 127.0.0.1, or pass --insecure-control",
                    self.control.listen
                ));
            }
            if self.app_admin()
                && let Some(addr) = self
                    .servers
                    .iter()
                    .flat_map(|s| &s.listen)
                    .find(|a| !a.ip().is_loopback())
            {
                return bad(format!(
                    "refusing to serve {} on app port {addr} without a token: set --token-file, \
                     pass --no-app-admin, or pass --insecure-control",
                    self.admin.path
                ));
            }
        }
        for (i, url) in self.controller.iter().enumerate() {
            if !(url.starts_with("http://") || url.starts_with("https://"))
                || url.parse::<http::Uri>().is_err()
            {
                return bad(format!(
                    "controller URL {url:?} is not a URL: write http://HOST:PORT or https://HOST:PORT"
                ));
            }
            if self.controller[..i].iter().any(|u| same_controller(u, url)) {
                return bad(format!("controller URL {url} is listed twice"));
            }
            if url.starts_with("http://") && !self.control.insecure && !loopback_url(url) {
                return bad(format!(
                    "refusing to speak to the controller {url} in clear beyond loopback: the heartbeat \
                     and the token would cross the network readable and forgeable; use https:// with \
                     --identity-dir, --join-token-file and --ca-hash, or pass --insecure-control"
                ));
            }
        }
        if self.mtls()
            && let Some(url) = self.controller.iter().find(|u| u.starts_with("http://"))
        {
            return bad(format!(
                "controller URL {url} is http:// beside https:// ones: the controllers of one fleet \
                 all speak mutual TLS (--tls) or none does"
            ));
        }
        if self.mtls() {
            let Some(dir) = &self.join.identity_dir else {
                return bad(
                    "an https:// controller needs --identity-dir DIR (where the node keeps its \
                     key and certificate)"
                        .into(),
                );
            };
            if !dir.join("node.crt").exists()
                && (self.join.join_token_file.is_none() || self.join.ca_hash.is_none())
            {
                return bad(format!(
                    "no node certificate in {} yet: join with --join-token-file FILE (a token from \
                     `fleetctl token create --join`) and --ca-hash sha256:… (the controller logs it)",
                    dir.display()
                ));
            }
            if let Some(pin) = &self.join.ca_hash {
                fleet_net::tls::parse_fingerprint(pin).map_err(ConfigError::Invalid)?;
            }
            fleet_net::tls::check_node_name(&self.node_id).map_err(ConfigError::Invalid)?;
        }
        Ok(())
    }

    /// Reads the token file, if any.
    pub fn token(&self) -> Result<Option<String>, ConfigError> {
        let Some(path) = &self.control.token_file else {
            return Ok(None);
        };
        let token = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?
            .trim()
            .to_string();
        if token.is_empty() {
            return Err(ConfigError::Invalid(format!(
                "token file {} is empty: write a token into it",
                path.display()
            )));
        }
        Ok(Some(token))
    }

    /// The listening sockets each address gets (`sockets_per_port`, 0 resolved to the
    /// CPUs this process may run on).
    pub fn sockets_per_port(&self) -> usize {
        match self.sockets_per_port {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
        .min(MAX_SOCKETS_PER_PORT)
    }

    pub fn server(&self, name: &str) -> Option<&ServerConfig> {
        self.servers.iter().find(|s| s.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_demo() {
        let config: Config = toml::from_str("").unwrap();
        assert_eq!(config.servers[0].listen[0].to_string(), DEFAULT_APP_ADDR);
        assert_eq!(config.restart.drain_timeout, Duration::from_secs(60));
        config.validate().unwrap();
    }

    #[test]
    fn durations_are_human_strings() {
        let config: Config =
            toml::from_str("[restart]\nready_timeout = \"1500ms\"\ndrain_timeout = \"2m\"")
                .unwrap();
        assert_eq!(config.restart.ready_timeout, Duration::from_millis(1500));
        assert_eq!(config.restart.drain_timeout, Duration::from_secs(120));
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = toml::from_str::<Config>("[restart]\ndrain = \"1s\"").unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn control_beyond_loopback_needs_a_token() {
        let config = Config {
            control: ControlConfig {
                listen: "0.0.0.0:7101".parse().unwrap(),
                ..Default::default()
            },
            ..Default::default()
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("without a token"), "{err}");
        let insecure = Config {
            control: ControlConfig {
                insecure: true,
                ..config.control.clone()
            },
            ..config
        };
        insecure.validate().unwrap();
    }

    #[test]
    fn public_app_port_with_admin_needs_a_token() {
        let config = Config {
            servers: vec![ServerConfig {
                listen: vec!["0.0.0.0:8080".parse().unwrap()],
                ..Default::default()
            }],
            admin: AdminConfig {
                on_app_ports: Some(true),
                ..Default::default()
            },
            ..Default::default()
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("--no-app-admin"), "{err}");
        // Unset means off without a token: nothing to refuse.
        let default = Config {
            admin: AdminConfig::default(),
            ..config
        };
        assert!(!default.app_admin());
        default.validate().unwrap();
    }

    #[test]
    fn app_admin_follows_the_token_unless_set() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "t").unwrap();
        let mut config = Config::default();
        assert!(!config.app_admin());
        config.control.token_file = Some(token);
        assert!(config.app_admin());
        config.admin.on_app_ports = Some(false);
        assert!(!config.app_admin());
    }

    #[test]
    fn worker_threads_are_one_per_cpu_unless_given_and_bounded() {
        assert_eq!(Config::default().worker_threads, 0, "0: one per CPU");
        let config: Config = toml::from_str("worker_threads = 2").unwrap();
        assert_eq!(config.worker_threads, 2);
        config.validate().unwrap();
        let config: Config = toml::from_str("worker_threads = 5000").unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(
            err.contains("worker_threads 5000 is more than 1024"),
            "{err}"
        );
    }

    #[test]
    fn sockets_per_port_is_one_unless_given_zero_is_per_cpu_and_bounded() {
        assert_eq!(Config::default().sockets_per_port(), 1);
        let config: Config = toml::from_str("sockets_per_port = 0").unwrap();
        config.validate().unwrap();
        assert_eq!(
            config.sockets_per_port(),
            std::thread::available_parallelism().unwrap().get()
        );
        let config: Config = toml::from_str("sockets_per_port = 300").unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(
            err.contains("sockets_per_port 300 is more than 256"),
            "{err}"
        );
    }

    #[test]
    fn node_ids_and_labels_the_controller_would_refuse_are_refused() {
        let config = Config {
            node_id: "web 1".into(),
            ..Default::default()
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.starts_with("node_id \"web 1\" holds ' '"), "{err}");
        assert!(err.contains("set --node-id"), "{err}");
        let config = Config {
            node_id: "web-1".into(),
            labels: [("zone".to_string(), "a".repeat(300))].into(),
            ..Default::default()
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("is 300 bytes, over the limit of 256"), "{err}");
        assert!(err.contains("--label"), "{err}");
    }

    #[test]
    fn controllers_are_one_url_a_comma_separated_string_or_a_list() {
        let urls = |toml: &str| toml::from_str::<Config>(toml).unwrap().controller;
        assert_eq!(
            urls(r#"controller = "http://127.0.0.1:7100""#),
            ["http://127.0.0.1:7100"]
        );
        assert_eq!(
            urls(r#"controller = "http://127.0.0.1:7100, http://127.0.0.1:7200/""#),
            ["http://127.0.0.1:7100", "http://127.0.0.1:7200"]
        );
        assert_eq!(
            urls(r#"controller = ["https://c1:7100", "https://c2:7100"]"#),
            ["https://c1:7100", "https://c2:7100"]
        );
        assert!(urls("").is_empty());
        // Printed (`--print-config`) as a list, and read back the same.
        let config = Config {
            controller: vec![
                "http://127.0.0.1:7100".into(),
                "http://127.0.0.1:7200".into(),
            ],
            ..Default::default()
        };
        let printed = toml::to_string(&config).unwrap();
        assert_eq!(
            toml::from_str::<Config>(&printed).unwrap().controller,
            config.controller
        );
        assert!(
            !toml::to_string(&Config::default())
                .unwrap()
                .contains("controller")
        );
    }

    #[test]
    fn controller_lists_are_checked_url_by_url() {
        let check = |urls: &[&str]| {
            Config {
                controller: urls.iter().map(|u| u.to_string()).collect(),
                ..Default::default()
            }
            .validate()
            .map_err(|e| e.to_string())
        };
        check(&["http://127.0.0.1:7100", "http://localhost:7200"]).unwrap();
        let err = check(&["http://127.0.0.1:7100", "http://10.0.0.2:7100"]).unwrap_err();
        assert!(err.contains("in clear beyond loopback"), "{err}");
        let err = check(&["http://localhost:7100", "http://LOCALHOST:7100/"]).unwrap_err();
        assert!(err.contains("listed twice"), "{err}");
        let err = check(&["ftp://127.0.0.1:7100"]).unwrap_err();
        assert!(err.contains("is not a URL"), "{err}");
        let err = check(&["https://10.0.0.1:7100", "http://127.0.0.1:7100"]).unwrap_err();
        assert!(err.contains("all speak mutual TLS"), "{err}");
    }

    #[test]
    fn duplicate_server_names_are_refused() {
        let config = Config {
            servers: vec![ServerConfig::default(), ServerConfig::default()],
            ..Default::default()
        };
        assert!(config.validate().unwrap_err().to_string().contains("twice"));
    }
}
