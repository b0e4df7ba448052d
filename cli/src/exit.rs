//! Exit codes, and the error that carries one.
//!
//! Scripts branch on these, so they are part of fleetctl's interface (`fleetctl --help`
//! lists them): a failure of the fleet (1, 3) is told apart from a mistake in the
//! command (2).

use std::fmt;
use std::process::ExitCode;

/// How fleetctl ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The command did what was asked; a rollout or restart succeeded.
    Success,
    /// A rollout failed or was aborted, a restart failed, no controller is reachable,
    /// the store has no quorum, or a change's outcome is unknown.
    Failed,
    /// Bad input: invalid arguments, preflight refused, unknown node or rollout,
    /// missing, wrong, revoked or expired token, or a token without the role needed.
    BadInput,
    /// The rollout failed and its nodes were rolled back.
    RolledBack,
    /// Ctrl-C while watching (the rollout itself goes on).
    Interrupted,
}

impl Exit {
    pub fn code(self) -> u8 {
        match self {
            Exit::Success => 0,
            Exit::Failed => 1,
            Exit::BadInput => 2,
            Exit::RolledBack => 3,
            Exit::Interrupted => 130,
        }
    }
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> ExitCode {
        ExitCode::from(exit.code())
    }
}

/// The text `--help` ends with.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success: the command did what was asked (a rollout or restart succeeded;
     `rollout status` of a rollout that succeeded or is still running or paused)
  1  failed: a rollout failed or was aborted (also `rollout status` of one), a restart
     failed, no controller is reachable, the controllers' store has no quorum (nothing
     was changed), or the connection broke after a change was sent (its outcome is
     unknown: the message says how to check)
  2  bad input: invalid arguments, preflight refused the rollout (no node was touched),
     unknown node, rollout or token, missing, wrong, revoked or expired token, or a
     token whose role may not make the call
  3  the rollout failed and its nodes were rolled back to their previous executables
     (also `rollout status` of such a rollout)";

/// An error with the exit code it ends fleetctl with. Anything else is exit 1.
#[derive(Debug)]
pub struct Failure {
    pub exit: Exit,
    pub message: String,
}

impl Failure {
    pub fn new(exit: Exit, message: impl Into<String>) -> Failure {
        Failure {
            exit,
            message: message.into(),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

/// An error for input fleetctl refuses before calling anyone (exit 2).
pub fn bad_input(message: impl Into<String>) -> anyhow::Error {
    Failure::new(Exit::BadInput, message).into()
}

/// The exit code an error ends fleetctl with.
pub fn code_of(err: &anyhow::Error) -> Exit {
    err.chain()
        .find_map(|e| e.downcast_ref::<Failure>())
        .map_or(Exit::Failed, |f| f.exit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_keep_their_code_through_context() {
        let err = bad_input("--batches: bad").context("starting the rollout");
        assert_eq!(code_of(&err), Exit::BadInput);
        assert_eq!(code_of(&anyhow::anyhow!("io")), Exit::Failed);
    }

    #[test]
    fn codes_are_the_documented_ones() {
        for (exit, code) in [
            (Exit::Success, 0),
            (Exit::Failed, 1),
            (Exit::BadInput, 2),
            (Exit::RolledBack, 3),
        ] {
            assert_eq!(exit.code(), code);
            assert!(EXIT_CODES_HELP.contains(&format!("  {code}  ")));
        }
    }
}
