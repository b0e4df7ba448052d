//! `fleetctl version` (and `fleetctl --version`): this client's build and the
//! controller's, so a mismatch is seen before it is a mysterious error.

use anyhow::Result;
use fleet_proto::v1::VersionResponse;
use serde_json::json;

use crate::args::Format;
use crate::client::Controller;
use crate::exit::Exit;

/// Prints both versions. The client's is printed even when the controller cannot be
/// reached or refuses the call; then the reason is said on stderr and fleetctl exits
/// as that failure does (1 unreachable, 2 a token problem).
pub async fn run(controller: Result<Controller>, format: Format) -> Result<Exit> {
    let client = fleet_proto::build_version!();
    // The controller that answered, of those given.
    let mut url = String::new();
    let controller = match controller {
        Ok(mut c) => {
            let version = c.get_version().await;
            url = c.url().to_string();
            version
        }
        Err(e) => Err(e),
    };
    match format {
        Format::Json => {
            let value = json!({
                "client": build_json(&client),
                "controller": controller.as_ref().ok().map(build_json),
                "controller_error": controller.as_ref().err().map(|e| format!("{e:#}")),
            });
            println!("{}", serde_json::to_string_pretty(&value)?);
        }
        Format::Table => {
            println!("client:     fleetctl {}", describe(&client));
            match &controller {
                Ok(v) => println!("controller: fleet-controller {} at {url}", describe(v)),
                Err(_) => println!("controller: unknown (see below)"),
            }
        }
    }
    match controller {
        Ok(v) => {
            if v.protocol != client.protocol {
                eprintln!(
                    "warning: the controller speaks {} and this fleetctl {}: use a fleetctl of the controller's release",
                    v.protocol, client.protocol
                );
            }
            Ok(Exit::Success)
        }
        Err(e) => Err(e.context("the controller's version is unknown")),
    }
}

fn describe(v: &VersionResponse) -> String {
    let commit = match v.git_commit.as_str() {
        "" => String::new(),
        c => format!(", commit {}", &c[..c.len().min(12)]),
    };
    format!("{} ({}{commit})", v.version, v.protocol)
}

fn build_json(v: &VersionResponse) -> serde_json::Value {
    json!({ "version": v.version, "git_commit": v.git_commit, "protocol": v.protocol })
}

/// `fleetctl --version` (or `-V`) before any subcommand means `fleetctl version`: the
/// same answer, both builds. After a subcommand it is left to clap.
pub fn rewrite_flag(args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    use clap::CommandFactory as _;
    let command = crate::args::Cli::command();
    let subcommands: Vec<String> = command
        .get_subcommands()
        .flat_map(|s| {
            std::iter::once(s.get_name().to_string()).chain(s.get_all_aliases().map(str::to_string))
        })
        .collect();
    let mut out = Vec::with_capacity(args.len());
    let mut seen_subcommand = false;
    for (i, arg) in args.into_iter().enumerate() {
        let s = arg.to_string_lossy();
        if i > 0 && !seen_subcommand && subcommands.iter().any(|c| *c == s) {
            seen_subcommand = true;
        }
        if i > 0 && !seen_subcommand && (s == "--version" || s == "-V") {
            seen_subcommand = true;
            out.push("version".into());
        } else {
            out.push(arg);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::rewrite_flag;

    fn rewrite(args: &[&str]) -> Vec<String> {
        rewrite_flag(args.iter().map(Into::into).collect())
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn the_version_flag_before_a_subcommand_asks_the_controller_too() {
        assert_eq!(rewrite(&["fleetctl", "--version"]), ["fleetctl", "version"]);
        assert_eq!(
            rewrite(&["fleetctl", "--controller", "http://x:1", "-V"]),
            ["fleetctl", "--controller", "http://x:1", "version"]
        );
        // After a subcommand it is that subcommand's (clap refuses it).
        assert_eq!(
            rewrite(&["fleetctl", "nodes", "--version"]),
            ["fleetctl", "nodes", "--version"]
        );
    }
}
