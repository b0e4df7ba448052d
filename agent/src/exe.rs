//! Executable validation: what a restart checks before anything is spawned.
//!
//! The path is canonicalized (so a symlink cannot smuggle a binary in from elsewhere),
//! must lie inside an allowed directory, be a regular executable file not writable by
//! others, and match the sha256 the caller gave, if any.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A validated executable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExeInfo {
    pub path: PathBuf,
    pub sha256: String,
    pub size: u64,
}

/// Why an executable was refused, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ExeError {
    #[error("exe {path} does not exist ({source}): give the path of the new build")]
    NotFound {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("exe {path} is not a regular file: give the path of the executable itself")]
    NotAFile { path: PathBuf },
    #[error("exe {path} is not executable (mode {mode:o}): chmod +x it")]
    NotExecutable { path: PathBuf, mode: u32 },
    #[error("exe {path} is writable by others (mode {mode:o}): chmod o-w it")]
    WritableByOthers { path: PathBuf, mode: u32 },
    #[error(
        "exe {path}{resolved} is not under an allowed directory ({allowed}): move it there or add its directory with --allowed-exe-dir (allowed_exe_dirs)"
    )]
    NotAllowed {
        path: PathBuf,
        resolved: String,
        allowed: String,
    },
    #[error("sha256 {given:?} is not 64 hex digits: give the output of sha256sum")]
    BadSha256 { given: String },
    #[error(
        "exe {path} has sha256 {actual}, not the expected {expected}: check that the right build was copied"
    )]
    Sha256Mismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("cannot read exe {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl ExeError {
    /// The HTTP status a refusal maps to on the admin routes.
    pub fn http_status(&self) -> u16 {
        match self {
            ExeError::NotAllowed { .. } | ExeError::WritableByOthers { .. } => 403,
            ExeError::Sha256Mismatch { .. } => 412,
            _ => 400,
        }
    }
}

/// Validates executables against the allowed directories, caching digests by file
/// identity so a restart into an unchanged binary doesn't re-hash it.
#[derive(Debug)]
pub struct ExePolicy {
    allowed: Vec<PathBuf>,
    digests: Arc<Digests>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl ExePolicy {
    /// `allowed` directories are canonicalized now; ones that don't exist are kept
    /// as given (they match nothing until they exist and the agent restarts).
    pub fn new(allowed: &[PathBuf]) -> Self {
        let allowed = allowed
            .iter()
            .map(|d| d.canonicalize().unwrap_or_else(|_| d.clone()))
            .collect();
        Self {
            allowed,
            digests: Arc::default(),
        }
    }

    /// Everything a restart checks before spawning; returns the canonical path,
    /// its digest and size.
    pub fn validate(&self, path: &Path, sha256: Option<&str>) -> Result<ExeInfo, ExeError> {
        let expected = expected_digest(sha256)?;
        let (canonical, meta) = self.check(path)?;
        let digest = self.digest(&canonical, &meta)?;
        if let Some(expected) = expected
            && expected != digest
        {
            return Err(ExeError::Sha256Mismatch {
                path: canonical,
                expected,
                actual: digest,
            });
        }
        Ok(ExeInfo {
            path: canonical,
            sha256: digest,
            size: meta.len(),
        })
    }

    /// Like [`ExePolicy::validate`] with no expected digest, but without waiting
    /// for the digest: a known one is used, else `sha256` is left empty while a
    /// thread of its own hashes the file, and [`ExePolicy::complete`] fills it in
    /// later. For the agent's own executable at start: hashing tens of MB took
    /// 25 ms of the 33 ms from spawn to READY.
    pub fn validate_later(&self, path: &Path) -> Result<ExeInfo, ExeError> {
        let (canonical, meta) = self.check(path)?;
        let key = FileKey::of(&meta);
        let (known, start_hashing) = {
            let mut cache = lock(&self.digests);
            let known = cache.digests.get(&key).cloned();
            // One thread per file, however often it is asked for meanwhile.
            let start = known.is_none() && cache.hashing.insert(key.clone());
            (known, start)
        };
        if start_hashing {
            let digests = self.digests.clone();
            let file = canonical.clone();
            std::thread::Builder::new()
                .name("exe-digest".into())
                .spawn(move || {
                    match sha256_file(&file) {
                        Ok(digest) => remember(&digests, key.clone(), digest),
                        Err(e) => tracing::warn!("cannot hash {}: {e}", file.display()),
                    }
                    lock(&digests).hashing.remove(&key);
                })
                .map_err(|source| ExeError::Read {
                    path: canonical.clone(),
                    source,
                })?;
        }
        Ok(ExeInfo {
            path: canonical,
            sha256: known.unwrap_or_default(),
            size: meta.len(),
        })
    }

    /// Fills in the digest of an [`ExePolicy::validate_later`] result once it is
    /// known (and the file is unchanged); returns whether `info` has one.
    pub fn complete(&self, info: &mut ExeInfo) -> bool {
        if info.sha256.is_empty()
            && let Ok(meta) = std::fs::metadata(&info.path)
            && let Some(digest) = lock(&self.digests).digests.get(&FileKey::of(&meta))
        {
            info.sha256.clone_from(digest);
        }
        !info.sha256.is_empty()
    }

    /// The checks on the file itself: allowed directory, regular, executable, not
    /// writable by others. Returns its canonical path and metadata.
    fn check(&self, path: &Path) -> Result<(PathBuf, std::fs::Metadata), ExeError> {
        let canonical = path.canonicalize().map_err(|source| ExeError::NotFound {
            path: path.into(),
            source,
        })?;
        if !self.allowed.iter().any(|dir| canonical.starts_with(dir)) {
            let resolved = if canonical != path {
                format!(" (resolves to {})", canonical.display())
            } else {
                String::new()
            };
            return Err(ExeError::NotAllowed {
                path: path.into(),
                resolved,
                allowed: self
                    .allowed
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        let meta = std::fs::metadata(&canonical).map_err(|source| ExeError::Read {
            path: canonical.clone(),
            source,
        })?;
        let mode = meta.permissions().mode() & 0o7777;
        if !meta.is_file() {
            return Err(ExeError::NotAFile { path: canonical });
        }
        if mode & 0o111 == 0
            || nix::unistd::access(&canonical, nix::unistd::AccessFlags::X_OK).is_err()
        {
            return Err(ExeError::NotExecutable {
                path: canonical,
                mode,
            });
        }
        if mode & 0o002 != 0 {
            return Err(ExeError::WritableByOthers {
                path: canonical,
                mode,
            });
        }
        Ok((canonical, meta))
    }

    fn digest(&self, path: &Path, meta: &std::fs::Metadata) -> Result<String, ExeError> {
        let key = FileKey::of(meta);
        if let Some(hit) = lock(&self.digests).digests.get(&key) {
            return Ok(hit.clone());
        }
        let digest = sha256_file(path).map_err(|source| ExeError::Read {
            path: path.into(),
            source,
        })?;
        remember(&self.digests, key, digest.clone());
        Ok(digest)
    }
}

impl FileKey {
    /// The file's identity and version: a digest stays valid while these hold.
    fn of(meta: &std::fs::Metadata) -> Self {
        FileKey {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        }
    }
}

/// `sha256` as given by a caller: absent, or 64 hex digits (lowercased).
fn expected_digest(sha256: Option<&str>) -> Result<Option<String>, ExeError> {
    match sha256.map(str::trim).filter(|s| !s.is_empty()) {
        Some(s) if s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit()) => {
            Ok(Some(s.to_ascii_lowercase()))
        }
        Some(s) => Err(ExeError::BadSha256 {
            given: s.to_string(),
        }),
        None => Ok(None),
    }
}

/// Digests by file identity, and the files being hashed in the background.
#[derive(Debug, Default)]
struct DigestCache {
    digests: HashMap<FileKey, String>,
    hashing: HashSet<FileKey>,
}

type Digests = Mutex<DigestCache>;

fn lock(digests: &Digests) -> std::sync::MutexGuard<'_, DigestCache> {
    digests.lock().expect("digest cache")
}

/// Keeps a digest; the cache is bounded (a long-lived agent sees few executables).
fn remember(digests: &Digests, key: FileKey, digest: String) {
    let mut cache = lock(digests);
    if cache.digests.len() > 64 {
        cache.digests.clear();
    }
    cache.digests.insert(key, digest);
}

/// Hex sha256 of a file's contents.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn exe(dir: &Path, name: &str, mode: u32) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, b"#!/bin/sh\nexit 0\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn a_digest_left_for_later_is_filled_in_once_known() {
        let dir = tempfile::tempdir().unwrap();
        let path = exe(dir.path(), "app", 0o755);
        let policy = ExePolicy::new(&[dir.path().to_path_buf()]);
        let mut info = policy.validate_later(&path).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !policy.complete(&mut info) {
            assert!(std::time::Instant::now() < deadline, "no digest after 10 s");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(info.sha256, sha256_file(&path).unwrap());
        // Known now: the next one has it at once, and a refusal is still a refusal.
        assert_eq!(policy.validate_later(&path).unwrap().sha256, info.sha256);
        let outside = tempfile::tempdir().unwrap();
        let other = exe(outside.path(), "app", 0o755);
        assert!(matches!(
            policy.validate_later(&other),
            Err(ExeError::NotAllowed { .. })
        ));
    }

    #[test]
    fn accepts_an_allowed_executable_and_reports_its_digest() {
        let dir = tempfile::tempdir().unwrap();
        let path = exe(dir.path(), "app", 0o755);
        let policy = ExePolicy::new(&[dir.path().into()]);
        let info = policy.validate(&path, None).unwrap();
        assert_eq!(info.sha256, sha256_file(&path).unwrap());
        policy.validate(&path, Some(&info.sha256)).unwrap();
    }

    #[test]
    fn refuses_what_it_should_with_a_reason() {
        let allowed = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let policy = ExePolicy::new(&[allowed.path().into()]);

        let missing = policy.validate(&allowed.path().join("nope"), None);
        assert!(matches!(missing, Err(ExeError::NotFound { .. })));

        let plain = exe(allowed.path(), "plain", 0o644);
        let err = policy.validate(&plain, None).unwrap_err();
        assert!(err.to_string().contains("chmod +x"), "{err}");

        let shared = exe(allowed.path(), "shared", 0o777);
        assert!(matches!(
            policy.validate(&shared, None),
            Err(ExeError::WritableByOthers { .. })
        ));

        let foreign = exe(outside.path(), "foreign", 0o755);
        let err = policy.validate(&foreign, None).unwrap_err();
        assert!(err.to_string().contains("--allowed-exe-dir"), "{err}");

        let link = allowed.path().join("link");
        symlink(&foreign, &link).unwrap();
        let err = policy.validate(&link, None).unwrap_err();
        assert!(err.to_string().contains("resolves to"), "{err}");

        let good = exe(allowed.path(), "good", 0o755);
        let err = policy.validate(&good, Some(&"0".repeat(64))).unwrap_err();
        assert_eq!(err.http_status(), 412);
        let err = policy.validate(&good, Some("abc")).unwrap_err();
        assert!(matches!(err, ExeError::BadSha256 { .. }));
    }
}
