//! Handing listening sockets across `exec`: the one module that touches raw file
//! descriptors between `fork` and `exec`, and adopts inherited ones, so it is the
//! one place `unsafe` is allowed.
//!
//! Supervisor side, [`spawn`]: the child gets the listeners as fds `3..3+N` with
//! `LISTEN_FDS`, `LISTEN_FDNAMES` and `LISTEN_PID` (the systemd socket-activation
//! protocol). `LISTEN_PID` must be the child's own PID, which only exists after
//! `fork`, so the environment is built before the fork with a placeholder that the
//! child fills in, and the child execs itself instead of letting `std` do it.
//! It execs the descriptor the executable was checked through
//! (`execveat(fd, "", AT_EMPTY_PATH)`), never the path again: a file renamed over
//! the path after the check does not run. Between fork and exec only
//! async-signal-safe calls are made: no allocation, no locks.
//!
//! Worker side, [`take_listen_fds`]: checks the protocol variables and adopts the fds.
#![allow(unsafe_code)]

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// First inherited fd, as in `sd_listen_fds(3)`.
pub const LISTEN_FDS_START: RawFd = 3;

const LISTEN_PID_PREFIX: &[u8] = b"LISTEN_PID=";
/// Room for any pid's decimal digits.
const PID_DIGITS: usize = 20;

/// What to run and what it inherits.
#[derive(Debug)]
pub struct SpawnSpec<'a> {
    /// The executable's path: the child's `argv[0]`.
    pub exe: &'a Path,
    /// The open executable to run (see [`crate::exe::CheckedExe`]).
    pub exe_fd: BorrowedFd<'a>,
    /// The executable starts with `#!`: the interpreter the kernel starts opens
    /// `/dev/fd/N`, so the descriptor is left open across the exec (the interpreter,
    /// and whatever it starts, inherits it).
    pub script: bool,
    pub args: &'a [OsString],
    /// Variables added to (or replacing those of) the supervisor's environment.
    pub env: Vec<(String, String)>,
    /// Listening sockets, in fd order, with their names (`LISTEN_FDNAMES`).
    pub listeners: Vec<(String, RawFd)>,
}

/// Everything `execve` needs, allocated before `fork`. The raw pointers point into
/// the heap buffers of the vectors owned alongside them, which never move.
struct ExecImage {
    exe_fd: RawFd,
    script: bool,
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    env: Vec<Vec<u8>>,
    env_ptrs: Vec<*const libc::c_char>,
    listen_pid: *mut u8,
    fds: Vec<RawFd>,
    parent: libc::pid_t,
}

// SAFETY: the pointers only refer to buffers owned by the same struct, and the
// struct is only used by the child between fork and exec, where there is one thread.
unsafe impl Send for ExecImage {}
unsafe impl Sync for ExecImage {}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::other("argument contains a NUL byte"))
}

impl ExecImage {
    fn new(spec: &SpawnSpec<'_>) -> io::Result<Self> {
        let mut argv = vec![cstring(spec.exe.as_os_str().as_bytes())?];
        for arg in spec.args {
            argv.push(cstring(arg.as_bytes())?);
        }
        let overridden = |key: &OsStr| {
            let key = key.as_bytes();
            key.starts_with(b"LISTEN_")
                || key == b"NOTIFY_SOCKET"
                || spec.env.iter().any(|(k, _)| k.as_bytes() == key)
        };
        let mut env: Vec<Vec<u8>> = std::env::vars_os()
            .filter(|(k, _)| !overridden(k))
            .map(|(k, v)| [k.as_bytes(), b"=", v.as_bytes(), b"\0"].concat())
            .collect();
        for (k, v) in &spec.env {
            env.push([k.as_bytes(), b"=", v.as_bytes(), b"\0"].concat());
        }
        let names: Vec<&str> = spec.listeners.iter().map(|(n, _)| n.as_str()).collect();
        env.push(format!("LISTEN_FDS={}\0", spec.listeners.len()).into_bytes());
        env.push(format!("LISTEN_FDNAMES={}\0", names.join(":")).into_bytes());
        if env.iter().any(|e| e[..e.len() - 1].contains(&0)) {
            return Err(io::Error::other("environment contains a NUL byte"));
        }
        let mut placeholder = LISTEN_PID_PREFIX.to_vec();
        placeholder.resize(LISTEN_PID_PREFIX.len() + PID_DIGITS + 1, 0);
        env.push(placeholder);

        let listen_pid = env.last_mut().expect("just pushed").as_mut_ptr();
        let mut env_ptrs: Vec<*const libc::c_char> =
            env.iter().map(|e| e.as_ptr().cast()).collect();
        env_ptrs.push(std::ptr::null());
        let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        argv_ptrs.push(std::ptr::null());
        Ok(Self {
            exe_fd: spec.exe_fd.as_raw_fd(),
            script: spec.script,
            _argv: argv,
            argv_ptrs,
            env,
            env_ptrs,
            listen_pid,
            fds: spec.listeners.iter().map(|(_, fd)| *fd).collect(),
            // SAFETY: getpid has no preconditions.
            parent: unsafe { libc::getpid() },
        })
    }

    /// Runs in the child after `fork`. Only async-signal-safe calls; returns only on error.
    fn exec(&mut self) -> io::Error {
        // SAFETY: every call below is async-signal-safe and gets valid arguments: fds
        // the parent keeps open across the fork, and buffers allocated before it.
        unsafe {
            // Die with the supervisor. If it already died before prctl took effect we
            // were reparented: give up rather than serve without a supervisor.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                return io::Error::last_os_error();
            }
            if libc::getppid() != self.parent {
                return io::Error::from_raw_os_error(libc::ESRCH);
            }
            // A clean signal state: nothing blocked, SIGPIPE back to its default.
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);

            // Move the listeners to 3..3+N. First duplicate every one, and the
            // executable, above that range (close-on-exec), so no dup2 below can
            // overwrite a source not yet moved.
            let n = self.fds.len() as RawFd;
            for fd in self.fds.iter_mut().chain(std::iter::once(&mut self.exe_fd)) {
                let high = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, LISTEN_FDS_START + n);
                if high < 0 {
                    return io::Error::last_os_error();
                }
                *fd = high;
            }
            // A script's interpreter reads it from /dev/fd/N after the exec.
            if self.script && libc::fcntl(self.exe_fd, libc::F_SETFD, 0) < 0 {
                return io::Error::last_os_error();
            }
            for (i, fd) in self.fds.iter().enumerate() {
                // dup2 clears close-on-exec on the target: exactly these fds survive exec.
                if libc::dup2(*fd, LISTEN_FDS_START + i as RawFd) < 0 {
                    return io::Error::last_os_error();
                }
            }

            // LISTEN_PID=<our pid>, written into the buffer reserved before fork.
            let mut pid = libc::getpid() as u64;
            let mut digits = [0u8; PID_DIGITS];
            let mut len = 0;
            loop {
                digits[len] = b'0' + (pid % 10) as u8;
                len += 1;
                pid /= 10;
                if pid == 0 {
                    break;
                }
            }
            let out = self.listen_pid.add(LISTEN_PID_PREFIX.len());
            for i in 0..len {
                *out.add(i) = digits[len - 1 - i];
            }
            *out.add(len) = 0;

            exec_fd(self.exe_fd, &self.argv_ptrs, &self.env_ptrs);
            io::Error::last_os_error()
        }
    }
}

/// `execveat(fd, "", argv, envp, AT_EMPTY_PATH)`: runs the open file itself.
///
/// # Safety
/// `argv` and `envp` are NULL-terminated arrays of NUL-terminated strings.
#[cfg(any(target_os = "linux", target_os = "android"))]
unsafe fn exec_fd(fd: RawFd, argv: &[*const libc::c_char], envp: &[*const libc::c_char]) {
    // The raw system call: glibc's wrapper is recent, musl's differs.
    // SAFETY: per the function's contract; on success it does not return.
    unsafe {
        libc::syscall(
            libc::SYS_execveat,
            fd,
            c"".as_ptr(),
            argv.as_ptr(),
            envp.as_ptr(),
            libc::AT_EMPTY_PATH,
        );
    }
}

/// `fexecve(fd, argv, envp)` where there is no `execveat`.
///
/// # Safety
/// `argv` and `envp` are NULL-terminated arrays of NUL-terminated strings.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
unsafe fn exec_fd(fd: RawFd, argv: &[*const libc::c_char], envp: &[*const libc::c_char]) {
    // SAFETY: per the function's contract; on success it does not return.
    unsafe {
        libc::fexecve(fd, argv.as_ptr(), envp.as_ptr());
    }
}

/// Starts a worker with the listeners as fds 3.. and the given environment. Its
/// stdin is /dev/null, stdout is shared, stderr is piped back to the caller.
pub fn spawn(spec: &SpawnSpec<'_>) -> io::Result<Child> {
    let mut image = ExecImage::new(spec)?;
    let _ = &image.env; // owned for the pointers' sake
    let mut cmd = Command::new(spec.exe);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped());
    // SAFETY: the closure only makes async-signal-safe calls (see ExecImage::exec).
    unsafe {
        cmd.pre_exec(move || Err(image.exec()));
    }
    cmd.spawn()
}

/// Why the inherited listeners could not be adopted.
#[derive(Debug, thiserror::Error)]
pub enum ListenFdsError {
    #[error("LISTEN_FDS is not set: this process was not started by a fleet-agent supervisor")]
    Missing,
    #[error("LISTEN_PID is {0}, not this process ({1}): the fds are meant for another process")]
    WrongPid(String, u32),
    #[error("{0} is not valid: {1}")]
    Invalid(&'static str, String),
    #[error("fd {0} is not a listening socket: {1}")]
    NotListening(RawFd, String),
}

/// Adopts the listeners passed by socket activation, with their names, and removes
/// the protocol variables from the environment so children don't see them.
///
/// Must run before any other thread starts (it edits the environment).
pub fn take_listen_fds() -> Result<Vec<(String, std::net::TcpListener)>, ListenFdsError> {
    let var = |k| std::env::var(k).ok();
    let count = var("LISTEN_FDS").ok_or(ListenFdsError::Missing)?;
    let count: usize = count
        .parse()
        .map_err(|_| ListenFdsError::Invalid("LISTEN_FDS", count.clone()))?;
    let me = std::process::id();
    match var("LISTEN_PID") {
        Some(pid) if pid == me.to_string() => {}
        Some(pid) => return Err(ListenFdsError::WrongPid(pid, me)),
        None => return Err(ListenFdsError::Invalid("LISTEN_PID", "unset".into())),
    }
    let names: Vec<String> = var("LISTEN_FDNAMES")
        .map(|n| n.split(':').map(String::from).collect())
        .unwrap_or_default();
    if names.len() != count {
        return Err(ListenFdsError::Invalid(
            "LISTEN_FDNAMES",
            format!("{} names for {count} fds", names.len()),
        ));
    }
    // SAFETY: documented precondition: no other thread runs yet.
    unsafe {
        for k in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"] {
            std::env::remove_var(k);
        }
    }
    let mut out = Vec::with_capacity(count);
    for (i, name) in names.into_iter().enumerate() {
        let fd = LISTEN_FDS_START + i as RawFd;
        // SAFETY: fd is ours by the activation protocol (LISTEN_PID matched) and
        // nothing else in this process has taken ownership of it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let listening = nix::sys::socket::getsockopt(&owned, nix::sys::socket::sockopt::AcceptConn)
            .map_err(|e| ListenFdsError::NotListening(fd, e.to_string()))?;
        if !listening {
            return Err(ListenFdsError::NotListening(
                fd,
                "not in listen state".into(),
            ));
        }
        nix::fcntl::fcntl(
            &owned,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .map_err(|e| ListenFdsError::NotListening(fd, e.to_string()))?;
        let listener = std::net::TcpListener::from(owned);
        listener
            .set_nonblocking(true)
            .map_err(|e| ListenFdsError::NotListening(fd, e.to_string()))?;
        debug_assert_eq!(listener.as_raw_fd(), fd);
        out.push((name, listener));
    }
    Ok(out)
}

/// Removes a variable before any other thread starts.
pub fn remove_env_early(key: &str) {
    // SAFETY: callers run this at start-up, before the runtime spawns threads.
    unsafe { std::env::remove_var(key) }
}
