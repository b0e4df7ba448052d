//! The control endpoint: one port (default `127.0.0.1:7101`) serving gRPC
//! `fleet.v1.AgentService` (plus gRPC health and reflection) and the HTTP admin routes,
//! `/healthz` and `/metrics`, all behind the token check. The same HTTP routes are
//! served on an owner-only Unix socket, the private channel workers use to mount
//! `/debug/admin` on the app ports; a second one carries the app's own requests
//! ([`crate::Node`]).

mod admin;
mod app;
mod auth;
mod grpc;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use axum::Router;

use crate::supervisor::Supervisor;

pub use grpc::status_response as status_message;

/// The bound control endpoint, not yet serving.
#[derive(Debug)]
pub struct Control {
    tcp: tokio::net::TcpListener,
    unix: tokio::net::UnixListener,
    app: tokio::net::UnixListener,
    router: Router,
    app_router: Router,
    limits: fleet_net::Limits,
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
        let app_path = supervisor.app_socket_path();
        let app = tokio::net::UnixListener::bind(&app_path)
            .with_context(|| format!("cannot bind the app socket {}", app_path.display()))?;
        std::fs::set_permissions(&app_path, std::fs::Permissions::from_mode(0o600))?;
        Ok(Self {
            tcp,
            unix,
            app,
            router: router(supervisor.clone()).await?,
            app_router: app::router(supervisor.clone()),
            limits: supervisor.config().control.limits(),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// Serves until the process exits. The TCP port is open to anyone who can reach
    /// it, so it is served within limits (fleet-net): idle and header timeouts and a
    /// connection cap below the descriptor limit, so that idle connections can never
    /// take the descriptors a restart needs. The Unix sockets are owner-only (their
    /// clients are this node's workers) and stay on plain `axum::serve`.
    pub async fn serve(self) {
        let unix = axum::serve(self.unix, self.router.clone());
        let tcp = fleet_net::Server::new(self.tcp, self.router, self.limits.clone());
        tracing::info!(
            "control endpoint: {}, idle timeout {}, header timeout {}",
            tcp.cap(),
            humantime::format_duration(self.limits.idle_timeout),
            humantime::format_duration(self.limits.header_timeout)
        );
        let app = axum::serve(self.app, self.app_router);
        let (_, unix, app) = tokio::join!(tcp.run(), unix, app);
        if let Err(e) = unix.and(app) {
            tracing::error!("control socket stopped: {e}");
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, ServerConfig};
    use crate::supervisor::WorkerKind;
    use axum::body::Body;
    use http::{Request, StatusCode, header};
    use tower::ServiceExt;

    async fn guarded() -> (Router, Arc<Supervisor>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "s3cret\n").unwrap();
        let config = Config {
            servers: vec![ServerConfig {
                listen: vec!["127.0.0.1:0".parse().unwrap()],
                ..Default::default()
            }],
            control: crate::config::ControlConfig {
                token_file: Some(token),
                ..Default::default()
            },
            ..Default::default()
        };
        let supervisor =
            Supervisor::new(config, "/bin/sh".into(), Vec::new(), WorkerKind::Exec).unwrap();
        (router(supervisor.clone()).await.unwrap(), supervisor, dir)
    }

    async fn send(router: &Router, request: Request<Body>) -> http::Response<Body> {
        router.clone().oneshot(request).await.unwrap()
    }

    #[tokio::test]
    async fn actions_without_the_token_are_refused_and_change_nothing() {
        let (router, supervisor, _dir) = guarded().await;
        for path in [
            "/debug/admin/restart",
            "/debug/admin/shutdown",
            "/metrics",
            "/debug/admin/status",
        ] {
            let response = send(&router, Request::post(path).body(Body::empty()).unwrap()).await;
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{path}");
        }
        let wrong = Request::get("/debug/admin/restart")
            .header(header::AUTHORIZATION, "Bearer nope")
            .body(Body::empty())
            .unwrap();
        assert_eq!(
            send(&router, wrong).await.status(),
            StatusCode::UNAUTHORIZED
        );
        assert!(!supervisor.shutting_down());
        assert_eq!(
            supervisor.status().restarts_failed + supervisor.status().restarts_succeeded,
            0
        );
    }

    #[tokio::test]
    async fn grpc_without_the_token_is_unauthenticated() {
        let (router, _supervisor, _dir) = guarded().await;
        let request = Request::post("/fleet.v1.AgentService/Shutdown")
            .header(header::CONTENT_TYPE, "application/grpc")
            .body(Body::empty())
            .unwrap();
        let response = send(&router, request).await;
        assert_eq!(response.headers()["grpc-status"], "16");
    }

    #[tokio::test]
    async fn the_bearer_token_opens_the_routes() {
        let (router, _supervisor, _dir) = guarded().await;
        let request = Request::get("/debug/admin/status")
            .header(header::AUTHORIZATION, "Bearer s3cret")
            .body(Body::empty())
            .unwrap();
        assert_eq!(send(&router, request).await.status(), StatusCode::OK);
        let health = Request::get("/healthz").body(Body::empty()).unwrap();
        // Open without a token; 503 because no worker serves in this test.
        assert_eq!(
            send(&router, health).await.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[tokio::test]
    async fn a_session_cookie_acts_only_by_post() {
        let (router, supervisor, _dir) = guarded().await;
        let login = Request::post("/debug/admin/login")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from("token=s3cret"))
            .unwrap();
        let response = send(&router, login).await;
        let cookie = response.headers()[header::SET_COOKIE]
            .to_str()
            .unwrap()
            .to_string();
        assert!(
            cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
            "{cookie}"
        );
        let session = cookie.split(';').next().unwrap().to_string();

        // A cross-site link is a GET: refused even with the cookie.
        let link = Request::get("/debug/admin/shutdown")
            .header(header::COOKIE, &session)
            .body(Body::empty())
            .unwrap();
        assert_eq!(send(&router, link).await.status(), StatusCode::FORBIDDEN);
        assert!(!supervisor.shutting_down());

        let page = Request::get("/debug/admin")
            .header(header::COOKIE, &session)
            .body(Body::empty())
            .unwrap();
        assert_eq!(send(&router, page).await.status(), StatusCode::OK);

        let post = Request::post("/debug/admin/shutdown")
            .header(header::COOKIE, &session)
            .body(Body::empty())
            .unwrap();
        assert_eq!(send(&router, post).await.status(), StatusCode::OK);
        assert!(supervisor.shutting_down());
    }
}
