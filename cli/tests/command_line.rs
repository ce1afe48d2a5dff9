//! The `pbusctl` command line without a bus: offline policy checks and
//! clear failures. (Having an integration test here also makes
//! `cargo test --workspace` build the `pbusctl` binary that the tests in
//! `tests/` run.)
#![forbid(unsafe_code)]

use std::process::Command;

fn pbusctl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pbusctl"))
}

/// Runs pbusctl with `args` and returns its exit code and standard error.
fn failure(args: &[&str]) -> (Option<i32>, String) {
    let output = pbusctl().args(args).output().unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("pbusctl-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn policy_check_passes_good_files_and_fails_bad_ones_with_positions() {
    let dir = temp_dir("check");
    std::fs::write(
        dir.join("10-echo.toml"),
        "[[rule]]\nallow = [\"see\", \"talk\"]\nsubject = { uid = 1000 }\nname = \"org.example.Echo\"\n",
    )
    .unwrap();
    let output = pbusctl()
        .args(["policy", "check"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("1 file, 1 rule"));
    std::fs::write(dir.join("20-bad.toml"), "[[rule]]\nallow = [\"fly\"]\n").unwrap();
    let output = pbusctl()
        .args(["policy", "check"])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(text.contains("20-bad.toml:2:"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn policy_explain_works_offline() {
    let output = pbusctl()
        .args([
            "--json",
            "policy",
            "explain",
            "--subject-identity",
            "uid=1000,gid=1000",
            "--target-identity",
            "uid=1000,gid=1000",
            "--right",
            "talk",
            "--target",
            "org.example.Echo",
            "--member",
            "Echo",
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(answer["allowed"], true, "same uid on the host: {answer}");
}

#[test]
fn an_unreachable_bus_is_a_clear_failure() {
    let (code, text) = failure(&["--address", "unix:path=/nonexistent/pbus/bus.sock", "ping"]);
    assert_eq!(code, Some(1));
    assert!(text.contains("/nonexistent/pbus/bus.sock"), "{text}");
}

#[test]
fn a_malformed_address_is_bad_usage() {
    let (code, text) = failure(&["--address", "tcp:host=x", "ping"]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("not a pbus address"), "{text}");
}

#[test]
fn offline_explain_refuses_incomplete_questions() {
    let subject = [
        "policy",
        "explain",
        "--subject-identity",
        "uid=1000,gid=1000",
    ];
    let (code, text) = failure(&[&subject[..], &["--right", "fly"]].concat());
    assert_eq!(code, Some(1));
    assert!(text.contains("unknown right \"fly\""), "{text}");
    let (code, text) = failure(&[&subject[..], &["--right", "talk"]].concat());
    assert_eq!(code, Some(1));
    assert!(
        text.contains("--right talk needs --target-identity"),
        "{text}"
    );
    let (code, text) = failure(&[&subject[..], &["--right", "file"]].concat());
    assert_eq!(code, Some(1));
    assert!(text.contains("--right file needs --path"), "{text}");
}
