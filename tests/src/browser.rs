//! A real headless Chromium, driven through W3C WebDriver, for the dashboard tests.
//!
//! [`Browser::start`] runs Debian's `chromedriver --port=0` in its own process group
//! (Chromium and its helpers inherit it), reads back the port it chose, and opens a
//! session with a fresh profile in a temp dir. Each command is one HTTP request on
//! a fresh loopback connection (the harness's one-shot client): the protocol needs
//! nothing more, and a crate such as fantoccini would bring a second copy of `http`,
//! `hyper` and the ICU tables into the build. Waits poll the page with a deadline;
//! dropping the [`Browser`] ends the session and kills the whole process group.
//!
//! Screenshots go to [`artifacts_dir`] (`target/test-artifacts/`, or
//! `FLEET_TEST_ARTIFACTS`), where CI can pick them up.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ::http::Method;
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::harness::http_send;

/// Where Debian's packages put them (`apt-get install chromium chromium-driver`).
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";
/// The key under which WebDriver returns an element reference.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";
/// How long chromedriver and a new session may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How often [`Browser::wait_for`] and [`Browser::wait_until`] look again.
const POLL: Duration = Duration::from_millis(50);

/// An element of the current page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element(String);

/// A WebDriver error: its code (`no such element`, ...) and message.
#[derive(Debug, Clone)]
pub struct WebDriverError {
    pub error: String,
    pub message: String,
}

impl std::fmt::Display for WebDriverError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.error, self.message)
    }
}

/// A headless Chromium with one WebDriver session.
#[derive(Debug)]
pub struct Browser {
    driver: Child,
    port: u16,
    session: String,
    profile: TempDir,
}

/// The directory test artifacts (screenshots) are written to, created if missing:
/// `$FLEET_TEST_ARTIFACTS`, else `target/test-artifacts` of this workspace.
pub fn artifacts_dir() -> PathBuf {
    let dir = std::env::var_os("FLEET_TEST_ARTIFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let exe = std::env::current_exe().expect("current_exe");
            // Tests run from target/<profile>/deps/, benchmarks from target/<profile>/.
            let target = exe
                .ancestors()
                .find(|d| d.file_name().is_some_and(|n| n == "target"))
                .or_else(|| exe.ancestors().nth(3))
                .expect("the executable lives under a cargo target directory");
            target.join("test-artifacts")
        });
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("create the artifacts dir {}: {e}", dir.display()));
    dir
}

impl Browser {
    /// Start chromedriver and a headless Chromium session with a `width`×`height`
    /// window; panics with what to install when either is missing.
    pub async fn start(width: u32, height: u32) -> Browser {
        for (path, package) in [(CHROMEDRIVER, "chromium-driver"), (CHROMIUM, "chromium")] {
            assert!(
                Path::new(path).is_file(),
                "{path} is missing: install it with `apt-get install -y {package}` (.ci/run does)"
            );
        }
        let profile = tempfile::Builder::new()
            .prefix("fleet-chromium")
            .tempdir()
            .expect("create a temp dir for the browser profile");
        let (driver, port) = spawn_driver();
        let mut browser = Browser {
            driver,
            port,
            session: String::new(),
            profile,
        };
        let capabilities = json!({
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "pageLoadStrategy": "normal",
                    "goog:chromeOptions": {
                        "binary": CHROMIUM,
                        "args": [
                            "--headless=new",
                            // Root in a container: Chromium's sandbox needs user namespaces
                            // it may not get; the pages are our own, on loopback.
                            "--no-sandbox",
                            "--disable-gpu",
                            "--disable-dev-shm-usage",
                            "--disable-background-networking",
                            "--disable-component-update",
                            "--disable-sync",
                            "--disable-extensions",
                            "--no-first-run",
                            "--no-default-browser-check",
                            format!("--user-data-dir={}", browser.profile.path().display()),
                            format!("--window-size={width},{height}"),
                        ],
                    },
                },
            },
        });
        let started = Instant::now();
        let value = loop {
            match browser
                .call(Method::POST, "/session", capabilities.clone())
                .await
            {
                Ok(v) => break v,
                // chromedriver can print its port a moment before it accepts.
                Err(e) if started.elapsed() < START_TIMEOUT && e.error == "connect" => {
                    tokio::time::sleep(POLL).await
                }
                Err(e) => panic!("WebDriver could not start Chromium: {e}"),
            }
        };
        browser.session = value["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no sessionId in {value}"))
            .to_string();
        eprintln!(
            "[browser] Chromium {} under chromedriver {} (port {port})",
            value["capabilities"]["browserVersion"],
            browser.driver.id()
        );
        browser
            .call(
                Method::POST,
                &browser.path("/timeouts"),
                json!({"pageLoad": 30_000, "script": 30_000, "implicit": 0}),
            )
            .await
            .expect("set timeouts");
        browser
    }

    /// One WebDriver command: its `value`, or the error it answered with.
    async fn call(&self, method: Method, path: &str, body: Value) -> Result<Value, WebDriverError> {
        let addr = ([127, 0, 0, 1], self.port).into();
        let body = if method == Method::GET || method == Method::DELETE {
            Vec::new()
        } else {
            body.to_string().into_bytes()
        };
        let headers = [(
            "content-type",
            "application/json; charset=utf-8".to_string(),
        )];
        let response = http_send(addr, method, path, &headers, body)
            .await
            .map_err(|message| WebDriverError {
                error: if message.contains("connect:") {
                    "connect".into()
                } else {
                    "transport".into()
                },
                message,
            })?;
        let parsed: Value = serde_json::from_slice(&response.body).map_err(|e| WebDriverError {
            error: "bad response".into(),
            message: format!("{e}: {}", response.text()),
        })?;
        let value = parsed.get("value").cloned().unwrap_or(Value::Null);
        if response.status.is_success() {
            Ok(value)
        } else {
            Err(WebDriverError {
                error: value["error"].as_str().unwrap_or("unknown error").into(),
                message: value["message"].as_str().unwrap_or_default().into(),
            })
        }
    }

    /// A command that must succeed; panics with the page's URL otherwise.
    async fn must(&self, method: Method, path: &str, body: Value) -> Value {
        let what = format!("{method} {path}");
        match self.call(method, path, body).await {
            Ok(v) => v,
            Err(e) => {
                let url = self
                    .call(Method::GET, &self.path("/url"), Value::Null)
                    .await;
                panic!("WebDriver {what} failed: {e} (page: {url:?})")
            }
        }
    }

    fn path(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    /// Load `url` and wait until the page has loaded.
    pub async fn goto(&self, url: &str) {
        self.must(Method::POST, &self.path("/url"), json!({ "url": url }))
            .await;
    }

    /// The URL of the current page.
    pub async fn url(&self) -> String {
        let v = self
            .must(Method::GET, &self.path("/url"), Value::Null)
            .await;
        v.as_str().unwrap_or_default().to_string()
    }

    /// The first element matching the CSS selector, if any.
    pub async fn find(&self, css: &str) -> Option<Element> {
        let body = json!({"using": "css selector", "value": css});
        match self.call(Method::POST, &self.path("/element"), body).await {
            Ok(v) => Some(element(&v)),
            Err(e) if e.error == "no such element" => None,
            Err(e) => panic!("find {css:?}: {e}"),
        }
    }

    /// Every element matching the CSS selector.
    pub async fn find_all(&self, css: &str) -> Vec<Element> {
        let body = json!({"using": "css selector", "value": css});
        let v = self.must(Method::POST, &self.path("/elements"), body).await;
        v.as_array()
            .map(|a| a.iter().map(element).collect())
            .unwrap_or_default()
    }

    /// The first element matching `css`, waiting up to `timeout` for it to appear.
    pub async fn wait_for(&self, css: &str, timeout: Duration) -> Element {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.find(css).await {
                return e;
            }
            if Instant::now() > deadline {
                self.fail(&format!("no element {css:?} within {timeout:?}"))
                    .await;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Wait until `condition` (JavaScript returning a value; `arguments` are
    /// `args`) is truthy, and return its value.
    pub async fn wait_until(&self, what: &str, script: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        let mut last;
        loop {
            last = self.execute(script, json!([])).await;
            let truthy = match &last {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::String(s) => !s.is_empty(),
                Value::Number(n) => n.as_f64() != Some(0.0),
                _ => true,
            };
            if truthy {
                return last;
            }
            if Instant::now() > deadline {
                self.fail(&format!(
                    "{what}: not within {timeout:?} (last value {last})"
                ))
                .await;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Run `script` (a function body; `arguments` are `args`) in the page and return
    /// what it returns.
    pub async fn execute(&self, script: &str, args: Value) -> Value {
        self.must(
            Method::POST,
            &self.path("/execute/sync"),
            json!({"script": script, "args": args}),
        )
        .await
    }

    /// Run `script`, which calls `arguments[arguments.length - 1](result)` when done
    /// (for promises such as `fetch`), and return the result.
    pub async fn execute_async(&self, script: &str, args: Value) -> Value {
        self.must(
            Method::POST,
            &self.path("/execute/async"),
            json!({"script": script, "args": args}),
        )
        .await
    }

    /// The rendered text of an element.
    pub async fn text(&self, e: &Element) -> String {
        let v = self
            .must(
                Method::GET,
                &self.path(&format!("/element/{}/text", e.0)),
                Value::Null,
            )
            .await;
        v.as_str().unwrap_or_default().to_string()
    }

    /// The text of the first element matching `css`; panics if there is none. Read
    /// in one step inside the page, so a live region swapped meanwhile cannot leave
    /// a stale reference behind.
    pub async fn text_of(&self, css: &str) -> String {
        let script = "var e = document.querySelector(arguments[0]); return e ? e.innerText : null;";
        match self.execute(script, json!([css])).await {
            Value::String(s) => s.trim().to_string(),
            _ => self.fail(&format!("no element {css:?}")).await,
        }
    }

    /// Attribute `name` of every element matching `css`, read in one step.
    pub async fn attrs_of(&self, css: &str, name: &str) -> Vec<Option<String>> {
        let script = "var n = arguments[1]; return Array.from(document.querySelectorAll(arguments[0]))\
                      .map(function (e) { return e.getAttribute(n); });";
        let v = self.execute(script, json!([css, name])).await;
        v.as_array()
            .map(|a| a.iter().map(|x| x.as_str().map(str::to_string)).collect())
            .unwrap_or_default()
    }

    /// An attribute of an element (`None` when it has none).
    pub async fn attr(&self, e: &Element, name: &str) -> Option<String> {
        let path = self.path(&format!("/element/{}/attribute/{name}", e.0));
        let v = self.must(Method::GET, &path, Value::Null).await;
        v.as_str().map(str::to_string)
    }

    /// Click an element (scrolled into view first, as a user would).
    pub async fn click(&self, e: &Element) {
        let path = self.path(&format!("/element/{}/click", e.0));
        self.must(Method::POST, &path, json!({})).await;
    }

    /// Click the first element matching `css`, waiting up to `timeout` for it; when
    /// a live region replaced it between finding and clicking, find it again.
    pub async fn click_on(&self, css: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let e = self.wait_for(css, timeout).await;
            let path = self.path(&format!("/element/{}/click", e.0));
            match self.call(Method::POST, &path, json!({})).await {
                Ok(_) => return,
                Err(err) if err.error == "stale element reference" && Instant::now() < deadline => {
                }
                Err(err) => self.fail(&format!("click {css:?}: {err}")).await,
            }
        }
    }

    /// Clear a form field and type `text` into it.
    pub async fn type_into(&self, e: &Element, text: &str) {
        let clear = self.path(&format!("/element/{}/clear", e.0));
        self.must(Method::POST, &clear, json!({})).await;
        let keys = self.path(&format!("/element/{}/value", e.0));
        self.must(Method::POST, &keys, json!({ "text": text }))
            .await;
    }

    /// The cookies of the current page, as WebDriver gives them (`name`, `value`,
    /// `httpOnly`, `sameSite`, ...).
    pub async fn cookies(&self) -> Vec<Value> {
        let v = self
            .must(Method::GET, &self.path("/cookie"), Value::Null)
            .await;
        v.as_array().cloned().unwrap_or_default()
    }

    /// Resize the window (CSS pixels of the outer window).
    pub async fn set_window_size(&self, width: u32, height: u32) {
        self.must(
            Method::POST,
            &self.path("/window/rect"),
            json!({"width": width, "height": height}),
        )
        .await;
    }

    /// Save a PNG of the viewport as `artifacts_dir()/name`; returns its path.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        use base64::Engine as _;
        let v = self
            .must(Method::GET, &self.path("/screenshot"), Value::Null)
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or_default())
            .expect("the screenshot is base64");
        assert!(png.starts_with(b"\x89PNG"), "the screenshot is not a PNG");
        let path = artifacts_dir().join(name);
        std::fs::write(&path, png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        eprintln!("[browser] screenshot {}", path.display());
        path
    }

    /// Panic with `message`, the page's URL and the text of its body.
    pub async fn fail(&self, message: &str) -> ! {
        let url = self
            .call(Method::GET, &self.path("/url"), Value::Null)
            .await;
        let body = self
            .call(
                Method::POST,
                &self.path("/execute/sync"),
                json!({"script": "return document.body ? document.body.innerText : ''", "args": []}),
            )
            .await;
        panic!(
            "{message}\n--- page {:?}:\n{}",
            url.unwrap_or_default(),
            body.ok()
                .and_then(|b| b.as_str().map(str::to_string))
                .unwrap_or_default()
        )
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // End the session politely (Chromium flushes and exits), then make sure: the
        // whole process group goes, chromedriver and every Chromium process with it.
        if !self.session.is_empty() {
            delete_session(self.port, &self.session);
        }
        let pgid = nix::unistd::Pid::from_raw(self.driver.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.driver.wait();
    }
}

fn element(v: &Value) -> Element {
    Element(
        v[ELEMENT_KEY]
            .as_str()
            .unwrap_or_else(|| panic!("not an element reference: {v}"))
            .to_string(),
    )
}

/// Run `chromedriver --port=0` in a new process group and read back its port. With
/// `--port=0` chromedriver picks a port on one address family and then binds the same
/// number on the other, which another process may hold by then ("IPv4 port not
/// available. Exiting..."): a driver that exits before saying its port is started
/// again, three times at most.
fn spawn_driver() -> (Child, u16) {
    const TRIES: usize = 3;
    for _ in 1..TRIES {
        if let Some(started) = try_spawn_driver(false) {
            return started;
        }
        eprintln!("[chromedriver] exited before it listened; starting it again");
    }
    try_spawn_driver(true).expect("the last try panics instead")
}

/// One start of chromedriver; None when it exited before saying its port (a panic
/// instead when `last`, or for anything else).
fn try_spawn_driver(last: bool) -> Option<(Child, u16)> {
    use std::os::unix::process::CommandExt as _;
    let mut child = Command::new(CHROMEDRIVER)
        .arg("--port=0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("run {CHROMEDRIVER}: {e}"));
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if !sent && let Some(rest) = line.split("started successfully on port ").nth(1) {
                let port = rest.trim_end_matches('.').trim().parse::<u16>().ok();
                let _ = tx.send(port);
                sent = true;
            }
            eprintln!("[chromedriver] {line}");
        }
    });
    match rx.recv_timeout(START_TIMEOUT) {
        Ok(Some(port)) => Some((child, port)),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) if !last => {
            let _ = child.wait();
            None
        }
        other => {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = child.wait();
            panic!("chromedriver did not say which port it listens on ({other:?})")
        }
    }
}

/// `DELETE /session/ID`, blocking (Drop cannot await), bounded to a few seconds.
fn delete_session(port: u16, session: &str) {
    use std::io::{Read as _, Write as _};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let request = format!(
        "DELETE /session/{session} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    );
    if stream.write_all(request.as_bytes()).is_ok() {
        let mut reply = Vec::new();
        let _ = stream.read_to_end(&mut reply);
    }
}
