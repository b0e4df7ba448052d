//! `fleet-controller`: see `fleet-controller --help`.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = fleet_controller::config::Cli::parse();
    cli.log_format.init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(fleet_controller::serve(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
