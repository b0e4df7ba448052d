//! Packaging: the container image's runtime stage builds with podman (FROM scratch, the
//! locally built agent and the libraries it loads), with the configuration
//! deploy/container/Containerfile promises; and the systemd units parse.
//!
//! Base images cannot be pulled here and containers cannot be run (crun's setrlimit is
//! refused), so the test builds the Containerfile's `agent` stage from a context holding
//! the local binary, and checks the rootfs is complete by running the binary in it with
//! chroot. PID-1 behaviour is tested with unshare (pid1.rs).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use fleet_tests::fleet::binary;
use fleet_tests::harness::{SKIP_PODMAN, SKIP_ROOT, cannot_run};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

fn output(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The Containerfile's `agent` stage, with its `COPY --from=build /rootfs/ /` taking
/// the rootfs from the build context instead: the runtime stage users get, verbatim
/// otherwise.
fn runtime_stage(containerfile: &str) -> String {
    let start = containerfile
        .find("FROM scratch AS agent")
        .expect("Containerfile has a `FROM scratch AS agent` stage");
    let stage = &containerfile[start..];
    assert!(
        stage.contains("COPY --from=build /rootfs/ /"),
        "agent stage copies the build's rootfs"
    );
    stage.replace("COPY --from=build /rootfs/ /", "COPY rootfs/ /")
}

/// Copies `exe` and every library `ldd` names into `rootfs`, at the same paths.
fn fill_rootfs(rootfs: &Path, exe: &Path) {
    let bin = rootfs.join("usr/local/bin");
    std::fs::create_dir_all(&bin).expect("mkdir");
    std::fs::copy(exe, bin.join("fleet-agent")).expect("copy agent");
    let ldd = output(Command::new("ldd").arg(exe));
    let text = String::from_utf8(ldd.stdout).expect("utf-8");
    let libs: Vec<&str> = text
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            match l.split_once("=>") {
                Some((_, rest)) => rest
                    .split_whitespace()
                    .next()
                    .filter(|p| p.starts_with('/')),
                None => l.split_whitespace().next().filter(|p| p.starts_with('/')),
            }
        })
        .collect();
    assert!(
        libs.iter().any(|l| l.contains("libc.so")),
        "ldd named no libc: {text}"
    );
    for lib in libs {
        let dest = rootfs.join(lib.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().expect("parent")).expect("mkdir");
        std::fs::copy(lib, &dest).unwrap_or_else(|e| panic!("copy {lib}: {e}"));
    }
    for dir in ["tmp", "run/fleet-agent", "var/lib/fleet"] {
        std::fs::create_dir_all(rootfs.join(dir)).expect("mkdir");
    }
}

#[test]
fn containerfile_is_multi_stage_with_the_promised_runtime() {
    let text = std::fs::read_to_string(repo_root().join("deploy/container/Containerfile"))
        .expect("deploy/container/Containerfile");
    assert!(text.contains(" AS build"), "a build stage");
    assert!(text.contains("FROM scratch AS controller"));
    let stage = runtime_stage(&text);
    for line in [
        "USER 65532:65532",
        "STOPSIGNAL SIGTERM",
        "HEALTHCHECK ",
        "ENTRYPOINT [\"/usr/local/bin/fleet-agent\"",
    ] {
        assert!(stage.contains(line), "agent stage lacks {line}");
    }
}

#[test]
fn runtime_image_builds_with_podman() {
    const TEST: &str = "container::runtime_image_builds_with_podman";
    if Command::new("podman").arg("--version").output().is_err() {
        cannot_run(
            TEST,
            "podman is not installed",
            "apt-get install podman (.ci/run does)",
            SKIP_PODMAN,
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let ctx = dir.path().join("ctx");
    let rootfs = ctx.join("rootfs");
    fill_rootfs(&rootfs, &binary("fleet-agent"));

    // The rootfs is complete: the agent starts in it alone (chroot needs root).
    if is_root() {
        let out = output(
            Command::new("chroot")
                .arg(&rootfs)
                .args(["/usr/local/bin/fleet-agent", "--version"]),
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("fleet-agent"));
    } else {
        cannot_run(
            TEST,
            "chroot into the image's rootfs needs root",
            "run as root",
            SKIP_ROOT,
        );
    }

    let text = std::fs::read_to_string(repo_root().join("deploy/container/Containerfile"))
        .expect("Containerfile");
    let containerfile = ctx.join("Containerfile");
    std::fs::write(&containerfile, runtime_stage(&text)).expect("write");
    // A private store under the temp dir; vfs and chroot isolation work without
    // overlay mounts or a container runtime.
    let podman = |args: &[&str]| {
        let mut cmd = Command::new("podman");
        cmd.arg("--root")
            .arg(dir.path().join("storage"))
            .arg("--runroot")
            .arg(dir.path().join("run"))
            .args(["--storage-driver", "vfs", "--cgroup-manager", "cgroupfs"])
            .args(args);
        cmd
    };
    output(
        podman(&[
            "build",
            "--format",
            "docker",
            "--isolation",
            "chroot",
            "-t",
            "fleet-agent-test:1",
            "-f",
        ])
        .arg(&containerfile)
        .arg(&ctx),
    );
    let out = output(&mut podman(&[
        "image",
        "inspect",
        "fleet-agent-test:1",
        "--format",
        "{{json .Config}}",
    ]));
    let config: serde_json::Value = serde_json::from_slice(&out.stdout).expect("inspect JSON");
    assert_eq!(config["User"], "65532:65532", "{config}");
    assert_eq!(config["StopSignal"], "SIGTERM", "{config}");
    assert_eq!(
        config["Entrypoint"][0], "/usr/local/bin/fleet-agent",
        "{config}"
    );
    assert!(config["ExposedPorts"].get("7101/tcp").is_some(), "{config}");
    // podman shows a docker-format image's health check beside `.Config`.
    let out = output(&mut podman(&["image", "inspect", "fleet-agent-test:1"]));
    let inspect: serde_json::Value = serde_json::from_slice(&out.stdout).expect("inspect JSON");
    let health = &inspect[0]["Healthcheck"];
    assert_eq!(
        health["Test"],
        serde_json::json!([
            "CMD",
            "/usr/local/bin/fleet-agent",
            "--health-check",
            "--control",
            "0.0.0.0:7101"
        ]),
        "{health}"
    );
    assert!(
        config["Env"]
            .as_array()
            .expect("Env")
            .iter()
            .any(|e| e == "TMPDIR=/run/fleet-agent"),
        "{config}"
    );
    // vfs layers are owned by root; remove them while we still can.
    let _ = podman(&["rmi", "-a", "-f"]).output();
}

fn is_root() -> bool {
    // `id -u` rather than geteuid: this crate has no unsafe code.
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

#[test]
fn systemd_units_parse() {
    const TEST: &str = "container::systemd_units_parse";
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        cannot_run(
            TEST,
            "systemd-analyze is not installed",
            "apt-get install systemd (.ci/run does)",
            SKIP_PODMAN,
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let root = repo_root();
    let mut units = Vec::new();
    for (unit, path) in [
        ("fleet-agent.service", "/opt/app/fleet-agent"),
        (
            "fleet-controller.service",
            "/usr/local/bin/fleet-controller",
        ),
    ] {
        let text = std::fs::read_to_string(root.join("deploy/systemd").join(unit)).expect(unit);
        let name = Path::new(path)
            .file_name()
            .expect("name")
            .to_str()
            .expect("utf-8");
        // verify checks that ExecStart's program exists: point it at the built one.
        let text = text.replace(path, binary(name).to_str().expect("utf-8"));
        for key in [
            "User=fleet",
            "ProtectSystem=strict",
            "NoNewPrivileges=yes",
            "CapabilityBoundingSet=",
        ] {
            assert!(text.contains(key), "{unit} lacks {key}");
        }
        let dest = dir.path().join(unit);
        std::fs::write(&dest, text).expect("write");
        units.push(dest);
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&units)
        .output()
        .expect("systemd-analyze");
    // verify exits 0 on many mistakes; whatever it says is a mistake.
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.trim().is_empty() && out.status.success(),
        "systemd-analyze verify: {said}"
    );
}
