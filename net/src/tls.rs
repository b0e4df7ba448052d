//! Fleet's mutual TLS: the names fleet certificates carry, what a handshake tells the
//! handlers about the peer, server configs that ask for (but do not demand) a client
//! certificate, client configs that trust the fleet CA — or, to join, only a CA whose
//! digest the operator pinned — and a connector that gives tonic channels such a
//! client.
//!
//! Names: the controller's certificate names [`CONTROLLER_NAME`]; node `web-1`'s names
//! `web-1.node.fleet` ([`node_name`]). A client checks the name it meant to reach, not
//! the address it dialled: a node's self-reported address can be anything, its
//! certificate cannot.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// The name in the controller's certificate.
pub const CONTROLLER_NAME: &str = "controller.fleet";

/// The name in node `node_id`'s certificate. DNS names compare without case, so
/// node ids that differ only in case share a name (the controller refuses the second).
pub fn node_name(node_id: &str) -> String {
    format!("{node_id}.node.fleet")
}

/// Whether `node_id` can be named in a certificate, and why not.
pub fn check_node_name(node_id: &str) -> Result<(), String> {
    ServerName::try_from(node_name(node_id))
        .map(|_| ())
        .map_err(|_| {
            format!(
                "node id {node_id:?} cannot be named in a certificate: use letters, digits, \
                 '-' and '.', starting and ending with a letter or digit"
            )
        })
}

/// The crypto every Fleet TLS config uses (ring, as rustls and rcgen here).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// `sha256:HEX` of a DER certificate: how an operator pins the fleet CA.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(cert.as_ref())))
}

/// Parses `sha256:HEX` (or bare HEX) into the digest.
pub fn parse_fingerprint(text: &str) -> Result<[u8; 32], String> {
    let hex_part = text.trim().strip_prefix("sha256:").unwrap_or(text.trim());
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut out).map_err(|_| {
        format!(
            "CA fingerprint {text:?} is not sha256:<64 hex digits>: copy it from the controller's \
             start-up log or `fleetctl ca`"
        )
    })?;
    Ok(out)
}

/// The client certificate a connection's handshake verified against the fleet CA,
/// in every request's extensions (absent on plain connections and when the client
/// sent none).
#[derive(Debug, Clone)]
pub struct PeerCertificate {
    pub der: Arc<CertificateDer<'static>>,
    /// When it expires: a long-lived connection outlives the handshake's check.
    pub not_after: SystemTime,
}

impl PeerCertificate {
    pub fn new(der: CertificateDer<'static>) -> Option<Self> {
        let not_after = not_after(&der)?;
        Some(Self {
            der: Arc::new(der),
            not_after,
        })
    }

    /// Whether the certificate names `name` (a DNS name) and has not expired.
    pub fn names(&self, name: &str) -> bool {
        self.not_after > SystemTime::now() && names(&self.der, name)
    }

    pub fn expired(&self) -> bool {
        self.not_after <= SystemTime::now()
    }
}

/// Whether `cert` names the DNS name `name` (the chain is checked elsewhere).
pub fn names(cert: &CertificateDer<'_>, name: &str) -> bool {
    let Ok(name) = ServerName::try_from(name) else {
        return false;
    };
    webpki::EndEntityCert::try_from(cert)
        .and_then(|c| c.verify_is_valid_for_subject_name(&name))
        .is_ok()
}

/// A certificate's `notAfter`.
pub fn not_after(cert: &CertificateDer<'_>) -> Option<SystemTime> {
    use x509_parser::prelude::FromDer as _;
    let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(cert.as_ref()).ok()?;
    let secs = parsed.validity().not_after.timestamp();
    Some(UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?))
}

/// A certificate and its key.
#[derive(Debug)]
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

/// A server config with `identity`, offering HTTP/2 and HTTP/1.1, that verifies a
/// client certificate against `client_roots` when the client sends one (the handlers
/// decide what needs one).
pub fn server_config(
    identity: Identity,
    client_roots: RootCertStore,
) -> Result<rustls::ServerConfig, rustls::Error> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        client_roots.into(),
        provider(),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| rustls::Error::General(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain, identity.key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// A client config that trusts `roots`, presenting `identity` when given.
pub fn client_config(
    roots: RootCertStore,
    identity: Option<Identity>,
) -> Result<rustls::ClientConfig, rustls::Error> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(id) => builder.with_client_auth_cert(id.chain, id.key)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// A client config for joining: the server's chain must end in a CA whose SHA-256 is
/// `pin` (the server sends its CA along), and verify against it as usual. Nothing
/// else is trusted, so a join token sent on it reaches only that fleet's controller.
pub fn pinned_client_config(pin: [u8; 32]) -> Result<rustls::ClientConfig, rustls::Error> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned { pin }))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

#[derive(Debug)]
struct Pinned {
    pin: [u8; 32],
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| Sha256::digest(c.as_ref()).as_slice() == self.pin)
            .ok_or_else(|| {
                rustls::Error::General(
                    "the server's CA does not match the pinned fingerprint (--ca-hash): \
                     wrong controller, or a machine in between"
                        .into(),
                )
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots.into(), provider())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Connects tonic channels over TLS to whatever address the channel's URI names,
/// checking that the server's certificate names `name` (not the address).
#[derive(Clone)]
pub struct Connector {
    tls: TlsConnector,
    name: ServerName<'static>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("name", &self.name)
            .finish()
    }
}

impl Connector {
    pub fn new(config: Arc<rustls::ClientConfig>, name: &str) -> Result<Self, String> {
        let name = ServerName::try_from(name.to_string())
            .map_err(|_| format!("{name:?} is not a name a certificate can carry"))?;
        Ok(Self {
            tls: TlsConnector::from(config),
            name,
        })
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<http::Uri> for Connector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let tls = self.tls.clone();
        let name = self.name.clone();
        Box::pin(async move {
            let authority = uri
                .authority()
                .ok_or_else(|| format!("{uri} has no host:port"))?;
            let port = authority.port_u16().unwrap_or(443);
            let host = authority
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']');
            let tcp = match host.parse::<std::net::IpAddr>() {
                Ok(ip) => TcpStream::connect(SocketAddr::new(ip, port)).await?,
                Err(_) => TcpStream::connect((host, port)).await?,
            };
            let _ = tcp.set_nodelay(true);
            let stream = tls.connect(name, tcp).await?;
            Ok(TokioIo::new(stream))
        })
    }
}

/// Reads a PEM certificate chain.
pub fn read_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject as _;
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in it".into());
    }
    Ok(certs)
}

/// Reads a PEM private key.
pub fn read_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    use rustls::pki_types::pem::PemObject as _;
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| format!("not a PEM private key: {e}"))
}

/// A root store holding `ca`.
pub fn roots(ca: &[CertificateDer<'static>]) -> Result<RootCertStore, rustls::Error> {
    let mut roots = RootCertStore::empty();
    for cert in ca {
        roots.add(cert.clone())?;
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names() {
        assert!(check_node_name("web-1").is_ok());
        assert!(check_node_name("web.1").is_ok());
        assert!(check_node_name("bad name").is_err());
        assert!(check_node_name("-x").is_err());
    }

    #[test]
    fn fingerprints_round_trip() {
        let der = CertificateDer::from(vec![1u8, 2, 3]);
        let text = fingerprint(&der);
        assert_eq!(
            parse_fingerprint(&text).unwrap(),
            *Sha256::digest([1u8, 2, 3])
        );
        assert!(parse_fingerprint("sha256:zz").is_err());
    }
}
