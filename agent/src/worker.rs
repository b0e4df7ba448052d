//! The worker side: adopt the inherited listeners, serve the app on them, say
//! `READY=1`, and drain on the supervisor's `SIGTERM`.
//!
//! Signals: `SIGTERM` (and INT/QUIT/HUP) from the supervisor means "drain"; sent by
//! anyone else it means "shut the node down", so it is forwarded to the supervisor,
//! which then drains every worker — and this worker starts draining at once, because
//! the supervisor's own `SIGTERM` may arrive while ours is still pending and merge
//! with it (the kernel keeps one pending instance per signal). `SIGUSR1` is always
//! forwarded (restart). If the supervisor is gone (parent-death signal), the worker
//! drains and exits. The stray signals the supervisor ignores (`SIGUSR2`, `SIGALRM`,
//! real-time signals, …) are ignored here too, with a log line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use hyper_util::rt::TokioIo;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1};
use signal_hook::iterator::SignalsInfo;
use signal_hook::iterator::exfiltrator::WithOrigin;
use tokio::sync::mpsc;

use crate::config::Config;
use crate::notify;
use crate::process;
use crate::serve::{Listener, ServeOptions, Server, requests_in_flight};
use crate::tls;

/// What a signal asks of this worker.
#[derive(Debug, Clone, Copy)]
enum Action {
    Drain,
    Forward(Signal),
}

/// Runs a worker generation to completion. `app` is the application's router.
pub fn run(config: Config, app: Router) -> ExitCode {
    let supervisor: i32 = match std::env::var("FLEET_SUPERVISOR_PID")
        .ok()
        .and_then(|p| p.parse().ok())
    {
        Some(pid) => pid,
        None => {
            tracing::error!(
                "FLEET_SUPERVISOR_PID is not set: workers are started by a fleet-agent supervisor"
            );
            return ExitCode::from(2);
        }
    };
    if nix::unistd::getppid().as_raw() != supervisor {
        tracing::error!("the supervisor (pid {supervisor}) is gone: exiting");
        return ExitCode::FAILURE;
    }
    let inherited = match process::take_listen_fds() {
        Ok(fds) => fds,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(2);
        }
    };
    let (signals_tx, signals_rx) = mpsc::unbounded_channel();
    if let Err(e) = watch_signals(supervisor, signals_tx) {
        tracing::error!("cannot install signal handlers: {e}");
        return ExitCode::FAILURE;
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if config.worker_threads > 0 {
        builder.worker_threads(config.worker_threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config, app, inherited, supervisor, signals_rx)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(
    config: Config,
    app: Router,
    inherited: Vec<(String, std::net::TcpListener)>,
    supervisor: i32,
    mut signals: mpsc::UnboundedReceiver<Action>,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let mut listeners: Vec<Listener> = Vec::with_capacity(inherited.len());
    for (name, socket) in inherited {
        let server = config.server(&name).with_context(|| {
            format!("the supervisor passed a listener for server '{name}', which this build's configuration does not have")
        })?;
        // One certificate load per server, however many sockets it listens on.
        let tls = match listeners.iter().find(|l| l.server == name) {
            Some(sibling) => sibling.tls.clone(),
            None => server.tls.as_ref().map(tls::acceptor).transpose()?,
        };
        let socket = tokio::net::TcpListener::from_std(socket)?;
        listeners.push(Listener {
            server: name,
            addr: socket.local_addr()?,
            socket,
            tls,
        });
    }
    let mut addrs: Vec<String> = Vec::new();
    for l in &listeners {
        // An address once, however many sockets (`sockets_per_port`) listen on it.
        let addr = l.addr.to_string();
        if !addrs.contains(&addr) {
            addrs.push(addr);
        }
    }
    let app = match (config.app_admin(), std::env::var_os("FLEET_CONTROL_SOCKET")) {
        (true, Some(socket)) => app.merge(admin_proxy(&config.admin.path, socket.into())),
        _ => app,
    };
    let stall = test_accept_stall();
    if let Some(stall) = stall {
        // The fault the zero-loss tests must catch: READY is sent, the supervisor
        // drains the old generation, and nobody accepts for `stall`.
        notify::notify("READY=1").context("cannot send READY=1 to the supervisor")?;
        tracing::warn!(
            "{ACCEPT_STALL_VAR}: READY=1 sent, not accepting for {} (a test-only fault)",
            humantime::format_duration(stall)
        );
        tokio::time::sleep(stall).await;
    }
    let server = Server::start(
        listeners,
        app,
        ServeOptions {
            idle_grace: config.restart.idle_grace,
        },
    );
    if stall.is_none() {
        notify::notify("READY=1").context("cannot send READY=1 to the supervisor")?;
    }
    tracing::debug!("serving on [{}]", addrs.join(", "));
    let reporter = tokio::spawn(report_in_flight());

    while let Some(action) = signals.recv().await {
        match action {
            Action::Drain => break,
            Action::Forward(sig) => {
                tracing::info!(
                    "forwarding {} to the supervisor (pid {supervisor})",
                    sig.as_str()
                );
                let _ = nix::sys::signal::kill(Pid::from_raw(supervisor), sig);
            }
        }
    }
    reporter.abort();
    let open = server.open().saturating_sub(addrs.len());
    server.drain();
    let _ = notify::notify("STOPPING=1");
    tracing::debug!("draining {open} connection(s)");
    // The supervisor kills us at its drain deadline; this bound only matters if it is gone.
    let bound = config.restart.drain_timeout + Duration::from_secs(5);
    if tokio::time::timeout(bound, server.drained()).await.is_err() {
        tracing::warn!(
            "{} connection(s) still open after {}: closing them",
            server.open(),
            humantime::format_duration(bound)
        );
    }
    Ok(())
}

/// TEST-ONLY fault injection, ignored when unset (or 0, or not a number): a worker of
/// generation 2 or later sends `READY=1` and then waits this many milliseconds before
/// it accepts a connection. It exists so that the zero-loss tests can prove they
/// catch a new generation that says it is ready and then stalls (the supervisor
/// passes its environment to every worker). The first generation is left alone so a
/// node under test starts as usual. Never set it in production.
const ACCEPT_STALL_VAR: &str = "FLEET_TEST_ACCEPT_STALL_MS";

fn test_accept_stall() -> Option<Duration> {
    let ms: u64 = std::env::var(ACCEPT_STALL_VAR).ok()?.trim().parse().ok()?;
    let generation: u64 = std::env::var("FLEET_GENERATION").ok()?.parse().ok()?;
    (ms > 0 && generation >= 2).then(|| Duration::from_millis(ms))
}

/// How often the worker looks whether its requests in flight changed.
const IN_FLIGHT_REPORT: Duration = Duration::from_millis(250);

/// Tells the supervisor how many requests this worker is serving, when the number
/// changed (a datagram of ~20 bytes at most every 250 ms), for its status, the
/// controller's inventory and the dashboard.
async fn report_in_flight() {
    let mut reported = 0;
    let mut tick = tokio::time::interval(IN_FLIGHT_REPORT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let now = requests_in_flight();
        if now == reported {
            continue;
        }
        match notify::notify_nowait(&format!("{}={now}", notify::IN_FLIGHT)) {
            Ok(true) => reported = now,
            Ok(false) => return, // not supervised
            // Tried again at the next tick.
            Err(e) => tracing::debug!("cannot report requests in flight to the supervisor: {e}"),
        }
    }
}

/// Reads signals with their sender on a thread of its own and decides what each means.
fn watch_signals(supervisor: i32, tx: mpsc::UnboundedSender<Action>) -> std::io::Result<()> {
    // The stray signals the supervisor ignores are ignored here too (logged): by
    // default each would kill this worker and cut its requests in flight. SIGPIPE stays
    // ignored without a handler (Rust's default): sockets raise it on every broken pipe.
    let stray = [
        libc::SIGUSR2,
        libc::SIGALRM,
        libc::SIGVTALRM,
        libc::SIGPROF,
        libc::SIGWINCH,
        libc::SIGIO,
        libc::SIGPWR,
        libc::SIGSTKFLT,
        libc::SIGXCPU,
        libc::SIGXFSZ,
    ];
    let realtime = libc::SIGRTMIN()..=libc::SIGRTMAX();
    let mut signals = SignalsInfo::<WithOrigin>::new(
        [SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGUSR1]
            .into_iter()
            .chain(stray)
            .chain(realtime),
    )?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for info in signals.forever() {
                let parent_alive = nix::unistd::getppid().as_raw() == supervisor;
                let from_supervisor = info.process.is_some_and(|p| p.pid == supervisor);
                let sig = match Signal::try_from(info.signal) {
                    Ok(sig) if !stray.contains(&info.signal) => sig,
                    _ => {
                        let name = crate::supervisor::signal_name(info.signal);
                        tracing::info!("received {name}: ignored");
                        continue;
                    }
                };
                let actions: &[Action] = match sig {
                    Signal::SIGUSR1 if parent_alive => &[Action::Forward(Signal::SIGUSR1)],
                    Signal::SIGUSR1 => continue,
                    _ if from_supervisor || !parent_alive => &[Action::Drain],
                    Signal::SIGINT => &[Action::Forward(Signal::SIGINT), Action::Drain],
                    Signal::SIGQUIT => &[Action::Forward(Signal::SIGQUIT), Action::Drain],
                    Signal::SIGHUP => &[Action::Forward(Signal::SIGHUP), Action::Drain],
                    _ => &[Action::Forward(Signal::SIGTERM), Action::Drain],
                };
                for action in actions {
                    if tx.send(*action).is_err() {
                        return;
                    }
                }
            }
        })?;
    Ok(())
}

/// `/debug/admin` on the app ports: every request is passed, headers and all, to the
/// supervisor's admin routes over its owner-only Unix socket, so the supervisor
/// checks the token and does the work exactly as on the control port.
///
/// A request that went through a proxy (it carries `Forwarded`, `X-Forwarded-For` or
/// `Via`) is refused here and never reaches the supervisor: behind a reverse proxy
/// the app port is reachable from anywhere the proxy is, and the supervisor would
/// see only the proxy's loopback address and whatever Host it chose to send.
fn admin_proxy(path: &str, socket: PathBuf) -> Router {
    let socket = Arc::new(socket);
    Router::new()
        .route(path, any(forward))
        .route(&format!("{path}/{{*rest}}"), any(forward))
        .with_state(socket)
}

async fn forward(State(socket): State<Arc<PathBuf>>, request: Request) -> Response {
    let proxied = ["forwarded", "x-forwarded-for", "via"]
        .iter()
        .find(|h| request.headers().contains_key(**h));
    if let Some(header) = proxied {
        return (
            StatusCode::FORBIDDEN,
            format!(
                "the admin routes are not served through a proxy (this request carries {header}): \
                 use the control endpoint\n"
            ),
        )
            .into_response();
    }
    match forward_to(&socket, request).await {
        Ok(response) => response,
        Err(e) => (
            StatusCode::BAD_GATEWAY,
            format!(
                "cannot reach the supervisor's control socket {}: {e}\n",
                socket.display()
            ),
        )
            .into_response(),
    }
}

async fn forward_to(socket: &std::path::Path, request: Request) -> anyhow::Result<Response> {
    let stream = tokio::net::UnixStream::connect(socket).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let (mut parts, body) = request.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_string();
    parts.uri = path.parse()?;
    parts.version = http::Version::HTTP_11;
    for hop in [
        http::header::CONNECTION,
        http::header::TRANSFER_ENCODING,
        http::header::UPGRADE,
    ] {
        parts.headers.remove(hop);
    }
    if !parts.headers.contains_key(http::header::HOST) {
        parts.headers.insert(
            http::header::HOST,
            http::HeaderValue::from_static("localhost"),
        );
    }
    let response = sender
        .send_request(Request::from_parts(parts, body))
        .await?;
    Ok(response.map(Body::new))
}
