//! Run with: cargo run --example embed -- --listen 127.0.0.1:8080 --control 127.0.0.1:7102
//!
//! Your own axum app with zero-downtime restarts: build it, run it, then
//! `kill -USR1 <pid>` or `curl -X POST 127.0.0.1:7102/debug/admin/restart` and watch the
//! worker PID change while the supervisor PID stays.

use axum::Router;
use axum::routing::get;

fn app() -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { "hello from an embedded fleet-agent app\n" }),
        )
        .route(
            "/pid",
            get(|| async { format!("{}\n", std::process::id()) }),
        )
}

fn main() -> std::process::ExitCode {
    fleet_agent::run(app)
}
