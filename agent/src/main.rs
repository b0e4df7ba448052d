//! `fleet-agent`: the node agent binary. With no `--exec` its workers serve the demo
//! app (see `fleet_agent::demo`); `fleet-agent --help` lists every option.

fn main() -> std::process::ExitCode {
    fleet_agent::run(fleet_agent::demo::router)
}
