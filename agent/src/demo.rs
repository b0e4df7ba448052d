//! The demo app `fleet-agent` serves when started with no `--exec`: enough to see a
//! restart happen. `/` greets, `/pid` tells which worker answered, `/sleep?secs=N`
//! writes the worker PID, sleeps, and writes the PID again (a long request to carry
//! across a restart).

use std::convert::Infallible;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Query;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use futures_util::StreamExt;
use serde::Deserialize;

/// Longest `/sleep` the demo accepts.
const MAX_SLEEP_SECS: f64 = 3600.0;

pub fn router() -> Router {
    Router::new()
        .route("/", get(hello))
        .route("/pid", get(pid))
        .route("/sleep", get(sleep))
}

/// The greeting, the same for every request of a worker: made once, not with a
/// `getpid` and an environment lookup per request.
static GREETING: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let generation = std::env::var("FLEET_GENERATION").unwrap_or_else(|_| "-".into());
    format!(
        "Hello from fleet-agent: worker pid {}, generation {generation}\n",
        std::process::id()
    )
});

async fn hello() -> &'static str {
    GREETING.as_str()
}

async fn pid() -> String {
    format!("{}\n", std::process::id())
}

#[derive(Debug, Deserialize)]
struct SleepParams {
    secs: Option<f64>,
}

async fn sleep(
    params: Result<Query<SleepParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let secs = match params {
        Ok(Query(p)) => p.secs.unwrap_or(10.0),
        Err(e) => {
            return (StatusCode::BAD_REQUEST, format!("{e}: use /sleep?secs=N\n")).into_response();
        }
    };
    if !(0.0..=MAX_SLEEP_SECS).contains(&secs) {
        return (
            StatusCode::BAD_REQUEST,
            format!("secs must be between 0 and {MAX_SLEEP_SECS}\n"),
        )
            .into_response();
    }
    let pid = std::process::id();
    let pause = Duration::from_secs_f64(secs);
    let chunks = futures_util::stream::iter([false, true]).then(move |after_sleep| async move {
        if after_sleep {
            tokio::time::sleep(pause).await;
        }
        Ok::<_, Infallible>(Bytes::from(format!("{pid}\n")))
    });
    Body::from_stream(chunks).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    async fn get(uri: &str) -> (StatusCode, String) {
        let response = router()
            .oneshot(http::Request::get(uri).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn pid_is_this_process() {
        assert_eq!(
            get("/pid").await,
            (StatusCode::OK, format!("{}\n", std::process::id()))
        );
    }

    #[tokio::test]
    async fn sleep_writes_the_pid_twice() {
        let (status, body) = get("/sleep?secs=0.01").await;
        assert_eq!(status, StatusCode::OK);
        let pid = std::process::id().to_string();
        assert_eq!(
            body.lines().collect::<Vec<_>>(),
            vec![pid.as_str(), pid.as_str()]
        );
    }

    #[tokio::test]
    async fn sleep_refuses_nonsense() {
        assert_eq!(get("/sleep?secs=-1").await.0, StatusCode::BAD_REQUEST);
        assert_eq!(get("/sleep?secs=abc").await.0, StatusCode::BAD_REQUEST);
    }
}
