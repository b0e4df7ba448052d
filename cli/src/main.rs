//! `fleetctl`: the command-line client of Fleet. It lists and restarts nodes and rolls
//! a new executable across the fleet through the controller's gRPC API.
//!
//! Modules, in the order a command flows through them:

/// Command-line arguments, and every check made before the controller is called.
mod args;
/// One function per subcommand.
mod commands;
/// The connection to the controller and the meaning of its errors.
mod client;
/// Following a rollout to its end.
mod watch;
/// Tables and JSON.
mod output;
/// Exit codes, and the error that carries one.
mod exit;
/// `fleetctl version`: the client's build and the controller's.
mod version;
/// Shell completions, man pages, and the token file: what needs no controller.
mod docs;

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

use crate::exit::Exit;

fn main() -> ExitCode {
    // Bad arguments end here, with clap's message and exit code 2.
    let cli = args::Cli::parse_from(version::rewrite_flag(std::env::args_os().collect()));
    match run(cli) {
        Ok(exit) => exit.into(),
        Err(err) => {
            eprintln!("error: {err:#}");
            exit::code_of(&err).into()
        }
    }
}

fn run(cli: args::Cli) -> anyhow::Result<Exit> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(commands::run(cli))
}
