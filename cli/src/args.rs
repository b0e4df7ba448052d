//! Command-line arguments, and every check fleetctl makes before it calls the controller.
//!
//! Values are checked by clap value parsers (`parse`), so a mistake is reported with the flag it
//! came from and ends with exit code 2 before any connection is made.

pub(crate) mod parse;

use std::time::Duration;

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};
use fleet_proto::v1::RolloutSpec;

use self::parse::{
    parse_batches, parse_canary, parse_controller_url, parse_duration, parse_exe,
    parse_health_path, parse_max_failures, parse_max_parallel, parse_max_unavailable,
    parse_node_id, parse_selector, parse_sha256, parse_soak, parse_token,
};
use crate::exit::EXIT_CODES_HELP;

/// fleetctl: zero-downtime restarts across a fleet.
///
/// Lists the nodes the Fleet controller knows, restarts one, and rolls a new executable
/// across many in health-gated batches, watching the progress. It talks gRPC to
/// fleet-controller: set --controller or FLEET_CONTROLLER, and FLEET_TOKEN when the
/// controller requires a token.
#[derive(Debug, Parser)]
#[command(
    name = "fleetctl",
    version,
    after_help = "Exit codes: 0 success, 1 failed, 2 bad input or preflight refused, 3 rolled back (see --help).",
    after_long_help = EXIT_CODES_HELP
)]
pub struct Cli {
    /// URL of the controller's gRPC API; "host:port" means http://host:port. Several
    /// controllers sharing one store: their URLs separated by commas. A command goes to
    /// the first that answers; a change a follower refuses goes to the leader it names.
    #[arg(
        long,
        global = true,
        value_name = "URL[,URL...]",
        env = "FLEET_CONTROLLER",
        default_value = "http://127.0.0.1:7100",
        value_delimiter = ',',
        value_parser = parse_controller_url
    )]
    pub controller: Vec<String>,

    /// Bearer token for a controller that requires one. Prefer the FLEET_TOKEN variable:
    /// a command-line argument is visible to other users of the machine.
    #[arg(
        long,
        global = true,
        value_name = "TOKEN",
        env = "FLEET_TOKEN",
        hide_env_values = true,
        value_parser = parse_token
    )]
    pub token: Option<String>,

    /// A file holding the bearer token (one line; mode 0600 or stricter), instead of
    /// --token: the token never appears in the process list or the environment.
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        env = "FLEET_TOKEN_FILE",
        conflicts_with = "token"
    )]
    pub token_file: Option<std::path::PathBuf>,

    /// The fleet CA's certificate (ca.crt in the controller's TLS directory), to trust
    /// an https:// controller (one started with --tls).
    #[arg(long, global = true, value_name = "PATH", env = "FLEET_CA_CERT")]
    pub ca_cert: Option<std::path::PathBuf>,

    /// Output format: aligned tables for people, or JSON (the proto's field names).
    #[arg(short, long, global = true, value_enum, default_value_t = Format::Table)]
    pub output: Format,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List the nodes: state, labels, executable, generation, PIDs and admin URL.
    ///
    /// A table shows the first 100 nodes (by node id) that match; when more match, the
    /// counts by state come first and a line on stderr says how many were left out and
    /// how to see them. -o json prints every matching node unless --limit is given,
    /// fetched and written a page at a time. --summary prints only the counts.
    Nodes(NodesArgs),
    /// Show everything the controller knows about one node.
    Node(NodeArgs),
    /// Restart one node now, outside any rollout, into its current or a new executable.
    ///
    /// Returns when the node's new worker is ready (exit 0) or has failed (exit 1, with
    /// the reason and the last lines it wrote to stderr); the old worker keeps serving
    /// if the new one fails.
    Restart(RestartArgs),
    /// Shut one node down gracefully: its agent drains every worker and exits.
    Shutdown(ShutdownArgs),
    /// Remove a stopped or unreachable node from the controller's inventory.
    ///
    /// A node that is still heartbeating is refused (exit 2): it would register again
    /// at its next heartbeat; shut it down first.
    Forget(NodeArgs),
    /// Roll a new executable across the fleet in health-gated batches; or manage rollouts.
    ///
    /// `fleetctl rollout --exe PATH [OPTIONS]` preflights every selected node (nothing is
    /// touched if one refuses), then restarts the nodes batch by batch, each node gated
    /// on its health, and watches: one line per batch and per node phase change, and a
    /// summary. With --detach it returns once the rollout has started; with --dry-run
    /// it prints the plan and changes nothing.
    ///
    /// `fleetctl rollout status|history|pause|resume|abort|undo` manage rollouts.
    Rollout(Box<RolloutArgs>),
    /// Create, list and revoke tokens: operator tokens with a role, join tokens for agents.
    ///
    /// Needs an admin token (or the controller's --token-file token). A token's secret
    /// is printed once, when it is created; the controller keeps only its digest.
    Token(TokenArgs),
    /// Show this fleetctl's version and the controller's (also `fleetctl --version`).
    ///
    /// Exits 1 when the controller cannot be reached (its version is then unknown).
    Version,
    /// The controllers sharing the store (etcd): which leads and since when, and the
    /// health of each etcd member. A controller with its own SQLite file leads alone.
    ///
    /// Exits 1 when the store has no quorum (no controller can change anything then).
    Controllers,
    /// Print a shell completion script: `fleetctl completion bash > /etc/bash_completion.d/fleetctl`
    /// (zsh: into a directory of $fpath as _fleetctl; fish: ~/.config/fish/completions/fleetctl.fish).
    Completion(CompletionArgs),
    /// Write man pages (fleetctl.1 and one per subcommand, e.g. fleetctl-rollout.1) into DIR.
    Man(ManArgs),
}

#[derive(Debug, Args)]
pub struct CompletionArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub struct ManArgs {
    /// Directory to write the pages into (created if missing).
    #[arg(default_value = ".")]
    pub dir: std::path::PathBuf,
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    #[command(subcommand)]
    pub action: TokenAction,
}

#[derive(Debug, Subcommand)]
pub enum TokenAction {
    /// Create a token and print its secret (once).
    ///
    /// `--role viewer|operator|admin --name NAME` makes an operator token: viewer reads
    /// (nodes, rollouts, the dashboard), operator also restarts nodes and runs rollouts,
    /// admin also manages tokens and forgets nodes. Its name is recorded as the actor of
    /// what it does. `--join` makes a join token, which lets agents join the fleet and
    /// is refused as an operator credential.
    Create(CreateTokenArgs),
    /// List every token: id, name, role, created, expires, last used, and whether it is
    /// revoked or expired (never a secret).
    List,
    /// Revoke a token: it is refused from its next call on.
    Revoke(RevokeTokenArgs),
}

/// A token's role, as the controller spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoleArg {
    Viewer,
    Operator,
    Admin,
}

impl RoleArg {
    pub fn as_str(self) -> &'static str {
        match self {
            RoleArg::Viewer => "viewer",
            RoleArg::Operator => "operator",
            RoleArg::Admin => "admin",
        }
    }
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("kind").required(true).args(["role", "join"])))]
pub struct CreateTokenArgs {
    /// The role of an operator token.
    #[arg(long, value_enum)]
    pub role: Option<RoleArg>,

    /// A join token, for agents joining the fleet (no operator credential).
    #[arg(long)]
    pub join: bool,

    /// Who or what the token is for (required with --role); recorded as the actor of
    /// what it does [default with --join: "join"].
    #[arg(long, value_name = "NAME", required_unless_present = "join")]
    pub name: Option<String>,

    /// How long it is valid, e.g. 1h or 30d [default: no expiry with --role, 1h with --join].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub ttl: Option<Duration>,

    /// With --join: a joining node's id must start with this, e.g. web-.
    #[arg(long, value_name = "PREFIX", conflicts_with = "role")]
    pub node_id_prefix: Option<String>,

    /// With --join: how many nodes may join with it [default: any number until it expires].
    #[arg(long, value_name = "N", conflicts_with = "role", value_parser = clap::value_parser!(u32).range(1..))]
    pub uses: Option<u32>,
}

#[derive(Debug, Args)]
pub struct RevokeTokenArgs {
    /// The token's id, as `fleetctl token list` shows it (t3f9a1b2c).
    #[arg(value_name = "ID")]
    pub id: String,
}

/// The nodes a table shows when neither --limit nor --all is given.
pub const DEFAULT_NODES_SHOWN: u32 = 100;

/// The most nodes the controller sends in one answer (its own cap).
pub const MAX_PAGE_SIZE: u32 = 5_000;

#[derive(Debug, Args)]
pub struct NodesArgs {
    /// Only nodes with these labels, "KEY=VALUE[,KEY=VALUE...]" (repeatable; all must match).
    #[arg(short = 'l', long = "selector", value_name = "SELECTOR", value_parser = parse_selector)]
    pub selector: Vec<String>,

    /// Only nodes in this state, as the controller shows it (unreachable: it missed its
    /// heartbeats).
    #[arg(long, value_name = "STATE", value_parser = node_states())]
    pub state: Option<String>,

    /// Show at most N nodes, in node id order [default: 100 in a table, every node with
    /// -o json].
    #[arg(long, value_name = "N", conflicts_with = "all",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub limit: Option<u32>,

    /// Show every matching node, however many (a table of a large fleet is long).
    #[arg(long)]
    pub all: bool,

    /// Only the counts: how many nodes match, by state, and the most common labels.
    #[arg(long, conflicts_with_all = ["limit", "all"])]
    pub summary: bool,

    /// Nodes asked for in one call (the controller sends at most 5000); tests use a
    /// small one to exercise paging.
    #[arg(long, hide = true, value_name = "N", default_value_t = MAX_PAGE_SIZE,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_PAGE_SIZE)))]
    pub page_size: u32,
}

/// `--state`: the states a node is shown in, offered by shell completion too.
fn node_states() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(
        fleet_proto::limits::NODE_STATES
            .iter()
            .copied()
            .chain(["unreachable"]),
    )
}

#[derive(Debug, Args)]
pub struct NodeArgs {
    /// The node's id (see `fleetctl nodes`).
    pub node: String,
}

#[derive(Debug, Args)]
pub struct RestartArgs {
    /// The node's id (see `fleetctl nodes`).
    pub node: String,

    /// New executable: an absolute path on the node, inside one of its agent's allowed
    /// directories [default: the node's current executable].
    #[arg(long, value_name = "PATH", value_parser = parse_exe)]
    pub exe: Option<String>,

    /// Expected sha256 of the executable (64 hex digits); the node refuses a mismatch.
    #[arg(long, value_name = "HEX", value_parser = parse_sha256)]
    pub sha256: Option<String>,

    /// Why: recorded in the node's logs and events.
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,

    /// Restart it even though an active rollout has not finished with it (refused
    /// otherwise); the controller logs it with your token's name and writes it into the
    /// node's timeline in that rollout.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct ShutdownArgs {
    /// The node's id (see `fleetctl nodes`).
    pub node: String,

    /// Why: recorded in the node's logs.
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,

    /// Shut it down even though an active rollout has not finished with it (refused
    /// otherwise); logged with your token's name and written into that rollout.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
#[command(
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    after_long_help = EXIT_CODES_HELP
)]
pub struct RolloutArgs {
    #[command(subcommand)]
    pub action: Option<RolloutAction>,

    #[command(flatten)]
    pub start: StartArgs,
}

/// How to start a rollout: the fields of the proto's RolloutSpec.
#[derive(Debug, Default, Args)]
pub struct StartArgs {
    /// The new executable: an absolute path on the nodes, inside their agents' allowed
    /// directories. Every node checks it before any node is restarted.
    #[arg(long, value_name = "PATH", required = true, value_parser = parse_exe)]
    pub exe: Option<String>,

    /// Expected sha256 of the executable (64 hex digits); a node whose copy differs
    /// refuses the rollout in preflight.
    #[arg(long, value_name = "HEX", value_parser = parse_sha256)]
    pub sha256: Option<String>,

    /// Only nodes with these labels, "KEY=VALUE[,KEY=VALUE...]" (repeatable; all must
    /// match) [default: every node].
    #[arg(short = 'l', long = "selector", value_name = "SELECTOR", value_parser = parse_selector)]
    pub selector: Vec<String>,

    /// Cumulative batch sizes, as node counts or percentages of the targets: "1,10%,100%"
    /// restarts one node, then up to 10% of them, then the rest
    /// [default: one node at a time].
    #[arg(long, value_name = "LIST", value_parser = parse_batches, conflicts_with = "max_parallel")]
    pub batches: Option<String>,

    /// Batches of N nodes each (instead of --batches).
    #[arg(long, value_name = "N", value_parser = parse_max_parallel)]
    pub max_parallel: Option<u32>,

    /// How many targets may be down at once, a count or a percentage ("1", "25%")
    /// [default: a whole batch at once].
    #[arg(long, value_name = "N|N%", value_parser = parse_max_unavailable)]
    pub max_unavailable: Option<String>,

    /// Restart this many nodes first, as a batch of their own.
    #[arg(long, value_name = "N", value_parser = parse_canary)]
    pub canary: Option<u32>,

    /// Pause after the canary batch until `fleetctl rollout resume ID`.
    #[arg(long, requires = "canary")]
    pub pause_after_canary: bool,

    /// How long a restarted node must keep serving before it counts as healthy ("30s";
    /// "0s": no soak) [default: the controller's --default-min-healthy, 10s unless set
    /// otherwise; `rollout status` shows the value used].
    #[arg(long, value_name = "DURATION", value_parser = parse_soak)]
    pub min_healthy: Option<Duration>,

    /// How long a node's new worker may take to become ready [default: the agent's].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub ready_timeout: Option<Duration>,

    /// How long a node's old worker may drain before it is killed [default: the agent's].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub drain_timeout: Option<Duration>,

    /// HTTP path checked on each node's first app port after its restart, e.g. /healthz
    /// [default: no HTTP check].
    #[arg(long, value_name = "PATH", value_parser = parse_health_path)]
    pub health_path: Option<String>,

    /// Failure budget: how many nodes may fail before the rollout stops, a count or a
    /// percentage of the targets ("0", "2", "10%") [default: 0, the first failure stops
    /// the rollout].
    #[arg(long, value_name = "N|N%", value_parser = parse_max_failures)]
    pub max_failures: Option<String>,

    /// When the rollout fails, return the nodes it restarted to their previous executable
    /// (exit code 3).
    #[arg(long)]
    pub auto_rollback: bool,

    /// Why: kept with the rollout in its history.
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,

    /// Who you act for: kept in the history beside the name of the token that started
    /// the rollout, which is the actor [default: $USER].
    #[arg(long, value_name = "NAME")]
    pub actor: Option<String>,

    /// Leave this node out even if the selector matches it (repeatable); an id no node
    /// has is refused.
    #[arg(long, value_name = "NODE", value_parser = parse_node_id)]
    pub exclude: Vec<String>,

    /// Leave unreachable and stopped targets out of the plan (listed as left out)
    /// instead of refusing the whole rollout in preflight.
    #[arg(long)]
    pub skip_unreachable: bool,

    /// Print the plan (the batches and the nodes in each) and change nothing; nodes
    /// preflight would refuse are marked, and the exit code is the real run's (2 when
    /// it would be refused).
    #[arg(long)]
    pub dry_run: bool,

    /// Return once the rollout has started instead of watching it
    /// (follow it later with `fleetctl rollout status ID --watch`).
    #[arg(long)]
    pub detach: bool,
}

#[derive(Debug, Subcommand)]
pub enum RolloutAction {
    /// Show a rollout: its spec, state, and each node's phase, PIDs and reason.
    ///
    /// With --watch, follows it like `fleetctl rollout` does and exits with the code of
    /// its final state.
    Status(StatusArgs),
    /// List rollouts, newest first.
    History(HistoryArgs),
    /// Pause a running rollout: no further node is restarted until `resume`.
    Pause(ActionArgs),
    /// Resume a paused rollout.
    Resume(ActionArgs),
    /// Stop a rollout: nodes not yet restarted stay as they are.
    Abort(ActionArgs),
    /// Start a new rollout that moves the nodes a rollout changed back to their previous
    /// executables, and watch it.
    Undo(UndoArgs),
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// A rollout id ("r3") or "latest".
    #[arg(default_value = "latest", value_name = "ID")]
    pub id: String,

    /// Follow the rollout until it ends; exit with the code of its final state.
    #[arg(short, long)]
    pub watch: bool,

    /// Also print each node's timeline (phase, time, PID, message).
    #[arg(long)]
    pub timeline: bool,

    /// Nodes asked for in one call (the controller sends at most 5000); tests use a
    /// small one to exercise paging.
    #[arg(long, hide = true, value_name = "N", default_value_t = MAX_PAGE_SIZE,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_PAGE_SIZE)))]
    pub page_size: u32,
}

#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// At most this many rollouts [default: all the controller keeps].
    #[arg(long, value_name = "N")]
    pub limit: Option<u32>,
}

#[derive(Debug, Args)]
pub struct ActionArgs {
    /// The rollout id ("r3") or "latest".
    #[arg(value_name = "ID")]
    pub id: String,

    /// Why: kept in the rollout's history.
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,

    /// Who you act for: kept in the history beside the name of the token that acted
    /// [default: $USER].
    #[arg(long, value_name = "NAME")]
    pub actor: Option<String>,
}

#[derive(Debug, Args)]
pub struct UndoArgs {
    #[command(flatten)]
    pub action: ActionArgs,

    /// Return once the undo rollout has started instead of watching it.
    #[arg(long)]
    pub detach: bool,
}

impl StartArgs {
    /// The spec to send: flags as given, empty or zero where the controller's default applies.
    pub fn spec(&self) -> RolloutSpec {
        RolloutSpec {
            exe: self.exe.clone().unwrap_or_default(),
            sha256: self.sha256.clone().unwrap_or_default(),
            selector: self.selector.join(","),
            batches: self.batches.clone().unwrap_or_default(),
            max_parallel: self.max_parallel.unwrap_or(0),
            max_unavailable: self.max_unavailable.clone().unwrap_or_default(),
            canary: self.canary.unwrap_or(0),
            pause_after_canary: self.pause_after_canary,
            min_healthy_ms: millis(self.min_healthy),
            min_healthy_set: self.min_healthy.is_some(),
            ready_timeout_ms: millis(self.ready_timeout),
            drain_timeout_ms: millis(self.drain_timeout),
            health_path: self.health_path.clone().unwrap_or_default(),
            max_failures: self.max_failures.clone().unwrap_or_default(),
            auto_rollback: self.auto_rollback,
            reason: self.reason.clone().unwrap_or_default(),
            actor: actor(self.actor.as_deref()),
            dry_run: self.dry_run,
            declared_actor: String::new(),
            exclude: self.exclude.clone(),
            skip_unreachable: self.skip_unreachable,
            left_out: Vec::new(),
            // A rollout that is followed is read from its watch: its start need not
            // carry every node (--detach prints the nodes' batches from it).
            summary_answer: !self.detach,
        }
    }
}

fn millis(d: Option<Duration>) -> u64 {
    d.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The given actor, or the login name of whoever runs fleetctl.
pub fn actor(given: Option<&str>) -> String {
    given
        .map(str::to_string)
        .or_else(|| std::env::var("USER").ok())
        .or_else(|| std::env::var("LOGNAME").ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("fleetctl").chain(args.iter().copied()))
    }

    fn start(args: &[&str]) -> StartArgs {
        match parse(args).unwrap().command {
            Command::Rollout(rollout) if rollout.action.is_none() => rollout.start,
            other => panic!("not a rollout start: {other:?}"),
        }
    }

    fn error(args: &[&str]) -> String {
        let err = parse(args).unwrap_err();
        assert_eq!(err.exit_code(), 2, "{err}");
        err.to_string()
    }

    #[test]
    fn rollout_flags_make_the_spec() {
        let spec = start(&[
            "rollout",
            "--exe",
            "/opt/app-v2",
            "--sha256",
            &"AB".repeat(32),
            "-l",
            "zone=a, role=web",
            "-l",
            "tier=1",
            "--batches",
            "1,10%,100%",
            "--max-unavailable",
            "25%",
            "--canary",
            "1",
            "--pause-after-canary",
            "--min-healthy",
            "30s",
            "--ready-timeout",
            "1m",
            "--health-path",
            "/healthz",
            "--max-failures",
            "0",
            "--auto-rollback",
            "--actor",
            "alice",
            "--dry-run",
        ])
        .spec();
        assert_eq!(spec.exe, "/opt/app-v2");
        assert_eq!(spec.sha256, "ab".repeat(32));
        assert_eq!(spec.selector, "zone=a,role=web,tier=1");
        assert_eq!(spec.batches, "1,10%,100%");
        assert_eq!(spec.max_unavailable, "25%");
        assert_eq!((spec.canary, spec.pause_after_canary), (1, true));
        assert_eq!(spec.min_healthy_ms, 30_000);
        assert!(
            spec.min_healthy_set,
            "an explicit soak, even 0s, must not be defaulted"
        );
        assert_eq!(spec.ready_timeout_ms, 60_000);
        assert_eq!(spec.drain_timeout_ms, 0);
        assert_eq!(spec.max_failures, "0");
        assert!(spec.auto_rollback && spec.dry_run);
        assert_eq!(spec.actor, "alice");
    }

    fn nodes(args: &[&str]) -> NodesArgs {
        match parse(args).unwrap().command {
            Command::Nodes(nodes) => nodes,
            other => panic!("not nodes: {other:?}"),
        }
    }

    #[test]
    fn nodes_flags_filter_limit_and_summarize() {
        let args = nodes(&["nodes"]);
        assert_eq!(
            (args.state, args.limit, args.all, args.summary),
            (None, None, false, false)
        );
        assert_eq!(args.page_size, MAX_PAGE_SIZE);
        let args = nodes(&[
            "nodes",
            "--state",
            "unreachable",
            "--limit",
            "7",
            "-l",
            "zone=a",
        ]);
        assert_eq!(args.state.as_deref(), Some("unreachable"));
        assert_eq!(args.limit, Some(7));
        assert!(nodes(&["nodes", "--all", "--state", "shutting-down"]).all);
        assert!(nodes(&["nodes", "--summary", "-l", "zone=a"]).summary);
        let err = error(&["nodes", "--state", "down"]);
        assert!(err.contains("possible values: starting, serving"), "{err}");
        assert!(err.contains("unreachable"), "{err}");
        assert!(error(&["nodes", "--limit", "0"]).contains("--limit"));
        assert!(error(&["nodes", "--limit", "5", "--all"]).contains("cannot be used with"));
        assert!(error(&["nodes", "--summary", "--all"]).contains("cannot be used with"));
        assert!(error(&["nodes", "--page-size", "5001"]).contains("--page-size"));
    }

    #[test]
    fn rollout_subcommands_need_no_exe() {
        let cli = parse(&["rollout", "status", "-o", "json"]).unwrap();
        assert_eq!(cli.output, Format::Json);
        match cli.command {
            Command::Rollout(rollout) => match rollout.action {
                Some(RolloutAction::Status(s)) => assert_eq!(s.id, "latest"),
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
        assert!(parse(&["rollout", "abort", "r3", "--reason", "bad build"]).is_ok());
        assert!(parse(&["-o", "json", "rollout", "history", "--limit", "5"]).is_ok());
    }

    #[test]
    fn several_controllers_are_separated_by_commas() {
        let cli = parse(&["--controller", "c1:7100,https://c2:7100/", "nodes"]).unwrap();
        assert_eq!(cli.controller, ["http://c1:7100", "https://c2:7100"]);
        let cli = parse(&[
            "nodes",
            "--controller",
            "c1:7100",
            "--controller",
            "c2:7100",
        ])
        .unwrap();
        assert_eq!(cli.controller, ["http://c1:7100", "http://c2:7100"]);
        let err = error(&["--controller", "c1:7100,ftp://c2", "nodes"]);
        assert!(err.contains("--controller") && err.contains("ftp"), "{err}");
    }

    #[test]
    fn rollout_without_exe_says_so() {
        let err = error(&["rollout"]);
        assert!(err.contains("--exe"), "{err}");
    }

    #[test]
    fn batches_and_max_parallel_are_exclusive() {
        let err = error(&[
            "rollout",
            "--exe",
            "/a",
            "--batches",
            "1,100%",
            "--max-parallel",
            "2",
        ]);
        assert!(err.contains("cannot be used with"), "{err}");
    }

    #[test]
    fn a_bad_value_names_its_flag() {
        let err = error(&["rollout", "--exe", "/a", "--min-healthy", "soon"]);
        assert!(err.contains("--min-healthy"), "{err}");
        assert!(err.contains("30s"), "{err}");
    }

    #[test]
    fn pause_after_canary_needs_a_canary() {
        let err = error(&["rollout", "--exe", "/a", "--pause-after-canary"]);
        assert!(err.contains("--canary"), "{err}");
        let err = error(&["rollout", "--exe", "/a", "--canary", "0"]);
        assert!(err.contains("a canary needs nodes"), "{err}");
    }

    #[test]
    fn token_create_needs_a_role_or_join() {
        let err = error(&["token", "create", "--name", "ci"]);
        assert!(err.contains("--role") && err.contains("--join"), "{err}");
        let err = error(&["token", "create", "--role", "operator"]);
        assert!(err.contains("--name"), "{err}");
        let err = error(&[
            "token", "create", "--role", "admin", "--join", "--name", "x",
        ]);
        assert!(err.contains("cannot be used with"), "{err}");
        let err = error(&[
            "token", "create", "--role", "admin", "--name", "x", "--uses", "2",
        ]);
        assert!(err.contains("cannot be used with"), "{err}");
        let err = error(&["token", "create", "--join", "--uses", "0"]);
        assert!(err.contains("--uses"), "{err}");
        match parse(&[
            "token",
            "create",
            "--join",
            "--ttl",
            "1h",
            "--node-id-prefix",
            "web-",
            "--uses",
            "3",
        ])
        .unwrap()
        .command
        {
            Command::Token(TokenArgs {
                action: TokenAction::Create(c),
            }) => {
                assert!(c.join && c.role.is_none());
                assert_eq!(c.ttl, Some(Duration::from_secs(3600)));
                assert_eq!(c.node_id_prefix.as_deref(), Some("web-"));
                assert_eq!(c.uses, Some(3));
            }
            other => panic!("{other:?}"),
        }
        assert!(
            parse(&[
                "token", "create", "--role", "viewer", "--name", "wall", "--ttl", "30d"
            ])
            .is_ok()
        );
        assert!(parse(&["token", "list", "-o", "json"]).is_ok());
        assert!(parse(&["token", "revoke", "t3f9a1b2c"]).is_ok());
    }

    #[test]
    fn help_lists_the_exit_codes() {
        let err = parse(&["--help"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::DisplayHelp);
        assert!(err.to_string().contains("3  the rollout failed"), "{err}");
        let err = parse(&["rollout", "--help"]).unwrap_err();
        assert!(err.to_string().contains("Exit codes"), "{err}");
    }

    #[test]
    fn every_option_is_documented() {
        use clap::CommandFactory;
        fn check(cmd: &clap::Command, path: &str) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                assert!(arg.get_help().is_some(), "{path} {id} has no help");
            }
            for sub in cmd.get_subcommands() {
                assert!(
                    sub.get_about().is_some(),
                    "{path} {} has no about",
                    sub.get_name()
                );
                check(sub, &format!("{path} {}", sub.get_name()));
            }
        }
        Cli::command().debug_assert();
        check(&Cli::command(), "fleetctl");
    }
}
