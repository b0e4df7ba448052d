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
//! through WebDriver and loads `/nodes` `--rounds` times. Each load is measured by the
//! browser itself (Navigation Timing: navigation start → `load` event, and the
//! server's part, request → last byte). The peer, measured in the same run, is the
//! same page filtered to one tenth of the fleet (`label=shard=0`). Target: the full
//! page loads in under 1 s (median). Exit status: 0 target met, 1 missed, 2 could not
//! run, 130 interrupted.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use clap::Parser;
use fleet_tests::bench::child::sibling_exe;
use fleet_tests::bench::controller::start_controller;
use fleet_tests::browser::Browser;
use fleet_tests::hollow::{HollowConfig, HollowFleet, nofile_needed, raise_nofile};

const TARGET_LOAD: Duration = Duration::from_secs(1);

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
    /// Rows in the nodes table.
    rows: u64,
    /// Bytes of the HTML document.
    bytes: u64,
}

async fn run(args: Args) -> anyhow::Result<bool> {
    if args.count == 0 || args.rounds == 0 {
        bail!("--count and --rounds must be at least 1");
    }
    raise_nofile(nofile_needed(args.count))?;
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
    let full = measure(&browser, &format!("{url}/nodes"), args.rounds).await;
    let tenth = measure(
        &browser,
        &format!("{url}/nodes?label=shard%3D0"),
        args.rounds,
    )
    .await;
    fleet.shutdown().await;

    let median = |loads: &[Load], f: fn(&Load) -> f64| {
        let mut v: Vec<f64> = loads.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let max = |loads: &[Load]| loads.iter().map(|l| l.total).fold(0.0, f64::max);
    println!(
        "dashboard-bench: nodes page in headless Chromium, {} loads each",
        args.rounds
    );
    println!("| page | rows | HTML | load, median | load, max | server+transfer, median |");
    println!("|---|---|---|---|---|---|");
    for (name, loads) in [("/nodes", &full), ("/nodes?label=shard=0 (peer)", &tenth)] {
        println!(
            "| {name} | {} | {} kB | {:.0} ms | {:.0} ms | {:.0} ms |",
            loads[0].rows,
            loads[0].bytes / 1024,
            median(loads, |l| l.total),
            max(loads),
            median(loads, |l| l.server)
        );
    }
    let full_ms = median(&full, |l| l.total);
    println!(
        "ratio full / tenth (median load): {:.2}",
        full_ms / median(&tenth, |l| l.total)
    );
    let met = full_ms < TARGET_LOAD.as_secs_f64() * 1000.0 && full[0].rows as usize == args.count;
    println!(
        "target: {} nodes page loads in < {} ms: {} ({full_ms:.0} ms, {} rows)",
        args.count,
        TARGET_LOAD.as_millis(),
        if met { "met" } else { "MISSED" },
        full[0].rows
    );
    drop(controller);
    Ok(met)
}

/// Load `url` `rounds` times (after one warm-up) and read the browser's timings.
async fn measure(browser: &Browser, url: &str, rounds: usize) -> Vec<Load> {
    let mut loads = Vec::with_capacity(rounds);
    for round in 0..=rounds {
        browser.goto(url).await;
        let v = browser
            .wait_until(
                "the navigation timing is complete",
                "var n = performance.getEntriesByType('navigation')[0];\
                 if (!n || n.loadEventEnd === 0) return null;\
                 return {total: n.loadEventEnd - n.startTime, server: n.responseEnd - n.requestStart,\
                   bytes: n.decodedBodySize,\
                   rows: document.querySelectorAll('table#nodes tbody tr[data-node]').length};",
                Duration::from_secs(30),
            )
            .await;
        if round == 0 {
            continue; // warm-up: caches, the first connection
        }
        let num = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        loads.push(Load {
            total: num("total"),
            server: num("server"),
            rows: v["rows"].as_u64().unwrap_or(0),
            bytes: v["bytes"].as_u64().unwrap_or(0),
        });
    }
    loads
}
