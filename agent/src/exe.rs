//! Executable validation: what a restart checks before anything is spawned, and the
//! guarantee that what was checked is what runs.
//!
//! The path must be absolute; its symlinks are resolved (operators point
//! `/opt/app/current` at `releases/v2/app`) and the resolved path must lie inside an
//! allowed directory. The file is then opened once, walking down from the allowed
//! directory one component at a time without following symlinks ([`open`]), and
//! everything else is decided on that descriptor: a regular executable file, not
//! setuid/setgid, owned by the agent's user or root, neither it nor a directory on
//! the way writable by its group or others, not over the size cap, and matching the
//! sha256 the caller gave, if any. The digest is computed from the descriptor on a
//! thread of its own (the supervisor's runtime has one thread), and the worker is
//! started from the same descriptor ([`crate::process::spawn`], `execveat`), never
//! again by path: a file renamed over the path after the check does not run.

mod open;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A validated executable: its resolved path, digest and size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExeInfo {
    pub path: PathBuf,
    pub sha256: String,
    pub size: u64,
    /// The identity of the file that was checked, to fill in a digest computed later
    /// (see [`ExePolicy::complete`]) without looking at the path again.
    #[serde(skip)]
    identity: Option<FileKey>,
}

/// An executable that passed every check, with the open descriptor it was checked
/// through: spawn from [`CheckedExe::fd`], and exactly this file runs.
#[derive(Debug, Clone)]
pub struct CheckedExe {
    pub info: ExeInfo,
    file: Arc<File>,
    script: bool,
}

impl CheckedExe {
    /// The descriptor that was checked and hashed (close-on-exec).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Whether the file starts with `#!`: the kernel then runs its interpreter on
    /// `/dev/fd/N`, so the descriptor must survive the `exec`.
    pub fn is_script(&self) -> bool {
        self.script
    }
}

/// Why an executable was refused, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ExeError {
    #[error(
        "exe path {path} is relative: give an absolute path (it would be resolved against the agent's working directory)"
    )]
    Relative { path: PathBuf },
    #[error("exe {path} does not exist ({source}): give the path of the new build")]
    NotFound {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("exe {path} is not a regular file: give the path of the executable itself")]
    NotAFile { path: PathBuf },
    #[error("exe {path} is not executable (mode {mode:o}): chmod +x it")]
    NotExecutable { path: PathBuf, mode: u32 },
    #[error("exe {path} is writable by its group or others (mode {mode:o}): chmod g-w,o-w {path}")]
    WritableByOthers { path: PathBuf, mode: u32 },
    #[error(
        "directory {dir} (on the way to exe {path}) is writable by its group or others (mode {mode:o}), so its files can be swapped: chmod g-w,o-w {dir}"
    )]
    WritableDir {
        dir: PathBuf,
        path: PathBuf,
        mode: u32,
    },
    #[error(
        "{what} {path} is owned by uid {uid}, not by the agent's user (uid {agent}) or root: chown it to one of them"
    )]
    NotOwned {
        what: &'static str,
        path: PathBuf,
        uid: u32,
        agent: u32,
    },
    #[error("exe {path} is setuid or setgid (mode {mode:o}): chmod u-s,g-s {path}")]
    SetId { path: PathBuf, mode: u32 },
    #[error(
        "exe {path} is {size} bytes, over the limit of {max} bytes: raise restart.max_exe_size (--max-exe-size) if this is the right file"
    )]
    TooLarge { path: PathBuf, size: u64, max: u64 },
    #[error(
        "exe {path}{resolved} is not under an allowed directory ({allowed}): move it there or add its directory with --allowed-exe-dir (allowed_exe_dirs)"
    )]
    NotAllowed {
        path: PathBuf,
        resolved: String,
        allowed: String,
    },
    #[error(
        "exe {path} changed while it was being checked ({what}): try again once the new build is in place"
    )]
    Changed { path: PathBuf, what: String },
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
            ExeError::NotAllowed { .. }
            | ExeError::WritableByOthers { .. }
            | ExeError::WritableDir { .. }
            | ExeError::NotOwned { .. }
            | ExeError::SetId { .. } => 403,
            ExeError::Changed { .. } => 409,
            ExeError::Sha256Mismatch { .. } => 412,
            ExeError::TooLarge { .. } => 413,
            _ => 400,
        }
    }
}

/// Validates executables against the allowed directories, caching digests by file
/// identity so a restart into an unchanged binary doesn't re-hash it.
#[derive(Debug)]
pub struct ExePolicy {
    allowed: Vec<PathBuf>,
    max_size: u64,
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
    /// Executables over `max_size` bytes are refused before they are read.
    pub fn new(allowed: &[PathBuf], max_size: u64) -> Self {
        let allowed = allowed
            .iter()
            .map(|d| d.canonicalize().unwrap_or_else(|_| d.clone()))
            .collect();
        Self {
            allowed,
            max_size,
            digests: Arc::default(),
        }
    }

    /// Everything a restart checks before spawning. The digest is computed on a
    /// thread of its own (unless known for this file version) from the descriptor
    /// that is returned.
    pub async fn validate(
        &self,
        path: &Path,
        sha256: Option<&str>,
    ) -> Result<CheckedExe, ExeError> {
        let expected = expected_digest(sha256)?;
        let opened = self.open(path)?;
        let key = FileKey::of(&opened.meta);
        let known = lock(&self.digests).digests.get(&key).cloned();
        let digest = match known {
            Some(digest) => digest,
            None => {
                let file = opened.file.clone();
                let canonical = opened.path.clone();
                let opened_as = key.clone();
                let hashed = off_thread(move || hash_unchanged(&file, &canonical, &opened_as))
                    .await
                    .map_err(|source| ExeError::Read {
                        path: opened.path.clone(),
                        source,
                    })??;
                remember(&self.digests, key.clone(), hashed.clone());
                hashed
            }
        };
        if let Some(expected) = expected
            && expected != digest
        {
            return Err(ExeError::Sha256Mismatch {
                path: opened.path,
                expected,
                actual: digest,
            });
        }
        Ok(opened.checked(digest, key))
    }

    /// Like [`ExePolicy::validate`] with no expected digest, but without waiting
    /// for the digest: a known one is used, else `sha256` is left empty while a
    /// thread of its own hashes the opened file, and [`ExePolicy::complete`] fills
    /// it in later. For the agent's own executable at start: hashing tens of MB
    /// took 25 ms of the 33 ms from spawn to READY.
    pub fn validate_later(&self, path: &Path) -> Result<CheckedExe, ExeError> {
        let opened = self.open(path)?;
        let key = FileKey::of(&opened.meta);
        let (known, start_hashing) = {
            let mut cache = lock(&self.digests);
            let known = cache.digests.get(&key).cloned();
            // One thread per file, however often it is asked for meanwhile.
            let start = known.is_none() && cache.hashing.insert(key.clone());
            (known, start)
        };
        if start_hashing {
            let digests = self.digests.clone();
            let file = opened.file.clone();
            let canonical = opened.path.clone();
            let hash_key = key.clone();
            let spawned = std::thread::Builder::new()
                .name("exe-digest".into())
                .spawn(move || {
                    match hash_unchanged(&file, &canonical, &hash_key) {
                        Ok(digest) => remember(&digests, hash_key.clone(), digest),
                        Err(e) => tracing::warn!("{e}"),
                    }
                    lock(&digests).hashing.remove(&hash_key);
                });
            if let Err(source) = spawned {
                lock(&self.digests).hashing.remove(&key);
                return Err(ExeError::Read {
                    path: opened.path,
                    source,
                });
            }
        }
        Ok(opened.checked(known.unwrap_or_default(), key))
    }

    /// Fills in the digest of an [`ExePolicy::validate_later`] result once it is
    /// known for the file that was checked; returns whether `info` has one. No
    /// file I/O: the identity was taken from the descriptor.
    pub fn complete(&self, info: &mut ExeInfo) -> bool {
        if info.sha256.is_empty()
            && let Some(key) = &info.identity
            && let Some(digest) = lock(&self.digests).digests.get(key)
        {
            info.sha256.clone_from(digest);
        }
        !info.sha256.is_empty()
    }

    fn open(&self, path: &Path) -> Result<open::Opened, ExeError> {
        open::open(
            &self.allowed,
            path,
            self.max_size,
            nix::unistd::geteuid().as_raw(),
        )
    }
}

impl open::Opened {
    fn checked(self, sha256: String, key: FileKey) -> CheckedExe {
        CheckedExe {
            info: ExeInfo {
                path: self.path,
                sha256,
                size: self.meta.len(),
                identity: Some(key),
            },
            file: self.file,
            script: self.script,
        }
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

/// Runs `f` on a thread of its own, off the supervisor's (its runtime has one
/// thread, which must keep answering while hundreds of MB are hashed). Not tokio's
/// blocking pool: its threads linger after the work is done, so the supervisor's
/// thread count would depend on when it was last asked to hash.
async fn off_thread<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("exe-digest".into())
        .spawn(move || {
            let _ = tx.send(f());
        })?;
    rx.await
        .map_err(|_| std::io::Error::other("the thread hashing the executable panicked"))
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

/// The digest of an open file, refused if the file was written to since it was
/// opened (its owner still may): then neither the digest nor the file can be trusted.
/// Only size and mtime count here: the ctime also moves when a hard link to the file
/// is made or removed, which is how releases are often put in place.
fn hash_unchanged(file: &File, path: &Path, opened_as: &FileKey) -> Result<String, ExeError> {
    let read = |source| ExeError::Read {
        path: path.into(),
        source,
    };
    let digest = sha256_of(file).map_err(read)?;
    let after = FileKey::of(&file.metadata().map_err(read)?);
    if (after.size, after.mtime_ns) != (opened_as.size, opened_as.mtime_ns) {
        return Err(ExeError::Changed {
            path: path.into(),
            what: "it was written to while it was hashed".into(),
        });
    }
    Ok(digest)
}

/// Hex sha256 of an open file's contents, read by offset (`pread`), so clones of
/// the descriptor share no file position.
pub fn sha256_of(file: &File) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut offset = 0u64;
    loop {
        let n = match file.read_at(&mut buf, offset) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        offset += n as u64;
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Hex sha256 of a file's contents (tests compare digests with it).
#[cfg(test)]
fn sha256_file(path: &Path) -> std::io::Result<String> {
    sha256_of(&File::open(path)?)
}

#[cfg(test)]
mod tests;
