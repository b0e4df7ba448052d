//! End-to-end tests for Fleet: they run the real `fleet-agent` binary on free
//! loopback ports, drive it the way an operator would (signals, HTTP admin routes,
//! gRPC), and check what a client of the node sees — under load, nothing may fail.
//!
//! Run with `cargo build --workspace --bins && cargo nextest run -p fleet-tests`.

/// A headless Chromium driven through WebDriver (the dashboard tests).
pub mod browser;
/// What every benchmark program shares (runtime, interruption, exit codes).
pub mod bench;
/// Spawn `fleet-agent`, wait on its log lines, talk to it, kill it on drop.
pub mod harness;
/// Spawn `fleet-controller` with agents that register with it; run `fleetctl`.
pub mod fleet;
/// Real etcd clusters on loopback, for the controller's etcd store.
pub mod etcd;
/// What a process holds, from /proc: open fds, threads, memory.
pub mod footprint;
/// Hollow agents: many simulated agents in one process (a test tool for scale).
pub mod hollow;
/// What a spawned process prints, kept and waited on.
pub mod output;
/// A strict HTTP/1.1 and HTTP/2 load generator that counts every lost request.
pub mod loadgen;
/// Several hosts on one machine: network namespaces on a bridge, partitions.
pub mod netns;

pub use harness::{Agent, AgentOpts, HttpResponse};
pub use loadgen::{
    H2Counts, Load, LoadOptions, LoadReport, LoadSpec, Pacing, Span, TlsTarget, ZeroLoss,
};
