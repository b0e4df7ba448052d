//! Browser sessions of the admin page (only with a token: without one the page needs
//! no login, and the Host, Origin and `Sec-Fetch-Site` checks of [`super::auth`] keep
//! other sites out).
//!
//! Logging in with the token creates a random id (32 bytes from the OS, hex) kept in
//! this process's memory with a CSRF token of its own; the browser gets only the id,
//! in an `HttpOnly`, `SameSite=Strict` cookie scoped to the admin path. A session ends
//! after [`IDLE`] without use, [`ABSOLUTE`] after login whatever its use, on logout,
//! or when the supervisor restarts (workers come and go; the supervisor keeps them).

use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue};
use fleet_net::browser::{SessionLimits, SessionStore, cookie};

/// The session cookie's name.
pub const COOKIE: &str = "fleet_admin";
/// A session unused this long is gone.
pub const IDLE: Duration = Duration::from_secs(30 * 60);
/// A session this old is gone, used or not.
pub const ABSOLUTE: Duration = Duration::from_secs(8 * 3600);
/// Most sessions kept: only a login with the right token creates one, so this is a
/// bound against a forgotten script logging in in a loop, not a working limit. The
/// least recently used goes first.
const MAX_SESSIONS: usize = 256;

/// One logged-in browser, as the handlers see it.
#[derive(Debug, Clone)]
pub struct Session {
    pub id: String,
    /// Must come back with every POST made with this session's cookie.
    pub csrf: String,
}

/// Every live session, bounded; each holds its CSRF token.
#[derive(Debug)]
pub struct Sessions {
    store: SessionStore<String>,
}

impl Default for Sessions {
    fn default() -> Self {
        Self {
            store: SessionStore::new(SessionLimits {
                idle: IDLE,
                lifetime: Some(ABSOLUTE),
                max: MAX_SESSIONS,
            }),
        }
    }
}

impl Sessions {
    /// A new session (after a successful login).
    pub fn create(&self) -> Session {
        self.create_at(Instant::now())
    }

    fn create_at(&self, now: Instant) -> Session {
        let csrf = fleet_net::browser::random_token();
        let id = self.store.create(csrf.clone(), now);
        Session { id, csrf }
    }

    /// The live session named by the request's cookie; using it keeps it alive.
    pub fn of_request(&self, headers: &HeaderMap) -> Option<Session> {
        self.get_at(cookie(headers, COOKIE)?, Instant::now())
    }

    fn get_at(&self, id: &str, now: Instant) -> Option<Session> {
        let csrf = self.store.get(id, now)?;
        Some(Session {
            id: id.to_string(),
            csrf,
        })
    }

    /// Ends a session (logout).
    pub fn remove(&self, id: &str) {
        self.store.remove(id);
    }
}

/// `Set-Cookie` for a session: sent back only to the admin path of this host, never
/// to the app's own pages nor to `/` (so the app ports' other routes never see it).
pub fn set_cookie(session: &Session, admin: &str) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{COOKIE}={}; Path={admin}; HttpOnly; SameSite=Strict; Max-Age={}",
        session.id,
        ABSOLUTE.as_secs()
    ))
    .expect("the admin path is validated to be a plain path")
}

/// `Set-Cookie` that deletes the session cookie.
pub fn clear_cookie(admin: &str) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{COOKIE}=; Path={admin}; HttpOnly; SameSite=Strict; Max-Age=0"
    ))
    .expect("the admin path is validated to be a plain path")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_cookie(id: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            axum::http::header::COOKIE,
            format!("a=1; {COOKIE}={id} ; b=2").parse().unwrap(),
        );
        h
    }

    #[test]
    fn a_session_is_found_by_its_cookie_until_logout() {
        let s = Sessions::default();
        let a = s.create();
        assert_eq!(a.id.len(), 64);
        assert_ne!(a.id, a.csrf);
        let found = s.of_request(&with_cookie(&a.id)).unwrap();
        assert_eq!(found.csrf, a.csrf);
        assert!(
            s.of_request(&with_cookie("0".repeat(64).as_str()))
                .is_none()
        );
        s.remove(&a.id);
        assert!(s.of_request(&with_cookie(&a.id)).is_none());
    }

    #[test]
    fn sessions_expire_when_idle_and_when_old() {
        let s = Sessions::default();
        let t0 = Instant::now();
        let idle = s.create_at(t0);
        assert!(
            s.get_at(&idle.id, t0 + IDLE - Duration::from_secs(1))
                .is_some()
        );
        assert!(s.get_at(&idle.id, t0 + 2 * IDLE).is_none(), "idle too long");

        // Used every few minutes, it still ends ABSOLUTE after login.
        let busy = s.create_at(t0);
        let mut now = t0;
        while now < t0 + ABSOLUTE - IDLE {
            now += IDLE / 2;
            assert!(s.get_at(&busy.id, now).is_some());
        }
        assert!(s.get_at(&busy.id, t0 + ABSOLUTE).is_none(), "too old");
    }

    #[test]
    fn the_map_is_bounded() {
        let s = Sessions::default();
        for _ in 0..MAX_SESSIONS + 10 {
            s.create();
        }
        assert!(s.store.len() <= MAX_SESSIONS);
    }

    #[test]
    fn the_cookie_is_scoped_to_the_admin_path() {
        let s = Sessions::default().create();
        let c = set_cookie(&s, "/debug/admin");
        let c = c.to_str().unwrap();
        assert!(c.contains("Path=/debug/admin;"), "{c}");
        assert!(
            c.contains("HttpOnly") && c.contains("SameSite=Strict"),
            "{c}"
        );
        assert!(clear_cookie("/x").to_str().unwrap().contains("Max-Age=0"));
    }
}
