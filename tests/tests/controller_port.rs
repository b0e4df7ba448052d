//! The harness brings a killed controller back on its old address even when another
//! process holds that port for a while, and fails saying so when it never frees up:
//! the controller-restart tests (controller_crash, controller_stopped, dashboard)
//! rest on this.

use std::net::TcpListener;
use std::time::Duration;

use fleet_tests::fleet::{Controller, ControllerOpts, REBIND_WINDOW};

const IN_USE: &str = "Address already in use";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_waits_for_its_port_while_another_process_holds_it() {
    let controller = Controller::start(ControllerOpts::default()).await;
    let addr = controller.addr();
    controller.kill();
    // Someone else takes the port while the controller is down ...
    let squatter = TcpListener::bind(addr).expect("bind the controller's old port");
    let mark = controller.log_lines().len();
    let release = async {
        // ... and lets it go only once the controller was refused it.
        controller
            .wait_for_log_from(mark, IN_USE, Duration::from_secs(20))
            .await;
        drop(squatter);
    };
    tokio::join!(controller.restart(), release);

    assert_eq!(controller.addr(), addr);
    let nodes = controller.nodes().await;
    assert!(
        nodes.is_empty(),
        "a fresh controller knows no node: {nodes:?}"
    );
    let refused = controller
        .log_lines()
        .iter()
        .skip(mark)
        .filter(|l| l.contains(IN_USE))
        .count();
    assert!(refused >= 1, "the first try was refused the port");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[should_panic(expected = "could not listen on its old address")]
async fn a_restart_whose_port_stays_taken_fails_saying_so() {
    let controller = Controller::start(ControllerOpts::default()).await;
    let addr = controller.addr();
    controller.kill();
    let _squatter = TcpListener::bind(addr).expect("bind the controller's old port");
    let started = std::time::Instant::now();
    controller.restart().await;
    // Not reached; if it were, the restart got a port it cannot have had.
    panic!(
        "restarted within {:?} despite the squatter",
        started.elapsed().min(REBIND_WINDOW)
    );
}
