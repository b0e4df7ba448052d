//! Operator tokens with a role, and join tokens for agents.
//!
//! A token is `fleet_<id>_<secret>`: the id (`t` + 8 hex digits for an operator token,
//! `j` + 8 for a join token) names it in lists and logs; the secret is 32 random bytes
//! from the operating system. The controller keeps the SHA-256 of the whole string,
//! never the string itself, and shows the string once, in the answer to its creation.
//!
//! One SHA-256 is enough, no slow hash (bcrypt, scrypt, Argon2): those make guessing
//! a *password* from its hash expensive because a password comes from a small space
//! a dictionary covers. These secrets are 256 uniformly random bits, so even with the
//! database in hand, finding one from its digest is a 2^256 search however fast each
//! try is; a slow hash would add nothing but its cost (tens of milliseconds) to every
//! API call.
//!
//! The records are kept in memory, written through to the store: a check is a map
//! lookup and one SHA-256 (5.8 µs in a debug build with 1,001 tokens; see the
//! ignored test `token_check_cost`), and every change (create, revoke,
//! redeem) is durable before it is visible, under one lock, so a revoked token is
//! refused from the next call on and two agents cannot both take a join token's last
//! use. Only the time of last use is written lazily (at most once a minute per token).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::now_ms;
use crate::store::{Store, StoreError};

/// What every token string starts with.
pub const PREFIX: &str = "fleet_";
/// The caller name of the controller's `--token-file` token.
pub const BOOTSTRAP: &str = "bootstrap";
/// The caller name when the controller has no token (loopback, open).
pub const LOCAL: &str = "local";
/// Last use is written to the store when it moved by at least this much.
const LAST_USED_STEP_MS: u64 = 60_000;
/// Longest token name and node-id prefix.
const MAX_NAME: usize = 64;
/// How long a join token lasts when its creator gives no ttl.
pub const JOIN_TTL: Duration = Duration::from_secs(3600);

/// What a caller may do; each role may do everything the one before it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read: nodes, rollouts, watch, the dashboard's pages and events.
    Viewer,
    /// Also restart and shut down nodes; start, pause, resume, abort and undo rollouts.
    Operator,
    /// Also create, list and revoke tokens, and forget nodes.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Result<Role, String> {
        match s.trim() {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            other => Err(format!(
                "{other:?} is not a role: give viewer, operator or admin"
            )),
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An operator token of a role, or a join token (which is no operator credential).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Viewer,
    Operator,
    Admin,
    Join,
}

impl Kind {
    pub fn role(self) -> Option<Role> {
        match self {
            Kind::Viewer => Some(Role::Viewer),
            Kind::Operator => Some(Role::Operator),
            Kind::Admin => Some(Role::Admin),
            Kind::Join => None,
        }
    }

    pub fn of(role: Role) -> Kind {
        match role {
            Role::Viewer => Kind::Viewer,
            Role::Operator => Kind::Operator,
            Role::Admin => Kind::Admin,
        }
    }

    /// `viewer`, `operator`, `admin` or `join`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Join => "join",
            other => other.role().expect("a role").as_str(),
        }
    }
}

/// Who made a call, as the auth layer resolved it (in the request's extensions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Recorded as the actor of what it does: a token's name, `bootstrap` or `local`.
    pub name: String,
    pub role: Role,
    /// The token's id; `None` for the bootstrap token and for an open controller.
    pub token_id: Option<String>,
    pub via: Via,
}

/// How a caller was recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// The controller has no token (loopback): everyone is `local`, an admin.
    Open,
    /// The controller's `--token-file` token: an admin, and the agents' token.
    Bootstrap,
    /// A token from `fleetctl token create`.
    Token,
}

impl Caller {
    pub fn local() -> Caller {
        Caller {
            name: LOCAL.into(),
            role: Role::Admin,
            token_id: None,
            via: Via::Open,
        }
    }

    pub fn bootstrap() -> Caller {
        Caller {
            name: BOOTSTRAP.into(),
            role: Role::Admin,
            token_id: None,
            via: Via::Bootstrap,
        }
    }

    /// Whether it may call `Heartbeat`: the agents' credential until node
    /// certificates (mutual TLS) take its place.
    pub fn is_agent_credential(&self) -> bool {
        matches!(self.via, Via::Open | Via::Bootstrap)
    }

    /// "token 'ci' (t1a2b3c4d)", "the bootstrap token", "local".
    pub fn describe(&self) -> String {
        match (&self.via, &self.token_id) {
            (Via::Token, Some(id)) => format!("token '{}' ({id})", self.name),
            (Via::Bootstrap, _) => "the bootstrap token".into(),
            _ => self.name.clone(),
        }
    }
}

/// The actor as history shows it: the caller, and beside it in quotes what the
/// caller declared itself to be (`--actor`), when that says something else:
/// `ci (as "alice")`.
pub fn actor_label(actor: &str, declared: &str) -> String {
    if declared.is_empty() || declared == actor {
        actor.to_string()
    } else {
        format!("{actor} (as {declared:?})")
    }
}

/// A token as the store keeps it: the digest of its string, never the string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    /// Who or what it is for; the actor of what it does.
    pub name: String,
    pub kind: Kind,
    /// Hex SHA-256 of the token string.
    pub hash: String,
    pub created_unix_ms: u64,
    pub created_by: String,
    /// 0: never.
    pub expires_unix_ms: u64,
    /// 0: not revoked.
    pub revoked_unix_ms: u64,
    /// Join tokens: a node id must start with this (empty: any).
    #[serde(default)]
    pub node_id_prefix: String,
    /// Join tokens: how many joins it allows (0: any number until it expires).
    #[serde(default)]
    pub max_uses: u32,
    /// Join tokens: how many joins it allowed so far.
    #[serde(default)]
    pub uses: u32,
    /// Kept apart by the store (written lazily, never over a newer record).
    #[serde(default, skip_serializing)]
    pub last_used_unix_ms: u64,
}

impl TokenRecord {
    pub fn expired(&self, now: u64) -> bool {
        self.expires_unix_ms != 0 && now >= self.expires_unix_ms
    }

    /// Joins left, when the token has a limit.
    pub fn uses_left(&self) -> Option<u32> {
        (self.max_uses > 0).then(|| self.max_uses.saturating_sub(self.uses))
    }
}

/// What a new token is for. `ttl`: none for an operator token is no expiry; for a
/// join token, [`JOIN_TTL`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewToken {
    pub name: String,
    pub kind: Kind,
    pub ttl: Option<Duration>,
    pub node_id_prefix: String,
    pub max_uses: u32,
}

/// Why a presented token is not a caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(
        "missing or wrong token: send `authorization: Bearer <token>` (fleetctl --token / FLEET_TOKEN)"
    )]
    Unknown,
    #[error(
        "token {id} ('{name}') was revoked at {at}: ask an admin for a new one (`fleetctl token create`)"
    )]
    Revoked {
        id: String,
        name: String,
        at: String,
    },
    #[error(
        "token {id} ('{name}') expired at {at}: ask an admin for a new one (`fleetctl token create`)"
    )]
    Expired {
        id: String,
        name: String,
        at: String,
    },
    #[error(
        "token {id} ('{name}') is a join token: it lets an agent join the fleet and is refused as an operator credential; use a token from `fleetctl token create --role ROLE`"
    )]
    JoinToken { id: String, name: String },
}

/// Why a join token did not let a node join.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("not a join token of this controller: create one with `fleetctl token create --join`")]
    Unknown,
    #[error(
        "token {id} ('{name}') is an operator token, not a join token: create one with `fleetctl token create --join`"
    )]
    NotJoin { id: String, name: String },
    #[error(
        "join token {id} was revoked at {at}: create a new one with `fleetctl token create --join`"
    )]
    Revoked { id: String, at: String },
    #[error(
        "join token {id} expired at {at}: create a new one with `fleetctl token create --join`"
    )]
    Expired { id: String, at: String },
    #[error("node id {node_id} does not start with the token's prefix {prefix}")]
    Prefix { node_id: String, prefix: String },
    #[error(
        "join token {id} has been used {max} time(s), all it allows: create a new one with `fleetctl token create --join --uses N`"
    )]
    UsedUp { id: String, max: u32 },
    #[error("the join was not recorded: {0}")]
    Store(#[from] StoreError),
}

impl JoinError {
    /// The gRPC status for a refused join.
    pub fn status(&self) -> tonic::Status {
        match self {
            JoinError::Store(_) => tonic::Status::internal(self.to_string()),
            JoinError::Unknown | JoinError::Revoked { .. } | JoinError::Expired { .. } => {
                tonic::Status::unauthenticated(self.to_string())
            }
            _ => tonic::Status::permission_denied(self.to_string()),
        }
    }
}

/// A join that a join token allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinGrant {
    pub token_id: String,
    /// The token's name (who created it for what).
    pub token_name: String,
    pub node_id: String,
    /// Joins the token still allows, when it has a limit.
    pub uses_left: Option<u32>,
}

/// Why a token was not created or revoked.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{0}")]
    Invalid(String),
    #[error("no token {0:?}: list them with `fleetctl token list`")]
    NotFound(String),
    #[error(
        "the bootstrap token is the controller's --token-file and has no id to revoke: write a new token into that file and restart the controller"
    )]
    Bootstrap,
    #[error("the token was not stored: {0}")]
    Store(#[from] StoreError),
}

/// The last use of a token: as seen, and as last written to the store.
#[derive(Debug, Clone, Copy, Default)]
struct Used {
    seen: u64,
    stored: u64,
}

/// Every token, checked in memory and written through to the store.
#[derive(Debug)]
pub struct Tokens {
    store: Arc<dyn Store>,
    records: RwLock<HashMap<String, TokenRecord>>,
    /// One change at a time: check, write durably, then publish in `records`.
    changes: tokio::sync::Mutex<()>,
    used: Mutex<HashMap<String, Used>>,
}

/// `2025-01-31T12:00:00Z`.
pub fn rfc3339(unix_ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(unix_ms)).to_string()
}

/// Hex SHA-256 of a token string.
fn digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Compares without an early exit: the time says nothing about where they differ.
fn same_digest(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The id in `fleet_<id>_<secret>`, if the string has that shape.
pub fn token_id(token: &str) -> Option<&str> {
    let (id, secret) = token.trim().strip_prefix(PREFIX)?.split_once('_')?;
    let id_ok = id.len() == 9
        && (id.starts_with('t') || id.starts_with('j'))
        && id[1..].bytes().all(|b| b.is_ascii_hexdigit());
    let secret_ok = secret.len() == 64 && secret.bytes().all(|b| b.is_ascii_hexdigit());
    (id_ok && secret_ok).then_some(id)
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).expect("the system's random source");
    hex::encode(buf)
}

fn check_text(what: &str, value: &str) -> Result<(), TokenError> {
    if value.chars().count() > MAX_NAME {
        return Err(TokenError::Invalid(format!(
            "{what} is {} characters long: {MAX_NAME} at most",
            value.chars().count()
        )));
    }
    if value.chars().any(|c| c.is_control()) {
        return Err(TokenError::Invalid(format!(
            "{what} {value:?} contains control characters"
        )));
    }
    Ok(())
}

impl Tokens {
    /// A follower's refresh: the records as the store holds them now (a token created
    /// or revoked through the leader works, or stops working, here too).
    pub fn reload(&self) -> Result<(), StoreError> {
        let records: HashMap<String, TokenRecord> = self
            .store
            .load_tokens()?
            .into_iter()
            .map(|r| (r.id.clone(), r))
            .collect();
        *self.records.write().expect("tokens lock") = records;
        Ok(())
    }

    /// The tokens the store keeps.
    pub fn load(store: Arc<dyn Store>) -> Result<Tokens, StoreError> {
        let records: HashMap<String, TokenRecord> = store
            .load_tokens()?
            .into_iter()
            .map(|r| (r.id.clone(), r))
            .collect();
        let used = records
            .values()
            .map(|r| {
                let at = r.last_used_unix_ms;
                (
                    r.id.clone(),
                    Used {
                        seen: at,
                        stored: at,
                    },
                )
            })
            .collect();
        Ok(Tokens {
            store,
            records: RwLock::new(records),
            changes: tokio::sync::Mutex::new(()),
            used: Mutex::new(used),
        })
    }

    /// The caller a presented operator token stands for.
    pub fn authenticate(&self, token: &str) -> Result<Caller, AuthError> {
        let token = token.trim();
        let id = token_id(token).ok_or(AuthError::Unknown)?;
        let hash = digest(token);
        let caller = {
            let records = self.records.read().expect("tokens lock");
            let record = records.get(id).ok_or(AuthError::Unknown)?;
            if !same_digest(&hash, &record.hash) {
                return Err(AuthError::Unknown);
            }
            Self::usable(record, now_ms())?
        };
        self.touch(id);
        Ok(caller)
    }

    /// Whether the token a dashboard session logged in with is still good (not revoked,
    /// not expired): checked on every request of the session.
    pub fn recheck(&self, id: &str) -> Result<Caller, AuthError> {
        let caller = {
            let records = self.records.read().expect("tokens lock");
            let record = records.get(id).ok_or(AuthError::Unknown)?;
            Self::usable(record, now_ms())?
        };
        self.touch(id);
        Ok(caller)
    }

    fn usable(record: &TokenRecord, now: u64) -> Result<Caller, AuthError> {
        let (id, name) = (record.id.clone(), record.name.clone());
        if record.revoked_unix_ms != 0 {
            let at = rfc3339(record.revoked_unix_ms);
            return Err(AuthError::Revoked { id, name, at });
        }
        if record.expired(now) {
            let at = rfc3339(record.expires_unix_ms);
            return Err(AuthError::Expired { id, name, at });
        }
        let Some(role) = record.kind.role() else {
            return Err(AuthError::JoinToken { id, name });
        };
        Ok(Caller {
            name,
            role,
            token_id: Some(id),
            via: Via::Token,
        })
    }

    /// Notes a use; writes it to the store when it moved by a minute or more.
    fn touch(&self, id: &str) {
        let now = now_ms();
        let write = {
            let mut used = self.used.lock().expect("used lock");
            if !used.contains_key(id) {
                used.insert(id.to_string(), Used::default());
            }
            let u = used.get_mut(id).expect("inserted");
            u.seen = u.seen.max(now);
            let due = u.seen >= u.stored + LAST_USED_STEP_MS;
            if due {
                u.stored = u.seen;
            }
            due
        };
        if write && let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let ack = self.store.touch_token(id, now);
            let id = id.to_string();
            runtime.spawn(async move {
                // A follower's store refuses every write: the leader records uses
                // of tokens sent to it; those shown by a follower may lag.
                if let Err(e) = ack.await
                    && !matches!(e, StoreError::NotLeader(_))
                {
                    tracing::warn!("token {id}: its last use was not stored: {e}");
                }
            });
        }
    }

    /// Every token, oldest first, with its last use.
    pub fn list(&self) -> Vec<TokenRecord> {
        let used = self.used.lock().expect("used lock").clone();
        let mut all: Vec<TokenRecord> = self
            .records
            .read()
            .expect("tokens lock")
            .values()
            .cloned()
            .map(|mut r| {
                if let Some(u) = used.get(&r.id) {
                    r.last_used_unix_ms = r.last_used_unix_ms.max(u.seen);
                }
                r
            })
            .collect();
        all.sort_by(|a, b| (a.created_unix_ms, &a.id).cmp(&(b.created_unix_ms, &b.id)));
        all
    }

    /// Creates a token; returns it and its string, which exists nowhere else after this.
    pub async fn create(
        &self,
        new: NewToken,
        created_by: &Caller,
    ) -> Result<(TokenRecord, String), TokenError> {
        let join = new.kind == Kind::Join;
        let name = match new.name.trim() {
            "" if join => "join".to_string(),
            "" => {
                return Err(TokenError::Invalid(
                    "give the token a name: who or what it is for (it becomes the actor of what it does)".into(),
                ));
            }
            n => n.to_string(),
        };
        check_text("the name", &name)?;
        let prefix = new.node_id_prefix.trim().to_string();
        check_text("the node id prefix", &prefix)?;
        if !join && (!prefix.is_empty() || new.max_uses > 0) {
            return Err(TokenError::Invalid(
                "a node id prefix and a number of uses are for join tokens (--join)".into(),
            ));
        }
        let now = now_ms();
        let expires = match new.ttl {
            Some(ttl) if ttl.is_zero() => {
                return Err(TokenError::Invalid(
                    "the ttl must be more than zero, e.g. 1h or 30d".into(),
                ));
            }
            Some(ttl) => now.saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)),
            None if join => now + JOIN_TTL.as_millis() as u64,
            None => 0,
        };
        let _one_at_a_time = self.changes.lock().await;
        let id = loop {
            let id = format!("{}{}", if join { 'j' } else { 't' }, random_hex(4));
            if !self.records.read().expect("tokens lock").contains_key(&id) {
                break id;
            }
        };
        let token = format!("{PREFIX}{id}_{}", random_hex(32));
        let record = TokenRecord {
            id: id.clone(),
            name,
            kind: new.kind,
            hash: digest(&token),
            created_unix_ms: now,
            created_by: created_by.name.clone(),
            expires_unix_ms: expires,
            revoked_unix_ms: 0,
            node_id_prefix: prefix,
            max_uses: new.max_uses,
            uses: 0,
            last_used_unix_ms: 0,
        };
        self.store.put_token(&record).await?;
        self.records
            .write()
            .expect("tokens lock")
            .insert(id, record.clone());
        crate::audit::token_created(
            &record.id,
            &record.name,
            record.kind.as_str(),
            created_by,
            &if expires > 0 {
                rfc3339(expires)
            } else {
                String::new()
            },
        );
        Ok((record, token))
    }

    /// Revokes a token: refused from the next call on (revoking it again changes
    /// nothing).
    pub async fn revoke(&self, id: &str, by: &Caller) -> Result<TokenRecord, TokenError> {
        let id = id.trim();
        let _one_at_a_time = self.changes.lock().await;
        let mut record = self
            .records
            .read()
            .expect("tokens lock")
            .get(id)
            .cloned()
            .ok_or_else(|| {
                if id == BOOTSTRAP {
                    TokenError::Bootstrap
                } else {
                    TokenError::NotFound(id.to_string())
                }
            })?;
        if record.revoked_unix_ms != 0 {
            return Ok(record);
        }
        record.revoked_unix_ms = now_ms();
        self.store.put_token(&record).await?;
        self.records
            .write()
            .expect("tokens lock")
            .insert(record.id.clone(), record.clone());
        crate::audit::token_revoked(&record.id, &record.name, by);
        Ok(record)
    }

    /// Lets node `node_id` join with a join token: checks that the token exists, is a
    /// join token, is neither revoked nor expired, that the node id starts with the
    /// token's prefix and that a use is left, and takes that use (durably, one redeem
    /// at a time, so the last use goes to one node only). Call it once the rest of
    /// the join request has been checked, just before granting it.
    pub async fn redeem_join(&self, secret: &str, node_id: &str) -> Result<JoinGrant, JoinError> {
        let secret = secret.trim();
        let id = token_id(secret).ok_or(JoinError::Unknown)?;
        let hash = digest(secret);
        let _one_at_a_time = self.changes.lock().await;
        let mut record = {
            let records = self.records.read().expect("tokens lock");
            let record = records.get(id).ok_or(JoinError::Unknown)?;
            if !same_digest(&hash, &record.hash) {
                return Err(JoinError::Unknown);
            }
            record.clone()
        };
        let id = record.id.clone();
        if record.kind != Kind::Join {
            return Err(JoinError::NotJoin {
                id,
                name: record.name,
            });
        }
        if record.revoked_unix_ms != 0 {
            let at = rfc3339(record.revoked_unix_ms);
            return Err(JoinError::Revoked { id, at });
        }
        if record.expired(now_ms()) {
            let at = rfc3339(record.expires_unix_ms);
            return Err(JoinError::Expired { id, at });
        }
        if !node_id.starts_with(&record.node_id_prefix) {
            return Err(JoinError::Prefix {
                node_id: node_id.to_string(),
                prefix: record.node_id_prefix,
            });
        }
        if record.uses_left() == Some(0) {
            let max = record.max_uses;
            return Err(JoinError::UsedUp { id, max });
        }
        record.uses += 1;
        self.store.put_token(&record).await?;
        self.records
            .write()
            .expect("tokens lock")
            .insert(id.clone(), record.clone());
        self.touch(&id);
        tracing::info!(
            "join token {id} ({:?}) let node {node_id} join ({} use(s) left)",
            record.name,
            record
                .uses_left()
                .map_or("unlimited".to_string(), |n| n.to_string())
        );
        Ok(JoinGrant {
            token_id: id,
            token_name: record.name.clone(),
            node_id: node_id.to_string(),
            uses_left: record.uses_left(),
        })
    }
}

#[cfg(test)]
mod tests;
