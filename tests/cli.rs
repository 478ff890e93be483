//! The command line's contract where no card is needed: exit codes and error sentences.
//! (Card reading is tested end to end in `hw-tests`, through a real pcscd.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test may panic

use std::process::Command;

fn cardbridge() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cardbridge"))
}

#[test]
fn unreachable_pcscd_is_one_clear_sentence_and_exit_1() {
    let out = cardbridge()
        .args(["scan", "--json"])
        .env("PCSCLITE_CSOCK_NAME", "/nonexistent/pcscd.comm")
        .output()
        .expect("run cardbridge");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("pcscd") && stderr.contains("start"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(out.stdout.is_empty());
}

#[test]
fn usage_errors_exit_2() {
    let out = cardbridge()
        .args(["scan", "--card-timeout", "-1"])
        .output()
        .expect("run cardbridge");
    assert_eq!(out.status.code(), Some(2));
    let out = cardbridge()
        .args(["frobnicate"])
        .output()
        .expect("run cardbridge");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn check_config_accepts_the_example_and_names_the_bad_key() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/service/config.example.toml");
    let dir = std::env::temp_dir().join(format!("cardbridge-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    // The example loads the SCEPman client secret as a systemd credential; check-config reads
    // every secret, so give it one.
    std::fs::write(dir.join("scepman-secret"), "secret\n").expect("credential");
    let out = cardbridge()
        .args(["check-config", "--config", example])
        .env("CREDENTIALS_DIRECTORY", &dir)
        .output()
        .expect("run cardbridge");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cardbridge()
        .args(["check-config", "--config", example])
        .env_remove("CREDENTIALS_DIRECTORY")
        .output()
        .expect("run cardbridge");
    assert_eq!(out.status.code(), Some(2), "the secret is missing");
    assert!(String::from_utf8_lossy(&out.stderr).contains("LoadCredential=scepman-secret"));

    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[api]\nlisten = [\"127.0.0.1:8687\"]\nlistne = 1\n").expect("write");
    let out = cardbridge()
        .args(["check-config", "--config"])
        .arg(&bad)
        .output()
        .expect("run cardbridge");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.toml") && stderr.contains("listne"),
        "{stderr}"
    );
    let out = cardbridge()
        .args(["check-config", "--config"])
        .arg(dir.join("missing.toml"))
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let _ = std::fs::remove_dir_all(&dir);
}
