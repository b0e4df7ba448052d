use std::time::Duration;

use axum::body::Body;
use axum::http::Request as HttpRequest;

use super::*;
use crate::Fleet;
use crate::tokens::{Kind, NewToken};

#[test]
fn every_method_of_the_controller_service_has_a_role() {
    let proto = include_str!("../../../proto/proto/fleet/v1/controller.proto");
    let methods: Vec<&str> = proto
        .lines()
        .filter_map(|l| l.trim().strip_prefix("rpc "))
        .filter_map(|l| l.split('(').next())
        .map(str::trim)
        .collect();
    assert!(methods.len() >= 17, "{methods:?}");
    for m in methods {
        let path = format!("/fleet.v1.ControllerService/{m}");
        let row = route(&Method::POST, &path)
            .unwrap_or_else(|| panic!("{m} has no row in auth::ROUTES: give it a role"));
        assert_eq!(row.name, m);
    }
}

#[test]
fn routes_match_by_method_and_segment() {
    let need = |m: Method, p: &str| route(&m, p).map(|r| r.need);
    assert_eq!(need(Method::GET, "/rollouts/new"), Some(OPERATOR));
    assert_eq!(need(Method::GET, "/rollouts/r3"), Some(VIEWER));
    assert_eq!(need(Method::POST, "/rollouts/r3/abort"), Some(OPERATOR));
    assert_eq!(need(Method::HEAD, "/nodes"), Some(VIEWER));
    assert_eq!(need(Method::POST, "/nodes/n1/forget"), Some(ADMIN));
    // A node's page is for viewers; its actions below it keep their roles.
    assert_eq!(need(Method::GET, "/nodes/n1"), Some(VIEWER));
    assert_eq!(need(Method::POST, "/nodes/n1"), None);
    assert_eq!(need(Method::POST, "/nodes/n1/restart"), Some(OPERATOR));
    assert_eq!(
        need(Method::POST, "/fleet.v1.ControllerService/GetNodeHistory"),
        Some(VIEWER)
    );
    assert_eq!(need(Method::GET, "/assets/dashboard.css"), Some(ANYONE));
    assert_eq!(need(Method::POST, "/nodes"), None);
    assert_eq!(need(Method::GET, "/nodes//restart"), None);
    assert_eq!(need(Method::GET, "/rollouts/r3/frobnicate"), None);
    assert_eq!(
        need(Method::POST, "/fleet.v1.ControllerService/Frobnicate"),
        None
    );
}

#[test]
fn refusals_say_who_has_what_and_what_is_needed() {
    let viewer = Caller {
        name: "ci-bot".into(),
        role: Role::Viewer,
        token_id: Some("t00000000".into()),
        via: crate::tokens::Via::Token,
    };
    let start = route(&Method::POST, "/fleet.v1.ControllerService/StartRollout").unwrap();
    assert_eq!(
        refusal(&viewer, start).as_deref(),
        Some("token 'ci-bot' has role viewer; StartRollout needs operator")
    );
    let admin = Caller {
        role: Role::Admin,
        ..viewer
    };
    assert_eq!(refusal(&admin, start), None);
    let beat = route(&Method::POST, "/fleet.v1.ControllerService/Heartbeat").unwrap();
    let why = refusal(&admin, beat).unwrap();
    assert!(why.contains("--token-file"), "{why}");
    assert_eq!(refusal(&Caller::bootstrap(), beat), None);
    assert_eq!(refusal(&Caller::local(), beat), None);
}

async fn call(app: &axum::Router, request: HttpRequest<Body>) -> (StatusCode, HeaderMap, String) {
    crate::testing::oneshot(app, request).await
}

#[tokio::test]
async fn the_http_api_and_the_dashboard_check_the_role() {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::store::SqliteStore::open(&dir.path().join("fleet.db")).unwrap();
    let fleet = Fleet::new(Arc::new(store), Duration::from_secs(10), None).unwrap();
    let (_, viewer) = fleet
        .tokens
        .create(
            NewToken {
                name: "wall-screen".into(),
                kind: Kind::Viewer,
                ttl: None,
                node_id_prefix: String::new(),
                max_uses: 0,
            },
            &Caller::bootstrap(),
        )
        .await
        .unwrap();
    let app = crate::router(fleet, Some("bootstrap-secret".into()));
    let get = |path: &str, token: &str| {
        HttpRequest::get(path)
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Body::empty())
            .unwrap()
    };
    let (status, _, _) = call(&app, get("/api/nodes", &viewer)).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = call(&app, get("/api/nodes", "bootstrap-secret")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, body) = call(&app, get("/api/nodes", "wrong")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");

    // The viewer logs in to the dashboard: pages yes, the new-rollout form no.
    let login = HttpRequest::post("/login")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(format!("token={viewer}&next=/nodes")))
        .unwrap();
    let (status, headers, _) = call(&app, login).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let cookie = headers[header::SET_COOKIE]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let page = |path: &str| {
        HttpRequest::get(path)
            .header(header::COOKIE, &cookie)
            .body(Body::empty())
            .unwrap()
    };
    let (status, _, body) = call(&app, page("/rollouts")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("wall-screen"), "the page names the caller");
    assert!(
        !body.contains("/rollouts/new"),
        "a viewer is offered no new rollout"
    );
    let (status, _, body) = call(&app, page("/rollouts/new")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        body.trim(),
        "token 'wall-screen' has role viewer; StartRollout needs operator"
    );

    // An unknown gRPC method is refused.
    let unknown = HttpRequest::post("/fleet.v1.ControllerService/Frobnicate")
        .header(header::CONTENT_TYPE, "application/grpc")
        .header(header::AUTHORIZATION, "Bearer bootstrap-secret")
        .body(Body::empty())
        .unwrap();
    let (_, headers, _) = call(&app, unknown).await;
    assert_eq!(headers["grpc-status"], "12", "{headers:?}");
}
