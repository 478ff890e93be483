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
    assert_eq!(
        initial(&realm.kdc.log()),
        1,
        "{}\n{}",
        realm.kdc.log(),
        daemon.log()
    );
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

/// `check-config --online` with the `[cm]` section `cm`; the output must name the cause
/// (`names`) and give no other cause's fix (`not`).
fn check_names(name: &str, cm: &str, names: &[&str], not: &[&str]) {
    let dir = temp_dir(&format!("{name}-config"));
    let config = config_file(&dir, cm);
    let (ok, text) = check_online(&config, &[]);
    assert!(!ok, "{name}: {text}");
    for wanted in names {
        assert!(
            text.contains(wanted),
            "{name}: {wanted:?} missing from:\n{text}"
        );
    }
    for other in not {
        assert!(!text.contains(other), "{name}: {other:?} in:\n{text}");
    }
}

/// The fixes of the causes that were once given for the wrong problem.
const NO_CREDENTIALS_FIX: &str = "set keytab in the server section";
const MODE_FIX: &str = "chmod 600";
const STALE_FIX: &str = "password changed";

/// A Negotiate simulator without a card, for `check-config --online`.
fn negotiate_sim() -> Simulator {
    let sim = Simulator::start(Fixture::default(), 0).expect("simulator");
    sim.set_auth(SimAuth::Negotiate(NegotiateStyle::default()))
        .expect("acceptor");
    sim
}

#[test]
fn a_principal_the_kdc_does_not_know_is_named() {
    let realm = realm();
    let _up = realm.down.read().unwrap_or_else(|p| p.into_inner());
    let sim = negotiate_sim();
    let dir = temp_dir("unknown-client");
    let keytab = station(realm, "station20", None, &dir);
    realm
        .kdc
        .kadmin("delprinc -force station20")
        .expect("delete the principal");
    let principal = format!("station20@{REALM}");
    check_names(
        "unknown-client",
        &cm_section(&sim, &keytab, ""),
        &[
            "does not know the client principal",
            &principal,
            "create the account",
        ],
        &[NO_CREDENTIALS_FIX, MODE_FIX, STALE_FIX],
    );
}

#[test]
fn an_spn_the_kdc_does_not_know_is_named() {
    let realm = realm();
    let _up = realm.down.read().unwrap_or_else(|p| p.into_inner());
    let sim = negotiate_sim();
    let dir = temp_dir("unknown-spn");
    let keytab = station(realm, "station21", None, &dir);
    let cm = cm_section(&sim, &keytab, "").replace(CM_SPN, "HTTP/nowhere.cardbridge.test");
    check_names(
        "unknown-spn",
        &cm,
        &[
            "does not know the server principal HTTP/nowhere.cardbridge.test",
            "setspn",
        ],
        &[NO_CREDENTIALS_FIX, MODE_FIX, STALE_FIX, "klist -k"],
    );
}

#[test]
fn a_keytab_without_the_principal_names_what_it_holds() {
    let realm = realm();
    let _up = realm.down.read().unwrap_or_else(|p| p.into_inner());
    let sim = negotiate_sim();
    let dir = temp_dir("other-principal");
    let keytab = station(realm, "station22", None, &dir);
    station(realm, "station23", None, &dir);
    let held = format!("station22@{REALM}");
    // Another principal's keytab.
    let cm = cm_section(
        &sim,
        &keytab,
        &format!("principal = \"station23@{REALM}\"\n"),
    );
    check_names(
        "other-principal",
        &cm,
        &[&format!(
            "holds no key for station23@{REALM}; it holds {held}"
        )],
        &[NO_CREDENTIALS_FIX, MODE_FIX, "differs only in case"],
    );
    // The principal written in another case.
    let cm = cm_section(
        &sim,
        &keytab,
        &format!("principal = \"STATION22@{REALM}\"\n"),
    );
    check_names(
        "case-principal",
        &cm,
        &[
            "differs only in case",
            &format!("set principal = \"{held}\""),
        ],
        &[NO_CREDENTIALS_FIX, MODE_FIX],
    );
}

#[test]
fn empty_garbage_and_directory_keytabs_are_named() {
    let realm = realm();
    let _up = realm.down.read().unwrap_or_else(|p| p.into_inner());
    let sim = negotiate_sim();
    let dir = temp_dir("bad-keytabs");
    use std::os::unix::fs::PermissionsExt;
    let private = |path: &Path, bytes: &[u8]| {
        std::fs::write(path, bytes).expect("keytab");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    };
    let cases: [(&str, &[u8], &[&str]); 3] = [
        (
            "empty",
            b"",
            &["cannot be read as a keytab: the file is empty"],
        ),
        ("header-only", &[0x05, 0x02], &["holds no keys", "klist -k"]),
        (
            "garbage",
            b"this is not a keytab",
            &["cannot be read as a keytab", "binary"],
        ),
    ];
    for (name, bytes, names) in cases {
        let keytab = dir.join(format!("{name}.keytab"));
        private(&keytab, bytes);
        check_names(
            name,
            &cm_section(&sim, &keytab, ""),
            names,
            &[NO_CREDENTIALS_FIX, MODE_FIX, STALE_FIX],
        );
    }
    let directory = dir.join("keytab-dir");
    std::fs::create_dir_all(&directory).expect("dir");
    check_names(
        "directory",
        &cm_section(&sim, &directory, ""),
        &["is a directory, not a file; set cm.keytab to the file itself"],
        &[NO_CREDENTIALS_FIX, MODE_FIX, "0755"],
    );
}

/// libfaketime (Debian's `libfaketime`) moves this process's clock, not the KDC's.
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// MIT's client corrects its clock by the KDC's (`kdc_timesync`, on by default), so a station
/// clock 20 minutes off either way still signs in; with that correction off (as some hardened
/// krb5.conf files have it), the same clock is a clock skew, named as such.
#[test]
fn a_station_clock_minutes_off_is_named_as_clock_skew() {
    let realm = realm();
    let _up = realm.down.read().unwrap_or_else(|p| p.into_inner());
    let sim = negotiate_sim();
    let dir = temp_dir("skew");
    let keytab = station(realm, "station24", None, &dir);
    // As an Active Directory account does, the principal requires pre-authentication: the
    // station's own clock goes into the AS request.
    realm
        .kdc
        .kadmin("modprinc +requires_preauth station24")
        .expect("requires_preauth");
    let config = config_file(&dir, &cm_section(&sim, &keytab, ""));
    let no_timesync = dir.join("krb5-no-timesync.conf");
    let conf = std::fs::read_to_string(realm.kdc.krb5_conf()).expect("krb5.conf");
    std::fs::write(
        &no_timesync,
        conf.replace("[libdefaults]\n", "[libdefaults]\n kdc_timesync = 0\n"),
    )
    .expect("krb5.conf copy");
    let no_timesync = no_timesync.display().to_string();
    for offset in ["-20m", "+20m"] {
        let moved = [
            ("LD_PRELOAD", LIBFAKETIME),
            ("FAKETIME", offset),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ];
        let (ok, text) = check_online(&config, &moved);
        assert!(ok, "{offset} with kdc_timesync: {text}");
        let mut strict = moved.to_vec();
        strict.push(("KRB5_CONFIG", &no_timesync));
        let (ok, text) = check_online(&config, &strict);
        assert!(!ok, "{offset}: {text}");
        for wanted in [
            "clocks of this station and the KDC differ",
            "synchronise the station's clock",
        ] {
            assert!(
                text.contains(wanted),
                "{offset}: {wanted:?} missing from:\n{text}"
            );
        }
        assert!(
            !text.contains(NO_CREDENTIALS_FIX) && !text.contains("Ticket expired"),
            "{text}"
        );
    }
}

/// The KDC stops answering while the daemon runs: as long as the tickets last nothing shows,
/// and once they end the cause is the KDC (named with its address), not the keytab.
#[test]
fn a_kdc_gone_after_the_tickets_end_is_named_not_the_keytab() {
    let realm = realm();
    let dir = temp_dir("kdc-gone");
    let keytab = station(realm, "station26", Some("1 minute"), &dir);
    let scene = {
        let _up = realm.down.read().unwrap_or_else(|p| p.into_inner());
        scene(NegotiateStyle::default())
    };
    let daemon = daemon("krb-kdc-gone", &cm_section(&scene.sim, &keytab, ""));
    let started = Instant::now();
    let r = {
        let _up = realm.down.read().unwrap_or_else(|p| p.into_inner());
        daemon.wait_reconciliation(&scene.card_id, "", "matched", matched)
    };
    // Time passing is what is tested: the one-minute tickets must be over.
    std::thread::sleep(Duration::from_secs(65).saturating_sub(started.elapsed()));
    let _down = realm.down.write().unwrap_or_else(|p| p.into_inner());
    realm.kdc.stop();
    daemon.sync(&scene.card_id);
    let after = r["checked_at"].as_str().unwrap_or_default().to_string();
    let kdc = format!("127.0.0.1:{}", realm.kdc.port);
    let failed = daemon.wait_reconciliation(
        &scene.card_id,
        &after,
        "auth_failed naming the KDC",
        unavailable_with(&["auth_failed", "cannot be reached", &kdc]),
    );
    let reason = failed["reason"].as_str().unwrap_or_default();
    assert!(
        !reason.contains("keytab") && !reason.contains("Ticket expired"),
        "{reason}"
    );
    realm.kdc.restart().expect("KDC back");
}
