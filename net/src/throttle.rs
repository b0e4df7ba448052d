//! One back-off for every failed login of a server, however many clients guess at once.
//!
//! A delay per failed request (sleep, then answer) slows one browser down but not an
//! attacker who sends a hundred guesses in parallel. Here the back-off belongs to the
//! server: after consecutive failures every attempt is refused at once until it has
//! passed, and an attempt counts as failed from the moment it is let in, until it
//! proves otherwise; so parallel guesses get no more tries than serial ones, even
//! when they arrive in the same instant on different threads. The price: while
//! someone guesses, the right token waits out the back-off too (at most
//! [`Backoff::max`]).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};

/// How the back-off grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Failures in a row that cost nothing (a person mistyping once or twice).
    pub free: u32,
    /// The back-off after the first failure beyond the free ones; it doubles with
    /// each further failure.
    pub first: Duration,
    /// The longest back-off.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            free: 2,
            first: Duration::from_millis(250),
            max: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// The back-off after `failures` failures in a row.
    pub fn after(&self, failures: u32) -> Duration {
        let Some(beyond) = failures.checked_sub(self.free + 1) else {
            return Duration::ZERO;
        };
        self.first
            .saturating_mul(1u32.checked_shl(beyond.min(31)).unwrap_or(u32::MAX))
            .min(self.max)
    }
}

/// The failed-login back-off of one server.
#[derive(Debug, Default)]
pub struct LoginThrottle {
    backoff: Backoff,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Failed (or unfinished) attempts in a row.
    failures: u32,
    /// No attempt is let in before this.
    until: Option<Instant>,
}

/// An attempt that was let in; it counts as failed unless [`Attempt::succeeded`].
#[derive(Debug)]
#[must_use = "call succeeded() or failed() once the token is compared"]
pub struct Attempt<'a> {
    throttle: &'a LoginThrottle,
}

/// An attempt refused because of earlier failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryAfter(pub Duration);

impl LoginThrottle {
    pub fn new(backoff: Backoff) -> Self {
        Self {
            backoff,
            state: Mutex::default(),
        }
    }

    /// Call before comparing a token: `Err` means refuse at once (HTTP 429), without
    /// comparing.
    pub fn check(&self) -> Result<Attempt<'_>, RetryAfter> {
        let mut state = self.state.lock().expect("login throttle");
        let now = Instant::now();
        if let Some(until) = state.until.filter(|&until| until > now) {
            return Err(RetryAfter(until - now));
        }
        // Counted as a failure already, so that attempts racing this one see the
        // back-off it would earn.
        state.failures = state.failures.saturating_add(1);
        let backoff = self.backoff.after(state.failures);
        state.until = (!backoff.is_zero()).then(|| now + backoff);
        Ok(Attempt { throttle: self })
    }

    /// Failed attempts in a row (unfinished ones included).
    pub fn failures(&self) -> u32 {
        self.state.lock().expect("login throttle").failures
    }
}

impl Attempt<'_> {
    /// The token was right: the back-off is over.
    pub fn succeeded(self) {
        let mut state = self.throttle.state.lock().expect("login throttle");
        state.failures = 0;
        state.until = None;
    }

    /// The token was wrong (already counted when the attempt was let in).
    pub fn failed(self) {}
}

impl RetryAfter {
    /// Whole seconds to wait, rounded up (what `Retry-After` carries).
    pub fn secs(&self) -> u64 {
        self.0.as_secs() + u64::from(self.0.subsec_nanos() > 0)
    }

    /// The `Retry-After` header value.
    pub fn header_value(&self) -> HeaderValue {
        HeaderValue::from(self.secs())
    }
}

impl std::fmt::Display for RetryAfter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "too many failed logins: try again in {} s", self.secs())
    }
}

impl std::error::Error for RetryAfter {}

/// `429 Too Many Requests` with `Retry-After` and the message as plain text.
impl IntoResponse for RetryAfter {
    fn into_response(self) -> Response {
        (
            StatusCode::TOO_MANY_REQUESTS,
            [
                (header::RETRY_AFTER, self.header_value()),
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; charset=utf-8"),
                ),
            ],
            format!("{self}\n"),
        )
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn fail_once(t: &LoginThrottle) {
        t.check().expect("let in").failed();
    }

    #[test]
    fn the_back_off_doubles_after_the_free_failures_up_to_the_maximum() {
        let b = Backoff::default();
        let ms = |n| b.after(n).as_millis();
        assert_eq!([ms(1), ms(2), ms(3), ms(4), ms(5)], [0, 0, 250, 500, 1000]);
        assert_eq!(b.after(20), Duration::from_secs(30));
        assert_eq!(b.after(u32::MAX), Duration::from_secs(30));
    }

    #[test]
    fn after_failures_attempts_are_refused_at_once_until_the_back_off_passed() {
        let t = LoginThrottle::new(Backoff {
            free: 1,
            first: Duration::from_secs(60),
            max: Duration::from_secs(60),
        });
        fail_once(&t);
        fail_once(&t);
        let refused = t.check().expect_err("throttled");
        assert!(refused.0 > Duration::from_secs(59), "{refused:?}");
        assert_eq!(refused.secs(), 60);
        assert_eq!(
            refused.to_string(),
            "too many failed logins: try again in 60 s"
        );
        // Refusals are not failures: they do not lengthen the back-off.
        assert_eq!(t.failures(), 2);
    }

    #[test]
    fn a_success_ends_the_back_off() {
        let t = LoginThrottle::new(Backoff {
            free: 0,
            first: Duration::from_millis(1),
            max: Duration::from_millis(1),
        });
        fail_once(&t);
        let deadline = Instant::now() + Duration::from_secs(5);
        let attempt = loop {
            if let Ok(a) = t.check() {
                break a;
            }
            assert!(Instant::now() < deadline, "the 1 ms back-off never ended");
            std::thread::yield_now();
        };
        attempt.succeeded();
        assert_eq!(t.failures(), 0);
        t.check().expect("no back-off after a success").succeeded();
    }

    #[test]
    fn an_attempt_never_settled_counts_as_failed() {
        let t = LoginThrottle::new(Backoff {
            free: 0,
            first: Duration::from_secs(60),
            max: Duration::from_secs(60),
        });
        drop(t.check().unwrap());
        assert!(t.check().is_err());
    }

    #[test]
    fn parallel_guesses_get_no_more_tries_than_serial_ones() {
        let t = Arc::new(LoginThrottle::new(Backoff {
            free: 2,
            first: Duration::from_secs(60),
            max: Duration::from_secs(60),
        }));
        // 64 guesses at once, from 8 threads: as serial guesses would, 3 are let in
        // (2 free, the third earns the back-off) and every other is refused.
        let barrier = Arc::new(std::sync::Barrier::new(8));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let (t, barrier) = (t.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    (0..8)
                        .filter(|_| match t.check() {
                            Ok(attempt) => {
                                attempt.failed();
                                true
                            }
                            Err(_) => false,
                        })
                        .count()
                })
            })
            .collect();
        let let_in: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(let_in, 3);
        // While throttled, N more concurrent attempts are all refused.
        let attempts: Vec<_> = (0..32)
            .map(|_| {
                let t = t.clone();
                std::thread::spawn(move || t.check().is_err())
            })
            .collect();
        let refused = attempts
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(|refused| *refused)
            .count();
        assert_eq!(refused, 32);
    }

    #[tokio::test]
    async fn a_refusal_is_a_429_with_retry_after() {
        let response = RetryAfter(Duration::from_millis(1500)).into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
        let body = axum::body::to_bytes(response.into_body(), 1024)
            .await
            .unwrap();
        assert_eq!(&body[..], b"too many failed logins: try again in 2 s\n");
    }
}
