//! The control endpoint: one port (default `127.0.0.1:7101`) serving gRPC
//! `fleet.v1.AgentService` (plus gRPC health and reflection) and the HTTP admin routes,
//! `/healthz` and `/metrics`, all behind the token check. The same HTTP routes are
//! served on an owner-only Unix socket, the private channel workers use to mount
//! `/debug/admin` on the app ports.

mod admin;
mod auth;
mod grpc;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use axum::Router;

use crate::supervisor::Supervisor;

pub use admin::router as admin_router;

/// The bound control endpoint, not yet serving.
#[derive(Debug)]
pub struct Control {
    tcp: tokio::net::TcpListener,
    unix: tokio::net::UnixListener,
    router: Router,
}

impl Control {
    /// Binds the control port and the private socket (bind first, serve later).
    pub async fn bind(supervisor: &Arc<Supervisor>) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let addr = supervisor.config().control.listen;
        let tcp = tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!("cannot listen on the control address {addr}: is another agent running? (use --control ADDR)")
        })?;
        supervisor.set_control_addr(tcp.local_addr()?);
        let path = supervisor.control_socket_path();
        let unix = tokio::net::UnixListener::bind(&path)
            .with_context(|| format!("cannot bind the control socket {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        Ok(Self {
            tcp,
            unix,
            router: router(supervisor.clone()).await?,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// Serves until the process exits.
    pub async fn serve(self) {
        let unix = axum::serve(self.unix, self.router.clone());
        let tcp = axum::serve(self.tcp, self.router);
        let (a, b) = tokio::join!(tcp, unix);
        if let Err(e) = a.and(b) {
            tracing::error!("control endpoint stopped: {e}");
        }
    }
}

/// Every control route behind the token check: a function, so handlers can be
/// tested with `oneshot` and no socket.
pub async fn router(supervisor: Arc<Supervisor>) -> anyhow::Result<Router> {
    let grpc = grpc::routes(supervisor.clone()).await?;
    Ok(admin::router(supervisor.clone())
        .merge(grpc)
        .layer(axum::middleware::from_fn_with_state(
            supervisor,
            auth::require_token,
        )))
}
