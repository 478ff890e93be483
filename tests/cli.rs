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

/// A metrics listener other machines can reach, without a token or TLS, is valid but gets a
/// warning that says what it exposes and what to set; on loopback, or with both, none.
#[test]
fn check_config_warns_about_a_metrics_listener_open_to_the_network() {
    let dir = std::env::temp_dir().join(format!("cardbridge-cli-metrics-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let check = |metrics: &str| {
        let file = dir.join("metrics.toml");
        let text = format!("state_dir = \"{}\"\n[metrics]\n{metrics}", dir.display());
        std::fs::write(&file, text).expect("write");
        let out = cardbridge()
            .args(["check-config", "--config"])
            .arg(&file)
            .output()
            .expect("run cardbridge");
        assert_eq!(out.status.code(), Some(0), "{metrics}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let open = check("listen = \"0.0.0.0:9687\"\n");
    assert!(
        open.contains("warning: metrics.listen 0.0.0.0:9687 is reachable from other machines")
            && open.contains("without a token or TLS")
            && open.contains("metrics.token_sha256"),
        "{open}"
    );
    let token = format!("token_sha256 = \"{}\"\n", "ab".repeat(32));
    let clear = check(&format!("listen = \"0.0.0.0:9687\"\n{token}"));
    assert!(
        clear.contains("without TLS: the token and the metrics travel in clear"),
        "{clear}"
    );
    let local = check("listen = \"127.0.0.1:9687\"\n");
    assert!(!local.contains("warning"), "{local}");
    let _ = std::fs::remove_dir_all(&dir);
}
