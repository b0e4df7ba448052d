//! `hello-peer`: a bare axum hello server, the peer that `restart-bench` measures
//! fleet-agent's demo app against. Same stack as a fleet-agent worker (tokio
//! multi-thread runtime, hyper 1 via axum 0.8, HTTP/1.1 + HTTP/2), no supervisor,
//! no graceful handoff.
//!
//! `hello-peer --listen 127.0.0.1:0` binds, prints `listening on ADDR` to stdout and
//! serves `GET /` → "Hello, world!" until SIGTERM or SIGINT.

use std::io::Write as _;
use std::net::SocketAddr;

use axum::serve::ListenerExt as _;
use axum::{Router, routing::get};
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Debug, Parser)]
#[command(about = "A bare axum hello server (the peer of restart-bench)")]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8198")]
    listen: SocketAddr,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Exactly what a fleet-agent worker runs on: `Runtime::new()`, i.e. multi-thread,
    // one worker thread per core, IO and time drivers on.
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(serve(args.listen))
}

async fn serve(addr: SocketAddr) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "listening on {local}")?;
        stdout.flush()?;
    }
    let app = Router::new().route("/", get(|| async { "Hello, world!" }));
    // TCP_NODELAY on every connection, as fleet-agent's workers set it.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    Ok(())
}

async fn shutdown_signal() {
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("hello-peer: cannot install a SIGTERM handler: {e}");
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
