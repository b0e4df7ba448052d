//! The supervisor is safe as PID 1 (a container's init): in a fresh PID namespace
//! it restarts on SIGUSR1, the namespace stays alive, and the old worker — and any
//! orphan a worker leaves behind — is reaped rather than left as a zombie.

use std::process::Command;
use std::time::Duration;

use fleet_tests::harness::{
    SKIP_PIDNS, cannot_run, children_of, eventually, install_fixture, is_running, is_zombie,
    proc_state, running_children_of, send_signal, wait_gone,
};
use fleet_tests::{Agent, AgentOpts};
use nix::sys::signal::Signal;

const UNSHARE: [&str; 4] = ["unshare", "--pid", "--fork", "--mount-proc"];

/// Whether this machine lets us create a PID namespace; says why not otherwise.
fn pid_namespaces_available() -> Result<(), String> {
    let output = Command::new(UNSHARE[0])
        .args(&UNSHARE[1..])
        .arg("true")
        .output()
        .map_err(|e| format!("cannot run unshare: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`unshare --pid --fork --mount-proc true` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Start the agent as PID 1 of a new PID namespace; returns it and its host pid.
/// Where namespaces are not available the test fails, unless the person running it
/// opted out with `FLEET_TESTS_SKIP_PIDNS=1` (then `None`: NOT RUN is printed).
async fn start_as_pid_1(test: &str, opts: AgentOpts) -> Option<(Agent, u32)> {
    if let Err(why) = pid_namespaces_available() {
        cannot_run(
            test,
            &why,
            "install util-linux (`unshare`; .ci/run does) and run as root, or in a container \
             allowed to create PID namespaces (CAP_SYS_ADMIN)",
            SKIP_PIDNS,
        );
        return None;
    }
    let agent = Agent::start(AgentOpts {
        wrapper: UNSHARE.iter().map(Into::into).collect(),
        ..opts
    })
    .await;
    let unshare = agent.pid();
    // The agent is the child that `unshare --fork` started: PID 1 in its namespace.
    let supervisor = eventually(
        Duration::from_secs(5),
        "the agent under unshare",
        async || match children_of(unshare).as_slice() {
            [pid] => Ok(*pid),
            other => Err(format!("children of unshare: {other:?}")),
        },
    )
    .await;
    assert!(
        agent.count_log("supervisor[1]:") > 0,
        "the agent runs as PID 1 in the namespace"
    );
    Some((agent, supervisor))
}

#[tokio::test]
async fn as_pid_1_it_restarts_on_sigusr1_and_reaps_the_old_worker() {
    let Some((agent, supervisor)) = start_as_pid_1(
        "as_pid_1_it_restarts_on_sigusr1_and_reaps_the_old_worker",
        AgentOpts::default(),
    )
    .await
    else {
        return;
    };
    let old_worker = match running_children_of(supervisor).as_slice() {
        [pid] => *pid,
        other => agent.fail(&format!("expected one worker, found {other:?}")),
    };
    let old = agent.worker_pid().await; // as the namespace sees it

    send_signal(supervisor, Signal::SIGUSR1);

    agent.wait_worker_change(old, Duration::from_secs(20)).await;
    if wait_gone(old_worker, Duration::from_secs(10))
        .await
        .is_none()
    {
        let state = if is_zombie(old_worker) {
            "a zombie"
        } else {
            "still running"
        };
        agent.fail(&format!(
            "the old worker (host pid {old_worker}) is {state} (state {:?})",
            proc_state(old_worker)
        ));
    }
    assert!(agent.try_exit().is_none(), "the namespace stays alive");
    assert!(is_running(supervisor), "PID 1 stays alive");
    let zombies: Vec<u32> = children_of(supervisor)
        .into_iter()
        .filter(|&p| is_zombie(p))
        .collect();
    assert!(zombies.is_empty(), "zombies under PID 1: {zombies:?}");
    assert_eq!(
        running_children_of(supervisor).len(),
        1,
        "one worker serves"
    );
}

#[tokio::test]
async fn as_pid_1_it_reaps_orphans_that_a_worker_leaves_behind() {
    let dir = tempfile::tempdir().unwrap();
    let server = install_fixture(dir.path(), "py_server.py");
    let Some((agent, supervisor)) = start_as_pid_1(
        "as_pid_1_it_reaps_orphans_that_a_worker_leaves_behind",
        AgentOpts {
            env: vec![("PY_SERVER_ORPHAN".into(), "1".into())],
            ..AgentOpts::default().arg("--exec").arg(&server)
        },
    )
    .await
    else {
        return;
    };
    // The worker forked a grandchild and let its child exit: the grandchild now
    // belongs to PID 1, and exits 1 s later.
    agent
        .wait_for_log("left orphan pid", Duration::from_secs(10))
        .await;
    eventually(
        Duration::from_secs(1),
        "the orphan to be reparented to PID 1",
        async || match children_of(supervisor).len() {
            2 => Ok(()),
            n => Err(format!("PID 1 has {n} children")),
        },
    )
    .await;
    let worker = agent.worker_pid().await; // as the namespace sees it
    eventually(
        Duration::from_secs(5),
        "PID 1 to reap the orphan (its only child left is the worker)",
        async || {
            let children = children_of(supervisor);
            let zombies: Vec<u32> = children.iter().copied().filter(|&p| is_zombie(p)).collect();
            if children.len() == 1 && zombies.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "children {children:?}, zombies among them {zombies:?}"
                ))
            }
        },
    )
    .await;
    assert_eq!(agent.worker_pid().await, worker, "the worker still serves");
    assert!(agent.try_exit().is_none(), "the namespace stays alive");
}
