//! A test that cannot run on this machine fails, saying what is missing and how to
//! opt out; it passes without running only where a person set the documented
//! opt-out variable to `1` (CI sets none). A quiet "skipped" that the runner shows
//! as passed would let a whole behaviour go untested unnoticed.

/// The opt-out for the PID-namespace tests (`unshare --pid --fork --mount-proc`).
pub const SKIP_PIDNS: &str = "FLEET_TESTS_SKIP_PIDNS";
/// The opt-out for the tests that run `h2load` (Debian's `nghttp2-client`).
pub const SKIP_H2LOAD: &str = "FLEET_TESTS_SKIP_H2LOAD";
/// The opt-out for tests that only root can run (e.g. `chown` to another user).
pub const SKIP_ROOT: &str = "FLEET_TESTS_SKIP_ROOT";
/// The opt-out for the packaging tests that need podman or systemd-analyze.
pub const SKIP_PODMAN: &str = "FLEET_TESTS_SKIP_PODMAN";

/// Called by a test that found it cannot run here because of `why`. Returns (the
/// caller then returns without asserting anything) only when `opt_out` is `1`,
/// after printing a `NOT RUN` line; panics otherwise, naming `fix` and `opt_out`.
pub fn cannot_run(test: &str, why: &str, fix: &str, opt_out: &str) {
    if std::env::var_os(opt_out).is_some_and(|v| v == "1") {
        eprintln!("NOT RUN {test}: {why} ({opt_out}=1 is set)");
        return;
    }
    panic!(
        "{test} cannot run on this machine: {why}. Fix: {fix}; or set {opt_out}=1 to \
         opt out (the test then prints NOT RUN and proves nothing)."
    );
}
