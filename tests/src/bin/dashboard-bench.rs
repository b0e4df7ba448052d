//! `dashboard-bench`: how long the dashboard's nodes page takes in a real browser
//! with a fleet of 1,000 nodes.
//!
//! ```text
//! cargo build --release --workspace --bins && target/release/dashboard-bench
//! ```
//!
//! It starts `fleet-controller` (next to its own executable) on a free loopback port,
//! registers `--count` hollow agents with it (`fleet_tests::hollow`: real
//! AgentService and heartbeats, no processes behind them), opens headless Chromium
//! through WebDriver and loads `/nodes` (its first page: 200 rows, and the counts of
//! the whole fleet) `--rounds` times. Each load is measured by the
//! browser itself (Navigation Timing: navigation start → `load` event, and the
//! server's part, request → last byte) and by the first frame the browser produces
//! after `load` (an upper bound on when the first screen of rows is painted: it also
//! holds one WebDriver round trip). The peer, measured in the same run, is the same
//! page filtered to one tenth of the fleet (`label=shard=0`). Then it rolls a new
//! executable across the whole fleet (batches `1,10%,50%,100%`) and times the page of
//! the finished rollout, one row per node. Screenshots of both pages go to
//! `target/test-artifacts/` (`FLEET_TEST_ARTIFACTS`). Target: the full nodes page
//! loads in under 1 s (median). Exit status: 0 target met, 1 missed, 2 could not run,
//! 130 interrupted.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Parser;
use fleet_proto::v1 as pb;
use fleet_proto::v1::controller_service_client::ControllerServiceClient;
use fleet_tests::bench::OutputFormat;
use fleet_tests::bench::child::sibling_exe;
use fleet_tests::bench::controller::start_controller;
use fleet_tests::bench::stats::{Verdict, verdict};
use fleet_tests::browser::Browser;
use fleet_tests::hollow::{HollowConfig, HollowFleet, fake_sha256, nofile_needed, raise_nofile};
use serde_json::json;

const TARGET_LOAD: Duration = Duration::from_secs(1);
/// Rows on one page of the dashboard's nodes table (`PAGE_ROWS` in
/// controller/src/dashboard/nodes.rs): the rest are on the next pages.
const PAGE_ROWS: usize = 200;
/// The executable the rollout moves the hollow fleet to (nothing runs it).
const NEW_EXE: &str = "/opt/app-v2";
/// How long the rollout of the hollow fleet may take.
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Parser)]
#[command(
    name = "dashboard-bench",
    about = "Time the dashboard's nodes page in headless Chromium with N hollow agents"
)]
struct Args {
    /// Hollow agents registered with the controller.
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// Page loads of each page measured.
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = OutputFormat::Text)]
    output: OutputFormat,
}

fn main() -> ExitCode {
    let args = Args::parse();
    fleet_tests::bench::main("dashboard-bench", run(args))
}

/// One page load as the browser timed it, in ms.
#[derive(Debug, Clone, Copy)]
struct Load {
    /// Navigation start → end of the `load` event.
    total: f64,
    /// Request sent → last byte of the response (server time plus transfer).
    server: f64,
    /// Navigation start → the first frame after `load` (performance.now() in a
    /// requestAnimationFrame callback run right after the navigation returned).
    frame: f64,
    /// Rows of the page's table(s).
    rows: u64,
    /// Bytes of the HTML document.
    bytes: u64,
}

async fn run(args: Args) -> anyhow::Result<bool> {
    if args.count == 0 || args.rounds == 0 {
        bail!("--count and --rounds must be at least 1");
    }
    raise_nofile(nofile_needed(args.count, 0))?;
    let db = tempfile::Builder::new()
        .prefix("dashboard-bench")
        .tempdir()?;
    let exe = sibling_exe("fleet-controller")?;
    let controller =
        start_controller(&exe, &db.path().join("fleet.db"), Duration::from_secs(10)).await?;
    let url = format!("http://{}", controller.addr);
    eprintln!(
        "dashboard-bench: controller at {url}; registering {} hollow agents",
        args.count
    );
    let fleet = HollowFleet::start(HollowConfig {
        count: args.count,
        controller: Some(url.clone()),
        ..HollowConfig::default()
    })
    .await?;
    fleet
        .wait_registered(
            Some(Duration::from_secs(120)),
            Duration::from_secs(5),
            |s| eprintln!("dashboard-bench: {s:?}"),
        )
        .await?;

    let browser = Browser::start(1280, 900).await;
    let nodes_rows = "table#nodes tbody tr[data-node]";
    let full = measure(&browser, &format!("{url}/nodes"), nodes_rows, args.rounds).await;
    browser.screenshot("dashboard-bench-nodes.png").await;
    let tenth = measure(
        &browser,
        &format!("{url}/nodes?label=shard%3D0"),
        nodes_rows,
        args.rounds,
    )
    .await;
    let rollout = roll_out(controller.addr, args.count).await?;
    let rollout_page = measure(
        &browser,
        &format!("{url}/rollouts/{rollout}"),
        "tr[data-phase]",
        args.rounds,
    )
    .await;
    browser.screenshot("dashboard-bench-rollout.png").await;
    fleet.shutdown().await;

    let pages = [
        ("/nodes", &full),
        ("/nodes?label=shard=0 (peer)", &tenth),
        ("/rollouts/ID (finished, every node)", &rollout_page),
    ];
    let full_ms = median(&full, |l| l.total);
    let ratio = full_ms / median(&tenth, |l| l.total);
    let verdicts = [
        verdict(
            full_ms < TARGET_LOAD.as_secs_f64() * 1000.0,
            format!(
                "{} nodes page loads in < {} ms (median)",
                args.count,
                TARGET_LOAD.as_millis()
            ),
            format!("{full_ms:.0} ms"),
        ),
        verdict(
            full[0].rows as usize == args.count.min(PAGE_ROWS),
            format!(
                "the nodes page shows its first {} nodes",
                args.count.min(PAGE_ROWS)
            ),
            format!("{} rows", full[0].rows),
        ),
    ];
    let met = verdicts.iter().all(|v| v.pass);
    match args.output {
        OutputFormat::Json => {
            let page = |(name, loads): (&str, &Vec<Load>)| {
                json!({
                    "page": name,
                    "rows": loads[0].rows,
                    "html_bytes": loads[0].bytes,
                    "load_ms": {"median": median(loads, |l| l.total), "max": loads.iter().map(|l| l.total).fold(0.0, f64::max)},
                    "first_frame_ms": median(loads, |l| l.frame),
                    "server_ms": median(loads, |l| l.server),
                })
            };
            let out = json!({
                "bench": "dashboard-bench",
                "nodes": args.count,
                "rounds": args.rounds,
                "pages": pages.map(page),
                "ratio_full_to_tenth": ratio,
                "verdicts": verdicts.iter().map(Verdict::json).collect::<Vec<_>>(),
                "pass": met,
            });
            println!("{out:#}");
        }
        OutputFormat::Text => {
            println!(
                "dashboard-bench: pages in headless Chromium at 1280x900, {} loads each (medians unless said)",
                args.rounds
            );
            println!(
                "| page | rows | HTML | load | load, max | first frame after load | server+transfer |"
            );
            println!("|---|---|---|---|---|---|---|");
            for (name, loads) in pages {
                println!(
                    "| {name} | {} | {} kB | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms |",
                    loads[0].rows,
                    loads[0].bytes / 1024,
                    median(loads, |l| l.total),
                    loads.iter().map(|l| l.total).fold(0.0, f64::max),
                    median(loads, |l| l.frame),
                    median(loads, |l| l.server)
                );
            }
            println!("ratio full / tenth (median load): {ratio:.2}");
            println!();
            println!("== Verdicts ==");
            for v in &verdicts {
                println!("{v}");
            }
        }
    }
    drop(controller);
    Ok(met)
}

fn median(loads: &[Load], f: fn(&Load) -> f64) -> f64 {
    let mut v: Vec<f64> = loads.iter().map(f).collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Rolls [`NEW_EXE`] across the whole hollow fleet and waits for it to succeed;
/// returns the rollout's id.
async fn roll_out(addr: std::net::SocketAddr, count: usize) -> anyhow::Result<String> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy();
    let mut api = ControllerServiceClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let spec = pb::RolloutSpec {
        exe: NEW_EXE.into(),
        sha256: fake_sha256(NEW_EXE),
        batches: "1,10%,50%,100%".into(),
        max_failures: "100%".into(),
        reason: "dashboard-bench".into(),
        actor: "dashboard-bench".into(),
        // No soak, as measured before the controller's 10 s default existed.
        min_healthy_set: true,
        ..Default::default()
    };
    let started = api
        .start_rollout(spec)
        .await
        .context("StartRollout")?
        .into_inner();
    eprintln!(
        "dashboard-bench: rollout {} of {count} nodes started",
        started.id
    );
    let deadline = std::time::Instant::now() + ROLLOUT_TIMEOUT;
    let mut stream = api
        .watch_rollout(pb::GetRolloutRequest {
            id: started.id.clone(),
            ..Default::default()
        })
        .await
        .context("WatchRollout")?
        .into_inner();
    loop {
        let remaining = deadline.saturating_duration_since(std::time::Instant::now());
        let r = match tokio::time::timeout(remaining, stream.message()).await {
            Err(_) => bail!(
                "rollout {} did not finish within {ROLLOUT_TIMEOUT:?}",
                started.id
            ),
            Ok(m) => m
                .context("WatchRollout")?
                .with_context(|| format!("the watch of rollout {} ended early", started.id))?,
        };
        match r.state.as_str() {
            "succeeded" => return Ok(r.id),
            "failed" | "rolled-back" | "aborted" => {
                bail!("rollout {} ended {}: {}", r.id, r.state, r.reason)
            }
            _ => {}
        }
    }
}

/// Load `url` `rounds` times (after one warm-up) and read the browser's timings;
/// `rows` selects the rows counted.
async fn measure(browser: &Browser, url: &str, rows: &str, rounds: usize) -> Vec<Load> {
    let mut loads = Vec::with_capacity(rounds);
    let timing = format!(
        "var n = performance.getEntriesByType('navigation')[0];\
         if (!n || n.loadEventEnd === 0) return null;\
         return {{total: n.loadEventEnd - n.startTime, server: n.responseEnd - n.requestStart,\
           bytes: n.decodedBodySize, rows: document.querySelectorAll({rows:?}).length}};"
    );
    for round in 0..=rounds {
        // WebDriver returns once the page has loaded; the next frame is then at most
        // one round trip away.
        browser.goto(url).await;
        let frame = browser
            .execute_async(
                "var done = arguments[arguments.length - 1];\
                 requestAnimationFrame(function () { done(performance.now()); });",
                serde_json::json!([]),
            )
            .await;
        let v = browser
            .wait_until(
                "the navigation timing is complete",
                &timing,
                Duration::from_secs(30),
            )
            .await;
        if round == 0 {
            continue; // warm-up: caches, the first connection
        }
        let num = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        loads.push(Load {
            total: num("total"),
            frame: frame.as_f64().unwrap_or(f64::NAN),
            server: num("server"),
            rows: v["rows"].as_u64().unwrap_or(0),
            bytes: v["bytes"].as_u64().unwrap_or(0),
        });
    }
    loads
}
