//! Nothing a stray `kill` sends takes the node down: every signal that would end
//! the supervisor by default is handled or ignored with a log line, and the node keeps
//! serving on the same worker (nginx users send `SIGUSR2` by habit).

use std::time::Duration;

use fleet_tests::harness::{is_running, send_signal};
use fleet_tests::{Agent, AgentOpts};
use nix::sys::signal::Signal;

const STRAY: [Signal; 6] = [
    Signal::SIGUSR2,
    Signal::SIGALRM,
    Signal::SIGVTALRM,
    Signal::SIGPROF,
    Signal::SIGPIPE,
    Signal::SIGWINCH,
];

#[tokio::test]
async fn stray_signals_to_the_supervisor_are_logged_and_change_nothing() {
    let agent = Agent::start(AgentOpts::default()).await;
    let worker = agent.worker_pid().await;
    for sig in STRAY {
        let mark = agent.log_len();
        send_signal(agent.pid(), sig);
        agent
            .wait_for_log_from(
                mark,
                &format!("received {}: ignored", sig.as_str()),
                Duration::from_secs(10),
            )
            .await;
        assert!(is_running(agent.pid()), "{sig} killed the supervisor");
        assert_eq!(agent.worker_pid().await, worker, "{sig} changed the worker");
    }
    // A real-time signal (default action: terminate) too.
    let rt = nix::libc::SIGRTMIN() + 2;
    let mark = agent.log_len();
    assert_eq!(kill_with_number(agent.pid(), rt), 0);
    agent
        .wait_for_log_from(
            mark,
            "received SIGRTMIN+2: ignored",
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(agent.worker_pid().await, worker);
    let status = agent.status().await;
    assert_eq!(status["state"], "serving", "{status}");
    assert_eq!(status["restarts_succeeded"], 0, "{status}");
}

#[tokio::test]
async fn stray_signals_to_a_worker_are_logged_and_change_nothing() {
    let agent = Agent::start(AgentOpts::default()).await;
    let worker = agent.worker_pid().await;
    for sig in [Signal::SIGUSR2, Signal::SIGALRM, Signal::SIGPROF] {
        let mark = agent.log_len();
        send_signal(worker, sig);
        agent
            .wait_for_log_from(
                mark,
                &format!("received {}: ignored", sig.as_str()),
                Duration::from_secs(10),
            )
            .await;
        assert_eq!(agent.worker_pid().await, worker, "{sig} ended the worker");
    }
}

/// `kill -SIGNO PID` (nix's `Signal` has no real-time signals).
fn kill_with_number(pid: u32, signo: i32) -> i32 {
    std::process::Command::new("kill")
        .arg(format!("-{signo}"))
        .arg(pid.to_string())
        .status()
        .map(|s| s.code().unwrap_or(-1))
        .unwrap_or(-1)
}
