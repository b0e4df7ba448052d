//! Serving an axum `Router` to clients that may not behave, slowing down token
//! guessing, and the pieces of browser sessions: what Fleet's control endpoints (the
//! agent's control port, the controller's API and dashboard) share.
//!
//! Why: `axum::serve` never closes a connection on its own. A thousand half-open
//! connections to an agent's control port used up its descriptors (`ulimit -n 1024`),
//! after which an authorized restart hung and `SIGUSR1` failed with `EMFILE`: the
//! supervisor needs descriptors of its own to start a worker. [`serve`] keeps the
//! number of connections below the descriptor limit, closes the ones that stay idle,
//! and at the cap closes the oldest idle connection to let a new one in (as nginx
//! reuses idle keep-alive connections), so a real request gets through at once however
//! many idle connections are open.
//!
//! Modules, in the order a connection goes through them:

/// How many connections, and for how long: [`Limits`] and the descriptor-derived cap.
pub mod limits;
/// Every open connection and its state: who is idle, who is evicted.
mod conns;
/// The accept loop and each connection's watchdog.
mod serve;
/// A global back-off on failed logins.
pub mod throttle;
/// Secrets, tokens, cookies and CSRF tokens of browser sessions.
pub mod browser;
/// Mutual TLS: certificate names, server and client configs, a tonic connector.
pub mod tls;

pub use conns::{Connections, Stats};
pub use limits::{Cap, Limits};
pub use serve::{Guarded, Server, TlsConfig, serve};
pub use throttle::{Attempt, Backoff, LoginThrottle, RetryAfter};
