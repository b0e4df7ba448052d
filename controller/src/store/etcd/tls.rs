//! TLS to etcd without tonic's own TLS: a balanced channel whose connections are made
//! by fleet-net's rustls connector, one per member, each checking that the member's
//! certificate names the host it was dialled at.
//!
//! Why not etcd-client's `tls` feature: it turns on tonic's TLS for the whole
//! workspace, and then tonic refuses every `https://` URI whose TLS it does not do
//! itself ("Connecting to HTTPS without TLS enabled"), which is how fleetctl, the
//! agents and the tests reach a controller with `--tls` (their own connector, the
//! fleet CA). So the endpoints stay `http://HOST:PORT` to tonic, and TLS is below it.

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;

use etcd_client::{BalancedChannelBuilder, Channel};
use http::Uri;
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;
use tonic::transport::Endpoint;
use tonic::transport::channel::Change;
use tower::balance::p2c::Balance;
use tower::buffer::Buffer;
use tower::load::{CompleteOnResponse, PendingRequests};
use tower::util::BoxCloneSyncService;

use super::EtcdTls;

/// The client side of TLS to etcd: the CA the members' certificates chain to, and
/// this controller's certificate when etcd asks for one (`--client-cert-auth`).
pub fn client_config(tls: &EtcdTls) -> Result<Arc<rustls::ClientConfig>, String> {
    let read = |path: &Path, what: &str| {
        std::fs::read(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))
    };
    let ca_flag = "the etcd CA certificate (--etcd-ca-cert)";
    let ca = read(&tls.ca_cert, ca_flag)?;
    let ca = fleet_net::tls::read_certs(&ca)
        .map_err(|e| format!("{ca_flag} {}: {e}", tls.ca_cert.display()))?;
    let roots = fleet_net::tls::roots(&ca)
        .map_err(|e| format!("{ca_flag} {}: {e}", tls.ca_cert.display()))?;
    let identity = match &tls.identity {
        None => None,
        Some((cert, key)) => {
            let cert_flag = "the etcd client certificate (--etcd-cert)";
            let key_flag = "the etcd client key (--etcd-key)";
            let chain = fleet_net::tls::read_certs(&read(cert, cert_flag)?)
                .map_err(|e| format!("{cert_flag} {}: {e}", cert.display()))?;
            let key_pem = read(key, key_flag)?;
            let key = fleet_net::tls::read_key(&key_pem)
                .map_err(|e| format!("{key_flag} {}: {e}", key.display()))?;
            Some(fleet_net::tls::Identity { chain, key })
        }
    };
    let config =
        fleet_net::tls::client_config(roots, identity).map_err(|e| format!("TLS to etcd: {e}"))?;
    Ok(Arc::new(config))
}

/// Builds etcd-client's balanced channel over TLS connections.
pub struct TlsChannel(pub Arc<rustls::ClientConfig>);

type Request = http::Request<tonic::body::Body>;

impl BalancedChannelBuilder for TlsChannel {
    type Error = etcd_client::Error;

    fn balanced_channel(
        self,
        buffer_size: usize,
    ) -> Result<(Channel, mpsc::Sender<Change<Uri, Endpoint>>), Self::Error> {
        let (tx, rx) = mpsc::channel::<Change<Uri, Endpoint>>(buffer_size);
        let config = self.0;
        // What etcd-client sends for each member becomes a lazily connected channel
        // whose connector speaks TLS to that member's host.
        let discover = tokio_stream::wrappers::ReceiverStream::new(rx).map(move |change| {
            Ok::<_, Infallible>(match change {
                Change::Insert(uri, endpoint) => {
                    let host = uri
                        .host()
                        .unwrap_or_default()
                        .trim_start_matches('[')
                        .trim_end_matches(']');
                    let channel = match fleet_net::tls::Connector::new(config.clone(), host) {
                        Ok(connector) => endpoint.connect_with_connector_lazy(connector),
                        // Not a name a certificate can carry: every call fails, saying so.
                        Err(why) => {
                            tracing::error!("etcd endpoint {uri}: {why}");
                            endpoint.connect_with_connector_lazy(tower::service_fn(
                                move |_: Uri| {
                                    let why = why.clone();
                                    async move {
                                        Err::<hyper_util::rt::TokioIo<tokio::net::TcpStream>, _>(
                                            std::io::Error::other(why),
                                        )
                                    }
                                },
                            ))
                        }
                    };
                    tower::discover::Change::Insert(
                        uri,
                        PendingRequests::new(channel, CompleteOnResponse::default()),
                    )
                }
                Change::Remove(uri) => tower::discover::Change::Remove(uri),
            })
        });
        let balance: Balance<_, Request> = Balance::new(discover);
        let service = Buffer::new(balance, buffer_size.max(1));
        Ok((Channel::Custom(BoxCloneSyncService::new(service)), tx))
    }
}
