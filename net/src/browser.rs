//! What an endpoint that browsers use needs, the same in the agent's admin page and
//! the controller's dashboard: secrets compared in constant time, random session and
//! CSRF tokens, cookies, the CSRF token a state-changing request carries, and a
//! bounded, expiring store of server-side sessions.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, header};
use sha2::{Digest, Sha256};

/// Largest body a browser's state-changing request may send (a form).
pub const MAX_FORM: usize = 64 * 1024;

/// Whether `a` and `b` are the same secret. Digests of both are compared without an
/// early exit, so the time taken says nothing about where they differ (nor how long
/// the secret is).
pub fn same_secret(a: &str, b: &str) -> bool {
    let (x, y) = (Sha256::digest(a), Sha256::digest(b));
    x.iter()
        .zip(y.iter())
        .fold(0u8, |acc, (p, q)| acc | (p ^ q))
        == 0
}

/// 32 random bytes from the operating system, hex: a session id or a CSRF token.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the system's random source");
    hex::encode(bytes)
}

/// The value of cookie `name` in the request's headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
}

/// The body was larger than [`MAX_FORM`].
#[derive(Debug, thiserror::Error)]
#[error("form too large (64 KiB at most)")]
pub struct FormTooLarge;

/// The CSRF token a state-changing request carries — the header `x-csrf-token`, else
/// the form field `csrf` — and the request with its body put back for the handler.
pub async fn csrf_token(request: Request) -> Result<(Request, Option<String>), FormTooLarge> {
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_FORM)
        .await
        .map_err(|_| FormTooLarge)?;
    let header_token = parts
        .headers
        .get("x-csrf-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let token = header_token.or_else(|| {
        serde_urlencoded::from_bytes::<Vec<(String, String)>>(&bytes)
            .ok()?
            .into_iter()
            .find(|(k, _)| k == "csrf")
            .map(|(_, v)| v)
    });
    Ok((Request::from_parts(parts, Body::from(bytes)), token))
}

/// How long sessions last and how many are kept.
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    /// A session unused this long is gone.
    pub idle: Duration,
    /// A session this old is gone, used or not (`None`: no such bound).
    pub lifetime: Option<Duration>,
    /// Most sessions kept; the least recently used goes first.
    pub max: usize,
}

/// Server-side browser sessions: each a random id (the only thing the browser gets, in
/// its cookie) holding a `T` (a CSRF token, say), kept in this process's memory.
#[derive(Debug)]
pub struct SessionStore<T> {
    limits: SessionLimits,
    map: Mutex<HashMap<String, Slot<T>>>,
}

#[derive(Debug)]
struct Slot<T> {
    value: T,
    created: Instant,
    last_used: Instant,
}

impl<T> Slot<T> {
    fn live(&self, limits: &SessionLimits, now: Instant) -> bool {
        now.duration_since(self.last_used) < limits.idle
            && limits
                .lifetime
                .is_none_or(|l| now.duration_since(self.created) < l)
    }
}

impl<T: Clone> SessionStore<T> {
    pub fn new(limits: SessionLimits) -> Self {
        Self {
            limits,
            map: Mutex::new(HashMap::new()),
        }
    }

    /// A new session holding `value`; returns its id. Expired sessions are dropped,
    /// and at the bound the least recently used one makes room.
    pub fn create(&self, value: T, now: Instant) -> String {
        let id = random_token();
        let mut map = self.map.lock().expect("sessions lock");
        map.retain(|_, slot| slot.live(&self.limits, now));
        if map.len() >= self.limits.max
            && let Some(oldest) = map
                .iter()
                .min_by_key(|(_, slot)| slot.last_used)
                .map(|(id, _)| id.clone())
        {
            map.remove(&oldest);
        }
        map.insert(
            id.clone(),
            Slot {
                value,
                created: now,
                last_used: now,
            },
        );
        id
    }

    /// What the live session `id` holds; using it keeps it alive.
    pub fn get(&self, id: &str, now: Instant) -> Option<T> {
        let mut map = self.map.lock().expect("sessions lock");
        let slot = map.get_mut(id)?;
        if !slot.live(&self.limits, now) {
            map.remove(id);
            return None;
        }
        slot.last_used = now;
        Some(slot.value.clone())
    }

    /// Ends a session (logout).
    pub fn remove(&self, id: &str) {
        self.map.lock().expect("sessions lock").remove(id);
    }

    /// Sessions kept now (live or not yet dropped).
    pub fn len(&self) -> usize {
        self.map.lock().expect("sessions lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret("s3cret", "s3cret"));
        assert!(!same_secret("s3cret", "s3cre"));
        assert!(!same_secret("", "x"));
        assert_ne!(random_token(), random_token());
        assert_eq!(random_token().len(), 64);
    }

    #[test]
    fn cookies_are_found_by_name() {
        let mut headers = HeaderMap::new();
        headers.append(header::COOKIE, "a=1; fleet=xyz".parse().unwrap());
        assert_eq!(cookie(&headers, "fleet"), Some("xyz"));
        assert_eq!(cookie(&headers, "b"), None);
    }

    #[test]
    fn sessions_end_when_idle_when_old_and_at_the_bound() {
        let store = SessionStore::new(SessionLimits {
            idle: Duration::from_secs(10),
            lifetime: Some(Duration::from_secs(60)),
            max: 3,
        });
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let idle = store.create("a", t0);
        assert_eq!(store.get(&idle, t0 + s(9)), Some("a"));
        assert_eq!(store.get(&idle, t0 + s(20)), None, "idle too long");
        let busy = store.create("b", t0);
        let mut now = t0;
        while now < t0 + s(55) {
            now += s(5);
            assert_eq!(store.get(&busy, now), Some("b"));
        }
        assert_eq!(store.get(&busy, t0 + s(60)), None, "too old");
        for _ in 0..10 {
            store.create("c", t0);
        }
        assert!(store.len() <= 3);
        let gone = store.create("d", t0);
        store.remove(&gone);
        assert_eq!(store.get(&gone, t0), None);
    }

    #[tokio::test]
    async fn the_csrf_token_comes_from_the_header_or_the_form() {
        let form = Request::post("/").body(Body::from("x=1&csrf=abc")).unwrap();
        let (request, token) = csrf_token(form).await.unwrap();
        assert_eq!(token.as_deref(), Some("abc"));
        let body = axum::body::to_bytes(request.into_body(), 100)
            .await
            .unwrap();
        assert_eq!(
            &body[..],
            b"x=1&csrf=abc",
            "the handler still gets the body"
        );
        let header = Request::post("/")
            .header("x-csrf-token", "def")
            .body(Body::empty())
            .unwrap();
        assert_eq!(csrf_token(header).await.unwrap().1.as_deref(), Some("def"));
        let big = Request::post("/")
            .body(Body::from(vec![b'a'; MAX_FORM + 1]))
            .unwrap();
        assert!(csrf_token(big).await.is_err());
    }
}
