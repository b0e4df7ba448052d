//! Files a test puts in its temp dir: copies of the agent binary, fixture
//! programs from `tests/fixtures`, a TLS certificate, and their sha256.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The `fleet-agent` binary built next to the running test executable
/// (`target/<profile>/deps/<test>` → `target/<profile>/fleet-agent`).
pub fn agent_binary() -> PathBuf {
    binary("fleet-agent")
}

/// A binary of the workspace, built into the same `target/<profile>` as the running
/// executable: a test (in `target/<profile>/deps`) or a benchmark program (beside the
/// binaries). Panics saying how to build it when it is not there.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("an executable lives in a directory");
    let profile_dir = if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("target/<profile>")
    } else {
        dir
    };
    let binary = profile_dir.join(name);
    assert!(
        binary.is_file(),
        "{} does not exist: run `cargo build --workspace --bins` first",
        binary.display()
    );
    binary
}

/// Copy the agent binary into `dir` as `name` (an executable at a new path, for
/// "restart into a new executable").
pub fn copy_agent_binary(dir: &Path, name: &str) -> PathBuf {
    let to = dir.join(name);
    std::fs::copy(agent_binary(), &to).expect("copy the agent binary");
    chmod(&to, 0o755);
    to
}

/// `tests/fixtures/<name>`.
pub fn fixture_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// Copy `tests/fixtures/<name>` into `dir` as an executable (mode 0755), so it is
/// inside the test's allowed directory and executable whatever git checked out.
pub fn install_fixture(dir: &Path, name: &str) -> PathBuf {
    let to = dir.join(name);
    std::fs::copy(fixture_path(name), &to).unwrap_or_else(|e| panic!("copy fixture {name}: {e}"));
    chmod(&to, 0o755);
    to
}

/// Set the permission bits of `path`.
pub fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

/// Lowercase hex sha256 of a file.
pub fn sha256_hex(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    format!("{:x}", Sha256::digest(&bytes))
}

/// A self-signed certificate for "localhost" and 127.0.0.1, written as PEM files.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert_pem: PathBuf,
    pub key_pem: PathBuf,
    /// The certificate (DER) for the client to trust.
    pub cert_der: Vec<u8>,
}

impl TlsFiles {
    /// Generate a certificate with rcgen and write `cert.pem` and `key.pem` into `dir`.
    pub fn generate(dir: &Path) -> TlsFiles {
        let certified =
            rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
                .expect("generate a self-signed certificate");
        let cert_pem = dir.join("cert.pem");
        let key_pem = dir.join("key.pem");
        std::fs::write(&cert_pem, certified.cert.pem()).expect("write cert.pem");
        std::fs::write(&key_pem, certified.signing_key.serialize_pem()).expect("write key.pem");
        TlsFiles {
            cert_pem,
            key_pem,
            cert_der: certified.cert.der().to_vec(),
        }
    }
}
