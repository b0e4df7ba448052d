//! The agent's own admin page in a real browser (headless Chromium through
//! WebDriver): its Restart and Shut down buttons work, each after a confirmation step
//! on the page, without a token and with one — logging in through the form, getting
//! a session cookie scoped to the admin path, and logging out, after which the
//! session is gone on the server too. Screenshots land in `target/test-artifacts/`.

use std::time::Duration;

use fleet_tests::browser::Browser;
use fleet_tests::harness::http_send;
use fleet_tests::{Agent, AgentOpts};
use http::Method;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);
const TOKEN: &str = "s3cret-t0ken";

/// Press `action`'s button, then its confirmation, and return the result the page
/// shows once the answer is in.
async fn press(browser: &Browser, action: &str) -> String {
    browser.click_on(&format!("button#{action}"), WAIT).await;
    browser
        .wait_until(
            &format!("the {action} confirmation shows"),
            &format!("return !document.querySelector('#{action}-form .confirm').hidden;"),
            WAIT,
        )
        .await;
    browser
        .click_on(&format!("button#confirm-{action}"), WAIT)
        .await;
    let result = browser
        .wait_until(
            &format!("the page shows the {action} result"),
            "var r = document.getElementById('result'); \
             return r && !r.hidden && r.textContent !== 'working…' ? r.textContent : null;",
            WAIT,
        )
        .await;
    result.as_str().unwrap_or_default().to_string()
}

/// Log in through the page's form; returns once the admin page is shown.
async fn log_in(browser: &Browser, agent: &Agent) {
    browser
        .goto(&format!("http://{}/debug/admin", agent.control()))
        .await;
    let field = browser.wait_for("input[name=token]", WAIT).await;
    browser.type_into(&field, TOKEN).await;
    browser.click_on("form button", WAIT).await;
    browser.wait_for("button#restart", WAIT).await;
}

fn session_cookie(cookies: &[Value]) -> Option<&Value> {
    cookies.iter().find(|c| c["name"] == "fleet_admin")
}

#[tokio::test]
async fn without_a_token_the_buttons_restart_and_shut_the_node_down() {
    let agent = Agent::start(AgentOpts::default()).await;
    let browser = Browser::start(1280, 900).await;
    browser
        .goto(&format!("http://{}/debug/admin", agent.control()))
        .await;
    browser.wait_for("button#restart", WAIT).await;
    assert!(
        browser.find("button#logout").await.is_none(),
        "no session without a token, so no Log out"
    );
    let old = agent.worker_pid().await;

    let result = press(&browser, "restart").await;
    assert!(
        result.starts_with("200") && result.contains("\"succeeded\""),
        "restart from the page: {result}"
    );
    let new = agent.serving_worker().await;
    assert_ne!(new, old, "a new worker serves");
    assert!(result.contains(&format!("\"new_pid\":{new}")), "{result}");
    // The answer in words, not only as JSON.
    let said = browser.text_of("#result .flash.done").await;
    assert!(
        said.starts_with("Restart succeeded: generation 2") && said.contains(&format!("→ {new}")),
        "{said}"
    );
    // The page is live: without a reload, its last restarts list this one with its
    // ready time, then its drain time once the old worker is gone; uptime is shown.
    browser
        .wait_until(
            "the restart is listed with its ready and drain times",
            "var r = document.querySelector('#restarts tr.restart');\
             return r && +r.dataset.readyUs > 0 && +r.dataset.drainUs > 0;",
            WAIT,
        )
        .await;
    assert!(!browser.text_of("#uptime").await.is_empty());
    assert_eq!(
        browser.find_all("#workers tbody tr").await.len(),
        1,
        "the old worker drained away from the live table"
    );
    browser.screenshot("agent-admin-restarted.png").await;

    let result = press(&browser, "shutdown").await;
    assert!(
        result.starts_with("200") && result.contains("shutting_down"),
        "shut down from the page: {result}"
    );
    let status = agent.wait_exit(WAIT).await;
    assert!(status.success(), "the node shut down gracefully: {status}");
}

#[tokio::test]
async fn with_a_token_log_in_restart_log_out_and_shut_down() {
    let agent = Agent::start(AgentOpts {
        token: Some(TOKEN.into()),
        ..Default::default()
    })
    .await;
    let browser = Browser::start(1280, 900).await;
    log_in(&browser, &agent).await;
    let cookies = browser.cookies().await;
    let cookie = session_cookie(&cookies)
        .unwrap_or_else(|| panic!("no session cookie after login: {cookies:?}"))
        .clone();
    assert_eq!(cookie["httpOnly"], json!(true), "{cookie}");
    assert_eq!(cookie["sameSite"], json!("Strict"), "{cookie}");
    assert_eq!(cookie["path"], json!("/debug/admin"), "{cookie}");
    let id = cookie["value"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 64, "32 random bytes, hex: {id}");

    // Cancel leaves the node alone.
    browser.click_on("button#shutdown", WAIT).await;
    browser.click_on("#shutdown-form .cancel", WAIT).await;
    assert!(agent.try_exit().is_none(), "Cancel shuts nothing down");

    let old = agent.worker_pid().await;
    let result = press(&browser, "restart").await;
    assert!(
        result.starts_with("200") && result.contains("\"succeeded\""),
        "restart from the page: {result}"
    );
    assert_ne!(agent.serving_worker().await, old, "a new worker serves");
    browser.screenshot("agent-admin-logged-in.png").await;

    // Log out: back to the login form, the cookie gone, the session gone server-side.
    browser.click_on("button#logout", WAIT).await;
    browser.wait_for("input[name=token]", WAIT).await;
    assert!(
        session_cookie(&browser.cookies().await).is_none(),
        "the cookie is cleared"
    );
    let replay = http_send(
        agent.control(),
        Method::GET,
        "/debug/admin/status",
        &[("cookie", format!("fleet_admin={id}"))],
        "",
    )
    .await
    .unwrap_or_else(|e| agent.fail(&e));
    assert_eq!(replay.status, 401, "the old session id opens nothing");

    log_in(&browser, &agent).await;
    let result = press(&browser, "shutdown").await;
    assert!(
        result.starts_with("200") && result.contains("shutting_down"),
        "shut down from the page: {result}"
    );
    let status = agent.wait_exit(WAIT).await;
    assert!(status.success(), "the node shut down gracefully: {status}");
}
