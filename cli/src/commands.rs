//! One function per subcommand: connect, call the controller, print, and say how
//! fleetctl should exit.

/// `fleetctl nodes`: a page at a time.
mod nodes;

use std::time::SystemTime;

use anyhow::Result;
use fleet_proto::v1::{
    CreateTokenRequest, RestartNodeRequest, Rollout, RolloutActionRequest, ShutdownNodeRequest,
};

use crate::args::{
    ActionArgs, Cli, Command, CreateTokenArgs, Format, HistoryArgs, NodeArgs, RestartArgs,
    RolloutAction, RolloutArgs, ShutdownArgs, StartArgs, StatusArgs, TokenAction, UndoArgs, actor,
};
use crate::client::{Action, Controller};
use crate::exit::Exit;
use crate::output::{self, emit, json};
use crate::watch;

/// Runs the command the arguments name.
pub async fn run(cli: Cli) -> Result<Exit> {
    let Cli {
        controller: urls,
        token,
        token_file,
        ca_cert,
        output: format,
        command,
    } = cli;
    // Local commands: no controller needed.
    match &command {
        Command::Completion(args) => return crate::docs::completion(args.shell),
        Command::Man(args) => return crate::docs::man(&args.dir),
        _ => {}
    }
    let token = match token_file {
        Some(path) => Some(crate::docs::read_token_file(&path)?),
        None => token,
    };
    // Every argument was checked while parsing; only now is the controller called.
    let controller = Controller::new(urls, token.as_deref(), ca_cert.as_deref());
    if matches!(command, Command::Version) {
        // The client's version is printed even if the controller cannot be reached.
        return crate::version::run(controller, format).await;
    }
    let controller = controller?;
    match command {
        Command::Version => crate::version::run(Ok(controller), format).await,
        Command::Controllers => controllers(controller, format).await,
        Command::Nodes(args) => nodes::nodes(controller, args, format).await,
        Command::Node(args) => node(controller, args, format).await,
        Command::Restart(args) => restart(controller, args, format).await,
        Command::Shutdown(args) => shutdown(controller, args, format).await,
        Command::Forget(args) => forget(controller, args, format).await,
        Command::Rollout(rollout) => match *rollout {
            RolloutArgs {
                action: None,
                start,
            } => rollout_start(controller, start, format).await,
            RolloutArgs {
                action: Some(action),
                ..
            } => match action {
                RolloutAction::Status(args) => rollout_status(controller, args, format).await,
                RolloutAction::History(args) => rollout_history(controller, args, format).await,
                RolloutAction::Pause(args) => {
                    rollout_action(controller, Action::Pause, args, format).await
                }
                RolloutAction::Resume(args) => {
                    rollout_action(controller, Action::Resume, args, format).await
                }
                RolloutAction::Abort(args) => {
                    rollout_action(controller, Action::Abort, args, format).await
                }
                RolloutAction::Undo(args) => rollout_undo(controller, args, format).await,
            },
        },
        Command::Completion(_) | Command::Man(_) => unreachable!("handled before connecting"),
        Command::Token(token) => match token.action {
            TokenAction::Create(args) => token_create(controller, args, format).await,
            TokenAction::List => token_list(controller, format).await,
            TokenAction::Revoke(args) => token_revoke(controller, args.id, format).await,
        },
    }
}

/// `fleetctl controllers`: the group, its leader and the store's members.
async fn controllers(mut controller: Controller, format: Format) -> Result<Exit> {
    let group = controller.get_controllers().await?;
    match format {
        Format::Json => emit(&json::to_string(&json::ControllersJson::from(&group)))?,
        Format::Table => emit(&output::controllers(&group, SystemTime::now()))?,
    }
    Ok(if group.quorum {
        Exit::Success
    } else {
        Exit::Failed
    })
}

/// `fleetctl token create`: the secret goes to stdout once.
async fn token_create(
    mut controller: Controller,
    args: CreateTokenArgs,
    format: Format,
) -> Result<Exit> {
    let created = controller
        .create_token(CreateTokenRequest {
            name: args.name.unwrap_or_default(),
            role: args
                .role
                .map(|r| r.as_str().to_string())
                .unwrap_or_default(),
            join: args.join,
            ttl_ms: args
                .ttl
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            node_id_prefix: args.node_id_prefix.unwrap_or_default(),
            max_uses: args.uses.unwrap_or(0),
        })
        .await?;
    match format {
        Format::Json => emit(&json::to_string(&json::CreatedTokenJson::from(&created)))?,
        Format::Table => emit(&output::token_created(&created))?,
    }
    Ok(Exit::Success)
}

/// `fleetctl token list`
async fn token_list(mut controller: Controller, format: Format) -> Result<Exit> {
    let tokens = controller.list_tokens().await?;
    match format {
        Format::Json => {
            let tokens: Vec<_> = tokens.iter().map(json::TokenJson::from).collect();
            emit(&json::to_string(&tokens))?;
        }
        Format::Table if tokens.is_empty() => eprintln!(
            "no tokens yet: create one with `fleetctl token create --role ROLE --name NAME`"
        ),
        Format::Table => emit(&output::tokens_table(&tokens, SystemTime::now()))?,
    }
    Ok(Exit::Success)
}

/// `fleetctl token revoke ID`
async fn token_revoke(mut controller: Controller, id: String, format: Format) -> Result<Exit> {
    let token = controller.revoke_token(id).await?;
    match format {
        Format::Json => emit(&json::to_string(&json::TokenJson::from(&token)))?,
        Format::Table => emit(&output::token_revoked(&token))?,
    }
    Ok(Exit::Success)
}

/// `fleetctl node NODE`
async fn node(mut controller: Controller, args: NodeArgs, format: Format) -> Result<Exit> {
    let Some(history) = controller.get_node_history(args.node.clone()).await? else {
        // A controller from before the restart history: the node's facts only.
        let node = controller.get_node(args.node).await?;
        match format {
            Format::Json => emit(&json::to_string(&json::NodeJson::from(&node)))?,
            Format::Table => emit(&output::node_details(&node, SystemTime::now()))?,
        }
        return Ok(Exit::Success);
    };
    let node = history.node.clone().unwrap_or_default();
    match format {
        Format::Json => {
            let mut value = serde_json::to_value(json::NodeJson::from(&node))?;
            value["restarts"] = serde_json::to_value(
                history
                    .restarts
                    .iter()
                    .map(json::NodeRestartJson::from)
                    .collect::<Vec<_>>(),
            )?;
            emit(&json::to_string(&value))?
        }
        Format::Table => {
            let mut text = output::node_details(&node, SystemTime::now());
            text.push('\n');
            text.push_str(&output::history::restarts_table(&history.restarts));
            emit(&text)?
        }
    }
    Ok(Exit::Success)
}

/// `fleetctl restart NODE`: exit 1 when the node's new worker failed.
async fn restart(mut controller: Controller, args: RestartArgs, format: Format) -> Result<Exit> {
    let node_id = args.node.clone();
    let response = controller
        .restart_node(RestartNodeRequest {
            node_id: args.node,
            exe: args.exe.unwrap_or_default(),
            sha256: args.sha256.unwrap_or_default(),
            reason: args.reason.unwrap_or_default(),
            force: args.force,
        })
        .await?;
    let succeeded = json::outcome(response.outcome) == "succeeded";
    match format {
        Format::Json => emit(&json::to_string(&json::RestartJson::new(
            &node_id, &response,
        )))?,
        Format::Table if succeeded => emit(&output::restart_result(&node_id, &response))?,
        Format::Table => eprintln!("{}", output::restart_result(&node_id, &response)),
    }
    Ok(if succeeded {
        Exit::Success
    } else {
        Exit::Failed
    })
}

/// `fleetctl shutdown NODE`
async fn shutdown(mut controller: Controller, args: ShutdownArgs, format: Format) -> Result<Exit> {
    let node_id = args.node.clone();
    controller
        .shutdown_node(ShutdownNodeRequest {
            node_id: args.node,
            reason: args.reason.unwrap_or_default(),
            force: args.force,
        })
        .await?;
    match format {
        Format::Json => emit(&json::to_string(&serde_json::json!({
            "node_id": node_id,
            "shutdown": "started",
        })))?,
        Format::Table => emit(&format!(
            "node {node_id} is shutting down: its agent drains every worker and exits"
        ))?,
    }
    Ok(Exit::Success)
}

/// `fleetctl forget NODE`
async fn forget(mut controller: Controller, args: NodeArgs, format: Format) -> Result<Exit> {
    let node = controller.forget_node(args.node).await?;
    match format {
        Format::Json => emit(&json::to_string(&serde_json::json!({
            "node_id": node.node_id,
            "forgotten": true,
            "state": node.state,
        })))?,
        Format::Table => emit(&format!(
            "forgot node {} (it was {}); it is listed again if its agent heartbeats",
            node.node_id, node.state
        ))?,
    }
    Ok(Exit::Success)
}

/// `fleetctl rollout --exe PATH ...`: the plan with --dry-run, the new rollout's id with
/// --detach, otherwise its progress until it ends.
async fn rollout_start(
    mut controller: Controller,
    args: StartArgs,
    format: Format,
) -> Result<Exit> {
    let detach = args.detach;
    let rollout = controller.start_rollout(args.spec()).await?;
    if rollout.spec.as_ref().is_some_and(|s| s.dry_run) || rollout.state == "planned" {
        match format {
            Format::Json => emit(&json::to_string(&json::RolloutJson::from(&rollout)))?,
            Format::Table => emit(&output::plan(&rollout))?,
        }
        // The plan is shown either way; the exit code is the real run's (2 when
        // preflight would refuse it).
        let refused = rollout
            .nodes
            .iter()
            .any(|n| output::would_refuse(n).is_some());
        return Ok(if refused {
            Exit::BadInput
        } else {
            Exit::Success
        });
    }
    started(controller, rollout, detach, format).await
}

/// After a rollout was started (or an undo): detach, or follow it.
async fn started(
    mut controller: Controller,
    rollout: Rollout,
    detach: bool,
    format: Format,
) -> Result<Exit> {
    if detach {
        match format {
            Format::Json => emit(&json::to_string(&json::RolloutJson::from(&rollout)))?,
            Format::Table => emit(&format!(
                "{}\nfollow it with: fleetctl rollout status {} --watch",
                watch::header(&rollout),
                rollout.id
            ))?,
        }
        return Ok(Exit::Success);
    }
    follow(&mut controller, &rollout.id, format).await
}

/// Watches a rollout to its end; with JSON output the progress goes to stderr and the
/// final rollout to stdout.
async fn follow(controller: &mut Controller, id: &str, format: Format) -> Result<Exit> {
    let (exit, last) = watch::follow(controller, id, format == Format::Json).await?;
    if let (Format::Json, Some(r)) = (format, &last) {
        emit(&json::to_string(&json::RolloutJson::from(r)))?;
    }
    Ok(exit)
}

/// `fleetctl rollout status [ID] [--watch]`
async fn rollout_status(
    mut controller: Controller,
    args: StatusArgs,
    format: Format,
) -> Result<Exit> {
    if args.watch {
        return follow(&mut controller, &args.id, format).await;
    }
    let rollout = controller.get_rollout(args.id, args.page_size).await?;
    match format {
        Format::Json => emit(&json::to_string(&json::RolloutJson::from(&rollout)))?,
        Format::Table => emit(&output::rollout_details(&rollout, args.timeline))?,
    }
    // As `--watch` ends (and `kubectl rollout status`): a script can branch on it. A
    // rollout still running or paused is 0: nothing has failed yet.
    Ok(if watch::finished(&rollout.state) {
        watch::exit_for(&rollout.state)
    } else {
        Exit::Success
    })
}

/// `fleetctl rollout history`
async fn rollout_history(
    mut controller: Controller,
    args: HistoryArgs,
    format: Format,
) -> Result<Exit> {
    // The table shows counts only; JSON keeps every rollout's nodes, as before.
    let summary_only = !matches!(format, Format::Json);
    let rollouts = controller
        .list_rollouts(args.limit.unwrap_or(0), summary_only)
        .await?;
    match format {
        Format::Json => {
            let rollouts: Vec<_> = rollouts.iter().map(json::RolloutJson::from).collect();
            emit(&json::to_string(&rollouts))?;
        }
        Format::Table if rollouts.is_empty() => eprintln!("no rollouts yet"),
        Format::Table => emit(&output::history_table(&rollouts))?,
    }
    Ok(Exit::Success)
}

fn action_request(args: ActionArgs) -> RolloutActionRequest {
    RolloutActionRequest {
        id: args.id,
        actor: actor(args.actor.as_deref()),
        reason: args.reason.unwrap_or_default(),
    }
}

/// `fleetctl rollout pause|resume|abort ID`
async fn rollout_action(
    mut controller: Controller,
    action: Action,
    args: ActionArgs,
    format: Format,
) -> Result<Exit> {
    let rollout = controller
        .rollout_action(action, action_request(args))
        .await?;
    match format {
        Format::Json => emit(&json::to_string(&json::RolloutJson::from(&rollout)))?,
        Format::Table => emit(&action_result(action, &rollout))?,
    }
    Ok(Exit::Success)
}

/// What a pause, resume or abort did. The controller acts on pause and abort between
/// nodes, so the rollout may not be in the wanted state yet.
fn action_result(action: Action, r: &Rollout) -> String {
    let (verb, wanted) = match action {
        Action::Pause => ("pause", "paused"),
        Action::Resume => ("resume", "running"),
        Action::Abort => ("abort", "aborted"),
        Action::Undo => ("undo", "running"),
    };
    let id = &r.id;
    if r.state != wanted {
        return format!(
            "rollout {id}: {verb} requested; it is {} until the nodes in flight are done \
             (follow it with `fleetctl rollout status {id} --watch`)",
            r.state
        );
    }
    let mut line = format!("rollout {id} is {wanted}");
    if !r.reason.is_empty() {
        line.push_str(&format!(": {}", r.reason));
    }
    if wanted == "paused" {
        line.push_str(&format!("; resume it with `fleetctl rollout resume {id}`"));
    }
    line
}

/// `fleetctl rollout undo ID`: starts the undo rollout and, unless --detach, follows it.
async fn rollout_undo(mut controller: Controller, args: UndoArgs, format: Format) -> Result<Exit> {
    let rollout = controller
        .rollout_action(Action::Undo, action_request(args.action))
        .await?;
    started(controller, rollout, args.detach, format).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_action_says_whether_it_took_effect_yet() {
        let mut r = Rollout {
            id: "r5".into(),
            state: "paused".into(),
            reason: "aborted by alice".into(),
            ..Default::default()
        };
        assert_eq!(
            action_result(Action::Abort, &r),
            "rollout r5: abort requested; it is paused until the nodes in flight are done \
             (follow it with `fleetctl rollout status r5 --watch`)"
        );
        r.reason = "paused by alice".into();
        assert_eq!(
            action_result(Action::Pause, &r),
            "rollout r5 is paused: paused by alice; resume it with `fleetctl rollout resume r5`"
        );
    }
}
