//! The controllers an agent talks to (`--controller A,B,C`, several controllers on one
//! store, one of them the leader): which one now, where a failure sends it next, and
//! how long to wait once every one has failed.
//!
//! Heartbeats and the node's certificate requests go to one controller at a time, the
//! first at start. When it cannot be reached, answers `UNAVAILABLE`, or is a follower
//! (`UNAVAILABLE` with [`LEADER_METADATA`]), the next call goes at once to the leader
//! the follower named, if that is one of the configured controllers, else to the next
//! URL in the list. A hint naming any other address is ignored, with a warning: an
//! agent is never sent somewhere its operator did not configure (a follower could be
//! misconfigured, or not a controller of this fleet at all). Once every controller has
//! failed in a row, the caller waits (see [`backoff`]) before the next round, so a
//! fleet of agents whose controllers are down does not hammer them.

use std::time::Duration;

use fleet_proto::ha::{LEADER_METADATA, NO_QUORUM_METADATA};
use tonic::{Code, Status};

use crate::config::same_controller;

/// The configured controllers and the one calls go to now.
#[derive(Debug)]
pub struct Controllers {
    urls: Vec<String>,
    at: usize,
    /// Failures since the last success or the end of the last round.
    failures: usize,
    /// Rounds in a row in which every controller failed.
    rounds: u32,
    /// Whether the current controller was named by a follower as the leader.
    leader: bool,
    /// Hints already warned about, so each is logged once.
    ignored: Vec<String>,
}

/// What to do after the current controller failed a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Call [`Controllers::current`], another controller, at once.
    Now,
    /// Every controller failed, `rounds` rounds in a row: wait, then call
    /// [`Controllers::current`] (the list goes round).
    RoundOver { rounds: u32 },
    /// Refused for a reason another controller would give too (a token, a limit):
    /// retry the same one at the usual pace.
    Stay,
}

impl Controllers {
    /// `urls` as configured (checked by `Config::validate`), at least one.
    pub fn new(urls: Vec<String>) -> Controllers {
        assert!(!urls.is_empty(), "at least one controller");
        Controllers {
            urls,
            at: 0,
            failures: 0,
            rounds: 0,
            leader: false,
            ignored: Vec::new(),
        }
    }

    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// The controller calls go to now.
    pub fn current(&self) -> &str {
        &self.urls[self.at]
    }

    /// Its position in [`Controllers::urls`].
    pub fn index(&self) -> usize {
        self.at
    }

    /// Whether a follower named the current controller as the leader.
    pub fn is_leader(&self) -> bool {
        self.leader
    }

    /// The current controller took the call.
    pub fn succeeded(&mut self) {
        self.failures = 0;
        self.rounds = 0;
    }

    /// The current controller failed a call with `status`: where the next one goes.
    pub fn failed(&mut self, status: &Status) -> Next {
        if !moves_on(status) {
            return Next::Stay;
        }
        self.failures += 1;
        let named = leader_hint(status).and_then(|hint| {
            let found = self.urls.iter().position(|u| same_controller(u, &hint));
            if found.is_none() && !self.ignored.contains(&hint) {
                tracing::warn!(
                    "the controller {} names {hint} as the leader, which is not one of this \
                     node's controllers ({}): not following it; set --controller to every \
                     controller's URL",
                    self.current(),
                    self.urls.join(", ")
                );
                self.ignored.push(hint);
            }
            found
        });
        match named {
            Some(i) if i != self.at => {
                self.at = i;
                self.leader = true;
            }
            _ => {
                self.at = (self.at + 1) % self.urls.len();
                self.leader = false;
            }
        }
        // A round is as many failures as there are controllers (a follower naming the
        // leader counts too, so two followers naming each other cannot loop).
        if self.failures >= self.urls.len() {
            self.failures = 0;
            self.rounds += 1;
            return Next::RoundOver {
                rounds: self.rounds,
            };
        }
        Next::Now
    }
}

/// Whether a failure says "try another controller": no connection, a timeout, or
/// `UNAVAILABLE` (a follower, a store without quorum, a controller shutting down).
fn moves_on(status: &Status) -> bool {
    use std::error::Error as _;
    status.source().is_some()
        || matches!(
            status.code(),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled
        )
        || (status.code() == Code::Unknown && status.message().starts_with("Service was not ready"))
}

/// The leader a follower named (not when the store has no quorum).
pub fn leader_hint(status: &Status) -> Option<String> {
    if status.code() != Code::Unavailable || status.metadata().contains_key(NO_QUORUM_METADATA) {
        return None;
    }
    let hint = status
        .metadata()
        .get(LEADER_METADATA)?
        .to_str()
        .ok()?
        .trim();
    (!hint.is_empty()).then(|| hint.to_string())
}

/// How long to wait after `rounds` failed rounds in a row: `base` doubled each round
/// up to `cap` (never below `base`), then a random part of it cut off (a wait between
/// half and all of it), so agents that lost their controllers together do not come
/// back together.
pub fn backoff(base: Duration, rounds: u32, cap: Duration) -> Duration {
    let full = base
        .saturating_mul(1 << rounds.saturating_sub(1).min(16))
        .min(cap.max(base));
    let mut byte = [0u8; 1];
    let fraction = match getrandom::fill(&mut byte) {
        Ok(()) => f64::from(byte[0]) / 255.0,
        Err(_) => 0.5,
    };
    full.mul_f64(0.5 + fraction / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urls() -> Vec<String> {
        [
            "http://127.0.0.1:7100",
            "http://127.0.0.1:7200",
            "http://127.0.0.1:7300",
        ]
        .map(String::from)
        .to_vec()
    }

    fn follower(leader: &str) -> Status {
        let mut status = Status::unavailable("a follower");
        status
            .metadata_mut()
            .insert(LEADER_METADATA, leader.parse().unwrap());
        status
    }

    #[test]
    fn a_failure_moves_to_the_next_controller_and_a_round_ends_with_the_list() {
        let mut c = Controllers::new(urls());
        let refused = Status::unavailable("connection refused");
        assert_eq!(c.failed(&refused), Next::Now);
        assert_eq!(c.current(), "http://127.0.0.1:7200");
        assert_eq!(c.failed(&refused), Next::Now);
        assert_eq!(c.failed(&refused), Next::RoundOver { rounds: 1 });
        assert_eq!(c.current(), "http://127.0.0.1:7100");
        c.failed(&refused);
        c.failed(&refused);
        assert_eq!(c.failed(&refused), Next::RoundOver { rounds: 2 });
        c.succeeded();
        c.failed(&refused);
        c.failed(&refused);
        assert_eq!(c.failed(&refused), Next::RoundOver { rounds: 1 });
    }

    #[test]
    fn a_follower_sends_the_node_to_the_leader_only_if_it_is_configured() {
        let mut c = Controllers::new(urls());
        // Written another way, it is still the third controller.
        assert_eq!(c.failed(&follower("HTTP://127.0.0.1:7300/")), Next::Now);
        assert_eq!(c.current(), "http://127.0.0.1:7300");
        assert!(c.is_leader());
        // A hint elsewhere is not followed: the next URL instead.
        assert_eq!(c.failed(&follower("http://10.9.9.9:7100")), Next::Now);
        assert_eq!(c.current(), "http://127.0.0.1:7100");
        assert!(!c.is_leader());
        assert_eq!(c.ignored, ["http://10.9.9.9:7100"]);
    }

    #[test]
    fn followers_naming_each_other_still_end_the_round() {
        let mut c = Controllers::new(urls()[..2].to_vec());
        assert_eq!(c.failed(&follower("http://127.0.0.1:7200")), Next::Now);
        assert_eq!(
            c.failed(&follower("http://127.0.0.1:7100")),
            Next::RoundOver { rounds: 1 }
        );
    }

    #[test]
    fn a_refusal_any_controller_would_give_stays() {
        let mut c = Controllers::new(urls());
        assert_eq!(c.failed(&Status::unauthenticated("bad token")), Next::Stay);
        assert_eq!(
            c.failed(&Status::resource_exhausted("--max-nodes")),
            Next::Stay
        );
        assert_eq!(c.index(), 0);
        // No quorum on this one: the next may still reach the store.
        let mut lost = Status::unavailable("no quorum");
        lost.metadata_mut()
            .insert(NO_QUORUM_METADATA, "1".parse().unwrap());
        assert_eq!(c.failed(&lost), Next::Now);
        assert_eq!(c.index(), 1);
    }

    #[test]
    fn the_backoff_doubles_up_to_its_cap_with_jitter() {
        let base = Duration::from_secs(1);
        let cap = Duration::from_secs(5);
        for (rounds, full) in [(1, 1), (2, 2), (3, 4), (4, 5), (30, 5)] {
            let wait = backoff(base, rounds, cap);
            let full = Duration::from_secs(full);
            assert!(wait >= full / 2 && wait <= full, "{rounds}: {wait:?}");
        }
        // A base above the cap is kept: the controller asked for it.
        assert!(backoff(Duration::from_secs(8), 3, cap) >= Duration::from_secs(4));
    }
}
