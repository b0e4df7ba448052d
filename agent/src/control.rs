//! The control endpoint: one port (default `127.0.0.1:7101`) serving gRPC
//! `fleet.v1.AgentService` (plus gRPC health and reflection) and the HTTP admin routes,
//! `/healthz` and `/metrics`, all behind one guard (token, sessions, and the rules
//! that keep browsers out: see [`auth`]). The same HTTP routes are served on an
//! owner-only Unix socket, the private channel workers use to mount `/debug/admin` on
//! the app ports; a second one carries the app's own requests ([`crate::Node`]).

mod admin;
mod app;
pub(crate) mod auth;
pub(crate) mod grpc;
mod session;

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
    /// The same routes, for requests a worker proxies from an app port.
    unix_router: Router,
    app_router: Router,
    limits: fleet_net::Limits,
    /// The node's certificate (mutual TLS with the controller), once it has one.
    tls: Option<fleet_net::TlsConfig>,
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
        let router = router(supervisor.clone()).await?;
        Ok(Self {
            tcp,
            unix,
            app,
            unix_router: router.clone().layer(axum::Extension(auth::ViaWorker)),
            router,
            app_router: app::router(supervisor.clone()),
            limits: supervisor.config().control.limits(),
            tls: None,
        })
    }

    /// Serves TLS with the node's certificate (plain HTTP from loopback peers only).
    pub fn with_tls(mut self, config: fleet_net::TlsConfig) -> Self {
        self.tls = Some(config);
        self
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
        let unix = axum::serve(self.unix, self.unix_router);
        let mut tcp = fleet_net::Server::new(self.tcp, self.router, self.limits.clone());
        if let Some(tls) = self.tls {
            tcp = tcp.with_tls(tls);
        }
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

/// Every control route behind the guard: a function, so handlers can be tested with
/// `oneshot` and no socket.
pub async fn router(supervisor: Arc<Supervisor>) -> anyhow::Result<Router> {
    let grpc = grpc::routes(supervisor.clone()).await?;
    let access = Arc::new(auth::Access {
        supervisor,
        sessions: session::Sessions::default(),
        throttle: fleet_net::LoginThrottle::default(),
    });
    Ok(admin::router(access.clone())
        .merge(grpc)
        .layer(axum::middleware::from_fn_with_state(access, auth::guard)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, ControlConfig, ServerConfig};
    use crate::supervisor::WorkerKind;
    use axum::body::Body;
    use http::{Request, StatusCode, Version, header};
    use tower::ServiceExt;

    const HOST: &str = "127.0.0.1:7101";

    /// A router over a supervisor that has no worker, with or without a token.
    async fn node(token: bool, insecure: bool) -> (Router, Arc<Supervisor>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let token_file = token.then(|| {
            let path = dir.path().join("token");
            std::fs::write(&path, "s3cret\n").unwrap();
            path
        });
        let config = Config {
            servers: vec![ServerConfig {
                listen: vec!["127.0.0.1:0".parse().unwrap()],
                ..Default::default()
            }],
            control: ControlConfig {
                token_file,
                insecure,
                ..Default::default()
            },
            ..Default::default()
        };
        let supervisor =
            Supervisor::new(config, "/bin/sh".into(), Vec::new(), WorkerKind::Exec).unwrap();
        (router(supervisor.clone()).await.unwrap(), supervisor, dir)
    }

    async fn guarded() -> (Router, Arc<Supervisor>, tempfile::TempDir) {
        node(true, false).await
    }

    async fn send(router: &Router, request: Request<Body>) -> http::Response<Body> {
        router.clone().oneshot(request).await.unwrap()
    }

    async fn text(response: http::Response<Body>) -> String {
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        String::from_utf8_lossy(&body).into_owned()
    }

    fn post(path: &str, headers: &[(&str, &str)]) -> Request<Body> {
        let mut builder = Request::post(path).header(header::HOST, HOST);
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        builder.body(Body::empty()).unwrap()
    }

    fn restarts(supervisor: &Supervisor) -> u64 {
        let s = supervisor.status();
        s.restarts_failed + s.restarts_succeeded
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
            let response = send(&router, post(path, &[])).await;
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{path}");
        }
        let wrong = post("/debug/admin/restart", &[("authorization", "Bearer nope")]);
        assert_eq!(
            send(&router, wrong).await.status(),
            StatusCode::UNAUTHORIZED
        );
        assert!(!supervisor.shutting_down());
        assert_eq!(restarts(&supervisor), 0);
    }

    #[tokio::test]
    async fn grpc_without_the_token_is_unauthenticated() {
        let (router, _supervisor, _dir) = guarded().await;
        let request = Request::post("http://127.0.0.1:7101/fleet.v1.AgentService/Shutdown")
            .version(Version::HTTP_2)
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
    async fn a_get_on_an_action_is_405_with_a_curl_hint() {
        for token in [false, true] {
            let (router, supervisor, _dir) = node(token, false).await;
            for action in ["restart", "reload", "shutdown", "logout"] {
                let path = format!("/debug/admin/{action}");
                let request = Request::get(&path)
                    .header(header::HOST, HOST)
                    .header(header::AUTHORIZATION, "Bearer s3cret")
                    .body(Body::empty())
                    .unwrap();
                let response = send(&router, request).await;
                assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED, "{path}");
                assert_eq!(response.headers()[header::ALLOW], "POST");
                let body = text(response).await;
                assert!(
                    body.contains(&format!("curl -X POST http://{HOST}{path}")),
                    "{body}"
                );
            }
            assert!(!supervisor.shutting_down());
            assert_eq!(restarts(&supervisor), 0);
        }
    }

    #[tokio::test]
    async fn a_post_from_another_site_is_refused_token_or_not() {
        let refused: &[&[(&str, &str)]] = &[
            &[("sec-fetch-site", "cross-site")],
            &[("sec-fetch-site", "same-site")],
            &[("origin", "http://evil.example")],
            &[("origin", "null")],
            &[("origin", "https://127.0.0.1:7101")],
        ];
        for token in [false, true] {
            let (router, supervisor, _dir) = node(token, false).await;
            for headers in refused {
                let mut headers = headers.to_vec();
                headers.push(("authorization", "Bearer s3cret"));
                let response = send(&router, post("/debug/admin/shutdown", &headers)).await;
                assert_eq!(response.status(), StatusCode::FORBIDDEN, "{headers:?}");
                let body = text(response).await;
                assert!(body.contains("refused"), "{body}");
                let login = post("/debug/admin/login", &headers);
                assert_eq!(send(&router, login).await.status(), StatusCode::FORBIDDEN);
            }
            assert!(!supervisor.shutting_down(), "token {token}");

            // The page's own same-origin POST passes.
            let own = post(
                "/debug/admin/shutdown",
                &[
                    ("origin", "http://127.0.0.1:7101"),
                    ("sec-fetch-site", "same-origin"),
                    ("authorization", "Bearer s3cret"),
                ],
            );
            assert_eq!(send(&router, own).await.status(), StatusCode::OK);
            assert!(supervisor.shutting_down());
        }
    }

    #[tokio::test]
    async fn without_a_token_only_loopback_hosts_are_served() {
        let (router, supervisor, _dir) = node(false, false).await;
        for host in ["rebind.example:7101", "10.0.0.1:7101", "localhost.example"] {
            let page = Request::get("/debug/admin")
                .header(header::HOST, host)
                .body(Body::empty())
                .unwrap();
            let response = send(&router, page).await;
            assert_eq!(response.status(), StatusCode::FORBIDDEN, "{host}");
            let body = text(response).await;
            assert!(
                body.contains("DNS rebinding") && body.contains(host),
                "{body}"
            );
            let mut shutdown = post("/debug/admin/shutdown", &[]);
            shutdown
                .headers_mut()
                .insert(header::HOST, host.parse().unwrap());
            assert_eq!(
                send(&router, shutdown).await.status(),
                StatusCode::FORBIDDEN
            );
        }
        // HTTP/2 names the host in the URI's authority, not in a Host header.
        let h2 = Request::post("http://rebind.example:7101/debug/admin/shutdown")
            .version(Version::HTTP_2)
            .body(Body::empty())
            .unwrap();
        assert_eq!(send(&router, h2).await.status(), StatusCode::FORBIDDEN);
        // /healthz answers any Host (503: no worker here).
        let health = Request::get("/healthz")
            .header(header::HOST, "rebind.example")
            .body(Body::empty())
            .unwrap();
        assert_eq!(
            send(&router, health).await.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert!(!supervisor.shutting_down());
        for host in ["localhost:7101", "[::1]:7101", "127.0.0.2"] {
            let status = Request::get("/debug/admin/status")
                .header(header::HOST, host)
                .body(Body::empty())
                .unwrap();
            assert_eq!(
                send(&router, status).await.status(),
                StatusCode::OK,
                "{host}"
            );
        }

        // --insecure-control: IP literals too, never a name.
        let (router, _supervisor, _dir) = node(false, true).await;
        for (host, expected) in [
            ("10.0.0.1:7101", StatusCode::OK),
            ("rebind.example:7101", StatusCode::FORBIDDEN),
        ] {
            let status = Request::get("/debug/admin/status")
                .header(header::HOST, host)
                .body(Body::empty())
                .unwrap();
            assert_eq!(send(&router, status).await.status(), expected, "{host}");
        }
    }

    #[tokio::test]
    async fn grpc_is_served_only_as_grpc_over_http2() {
        for token in [false, true] {
            let (router, supervisor, _dir) = node(token, false).await;
            // A no-cors fetch: HTTP/1.1, text/plain.
            let fetch = post(
                "/fleet.v1.AgentService/Shutdown",
                &[
                    ("content-type", "text/plain"),
                    ("authorization", "Bearer s3cret"),
                ],
            );
            let response = send(&router, fetch).await;
            assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
            assert!(text(response).await.contains("gRPC client"));
            let http1 = post(
                "/fleet.v1.AgentService/Restart",
                &[
                    ("content-type", "application/grpc"),
                    ("authorization", "Bearer s3cret"),
                ],
            );
            let response = send(&router, http1).await;
            assert_eq!(response.status(), StatusCode::BAD_REQUEST);
            assert!(text(response).await.contains("HTTP/2"));
            assert!(!supervisor.shutting_down());
            assert_eq!(restarts(&supervisor), 0);
        }
    }

    /// Logs in with the form and returns the cookie pair and the page's CSRF token.
    async fn log_in(router: &Router) -> (String, String) {
        let login = post(
            "/debug/admin/login",
            &[("content-type", "application/x-www-form-urlencoded")],
        );
        let (parts, _) = login.into_parts();
        let login = Request::from_parts(parts, Body::from("token=s3cret"));
        let response = send(router, login).await;
        assert_eq!(response.status(), StatusCode::SEE_OTHER);
        let set = response.headers()[header::SET_COOKIE].to_str().unwrap();
        assert!(
            set.contains("HttpOnly")
                && set.contains("SameSite=Strict")
                && set.contains("Path=/debug/admin;"),
            "{set}"
        );
        let cookie = set.split(';').next().unwrap().to_string();
        let page = Request::get("/debug/admin")
            .header(header::HOST, HOST)
            .header(header::COOKIE, &cookie)
            .body(Body::empty())
            .unwrap();
        let response = send(router, page).await;
        assert_eq!(response.status(), StatusCode::OK);
        let html = text(response).await;
        assert!(
            html.contains("id=logout"),
            "a logged-in page offers Log out"
        );
        let csrf = html
            .split("name=csrf value='")
            .nth(1)
            .and_then(|rest| rest.split('\'').next())
            .expect("the page carries the CSRF token")
            .to_string();
        (cookie, csrf)
    }

    #[tokio::test]
    async fn a_wrong_login_gets_no_session() {
        let (router, _supervisor, _dir) = guarded().await;
        let request = Request::post("/debug/admin/login")
            .header(header::HOST, HOST)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from("token=s3cre"))
            .unwrap();
        let response = send(&router, request).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert!(response.headers().get(header::SET_COOKIE).is_none());
    }

    #[tokio::test]
    async fn parallel_login_guesses_share_one_back_off() {
        let (router, _supervisor, _dir) = guarded().await;
        let guess = |token: &'static str| {
            let router = router.clone();
            async move {
                let request = Request::post("/debug/admin/login")
                    .header(header::HOST, HOST)
                    .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                    .body(Body::from(format!("token={token}")))
                    .unwrap();
                send(&router, request).await
            }
        };
        let answers =
            futures_util::future::join_all((0..32).map(|_| tokio::spawn(guess("guess")))).await;
        let tried = answers
            .iter()
            .filter(|r| r.as_ref().unwrap().status() == StatusCode::UNAUTHORIZED)
            .count();
        let throttled = answers
            .iter()
            .filter(|r| r.as_ref().unwrap().status() == StatusCode::TOO_MANY_REQUESTS)
            .count();
        assert!(tried <= 3, "32 parallel guesses, {tried} compared");
        assert_eq!(tried + throttled, 32);
        // While the back-off lasts, even the right token waits (429 with Retry-After).
        let right = guess("s3cret").await;
        assert_eq!(right.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(right.headers().contains_key(header::RETRY_AFTER));
    }

    #[tokio::test]
    async fn a_session_posts_only_with_its_csrf_token() {
        let (router, supervisor, _dir) = guarded().await;
        let (cookie, csrf) = log_in(&router).await;
        let other = log_in(&router).await.1;
        for headers in [
            vec![("cookie", cookie.as_str())],
            vec![("cookie", cookie.as_str()), ("x-csrf-token", "nope")],
            vec![
                ("cookie", cookie.as_str()),
                ("x-csrf-token", other.as_str()),
            ],
        ] {
            let response = send(&router, post("/debug/admin/shutdown", &headers)).await;
            assert_eq!(response.status(), StatusCode::FORBIDDEN, "{headers:?}");
            assert!(text(response).await.contains("CSRF"));
        }
        assert!(!supervisor.shutting_down());

        // The cookie never opens gRPC, CSRF token or not.
        let grpc = Request::post("http://127.0.0.1:7101/fleet.v1.AgentService/Shutdown")
            .version(Version::HTTP_2)
            .header(header::CONTENT_TYPE, "application/grpc")
            .header(header::COOKIE, &cookie)
            .header("x-csrf-token", &csrf)
            .body(Body::empty())
            .unwrap();
        assert_eq!(send(&router, grpc).await.headers()["grpc-status"], "16");
        assert!(!supervisor.shutting_down());

        // The form field works like the header.
        let form = Request::post("/debug/admin/shutdown")
            .header(header::HOST, HOST)
            .header(header::COOKIE, &cookie)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(format!("csrf={csrf}")))
            .unwrap();
        assert_eq!(send(&router, form).await.status(), StatusCode::OK);
        assert!(supervisor.shutting_down());
    }

    #[tokio::test]
    async fn logout_ends_the_session() {
        let (router, _supervisor, _dir) = guarded().await;
        let (cookie, csrf) = log_in(&router).await;
        let logout = post(
            "/debug/admin/logout",
            &[("cookie", cookie.as_str()), ("x-csrf-token", csrf.as_str())],
        );
        let response = send(&router, logout).await;
        assert_eq!(response.status(), StatusCode::SEE_OTHER);
        assert_eq!(response.headers()[header::LOCATION], "/debug/admin/login");
        let cleared = response.headers()[header::SET_COOKIE].to_str().unwrap();
        assert!(cleared.contains("Max-Age=0"), "{cleared}");

        let page = Request::get("/debug/admin")
            .header(header::HOST, HOST)
            .header(header::COOKIE, &cookie)
            .body(Body::empty())
            .unwrap();
        assert_eq!(send(&router, page).await.status(), StatusCode::SEE_OTHER);
        let status = Request::get("/debug/admin/status")
            .header(header::COOKIE, &cookie)
            .body(Body::empty())
            .unwrap();
        assert_eq!(
            send(&router, status).await.status(),
            StatusCode::UNAUTHORIZED
        );
    }

    #[tokio::test]
    async fn without_a_token_the_page_needs_no_session() {
        let (router, _supervisor, _dir) = node(false, false).await;
        let page = Request::get("/debug/admin")
            .header(header::HOST, HOST)
            .body(Body::empty())
            .unwrap();
        let response = send(&router, page).await;
        assert_eq!(response.status(), StatusCode::OK);
        let html = text(response).await;
        assert!(!html.contains("name=csrf") && !html.contains("id=logout"));
        assert!(html.contains("id=confirm-restart"));
    }
}
