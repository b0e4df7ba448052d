use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::store::SqliteStore;

fn store(dir: &tempfile::TempDir) -> Arc<dyn Store> {
    Arc::new(SqliteStore::open(&dir.path().join("fleet.db")).unwrap())
}

fn role(name: &str, role: Role) -> NewToken {
    NewToken {
        name: name.into(),
        kind: Kind::of(role),
        ttl: None,
        node_id_prefix: String::new(),
        max_uses: 0,
    }
}

fn join(prefix: &str, max_uses: u32) -> NewToken {
    NewToken {
        name: "web join".into(),
        kind: Kind::Join,
        ttl: Some(Duration::from_secs(600)),
        node_id_prefix: prefix.into(),
        max_uses,
    }
}

/// Moves a token's expiry into the past, as time would.
fn expire(tokens: &Tokens, id: &str) {
    let mut records = tokens.records.write().unwrap();
    records.get_mut(id).unwrap().expires_unix_ms = now_ms() - 1000;
}

#[tokio::test]
async fn a_token_stands_for_its_name_and_role_until_it_is_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = Tokens::load(store(&dir)).unwrap();
    let (record, token) = tokens
        .create(role("ci-bot", Role::Operator), &Caller::bootstrap())
        .await
        .unwrap();
    // fleet_<id>_<64 hex>, the id recognisable in it.
    assert!(
        record.id.starts_with('t') && record.id.len() == 9,
        "{record:?}"
    );
    assert!(
        token.starts_with(&format!("fleet_{}_", record.id)),
        "{token}"
    );
    assert_eq!(token_id(&token), Some(record.id.as_str()));
    assert_eq!(record.created_by, "bootstrap");
    assert_ne!(record.hash, token);

    let caller = tokens.authenticate(&token).unwrap();
    assert_eq!(caller.name, "ci-bot");
    assert_eq!(caller.role, Role::Operator);
    assert_eq!(caller.token_id.as_deref(), Some(record.id.as_str()));
    // One changed character, the id of another token, or no token shape at all.
    let mut wrong = token.clone();
    let last = if token.ends_with('0') { "1" } else { "0" };
    wrong.replace_range(token.len() - 1.., last);
    assert_eq!(tokens.authenticate(&wrong), Err(AuthError::Unknown));
    assert_eq!(tokens.authenticate("s3cret"), Err(AuthError::Unknown));

    tokens
        .revoke(&record.id, &Caller::bootstrap())
        .await
        .unwrap();
    let refused = tokens.authenticate(&token).unwrap_err();
    let message = refused.to_string();
    assert!(matches!(refused, AuthError::Revoked { .. }), "{refused:?}");
    assert!(
        message.starts_with(&format!("token {} ('ci-bot') was revoked at ", record.id)),
        "{message}"
    );
    assert!(tokens.recheck(&record.id).is_err());

    // The store keeps the revocation, and never the token string.
    let again = Tokens::load(store(&dir)).unwrap();
    assert!(matches!(
        again.authenticate(&token),
        Err(AuthError::Revoked { .. })
    ));
    assert!(!again.list()[0].hash.contains(&token[16..]));
}

#[tokio::test]
async fn expired_and_join_tokens_are_no_operator_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = Tokens::load(store(&dir)).unwrap();
    let (viewer, viewer_token) = tokens
        .create(role("dash", Role::Viewer), &Caller::bootstrap())
        .await
        .unwrap();
    expire(&tokens, &viewer.id);
    let e = tokens.authenticate(&viewer_token).unwrap_err();
    assert!(e.to_string().contains("('dash') expired at "), "{e}");
    let (j, join_token) = tokens
        .create(join("web-", 0), &Caller::bootstrap())
        .await
        .unwrap();
    assert!(j.id.starts_with('j'), "{j:?}");
    let e = tokens.authenticate(&join_token).unwrap_err();
    assert!(matches!(e, AuthError::JoinToken { .. }), "{e:?}");
    assert!(e.to_string().contains("is a join token"), "{e}");
}

#[tokio::test]
async fn tokens_are_checked_when_created() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = Tokens::load(store(&dir)).unwrap();
    let by = Caller::local();
    let e = tokens
        .create(role(" ", Role::Admin), &by)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("give the token a name"), "{e}");
    let e = tokens
        .create(role(&"x".repeat(65), Role::Admin), &by)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("64 at most"), "{e}");
    let mut with_prefix = role("ci", Role::Operator);
    with_prefix.node_id_prefix = "web-".into();
    let e = tokens.create(with_prefix, &by).await.unwrap_err();
    assert!(e.to_string().contains("for join tokens"), "{e}");
    // A join token without a ttl lasts an hour, and is named "join".
    let mut j = join("", 0);
    j.ttl = None;
    j.name = String::new();
    let (record, _) = tokens.create(j, &by).await.unwrap();
    assert_eq!(record.name, "join");
    let hour = JOIN_TTL.as_millis() as u64;
    assert!(
        record
            .expires_unix_ms
            .abs_diff(record.created_unix_ms + hour)
            < 1000
    );
    assert_eq!(tokens.list().len(), 1);
}

#[tokio::test]
async fn redeem_join_checks_kind_expiry_prefix_and_uses() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = Tokens::load(store(&dir)).unwrap();
    let by = Caller::bootstrap();
    let (j, secret) = tokens.create(join("web-", 2), &by).await.unwrap();

    let e = tokens.redeem_join(&secret, "db-1").await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "node id db-1 does not start with the token's prefix web-"
    );
    let grant = tokens.redeem_join(&secret, "web-1").await.unwrap();
    assert_eq!(grant.node_id, "web-1");
    assert_eq!(grant.token_id, j.id);
    assert_eq!(grant.uses_left, Some(1));
    let grant = tokens.redeem_join(&secret, "web-2").await.unwrap();
    assert_eq!(grant.uses_left, Some(0));
    let e = tokens.redeem_join(&secret, "web-3").await.unwrap_err();
    assert!(matches!(e, JoinError::UsedUp { max: 2, .. }), "{e:?}");
    assert!(e.to_string().contains("used 2 time(s)"), "{e}");
    // The uses taken are kept across a restart of the controller.
    let again = Tokens::load(store(&dir)).unwrap();
    assert!(matches!(
        again.redeem_join(&secret, "web-3").await,
        Err(JoinError::UsedUp { .. })
    ));

    let (j2, secret2) = tokens.create(join("", 0), &by).await.unwrap();
    expire(&tokens, &j2.id);
    let e = tokens.redeem_join(&secret2, "web-9").await.unwrap_err();
    let message = e.to_string();
    assert!(
        message.starts_with(&format!("join token {} expired at ", j2.id)),
        "{message}"
    );
    assert!(
        message.ends_with(": create a new one with `fleetctl token create --join`"),
        "{message}"
    );
    assert_eq!(e.status().code(), tonic::Code::Unauthenticated);

    let (j3, secret3) = tokens.create(join("", 0), &by).await.unwrap();
    tokens.revoke(&j3.id, &by).await.unwrap();
    let e = tokens.redeem_join(&secret3, "web-9").await.unwrap_err();
    assert!(e.to_string().contains("was revoked at"), "{e}");

    let (_, operator) = tokens.create(role("ci", Role::Admin), &by).await.unwrap();
    let e = tokens.redeem_join(&operator, "web-9").await.unwrap_err();
    assert!(matches!(e, JoinError::NotJoin { .. }), "{e:?}");
    assert_eq!(e.status().code(), tonic::Code::PermissionDenied);
    let e = tokens.redeem_join("fleet_nope", "web-9").await.unwrap_err();
    assert!(matches!(e, JoinError::Unknown), "{e:?}");
    // Unlimited uses until it expires.
    let (_, unlimited) = tokens.create(join("", 0), &by).await.unwrap();
    for i in 0..5 {
        let grant = tokens
            .redeem_join(&unlimited, &format!("n{i}"))
            .await
            .unwrap();
        assert_eq!(grant.uses_left, None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_joins_take_each_use_once() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = Arc::new(Tokens::load(store(&dir)).unwrap());
    let (_, secret) = tokens
        .create(join("", 3), &Caller::bootstrap())
        .await
        .unwrap();
    let mut joins = tokio::task::JoinSet::new();
    for i in 0..16 {
        let (tokens, secret) = (tokens.clone(), secret.clone());
        joins.spawn(async move { tokens.redeem_join(&secret, &format!("n{i}")).await });
    }
    let results = joins.join_all().await;
    let granted = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(granted, 3, "{results:?}");
    assert_eq!(tokens.list()[0].uses, 3);
}

#[tokio::test]
async fn last_use_is_stored_apart_and_never_undoes_a_revocation() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(&dir);
    let tokens = Tokens::load(s.clone()).unwrap();
    let (record, token) = tokens
        .create(role("ci", Role::Viewer), &Caller::bootstrap())
        .await
        .unwrap();
    tokens.authenticate(&token).unwrap();
    tokens
        .revoke(&record.id, &Caller::bootstrap())
        .await
        .unwrap();
    // A late write of the last use (after the revocation) leaves the revocation be.
    s.touch_token(&record.id, now_ms() + 5).await.unwrap();
    let stored = s.load_tokens().unwrap();
    assert!(stored[0].revoked_unix_ms > 0, "{stored:?}");
    assert!(stored[0].last_used_unix_ms > 0, "{stored:?}");
    assert!(tokens.list()[0].last_used_unix_ms > 0);
}

#[test]
fn actors_show_what_was_declared_beside_who_acted() {
    assert_eq!(actor_label("ci", ""), "ci");
    assert_eq!(actor_label("ci", "ci"), "ci");
    assert_eq!(actor_label("ci", "alice"), "ci (as \"alice\")");
}

/// The cost of one check: `cargo test -p fleet-controller token_check_cost -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "prints a figure"]
async fn token_check_cost() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = Tokens::load(store(&dir)).unwrap();
    for i in 0..1000 {
        tokens
            .create(role(&format!("t{i}"), Role::Viewer), &Caller::local())
            .await
            .unwrap();
    }
    let (_, token) = tokens
        .create(role("measured", Role::Operator), &Caller::local())
        .await
        .unwrap();
    let n = 200_000;
    let started = Instant::now();
    for _ in 0..n {
        std::hint::black_box(tokens.authenticate(std::hint::black_box(&token)).unwrap());
    }
    let each = started.elapsed() / n;
    println!("one token check (1001 tokens): {each:?}");
}
