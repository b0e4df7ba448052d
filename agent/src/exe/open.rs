//! Opening an executable once, safely: resolve the path, pick the allowed directory
//! it lies in, then walk down from that directory with `openat` and `O_NOFOLLOW`, so
//! a component swapped for a symlink after the path was resolved is refused rather
//! than followed. Every check is made on the descriptors (`fstat`), not on the path.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use super::ExeError;

/// An executable that passed the checks on its file, opened close-on-exec.
#[derive(Debug)]
pub(super) struct Opened {
    /// The path with every symlink resolved.
    pub path: PathBuf,
    pub file: Arc<File>,
    /// From `fstat` of `file`.
    pub meta: std::fs::Metadata,
    /// The file starts with `#!`.
    pub script: bool,
}

const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);
// O_NONBLOCK: a FIFO put in the file's place must not hang the open (it is then
// refused as not a regular file); it changes nothing for a regular file.
const FILE_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC)
    .union(OFlag::O_NONBLOCK)
    .union(OFlag::O_NOCTTY);

/// Opens `path` if it lies in one of `allowed` (canonical directories) and passes
/// every check on the file and the directories from the allowed one down to it.
/// `agent_uid` is the user (besides root) that may own them.
pub(super) fn open(
    allowed: &[PathBuf],
    path: &Path,
    max_size: u64,
    agent_uid: u32,
) -> Result<Opened, ExeError> {
    if !path.is_absolute() {
        return Err(ExeError::Relative { path: path.into() });
    }
    let canonical = path.canonicalize().map_err(|source| ExeError::NotFound {
        path: path.into(),
        source,
    })?;
    // The most specific allowed directory: the walk checks the directories below it.
    let Some(root) = allowed
        .iter()
        .filter(|dir| canonical.starts_with(dir))
        .max_by_key(|dir| dir.as_os_str().len())
    else {
        return Err(not_allowed(allowed, path, &canonical));
    };
    walk(root, canonical, max_size, agent_uid)
}

/// Opens `canonical` (a resolved path inside the directory `root`) from `root`
/// down, never following a symlink, and checks each descriptor on the way.
pub(super) fn walk(
    root: &Path,
    canonical: PathBuf,
    max_size: u64,
    agent_uid: u32,
) -> Result<Opened, ExeError> {
    let rest = canonical.strip_prefix(root).unwrap_or(&canonical);
    let components: Vec<&OsStr> = rest.iter().collect();
    let Some((name, dirs)) = components.split_last() else {
        return Err(ExeError::NotAFile { path: canonical });
    };

    let mut here = root.to_path_buf();
    let mut dir = nix::fcntl::open(root, DIR_FLAGS, Mode::empty())
        .map_err(|e| walk_error(e, &here, &canonical))?;
    check_dir(&dir, &here, &canonical, agent_uid)?;
    for component in dirs {
        here.push(component);
        dir = nix::fcntl::openat(&dir, *component, DIR_FLAGS, Mode::empty())
            .map_err(|e| walk_error(e, &here, &canonical))?;
        check_dir(&dir, &here, &canonical, agent_uid)?;
    }
    let file = nix::fcntl::openat(&dir, *name, FILE_FLAGS, Mode::empty())
        .map_err(|e| walk_error(e, &canonical, &canonical))?;
    let file = File::from(file);
    let meta = file.metadata().map_err(|source| ExeError::Read {
        path: canonical.clone(),
        source,
    })?;
    check_file(&file, &meta, &canonical, max_size, agent_uid)?;
    let mut magic = [0u8; 2];
    let script = matches!(file.read_at(&mut magic, 0), Ok(2)) && magic == *b"#!";
    Ok(Opened {
        path: canonical,
        file: Arc::new(file),
        meta,
        script,
    })
}

fn not_allowed(allowed: &[PathBuf], path: &Path, canonical: &Path) -> ExeError {
    let resolved = if canonical != path {
        format!(" (resolves to {})", canonical.display())
    } else {
        String::new()
    };
    ExeError::NotAllowed {
        path: path.into(),
        resolved,
        allowed: allowed
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// An `openat` on the way down failed: the path resolved a moment ago, so a
/// component that is now a symlink, not a directory, or gone was changed meanwhile.
fn walk_error(e: Errno, at: &Path, exe: &Path) -> ExeError {
    let what = match e {
        Errno::ELOOP => format!("{} is now a symlink", at.display()),
        // O_DIRECTORY | O_NOFOLLOW on a symlink fails with ENOTDIR.
        Errno::ENOTDIR => format!("{} is now a symlink or not a directory", at.display()),
        Errno::ENOENT => format!("{} is gone", at.display()),
        e => {
            return ExeError::Read {
                path: at.into(),
                source: e.into(),
            };
        }
    };
    ExeError::Changed {
        path: exe.into(),
        what,
    }
}

/// Whoever can write to a directory on the way can swap the file; whoever owns it
/// can make it writable.
fn check_dir(dir: &OwnedFd, at: &Path, exe: &Path, agent_uid: u32) -> Result<(), ExeError> {
    let stat = nix::sys::stat::fstat(dir).map_err(|e| ExeError::Read {
        path: at.into(),
        source: e.into(),
    })?;
    let mode = stat.st_mode & 0o7777;
    if mode & 0o022 != 0 {
        return Err(ExeError::WritableDir {
            dir: at.into(),
            path: exe.into(),
            mode,
        });
    }
    check_owner("directory", at, stat.st_uid, agent_uid)
}

fn check_owner(what: &'static str, path: &Path, uid: u32, agent_uid: u32) -> Result<(), ExeError> {
    if uid == agent_uid || uid == 0 {
        return Ok(());
    }
    Err(ExeError::NotOwned {
        what,
        path: path.into(),
        uid,
        agent: agent_uid,
    })
}

fn check_file(
    file: &File,
    meta: &std::fs::Metadata,
    path: &Path,
    max_size: u64,
    agent_uid: u32,
) -> Result<(), ExeError> {
    let path = || path.to_path_buf();
    let mode = meta.mode() & 0o7777;
    if !meta.is_file() {
        return Err(ExeError::NotAFile { path: path() });
    }
    if mode & 0o111 == 0 || !executable(file) {
        return Err(ExeError::NotExecutable { path: path(), mode });
    }
    if mode & 0o6000 != 0 {
        return Err(ExeError::SetId { path: path(), mode });
    }
    if mode & 0o022 != 0 {
        return Err(ExeError::WritableByOthers { path: path(), mode });
    }
    check_owner("exe", &path(), meta.uid(), agent_uid)?;
    if meta.len() > max_size {
        return Err(ExeError::TooLarge {
            path: path(),
            size: meta.len(),
            max: max_size,
        });
    }
    Ok(())
}

/// Whether this process may execute the open file (permissions for our user, a
/// `noexec` mount): `access` through `/proc/self/fd`, which names the open file
/// itself. Without `/proc` the mode bits checked by the caller have to do.
fn executable(file: &File) -> bool {
    let magic = format!("/proc/self/fd/{}", file.as_raw_fd());
    match nix::unistd::access(magic.as_str(), nix::unistd::AccessFlags::X_OK) {
        Ok(()) => true,
        Err(Errno::ENOENT) => true,
        Err(_) => false,
    }
}
