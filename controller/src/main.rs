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
/// commits whole arenas and purges after a second. At 10,000 heartbeat connections
/// that kept ~130 MB more resident (scale-bench: 430 MB against 299 MB after
/// registration) and cost 2.4× the CPU to register the agents.
///
/// It must run before the first allocation: the first arena is made then, and an arena
/// committed eagerly is never purged (set in `main`, after Rust's runtime has
/// allocated, the options changed nothing measurable). So it runs as an ELF
/// constructor, before `main` and before anything of Rust's runtime.
extern "C" fn tune_allocator() {
    set_allocator_options();
}

#[allow(unsafe_code)]
#[used]
#[unsafe(link_section = ".init_array")]
static TUNE_ALLOCATOR: extern "C" fn() = tune_allocator;

#[allow(unsafe_code)]
fn set_allocator_options() {
    // SAFETY: mi_option_set only stores an integer option (it allocates nothing); both
    // are known options, read when an arena is made and when freed pages are purged.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0);
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0);
    }
}

fn main() -> ExitCode {
    let cli = fleet_controller::config::Cli::parse();
    cli.log_format.init();
    // A connection per agent, almost always idle: without its read and write
    // buffers between bursts it holds 9 KB instead of 21 KB; a heartbeat stream
    // per agent, without its receive buffer between beats, ~1 KB less
    // (vendor/README.md).
    h2::release_idle_buffers(true);
    tonic::codec::release_idle_buffers(true);
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
    fn the_allocator_is_tuned_before_main_with_the_options_meant() {
        let options = || {
            // SAFETY: reading options allocates nothing.
            unsafe {
                (
                    libmimalloc_sys::mi_option_get(MI_OPTION_ARENA_EAGER_COMMIT),
                    libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY),
                    libmimalloc_sys::mi_option_get(MI_OPTION_ARENA_EAGER_COMMIT + 1),
                    libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY + 1),
                )
            }
        };
        // The constructor ran before this test harness's main too.
        let (eager, purge, next_to_eager, next_to_purge) = options();
        assert_eq!((eager, purge), (0, 0), "the constructor did not run");
        // Their neighbours keep mimalloc v3's defaults (src/options.c): purge_decommits
        // 1, use_numa_nodes 0; had the numbering moved, these would not be.
        assert_eq!(
            (next_to_eager, next_to_purge),
            (1, 0),
            "mimalloc's options moved"
        );
    }
}
