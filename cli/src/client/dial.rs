//! How to open a connection to one controller: the same bearer token and, for
//! `https://`, the same fleet CA, whichever URL it is (one from `--controller`, or the
//! leader a follower named).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use fleet_proto::v1::controller_service_client::ControllerServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use super::Bearer;
use crate::exit::bad_input;

/// How long to wait for the TCP connection (and TLS handshake) to a controller.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The controller's gRPC client, with the token on every call.
pub type Api = ControllerServiceClient<InterceptedService<Channel, Bearer>>;

/// What every connection carries, checked once before any is made.
#[derive(Debug, Clone)]
pub struct Dial {
    bearer: Option<MetadataValue<Ascii>>,
    /// TLS trusting the fleet CA, when an `https://` URL was given with `--ca-cert`.
    tls: Option<fleet_net::tls::Connector>,
}

impl Dial {
    /// Checks the token and reads the CA. An `https://` URL among `urls` without
    /// `--ca-cert` is bad input: nothing is tried.
    pub fn new(
        urls: &[String],
        token: Option<&str>,
        ca_cert: Option<&std::path::Path>,
    ) -> Result<Dial> {
        let bearer = match token {
            Some(token) => Some(
                format!("Bearer {token}")
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| bad_input("the token is not valid in a gRPC header"))?,
            ),
            None => None,
        };
        let tls = match (urls.iter().find(|u| is_https(u)), ca_cert) {
            (None, _) => None,
            (Some(url), None) => {
                return Err(bad_input(format!(
                    "{url} speaks TLS with the fleet's own CA: give its certificate with --ca-cert \
                     PATH or FLEET_CA_CERT (ca.crt in the controller's TLS directory)"
                )));
            }
            (Some(_), Some(path)) => {
                let pem = std::fs::read(path).map_err(|e| {
                    bad_input(format!("cannot read --ca-cert {}: {e}", path.display()))
                })?;
                let ca = fleet_net::tls::read_certs(&pem)
                    .map_err(|e| bad_input(format!("--ca-cert {}: {e}", path.display())))?;
                let config = fleet_net::tls::roots(&ca)
                    .and_then(|roots| fleet_net::tls::client_config(roots, None))
                    .map_err(|e| bad_input(format!("--ca-cert {}: {e}", path.display())))?;
                let connector = fleet_net::tls::Connector::new(
                    Arc::new(config),
                    fleet_net::tls::CONTROLLER_NAME,
                )
                .map_err(bad_input)?;
                Some(connector)
            }
        };
        Ok(Dial { bearer, tls })
    }

    /// Connects to `url`. An error means no call was sent: the connection was refused,
    /// timed out, or its TLS handshake failed (a certificate the fleet CA did not issue
    /// to a controller, whatever host the URL names).
    pub async fn connect(&self, url: &str) -> Result<Api, String> {
        let endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| format!("not a URL: {e}"))?
            .connect_timeout(CONNECT_TIMEOUT);
        let channel = if is_https(url) {
            let Some(connector) = &self.tls else {
                // Only a hint can get here (the given URLs were checked): a leader
                // on https:// while every given URL is http://.
                return Err("an https:// URL, and no --ca-cert to trust it".into());
            };
            endpoint.connect_with_connector(connector.clone()).await
        } else {
            endpoint.connect().await
        }
        .map_err(|e| super::chain(&e))?;
        // The controller answers up to 256 MiB (a ListNodes of 100,000 nodes is
        // ~25 MB); tonic's default 4 MiB would fail past ~16,000 nodes.
        Ok(
            ControllerServiceClient::with_interceptor(channel, Bearer(self.bearer.clone()))
                .max_decoding_message_size(256 * 1024 * 1024),
        )
    }
}

pub fn is_https(url: &str) -> bool {
    url.starts_with("https://")
}
