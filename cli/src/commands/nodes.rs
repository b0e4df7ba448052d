//! `fleetctl nodes`: the matching nodes a page at a time (5,000 per call at most), so
//! neither the controller's answer nor fleetctl's memory grows with the fleet: a
//! table keeps only its cells, JSON is written as each page arrives. A controller from
//! before paging answers every node at once, without counts and without applying the
//! state filter: fleetctl then counts, filters and cuts the list itself.

use std::time::SystemTime;

use anyhow::Result;
use fleet_proto::v1::{ListNodesRequest, Node};

use crate::args::{DEFAULT_NODES_SHOWN, Format, NodesArgs};
use crate::client::Controller;
use crate::exit::Exit;
use crate::output::nodes::{JsonArray, NodesTable, Summary, left_out};
use crate::output::{emit, json};

/// `fleetctl nodes`
pub async fn nodes(mut controller: Controller, args: NodesArgs, format: Format) -> Result<Exit> {
    let state = args.state.as_deref();
    let request = ListNodesRequest {
        selector: args.selector.join(","),
        state: state.unwrap_or_default().to_string(),
        ..Default::default()
    };
    if args.summary {
        return summary(controller, request, state, format).await;
    }
    let wanted = match (args.all, args.limit, format) {
        (true, _, _) => None,
        (false, Some(n), _) => Some(n as usize),
        (false, None, Format::Table) => Some(DEFAULT_NODES_SHOWN as usize),
        (false, None, Format::Json) => None,
    };
    let mut pages = Pages {
        controller: &mut controller,
        request,
        page_size: args.page_size,
        left: wanted,
        state,
        done: false,
        summary: None,
    };
    match format {
        Format::Json => {
            let mut array = JsonArray::start(std::io::stdout())?;
            while let Some(page) = pages.next().await? {
                for n in &page {
                    array.push(&json::NodeJson::from(n))?;
                }
                if array.closed() {
                    break;
                }
            }
            array.finish()?;
        }
        Format::Table => {
            let mut table = NodesTable::new(SystemTime::now());
            while let Some(page) = pages.next().await? {
                for n in &page {
                    table.push(n);
                }
            }
            let summary = pages.summary.unwrap_or_default();
            let shown = table.len();
            if shown == 0 {
                eprintln!("{}", nothing(&args, &summary));
                return Ok(Exit::Success);
            }
            // More match than the table shows: the counts first, and how to see others.
            let more = summary.total > shown as u64;
            let mut text = String::new();
            if more {
                text.push_str(&summary.line(state));
                text.push('\n');
            }
            text.push_str(&table.render());
            emit(&text)?;
            if more {
                eprintln!("{}", left_out(shown, summary.total));
            }
        }
    }
    Ok(Exit::Success)
}

/// `fleetctl nodes --summary`: the counts only.
async fn summary(
    mut controller: Controller,
    mut request: ListNodesRequest,
    state: Option<&str>,
    format: Format,
) -> Result<Exit> {
    request.summary_only = true;
    let response = controller.list_nodes(request).await?;
    let summary = if counted(&response) {
        Summary::of(&response)
    } else {
        Summary::count(&response.nodes, state)
    };
    match format {
        Format::Json => emit(&json::to_string(&summary))?,
        Format::Table => emit(&summary.render(state))?,
    }
    Ok(Exit::Success)
}

/// Whether the controller counted (and paged): one from before paging sends nodes and
/// no counts. No node at all reads the same either way.
fn counted(response: &fleet_proto::v1::ListNodesResponse) -> bool {
    !response.counts_by_state.is_empty() || response.nodes.is_empty()
}

/// Why the table is empty.
fn nothing(args: &NodesArgs, summary: &Summary) -> String {
    if !summary.counts_by_state.is_empty() {
        // The selector matches nodes, none of them in the state asked for.
        return format!("no nodes: {}", summary.line(args.state.as_deref()));
    }
    if args.selector.is_empty() {
        return "no nodes: agents appear once they heartbeat (fleet-agent --controller URL)"
            .to_string();
    }
    format!("no nodes with labels {}", args.selector.join(","))
}

/// The listing, a page at a time.
struct Pages<'a> {
    controller: &'a mut Controller,
    /// The next page's request (its token set from the previous answer).
    request: ListNodesRequest,
    page_size: u32,
    /// Nodes still wanted; `None`: every one.
    left: Option<usize>,
    state: Option<&'a str>,
    done: bool,
    /// From the first answer.
    summary: Option<Summary>,
}

impl Pages<'_> {
    /// The next page; `None` once every node wanted has come.
    async fn next(&mut self) -> Result<Option<Vec<Node>>> {
        if self.done || self.left == Some(0) {
            return Ok(None);
        }
        self.request.page_size = match self.left {
            Some(left) => left.min(self.page_size as usize) as u32,
            None => self.page_size,
        };
        let response = self.controller.list_nodes(self.request.clone()).await?;
        let mut nodes = if counted(&response) {
            self.summary.get_or_insert_with(|| Summary::of(&response));
            // An empty page, or a token that does not move on, ends it too: a
            // misbehaving controller must not make fleetctl ask forever.
            self.done = response.next_page_token.is_empty()
                || response.nodes.is_empty()
                || response.next_page_token == self.request.page_token;
            self.request.page_token = response.next_page_token;
            response.nodes
        } else {
            // Every node the selector matches, in one answer.
            self.summary
                .get_or_insert_with(|| Summary::count(&response.nodes, self.state));
            self.done = true;
            let state = self.state;
            let mut nodes = response.nodes;
            nodes.retain(|n| state.is_none_or(|s| s == n.state));
            nodes
        };
        if let Some(left) = &mut self.left {
            nodes.truncate(*left);
            *left -= nodes.len();
        }
        Ok(Some(nodes))
    }
}
