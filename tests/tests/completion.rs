//! `fleetctl completion bash|zsh|fish`, `fleetctl man DIR` and `--token-file`: what
//! fleetctl does without a controller.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

use fleet_tests::fleet::binary;

const SUBCOMMANDS: [&str; 6] = ["nodes", "node", "restart", "shutdown", "rollout", "token"];

fn fleetctl(args: &[&str]) -> std::process::Output {
    Command::new(binary("fleetctl"))
        .args(args)
        .env_remove("FLEET_TOKEN")
        .env_remove("FLEET_TOKEN_FILE")
        .stdin(Stdio::null())
        .output()
        .expect("running fleetctl")
}

#[test]
fn completion_scripts_name_every_subcommand() {
    for shell in ["bash", "zsh", "fish"] {
        let out = fleetctl(&["completion", shell]);
        assert!(out.status.success(), "{shell}: {out:?}");
        let script = String::from_utf8(out.stdout).expect("utf-8");
        assert!(script.len() > 1000, "{shell}: script too short: {script}");
        for sub in SUBCOMMANDS {
            assert!(script.contains(sub), "{shell} script does not name {sub}");
        }
        assert!(script.contains("token-file"), "{shell}: no --token-file");
    }
    // The bash script parses.
    let script = fleetctl(&["completion", "bash"]).stdout;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("fleetctl.bash");
    std::fs::write(&path, script).expect("write");
    let status = Command::new("bash")
        .arg("-n")
        .arg(&path)
        .status()
        .expect("bash -n");
    assert!(status.success(), "bash -n refused the completion script");
    // An unknown shell is refused by clap (exit 2), naming the choices.
    let out = fleetctl(&["completion", "tcsh"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bash"));
}

#[test]
fn man_pages_are_written_per_subcommand() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out_dir = dir.path().join("man1");
    let out = fleetctl(&["man", out_dir.to_str().expect("utf-8 path")]);
    assert!(out.status.success(), "{out:?}");
    let main = std::fs::read_to_string(out_dir.join("fleetctl.1")).expect("fleetctl.1");
    assert!(
        main.starts_with(".ie") || main.contains(".TH fleetctl"),
        "not roff: {main}"
    );
    for sub in SUBCOMMANDS {
        let page = out_dir.join(format!("fleetctl-{sub}.1"));
        let text = std::fs::read_to_string(&page).unwrap_or_else(|e| panic!("{page:?}: {e}"));
        assert!(text.contains(".TH"), "{page:?} has no title");
    }
    assert!(out_dir.join("fleetctl-rollout-status.1").is_file());
}

#[test]
fn token_file_is_checked_before_any_call() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("token");
    std::fs::write(&path, "s3cret-token\n").expect("write");
    let p = path.to_str().expect("utf-8");
    // Nothing listens on port 1: a readable token gets as far as connecting (exit 1).
    let args = |p: &str| -> Vec<String> {
        ["--controller", "127.0.0.1:1", "--token-file", p, "nodes"]
            .map(String::from)
            .to_vec()
    };
    let run = |p: &str| {
        let a = args(p);
        fleetctl(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };

    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = run(p);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(p) && err.contains("chmod 600"), "{err}");

    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let out = run(p);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot reach the controller"), "{err}");

    std::fs::write(&path, "\n").expect("write");
    let out = run(p);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(p) && err.contains("empty"), "{err}");

    let missing = dir.path().join("missing");
    let out = run(missing.to_str().expect("utf-8"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("missing") && err.contains("No such file"),
        "{err}"
    );

    // --token and --token-file together are refused.
    let out = fleetctl(&["--token", "x", "--token-file", p, "nodes"]);
    assert_eq!(out.status.code(), Some(2));
}
