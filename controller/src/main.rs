//! `fleet-controller`: see `fleet-controller --help`.

use std::process::ExitCode;

use clap::Parser;

/// glibc malloc took ~15 % of the controller's CPU at 10,000 agents (scale-bench);
/// with mimalloc, tuned by [`tune_allocator`], a rollout costs ~35 % less CPU and the
/// resident set is ~20 % smaller (README, "Scale").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc v3's `mi_option_arena_eager_commit` and `mi_option_purge_delay`
/// (`enum mi_option_e` in its `mimalloc.h`; the test below checks their defaults).
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Commits memory as it is used and returns freed pages at once: by default mimalloc
/// commits whole arenas and purges after a second, which at 10,000 heartbeat connections
/// kept ~200 MB more resident (scale-bench: 509 MB against 301 MB after registration).
#[allow(unsafe_code)]
fn tune_allocator() {
    // SAFETY: mi_option_set only stores an integer option; both are known options
    // that mimalloc reads on its next arena commit / purge.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0);
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0);
    }
}

fn main() -> ExitCode {
    tune_allocator();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(unsafe_code)]
    fn the_allocator_options_are_the_ones_meant() {
        // SAFETY: reading options. Their defaults (mimalloc v3's src/options.c: eager
        // commit 2 on overcommitting systems, purge delay 1000 ms) identify them.
        let (eager, purge) = unsafe {
            (
                libmimalloc_sys::mi_option_get(MI_OPTION_ARENA_EAGER_COMMIT),
                libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY),
            )
        };
        assert_eq!((eager, purge), (2, 1000), "mimalloc's option numbers moved");
        tune_allocator();
        // SAFETY: as above.
        let (eager, purge) = unsafe {
            (
                libmimalloc_sys::mi_option_get(MI_OPTION_ARENA_EAGER_COMMIT),
                libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY),
            )
        };
        assert_eq!((eager, purge), (0, 0));
    }
}
