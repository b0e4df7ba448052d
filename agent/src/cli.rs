//! Command-line flags, merged on top of the config file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::config::{Config, ConfigError, DEFAULT_SERVER, ExecConfig, ServerConfig};

/// fleet-agent: zero-downtime restarts for one node.
///
/// A supervisor with a stable PID owns the listening sockets and hands them to worker
/// generations. Restart with SIGUSR1, POST /debug/admin/restart, or gRPC
/// AgentService.Restart; shut down gracefully with SIGTERM, SIGINT, SIGQUIT or SIGHUP.
/// With no arguments it runs the demo app on 127.0.0.1:8199 (control on 127.0.0.1:7101).
#[derive(Debug, Clone, Default, Parser)]
#[command(name = "fleet-agent", version, about, long_about)]
pub struct Cli {
    /// TOML configuration file (servers, ports, TLS, admin path, timeouts, token...).
    /// Flags override it.
    #[arg(short, long, value_name = "PATH", env = "FLEET_AGENT_CONFIG")]
    pub config: Option<PathBuf>,

    /// Log lines as text, or as one JSON object per line (workers log as the
    /// supervisor does) [default: the config's log_format, else text].
    #[arg(long, value_name = "FORMAT", value_enum, env = "FLEET_LOG_FORMAT")]
    pub log_format: Option<crate::logging::LogFormat>,

    /// Listen address of the default server (repeatable). Replaces the ports of the
    /// server named "default" (or of the only server). Port 0 picks a free port.
    #[arg(long, value_name = "ADDR")]
    pub listen: Vec<SocketAddr>,

    /// Control endpoint address: gRPC AgentService, /debug/admin, /healthz, /metrics.
    /// [default: 127.0.0.1:7101]
    #[arg(long, value_name = "ADDR")]
    pub control: Option<SocketAddr>,

    /// This node's id in the fleet [default: the host name].
    #[arg(long, value_name = "ID")]
    pub node_id: Option<String>,

    /// A label the controller selects nodes by (repeatable).
    #[arg(long, value_name = "KEY=VALUE", value_parser = parse_label)]
    pub label: Vec<(String, String)>,

    /// The fleet controller to register with, e.g. http://127.0.0.1:7100; several
    /// controllers sharing one store: their URLs separated by commas (heartbeats go to
    /// one at a time, and follow the leader among them).
    #[arg(long, value_name = "URL[,URL...]")]
    pub controller: Option<String>,

    /// Where the node keeps its key and certificate for an https:// controller.
    #[arg(long, value_name = "DIR")]
    pub identity_dir: Option<PathBuf>,

    /// File with a join token (`fleetctl token create --join`), to get the node's
    /// certificate from an https:// controller the first time.
    #[arg(long, value_name = "PATH")]
    pub join_token_file: Option<PathBuf>,

    /// The fleet CA's fingerprint (sha256:…, in the controller's log), trusted when joining.
    #[arg(long, value_name = "SHA256")]
    pub ca_hash: Option<String>,

    /// File with the bearer token every control request must carry.
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,

    /// Allow control (and app-port admin) beyond loopback without a token. Dangerous:
    /// anyone who can reach the port can restart the node into any allowed executable.
    #[arg(long)]
    pub insecure_control: bool,

    /// Most connections to the control port at once [default: 1024; fewer where
    /// RLIMIT_NOFILE minus 128 is lower]. At the cap, a new connection closes the
    /// one idle the longest.
    #[arg(long, value_name = "N")]
    pub control_max_connections: Option<usize>,

    /// A control connection with no request in progress this long is closed
    /// [default: 60s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub control_idle_timeout: Option<Duration>,

    /// A control connection must send a whole request head this soon after it opens
    /// [default: 10s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub control_header_timeout: Option<Duration>,

    /// Directory a restart may take a new executable from (repeatable)
    /// [default: the directory of the starting executable].
    #[arg(long, value_name = "DIR")]
    pub allowed_exe_dir: Vec<PathBuf>,

    /// Refuse executables larger than this many bytes [default: 536870912 (512 MiB)].
    #[arg(long, value_name = "BYTES")]
    pub max_exe_size: Option<u64>,

    /// How long a new generation may take to become ready [default: 30s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub ready_timeout: Option<Duration>,

    /// How long an old generation may drain before it is killed [default: 60s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub drain_timeout: Option<Duration>,

    /// Threads of each worker's runtime, for the agent's own app; 0 is one per CPU
    /// [default: 0].
    #[arg(long, value_name = "N")]
    pub worker_threads: Option<usize>,

    /// Listening sockets per address in one SO_REUSEPORT group, each with its own
    /// accept loop; 0 is one per CPU [default: 1].
    #[arg(long, value_name = "N")]
    pub sockets_per_port: Option<usize>,

    /// A new generation dying this soon after READY is rolled back [default: 5s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub probation: Option<Duration>,

    /// While draining, idle keep-alive connections are closed after this long [default: 1s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub idle_grace: Option<Duration>,

    /// URL path of the admin page and routes [default: /debug/admin].
    #[arg(long, value_name = "PATH")]
    pub admin_path: Option<String>,

    /// Also serve the admin routes on the app ports (proxied to the supervisor)
    /// [default: on with --token-file, off without]. Without a token the app ports must
    /// then be on loopback.
    #[arg(long, conflicts_with = "no_app_admin")]
    pub app_admin: bool,

    /// Do not serve the admin routes on the app ports (only on the control endpoint).
    #[arg(long)]
    pub no_app_admin: bool,

    /// Supervise this program instead of the built-in app. It gets its listeners as
    /// fds 3.. (LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES), must send READY=1 to
    /// NOTIFY_SOCKET, and must drain and exit on SIGTERM. Arguments follow `--`.
    #[arg(long, value_name = "PATH")]
    pub exec: Option<PathBuf>,

    /// Arguments for the --exec program.
    #[arg(last = true, value_name = "ARGS")]
    pub exec_args: Vec<String>,

    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,

    /// Ask the agent this configuration describes whether it serves (GET /healthz on
    /// its control port, on loopback for a wildcard address) and exit 0 if so, 1 if
    /// not: a container HEALTHCHECK or a liveness probe with no curl at hand.
    #[arg(long, conflicts_with = "print_config")]
    pub health_check: bool,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("label {s:?} must look like KEY=VALUE")),
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration ({e}); write e.g. 500ms, 30s or 2m"))
}

impl Cli {
    /// The config file (or the defaults) with every given flag applied, validated.
    pub fn config(&self) -> Result<Config, ConfigError> {
        let mut config = match &self.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        self.apply(&mut config);
        config.validate()?;
        Ok(config)
    }

    /// The control address a `--health-check` asks: the config file's and flags'
    /// merged, without the checks only a running agent needs (a token file the
    /// probe never reads, say).
    pub fn control_addr(&self) -> Result<SocketAddr, ConfigError> {
        let mut config = match &self.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        self.apply(&mut config);
        Ok(config.control.listen)
    }

    fn apply(&self, config: &mut Config) {
        if !self.listen.is_empty() {
            let only_one = config.servers.len() == 1;
            match config
                .servers
                .iter_mut()
                .find(|s| s.name == DEFAULT_SERVER || only_one)
            {
                Some(server) => server.listen = self.listen.clone(),
                None => config.servers.push(ServerConfig {
                    listen: self.listen.clone(),
                    ..Default::default()
                }),
            }
        }
        if let Some(addr) = self.control {
            config.control.listen = addr;
        }
        if let Some(format) = self.log_format {
            config.log_format = format;
        }
        if let Some(id) = &self.node_id {
            config.node_id = id.clone();
        }
        config.labels.extend(self.label.iter().cloned());
        if let Some(urls) = &self.controller {
            config.controller = crate::config::split_urls([urls.as_str()]);
        }
        if let Some(path) = &self.token_file {
            config.control.token_file = Some(path.clone());
        }
        if let Some(dir) = &self.identity_dir {
            config.join.identity_dir = Some(dir.clone());
        }
        if let Some(path) = &self.join_token_file {
            config.join.join_token_file = Some(path.clone());
        }
        if let Some(pin) = &self.ca_hash {
            config.join.ca_hash = Some(pin.clone());
        }
        config.control.insecure |= self.insecure_control;
        let c = &mut config.control;
        c.max_connections = self.control_max_connections.unwrap_or(c.max_connections);
        c.idle_timeout = self.control_idle_timeout.unwrap_or(c.idle_timeout);
        c.header_timeout = self.control_header_timeout.unwrap_or(c.header_timeout);
        config
            .restart
            .allowed_exe_dirs
            .extend(self.allowed_exe_dir.iter().cloned());
        config.worker_threads = self.worker_threads.unwrap_or(config.worker_threads);
        config.sockets_per_port = self.sockets_per_port.unwrap_or(config.sockets_per_port);
        let r = &mut config.restart;
        r.ready_timeout = self.ready_timeout.unwrap_or(r.ready_timeout);
        r.drain_timeout = self.drain_timeout.unwrap_or(r.drain_timeout);
        r.probation = self.probation.unwrap_or(r.probation);
        r.idle_grace = self.idle_grace.unwrap_or(r.idle_grace);
        r.max_exe_size = self.max_exe_size.unwrap_or(r.max_exe_size);
        if let Some(path) = &self.admin_path {
            config.admin.path = path.clone();
        }
        if self.app_admin {
            config.admin.on_app_ports = Some(true);
        }
        if self.no_app_admin {
            config.admin.on_app_ports = Some(false);
        }
        if let Some(path) = &self.exec {
            config.exec = Some(ExecConfig {
                path: path.clone(),
                args: self.exec_args.clone(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_defaults() {
        let cli = Cli::parse_from([
            "fleet-agent",
            "--listen",
            "127.0.0.1:0",
            "--listen",
            "127.0.0.1:0",
            "--drain-timeout",
            "2s",
            "--label",
            "zone=a",
            "--max-exe-size",
            "2048",
            "--worker-threads",
            "1",
            "--exec",
            "/bin/app",
            "--",
            "-v",
        ]);
        let config = cli.config().unwrap();
        assert_eq!(config.servers[0].listen.len(), 2);
        assert_eq!(config.restart.drain_timeout, Duration::from_secs(2));
        assert_eq!(config.labels["zone"], "a");
        assert_eq!(config.restart.max_exe_size, 2048);
        assert_eq!(config.worker_threads, 1);
        assert_eq!(config.exec.unwrap().args, vec!["-v".to_string()]);
    }

    #[test]
    fn control_connection_limits_come_from_flags() {
        let cli = Cli::parse_from([
            "fleet-agent",
            "--control-max-connections",
            "64",
            "--control-idle-timeout",
            "3s",
            "--control-header-timeout",
            "2s",
        ]);
        let limits = cli.config().unwrap().control.limits();
        assert_eq!(limits.max_connections, 64);
        assert_eq!(limits.idle_timeout, Duration::from_secs(3));
        assert_eq!(limits.header_timeout, Duration::from_secs(2));
        let zero = Cli::parse_from(["fleet-agent", "--control-idle-timeout", "0s"]);
        let err = zero.config().unwrap_err().to_string();
        assert!(err.contains("greater than zero"), "{err}");
    }

    #[test]
    fn app_admin_flags_set_it_and_exclude_each_other() {
        let on = Cli::parse_from(["fleet-agent", "--app-admin"])
            .config()
            .unwrap();
        assert_eq!(on.admin.on_app_ports, Some(true));
        let off = Cli::parse_from(["fleet-agent", "--no-app-admin"])
            .config()
            .unwrap();
        assert_eq!(off.admin.on_app_ports, Some(false));
        assert!(Cli::try_parse_from(["fleet-agent", "--app-admin", "--no-app-admin"]).is_err());
        let public = Cli::parse_from(["fleet-agent", "--app-admin", "--listen", "0.0.0.0:0"]);
        assert!(public.config().is_err(), "public app port, admin, no token");
    }

    #[test]
    fn bad_duration_says_how_to_write_one() {
        let err = Cli::try_parse_from(["fleet-agent", "--ready-timeout", "soon"]).unwrap_err();
        assert!(err.to_string().contains("500ms"), "{err}");
    }
}
