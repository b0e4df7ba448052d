//! Pictures, server-rendered as inline SVG (no script, no library, no CDN; colours
//! come from classes in `dashboard.css`, so the page's CSP needs no inline style):
//! the distribution of handoff and drain times as a histogram, and a rollout's
//! timeline (Gantt) of every node's restart and soak, batch by batch.
//!
//! Every chart carries its numbers as text too (a caption with the sample count and
//! percentiles, a `<title>` on every bar), so it is not colour or shape alone.

use maud::{Markup, html};

use super::view;
use crate::rollout::{NodeState, RolloutNode, RolloutView};

const WIDTH: u64 = 640;
const BINS: usize = 12;

/// A duration in microseconds as "12.3 ms" / "1.20 s".
pub fn micros(us: u64) -> String {
    if us < 1_000_000 {
        format!("{:.1} ms", us as f64 / 1000.0)
    } else {
        format!("{:.2} s", us as f64 / 1_000_000.0)
    }
}

/// The `p`-th percentile (nearest rank) of sorted samples.
fn percentile(sorted: &[u64], p: u64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p as usize * sorted.len()).div_ceil(100).max(1);
    sorted[rank.min(sorted.len()) - 1]
}

/// Histogram bins over [min, max]: (low, high, count), `BINS` of them at most.
fn bins(sorted: &[u64]) -> Vec<(u64, u64, usize)> {
    let (Some(&lo), Some(&hi)) = (sorted.first(), sorted.last()) else {
        return Vec::new();
    };
    let n = BINS.min(sorted.len()).max(1) as u64;
    let width = ((hi - lo) / n + 1).max(1);
    let mut out: Vec<(u64, u64, usize)> = (0..n)
        .map(|i| (lo + i * width, lo + (i + 1) * width, 0))
        .collect();
    for &s in sorted {
        let i = (((s - lo) / width) as usize).min(out.len() - 1);
        out[i].2 += 1;
    }
    out
}

/// A histogram of durations (µs). `id` names the figure for tests and links;
/// `samples` of 0 (not measured) are left out and said so.
pub fn histogram(id: &str, title: &str, samples: &[u64]) -> Markup {
    let mut sorted: Vec<u64> = samples.iter().copied().filter(|&s| s > 0).collect();
    sorted.sort_unstable();
    let unmeasured = samples.len() - sorted.len();
    let bins = bins(&sorted);
    let most = bins.iter().map(|b| b.2).max().unwrap_or(0).max(1);
    let (top, plot_h, bottom) = (10u64, 120u64, 34u64);
    let height = top + plot_h + bottom;
    let left = 36u64;
    let bar_w = if bins.is_empty() {
        0
    } else {
        (WIDTH - left - 10) / bins.len() as u64
    };
    html! {
        figure.chart #(id) data-samples=(sorted.len()) {
            figcaption {
                strong { (title) } " — "
                @if sorted.is_empty() {
                    "no samples yet"
                } @else {
                    (sorted.len()) " sample" @if sorted.len() != 1 { "s" }
                    ": median " (micros(percentile(&sorted, 50)))
                    ", p90 " (micros(percentile(&sorted, 90)))
                    ", max " (micros(*sorted.last().unwrap_or(&0)))
                }
                @if unmeasured > 0 { " (" (unmeasured) " not measured)" }
            }
            @if !sorted.is_empty() {
                svg role="img" aria-label=(title) viewBox={ "0 0 " (WIDTH) " " (height) }
                    width=(WIDTH) height=(height) xmlns="http://www.w3.org/2000/svg" {
                    line.axis x1=(left) y1=(top + plot_h) x2=(WIDTH - 10) y2=(top + plot_h) {}
                    line.axis x1=(left) y1=(top) x2=(left) y2=(top + plot_h) {}
                    text.tick x=(left - 4) y=(top + 8) text-anchor="end" { (most) }
                    text.tick x=(left - 4) y=(top + plot_h) text-anchor="end" { "0" }
                    @for (i, (lo, hi, count)) in bins.iter().enumerate() {
                        @let h = (*count as u64 * plot_h) / most as u64;
                        @let x = left + i as u64 * bar_w;
                        rect.bar x=(x + 1) y=(top + plot_h - h) width=(bar_w.saturating_sub(2).max(1)) height=(h)
                            data-count=(count) {
                            title { (count) " restart" @if *count != 1 { "s" } " between " (micros(*lo)) " and " (micros(*hi)) }
                        }
                    }
                    @if let (Some(first), Some(last)) = (bins.first(), bins.last()) {
                        text.tick x=(left) y=(top + plot_h + 14) { (micros(first.0)) }
                        text.tick x=(WIDTH - 10) y=(top + plot_h + 14) text-anchor="end" { (micros(last.1)) }
                    }
                    text.tick x=((WIDTH + left) / 2) y=(height - 4) text-anchor="middle" { "duration (restarts per bin)" }
                }
            }
        }
    }
}

/// Restarts across the fleet whose handoff times the nodes page charts.
pub const FLEET_SAMPLES: usize = 200;

/// The nodes page's chart: handoff times of the fleet's last [`FLEET_SAMPLES`]
/// successful restarts.
pub fn fleet_handoffs(fleet: &crate::fleet::Fleet) -> Markup {
    match fleet.history.recent(FLEET_SAMPLES) {
        Ok(recent) => {
            let samples: Vec<u64> = recent
                .iter()
                .filter(|r| r.kind == "restart" && r.outcome == "succeeded")
                .map(|r| r.handoff_us)
                .collect();
            html! {
                section aria-label="Handoff times" {
                    h2 { "Handoff times" }
                    p.note { "Trigger → READY over the fleet's last " (FLEET_SAMPLES) " restarts the controller asked for." }
                    (histogram("fleet-handoff-chart", "Handoff time across the fleet", &samples))
                }
            }
        }
        Err(e) => {
            html! { p.flash.error { "The restart history cannot be read: " (e.to_string()) } }
        }
    }
}

/// A bar's start and end, Unix ms.
type Span = (u64, u64);

/// Start and end (Unix ms) of the first `from` entry in a node's timeline, ended by
/// the first later entry in another state.
fn span(n: &RolloutNode, from: NodeState) -> Option<(u64, u64)> {
    let start = n.timeline.iter().position(|t| t.state == from)?;
    let end = n.timeline[start + 1..]
        .iter()
        .find(|t| t.state != from)
        .map(|t| t.unix_ms);
    Some((n.timeline[start].unix_ms, end.unwrap_or(0)))
}

/// The most nodes the timeline draws (one row of 18 px each) unless all are asked for:
/// a rollout of 100,000 nodes would be a picture 1.8 million pixels high.
pub const TIMELINE_ROWS: usize = 1_000;

/// A rollout's timeline: one row per node, in batch order (then by start), a bar for
/// its restart (trigger → READY) and one for its soak, on one time axis; the first
/// [`TIMELINE_ROWS`] rows unless `all`.
pub fn rollout_timeline(v: &RolloutView, now_ms: u64, all: bool) -> Markup {
    let start = v.rollout.created_unix_ms;
    let end = if v.rollout.finished_unix_ms > 0 {
        v.rollout.finished_unix_ms
    } else {
        now_ms
    };
    let mut rows: Vec<(&RolloutNode, Option<Span>, Option<Span>)> = v
        .nodes
        .iter()
        .map(|n| {
            let fill = |s: Option<(u64, u64)>| s.map(|(a, b)| (a, if b == 0 { end } else { b }));
            (
                n,
                fill(span(n, NodeState::Restarting)),
                fill(span(n, NodeState::Soaking)),
            )
        })
        .collect();
    rows.sort_by_key(|(n, r, _)| {
        (
            n.batch,
            r.map(|r| r.0).unwrap_or(u64::MAX),
            n.node_id.clone(),
        )
    });
    let nodes = rows.len();
    if !all {
        rows.truncate(TIMELINE_ROWS);
    }
    let total = end.saturating_sub(start).max(1);
    let (left, right, row_h, top) = (130u64, 10u64, 18u64, 8u64);
    let plot_w = WIDTH - left - right;
    let x = |t: u64| left + (t.saturating_sub(start).min(total) * plot_w) / total;
    let height = top + rows.len() as u64 * row_h + 30;
    html! {
        figure.chart #timeline data-rows=(rows.len()) {
            figcaption {
                strong { "Timeline" } " — each node's restart "
                span.key.key-restart { "■" } " and soak " span.key.key-soak { "■" }
                " over " (view::millis(total)) ", batch by batch"
                @if rows.len() < nodes {
                    " — the first " (rows.len()) " of " (nodes) " nodes ("
                    a href="?all=1#timeline" { "show all" } ")"
                }
            }
            @if rows.is_empty() {
                p { "No node in this rollout." }
            } @else {
                svg role="img" aria-label="Rollout timeline" viewBox={ "0 0 " (WIDTH) " " (height) }
                    width=(WIDTH) height=(height) xmlns="http://www.w3.org/2000/svg" {
                    @for (i, (n, restart, soak)) in rows.iter().enumerate() {
                        @let y = top + i as u64 * row_h;
                        @let new_batch = i == 0 || rows[i - 1].0.batch != n.batch;
                        g.gantt-row data-node=(n.node_id) data-batch=(n.batch + 1) data-state=(n.state.as_str()) {
                            @if new_batch && i > 0 {
                                line.batch-sep x1="0" y1=(y) x2=(WIDTH) y2=(y) {}
                            }
                            text.tick x="2" y=(y + 13) { "B" (n.batch + 1) " " (n.node_id.chars().take(16).collect::<String>()) }
                            @if let Some((a, b)) = restart {
                                rect class={ "gantt-restart" @if n.state == NodeState::Failed { " gantt-failed" } }
                                    x=(x(*a)) y=(y + 3) width=((x(*b) - x(*a)).max(2)) height=(row_h - 6) {
                                    title { (n.node_id) ": restart " (view::millis(b - a)) }
                                }
                            }
                            @if let Some((a, b)) = soak {
                                rect.gantt-soak x=(x(*a)) y=(y + 3) width=((x(*b) - x(*a)).max(2)) height=(row_h - 6) {
                                    title { (n.node_id) ": soak " (view::millis(b - a)) }
                                }
                            }
                        }
                    }
                    @let axis_y = top + rows.len() as u64 * row_h + 4;
                    line.axis x1=(left) y1=(axis_y) x2=(WIDTH - right) y2=(axis_y) {}
                    text.tick x=(left) y=(axis_y + 16) { "0" }
                    text.tick x=(WIDTH - right) y=(axis_y + 16) text-anchor="end" { (view::millis(total)) }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_bins_count_every_sample() {
        let s: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&s, 50), 50);
        assert_eq!(percentile(&s, 90), 90);
        let b = bins(&s);
        assert_eq!(b.iter().map(|b| b.2).sum::<usize>(), 100);
        assert!(b.len() <= BINS);
        assert_eq!(bins(&[7, 7, 7]).iter().map(|b| b.2).sum::<usize>(), 3);
        assert!(bins(&[]).is_empty());
    }

    #[test]
    fn a_histogram_says_its_sample_count_and_leaves_out_unmeasured() {
        let html = histogram("h", "Handoff", &[1000, 2000, 0, 3000]).into_string();
        assert!(html.contains(r#"data-samples="3""#), "{html}");
        assert!(html.contains("1 not measured"), "{html}");
        let counts: usize = html
            .match_indices("data-count=\"")
            .map(|(i, _)| {
                let rest = &html[i + 12..];
                rest[..rest.find('"').unwrap()].parse::<usize>().unwrap()
            })
            .sum();
        assert_eq!(counts, 3);
        assert!(
            histogram("h", "Handoff", &[])
                .into_string()
                .contains("no samples yet")
        );
    }
}
