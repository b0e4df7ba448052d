//! What every benchmark program shares: a runtime, Ctrl-C/SIGTERM handling that drops
//! (and so kills) whatever the benchmark started, and the exit codes
//! (0 every target met, 1 a target missed, 2 could not run, 130 interrupted).

use std::future::Future;
use std::process::ExitCode;
use std::time::Duration;

/// Runs `bench` to completion; `Ok(true)` means every target was met.
pub fn main<F>(name: &str, bench: F) -> ExitCode
where
    F: Future<Output = anyhow::Result<bool>>,
{
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start the tokio runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let code = runtime.block_on(async {
        // Dropping `bench` drops its process guards, which kill what it started.
        tokio::select! {
            res = bench => match res {
                Ok(true) => 0,
                Ok(false) => 1,
                Err(e) => {
                    eprintln!("{name}: error: {e:#}");
                    2
                }
            },
            () = interrupted() => {
                eprintln!("{name}: interrupted; stopping every process it started");
                130
            }
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(3));
    ExitCode::from(code)
}

async fn interrupted() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
