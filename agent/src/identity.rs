//! The node's certificate, for mutual TLS with the controller (a controller URL of
//! `https://…`).
//!
//! On first start the agent makes its own key (it never leaves the node), sends a
//! certificate request with the operator's join token to the controller — trusting only
//! the CA whose fingerprint the operator pinned (`--ca-hash`) — and keeps what it gets
//! in its identity directory: `node.key` (owner-only), `node.crt`, `ca.crt`. Later
//! starts load them. At two thirds of the certificate's life it asks for a new one
//! with the current one. The control endpoint serves with it (so the controller can
//! check it reached this node) and the heartbeat presents it (so the controller knows
//! who speaks).
//!
//! With several controllers, a join or renewal goes to one at a time, as heartbeats do
//! ([`crate::controllers`]): a follower sends it to the leader (one of the configured
//! controllers), a controller that fails to the next. The CA pin is the same for all:
//! they are one fleet with one CA.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fleet_net::tls::{self as ftls, Identity};
use fleet_proto::v1 as pb;
use fleet_proto::v1::join_service_client::JoinServiceClient;
use rustls::pki_types::CertificateDer;
use tokio::sync::watch;
use tonic::transport::Endpoint;

use crate::config::JoinConfig;
use crate::controllers::{Controllers, Next};

/// Retries of a failed join or renewal start here and double up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(30);

/// What the rest of the agent sees: the current TLS configs (none before joining).
#[derive(Debug, Clone)]
pub struct Tls {
    /// The control endpoint's: the node's certificate, and the fleet CA for the
    /// controller's client certificate.
    pub server: watch::Receiver<Option<Arc<rustls::ServerConfig>>>,
    /// For calls to the controller: the fleet CA, and the node's certificate.
    pub client: watch::Receiver<Option<Arc<rustls::ClientConfig>>>,
}

/// A node certificate with its key and CA, as kept on disk.
#[derive(Debug, Clone)]
struct Held {
    identity: Identity,
    ca: CertificateDer<'static>,
    ca_pem: String,
    not_after: SystemTime,
}

impl Held {
    fn renew_at(&self) -> SystemTime {
        let now = SystemTime::now();
        now + self.not_after.duration_since(now).unwrap_or_default() * 2 / 3
    }
}

struct Files {
    key: PathBuf,
    cert: PathBuf,
    ca: PathBuf,
}

impl Files {
    fn in_dir(dir: &Path) -> Self {
        Self {
            key: dir.join("node.key"),
            cert: dir.join("node.crt"),
            ca: dir.join("ca.crt"),
        }
    }
}

/// Starts keeping the node's certificate; the receivers fill in once it has one.
pub fn start(urls: Vec<String>, node_id: String, join: JoinConfig) -> Tls {
    let (server_tx, server) = watch::channel(None);
    let (client_tx, client) = watch::channel(None);
    tokio::spawn(async move {
        keep(urls, node_id, join, server_tx, client_tx).await;
    });
    Tls { server, client }
}

/// Why a join or renewal failed: the line to log, and the controller's status when a
/// controller failed it (which may send the next try to another controller).
#[derive(Debug)]
struct StepError {
    message: String,
    status: Option<tonic::Status>,
}

impl From<String> for StepError {
    fn from(message: String) -> StepError {
        StepError {
            message,
            status: None,
        }
    }
}

impl StepError {
    fn from_controller(what: String, status: tonic::Status) -> StepError {
        StepError {
            message: format!("{what}: {}", explain(&status)),
            status: Some(status),
        }
    }
}

async fn keep(
    urls: Vec<String>,
    node_id: String,
    join: JoinConfig,
    server_tx: watch::Sender<Option<Arc<rustls::ServerConfig>>>,
    client_tx: watch::Sender<Option<Arc<rustls::ClientConfig>>>,
) {
    let Some(dir) = join.identity_dir.clone() else {
        tracing::error!("no identity directory: mutual TLS needs --identity-dir");
        return;
    };
    let files = Files::in_dir(&dir);
    let mut held = None;
    let mut retry = FIRST_RETRY;
    let mut last_error = String::new();
    let mut controllers = Controllers::new(urls);
    loop {
        let url = controllers.current().to_string();
        let step = match &held {
            None => obtain(&url, &node_id, &join, &files).await,
            Some(h) => renew(&url, &node_id, h, &files).await,
        };
        match step {
            Ok(new) => {
                controllers.succeeded();
                match configs(&new) {
                    Ok((server, client)) => {
                        let _ = server_tx.send(Some(server));
                        let _ = client_tx.send(Some(client));
                    }
                    Err(e) => tracing::error!("the node certificate cannot be used: {e}"),
                }
                tracing::info!(
                    "node certificate for {node_id:?} valid until {}",
                    humantime::format_rfc3339_seconds(new.not_after)
                );
                let wait = new
                    .renew_at()
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                held = Some(new);
                retry = FIRST_RETRY;
                last_error.clear();
                tokio::time::sleep(wait).await;
            }
            Err(StepError { message, status }) => {
                let next = status.as_ref().map(|s| controllers.failed(s));
                let follower = status
                    .as_ref()
                    .is_some_and(|s| crate::controllers::leader_hint(s).is_some());
                if next == Some(Next::Now) {
                    // Another controller at once; a follower pointing at the leader is
                    // no failure worth a line.
                    if !follower {
                        tracing::warn!("{message}; trying {}", controllers.current());
                    }
                    continue;
                }
                if message != last_error {
                    tracing::error!(
                        "{message}; retrying (every {} at most)",
                        humantime::format_duration(MAX_RETRY)
                    );
                    last_error = message;
                }
                if let Some(h) = &held
                    && h.not_after <= SystemTime::now()
                {
                    tracing::error!(
                        "the node certificate expired at {}: the controller will refuse this node until \
                         it joins again (a new join token with --join-token-file, and remove {})",
                        humantime::format_rfc3339_seconds(h.not_after),
                        files.cert.display()
                    );
                }
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(MAX_RETRY);
            }
        }
    }
}

/// The certificate on disk, or a new one by joining.
async fn obtain(
    url: &str,
    node_id: &str,
    join: &JoinConfig,
    files: &Files,
) -> Result<Held, StepError> {
    match load(files, node_id) {
        Ok(Some(held)) if held.not_after > SystemTime::now() => return Ok(held),
        Ok(Some(held)) => tracing::warn!(
            "the node certificate in {} expired at {}; joining again",
            files.cert.display(),
            humantime::format_rfc3339_seconds(held.not_after)
        ),
        Ok(None) => {}
        Err(e) => return Err(e.into()),
    }
    let (Some(token_file), Some(pin)) = (&join.join_token_file, &join.ca_hash) else {
        return Err(StepError::from(format!(
            "no node certificate in {} and nothing to join with: create a join token \
             (`fleetctl token create --join`) and start the agent with --join-token-file FILE \
             --ca-hash sha256:… (the controller logs its CA fingerprint)",
            files.cert.display()
        )));
    };
    let pin = ftls::parse_fingerprint(pin)?;
    let token = std::fs::read_to_string(token_file)
        .map_err(|e| {
            format!(
                "cannot read the join token file {}: {e}",
                token_file.display()
            )
        })?
        .trim()
        .to_string();
    let (key_pem, csr) = request(node_id)?;
    let config = ftls::pinned_client_config(pin).map_err(|e| e.to_string())?;
    let mut client = JoinServiceClient::new(channel(url, config)?);
    let response = client
        .join(pb::JoinRequest {
            token,
            node_id: node_id.to_string(),
            csr_pem: csr,
        })
        .await
        .map_err(|s| StepError::from_controller(format!("joining the fleet at {url} failed"), s))?
        .into_inner();
    let ca = ftls::read_certs(response.ca_pem.as_bytes())
        .map_err(|e| format!("the controller sent a CA that is {e}"))?
        .remove(0);
    if sha256(&ca) != pin {
        return Err(StepError::from(format!(
            "the controller sent CA {} but --ca-hash pins another: refusing to trust it",
            ftls::fingerprint(&ca)
        )));
    }
    let held = store(
        files,
        node_id,
        &key_pem,
        &response.cert_pem,
        &response.ca_pem,
    )?;
    tracing::info!("joined the fleet at {url} as {node_id:?}");
    Ok(held)
}

fn sha256(cert: &CertificateDer<'_>) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(cert.as_ref()).into()
}

async fn renew(url: &str, node_id: &str, held: &Held, files: &Files) -> Result<Held, StepError> {
    let (key_pem, csr) = request(node_id)?;
    let roots = ftls::roots(std::slice::from_ref(&held.ca)).map_err(|e| e.to_string())?;
    let config =
        ftls::client_config(roots, Some(held.identity.clone())).map_err(|e| e.to_string())?;
    let mut client = JoinServiceClient::new(channel(url, config)?);
    let response = client
        .renew(pb::RenewRequest {
            node_id: node_id.to_string(),
            csr_pem: csr,
        })
        .await
        .map_err(|s| {
            StepError::from_controller(format!("renewing the node certificate at {url} failed"), s)
        })?
        .into_inner();
    Ok(store(
        files,
        node_id,
        &key_pem,
        &response.cert_pem,
        &held.ca_pem,
    )?)
}

/// A tonic status as one line, with the transport's cause where there is one (each
/// cause once: tonic's message often repeats its source's).
fn explain(status: &tonic::Status) -> String {
    use std::error::Error as _;
    let mut text = status.message().to_string();
    let mut source = status.source();
    while let Some(e) = source {
        let cause = e.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
        source = e.source();
    }
    text
}

fn channel(url: &str, config: rustls::ClientConfig) -> Result<tonic::transport::Channel, String> {
    let connector = ftls::Connector::new(Arc::new(config), ftls::CONTROLLER_NAME)?;
    Ok(Endpoint::from_shared(url.to_string())
        .map_err(|e| format!("controller URL {url:?}: {e}"))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(10))
        .connect_with_connector_lazy(connector))
}

/// A new key and a request naming this node.
fn request(node_id: &str) -> Result<(String, String), String> {
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let csr = rcgen::CertificateParams::new(vec![ftls::node_name(node_id)])
        .and_then(|p| p.serialize_request(&key))
        .and_then(|r| r.pem())
        .map_err(|e| format!("cannot make a certificate request for {node_id:?}: {e}"))?;
    Ok((key.serialize_pem(), csr))
}

/// Reads the certificate in the identity directory, if there is one.
fn load(files: &Files, node_id: &str) -> Result<Option<Held>, String> {
    if !files.cert.exists() {
        return Ok(None);
    }
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
    let chain = ftls::read_certs(&read(&files.cert)?)
        .map_err(|e| format!("{}: {e}", files.cert.display()))?;
    let key =
        ftls::read_key(&read(&files.key)?).map_err(|e| format!("{}: {e}", files.key.display()))?;
    let ca_pem = String::from_utf8(read(&files.ca)?)
        .map_err(|_| format!("{} is not PEM text", files.ca.display()))?;
    let ca = ftls::read_certs(ca_pem.as_bytes())
        .map_err(|e| format!("{}: {e}", files.ca.display()))?
        .remove(0);
    if !ftls::names(&chain[0], &ftls::node_name(node_id)) {
        return Err(format!(
            "the certificate in {} is not for node {node_id:?}: give this node its own \
             --identity-dir, or remove the files there and join again",
            files.cert.display()
        ));
    }
    let not_after = ftls::not_after(&chain[0])
        .ok_or_else(|| format!("{}: cannot read its expiry", files.cert.display()))?;
    Ok(Some(Held {
        identity: Identity { chain, key },
        ca,
        ca_pem,
        not_after,
    }))
}

/// Writes the new key, certificate and CA (each replaced whole), and reads them back.
fn store(files: &Files, node_id: &str, key: &str, cert: &str, ca: &str) -> Result<Held, String> {
    let chain = ftls::read_certs(cert.as_bytes())
        .map_err(|e| format!("the controller sent a certificate that is {e}"))?;
    if !ftls::names(&chain[0], &ftls::node_name(node_id)) {
        return Err(format!(
            "the controller sent a certificate that does not name {node_id:?}"
        ));
    }
    write_atomic(&files.key, key.as_bytes(), 0o600)?;
    write_atomic(&files.cert, cert.as_bytes(), 0o644)?;
    write_atomic(&files.ca, ca.as_bytes(), 0o644)?;
    load(files, node_id)?.ok_or_else(|| "the certificate just written is gone".to_string())
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), String> {
    let err = |e: std::io::Error| format!("cannot write {}: {e}", path.display());
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(err)?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    file.write_all(bytes).map_err(err)?;
    file.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

type Configs = (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>);

fn configs(held: &Held) -> Result<Configs, String> {
    let roots = ftls::roots(std::slice::from_ref(&held.ca)).map_err(|e| e.to_string())?;
    let server =
        ftls::server_config(held.identity.clone(), roots.clone()).map_err(|e| e.to_string())?;
    let client =
        ftls::client_config(roots, Some(held.identity.clone())).map_err(|e| e.to_string())?;
    Ok((Arc::new(server), Arc::new(client)))
}
