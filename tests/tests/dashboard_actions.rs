//! The nodes page offers only the actions a node's state allows, in headless Chromium
//! (as tests/tests/dashboard.rs): a stopped node and an unreachable one have no
//! Restart or Shut down (an unreachable one still has Forget), every button lies
//! inside its cell and the table, also at phone width; a restart asked for by URL
//! anyway says why not. A node an active rollout has not finished with is restarted
//! only with the "restart anyway" box ticked.
//! Screenshots land in `target/test-artifacts/`.

use std::time::Duration;

use fleet_tests::browser::Browser;
use fleet_tests::fleet::{Controller, ControllerOpts, agent_release, agent_status, rollout_node};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

/// For every action button on the nodes page: how far it runs past its cell's and
/// the table's right edge (px; > 0 is cut off), with its row's node.
const OVERFLOW: &str = "\
    var table = document.querySelector('table#nodes').getBoundingClientRect();\
    var out = [];\
    document.querySelectorAll('table#nodes td.actions .button').forEach(function (b) {\
      var r = b.getBoundingClientRect(), cell = b.closest('td').getBoundingClientRect();\
      out.push([b.closest('tr').dataset.node, b.textContent,\
                Math.max(r.right - cell.right, r.right - table.right, cell.left - r.left)]);\
    });\
    return out;";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_offer_only_the_actions_their_state_allows_and_buttons_fit() {
    let releases = tempfile::tempdir().unwrap();
    let v2 = agent_release(releases.path(), "fleet-agent-v2");
    let controller = Controller::start(ControllerOpts::default()).await;
    let agents = controller
        .start_nodes(4, |_, opts| {
            opts.arg("--allowed-exe-dir").arg(releases.path())
        })
        .await;

    // node-3 is shut down (stopped); node-4's agent freezes (unreachable).
    controller
        .fleetctl(["shutdown", "node-3"])
        .await
        .expect_code(0);
    agents[2].wait_exit(WAIT).await;
    let frozen = Pid::from_raw(agents[3].pid() as i32);
    kill(frozen, Signal::SIGSTOP).unwrap();
    controller
        .wait_nodes(&["node-3".to_string()], "stopped", WAIT)
        .await;
    controller
        .wait_nodes(&["node-4".to_string()], "unreachable", WAIT)
        .await;

    let browser = Browser::start(1280, 900).await;
    browser.goto(&format!("{}/", controller.url())).await;
    browser
        .wait_until(
            "node-4 is unreachable on the nodes page",
            "var r = document.getElementById('node-node-4');\
             return r && r.dataset.state === 'unreachable';",
            WAIT,
        )
        .await;
    let offered = |node: &'static str, action: &'static str| {
        let browser = &browser;
        async move {
            browser
                .find(&format!(
                    "tr#node-{node} td.actions a[href$='/{node}/{action}']"
                ))
                .await
                .is_some()
        }
    };
    for node in ["node-1", "node-2"] {
        assert!(offered(node, "restart").await, "{node} offers Restart");
        assert!(offered(node, "shutdown").await, "{node} offers Shut down");
    }
    for node in ["node-3", "node-4"] {
        assert!(!offered(node, "restart").await, "{node} offers Restart");
        assert!(!offered(node, "shutdown").await, "{node} offers Shut down");
        assert!(offered(node, "forget").await, "{node} offers Forget");
    }
    let note = browser.text_of("tr#node-node-4 td.actions").await;
    assert!(note.contains("unreachable"), "{note}");
    browser.screenshot("dashboard-actions-nodes.png").await;

    for (width, height) in [(1280, 900), (1024, 768), (420, 900)] {
        browser.set_window_size(width, height).await;
        let buttons = browser.execute(OVERFLOW, json!([])).await;
        let buttons = buttons.as_array().cloned().unwrap_or_default();
        assert_eq!(buttons.len(), 2 * 2 + 2, "{buttons:?}");
        for b in &buttons {
            let past = b[2].as_f64().unwrap();
            assert!(past <= 0.5, "at {width}px, a button is cut off: {b:?}");
        }
    }
    browser
        .screenshot("dashboard-actions-nodes-phone.png")
        .await;
    browser.set_window_size(1280, 900).await;

    // Asked for by URL anyway: the page says the node is stopped, and offers no form.
    browser
        .goto(&format!("{}/nodes/node-3/restart", controller.url()))
        .await;
    let main = browser.text_of("main").await;
    assert!(
        main.contains("node node-3 is stopped") && main.contains("start its agent again"),
        "{main}"
    );
    assert!(browser.find("button#confirm").await.is_none(), "{main}");

    // A rollout from the form, node-4 excluded (node-3, stopped, is left out anyway),
    // paused after its canary (node-1): node-2 is still to do.
    browser
        .goto(&format!("{}/rollouts/new", controller.url()))
        .await;
    for (field, value) in [
        ("exe", v2.to_str().unwrap()),
        ("exclude", "node-4"),
        ("canary", "1"),
    ] {
        let input = browser.wait_for(&format!("#{field}"), WAIT).await;
        browser.type_into(&input, value).await;
    }
    browser.click_on("#pause_after_canary", WAIT).await;
    browser.click_on("button#preview", WAIT).await;
    let left_out = browser.wait_for("ul#left-out", WAIT).await;
    let left_out = browser.text(&left_out).await;
    assert!(
        left_out.contains("1 node: excluded by request (--exclude): node-4")
            && left_out.contains("node-3"),
        "{left_out}"
    );
    let plan = browser.text_of("ol#plan").await;
    assert!(
        !plan.contains("node-4") && !plan.contains("node-3"),
        "{plan}"
    );
    browser.screenshot("dashboard-actions-preview.png").await;
    browser.click_on("button#start", WAIT).await;
    browser.wait_for("#rollout-state", WAIT).await;
    let rollout = controller
        .wait_rollout("latest", "paused after its canary", WAIT, |r| {
            r.state == "paused"
        })
        .await;
    assert_eq!(rollout_node(&rollout, "node-2").state, "pending");
    let before = agent_status(&agents[1]).await.generation;

    browser
        .goto(&format!("{}/nodes/node-2/restart", controller.url()))
        .await;
    let held = browser.wait_for("#held-by", WAIT).await;
    assert_eq!(
        browser.attr(&held, "data-rollout").await.as_deref(),
        Some(rollout.id.as_str())
    );
    browser.click_on("button#confirm", WAIT).await;
    browser
        .wait_until(
            "the refusal",
            "var f = document.querySelector('.flash');\
             return f && f.textContent.includes('is in rollout');",
            WAIT,
        )
        .await;
    let main = browser.text_of("main").await;
    assert!(
        main.contains(&format!("node node-2 is in rollout {}", rollout.id)),
        "refused without the box: {main}"
    );
    assert_eq!(agent_status(&agents[1]).await.generation, before);
    browser.screenshot("dashboard-actions-held.png").await;

    browser.click_on("input#force", WAIT).await;
    browser.click_on("button#confirm", WAIT).await;
    let outcome = browser.wait_for("h1#outcome", WAIT).await;
    assert_eq!(
        browser.attr(&outcome, "data-outcome").await.as_deref(),
        Some("succeeded")
    );
    assert_eq!(agent_status(&agents[1]).await.generation, before + 1);
    let r = controller.rollout(&rollout.id).await;
    assert!(
        rollout_node(&r, "node-2")
            .timeline
            .iter()
            .any(|t| t.message.contains("manual restart forced by")),
        "{:?}",
        rollout_node(&r, "node-2").timeline
    );

    kill(frozen, Signal::SIGCONT).unwrap();
}
