//! The command line's contract where no card is needed: exit codes and error sentences.
//! (Card reading is tested end to end in `hw-tests`, through a real pcscd.)

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
