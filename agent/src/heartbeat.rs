//! Registration with a fleet controller: the supervisor sends its status as a
//! heartbeat at the interval the controller asks for (the first at once). A controller
//! that is down is retried quietly; the node keeps serving either way.

use std::sync::Arc;
use std::time::Duration;

use fleet_proto::v1 as pb;
use fleet_proto::v1::controller_service_client::ControllerServiceClient;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};

use crate::phase::Phase;
use crate::supervisor::{NodeState, Supervisor};

/// Until the controller says otherwise.
const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
/// How long the first beat may wait for the executable's digest.
const DIGEST_WAIT: Duration = Duration::from_secs(5);

/// The client config of an `https://` controller, swapped when the certificate renews.
type ClientTls = watch::Receiver<Option<Arc<rustls::ClientConfig>>>;

pub async fn run(supervisor: Arc<Supervisor>, url: String, mut tls: Option<ClientTls>) {
    let endpoint = match Endpoint::from_shared(url.clone()) {
        Ok(e) => e
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(10)),
        Err(e) => {
            tracing::error!("controller URL {url:?} is not valid: {e}");
            return;
        }
    };
    let auth: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> = supervisor
        .token()
        .and_then(|t| format!("Bearer {t}").parse().ok());
    // Over mutual TLS: not before the node has its certificate, and on a new channel
    // after each renewal (the controller reads the node id from the certificate).
    let connect = |tls: &Option<ClientTls>| -> Option<ControllerServiceClient<Channel>> {
        match tls {
            None => Some(ControllerServiceClient::new(endpoint.connect_lazy())),
            Some(rx) => {
                let config = rx.borrow().clone()?;
                match fleet_net::tls::Connector::new(config, fleet_net::tls::CONTROLLER_NAME) {
                    Ok(c) => Some(ControllerServiceClient::new(
                        endpoint.connect_with_connector_lazy(c),
                    )),
                    Err(e) => {
                        tracing::error!("{e}");
                        None
                    }
                }
            }
        }
    };
    if let Some(rx) = tls.as_mut() {
        if rx.wait_for(Option::is_some).await.is_err() {
            return;
        }
        rx.mark_unchanged();
    }
    let Some(mut client) = connect(&tls) else {
        return;
    };
    let mut events = supervisor.subscribe();
    // A node registers once its first worker serves (or it has failed to start).
    while supervisor.status().state == NodeState::Starting {
        if let Err(tokio::sync::broadcast::error::RecvError::Closed) = events.recv().await {
            return;
        }
    }
    // The first beat carries the executable's digest, which is computed while the
    // first worker starts (tens of ms).
    let deadline = tokio::time::Instant::now() + DIGEST_WAIT;
    while supervisor.status().exe.sha256.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut interval = DEFAULT_INTERVAL;
    let mut failing = false;
    loop {
        if let Some(rx) = &tls
            && rx.has_changed().unwrap_or(false)
            && let Some(new) = connect(&tls)
        {
            client = new;
            if let Some(rx) = tls.as_mut() {
                rx.mark_unchanged();
            }
        }
        let report = supervisor.status();
        let stopped = report.state == NodeState::Stopped;
        let in_flight = report.in_flight();
        let status = crate::control::status_message(report);
        let mut request = tonic::Request::new(pb::HeartbeatRequest {
            status: Some(status),
            in_flight,
        });
        if let Some(value) = &auth {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        match client.heartbeat(request).await {
            Ok(response) => {
                if failing {
                    tracing::info!("controller {url} reachable again");
                    failing = false;
                }
                let asked = response.into_inner().interval_ms;
                if asked > 0 {
                    interval = Duration::from_millis(asked);
                }
            }
            Err(status) => {
                if !failing {
                    tracing::warn!(
                        "heartbeat to the controller {url} failed: {}; retrying every {}",
                        status.message(),
                        humantime::format_duration(interval)
                    );
                    failing = true;
                }
            }
        }
        // The last beat says the node stopped on purpose, so the controller shows it
        // as stopped rather than unreachable. While it drains it keeps beating.
        if stopped {
            return;
        }
        // Next beat at the interval, or at once when the node changes (a restart
        // ended, a worker died), so the controller's view is fresh.
        let sleep = tokio::time::sleep(interval);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                event = events.recv() => match event {
                    Ok(e) if matches!(e.phase, Phase::Ready | Phase::Failed | Phase::Reverting
                        | Phase::WorkerExited | Phase::ShuttingDown | Phase::Stopped) => break,
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        (&mut sleep).await;
                        break;
                    }
                },
            }
        }
    }
}
