//! The dashboard in a real browser: a controller with three agents, opened in
//! headless Chromium (Debian's `chromium` + `chromium-driver`, driven through
//! WebDriver). An operator sees the nodes, starts a rollout from the form and watches
//! it to the end without reloading, restarts one node from its row, pauses, resumes,
//! undoes and aborts rollouts, shuts a node down and forgets it (each confirmed), and
//! a dashboard with a token lets nobody act before logging in, nor post without the
//! CSRF token.
//! Screenshots land in `target/test-artifacts/`.

use std::time::Duration;

use fleet_tests::browser::Browser;
use fleet_tests::fleet::{Controller, ControllerOpts, agent_release, agent_status, worker_pid};
use fleet_tests::harness::http_send;
use http::{Method, StatusCode};
use serde_json::{Value, json};

const NODES: usize = 3;
const WAIT: Duration = Duration::from_secs(30);

/// Three agents labelled `zone=a|b|c`, every one allowed to run releases from
/// `releases`.
async fn fleet(
    opts: ControllerOpts,
    releases: &std::path::Path,
) -> (Controller, Vec<fleet_tests::Agent>) {
    let controller = Controller::start(opts).await;
    let agents = controller
        .start_nodes(NODES, |i, opts| {
            opts.arg("--allowed-exe-dir")
                .arg(releases)
                .arg("--label")
                .arg(format!("zone={}", ["a", "b", "c"][i % 3]))
        })
        .await;
    (controller, agents)
}

/// The text of a cell of a node's row on the nodes page.
async fn cell(browser: &Browser, node: &str, col: &str) -> String {
    browser
        .text_of(&format!("tr#node-{node} td[data-col={col}]"))
        .await
}

/// Fill the new-rollout form with `fields` (input id, value; a value of `on` ticks a
/// checkbox) and preview it; returns the plan's text.
async fn preview_rollout(
    browser: &Browser,
    controller: &Controller,
    fields: &[(&str, &str)],
) -> String {
    browser
        .goto(&format!("{}/rollouts/new", controller.url()))
        .await;
    browser.wait_for("form#rollout-form", WAIT).await;
    for (field, value) in fields {
        let input = browser.wait_for(&format!("#{field}"), WAIT).await;
        if *value == "on" {
            browser.click(&input).await;
        } else {
            browser.type_into(&input, value).await;
        }
    }
    browser.click_on("button#preview", WAIT).await;
    let plan = browser.wait_for("ol#plan", WAIT).await;
    browser.text(&plan).await
}

/// Start the previewed rollout; returns its id once its page is shown.
async fn start_previewed_rollout(browser: &Browser) -> String {
    browser.click_on("button#start", WAIT).await;
    browser.wait_for("#rollout-state", WAIT).await;
    rollout_on_page(browser).await
}

/// The id of the rollout whose page is shown.
async fn rollout_on_page(browser: &Browser) -> String {
    let url = browser.url().await;
    let id = url
        .split("/rollouts/")
        .nth(1)
        .map(|rest| {
            rest.split(['?', '#'])
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .filter(|id| !id.is_empty());
    id.unwrap_or_else(|| panic!("not on a rollout's page: {url}"))
}

/// Wait (without reloading) until the rollout's page shows it in `state`.
async fn wait_rollout_state(browser: &Browser, state: &str, timeout: Duration) {
    browser
        .wait_until(
            &format!("the rollout's page shows it {state}"),
            &format!(
                "var s = document.getElementById('rollout-state');\
                 return s && s.dataset.state === '{state}';"
            ),
            timeout,
        )
        .await;
}

/// Press an action's button on the current page, confirm it, and wait for the
/// confirmation page to be left.
async fn act_and_confirm(browser: &Browser, button: &str) {
    browser.click_on(button, WAIT).await;
    let confirm = browser.wait_for("button#confirm", WAIT).await;
    browser.click(&confirm).await;
    browser
        .wait_until(
            "the confirmation page is left",
            "return !document.getElementById('confirm');",
            WAIT,
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_lists_the_nodes_and_restarts_one_from_its_row() {
    let releases = tempfile::tempdir().unwrap();
    let (controller, agents) = fleet(ControllerOpts::default(), releases.path()).await;
    let browser = Browser::start(1280, 900).await;

    // 1. Three nodes, each with its state in words (and a colour class) and a link
    //    to its own admin page.
    browser.goto(&format!("{}/", controller.url())).await;
    browser.wait_for("table#nodes", WAIT).await;
    let rows = browser
        .attrs_of("table#nodes tbody tr[data-node]", "data-node")
        .await;
    assert_eq!(rows.len(), NODES, "rows on the nodes page: {rows:?}");
    for (i, agent) in agents.iter().enumerate() {
        let id = format!("node-{}", i + 1);
        let row = format!("tr#node-{id}");
        let state = browser
            .text_of(&format!("{row} span.state.state-serving"))
            .await;
        assert_eq!(state, "serving", "{id}'s state");
        let href = browser
            .attrs_of(&format!("{row} a.admin"), "href")
            .await
            .pop()
            .flatten()
            .unwrap_or_else(|| panic!("{id} has no admin link"));
        assert!(
            href.starts_with(&format!("http://{}", agent.control()))
                && href.contains("/debug/admin"),
            "{id}'s admin link {href:?} is not its agent's admin page ({})",
            agent.control()
        );
        let status = agent_status(agent).await;
        assert_eq!(
            cell(&browser, &id, "worker_pid").await,
            worker_pid(&status).to_string()
        );
        assert!(
            browser
                .text_of(&row)
                .await
                .contains(&format!("zone={}", ["a", "b", "c"][i]))
        );
    }
    // Filter by label: only the node in zone b.
    browser
        .goto(&format!("{}/nodes?label=zone%3Db", controller.url()))
        .await;
    let rows = browser
        .attrs_of("table#nodes tbody tr[data-node]", "data-node")
        .await;
    assert_eq!(rows, [Some("node-2".to_string())], "rows for zone=b");

    browser.goto(&format!("{}/", controller.url())).await;
    browser.wait_for("table#nodes", WAIT).await;
    browser.screenshot("dashboard-nodes.png").await;
    browser.set_window_size(390, 844).await;
    browser.screenshot("dashboard-nodes-phone.png").await;
    browser.set_window_size(1280, 900).await;

    // 3. Restart node-2 from its row: the confirmation page, then the outcome, then
    //    the row shows the new generation and worker PID.
    let generation = cell(&browser, "node-2", "generation").await;
    let pid = cell(&browser, "node-2", "worker_pid").await;
    browser
        .click_on("tr#node-node-2 td.actions a[href$='/restart']", WAIT)
        .await;
    let confirm = browser.wait_for("button#confirm", WAIT).await;
    assert!(browser.url().await.ends_with("/nodes/node-2/restart"));
    browser.click(&confirm).await;
    let outcome = browser.wait_for("h1#outcome", WAIT).await;
    assert_eq!(
        browser.attr(&outcome, "data-outcome").await.as_deref(),
        Some("succeeded"),
        "{}",
        browser.text_of("main").await
    );
    let new_generation = browser.text_of("#new-generation").await;
    let new_pid = browser.text_of("#new-pid").await;
    assert_ne!(new_generation, generation, "the generation did not change");
    assert_ne!(new_pid, pid, "the worker PID did not change");
    let status = agent_status(&agents[1]).await;
    assert_eq!(
        new_pid,
        worker_pid(&status).to_string(),
        "the agent's own worker PID"
    );

    // The nodes page shows it once the agent's heartbeat reports it (live, without
    // reloading: the page is opened before and only watched).
    browser.goto(&format!("{}/", controller.url())).await;
    browser
        .wait_until(
            "node-2's row shows the new worker PID",
            &format!(
                "var c = document.querySelector('tr#node-node-2 td[data-col=worker_pid]');\
                 return c && c.textContent.trim() === '{new_pid}';"
            ),
            WAIT,
        )
        .await;
    assert_eq!(cell(&browser, "node-2", "generation").await, new_generation);
    // Untouched nodes kept their workers.
    for i in [0, 2] {
        let status = agent_status(&agents[i]).await;
        assert_eq!(status.generation, 1, "node-{} was restarted too", i + 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_rollout_from_the_form_shows_every_phase_live_up_to_100_percent() {
    let releases = tempfile::tempdir().unwrap();
    let v2 = agent_release(releases.path(), "fleet-agent-v2");
    let (controller, agents) = fleet(ControllerOpts::default(), releases.path()).await;
    let browser = Browser::start(1280, 900).await;

    let plan = preview_rollout(
        &browser,
        &controller,
        &[
            ("exe", &v2.display().to_string()),
            ("batches", "1,100%"),
            ("min_healthy", "2s"),
            ("reason", "ship v2 from the dashboard"),
        ],
    )
    .await;
    // The plan: node-1 alone, then the other two; nothing has started yet.
    assert!(plan.contains("node-1"), "plan: {plan}");
    assert!(
        controller.rollouts().await.is_empty(),
        "a preview started a rollout"
    );
    start_previewed_rollout(&browser).await;

    // From here on the page is only watched: a marker set on this document would be
    // gone after a reload or navigation. Every 20 ms the phases shown are recorded.
    browser
        .execute(
            "window.__marker = 'still here';\
             window.__phases = {};\
             window.__pct = [];\
             setInterval(function () {\
               document.querySelectorAll('tr[data-phase]').forEach(function (tr) {\
                 var seen = window.__phases[tr.dataset.node] || (window.__phases[tr.dataset.node] = []);\
                 if (seen[seen.length - 1] !== tr.dataset.phase) seen.push(tr.dataset.phase);\
               });\
               var p = document.querySelector('.pct[data-pct]');\
               if (p && window.__pct[window.__pct.length - 1] !== p.dataset.pct) window.__pct.push(p.dataset.pct);\
             }, 20);",
            json!([]),
        )
        .await;
    browser
        .wait_until(
            "the rollout's page shows it succeeded at 100%",
            "var s = document.getElementById('rollout-state');\
             var p = document.querySelector('.pct[data-pct]');\
             var bar = document.getElementById('rollout-progress');\
             return s && s.dataset.state === 'succeeded' && p && p.dataset.pct === '100'\
               && bar && bar.dataset.total !== '0' && bar.dataset.healthy === bar.dataset.total;",
            Duration::from_secs(90),
        )
        .await;
    // The recorder samples every 20 ms: let it see the rows' last phase too (the
    // rollout's state and its rows change in the same update).
    browser
        .wait_until(
            "the page's recorder to have seen every row healthy",
            "var rows = document.querySelectorAll('tr[data-phase]');\
             return rows.length > 0 && Array.prototype.every.call(rows, function (tr) {\
               var seen = window.__phases[tr.dataset.node] || [];\
               return tr.dataset.phase === 'healthy' && seen[seen.length - 1] === 'healthy';\
             });",
            Duration::from_secs(10),
        )
        .await;
    let seen = browser
        .execute(
            "return {marker: window.__marker, phases: window.__phases, pct: window.__pct,\
             refreshes: Number(document.getElementById('live').dataset.refreshes || 0)};",
            json!([]),
        )
        .await;
    eprintln!("seen in the page: {seen}");
    assert_eq!(seen["marker"], "still here", "the page was reloaded");
    assert!(seen["refreshes"].as_u64().unwrap_or(0) >= 2, "{seen}");
    for i in 1..=NODES {
        let node = format!("node-{i}");
        let phases: Vec<&str> = seen["phases"][&node]
            .as_array()
            .unwrap_or_else(|| panic!("no phases recorded for {node}: {seen}"))
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(phases.last(), Some(&"healthy"), "{node}: {phases:?}");
        assert!(
            phases.contains(&"soaking"),
            "{node} was never seen soaking: {phases:?}"
        );
        // In the order a rollout moves through them.
        let order = ["pending", "preflight", "restarting", "soaking", "healthy"];
        let ranks: Vec<usize> = phases
            .iter()
            .map(|p| order.iter().position(|o| o == p).unwrap_or(usize::MAX))
            .collect();
        assert!(ranks.windows(2).all(|w| w[0] < w[1]), "{node}: {phases:?}");
    }
    // The bar went up in steps, not straight from nothing to 100.
    let pct: Vec<&str> = seen["pct"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        pct.len() >= 3 && pct.last() == Some(&"100"),
        "progress seen: {pct:?}"
    );

    for agent in &agents {
        let status = agent_status(agent).await;
        assert_eq!(
            fleet_tests::fleet::exe_path(&status),
            v2.display().to_string()
        );
    }
    browser.screenshot("dashboard-rollout-finished.png").await;
    browser.set_window_size(390, 844).await;
    browser
        .screenshot("dashboard-rollout-finished-phone.png")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_with_a_token_needs_a_login_and_a_csrf_token_to_act() {
    let releases = tempfile::tempdir().unwrap();
    let token = "dashboard-test-token-8f3a";
    let opts = ControllerOpts {
        token: Some(token.into()),
        ..Default::default()
    };
    let (controller, agents) = fleet(opts, releases.path()).await;
    let browser = Browser::start(1280, 900).await;
    let before = agent_status(&agents[0]).await.generation;

    // Sent to the login page, which says where it came from.
    browser.goto(&format!("{}/nodes", controller.url())).await;
    browser.wait_for("form#login", WAIT).await;
    assert!(
        browser.url().await.contains("/login?next="),
        "{}",
        browser.url().await
    );
    assert!(browser.find("table#nodes").await.is_none());

    // Acting without a session is refused (a client with no cookie at all).
    let refused = http_send(
        controller.addr(),
        Method::POST,
        "/nodes/node-1/restart",
        &[
            ("content-type", "application/x-www-form-urlencoded".into()),
            ("origin", controller.url()),
        ],
        "exe=&reason=x",
    )
    .await
    .unwrap();
    assert_eq!(
        refused.status,
        StatusCode::UNAUTHORIZED,
        "{}",
        refused.text()
    );

    // A wrong token is refused and says what to give.
    let field = browser.find("#token").await.unwrap();
    browser.type_into(&field, "not-the-token").await;
    browser
        .click(&browser.find("#login-submit").await.unwrap())
        .await;
    // The page being left has the same form: wait for the answer's message (one
    // wrong token in a row costs nothing; see fleet_net::throttle).
    browser
        .wait_until(
            "the login page says the token was wrong",
            "var m = document.querySelector('main');\
             return m && m.textContent.indexOf('wrong token') >= 0;",
            WAIT,
        )
        .await;
    assert!(browser.find("form#login").await.is_some());
    assert!(browser.find("table#nodes").await.is_none());

    // The right one opens the page asked for; the cookie cannot be read by scripts
    // and is not sent on cross-site requests.
    let field = browser.find("#token").await.unwrap();
    browser.type_into(&field, token).await;
    browser
        .click(&browser.find("#login-submit").await.unwrap())
        .await;
    browser.wait_for("table#nodes", WAIT).await;
    assert!(
        browser.url().await.ends_with("/nodes"),
        "{}",
        browser.url().await
    );
    let script_cookies = browser.execute("return document.cookie;", json!([])).await;
    assert_eq!(
        script_cookies, "",
        "the session cookie is readable by scripts"
    );
    let cookies = browser.cookies().await;
    let session = cookies
        .iter()
        .find(|c| c["name"] == "fleet_session")
        .unwrap_or_else(|| panic!("no fleet_session cookie in {cookies:?}"));
    assert_eq!(session["httpOnly"], true, "{session}");
    assert_eq!(session["sameSite"], "Strict", "{session}");

    // A POST from the logged-in page without the CSRF token: refused, nothing done.
    let post = |body: &str| {
        format!(
            "var done = arguments[arguments.length - 1];\
             fetch('/nodes/node-1/restart', {{method: 'POST', credentials: 'same-origin',\
               headers: {{'content-type': 'application/x-www-form-urlencoded'}}, body: {body}}})\
             .then(function (r) {{ done(r.status); }}, function (e) {{ done(String(e)); }});"
        )
    };
    let status = browser
        .execute_async(&post("'exe=&reason=no-csrf'"), json!([]))
        .await;
    assert_eq!(status, 403, "a POST without the CSRF token");
    let status = browser
        .execute_async(
            &post("'exe=&reason=forged&csrf=0123456789abcdef'"),
            json!([]),
        )
        .await;
    assert_eq!(status, 403, "a POST with a made-up CSRF token");
    assert_eq!(
        agent_status(&agents[0]).await.generation,
        before,
        "a refused POST restarted node-1"
    );

    // The form on the confirmation page carries it: the restart happens.
    browser
        .goto(&format!("{}/nodes/node-1/restart", controller.url()))
        .await;
    browser
        .click(&browser.wait_for("button#confirm", WAIT).await)
        .await;
    let outcome = browser.wait_for("h1#outcome", WAIT).await;
    assert_eq!(
        browser.attr(&outcome, "data-outcome").await.as_deref(),
        Some("succeeded")
    );
    assert!(agent_status(&agents[0]).await.generation > before);

    // Logging out ends the session: back to the login page.
    browser
        .click(
            &browser
                .find("form.logout button")
                .await
                .expect("a logout button"),
        )
        .await;
    browser.wait_for("form#login", WAIT).await;
    browser.goto(&format!("{}/nodes", controller.url())).await;
    browser.wait_for("form#login", WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_catches_up_after_losing_its_event_stream() {
    let releases = tempfile::tempdir().unwrap();
    let (controller, agents) = fleet(ControllerOpts::default(), releases.path()).await;
    let browser = Browser::start(1280, 900).await;
    browser.goto(&format!("{}/", controller.url())).await;
    browser
        .wait_until(
            "the page is live",
            "var s = document.getElementById('live-status'); return s && s.dataset.state === 'live';",
            WAIT,
        )
        .await;
    browser
        .execute("window.__marker = 'still here';", json!([]))
        .await;

    // The controller goes away and comes back; meanwhile node-3 restarts, which the
    // page cannot hear about.
    controller.kill();
    browser
        .wait_until(
            "the page notices the lost stream",
            "return document.getElementById('live-status').dataset.state === 'reconnecting';",
            WAIT,
        )
        .await;
    let old = worker_pid(&agent_status(&agents[2]).await);
    let new = {
        let mut grpc = agents[2].grpc().await;
        let reply = grpc
            .restart(agents[2].request(fleet_proto::v1::RestartRequest::default()))
            .await
            .expect("restart node-3")
            .into_inner();
        reply.new_pid
    };
    assert_ne!(new, old);
    controller.restart().await;

    browser
        .wait_until(
            "node-3's row shows its new worker after the reconnect",
            &format!(
                "var c = document.querySelector('tr#node-node-3 td[data-col=worker_pid]');\
                 return document.getElementById('live-status').dataset.state === 'live'\
                   && c && c.textContent.trim() === '{new}';"
            ),
            Duration::from_secs(60),
        )
        .await;
    let marker = browser.execute("return window.__marker;", json!([])).await;
    assert_eq!(marker, "still here", "the page was reloaded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_pauses_resumes_undoes_and_aborts_rollouts_and_shuts_a_node_down() {
    let releases = tempfile::tempdir().unwrap();
    let v2 = agent_release(releases.path(), "fleet-agent-v2");
    let (controller, agents) = fleet(ControllerOpts::default(), releases.path()).await;
    let v1 = fleet_tests::fleet::exe_path(&agent_status(&agents[0]).await);
    let browser = Browser::start(1280, 900).await;
    let canary_form = [
        ("exe", v2.to_str().unwrap()),
        ("batches", "100%"),
        ("canary", "1"),
        ("pause_after_canary", "on"),
        ("min_healthy", "500ms"),
    ];

    // A canary that pauses: the page says so, and Resume (confirmed) finishes it.
    let plan = preview_rollout(&browser, &controller, &canary_form).await;
    assert!(plan.contains("canary"), "plan: {plan}");
    let first = start_previewed_rollout(&browser).await;
    wait_rollout_state(&browser, "paused", WAIT).await;
    assert_eq!(controller.rollout(&first).await.state, "paused");
    act_and_confirm(&browser, "a.button[href$='/resume']").await;
    assert!(
        browser.text_of("main").await.contains("resumed"),
        "{}",
        browser.text_of("main").await
    );
    wait_rollout_state(&browser, "succeeded", Duration::from_secs(60)).await;
    for agent in &agents {
        assert_eq!(
            fleet_tests::fleet::exe_path(&agent_status(agent).await),
            v2.display().to_string()
        );
    }

    // Undo (confirmed) starts a rollout back to the previous executable.
    act_and_confirm(&browser, "a.button[href$='/undo']").await;
    let undo = rollout_on_page(&browser).await;
    assert_ne!(undo, first, "undo did not open a new rollout");
    wait_rollout_state(&browser, "succeeded", Duration::from_secs(60)).await;
    for agent in &agents {
        assert_eq!(fleet_tests::fleet::exe_path(&agent_status(agent).await), v1);
    }

    // Abort (confirmed) at the canary's pause: the other nodes are left alone.
    let mut before = Vec::new();
    for agent in &agents {
        before.push(agent_status(agent).await.generation);
    }
    preview_rollout(&browser, &controller, &canary_form).await;
    let aborted = start_previewed_rollout(&browser).await;
    wait_rollout_state(&browser, "paused", WAIT).await;
    act_and_confirm(&browser, "a.button.danger[href$='/abort']").await;
    wait_rollout_state(&browser, "aborted", WAIT).await;
    let r = controller.rollout(&aborted).await;
    assert_eq!(r.state, "aborted", "{}", fleet_tests::fleet::describe(&r));
    let mut after = Vec::new();
    for agent in &agents {
        after.push(agent_status(agent).await.generation);
    }
    let restarted = after.iter().zip(&before).filter(|(a, b)| a != b).count();
    assert_eq!(
        restarted, 1,
        "only the canary was restarted before the abort"
    );

    // Shut down node-3 from its row (confirmed): it drains and exits, and the nodes
    // page shows it stopped.
    browser.goto(&format!("{}/", controller.url())).await;
    act_and_confirm(
        &browser,
        "tr#node-node-3 td.actions a.danger[href$='/shutdown']",
    )
    .await;
    assert!(
        browser.text_of("main").await.contains("shutting down"),
        "{}",
        browser.text_of("main").await
    );
    let status = agents[2].wait_exit(WAIT).await;
    assert!(status.success(), "node-3 exited with {status:?}");
    browser.goto(&format!("{}/", controller.url())).await;
    browser
        .wait_until(
            "node-3 is stopped on the nodes page",
            "var r = document.getElementById('node-node-3');\
             return r && r.dataset.state === 'stopped';",
            WAIT,
        )
        .await;
    browser
        .screenshot("dashboard-nodes-after-shutdown.png")
        .await;

    // A stopped node can only be forgotten (confirmed): its row goes.
    assert!(
        browser
            .find("tr#node-node-3 td.actions a[href$='/restart']")
            .await
            .is_none(),
        "a stopped node offers a restart"
    );
    act_and_confirm(&browser, "tr#node-node-3 td.actions a[href$='/forget']").await;
    assert!(
        browser.text_of("main").await.contains("Forgot node-3"),
        "{}",
        browser.text_of("main").await
    );
    browser.goto(&format!("{}/", controller.url())).await;
    browser.wait_for("table#nodes", WAIT).await;
    let rows = browser
        .attrs_of("table#nodes tbody tr[data-node]", "data-node")
        .await;
    assert_eq!(
        rows,
        [Some("node-1".to_string()), Some("node-2".to_string())],
        "rows after forgetting node-3"
    );
}
