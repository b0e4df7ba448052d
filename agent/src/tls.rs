//! HTTPS: a rustls server config from PEM files, offering HTTP/2 and HTTP/1.1 by ALPN.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read TLS certificate {path}: {source}")]
    Cert {
        path: String,
        source: rustls::pki_types::pem::Error,
    },
    #[error("cannot read TLS key {path}: {source}")]
    Key {
        path: String,
        source: rustls::pki_types::pem::Error,
    },
    #[error("TLS certificate {cert} has no certificate in it: give a PEM certificate chain")]
    NoCert { cert: String },
    #[error("TLS certificate and key do not work together: {0}")]
    Config(#[from] rustls::Error),
}

/// Loads the certificate chain and key and builds the acceptor.
pub fn acceptor(config: &TlsConfig) -> Result<TlsAcceptor, TlsError> {
    let cert_path = config.cert.display().to_string();
    let certs = CertificateDer::pem_file_iter(&config.cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Cert {
            path: cert_path.clone(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCert { cert: cert_path });
    }
    let key = PrivateKeyDer::from_pem_file(&config.key).map_err(|source| TlsError::Key {
        path: config.key.display().to_string(),
        source,
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(server)))
}
