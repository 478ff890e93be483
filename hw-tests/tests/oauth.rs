//! OAuth client credentials against the simulator's token endpoints (Entra ID v2 and AD FS
//! shapes) and its SCEPman API, which demands the tokens they issue; the client secret and the
//! tokens never leave the places they belong.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cardbridge::auth::AuthError;
use cardbridge::config::Config;
use cardbridge::http::ServerError;
use cardbridge::scepman::{ScepmanClient, SearchQuery};

/// The cheapest authenticated SCEPman call: one search result.
const ONE_ITEM: SearchQuery<'static> = SearchQuery {
    text: None,
    page_size: 1,
    validity: None,
    continuation: None,
};
use common::daemon::{Daemon, ADMIN, TOKEN};
use common::eventually;
use hw_tests::sim::{matching_record, scepman_certs, Fixture, ScepmanCert, Simulator};
use hw_tests::sim_auth::{OAuthApp, SimAuth};
use serde_json::json;

const CLIENT_ID: &str = "6c1b2f0e-cardbridge-station";
const SECRET: &str = "Qm9vdHN0cmFwLXNlY3JldC1kby1ub3QtbG9n";
const SCOPE: &str = "api://16b6a4d1-scepman/.default";

fn temp_dir(name: &str) -> common::TempDir {
    common::TempDir::new(&format!("oauth-{name}"))
}

fn private_file(path: &Path, contents: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, contents).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

/// An RSA key and a self-signed certificate for it, as an application registration holds;
/// returns (certificate, private key, public key) paths.
fn app_certificate(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let (cert, key, public) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
        dir.join(format!("{name}.pub")),
    );
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl (hw-tests/install-deps installs it)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    let (c, k) = (cert.display().to_string(), key.display().to_string());
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        &k,
        "-out",
        &c,
        "-days",
        "2",
        "-subj",
        &format!("/CN={name}"),
    ]);
    std::fs::write(&public, run(&["x509", "-in", &c, "-pubkey", "-noout"])).expect("public key");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    (cert, key, public)
}

fn app(lifetime: Duration, public_key: Option<&Path>) -> OAuthApp {
    OAuthApp {
        client_id: CLIENT_ID.into(),
        client_secret: Some(SECRET.into()),
        assertion_public_key: public_key.map(|p| std::fs::read(p).expect("public key")),
        token_lifetime: lifetime,
        roles: vec!["Manage.All".into()],
    }
}

fn scepman_sim(app: OAuthApp) -> Simulator {
    let fixture = Fixture {
        scepman: vec![ScepmanCert {
            serial_number: "480552CEBBE40FD5D4417532033728F353040000".into(),
            subject: "CN=alice".into(),
            ..ScepmanCert::default()
        }],
        ..Fixture::default()
    };
    let sim = Simulator::start(fixture, 0).expect("simulator");
    sim.set_auth(SimAuth::OAuth(app)).expect("oauth");
    sim
}

/// The `[scepman]` section with a client secret in a private file.
fn with_secret(sim: &Simulator, dir: &Path, secret: &str) -> String {
    let file = dir.join("scepman.secret");
    private_file(&file, secret);
    format!(
        "[scepman]\nbase_url = \"{}\"\nauth = \"oauth\"\ntoken_url = \"{}\"\nclient_id = \"{CLIENT_ID}\"\nscope = \"{SCOPE}\"\nclient_secret_file = \"{}\"\nretries = 0\n",
        sim.scepman_base_url(),
        sim.entra_token_url(),
        file.display()
    )
}

fn client(section: &str) -> ScepmanClient {
    let config = Config::parse(section).expect("config");
    ScepmanClient::new(config.scepman.as_ref().expect("scepman")).expect("client")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn fetches(client: &ScepmanClient) -> u64 {
    client.server().token_source().map_or(0, |t| t.fetches())
}

#[test]
fn one_token_serves_many_calls() {
    let sim = scepman_sim(app(Duration::from_secs(3600), None));
    let dir = temp_dir("many");
    let scepman = client(&with_secret(&sim, &dir, SECRET));
    runtime().block_on(async {
        for _ in 0..120 {
            scepman
                .search(&SearchQuery {
                    text: Some("480552"),
                    page_size: 1,
                    ..SearchQuery::default()
                })
                .await
                .expect("search");
        }
    });
    assert_eq!(sim.auth_stats().tokens_issued, 1);
    assert_eq!(fetches(&scepman), 1);
    assert_eq!(sim.auth_stats().refused_calls, 0);
}

#[test]
fn the_token_is_refreshed_before_it_expires() {
    let sim = scepman_sim(app(Duration::from_secs(4), None));
    let dir = temp_dir("refresh");
    let scepman = client(&with_secret(&sim, &dir, SECRET));
    let until = Instant::now() + Duration::from_secs(7);
    runtime().block_on(async {
        while Instant::now() < until {
            scepman.search(&ONE_ITEM).await.expect("search");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let stats = sim.auth_stats();
    assert!(
        stats.tokens_issued >= 3,
        "a 4 s token is renewed every 2 s: {stats:?}"
    );
    assert_eq!(
        stats.refused_calls, 0,
        "no call went out with an expired token"
    );
}

#[test]
fn fifty_concurrent_callers_cause_one_token_request() {
    let sim = scepman_sim(app(Duration::from_secs(3600), None));
    let dir = temp_dir("fifty");
    let scepman = client(&with_secret(&sim, &dir, SECRET));
    runtime().block_on(async {
        let calls = (0..50).map(|_| scepman.search(&ONE_ITEM));
        for result in futures_util::future::join_all(calls).await {
            result.expect("search");
        }
    });
    assert_eq!(sim.auth_stats().tokens_issued, 1);
    assert_eq!(sim.log().iter().filter(|l| l.route == "search").count(), 50);
}

#[test]
fn a_401_leads_to_one_refresh_and_one_retry() {
    let sim = scepman_sim(app(Duration::from_secs(3600), None));
    let dir = temp_dir("401");
    let scepman = client(&with_secret(&sim, &dir, SECRET));
    let rt = runtime();
    rt.block_on(scepman.search(&ONE_ITEM)).expect("first call");
    sim.revoke_tokens();
    // Tokens are refused from the next second on (their iat is in whole seconds).
    std::thread::sleep(Duration::from_millis(1100));
    rt.block_on(scepman.search(&ONE_ITEM))
        .expect("retried with a new token");
    let stats = sim.auth_stats();
    assert_eq!(stats.tokens_issued, 2, "{stats:?}");
    assert_eq!(stats.refused_calls, 1, "{stats:?}");
    assert_eq!(sim.log().iter().filter(|l| l.route == "search").count(), 3);
}

#[test]
fn a_bad_secret_is_auth_failed_with_the_aadsts_code() {
    let sim = scepman_sim(app(Duration::from_secs(3600), None));
    let dir = temp_dir("bad-secret");
    let wrong = "d3JvbmctY2xpZW50LXNlY3JldC12YWx1ZQ";
    let scepman = client(&with_secret(&sim, &dir, wrong));
    let e = runtime()
        .block_on(scepman.search(&ONE_ITEM))
        .expect_err("refused");
    assert_eq!(e.code(), "auth_failed");
    match &e {
        ServerError::Auth(AuthError::TokenEndpointRefused { code, error, .. }) => {
            assert_eq!(code.as_deref(), Some("AADSTS7000215"));
            assert_eq!(error, "invalid_client");
        }
        other => panic!("{other:?}"),
    }
    let text = e.to_string();
    assert!(
        text.contains("Invalid client secret provided"),
        "verbatim: {text}"
    );
    assert!(!text.contains(wrong), "{text}");
    assert_eq!(sim.log().iter().filter(|l| l.route == "search").count(), 0);
}

fn with_assertion(
    sim: &Simulator,
    token_url: &str,
    audience: &str,
    cert: &Path,
    key: &Path,
) -> String {
    format!(
        "[scepman]\nbase_url = \"{}\"\nauth = \"oauth\"\ntoken_url = \"{token_url}\"\nclient_id = \"{CLIENT_ID}\"\n{audience}\nclient_assertion_certificate = \"{}\"\nclient_assertion_key = \"{}\"\nretries = 0\n",
        sim.scepman_base_url(),
        cert.display(),
        key.display()
    )
}

#[test]
fn a_certificate_assertion_gets_tokens_from_entra_and_adfs() {
    let dir = temp_dir("assertion");
    let (cert, key, public) = app_certificate(&dir, "station-app");
    let sim = scepman_sim(app(Duration::from_secs(3600), Some(&public)));
    let entra = client(&with_assertion(
        &sim,
        &sim.entra_token_url(),
        &format!("scope = \"{SCOPE}\""),
        &cert,
        &key,
    ));
    let adfs = client(&with_assertion(
        &sim,
        &sim.adfs_token_url(),
        "resource = \"https://scepman.contoso.com\"",
        &cert,
        &key,
    ));
    let rt = runtime();
    rt.block_on(entra.search(&ONE_ITEM))
        .expect("Entra ID v2 (PS256)");
    rt.block_on(adfs.search(&ONE_ITEM)).expect("AD FS (RS256)");
    assert_eq!(sim.auth_stats().tokens_issued, 2);
    assert_eq!(sim.auth_stats().token_refusals, 0);
}

#[test]
fn an_assertion_signed_with_the_wrong_key_is_a_clear_error() {
    let dir = temp_dir("wrong-key");
    let (cert, _, public) = app_certificate(&dir, "registered");
    let (_, other_key, _) = app_certificate(&dir, "other");
    let sim = scepman_sim(app(Duration::from_secs(3600), Some(&public)));
    let scepman = client(&with_assertion(
        &sim,
        &sim.entra_token_url(),
        &format!("scope = \"{SCOPE}\""),
        &cert,
        &other_key,
    ));
    let e = runtime()
        .block_on(scepman.search(&ONE_ITEM))
        .expect_err("refused");
    let text = e.to_string();
    assert_eq!(e.code(), "auth_failed");
    assert!(
        text.contains("AADSTS700027") && text.contains("invalid signature"),
        "{text}"
    );
}

/// Every file under `dir`, as bytes.
fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else if let Ok(bytes) = std::fs::read(&path) {
            out.push((path, bytes));
        }
    }
    out
}

#[test]
fn secrets_and_tokens_never_reach_logs_answers_or_the_database() {
    let (_shared, _slot, card, card_id) = common::piv_card();
    // Two servers, as in a deployment: MIM CM (no authentication here) and SCEPman (OAuth).
    let cm_sim = Simulator::start(
        Fixture {
            smartcards: vec![matching_record(&card.truth, false)],
            ..Fixture::default()
        },
        0,
    )
    .expect("CM simulator");
    let sim = Simulator::start(
        Fixture {
            scepman: scepman_certs(&card.truth),
            ..Fixture::default()
        },
        0,
    )
    .expect("SCEPman simulator");
    sim.set_auth(SimAuth::OAuth(app(Duration::from_secs(3600), None)))
        .expect("oauth");
    let dir = temp_dir("leaks");
    let scepman = with_secret(&sim, &dir, SECRET);
    let cm = format!("[cm]\nbase_url = \"{}\"\n", cm_sim.cm_base_url());
    let verbose = vec![("RUST_LOG".to_string(), "trace".to_string())];
    let daemon = Daemon::start_env("oauth-leaks", "", &format!("{scepman}{cm}"), verbose);
    daemon.wait_reconciliation(&card_id, "", "matched", |r| r["state"] == "matched");
    let admin = format!("Bearer {ADMIN}");
    let body = json!({"card_id": card_id, "target": "certificates", "reason": "keyCompromise"});
    let (status, text) = daemon.request(
        "POST",
        "/v1/revocations",
        &[
            ("Authorization", &admin),
            ("Content-Type", "application/json"),
            ("Idempotency-Key", "leak-1"),
        ],
        &body.to_string(),
    );
    assert_eq!(status, 202, "{text}");
    let kiosk = format!("Bearer {TOKEN}");
    let answers = eventually("the revocation to succeed", Duration::from_secs(20), || {
        let (_, list) = daemon.get("/v1/revocations", &[("Authorization", &kiosk)]);
        list.contains("\"status\":\"succeeded\"").then(|| {
            let (_, cards) = daemon.get("/v1/cards", &[("Authorization", &kiosk)]);
            format!("{list}\n{cards}")
        })
    });
    let stats = sim.auth_stats();
    assert_eq!(stats.tokens_issued, 1, "{stats:?}");
    let mut secrets = vec![SECRET.to_string()];
    secrets.extend(stats.issued.iter().cloned());
    // The signature part alone would betray a token too.
    secrets.extend(
        stats
            .issued
            .iter()
            .filter_map(|t| t.rsplit('.').next().map(str::to_string)),
    );
    let log = daemon.log();
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "the log is verbose: {log}"
    );
    let mut places = vec![
        ("the daemon log".to_string(), log.into_bytes()),
        ("the API answers".to_string(), answers.into_bytes()),
    ];
    places.extend(
        files_under(&daemon.dir.join("state"))
            .into_iter()
            .map(|(p, b)| (p.display().to_string(), b)),
    );
    for (place, bytes) in &places {
        for secret in &secrets {
            let found = bytes.windows(secret.len()).any(|w| w == secret.as_bytes());
            assert!(!found, "a secret or token is in {place}");
        }
    }
    drop(card);
}

#[test]
fn a_revocation_refused_for_authentication_waits_until_the_secret_is_fixed() {
    let (_shared, _slot, card, card_id) = common::piv_card();
    let sim = Simulator::start(
        Fixture {
            smartcards: vec![matching_record(&card.truth, false)],
            scepman: scepman_certs(&card.truth),
            ..Fixture::default()
        },
        0,
    )
    .expect("simulator");
    sim.set_auth(SimAuth::OAuth(app(Duration::from_secs(3600), None)))
        .expect("oauth");
    let dir = temp_dir("fix-secret");
    let scepman = with_secret(&sim, &dir, "an-expired-secret");
    let pacing = "[revocation]\nretry_initial_ms = 200\nretry_max_ms = 500\n";
    let daemon = Daemon::start("oauth-fix", &format!("{scepman}{pacing}"));
    let kiosk = format!("Bearer {TOKEN}");
    eventually("the card read", Duration::from_secs(20), || {
        let path = format!("/v1/cards/{card_id}");
        (daemon.get(&path, &[("Authorization", &kiosk)]).0 == 200).then_some(())
    });
    let thumbprint = &card.truth.certificates[0].thumbprint;
    let body = json!({"card_id": card_id, "target": "certificates", "reason": "superseded", "thumbprints": [thumbprint]});
    let admin = format!("Bearer {ADMIN}");
    let (status, text) = daemon.request(
        "POST",
        "/v1/revocations",
        &[
            ("Authorization", &admin),
            ("Content-Type", "application/json"),
            ("Idempotency-Key", "fix-1"),
        ],
        &body.to_string(),
    );
    assert_eq!(status, 202, "{text}");
    let id = serde_json::from_str::<serde_json::Value>(&text).expect("JSON")["id"]
        .as_i64()
        .expect("id");
    let revocation = || {
        let (_, text) = daemon.get(
            &format!("/v1/revocations/{id}"),
            &[("Authorization", &kiosk)],
        );
        serde_json::from_str::<serde_json::Value>(&text).expect("JSON")
    };
    let refused = eventually("two attempts", Duration::from_secs(20), || {
        Some(revocation()).filter(|r| r["actions"][0]["attempts"].as_i64() >= Some(2))
    });
    assert_eq!(
        refused["status"], "queued",
        "an auth failure is retried: {refused:#}"
    );
    let outcome = &refused["actions"][0]["last_outcome"];
    assert_eq!(outcome["code"], "auth_failed", "{refused:#}");
    assert!(
        outcome["message"]
            .as_str()
            .unwrap_or_default()
            .contains("AADSTS7000215"),
        "{outcome}"
    );
    assert!(!refused.to_string().contains("an-expired-secret"));

    // The administrator puts the right secret in place; no restart.
    private_file(&dir.join("scepman.secret"), SECRET);
    eventually("the revocation to succeed", Duration::from_secs(20), || {
        (revocation()["status"] == "succeeded").then_some(())
    });
    assert_eq!(sim.log().iter().filter(|l| l.method == "PATCH").count(), 1);
    drop(card);
}
