//! The dashboard's progress is honest, in a real browser (headless Chromium): a rollout
//! that failed shows its bar split into healthy, failed and skipped parts, each as wide
//! as its share of the nodes, and never 100%; the new-rollout form shows the
//! controller's default soak as the field's value, not as a grey placeholder.
//! Screenshots land in `target/test-artifacts/`.

use std::ffi::OsStr;
use std::time::Duration;

use fleet_tests::browser::Browser;
use fleet_tests::fleet::{Controller, ControllerOpts, describe};
use fleet_tests::harness::{copy_agent_binary, install_fixture};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

/// Each part of the bar `#id`: kind, count, and its width as a share of the bar (%).
const PARTS: &str = "var bar = document.getElementById(arguments[0]);\
    if (!bar) return null;\
    var total = bar.getBoundingClientRect().width;\
    return {data: Object.assign({}, bar.dataset), total: total,\
      text: bar.parentElement.querySelector('.pct').textContent,\
      pct: bar.parentElement.querySelector('.pct').dataset.pct,\
      parts: Array.prototype.map.call(bar.querySelectorAll('.seg'), function (s) {\
        return {kind: s.dataset.kind, count: Number(s.dataset.count),\
          share: 100 * s.getBoundingClientRect().width / total,\
          color: getComputedStyle(s).fill};\
      })};";

/// The bar `#id` on the page shown: 1 healthy, 1 failed, 2 skipped of 4 nodes.
async fn check_bar(browser: &Browser, id: &str) -> Value {
    let bar = browser.execute(PARTS, json!([id])).await;
    eprintln!("bar #{id}: {bar}");
    assert_eq!(bar["data"]["total"], "4", "{bar}");
    assert_eq!(bar["data"]["healthy"], "1", "{bar}");
    assert_eq!(bar["data"]["failed"], "1", "{bar}");
    assert_eq!(bar["data"]["skipped"], "2", "{bar}");
    assert_eq!(bar["pct"], "25", "only the healthy node is done: {bar}");
    assert!(
        bar["text"]
            .as_str()
            .unwrap_or_default()
            .contains("1/4 healthy (25%), 1 failed, 2 skipped"),
        "{bar}"
    );
    let parts = bar["parts"].as_array().expect("parts");
    let kinds: Vec<&str> = parts.iter().filter_map(|p| p["kind"].as_str()).collect();
    assert_eq!(kinds, ["healthy", "failed", "skipped"], "{bar}");
    for (part, (count, share)) in parts.iter().zip([(1, 25.0), (1, 25.0), (2, 50.0)]) {
        assert_eq!(part["count"], count, "{bar}");
        let drawn = part["share"].as_f64().unwrap();
        assert!(
            (drawn - share).abs() < 2.0,
            "{} drawn {drawn:.1}% wide, not {share}%: {bar}",
            part["kind"]
        );
    }
    // Three parts, three looks.
    let colors: std::collections::BTreeSet<&str> =
        parts.iter().filter_map(|p| p["color"].as_str()).collect();
    assert_eq!(colors.len(), 3, "{bar}");
    bar
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_a_failed_rollouts_bar_in_healthy_failed_and_skipped_parts() {
    // A release that execs a copy of the agent, except on node-2, where it exits 7.
    let releases = tempfile::tempdir().unwrap();
    copy_agent_binary(releases.path(), "fleet-agent-real");
    std::fs::write(releases.path().join("crash-nodes"), "node-2\n").unwrap();
    let release =
        std::fs::canonicalize(install_fixture(releases.path(), "crash_on_nodes.sh")).unwrap();
    // The controller's own default soak (10 s), for the form.
    let controller = Controller::start(ControllerOpts {
        default_min_healthy: None,
        ..ControllerOpts::default()
    })
    .await;
    let _agents = controller
        .start_nodes(4, |_, opts| {
            opts.arg("--allowed-exe-dir").arg(releases.path())
        })
        .await;

    // Batches of 1, 1 and 2: node-1 healthy, node-2 fails (budget 0), node-3 and
    // node-4 skipped.
    controller
        .fleetctl([
            OsStr::new("rollout"),
            "--exe".as_ref(),
            release.as_os_str(),
            "--batches".as_ref(),
            "1,2,100%".as_ref(),
            "--max-failures".as_ref(),
            "0".as_ref(),
            "--min-healthy".as_ref(),
            "0s".as_ref(),
        ])
        .await
        .expect_code(1);
    let r = controller.rollout("latest").await;
    assert_eq!(r.state, "failed", "{}", describe(&r));

    let browser = Browser::start(1280, 900).await;
    browser
        .goto(&format!("{}/rollouts/{}", controller.url(), r.id))
        .await;
    browser.wait_for("#rollout-progress .seg", WAIT).await;
    check_bar(&browser, "rollout-progress").await;
    browser
        .screenshot("dashboard-progress-failed-rollout.png")
        .await;

    // The list of rollouts draws the same bar.
    browser
        .goto(&format!("{}/rollouts", controller.url()))
        .await;
    let id = format!("progress-{}", r.id);
    browser.wait_for(&format!("#{id} .seg"), WAIT).await;
    check_bar(&browser, &id).await;
    browser
        .screenshot("dashboard-progress-rollout-list.png")
        .await;

    // The form shows the soak a rollout gets when nothing is typed: 10s, as a value.
    browser
        .goto(&format!("{}/rollouts/new", controller.url()))
        .await;
    let field = browser.wait_for("#min_healthy", WAIT).await;
    assert_eq!(
        browser
            .execute(
                "return document.getElementById('min_healthy').value;",
                json!([])
            )
            .await,
        "10s"
    );
    assert_eq!(browser.attr(&field, "placeholder").await, None);
    // The failure budget too: 0, as a value.
    assert_eq!(
        browser
            .execute(
                "return document.getElementById('max_failures').value;",
                json!([])
            )
            .await,
        "0"
    );
    let help = browser.text_of("#min_healthy-help").await;
    assert!(help.contains("default: 10s"), "{help}");
    browser.screenshot("dashboard-progress-form-soak.png").await;
}
