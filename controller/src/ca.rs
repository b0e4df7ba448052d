//! The fleet CA: created on the controller's first start with `--tls` (in its TLS
//! directory, the key owner-only) or given with `--ca-cert/--ca-key`. It signs the
//! controller's own certificate (made fresh at every start, never written to disk)
//! and each node's certificate from the node's request, naming only the node id the
//! join token allowed — whatever names the request asked for.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fleet_net::tls::{self as ftls, Identity};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::client::danger::ServerCertVerifier as _;
use rustls::pki_types::CertificateDer;

/// The CA's own lifetime when Fleet creates it.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Backdating of every certificate, for clocks a little behind.
const BACKDATE: Duration = Duration::from_secs(5 * 60);
/// Largest certificate request taken (a P-256 request is under 1 KiB).
const MAX_CSR: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{0}")]
    Io(String),
    #[error("{0}")]
    Cert(String),
}

/// A certificate for a node, as sent back.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub not_after: SystemTime,
    pub renew_at: SystemTime,
}

pub struct FleetCa {
    cert: CertificateDer<'static>,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for FleetCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetCa")
            .field("fingerprint", &self.fingerprint())
            .finish()
    }
}

fn cert_err(what: &str) -> impl Fn(rcgen::Error) -> CaError + '_ {
    move |e| CaError::Cert(format!("{what}: {e}"))
}

impl FleetCa {
    /// The CA in `dir` (`ca.crt`, `ca.key`), created there if neither exists.
    pub fn load_or_create(dir: &Path) -> Result<Self, CaError> {
        let (cert, key) = (dir.join("ca.crt"), dir.join("ca.key"));
        match (cert.exists(), key.exists()) {
            (true, true) => Self::load(&cert, &key),
            (false, false) => Self::create(dir, &cert, &key),
            _ => Err(CaError::Io(format!(
                "{} holds only one of ca.crt and ca.key: restore the other, or move both away \
                 to create a new CA (every agent must then join again)",
                dir.display()
            ))),
        }
    }

    /// The CA from PEM files (`--ca-cert`, `--ca-key`).
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, CaError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p)
                .map_err(|e| CaError::Io(format!("cannot read {}: {e}", p.display())))
        };
        let mode = std::fs::metadata(key_path)
            .map_err(|e| CaError::Io(format!("cannot read {}: {e}", key_path.display())))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(CaError::Io(format!(
                "the CA key {} can be read by others (mode {:o}): `chmod 600` it",
                key_path.display(),
                mode & 0o777
            )));
        }
        let cert_pem = read(cert_path)?;
        let key = KeyPair::from_pem(&read(key_path)?).map_err(cert_err("the CA key"))?;
        let cert = ftls::read_certs(cert_pem.as_bytes())
            .map_err(|e| CaError::Cert(format!("{}: {e}", cert_path.display())))?
            .remove(0);
        let issuer =
            Issuer::from_ca_cert_der(&cert, key).map_err(cert_err("the CA certificate"))?;
        let ca = Self {
            cert,
            cert_pem,
            issuer,
        };
        // A key that does not match its certificate would sign certificates nobody trusts.
        ca.check_pair().map_err(|e| {
            CaError::Cert(format!(
                "{} and {} do not belong together: {e}",
                cert_path.display(),
                key_path.display()
            ))
        })?;
        Ok(ca)
    }

    fn create(dir: &Path, cert_path: &Path, key_path: &Path) -> Result<Self, CaError> {
        let io = |e: std::io::Error| {
            CaError::Io(format!("cannot create the CA in {}: {e}", dir.display()))
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let key = KeyPair::generate().map_err(cert_err("CA key"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "Fleet CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        set_validity(&mut params, CA_LIFETIME)?;
        let cert = params
            .self_signed(&key)
            .map_err(cert_err("CA certificate"))?;
        // The key first, owner-only and never over an existing file.
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(key_path)
            .map_err(io)?;
        file.write_all(key.serialize_pem().as_bytes()).map_err(io)?;
        file.sync_all().map_err(io)?;
        let cert_pem = cert.pem();
        let tmp = dir.join("ca.crt.tmp");
        std::fs::write(&tmp, &cert_pem).map_err(io)?;
        std::fs::rename(&tmp, cert_path).map_err(io)?;
        tracing::info!("created the fleet CA in {}", dir.display());
        Ok(Self {
            cert: cert.der().clone(),
            cert_pem,
            issuer: Issuer::new(params, key),
        })
    }

    fn check_pair(&self) -> Result<(), String> {
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let mut params =
            CertificateParams::new(vec!["check.fleet".to_string()]).map_err(|e| e.to_string())?;
        set_validity(&mut params, Duration::from_secs(60)).map_err(|e| e.to_string())?;
        let leaf = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| e.to_string())?;
        let roots = ftls::roots(std::slice::from_ref(&self.cert)).map_err(|e| e.to_string())?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots.into(),
            ftls::provider(),
        )
        .build()
        .map_err(|e| e.to_string())?;
        let name = rustls::pki_types::ServerName::try_from("check.fleet").expect("valid name");
        verifier
            .verify_server_cert(
                leaf.der(),
                &[],
                &name,
                &[],
                rustls::pki_types::UnixTime::now(),
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// `sha256:HEX`: what agents pin (`--ca-hash`).
    pub fn fingerprint(&self) -> String {
        ftls::fingerprint(&self.cert)
    }

    /// A fresh certificate for the controller: [`ftls::CONTROLLER_NAME`] plus `names`
    /// (DNS names or IP addresses operators' browsers and `fleetctl` may use), for
    /// serving and as the client certificate it calls agents with.
    pub fn controller_identity(
        &self,
        names: &[String],
        ttl: Duration,
    ) -> Result<Identity, CaError> {
        let key = KeyPair::generate().map_err(cert_err("controller key"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "fleet-controller");
        params.distinguished_name = dn;
        params.subject_alt_names = std::iter::once(ftls::CONTROLLER_NAME.to_string())
            .chain(names.iter().cloned())
            .map(|n| san(&n))
            .collect::<Result<_, _>>()?;
        leaf_usages(&mut params);
        set_validity(&mut params, ttl)?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(cert_err("controller certificate"))?;
        let key = ftls::read_key(key.serialize_pem().as_bytes()).map_err(CaError::Cert)?;
        Ok(Identity {
            chain: vec![cert.der().clone(), self.cert.clone()],
            key,
        })
    }

    /// Signs `csr_pem`'s key for `node_id` alone, valid for `ttl`.
    pub fn issue_node(
        &self,
        node_id: &str,
        csr_pem: &str,
        ttl: Duration,
    ) -> Result<Issued, CaError> {
        if csr_pem.len() > MAX_CSR {
            return Err(CaError::Cert(format!(
                "the certificate request is {} bytes; at most {MAX_CSR} are taken",
                csr_pem.len()
            )));
        }
        ftls::check_node_name(node_id).map_err(CaError::Cert)?;
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::Cert(format!("the certificate request is not valid: {e}")))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, node_id);
        params.distinguished_name = dn;
        params.subject_alt_names = vec![san(&ftls::node_name(node_id))?];
        leaf_usages(&mut params);
        let not_after = set_validity(&mut params, ttl)?;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(cert_err("node certificate"))?;
        let now = SystemTime::now();
        let renew_at = now + not_after.duration_since(now).unwrap_or_default() * 2 / 3;
        Ok(Issued {
            cert_pem: cert.pem(),
            not_after,
            renew_at,
        })
    }
}

/// Where a controller keeps its CA by default: beside its database.
pub fn default_dir(db: &Path) -> PathBuf {
    db.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("fleet-tls"), |p| p.join("fleet-tls"))
}

fn san(name: &str) -> Result<SanType, CaError> {
    if let Ok(ip) = name.parse::<std::net::IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    name.to_string()
        .try_into()
        .map(SanType::DnsName)
        .map_err(|e| CaError::Cert(format!("{name:?} cannot be a certificate name: {e}")))
}

fn leaf_usages(params: &mut CertificateParams) {
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
}

/// From a little before now to `ttl` after; returns the end.
fn set_validity(params: &mut CertificateParams, ttl: Duration) -> Result<SystemTime, CaError> {
    let now = SystemTime::now();
    let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let not_after = now + ttl;
    params.not_before = time::OffsetDateTime::from_unix_timestamp(secs(now - BACKDATE))
        .map_err(|e| CaError::Cert(e.to_string()))?;
    params.not_after = time::OffsetDateTime::from_unix_timestamp(secs(not_after))
        .map_err(|e| CaError::Cert(e.to_string()))?;
    // Whole seconds, as the certificate says.
    Ok(UNIX_EPOCH + Duration::from_secs(secs(not_after) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr(names: Vec<String>) -> (KeyPair, String) {
        let key = KeyPair::generate().unwrap();
        let csr = CertificateParams::new(names)
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        (key, csr)
    }

    #[test]
    fn creates_reloads_and_signs_only_the_allowed_name() {
        let dir = tempfile::tempdir().unwrap();
        let ca = FleetCa::load_or_create(dir.path()).unwrap();
        let mode = std::fs::metadata(dir.path().join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = FleetCa::load_or_create(dir.path()).unwrap();
        assert_eq!(ca.fingerprint(), again.fingerprint());

        // The request asks for the controller's name; the certificate names web-1 only.
        let (_key, csr) = csr(vec![ftls::CONTROLLER_NAME.into()]);
        let issued = again
            .issue_node("web-1", &csr, Duration::from_secs(3600))
            .unwrap();
        let der = ftls::read_certs(issued.cert_pem.as_bytes())
            .unwrap()
            .remove(0);
        assert!(ftls::names(&der, "web-1.node.fleet"));
        assert!(!ftls::names(&der, ftls::CONTROLLER_NAME));
        assert!(!ftls::names(&der, "web-2.node.fleet"));
        let left = issued.not_after.duration_since(SystemTime::now()).unwrap();
        assert!(left > Duration::from_secs(3590) && left <= Duration::from_secs(3600));
    }

    #[test]
    fn refuses_a_shared_key_and_half_a_ca() {
        let dir = tempfile::tempdir().unwrap();
        FleetCa::load_or_create(dir.path()).unwrap();
        let key = dir.path().join("ca.key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = FleetCa::load_or_create(dir.path()).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        std::fs::remove_file(&key).unwrap();
        let err = FleetCa::load_or_create(dir.path()).unwrap_err().to_string();
        assert!(err.contains("only one of"), "{err}");
    }

    #[test]
    fn refuses_garbage_and_bad_ids() {
        let dir = tempfile::tempdir().unwrap();
        let ca = FleetCa::load_or_create(dir.path()).unwrap();
        let err = ca
            .issue_node("web-1", "not a csr", Duration::from_secs(60))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not valid"), "{err}");
        let (_k, csr) = csr(vec![]);
        let err = ca
            .issue_node("bad id", &csr, Duration::from_secs(60))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot be named"), "{err}");
    }
}
