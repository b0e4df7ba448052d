//! Tokens: the one-time secret of a new token with how to use it, the token list,
//! and a revocation.

use std::time::{SystemTime, UNIX_EPOCH};

use fleet_proto::v1::{CreateTokenResponse, Token};

use super::{Table, ago, or_dash, time};

/// "active", "revoked" or "expired".
pub fn status(t: &Token, now: SystemTime) -> &'static str {
    let now_ms = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    if t.revoked_unix_ms != 0 {
        "revoked"
    } else if t.expires_unix_ms != 0 && now_ms >= t.expires_unix_ms {
        "expired"
    } else {
        "active"
    }
}

fn expires(t: &Token) -> String {
    match t.expires_unix_ms {
        0 => "never".to_string(),
        ms => time(ms),
    }
}

/// "2/3", or "1/any" for a join token without a limit.
fn uses(t: &Token) -> String {
    match t.max_uses {
        0 => format!("{}/any", t.uses),
        max => format!("{}/{max}", t.uses),
    }
}

/// `fleetctl token create`: what was made, the secret on a line of its own, and how to
/// use it.
pub fn created(r: &CreateTokenResponse) -> String {
    let t = r.token.clone().unwrap_or_default();
    let secret = &r.secret;
    let mut text = if t.kind == "join" {
        let prefix = if t.node_id_prefix.is_empty() {
            "any node id".to_string()
        } else {
            format!("node ids starting with {:?}", t.node_id_prefix)
        };
        let limit = match t.max_uses {
            0 => "any number of joins".to_string(),
            1 => "1 join".to_string(),
            n => format!("{n} joins"),
        };
        format!(
            "created join token {} ({:?}): {prefix}, {limit}, expires {}\n",
            t.id,
            t.name,
            expires(&t)
        )
    } else {
        format!(
            "created token {} for {:?} with role {}, expires {}\n",
            t.id,
            t.name,
            t.kind,
            expires(&t)
        )
    };
    text.push_str(&format!("\n  {secret}\n\n"));
    text.push_str(
        "This is the only time it is shown: the controller keeps its SHA-256, not the token.\n",
    );
    if t.kind == "join" {
        text.push_str(
            "Give it to the agent that joins the fleet; it is refused as an operator credential.\n",
        );
    } else {
        text.push_str(&format!(
            "Use it with: FLEET_TOKEN={secret} fleetctl nodes\n\
             (or log in to the dashboard with it). What it does is recorded as {:?}.\n",
            t.name
        ));
    }
    text.push_str(&format!("Revoke it with: fleetctl token revoke {}", t.id));
    text
}

/// `fleetctl token list`.
pub fn tokens_table(tokens: &[Token], now: SystemTime) -> String {
    let with_join = tokens.iter().any(|t| t.kind == "join");
    let mut header = vec![
        "ID",
        "NAME",
        "ROLE",
        "STATUS",
        "CREATED",
        "BY",
        "EXPIRES",
        "LAST USED",
    ];
    if with_join {
        header.extend(["PREFIX", "USES"]);
    }
    let mut table = Table::new(&header);
    for t in tokens {
        let mut row = vec![
            t.id.clone(),
            t.name.clone(),
            t.kind.clone(),
            status(t, now).to_string(),
            time(t.created_unix_ms),
            or_dash(&t.created_by),
            expires(t),
            ago(t.last_used_unix_ms, now),
        ];
        if with_join && t.kind == "join" {
            row.extend([or_dash(&t.node_id_prefix), uses(t)]);
        }
        table.row(row);
    }
    table.render()
}

/// `fleetctl token revoke ID`.
pub fn revoked(t: &Token) -> String {
    format!(
        "token {} ({:?}, {}) is revoked: it is refused from its next call on",
        t.id, t.name, t.kind
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn token(id: &str, kind: &str) -> Token {
        Token {
            id: id.into(),
            name: "ci".into(),
            kind: kind.into(),
            created_unix_ms: 1_700_000_000_000,
            created_by: "bootstrap".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_new_token_is_shown_once_with_how_to_use_it() {
        let r = CreateTokenResponse {
            token: Some(token("t1a2b3c4d", "operator")),
            secret: "fleet_t1a2b3c4d_00ff".into(),
        };
        let text = created(&r);
        assert!(
            text.starts_with(
                "created token t1a2b3c4d for \"ci\" with role operator, expires never\n"
            ),
            "{text}"
        );
        assert!(text.contains("\n  fleet_t1a2b3c4d_00ff\n"), "{text}");
        assert!(
            text.contains("FLEET_TOKEN=fleet_t1a2b3c4d_00ff fleetctl nodes"),
            "{text}"
        );
        let mut join = token("j1a2b3c4d", "join");
        join.node_id_prefix = "web-".into();
        join.max_uses = 3;
        let text = created(&CreateTokenResponse {
            token: Some(join),
            secret: "s".into(),
        });
        assert!(
            text.contains("node ids starting with \"web-\", 3 joins"),
            "{text}"
        );
        assert!(text.contains("refused as an operator credential"), "{text}");
    }

    #[test]
    fn the_list_shows_status_and_join_columns_only_when_needed() {
        let now = UNIX_EPOCH + Duration::from_millis(1_700_000_100_000);
        let mut revoked = token("t2", "viewer");
        revoked.revoked_unix_ms = 1_700_000_050_000;
        let mut expired = token("t3", "admin");
        expired.expires_unix_ms = 1_700_000_090_000;
        let text = tokens_table(&[token("t1", "operator"), revoked.clone(), expired], now);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("ID  NAME  ROLE      STATUS"), "{text}");
        assert!(
            lines[1].contains("active") && lines[1].contains("never"),
            "{text}"
        );
        assert!(lines[2].contains("revoked"), "{text}");
        assert!(lines[3].contains("expired"), "{text}");
        assert!(!text.contains("PREFIX"), "{text}");
        let mut join = token("j1", "join");
        join.uses = 1;
        let text = tokens_table(&[revoked, join], now);
        assert!(
            text.lines().next().unwrap().ends_with("PREFIX  USES"),
            "{text}"
        );
        assert!(text.contains("1/any"), "{text}");
    }
}
