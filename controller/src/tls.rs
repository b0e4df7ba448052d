//! `--tls`: the fleet CA, the controller's own certificate (served, and presented to
//! agents), renewed in place before it expires.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::watch;

use crate::ca::FleetCa;
use crate::config::Cli;
use crate::fleet::Fleet;
use crate::join::Join;

/// How long the controller's own certificate lasts; it is made again at two thirds.
const CONTROLLER_CERT_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// What `--tls` gives the server.
#[derive(Debug)]
pub struct Started {
    pub server: fleet_net::TlsConfig,
    pub join: Join,
}

/// Loads (or creates) the CA, issues the controller's certificate, and keeps it fresh.
pub fn start(cli: &Cli, fleet: &Arc<Fleet>) -> anyhow::Result<Started> {
    let ca = match (&cli.ca_cert, &cli.ca_key) {
        (Some(cert), Some(key)) => FleetCa::load(cert, key)?,
        _ => {
            let dir = cli
                .tls_dir
                .clone()
                .unwrap_or_else(|| crate::ca::default_dir(cli.db_path()));
            FleetCa::load_or_create(&dir)?
        }
    };
    let ca = Arc::new(ca);
    let mut names = cli.tls_names.clone();
    if !cli.listen.ip().is_unspecified() {
        names.push(cli.listen.ip().to_string());
    }
    let (server, client) = configs(&ca, &names)?;
    fleet.agents.set_tls(client);
    let (tx, rx) = watch::channel(Some(server));
    tracing::info!(
        "mutual TLS on; agents join with --ca-hash {}",
        ca.fingerprint()
    );
    tokio::spawn(renew(ca.clone(), names, fleet.clone(), tx));
    Ok(Started {
        server: rx,
        join: Join {
            ca,
            tokens: fleet.tokens.clone(),
            ttl: cli.cert_ttl,
            inventory: fleet.inventory.clone(),
        },
    })
}

type Configs = (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>);

fn configs(ca: &FleetCa, names: &[String]) -> anyhow::Result<Configs> {
    let identity = ca
        .controller_identity(names, CONTROLLER_CERT_TTL)
        .context("cannot make the controller's certificate")?;
    let roots = fleet_net::tls::roots(std::slice::from_ref(ca.cert()))?;
    let server = fleet_net::tls::server_config(identity.clone(), roots.clone())?;
    let client = fleet_net::tls::client_config(roots, Some(identity))?;
    Ok((Arc::new(server), Arc::new(client)))
}

async fn renew(
    ca: Arc<FleetCa>,
    names: Vec<String>,
    fleet: Arc<Fleet>,
    tx: watch::Sender<Option<Arc<rustls::ServerConfig>>>,
) {
    let mut wait = CONTROLLER_CERT_TTL * 2 / 3;
    loop {
        tokio::time::sleep(wait).await;
        match configs(&ca, &names) {
            Ok((server, client)) => {
                fleet.agents.set_tls(client);
                let _ = tx.send(Some(server));
                tracing::info!("renewed the controller's certificate");
                wait = CONTROLLER_CERT_TTL * 2 / 3;
            }
            Err(e) => {
                tracing::error!(
                    "cannot renew the controller's certificate (retrying in an hour): {e:#}"
                );
                wait = Duration::from_secs(3600);
            }
        }
    }
}
