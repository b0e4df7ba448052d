use std::os::unix::fs::{PermissionsExt, symlink};
use std::time::{Duration, Instant};

use super::*;
use crate::config::DEFAULT_MAX_EXE_SIZE;
use crate::process::{SpawnSpec, spawn};

fn exe(dir: &Path, name: &str, mode: u32) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, b"#!/bin/sh\nexit 0\n").unwrap();
    chmod(&path, mode);
    path
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn policy(dir: &Path) -> ExePolicy {
    ExePolicy::new(&[dir.into()], DEFAULT_MAX_EXE_SIZE)
}

/// The inode behind an open descriptor.
fn ino_of(checked: &CheckedExe) -> u64 {
    nix::sys::stat::fstat(checked.fd()).unwrap().st_ino
}

#[test]
fn a_digest_left_for_later_is_filled_in_once_known() {
    let dir = tempfile::tempdir().unwrap();
    let path = exe(dir.path(), "app", 0o755);
    let policy = policy(dir.path());
    let mut info = policy.validate_later(&path).unwrap().info;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !policy.complete(&mut info) {
        assert!(Instant::now() < deadline, "no digest after 10 s");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(info.sha256, sha256_file(&path).unwrap());
    // Known now: the next one has it at once, and a refusal is still a refusal.
    assert_eq!(
        policy.validate_later(&path).unwrap().info.sha256,
        info.sha256
    );
    let outside = tempfile::tempdir().unwrap();
    let other = exe(outside.path(), "app", 0o755);
    assert!(matches!(
        policy.validate_later(&other),
        Err(ExeError::NotAllowed { .. })
    ));
}

#[tokio::test]
async fn accepts_an_allowed_executable_and_reports_its_digest() {
    let dir = tempfile::tempdir().unwrap();
    let path = exe(dir.path(), "app", 0o755);
    let policy = policy(dir.path());
    let checked = policy.validate(&path, None).await.unwrap();
    assert_eq!(checked.info.sha256, sha256_file(&path).unwrap());
    assert!(checked.is_script());
    policy
        .validate(&path, Some(&checked.info.sha256))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_symlinked_release_is_resolved_and_its_target_reported() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("releases/v2")).unwrap();
    chmod(&dir.path().join("releases"), 0o755);
    chmod(&dir.path().join("releases/v2"), 0o755);
    let app = exe(&dir.path().join("releases/v2"), "app", 0o755);
    let current = dir.path().join("current");
    symlink("releases/v2/app", &current).unwrap();
    let checked = policy(dir.path()).validate(&current, None).await.unwrap();
    assert_eq!(checked.info.path, app.canonicalize().unwrap());
}

/// Every refusal, with its status and the words that say what to do.
#[tokio::test]
async fn refuses_what_it_should_with_a_reason() {
    let allowed = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let policy = policy(allowed.path());
    let refused =
        async |path: &Path, sha256: Option<&str>| policy.validate(path, sha256).await.unwrap_err();
    let says = |err: &ExeError, status: u16, words: &str| {
        assert_eq!(err.http_status(), status, "{err}");
        assert!(err.to_string().contains(words), "{words:?} not in: {err}");
    };

    let err = refused(Path::new("releases/app"), None).await;
    assert!(matches!(err, ExeError::Relative { .. }));
    says(&err, 400, "give an absolute path");

    let err = refused(&allowed.path().join("nope"), None).await;
    assert!(matches!(err, ExeError::NotFound { .. }));

    let plain = exe(allowed.path(), "plain", 0o644);
    says(&refused(&plain, None).await, 400, "chmod +x");

    for mode in [0o775, 0o757, 0o777] {
        let shared = exe(allowed.path(), &format!("shared-{mode:o}"), mode);
        let err = refused(&shared, None).await;
        assert!(matches!(err, ExeError::WritableByOthers { .. }), "{err}");
        says(&err, 403, &format!("chmod g-w,o-w {}", shared.display()));
    }

    let sub = allowed.path().join("team");
    std::fs::create_dir(&sub).unwrap();
    chmod(&sub, 0o775);
    let in_shared_dir = exe(&sub, "app", 0o755);
    let err = refused(&in_shared_dir, None).await;
    assert!(matches!(err, ExeError::WritableDir { .. }), "{err}");
    says(&err, 403, &format!("chmod g-w,o-w {}", sub.display()));

    let open_dir = tempfile::tempdir().unwrap();
    chmod(open_dir.path(), 0o777);
    let in_open_dir = exe(open_dir.path(), "app", 0o755);
    let err = ExePolicy::new(&[open_dir.path().into()], DEFAULT_MAX_EXE_SIZE)
        .validate(&in_open_dir, None)
        .await
        .unwrap_err();
    let open_dir_real = open_dir.path().canonicalize().unwrap();
    says(
        &err,
        403,
        &format!("chmod g-w,o-w {}", open_dir_real.display()),
    );

    for mode in [0o4755, 0o2755] {
        let setid = exe(allowed.path(), &format!("setid-{mode:o}"), mode);
        let err = refused(&setid, None).await;
        assert!(matches!(err, ExeError::SetId { .. }), "{err}");
        says(&err, 403, "chmod u-s,g-s");
    }

    let dir = allowed.path().join("a-dir");
    std::fs::create_dir(&dir).unwrap();
    says(&refused(&dir, None).await, 400, "not a regular file");
    let fifo = allowed.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o755)).unwrap();
    says(&refused(&fifo, None).await, 400, "not a regular file");

    let big = exe(allowed.path(), "big", 0o755);
    let small_cap = ExePolicy::new(&[allowed.path().into()], 8);
    let err = small_cap.validate(&big, None).await.unwrap_err();
    assert!(
        matches!(
            err,
            ExeError::TooLarge {
                size: 17,
                max: 8,
                ..
            }
        ),
        "{err}"
    );
    says(&err, 413, "raise restart.max_exe_size");

    let foreign = exe(outside.path(), "foreign", 0o755);
    says(&refused(&foreign, None).await, 403, "--allowed-exe-dir");
    let link = allowed.path().join("link");
    symlink(&foreign, &link).unwrap();
    says(&refused(&link, None).await, 403, "resolves to");

    let good = exe(allowed.path(), "good", 0o755);
    says(&refused(&good, Some(&"0".repeat(64))).await, 412, "sha256");
    let err = refused(&good, Some("abc")).await;
    assert!(matches!(err, ExeError::BadSha256 { .. }));
}

/// Owned by neither the agent's user nor root: checked as an agent of another user
/// (the file is ours), or, as root, on a file given to `nobody`.
#[test]
fn a_file_of_another_user_is_refused() {
    let allowed = tempfile::tempdir().unwrap();
    let allowed_real = allowed.path().canonicalize().unwrap();
    let app = exe(&allowed_real, "app", 0o755);
    let me = nix::unistd::geteuid().as_raw();
    let err = if me == 0 {
        let nobody = nix::unistd::Uid::from_raw(65534);
        nix::unistd::chown(&app, Some(nobody), None).unwrap();
        open::open(
            std::slice::from_ref(&allowed_real),
            &app,
            DEFAULT_MAX_EXE_SIZE,
            0,
        )
        .unwrap_err()
    } else {
        // An agent running as another user: our directory is refused first.
        open::open(
            std::slice::from_ref(&allowed_real),
            &app,
            DEFAULT_MAX_EXE_SIZE,
            me + 1,
        )
        .unwrap_err()
    };
    assert!(matches!(err, ExeError::NotOwned { .. }), "{err}");
    assert_eq!(err.http_status(), 403);
    assert!(err.to_string().contains("chown"), "{err}");
}

/// A directory on the way that is a symlink by the time it is opened (swapped after
/// the path was resolved) is refused, not followed.
#[test]
fn a_directory_swapped_for_a_symlink_after_resolving_is_refused() {
    let allowed = tempfile::tempdir().unwrap();
    let root = allowed.path().canonicalize().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    exe(elsewhere.path(), "app", 0o755);
    symlink(elsewhere.path(), root.join("v2")).unwrap();
    let err = open::walk(&root, root.join("v2/app"), DEFAULT_MAX_EXE_SIZE, 0).unwrap_err();
    assert!(matches!(err, ExeError::Changed { .. }), "{err}");
    assert!(err.to_string().contains("now a symlink"), "{err}");
    assert_eq!(err.http_status(), 409);
    // The file itself, likewise.
    let target = exe(elsewhere.path(), "real", 0o755);
    symlink(&target, root.join("app")).unwrap();
    let err = open::walk(&root, root.join("app"), DEFAULT_MAX_EXE_SIZE, 0).unwrap_err();
    assert!(matches!(err, ExeError::Changed { .. }), "{err}");
}

/// Build B renamed over the path right after A was checked: the child runs A.
#[tokio::test]
async fn the_child_runs_the_checked_file_even_when_the_path_was_renamed_over() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app");
    std::fs::copy("/bin/sleep", &path).unwrap();
    chmod(&path, 0o755);
    let checked = policy(dir.path()).validate(&path, None).await.unwrap();
    assert!(!checked.is_script());

    let other = dir.path().join("app.new");
    std::fs::copy("/bin/sleep", &other).unwrap();
    chmod(&other, 0o755);
    std::fs::rename(&other, &path).unwrap();
    let now_at_path = std::fs::metadata(&path).unwrap().ino();
    assert_ne!(now_at_path, ino_of(&checked));

    let args = ["30".into()];
    let mut child = spawn(&SpawnSpec {
        exe: &checked.info.path,
        exe_fd: checked.fd(),
        script: false,
        args: &args,
        env: Vec::new(),
        listeners: Vec::new(),
    })
    .unwrap();
    let running = std::fs::metadata(format!("/proc/{}/exe", child.id()));
    child.kill().unwrap();
    child.wait().unwrap();
    let running = running.unwrap().ino();
    assert_eq!(
        running,
        ino_of(&checked),
        "the child runs the checked inode"
    );
    assert_ne!(running, now_at_path);
}

/// A `#!` script runs from its descriptor too: the interpreter reads /dev/fd/N.
#[tokio::test]
async fn a_checked_script_runs_from_its_descriptor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.sh");
    std::fs::write(&path, "#!/bin/sh\nexit 7\n").unwrap();
    chmod(&path, 0o755);
    let checked = policy(dir.path()).validate(&path, None).await.unwrap();
    assert!(checked.is_script());
    let other = dir.path().join("app.sh.new");
    std::fs::write(&other, "#!/bin/sh\nexit 3\n").unwrap();
    chmod(&other, 0o755);
    std::fs::rename(&other, &path).unwrap();

    let mut child = spawn(&SpawnSpec {
        exe: &checked.info.path,
        exe_fd: checked.fd(),
        script: true,
        args: &[],
        env: Vec::new(),
        listeners: Vec::new(),
    })
    .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(7), "the checked script ran: {status:?}");
}
