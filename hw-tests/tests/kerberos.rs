//! Negotiate (Kerberos) end to end: a real MIT KDC on loopback, the MIM CM simulator verifying
//! SPNEGO with its service keytab, `cardbridge run` with a client keytab and no `kinit`, and a
//! virtual card in real pcscd.
//!
//! The realm is shared by the tests of this file; the one that stops the KDC takes it
//! exclusively. The acceptor's environment (`KRB5_KTNAME`, `KRB5_CONFIG`) is set once, by the
//! first test to arrive, before any of them makes a GSSAPI call.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{OnceLock, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::run_cardbridge;
use hw_tests::kdc::{Kdc, CM_SPN, REALM};
use hw_tests::rig::Slot;
use hw_tests::sim::{matching_record, Fixture, Simulator};
use hw_tests::sim_auth::{NegotiateStyle, SimAuth};
use hw_tests::vpcd::Inserted;

struct Realm {
    kdc: Kdc,
    /// Held shared by every test, exclusively by the one that stops the KDC.
    down: RwLock<()>,
}

fn realm() -> &'static Realm {
    static REALM_: OnceLock<Realm> = OnceLock::new();
    REALM_.get_or_init(|| {
        let kdc =
            Kdc::start("negotiate").unwrap_or_else(|e| panic!("the test KDC cannot run: {e:#}"));
        kdc.add_principal(CM_SPN, None).expect("service principal");
        let service_keytab = kdc.dir.join("http.keytab");
        kdc.keytab(CM_SPN, &service_keytab).expect("service keytab");
        for (k, v) in kdc.env() {
            std::env::set_var(k, v);
        }
        std::env::set_var("KRB5_KTNAME", format!("FILE:{}", service_keytab.display()));
        // The daemons must choose their own credential cache.
        std::env::remove_var("KRB5CCNAME");
        Realm {
            kdc,
            down: RwLock::new(()),
        }
    })
}

/// A client principal of its own for one test, and its keytab in `dir`.
fn station(realm: &Realm, name: &str, max_life: Option<&str>, dir: &Path) -> PathBuf {
    realm
        .kdc
        .add_principal(name, max_life)
        .expect("client principal");
    let keytab = dir.join(format!("{name}.keytab"));
    realm.kdc.keytab(name, &keytab).expect("client keytab");
    keytab
}

fn temp_dir(name: &str) -> common::TempDir {
    common::TempDir::new(&format!("krb-{name}"))
}

fn cm_section(sim: &Simulator, keytab: &Path, extra: &str) -> String {
    format!(
        "[cm]\nbase_url = \"{}\"\nauth = \"negotiate\"\nkeytab = \"{}\"\nspn = \"{CM_SPN}\"\nretries = 0\ntimeout_ms = 5000\n{extra}",
        sim.cm_base_url(),
        keytab.display()
    )
}

/// A PIV card in a leased slot, and a simulator that knows it and demands Negotiate.
struct Scene {
    sim: Simulator,
    card: Inserted,
    card_id: String,
    _slot: Slot,
    _shared: RwLockReadGuard<'static, ()>,
}

fn scene(style: NegotiateStyle) -> Scene {
    let (shared, slot, card, card_id) = common::piv_card();
    let fixture = Fixture {
        smartcards: vec![matching_record(&card.truth, false)],
        ..Fixture::default()
    };
    let sim = Simulator::start(fixture, 0).expect("simulator");
    sim.set_auth(SimAuth::Negotiate(style)).expect("acceptor");
    Scene {
        sim,
        card,
        card_id,
        _slot: slot,
        _shared: shared,
    }
}

fn daemon(name: &str, cm: &str) -> Daemon {
    Daemon::start_env(name, "", cm, realm().kdc.env())
}

fn matched(r: &serde_json::Value) -> bool {
    r["state"] == "matched"
}

fn unavailable_with<'a>(needles: &'a [&'a str]) -> impl Fn(&serde_json::Value) -> bool + 'a {
    move |r| {
        let reason = r["reason"].as_str().unwrap_or_default();
        r["state"] == "server_unavailable" && needles.iter().all(|n| reason.contains(n))
    }
}

fn authenticated_requests(sim: &Simulator) -> usize {
    sim.log()
        .iter()
        .filter(|l| {
            l.authorization
                .as_deref()
                .is_some_and(|a| a.starts_with("Negotiate "))
        })
        .count()
}

#[test]
fn a_client_keytab_authenticates_without_kinit_once_per_connection() {
    let realm = realm();
    let _up = realm.down.read().unwrap_or_else(|p| p.into_inner());
    let scene = scene(NegotiateStyle {
        per_connection: true,
        ..NegotiateStyle::default()
    });
    let dir = temp_dir("per-connection");
    let keytab = station(realm, "station01", None, &dir);
    let daemon = daemon("krb-per-connection", &cm_section(&scene.sim, &keytab, ""));
    let mut r = daemon.wait_reconciliation(&scene.card_id, "", "matched", matched);
    for _ in 0..3 {
        daemon.sync(&scene.card_id);
        let after = r["checked_at"].as_str().unwrap_or_default().to_string();
        r = daemon.wait_reconciliation(&scene.card_id, &after, "matched again", matched);
    }
    let log = scene.sim.log();
    let connections: std::collections::HashSet<_> = log.iter().map(|l| l.client).collect();
    let exchanges = scene.sim.auth_stats().kerberos_exchanges;
    assert_eq!(
        exchanges as usize,
        connections.len(),
        "one Kerberos exchange per connection ({} requests)",
        log.len()
    );
    assert!(
        log.len() > 3 * connections.len(),
        "{} requests on {} connections",
        log.len(),
        connections.len()
    );
    assert!(
        daemon.dir.join("state").join("krb5cc").exists(),
        "the daemon keeps its tickets in its own cache under the state directory"
    );
    assert!(!daemon.log().contains("Negotiate "), "no token in the log");
    drop(scene.card);
}

#[test]
fn a_server_that_challenges_every_request_gets_a_ticket_with_each() {
    let realm = realm();
    let _up = realm.down.read().unwrap_or_else(|p| p.into_inner());
    let scene = scene(NegotiateStyle::default());
    let dir = temp_dir("per-request");
    let keytab = station(realm, "station02", None, &dir);
    let daemon = daemon("krb-per-request", &cm_section(&scene.sim, &keytab, ""));
    daemon.wait_reconciliation(&scene.card_id, "", "matched", matched);
    let exchanges = scene.sim.auth_stats().kerberos_exchanges as usize;
    let authenticated = authenticated_requests(&scene.sim);
    assert!(
        exchanges >= 3,
        "smart card, certificates, operations: {exchanges}"
    );
    assert_eq!(
        exchanges, authenticated,
        "every authenticated request was one exchange"
    );
    let challenged = scene.sim.log().len() - authenticated;
    assert_eq!(
        challenged, authenticated,
        "each request was challenged first"
    );
}

#[test]
fn a_session_cookie_the_server_sets_is_kept() {
    let realm = realm();
    let _up = realm.down.read().unwrap_or_else(|p| p.into_inner());
    let scene = scene(NegotiateStyle {
        session_cookie: true,
        ..NegotiateStyle::default()
    });
    let dir = temp_dir("cookie");
    let keytab = station(realm, "station10", None, &dir);
    let daemon = daemon("krb-cookie", &cm_section(&scene.sim, &keytab, ""));
    let mut r = daemon.wait_reconciliation(&scene.card_id, "", "matched", matched);
    // Requests that started together before the first cookie came may each have authenticated.
    let first = scene.sim.auth_stats().kerberos_exchanges;
    let requests = scene.sim.log().len();
    for _ in 0..2 {
        daemon.sync(&scene.card_id);
        let after = r["checked_at"].as_str().unwrap_or_default().to_string();
        r = daemon.wait_reconciliation(&scene.card_id, &after, "matched again", matched);
    }
    assert_eq!(
        scene.sim.auth_stats().kerberos_exchanges,
        first,
        "the session cookie stood for the ticket after the first exchanges"
    );
    let log = scene.sim.log();
    assert!(log.len() >= requests + 6, "{} requests", log.len());
    assert!(
        log[requests..].iter().all(|l| l.authorization.is_none()),
        "no ticket, no challenge once the session exists"
    );
}

#[test]
fn a_stale_keytab_is_auth_failed_naming_the_keytab() {
    let realm = realm();
    let _up = realm.down.read().unwrap_or_else(|p| p.into_inner());
    let scene = scene(NegotiateStyle::default());
    let dir = temp_dir("stale");
    let keytab = station(realm, "station03", None, &dir);
    realm.kdc.rekey("station03").expect("new key");
    let daemon = daemon("krb-stale", &cm_section(&scene.sim, &keytab, ""));
    let keytab_text = keytab.display().to_string();
    let r = daemon.wait_reconciliation(
        &scene.card_id,
        "",
        "auth_failed naming the keytab",
        unavailable_with(&["auth_failed", &keytab_text]),
    );
    assert_eq!(r["verdict"], "unknown");
    assert_eq!(authenticated_requests(&scene.sim), 0, "no ticket was sent");
    let log = daemon.log();
    assert_eq!(
        log.matches("authentication failed").count(),
        1,
        "logged once, as an error that says what to fix:\n{log}"
    );
    assert!(log.contains("To fix:") && log.contains("ERROR"), "{log}");
}

#[test]
fn the_kdc_down_is_auth_failed_and_recovers_without_a_restart() {
    let realm = realm();
    let dir = temp_dir("kdc-down");
    let keytab = station(realm, "station04", None, &dir);
    let _down = realm.down.write().unwrap_or_else(|p| p.into_inner());
    let scene = scene(NegotiateStyle::default());
    realm.kdc.stop();
    let daemon = daemon("krb-kdc-down", &cm_section(&scene.sim, &keytab, ""));
    let r = daemon.wait_reconciliation(
        &scene.card_id,
        "",
        "auth_failed naming the KDC",
        unavailable_with(&["auth_failed", "KDC"]),
    );
    realm.kdc.restart().expect("KDC back");
    daemon.sync(&scene.card_id);
    let after = r["checked_at"].as_str().unwrap_or_default().to_string();
    daemon.wait_reconciliation(
        &scene.card_id,
        &after,
        "matched once the KDC is back",
        matched,
    );
    assert!(daemon.log().contains("authentication works again"));
}

#[test]
fn tickets_that_expire_are_renewed_without_a_restart() {
    let realm = realm();
    let _up = realm.down.read().unwrap_or_else(|p| p.into_inner());
    let scene = scene(NegotiateStyle::default());
    let dir = temp_dir("short");
    let keytab = station(realm, "station05", Some("1 minute"), &dir);
    let daemon = daemon("krb-short", &cm_section(&scene.sim, &keytab, ""));
    let started = Instant::now();
    let r = daemon.wait_reconciliation(&scene.card_id, "", "matched", matched);
    let initial = |log: &str| {
        log.lines()
            .filter(|l| {
                l.contains("AS_REQ")
                    && l.contains(&format!("station05@{REALM}"))
                    && l.contains("ISSUE")
            })
            .count()
    };
    assert_eq!(initial(&realm.kdc.log()), 1);
    // Time passing is what is tested here: the ticket of one minute must be long gone.
    std::thread::sleep(Duration::from_secs(125).saturating_sub(started.elapsed()));
    daemon.sync(&scene.card_id);
    let after = r["checked_at"].as_str().unwrap_or_default().to_string();
    daemon.wait_reconciliation(&scene.card_id, &after, "matched two minutes later", matched);
    assert!(
        initial(&realm.kdc.log()) >= 2,
        "a new ticket from the keytab:\n{}",
        realm.kdc.log()
    );
}

#[test]
fn a_garbage_mutual_authentication_token_is_an_error() {
    let realm = realm();
    let _up = realm.down.read().unwrap_or_else(|p| p.into_inner());
    let scene = scene(NegotiateStyle {
        garbage_mutual_token: true,
        ..NegotiateStyle::default()
    });
    let dir = temp_dir("garbage");
    let keytab = station(realm, "station06", None, &dir);
    let daemon = daemon("krb-garbage", &cm_section(&scene.sim, &keytab, ""));
    daemon.wait_reconciliation(
        &scene.card_id,
        "",
        "a mutual authentication failure",
        unavailable_with(&["auth_failed", "mutual authentication"]),
    );
}

#[test]
fn a_server_offering_only_ntlm_names_the_fix() {
    let realm = realm();
    let _up = realm.down.read().unwrap_or_else(|p| p.into_inner());
    let scene = scene(NegotiateStyle {
        ntlm_only: true,
        ..NegotiateStyle::default()
    });
    let dir = temp_dir("ntlm");
    let keytab = station(realm, "station07", None, &dir);
    let daemon = daemon("krb-ntlm", &cm_section(&scene.sim, &keytab, ""));
    daemon.wait_reconciliation(
        &scene.card_id,
        "",
        "NTLM refused with the SPN to register",
        unavailable_with(&["auth_failed", "only NTLM", CM_SPN]),
    );
}

/// `check-config --online` against a simulator without a card.
fn check_online(config: &Path, envs: &[(&str, &str)]) -> (bool, String) {
    let config = config.display().to_string();
    let env = realm().kdc.env();
    let mut all: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    all.extend_from_slice(envs);
    let out = run_cardbridge(
        &["check-config", "--online", "--config", &config],
        &all,
        Duration::from_secs(30),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn config_file(dir: &Path, cm: &str) -> PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(
        &path,
        format!("state_dir = \"{}\"\n{cm}", dir.join("state").display()),
    )
    .expect("config");
    path
}

#[test]
fn check_config_online_proves_the_ticket_or_names_the_cause() {
    let realm = realm();
    let _up = realm.down.read().unwrap_or_else(|p| p.into_inner());
    let sim = Simulator::start(Fixture::default(), 0).expect("simulator");
    sim.set_auth(SimAuth::Negotiate(NegotiateStyle::default()))
        .expect("acceptor");
    let dir = temp_dir("check");
    let keytab = station(realm, "station08", None, &dir);
    let config = config_file(&dir, &cm_section(&sim, &keytab, ""));
    let (ok, text) = check_online(&config, &[]);
    assert!(ok, "{text}");
    assert!(
        text.contains(&format!("principal station08@{REALM}")),
        "{text}"
    );
    assert!(
        text.contains(&format!("SPN {CM_SPN}")) && text.contains("ticket valid until 20"),
        "{text}"
    );
    assert!(text.contains("answered (0 records)"), "{text}");
    assert!(
        !dir.join("state").join("krb5cc").exists(),
        "a one-shot command keeps no cache"
    );

    realm.kdc.rekey("station08").expect("new key");
    let (ok, text) = check_online(&config, &[]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("auth_failed") && text.contains(&keytab.display().to_string()),
        "{text}"
    );
    assert!(text.contains("to fix:"), "{text}");
}

#[test]
fn a_keytab_others_can_read_is_refused_unless_systemd_guards_it() {
    let realm = realm();
    let _up = realm.down.read().unwrap_or_else(|p| p.into_inner());
    let sim = Simulator::start(Fixture::default(), 0).expect("simulator");
    sim.set_auth(SimAuth::Negotiate(NegotiateStyle::default()))
        .expect("acceptor");
    let dir = temp_dir("modes");
    let keytab = station(realm, "station09", None, &dir);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&keytab, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let config = config_file(&dir, &cm_section(&sim, &keytab, ""));
    let (ok, text) = check_online(&config, &[]);
    assert!(
        !ok && text.contains("chmod 600") && text.contains(&keytab.display().to_string()),
        "{text}"
    );

    // The same file as a systemd credential (LoadCredential=station.keytab:…): a bare name.
    let credentials = dir.join("credentials");
    std::fs::create_dir_all(&credentials).expect("credentials dir");
    std::fs::copy(&keytab, credentials.join("station.keytab")).expect("copy");
    let cm = cm_section(&sim, Path::new("station.keytab"), "");
    let config = config_file(&dir, &cm);
    let credentials = credentials.display().to_string();
    let (ok, text) = check_online(&config, &[("CREDENTIALS_DIRECTORY", &credentials)]);
    assert!(ok, "{text}");
    let (ok, text) = check_online(&config, &[]);
    assert!(!ok && text.contains("CREDENTIALS_DIRECTORY"), "{text}");
}
