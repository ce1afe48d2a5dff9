//! The `pbusd` command line: bad configuration is refused before anything
//! is bound, with a message that names the problem. (Having an integration
//! test here also makes `cargo test --workspace` build the `pbusd` binary
//! that the tests in `tests/` start.)
#![forbid(unsafe_code)]

use std::process::Command;

fn pbusd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pbusd"))
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("pbusd-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn help_describes_the_options() {
    let output = pbusd().arg("--help").output().unwrap();
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    for option in ["--listen", "--config", "--policy", "--print-address"] {
        assert!(
            text.contains(option),
            "--help does not mention {option}:\n{text}"
        );
    }
}

#[test]
fn a_bad_configuration_is_refused_with_its_key() {
    let dir = temp_dir("config");
    let config = dir.join("pbusd.toml");
    std::fs::write(&config, "[limits]\nmax_fds_per_message = 300\n").unwrap();
    let output = pbusd()
        .arg("--config")
        .arg(&config)
        .arg("--listen")
        .arg(dir.join("bus.sock"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(text.contains("max_fds_per_message"), "{text}");
    assert!(
        !dir.join("bus.sock").exists(),
        "nothing is bound for a bad configuration"
    );
    std::fs::write(&config, "[limits]\nmax_fd_per_message = 8\n").unwrap();
    let output = pbusd().arg("--config").arg(&config).output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("max_fd_per_message"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_bad_policy_is_refused_with_its_position() {
    let dir = temp_dir("policy");
    let policy = dir.join("10-bad.toml");
    std::fs::write(
        &policy,
        "[[rule]]\nallow = [\"talk\"]\nsubject = { uid = \"root\" }\n",
    )
    .unwrap();
    let output = pbusd()
        .arg("--policy")
        .arg(&policy)
        .arg("--listen")
        .arg(dir.join("bus.sock"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(text.contains("10-bad.toml:3:"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_listen_path_that_is_a_regular_file_is_not_replaced() {
    let dir = temp_dir("listen");
    let path = dir.join("bus.sock");
    std::fs::write(&path, b"precious").unwrap();
    let output = pbusd().arg("--listen").arg(&path).output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("not a socket"));
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    std::fs::remove_dir_all(&dir).unwrap();
}
