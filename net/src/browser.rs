//! What an endpoint that browsers use needs, the same in the agent's admin page and
//! the controller's dashboard: secrets compared in constant time, random session and
//! CSRF tokens, cookies, and the CSRF token a state-changing request carries.

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
