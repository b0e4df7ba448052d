//! A controller's `Command` carried out by an `AgentService`: the agent and the
//! hollow agents answer the calls on their heartbeat streams through the one service
//! that answers the same calls on their control ports, and read those streams the
//! same way ([`read_stream`]).

use tonic::metadata::MetadataMap;

use crate::v1::agent_service_server::AgentService;
use crate::v1::command::Call;
use crate::v1::command_answer::Answer;
use crate::v1::{Command, CommandError, HeartbeatResponse};

/// An error answer: what the call's status would have said.
pub fn refusal(code: tonic::Code, message: &str) -> Answer {
    Answer::Error(CommandError {
        code: code as i32,
        message: message.to_string(),
    })
}

/// The answer `service` gives to `call`, each request carrying `metadata` (the
/// credential, where the service checks one itself).
pub async fn answer<S: AgentService>(
    service: &S,
    call: Option<Call>,
    metadata: &MetadataMap,
) -> Answer {
    fn request<T>(message: T, metadata: &MetadataMap) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        *request.metadata_mut() = metadata.clone();
        request
    }
    let result = match call {
        Some(Call::Restart(r)) => service
            .restart(request(r, metadata))
            .await
            .map(|r| Answer::Restart(r.into_inner())),
        Some(Call::Preflight(r)) => service
            .preflight(request(r, metadata))
            .await
            .map(|r| Answer::Preflight(r.into_inner())),
        Some(Call::Status(r)) => service
            .status(request(r, metadata))
            .await
            .map(|r| Answer::Status(r.into_inner())),
        Some(Call::Shutdown(r)) => service
            .shutdown(request(r, metadata))
            .await
            .map(|r| Answer::Shutdown(r.into_inner())),
        None => Err(tonic::Status::unimplemented(
            "a command this agent does not know (the controller is newer): call its control \
             address",
        )),
    };
    result.unwrap_or_else(|status| refusal(status.code(), status.message()))
}

/// Reads an agent's `HeartbeatStream` from the controller: each command goes to
/// `on_command`, the answers to beats go to `acks` in order, the last one the error
/// that ended the stream (`UNAVAILABLE` when the controller just closed it). Returns
/// then, or once nobody reads `acks`.
pub async fn read_stream(
    mut messages: tonic::Streaming<HeartbeatResponse>,
    acks: tokio::sync::mpsc::Sender<Result<HeartbeatResponse, tonic::Status>>,
    mut on_command: impl FnMut(Command),
) {
    loop {
        let ack = match messages.message().await {
            Ok(Some(HeartbeatResponse {
                command: Some(command),
                ..
            })) => {
                on_command(command);
                continue;
            }
            Ok(Some(answer)) => Ok(answer),
            Ok(None) => Err(ended()),
            Err(status) => Err(status),
        };
        let end = ack.is_err();
        if acks.send(ack).await.is_err() || end {
            return;
        }
    }
}

/// The controller closed the heartbeat stream.
pub fn ended() -> tonic::Status {
    tonic::Status::unavailable("the controller ended the heartbeat stream")
}
