//! A restart into an executable the node must not run is refused before anything
//! is spawned, over HTTP and gRPC alike, with a message that says what to fix; the
//! node keeps its generation and its worker. So is a second restart while one is
//! in progress.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fleet_proto::v1::{Phase, RestartRequest};
use fleet_tests::harness::{
    SKIP_ROOT, cannot_run, chmod, copy_agent_binary, http_request, install_fixture, restart_path,
    sha256_hex,
};
use fleet_tests::{Agent, AgentOpts};
use tonic::Code;

/// A node that may run executables from `releases` only.
async fn node_with_releases_in(releases: &Path) -> Agent {
    Agent::start(AgentOpts::default().arg("--allowed-exe-dir").arg(releases)).await
}

/// What a refusal must look like on each surface.
struct Refusal<'a> {
    exe: &'a Path,
    sha256: Option<&'a str>,
    http_status: u16,
    grpc_code: Code,
    /// The message names one of these (the input it refused)...
    names_one_of: &'a [&'a str],
    /// ...and says what is wrong with words like one of these.
    says_one_of: &'a [&'a str],
}

/// Ask for the restart over HTTP and gRPC, check both refusals, and check that
/// nothing was spawned and nothing changed.
async fn assert_refused(agent: &Agent, refusal: Refusal<'_>) {
    let generation = agent.generation().await;
    let worker = agent.worker_pid().await;
    let mut events = agent.watch().await;

    let response = agent
        .action(&restart_path(Some(refusal.exe), refusal.sha256))
        .await;
    assert_eq!(
        response.status.as_u16(),
        refusal.http_status,
        "HTTP refusal of {}: {}",
        refusal.exe.display(),
        response.text()
    );
    let body = response.json();
    let message = body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("refusal without an error message: {body}"));
    assert_actionable(message, &refusal);

    let status = agent
        .grpc()
        .await
        .restart(agent.request(RestartRequest {
            exe: refusal.exe.display().to_string(),
            sha256: refusal.sha256.unwrap_or_default().to_string(),
            ..Default::default()
        }))
        .await
        .expect_err("gRPC Restart must be refused");
    assert_eq!(status.code(), refusal.grpc_code, "gRPC refusal: {status}");
    assert_actionable(status.message(), &refusal);

    // Both refusals are events, and no phase between them spawned anything.
    events
        .until_phase(Phase::Refused, Duration::from_secs(5))
        .await;
    events
        .until_phase(Phase::Refused, Duration::from_secs(5))
        .await;
    for phase in [
        Phase::Spawning,
        Phase::WaitingReady,
        Phase::Ready,
        Phase::Draining,
    ] {
        assert!(
            !events.phases().contains(&phase),
            "a refused restart went as far as {phase:?}: {:#?}",
            events.seen
        );
    }
    assert_eq!(
        agent.generation().await,
        generation,
        "the generation is unchanged"
    );
    assert_eq!(agent.worker_pid().await, worker, "the same worker serves");
    assert_eq!(
        agent.running_children(),
        vec![worker],
        "no process was spawned"
    );
}

fn assert_actionable(message: &str, refusal: &Refusal<'_>) {
    let lower = message.to_lowercase();
    assert!(
        refusal.names_one_of.iter().any(|n| message.contains(n)),
        "the refusal {message:?} does not name the input (one of {:?})",
        refusal.names_one_of
    );
    assert!(
        refusal
            .says_one_of
            .iter()
            .any(|w| lower.contains(&w.to_lowercase())),
        "the refusal {message:?} does not say what is wrong (one of {:?})",
        refusal.says_one_of
    );
}

fn text(path: &Path) -> String {
    path.display().to_string()
}

/// The path with its symlinks resolved, as refusals name it.
fn real(path: &Path) -> String {
    text(&std::fs::canonicalize(path).unwrap())
}

#[tokio::test]
async fn a_path_that_does_not_exist_is_refused() {
    let releases = tempfile::tempdir().unwrap();
    let agent = node_with_releases_in(releases.path()).await;
    let missing = releases.path().join("fleet-agent-v9");
    assert_refused(
        &agent,
        Refusal {
            exe: &missing,
            sha256: None,
            http_status: 400,
            grpc_code: Code::InvalidArgument,
            names_one_of: &[&text(&missing)],
            says_one_of: &["does not exist", "no such file", "not found"],
        },
    )
    .await;
}

#[tokio::test]
async fn a_file_that_is_not_executable_is_refused() {
    let releases = tempfile::tempdir().unwrap();
    let agent = node_with_releases_in(releases.path()).await;
    let plain = copy_agent_binary(releases.path(), "fleet-agent-noexec");
    chmod(&plain, 0o644);
    assert_refused(
        &agent,
        Refusal {
            exe: &plain,
            sha256: None,
            http_status: 400,
            grpc_code: Code::InvalidArgument,
            names_one_of: &[&text(&plain)],
            says_one_of: &["executable"],
        },
    )
    .await;
}

#[tokio::test]
async fn a_path_outside_the_allowed_dirs_is_refused() {
    let releases = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let agent = node_with_releases_in(releases.path()).await;
    let outside = copy_agent_binary(elsewhere.path(), "fleet-agent-elsewhere");
    assert_refused(
        &agent,
        Refusal {
            exe: &outside,
            sha256: None,
            http_status: 403,
            grpc_code: Code::PermissionDenied,
            names_one_of: &[&text(&outside)],
            says_one_of: &["allowed"],
        },
    )
    .await;
}

#[tokio::test]
async fn a_symlink_in_an_allowed_dir_pointing_outside_is_refused() {
    let releases = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let agent = node_with_releases_in(releases.path()).await;
    let outside = copy_agent_binary(elsewhere.path(), "fleet-agent-elsewhere");
    let link = releases.path().join("fleet-agent-current");
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    let outside_real: PathBuf = std::fs::canonicalize(&outside).unwrap();
    assert_refused(
        &agent,
        Refusal {
            exe: &link,
            sha256: None,
            http_status: 403,
            grpc_code: Code::PermissionDenied,
            names_one_of: &[&text(&link), &text(&outside), &text(&outside_real)],
            says_one_of: &["allowed"],
        },
    )
    .await;
}

#[tokio::test]
async fn a_sha256_mismatch_is_refused() {
    let releases = tempfile::tempdir().unwrap();
    let agent = node_with_releases_in(releases.path()).await;
    let next = copy_agent_binary(releases.path(), "fleet-agent-next");
    let actual = sha256_hex(&next);
    let expected = "0".repeat(64);
    assert_refused(
        &agent,
        Refusal {
            exe: &next,
            sha256: Some(&expected),
            http_status: 412,
            grpc_code: Code::FailedPrecondition,
            names_one_of: &[&text(&next), &actual, &expected],
            says_one_of: &["sha256"],
        },
    )
    .await;
}

#[tokio::test]
async fn a_relative_path_is_refused() {
    let releases = tempfile::tempdir().unwrap();
    let agent = node_with_releases_in(releases.path()).await;
    copy_agent_binary(agent.dir(), "fleet-agent-next");
    let relative = Path::new("fleet-agent-next");
    assert_refused(
        &agent,
        Refusal {
            exe: relative,
            sha256: None,
            http_status: 400,
            grpc_code: Code::InvalidArgument,
            names_one_of: &["fleet-agent-next"],
            says_one_of: &["give an absolute path"],
        },
    )
    .await;
}

#[tokio::test]
async fn a_group_writable_file_is_refused() {
    let releases = tempfile::tempdir().unwrap();
    let agent = node_with_releases_in(releases.path()).await;
    let shared = copy_agent_binary(releases.path(), "fleet-agent-shared");
    chmod(&shared, 0o775);
    assert_refused(
        &agent,
        Refusal {
            exe: &shared,
            sha256: None,
            http_status: 403,
            grpc_code: Code::PermissionDenied,
            names_one_of: &[&real(&shared)],
            says_one_of: &[&format!("chmod g-w,o-w {}", real(&shared))],
        },
    )
    .await;
}

#[tokio::test]
async fn a_group_writable_directory_inside_the_allowed_one_is_refused() {
    let releases = tempfile::tempdir().unwrap();
    let agent = node_with_releases_in(releases.path()).await;
    let team = releases.path().join("team");
    std::fs::create_dir(&team).unwrap();
    chmod(&team, 0o775);
    let exe = copy_agent_binary(&team, "fleet-agent-next");
    assert_refused(
        &agent,
        Refusal {
            exe: &exe,
            sha256: None,
            http_status: 403,
            grpc_code: Code::PermissionDenied,
            names_one_of: &[&real(&team)],
            says_one_of: &[&format!("chmod g-w,o-w {}", real(&team))],
        },
    )
    .await;
}

#[tokio::test]
async fn a_world_writable_allowed_directory_is_refused() {
    let releases = tempfile::tempdir().unwrap();
    let agent = node_with_releases_in(releases.path()).await;
    let exe = copy_agent_binary(releases.path(), "fleet-agent-next");
    chmod(releases.path(), 0o777);
    let dir = real(releases.path());
    assert_refused(
        &agent,
        Refusal {
            exe: &exe,
            sha256: None,
            http_status: 403,
            grpc_code: Code::PermissionDenied,
            names_one_of: &[&dir],
            says_one_of: &[&format!("chmod g-w,o-w {dir}")],
        },
    )
    .await;
}

#[tokio::test]
async fn a_setuid_file_is_refused() {
    let releases = tempfile::tempdir().unwrap();
    let agent = node_with_releases_in(releases.path()).await;
    let setuid = copy_agent_binary(releases.path(), "fleet-agent-setuid");
    chmod(&setuid, 0o4755);
    assert_refused(
        &agent,
        Refusal {
            exe: &setuid,
            sha256: None,
            http_status: 403,
            grpc_code: Code::PermissionDenied,
            names_one_of: &[&real(&setuid)],
            says_one_of: &["chmod u-s,g-s"],
        },
    )
    .await;
}

/// The agent runs as root here, so root's files are allowed; one given to `nobody`
/// is not. (Only root can give a file away: elsewhere the unit tests cover it.)
#[tokio::test]
async fn a_file_owned_by_another_user_is_refused() {
    if !nix::unistd::geteuid().is_root() {
        cannot_run(
            "a_file_owned_by_another_user_is_refused",
            "only root can chown a file to another user (exe.rs unit tests cover the check)",
            "run the suite as root, as CI does",
            SKIP_ROOT,
        );
        return;
    }
    let releases = tempfile::tempdir().unwrap();
    let agent = node_with_releases_in(releases.path()).await;
    let foreign = copy_agent_binary(releases.path(), "fleet-agent-nobody");
    nix::unistd::chown(&foreign, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
    assert_refused(
        &agent,
        Refusal {
            exe: &foreign,
            sha256: None,
            http_status: 403,
            grpc_code: Code::PermissionDenied,
            names_one_of: &[&real(&foreign)],
            says_one_of: &["not by the agent's user", "chown"],
        },
    )
    .await;
}

/// Over the size cap (512 MiB by default), refused before a byte is read.
#[tokio::test]
async fn an_executable_over_the_size_cap_is_refused_at_once() {
    let releases = tempfile::tempdir().unwrap();
    let agent = node_with_releases_in(releases.path()).await;
    let huge = releases.path().join("huge");
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    chmod(&huge, 0o755);
    let started = std::time::Instant::now();
    let status = agent
        .grpc()
        .await
        .restart(agent.request(RestartRequest {
            exe: text(&huge),
            ..Default::default()
        }))
        .await
        .expect_err("over the cap");
    let took = started.elapsed();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status}");
    // Hashing 1 GiB takes the better part of a second: this was not hashed.
    assert!(
        took < Duration::from_millis(300),
        "refused only after {took:?}"
    );
    assert_refused(
        &agent,
        Refusal {
            exe: &huge,
            sha256: None,
            http_status: 413,
            grpc_code: Code::FailedPrecondition,
            names_one_of: &[&real(&huge)],
            says_one_of: &["raise restart.max_exe_size"],
        },
    )
    .await;
}

#[tokio::test]
async fn a_second_restart_while_one_is_in_progress_is_refused() {
    let releases = tempfile::tempdir().unwrap();
    let never_ready = install_fixture(releases.path(), "never_ready.sh");
    let agent = Agent::start(
        AgentOpts::default()
            .arg("--allowed-exe-dir")
            .arg(releases.path())
            .arg("--ready-timeout")
            .arg("3s"),
    )
    .await;
    let generation = agent.generation().await;
    let worker = agent.worker_pid().await;
    let mut events = agent.watch().await;

    // The first restart waits (up to 3 s) for a READY=1 that never comes.
    let (control, path) = (agent.control(), restart_path(Some(&never_ready), None));
    let first =
        tokio::spawn(async move { http_request(control, http::Method::POST, &path, None).await });
    events
        .until_phase(Phase::WaitingReady, Duration::from_secs(10))
        .await;

    let second = agent.action("/debug/admin/restart").await;
    assert_eq!(second.status, 409, "{}", second.text());
    let message = second.json()["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_names_restart_in_progress(&message);
    let status = agent
        .grpc()
        .await
        .restart(agent.request(RestartRequest::default()))
        .await
        .expect_err("a second gRPC Restart must be refused");
    assert_eq!(status.code(), Code::Aborted, "{status}");
    assert_names_restart_in_progress(status.message());
    let in_progress = agent.status().await["in_progress"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        in_progress.contains("never_ready.sh"),
        "the status shows the restart in progress: {in_progress:?}"
    );

    let first = first.await.unwrap().unwrap_or_else(|e| agent.fail(&e));
    assert_eq!(first.status, 500, "{}", first.text());
    let first = first.json();
    assert_eq!(first["outcome"], "failed", "{first}");
    assert_eq!(agent.generation().await, generation);
    assert_eq!(agent.worker_pid().await, worker);
}

fn assert_names_restart_in_progress(message: &str) {
    let lower = message.to_lowercase();
    assert!(
        (lower.contains("in progress") || lower.contains("already"))
            && message.contains("never_ready.sh"),
        "the refusal says a restart is in progress and names it (never_ready.sh): {message:?}"
    );
}
