//! A `fleet-controller` started for a benchmark either plain (HTTP/2 in clear, agents
//! heartbeat with the bootstrap token) or with `--tls` (mutual TLS: agents join with
//! a join token and heartbeat with their own certificate), and what its clients need
//! to reach it: the bootstrap token, and with TLS the fleet CA and its fingerprint.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use fleet_proto::v1 as pb;
use fleet_proto::v1::controller_service_client::ControllerServiceClient;
use rustls::pki_types::CertificateDer;
use tempfile::TempDir;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};

use super::controller::{Controller, start_controller_with};

/// How long one call to the controller may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long connecting to the controller may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How the controller and its agents speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// HTTP/2 in clear; agents carry the bootstrap token.
    Plain,
    /// `--tls`: mutual TLS; agents carry the certificate they got by joining.
    Tls,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Plain => "plain",
            Mode::Tls => "TLS",
        }
    }
}

/// The fleet CA of a controller started with `--tls`.
#[derive(Debug, Clone)]
pub struct Ca {
    pub cert_path: PathBuf,
    pub certs: Vec<CertificateDer<'static>>,
    /// `sha256:HEX`, what `fleet-agent --ca-hash` takes.
    pub hash: String,
    pub pin: [u8; 32],
}

/// What a client needs to reach the controller as an agent: cheap to clone into
/// tasks.
#[derive(Debug, Clone)]
pub struct Target {
    /// `http://ADDR` or `https://ADDR`.
    pub url: String,
    /// With `--tls`.
    pub ca: Option<Ca>,
    /// `Bearer <bootstrap token>`.
    pub bearer: MetadataValue<Ascii>,
}

/// A running controller (killed on drop) and its temp dir (database, token, CA).
#[derive(Debug)]
pub struct BenchController {
    // Declared first: dropped (killed) before its directory is removed.
    pub controller: Controller,
    pub mode: Mode,
    pub ca: Option<Ca>,
    bearer: MetadataValue<Ascii>,
    dir: TempDir,
}

impl BenchController {
    /// Starts `exe` on a free loopback port with a bootstrap token, a database in a
    /// new temp dir and `--heartbeat-ttl ttl` (`--tls` with the CA in that dir too).
    pub async fn start(exe: &Path, mode: Mode, ttl: Duration) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("tls-bench-controller")
            .tempdir()
            .context("cannot create a temp dir for the controller")?;
        let token = format!("tls-bench-bootstrap-{}", std::process::id());
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, format!("{token}\n"))
            .with_context(|| format!("cannot write {}", token_file.display()))?;
        let tls_dir = dir.path().join("fleet-tls");
        let mut args: Vec<OsString> = vec!["--listen".into(), "127.0.0.1:0".into()];
        args.extend(["--db".into(), dir.path().join("fleet.db").into()]);
        args.extend([
            "--heartbeat-ttl".into(),
            format!("{}ms", ttl.as_millis()).into(),
        ]);
        args.extend(["--token-file".into(), token_file.into()]);
        if mode == Mode::Tls {
            args.extend(["--tls".into(), "--tls-dir".into(), tls_dir.clone().into()]);
        }
        let controller = start_controller_with(exe, &args).await?;
        let ca = match mode {
            Mode::Plain => None,
            Mode::Tls => Some(read_ca(&tls_dir.join("ca.crt"))?),
        };
        Ok(Self {
            controller,
            mode,
            ca,
            bearer: format!("Bearer {token}")
                .parse()
                .context("the bootstrap token is not ASCII")?,
            dir,
        })
    }

    pub fn pid(&self) -> u32 {
        self.controller.pid()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The bootstrap token's file (what plain agents are given).
    pub fn token_file(&self) -> PathBuf {
        self.dir.path().join("token")
    }

    /// `http://ADDR` or `https://ADDR`.
    pub fn url(&self) -> String {
        let scheme = match self.mode {
            Mode::Plain => "http",
            Mode::Tls => "https",
        };
        format!("{scheme}://{}", self.controller.addr)
    }

    /// `message` with `authorization: Bearer <bootstrap token>`.
    pub fn authed<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request
            .metadata_mut()
            .insert("authorization", self.bearer.clone());
        request.set_timeout(CALL_TIMEOUT);
        request
    }

    /// What an agent needs to reach it.
    pub fn target(&self) -> Target {
        Target {
            url: self.url(),
            ca: self.ca.clone(),
            bearer: self.bearer.clone(),
        }
    }

    /// An operator's client, the way fleetctl reaches this controller: over TLS
    /// trusting the fleet CA (no client certificate) with `--tls`, in clear otherwise.
    pub async fn operator(&self) -> anyhow::Result<ControllerServiceClient<Channel>> {
        let endpoint = Endpoint::from_shared(self.url())?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true);
        let channel = match &self.ca {
            None => endpoint.connect().await,
            Some(ca) => {
                let roots = fleet_net::tls::roots(&ca.certs)?;
                let config = fleet_net::tls::client_config(roots, None)?;
                let connector = fleet_net::tls::Connector::new(
                    Arc::new(config),
                    fleet_net::tls::CONTROLLER_NAME,
                )
                .map_err(|e| anyhow!(e))?;
                endpoint.connect_with_connector(connector).await
            }
        }
        .with_context(|| format!("cannot connect to the controller at {}", self.url()))?;
        Ok(ControllerServiceClient::new(channel)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20))
    }

    /// A new join token (any node id, any number of uses, the default hour).
    pub async fn join_token(&self) -> anyhow::Result<String> {
        let created = self
            .operator()
            .await?
            .create_token(self.authed(pb::CreateTokenRequest {
                name: "tls-bench".into(),
                join: true,
                ..Default::default()
            }))
            .await
            .context("CreateToken (a join token)")?
            .into_inner();
        Ok(created.secret)
    }

    /// Every node the controller lists.
    pub async fn nodes(&self) -> anyhow::Result<Vec<pb::Node>> {
        Ok(self
            .operator()
            .await?
            .list_nodes(self.authed(pb::ListNodesRequest::default()))
            .await
            .context("ListNodes")?
            .into_inner()
            .nodes)
    }
}

fn read_ca(path: &Path) -> anyhow::Result<Ca> {
    let pem = std::fs::read(path).with_context(|| {
        format!(
            "cannot read the fleet CA {} the controller should have created",
            path.display()
        )
    })?;
    let certs = fleet_net::tls::read_certs(&pem).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let hash = fleet_net::tls::fingerprint(&certs[0]);
    let pin = fleet_net::tls::parse_fingerprint(&hash).map_err(|e| anyhow!(e))?;
    Ok(Ca {
        cert_path: path.to_path_buf(),
        certs,
        hash,
        pin,
    })
}
