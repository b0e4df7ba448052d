//! Several controllers (`--controller A,B,C`): which one a call goes to, and when it
//! may go to another.
//!
//! A call goes to the controller that answered the command's last call (at first, the
//! first URL). It moves on, silently, only when it certainly did nothing there:
//! - the connection could not be made (refused, timed out, TLS handshake failed), or
//!   the call was turned away before it was processed (a channel that was not ready,
//!   HTTP/2 `REFUSED_STREAM`);
//! - a follower refused a change: `UNAVAILABLE` with [`LEADER_METADATA`]. The change
//!   goes once to the leader it names, even one not in the list, but only over the
//!   same scheme, and with the same token and CA (over `https://` the leader proves
//!   itself with the fleet CA's controller certificate before the token is sent); then
//!   on down the list.
//!
//! A read (list, get, watch, a dry run) also moves on when the connection broke
//! mid-call: asking again changes nothing. A change whose connection broke after it
//! was sent may have been carried out, so it is sent nowhere else: the error says so
//! and which command shows what happened. A controller whose store has no quorum
//! ([`NO_QUORUM_METADATA`]) ends the command: no controller can change anything then.
//! When every controller fails, the error lists each URL and why.

use std::collections::VecDeque;
use std::future::Future;

use fleet_proto::ha::{LEADER_METADATA, NO_QUORUM_METADATA};
use tonic::{Code, Status};

use super::dial::Api;
use super::{Controller, chain, status_failure};
use crate::exit::{Exit, Failure};

/// What a call does, which decides whether it may be sent again elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Changes nothing: safe to ask again anywhere.
    Read,
    /// Changes the fleet; `check` is the command that shows whether it happened.
    Change { check: String },
}

impl Kind {
    pub fn change(check: impl Into<String>) -> Kind {
        Kind::Change {
            check: check.into(),
        }
    }
}

/// How far a failed call got, judged from its status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Turned away before any controller processed it: safe to send elsewhere.
    NotSent,
    /// The connection failed once the call may have been sent.
    MaybeSent,
    /// A controller answered with this status.
    Answered,
}

/// Tells a status a controller sent from one tonic made up on this side. A status the
/// controller sends is parsed from headers and has no source; tonic attaches the
/// transport error as the source of the statuses it makes up.
pub fn delivery(status: &Status) -> Delivery {
    use std::error::Error;
    // The generated client calls `ready()` before it sends anything.
    if status.code() == Code::Unknown && status.message().starts_with("Service was not ready") {
        return Delivery::NotSent;
    }
    let mut source = status.source();
    if source.is_none() {
        // A response cut short (tonic's "Unexpected EOF decoding stream").
        return if status.code() == Code::Internal && status.message().starts_with("Unexpected EOF")
        {
            Delivery::MaybeSent
        } else {
            Delivery::Answered
        };
    }
    while let Some(e) = source {
        if e.downcast_ref::<tonic::ConnectError>().is_some() {
            return Delivery::NotSent;
        }
        // HTTP/2 promises that a refused stream was not processed (RFC 9113, 8.7).
        if e.downcast_ref::<h2::Error>()
            .is_some_and(|h2| h2.reason() == Some(h2::Reason::REFUSED_STREAM))
        {
            return Delivery::NotSent;
        }
        source = e.source();
    }
    Delivery::MaybeSent
}

/// What an `UNAVAILABLE` from a controller says about high availability.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Unavailable {
    /// A follower; the leader's URL when one is elected.
    Follower { leader: Option<String> },
    /// The controller's store has no quorum: nothing can change now.
    NoQuorum,
}

fn unavailable(status: &Status) -> Option<Unavailable> {
    if status.code() != Code::Unavailable {
        return None;
    }
    let metadata = status.metadata();
    if metadata.contains_key(NO_QUORUM_METADATA) {
        return Some(Unavailable::NoQuorum);
    }
    let leader = metadata.get(LEADER_METADATA)?;
    let leader = leader.to_str().unwrap_or_default().trim();
    Some(Unavailable::Follower {
        leader: (!leader.is_empty()).then(|| leader.to_string()),
    })
}

/// The leader URL a follower at `from` named, if fleetctl may follow it: a URL the
/// argument parser accepts, over the scheme of `from`.
fn leader_url(from: &str, leader: &str) -> Result<String, String> {
    let url = crate::args::parse::parse_controller_url(leader)
        .map_err(|_| format!("the leader it names, {leader:?}, is not a controller URL"))?;
    let scheme = |u: &str| u.split_once("://").map(|(s, _)| s.to_string());
    if scheme(&url) != scheme(from) {
        return Err(format!(
            "the leader it names, {url}, is not followed: another scheme than {from}"
        ));
    }
    Ok(url)
}

/// Why a call did not end with an answer.
#[derive(Debug)]
pub enum CallError {
    /// A controller answered with a status (not a follower's or a store's refusal).
    Answered { url: String, status: Status },
    /// No controller could be reached or would take the call: each URL and why.
    Unreachable(anyhow::Error),
    /// A change whose outcome is unknown, or a store without quorum.
    Failed(anyhow::Error),
}

impl From<CallError> for anyhow::Error {
    fn from(e: CallError) -> anyhow::Error {
        match e {
            CallError::Answered { url, status } => status_failure(&url, &status).into(),
            CallError::Unreachable(e) | CallError::Failed(e) => e,
        }
    }
}

impl Controller {
    /// Sends one call (`send` makes it on a connected client) to the current
    /// controller, and on to the others when that is safe (see the module docs).
    pub(super) async fn call<T, F, Fut>(
        &mut self,
        kind: &Kind,
        mut send: F,
    ) -> Result<tonic::Response<T>, CallError>
    where
        F: FnMut(Api) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let mut tried: Vec<(String, String)> = Vec::new();
        let mut followed_a_leader = false;
        let mut queue = self.order();
        while let Some(url) = queue.pop_front() {
            if tried.iter().any(|(u, _)| *u == url) {
                continue;
            }
            let api = match self.connect(&url).await {
                Ok(api) => api,
                Err(why) => {
                    tried.push((url, why));
                    continue;
                }
            };
            let status = match send(api).await {
                Ok(response) => {
                    self.answered(&url);
                    self.warn_if_stale(response.metadata());
                    return Ok(response);
                }
                Err(status) => status,
            };
            match (delivery(&status), kind) {
                (Delivery::NotSent, _) | (Delivery::MaybeSent, Kind::Read) => {
                    self.lost();
                    tried.push((url, chain(&status)));
                }
                (Delivery::MaybeSent, Kind::Change { check }) => {
                    self.lost();
                    return Err(CallError::Failed(outcome_unknown(&url, &status, check)));
                }
                (Delivery::Answered, _) => match unavailable(&status) {
                    Some(Unavailable::NoQuorum) => {
                        self.answered(&url);
                        return Err(CallError::Failed(no_quorum(&url, &status)));
                    }
                    Some(Unavailable::Follower { leader }) => {
                        // Sticking with a follower would only send the next change to it.
                        self.lost();
                        let mut why = status.message().trim().to_string();
                        match leader {
                            Some(leader) if !followed_a_leader => match leader_url(&url, &leader) {
                                Ok(leader) => {
                                    followed_a_leader = true;
                                    queue.push_front(leader);
                                }
                                Err(not) => why = format!("{why} ({not})"),
                            },
                            Some(_) => {}
                            None if why.is_empty() => why = "a follower; no leader is known".into(),
                            None => {}
                        }
                        tried.push((url, why));
                    }
                    None => {
                        self.answered(&url);
                        return Err(CallError::Answered { url, status });
                    }
                },
            }
        }
        Err(CallError::Unreachable(nobody_took_it(&tried)))
    }

    /// The URLs in the order a call tries them: the current controller, then the list
    /// from where the last call left it, round to the start.
    fn order(&self) -> VecDeque<String> {
        let n = self.urls.len();
        let mut queue: VecDeque<String> = (0..n)
            .map(|k| self.urls[(self.next + k) % n].clone())
            .collect();
        if let Some((url, _)) = &self.current {
            queue.retain(|u| u != url);
            queue.push_front(url.clone());
        }
        queue
    }

    /// The client for `url`: the current one's, or a new connection, which becomes
    /// the current one.
    async fn connect(&mut self, url: &str) -> Result<Api, String> {
        if let Some((current, api)) = &self.current
            && current == url
        {
            return Ok(api.clone());
        }
        let api = self.dial.connect(url).await?;
        self.current = Some((url.to_string(), api.clone()));
        Ok(api)
    }

    /// `url` answered: later calls go there too.
    fn answered(&mut self, url: &str) {
        if let Some(i) = self.urls.iter().position(|u| u == url) {
            self.next = i;
        }
    }

    /// The current controller failed (or is a follower): the next call starts at the
    /// next URL. The watcher calls it when a stream breaks.
    pub fn lost(&mut self) {
        if let Some((url, _)) = self.current.take()
            && let Some(i) = self.urls.iter().position(|u| *u == url)
        {
            self.next = (i + 1) % self.urls.len();
        }
    }

    /// A read answered by a controller that cannot reach its store's quorum may be out
    /// of date: say so, once.
    fn warn_if_stale(&mut self, metadata: &tonic::metadata::MetadataMap) {
        if metadata.contains_key(NO_QUORUM_METADATA) && !self.warned_stale {
            self.warned_stale = true;
            eprintln!(
                "warning: the controller at {} cannot reach its store's quorum: this answer may be out of date",
                self.url()
            );
        }
    }
}

/// Every URL tried and why it failed. With one URL, the message fleetctl always gave.
fn nobody_took_it(tried: &[(String, String)]) -> anyhow::Error {
    let message = match tried {
        [(url, why)] => format!(
            "cannot reach the controller at {url}: {why} (set --controller or FLEET_CONTROLLER)"
        ),
        _ => {
            let mut text = format!("no controller took the call ({} tried):", tried.len());
            for (url, why) in tried {
                text.push_str(&format!("\n  {url}: {why}"));
            }
            text.push_str(
                "\nset --controller or FLEET_CONTROLLER to the controllers' URLs, separated by commas",
            );
            text
        }
    };
    Failure::new(Exit::Failed, message).into()
}

fn outcome_unknown(url: &str, status: &Status, check: &str) -> anyhow::Error {
    Failure::new(
        Exit::Failed,
        format!(
            "the connection to the controller at {url} failed after the call was sent ({}): it \
             may or may not have been carried out, so it was not sent to another controller; \
             see what happened with `{check}` before trying again",
            chain(status)
        ),
    )
    .into()
}

fn no_quorum(url: &str, status: &Status) -> anyhow::Error {
    let message = status.message().trim();
    let detail = if message.is_empty() {
        String::new()
    } else {
        format!(" ({message})")
    };
    Failure::new(
        Exit::Failed,
        format!(
            "the controller at {url} cannot change anything: its store has no quorum{detail}; \
             nothing was changed. Try again once a majority of the store's members is back"
        ),
    )
    .into()
}

#[cfg(test)]
mod tests;
