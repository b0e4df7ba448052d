//! Every signal a stray `kill` can send the supervisor is accounted for, because
//! the supervisor dying takes the node's listening sockets and every worker with it:
//!
//! | signal | what the supervisor does |
//! |---|---|
//! | `SIGUSR1` | restarts the node (a new generation of the current executable) |
//! | `SIGTERM`, `SIGINT`, `SIGQUIT`, `SIGHUP` | shuts the node down gracefully |
//! | `SIGCHLD` | reaps children (see `reaper`) |
//! | `SIGUSR2`, `SIGALRM`, `SIGVTALRM`, `SIGPROF`, `SIGPIPE`, `SIGWINCH`, `SIGIO`, `SIGPWR`, `SIGSTKFLT`, `SIGXCPU`, `SIGXFSZ`, `SIGRTMIN`…`SIGRTMAX` | ignored, with a log line |
//!
//! Left at their defaults: `SIGKILL` and `SIGSTOP` (they cannot be caught), the
//! job-control stops `SIGTSTP`/`SIGTTIN`/`SIGTTOU` (a `SIGCONT` resumes), and the
//! fault signals `SIGSEGV`, `SIGBUS`, `SIGILL`, `SIGFPE`, `SIGABRT`, `SIGTRAP`, `SIGSYS`,
//! which mean the supervisor itself is broken.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

/// What a signal asks of the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Action {
    Restart,
    /// Shut down; the signal's name is the reason.
    Shutdown(&'static str),
    Ignored,
}

/// Signals that would end the supervisor by default (or are noise) and mean nothing to it.
const IGNORED: &[Signal] = &[
    Signal::SIGUSR2,
    Signal::SIGALRM,
    Signal::SIGVTALRM,
    Signal::SIGPROF,
    Signal::SIGPIPE,
    Signal::SIGWINCH,
    Signal::SIGIO,
    Signal::SIGPWR,
    Signal::SIGSTKFLT,
    Signal::SIGXCPU,
    Signal::SIGXFSZ,
];

/// A repeated ignored signal is logged again at `info` after this long (the ones in
/// between at `debug`), so a flood of them can't flood the log.
const LOG_AGAIN_AFTER: Duration = Duration::from_secs(10);

fn action(signo: i32) -> Action {
    match Signal::try_from(signo) {
        Ok(Signal::SIGUSR1) => Action::Restart,
        Ok(Signal::SIGTERM) => Action::Shutdown("SIGTERM"),
        Ok(Signal::SIGINT) => Action::Shutdown("SIGINT"),
        Ok(Signal::SIGQUIT) => Action::Shutdown("SIGQUIT"),
        Ok(Signal::SIGHUP) => Action::Shutdown("SIGHUP"),
        _ => Action::Ignored,
    }
}

/// `SIGUSR2`, `SIGRTMIN+3`: a signal number as a person reads it.
pub(crate) fn name(signo: i32) -> String {
    match Signal::try_from(signo) {
        Ok(sig) => sig.as_str().to_string(),
        Err(_) => format!("SIGRTMIN+{}", signo - libc::SIGRTMIN()),
    }
}

/// The signals the supervisor handles, as one stream.
#[derive(Debug)]
pub(super) struct Signals {
    rx: mpsc::UnboundedReceiver<i32>,
    last_logged: HashMap<i32, Instant>,
}

impl Signals {
    /// Installs a handler for every signal in the table above.
    pub(super) fn install() -> std::io::Result<Self> {
        let handled = [
            Signal::SIGUSR1,
            Signal::SIGTERM,
            Signal::SIGINT,
            Signal::SIGQUIT,
            Signal::SIGHUP,
        ];
        let realtime = libc::SIGRTMIN()..=libc::SIGRTMAX();
        let all = handled
            .iter()
            .chain(IGNORED)
            .map(|s| *s as i32)
            .chain(realtime);
        let (tx, rx) = mpsc::unbounded_channel();
        for signo in all {
            let mut stream = signal(SignalKind::from_raw(signo))?;
            let tx = tx.clone();
            tokio::spawn(async move {
                while stream.recv().await.is_some() {
                    if tx.send(signo).is_err() {
                        return;
                    }
                }
            });
        }
        Ok(Self {
            rx,
            last_logged: HashMap::new(),
        })
    }

    /// The next signal's action (logged here for ignored ones).
    pub(super) async fn next(&mut self) -> Action {
        let Some(signo) = self.rx.recv().await else {
            return std::future::pending().await;
        };
        let action = action(signo);
        if action == Action::Ignored {
            let now = Instant::now();
            let again = self
                .last_logged
                .get(&signo)
                .is_none_or(|t| now.duration_since(*t) >= LOG_AGAIN_AFTER);
            let name = name(signo);
            if again {
                self.last_logged.insert(signo, now);
                tracing::info!(
                    "received {name}: ignored (SIGUSR1 restarts the node; SIGTERM, SIGINT, SIGQUIT or SIGHUP shut it down)"
                );
            } else {
                tracing::debug!("received {name}: ignored");
            }
        }
        action
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_signal_has_one_meaning() {
        assert_eq!(action(libc::SIGUSR1), Action::Restart);
        assert_eq!(action(libc::SIGHUP), Action::Shutdown("SIGHUP"));
        assert_eq!(action(libc::SIGUSR2), Action::Ignored);
        assert_eq!(action(libc::SIGRTMIN() + 3), Action::Ignored);
        assert_eq!(name(libc::SIGRTMIN() + 3), "SIGRTMIN+3");
        assert_eq!(name(libc::SIGPROF), "SIGPROF");
    }
}
