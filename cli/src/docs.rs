//! `fleetctl completion SHELL`, `fleetctl man DIR` (generated from the argument
//! definitions by clap_complete and clap_mangen), and reading `--token-file`.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::{Context, Result};
use clap::CommandFactory;

use crate::args::Cli;
use crate::args::parse::parse_token;
use crate::exit::{Exit, bad_input};

/// Prints the completion script for `shell` on stdout.
pub fn completion(shell: clap_complete::Shell) -> Result<Exit> {
    let mut cmd = Cli::command();
    clap_complete::generate(shell, &mut cmd, "fleetctl", &mut io::stdout());
    Ok(Exit::Success)
}

/// Writes fleetctl.1 and a page per subcommand (fleetctl-rollout-status.1, …) into `dir`.
pub fn man(dir: &Path) -> Result<Exit> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cmd = Cli::command();
    clap_mangen::generate_to(cmd, dir)
        .with_context(|| format!("writing man pages into {}", dir.display()))?;
    println!("man pages written to {}", dir.display());
    Ok(Exit::Success)
}

/// Reads the token from `path`: one line, trimmed; refused when the group or others
/// may read the file (as the controller and agent refuse their secret files).
pub fn read_token_file(path: &Path) -> Result<String> {
    let meta = fs::metadata(path).map_err(|e| {
        bad_input(format!(
            "token file {}: {e} (give the file holding the token, or use FLEET_TOKEN)",
            path.display()
        ))
    })?;
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(bad_input(format!(
            "token file {} is readable by its group or others (mode {mode:o}): chmod 600 {}",
            path.display(),
            path.display()
        )));
    }
    let text = fs::read_to_string(path)
        .map_err(|e| bad_input(format!("reading token file {}: {e}", path.display())))?;
    parse_token(&text).map_err(|e| bad_input(format!("token file {}: {e}", path.display())))
}
