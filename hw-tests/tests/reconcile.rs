//! End-to-end reconciliation: a virtual card in vpcd, the CM simulator on loopback, and
//! `cardbridge scan --reconcile --json`.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{insert, run_cardbridge};
use hw_tests::rig::{Rig, Slot};
use hw_tests::sim::{
    card_guid as guid, matching_record, scepman_certs, smartcard_uuid, without_sign_bytes, Fault,
    Fixture, ScepmanCert, Simulator,
};
use hw_tests::vcard::CardSpec;
use serde_json::{json, Value};

/// A simulator whose only record matches the card (in RFC 4122 or Windows card-id order).
fn sim_knowing(truth: &hw_tests::vcard::Truth, windows: bool) -> Simulator {
    let fixture = Fixture {
        smartcards: vec![matching_record(truth, windows)],
        ..Fixture::default()
    };
    Simulator::start(fixture, 0).expect("simulator")
}

struct Station {
    dir: PathBuf,
    config: PathBuf,
}

impl Station {
    fn new(name: &str, cm_section: &str) -> Station {
        let dir = std::env::temp_dir().join(format!(
            "cardbridge-reconcile-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let config = dir.join("config.toml");
        let text = format!(
            "state_dir = \"{}\"\n{cm_section}",
            dir.join("state").display()
        );
        std::fs::write(&config, text).expect("write config");
        Station { dir, config }
    }

    fn for_sim(name: &str, sim: &Simulator, extra: &str) -> Station {
        Station::new(
            name,
            &format!("[cm]\nbase_url = \"{}\"\n{extra}", sim.cm_base_url()),
        )
    }

    fn scan(&self, slot: &Slot) -> Value {
        let config = self.config.to_string_lossy().into_owned();
        let out = run_cardbridge(
            &[
                "scan",
                "--reconcile",
                "--json",
                "--reader",
                &slot.reader,
                "--config",
                &config,
            ],
            &[],
            Duration::from_secs(60),
        );
        assert!(
            out.status.success(),
            "scan failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let cards: Vec<Value> = serde_json::from_slice(&out.stdout).expect("JSON");
        assert_eq!(cards.len(), 1, "{cards:#?}");
        cards.into_iter().next().unwrap_or_default()
    }
}

impl Drop for Station {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn codes(card: &Value) -> Vec<String> {
    let mut codes: Vec<String> = card["reconciliation"]["findings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["code"].as_str().map(str::to_string))
        .collect();
    codes.sort();
    codes
}

fn cardid_lookups(sim: &Simulator) -> Vec<String> {
    sim.log()
        .into_iter()
        .filter(|l| l.route == "smartcards" && l.query.is_some())
        .filter_map(|l| l.query)
        .collect()
}

#[test]
fn a_matching_card_is_ok_and_both_byte_orders_are_found() {
    let rig = Rig::get();
    let _shared = rig.shared();
    let slot = rig.slot();
    let card = insert(CardSpec::piv_four_certs(), &slot);

    for windows in [false, true] {
        let sim = sim_knowing(&card.truth, windows);
        let station = Station::for_sim(if windows { "windows" } else { "rfc" }, &sim, "");
        let json = station.scan(&slot);
        let r = &json["reconciliation"];
        assert_eq!(r["state"], "matched", "{r:#}");
        assert_eq!(r["verdict"], "ok", "{r:#}");
        assert_eq!(codes(&json), Vec::<String>::new());
        assert_eq!(
            r["card_id_form"],
            if windows { "windows" } else { "rfc4122" }
        );
        assert_eq!(
            r["server_card"]["uuid"],
            smartcard_uuid(&card.truth).as_str()
        );
        assert_eq!(r["server_card"]["status"], "Active");
        assert_eq!(r["operations"], json!(["renew", "retire", "revoke"]));
        assert_eq!(
            r["certificates"].as_array().map(Vec::len),
            Some(card.truth.certificates.len())
        );
        // Windows order is asked first; RFC 4122 order only when that finds nothing.
        let first = format!("cardid={}", guid(&card.truth, true));
        assert_eq!(cardid_lookups(&sim)[0], first);
        assert_eq!(cardid_lookups(&sim).len(), if windows { 1 } else { 2 });
        // One connection serves every request of the reconciliation.
        let ports: std::collections::BTreeSet<u16> =
            sim.log().iter().map(|l| l.client.port()).collect();
        assert_eq!(ports.len(), 1, "{:?}", sim.log());

        // The form that answered is remembered in the state database: asked first next time.
        sim.clear_log();
        station.scan(&slot);
        assert_eq!(cardid_lookups(&sim).len(), 1);
        let state_db = station.dir.join("state").join("cardbridge.db");
        assert!(state_db.exists());
    }
}

#[test]
fn a_forced_byte_order_is_the_only_one_asked() {
    let rig = Rig::get();
    let _shared = rig.shared();
    let slot = rig.slot();
    let card = insert(CardSpec::piv_four_certs(), &slot);
    // The server knows the card in Windows order, the configuration forces RFC 4122 order.
    let sim = sim_knowing(&card.truth, true);
    let station = Station::for_sim("forced", &sim, "card_id_order = \"rfc4122\"\n");
    let json = station.scan(&slot);
    assert_eq!(json["reconciliation"]["state"], "not_found");
    let lookups = cardid_lookups(&sim);
    assert_eq!(lookups, [format!("cardid={}", guid(&card.truth, false))]);
}

#[test]
fn every_finding_is_reported() {
    let rig = Rig::get();
    let _shared = rig.shared();
    let slot = rig.slot();
    let spec = CardSpec {
        expired_slots: vec![0x9D],
        ..CardSpec::piv_four_certs()
    };
    let card = insert(spec, &slot);

    let mut record = matching_record(&card.truth, false);
    record.smartcard["Status"] = json!(3); // Disabled
    record.smartcard["Atr"] = json!("3b8d0180fba000000397425446590301c8");
    record.certificates.remove(1); // the server does not know the card's 9C certificate
    record.certificates.push(json!({"IsKeyHistory": false, "Thumbprint": "AA".repeat(20), "TemplateCommonName": "ContosoVpn"}));
    record.certificates.push(json!({"IsKeyHistory": true, "Thumbprint": "BB".repeat(20), "TemplateCommonName": "ContosoEncryption"}));
    let sim = Simulator::start(
        Fixture {
            smartcards: vec![record],
            ..Fixture::default()
        },
        0,
    )
    .expect("simulator");
    let station = Station::for_sim("findings", &sim, "");
    let json = station.scan(&slot);
    assert_eq!(
        codes(&json),
        [
            "atr_mismatch",
            "certificate_expired",
            "certificate_missing_from_card",
            "certificate_unknown_to_server",
            "key_history_absent",
            "status_not_active",
        ]
    );
    let r = &json["reconciliation"];
    assert_eq!(r["verdict"], "critical");
    assert_eq!(r["server_card"]["status"], "Disabled");
    let critical: Vec<_> = r["findings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["severity"] == "critical")
        .collect();
    assert_eq!(critical.len(), 1);
    assert_eq!(critical[0]["code"], "status_not_active");
}

#[test]
fn a_server_text_that_reverses_or_hides_characters_gets_a_finding() {
    let rig = Rig::get();
    let _shared = rig.shared();
    let slot = rig.slot();
    let card = insert(CardSpec::piv_four_certs(), &slot);
    let mut record = matching_record(&card.truth, false);
    // Reads "ContosoUser" turned around on a screen that honours U+202E.
    record.certificates[0]["TemplateCommonName"] = json!("Contoso\u{202E}resU");
    let thumbprint = record.certificates[0]["Thumbprint"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let sim = Simulator::start(
        Fixture {
            smartcards: vec![record],
            ..Fixture::default()
        },
        0,
    )
    .expect("simulator");
    let station = Station::for_sim("server-text", &sim, "");
    let json = station.scan(&slot);
    assert_eq!(codes(&json), ["server_text_hides_characters"]);
    let finding = &json["reconciliation"]["findings"][0];
    assert_eq!(finding["severity"], "warning");
    assert_eq!(
        finding["message"],
        format!(
            "the template of certificate {thumbprint} on MIM CM holds characters that reverse or \
             hide text (U+202E): show it isolated, with them visible"
        )
    );
    assert_eq!(json["reconciliation"]["verdict"], "attention");
}

#[test]
fn unknown_card_server_errors_and_timeouts() {
    let rig = Rig::get();
    let _shared = rig.shared();
    let slot = rig.slot();
    let card = insert(CardSpec::piv_four_certs(), &slot);

    // 204 for both byte orders: not found.
    let sim = Simulator::start(Fixture::default(), 0).expect("simulator");
    let station = Station::for_sim("notfound", &sim, "retries = 2\n");
    let json = station.scan(&slot);
    assert_eq!(json["reconciliation"]["state"], "not_found");
    assert_eq!(codes(&json), ["card_not_found"]);
    assert_eq!(cardid_lookups(&sim).len(), 2);

    // 500 with a correlation id: retried (GET), then reported with the id.
    sim.clear_log();
    sim.set_fault(
        "smartcards",
        Fault {
            error_500: true,
            ..Fault::default()
        },
    );
    let json = station.scan(&slot);
    let r = &json["reconciliation"];
    assert_eq!(r["state"], "server_unavailable");
    assert_eq!(r["verdict"], "unknown");
    let reason = r["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("6f9619ff-8b86-d011-b42d-00c04fc964ff"),
        "{reason}"
    );
    assert_eq!(sim.log().len(), 3, "one request and two retries");

    // A body that is not JSON.
    sim.set_fault(
        "smartcards",
        Fault {
            garbage: true,
            ..Fault::default()
        },
    );
    let r = station.scan(&slot)["reconciliation"].clone();
    assert!(
        r["reason"]
            .as_str()
            .unwrap_or_default()
            .starts_with("bad_body"),
        "{r:#}"
    );

    // A dropped connection.
    sim.set_fault(
        "smartcards",
        Fault {
            drop: true,
            ..Fault::default()
        },
    );
    let r = station.scan(&slot)["reconciliation"].clone();
    assert_eq!(r["state"], "server_unavailable", "{r:#}");

    // A server slower than the configured timeout.
    sim.set_fault(
        "smartcards",
        Fault {
            latency_ms: 1500,
            ..Fault::default()
        },
    );
    let slow = Station::for_sim("timeout", &sim, "timeout_ms = 300\nretries = 0\n");
    let r = slow.scan(&slot)["reconciliation"].clone();
    assert!(
        r["reason"]
            .as_str()
            .unwrap_or_default()
            .starts_with("timeout"),
        "{r:#}"
    );
    drop(card);
}

/// The daemon reads a card and reports it without waiting for a slow server: `card.read` comes
/// well before `card.reconciled`, which waits out the server's latency.
#[test]
fn a_slow_server_does_not_delay_card_reading() {
    use common::daemon::{next_event, Daemon};
    let rig = Rig::get();
    let _shared = rig.shared();
    let slot = rig.slot();
    common::wait_for_card(&slot.reader, false);
    let sim = Simulator::start(Fixture::default(), 0).expect("simulator");
    let latency = Duration::from_millis(2500);
    sim.set_fault(
        "smartcards",
        Fault {
            latency_ms: latency.as_millis() as u64,
            ..Fault::default()
        },
    );
    let daemon = Daemon::start(
        "slow",
        &format!("[cm]\nbase_url = \"{}\"\n", sim.cm_base_url()),
    );
    let mut events = daemon.events(None);
    let card = insert(CardSpec::piv_four_certs(), &slot);
    sim.replace_fixture(Fixture {
        smartcards: vec![matching_record(&card.truth, false)],
        ..Fixture::default()
    });
    let id = card.truth.card_id.clone().expect("card id");
    next_event(&mut events, |n, d| n == "card.read" && d.contains(&id));
    let read_at = std::time::Instant::now();
    next_event(&mut events, |n, d| {
        n == "card.reconciled" && d.contains(&id)
    });
    let waited = read_at.elapsed();
    assert!(
        waited >= latency - Duration::from_millis(500),
        "card.read came only {waited:?} before card.reconciled: the read waited for the server"
    );
}

#[test]
fn unreachable_or_absent_server() {
    let rig = Rig::get();
    let _shared = rig.shared();
    let slot = rig.slot();
    let _card = insert(CardSpec::piv_four_certs(), &slot);

    // Nothing listens on port 9 of loopback.
    let station = Station::new(
        "unreachable",
        "[cm]\nbase_url = \"http://127.0.0.1:9/CertificateManagement/\"\nretries = 0\n",
    );
    let r = station.scan(&slot)["reconciliation"].clone();
    assert_eq!(r["state"], "server_unavailable");
    assert!(
        r["reason"]
            .as_str()
            .unwrap_or_default()
            .starts_with("connection_refused"),
        "{r:#}"
    );

    // An unresolvable name.
    let station = Station::new(
        "dns",
        "[cm]\nbase_url = \"http://cm.invalid/CertificateManagement/\"\nretries = 0\n",
    );
    let r = station.scan(&slot)["reconciliation"].clone();
    assert!(
        r["reason"].as_str().unwrap_or_default().starts_with("dns"),
        "{r:#}"
    );

    // No [cm] section: not configured.
    let station = Station::new("none", "");
    let r = station.scan(&slot)["reconciliation"].clone();
    assert_eq!(r["state"], "not_configured");
    assert_eq!(r["verdict"], "unknown");
}

#[test]
fn a_card_without_an_id_is_not_looked_up() {
    let rig = Rig::get();
    let _shared = rig.shared();
    let slot = rig.slot();
    // An all-zero CHUID GUID is no identifier.
    let _card = insert(
        CardSpec {
            card_id: Some([0; 16]),
            ..CardSpec::piv_four_certs()
        },
        &slot,
    );
    let sim = Simulator::start(Fixture::default(), 0).expect("simulator");
    let station = Station::for_sim("noid", &sim, "");
    let json = station.scan(&slot);
    assert_eq!(json["card_id"], Value::Null);
    assert_eq!(json["reconciliation"]["state"], "no_card_id");
    assert_eq!(json["reconciliation"]["verdict"], "unknown");
    assert!(sim.log().is_empty(), "{:?}", sim.log());
}

#[test]
fn a_bad_configuration_exits_2_naming_the_key() {
    let station = Station::new("badconfig", "[cm]\nbase_url = \"https://x/\"\nretry = 3\n");
    let config = station.config.to_string_lossy().into_owned();
    let out = run_cardbridge(
        &["scan", "--reconcile", "--config", &config],
        &[],
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("retry") && stderr.contains("config.toml"),
        "{stderr}"
    );
}

/// A simulator serving both MIM CM (the card's record) and SCEPman (`scepman`).
fn sim_with_scepman(truth: &hw_tests::vcard::Truth, scepman: Vec<ScepmanCert>) -> Simulator {
    let fixture = Fixture {
        smartcards: vec![matching_record(truth, true)],
        scepman,
        ..Fixture::default()
    };
    Simulator::start(fixture, 0).expect("simulator")
}

fn scepman_section(base_url: &str) -> String {
    format!("[scepman]\nbase_url = \"{base_url}\"\nretries = 0\n")
}

/// The reconciliation's certificate entry for `thumbprint`.
fn certificate<'a>(card: &'a Value, thumbprint: &str) -> &'a Value {
    card["reconciliation"]["certificates"]
        .as_array()
        .and_then(|all| all.iter().find(|c| c["thumbprint"] == thumbprint))
        .unwrap_or(&Value::Null)
}

/// SCEPman's records of the card, serials listed with their DER sign byte or without it.
fn listed(truth: &hw_tests::vcard::Truth, sign_bytes: bool) -> Vec<ScepmanCert> {
    let certs = scepman_certs(truth);
    assert!(
        certs.iter().all(|c| c.serial_number.starts_with("00")),
        "the virtual card's serials have their top bit set"
    );
    if sign_bytes {
        certs
    } else {
        without_sign_bytes(certs)
    }
}

#[test]
fn a_certificate_revoked_in_scepman_is_critical_with_its_date_and_reason() {
    let rig = Rig::get();
    let _shared = rig.shared();
    let slot = rig.slot();
    let card = insert(CardSpec::piv_four_certs(), &slot);
    for sign_bytes in [true, false] {
        scepman_revoked(&card, &slot, sign_bytes);
    }
}

fn scepman_revoked(card: &hw_tests::vpcd::Inserted, slot: &Slot, sign_bytes: bool) {
    let mut known = listed(&card.truth, sign_bytes);
    known[1].revocation_date = Some("2026-11-20T09:30:00Z".into());
    known[1].revocation_reason = Some(1);
    known[1].revoked_by = Some("helpdesk@contoso.com through API user x".into());
    let sim = sim_with_scepman(&card.truth, known);
    let station = Station::for_sim(
        "scepman-revoked",
        &sim,
        &scepman_section(&sim.scepman_base_url()),
    );
    let json = station.scan(slot);
    let r = &json["reconciliation"];
    assert_eq!(
        (r["state"].as_str(), r["verdict"].as_str()),
        (Some("matched"), Some("critical")),
        "sign bytes {sign_bytes}: {r:#}"
    );
    assert_eq!(codes(&json), ["certificate_revoked"]);
    let revoked = &card.truth.certificates[1];
    let finding = &r["findings"][0]["message"];
    assert!(
        finding
            .as_str()
            .unwrap_or_default()
            .contains(&revoked.thumbprint)
            && finding
                .as_str()
                .unwrap_or_default()
                .contains("2026-11-20T09:30:00Z")
            && finding
                .as_str()
                .unwrap_or_default()
                .contains("keyCompromise"),
        "{finding}"
    );
    assert_eq!(
        certificate(&json, &revoked.thumbprint)["scepman"],
        json!({"status": "revoked", "revocation_date": "2026-11-20T09:30:00Z",
               "revocation_reason": "keyCompromise",
               "revoked_by": "helpdesk@contoso.com through API user x"})
    );
    let other = &card.truth.certificates[0].thumbprint;
    assert_eq!(certificate(&json, other)["scepman"]["status"], "active");
    // The searches share one connection to SCEPman.
    let ports: std::collections::BTreeSet<u16> = sim
        .log()
        .iter()
        .filter(|l| l.route == "search")
        .map(|l| l.client.port())
        .collect();
    assert_eq!(ports.len(), 1, "{:?}", sim.log());
}

#[test]
fn a_certificate_scepman_does_not_list_is_reported_as_information() {
    let rig = Rig::get();
    let _shared = rig.shared();
    let slot = rig.slot();
    let card = insert(CardSpec::piv_four_certs(), &slot);
    let mut known = scepman_certs(&card.truth);
    known.pop();
    let sim = sim_with_scepman(&card.truth, known);
    let station = Station::for_sim(
        "scepman-unlisted",
        &sim,
        &scepman_section(&sim.scepman_base_url()),
    );
    let json = station.scan(&slot);
    assert_eq!(codes(&json), ["certificate_unknown_to_scepman"]);
    assert_eq!(json["reconciliation"]["verdict"], "ok");
    let last = &card.truth.certificates[card.truth.certificates.len() - 1].thumbprint;
    assert_eq!(
        certificate(&json, last)["scepman"],
        json!({"status": "unknown", "revocation_date": null, "revocation_reason": null,
               "revoked_by": null, "reason": "not_listed"})
    );
}

#[test]
fn the_serial_is_matched_exactly_on_a_later_page_past_a_substring_decoy() {
    let rig = Rig::get();
    let _shared = rig.shared();
    let slot = rig.slot();
    let card = insert(CardSpec::piv_four_certs(), &slot);
    for sign_bytes in [true, false] {
        for revoked in [false, true] {
            serial_on_page_2(&card, &slot, sign_bytes, revoked);
        }
    }
}

/// The card's first certificate listed on page 2 of the search, active or `revoked` there.
fn serial_on_page_2(card: &hw_tests::vpcd::Inserted, slot: &Slot, sign_bytes: bool, revoked: bool) {
    let mut known = listed(&card.truth, sign_bytes);
    if revoked {
        known[0].revocation_date = Some("2026-11-30T08:00:00Z".into());
        known[0].revocation_reason = Some(4);
    }
    // The integer's canonical hex, the form cardbridge searches with.
    let target = known[0].serial_number.trim_start_matches('0').to_string();
    // Page 1 (100 items): a revoked certificate whose serial contains the target's, then
    // certificates whose subject names it. The real one is on page 2.
    let mut page = vec![ScepmanCert {
        serial_number: format!("00{target}00"),
        subject: "CN=decoy".into(),
        revocation_date: Some("2026-01-01T00:00:00Z".into()),
        revocation_reason: Some(1),
        ..ScepmanCert::default()
    }];
    page.extend((0..120).map(|n| ScepmanCert {
        serial_number: format!("77{n:04}"),
        subject: format!("CN=note {target} {n}"),
        ..ScepmanCert::default()
    }));
    page.extend(known);
    let sim = sim_with_scepman(&card.truth, page);
    let station = Station::for_sim(
        "scepman-pages",
        &sim,
        &scepman_section(&sim.scepman_base_url()),
    );
    let json = station.scan(slot);
    let thumbprint = &card.truth.certificates[0].thumbprint;
    let scepman = &certificate(&json, thumbprint)["scepman"];
    // The decoy on page 1 is revoked too, on another date: only the page-2 item may count.
    let (status, date) = match revoked {
        true => ("revoked", json!("2026-11-30T08:00:00Z")),
        false => ("active", Value::Null),
    };
    assert_eq!(
        (&scepman["status"], &scepman["revocation_date"]),
        (&json!(status), &date),
        "sign bytes {sign_bytes}, revoked {revoked}: {json:#}"
    );
    let searches: Vec<String> = sim
        .log()
        .into_iter()
        .filter(|l| l.route == "search")
        .filter_map(|l| l.query)
        .collect();
    let first = searches
        .iter()
        .position(|q| q.contains(&format!("searchText={target}")))
        .expect("searched by serial");
    assert!(
        first + 1 < searches.len() && searches[first + 1].contains("continuationToken="),
        "the second page follows the first: {searches:#?}"
    );
    assert!(
        searches[first].contains("certValidity=Any"),
        "{searches:#?}"
    );
}

#[test]
fn scepman_down_leaves_its_part_unknown_and_the_cm_part_intact() {
    let rig = Rig::get();
    let _shared = rig.shared();
    let slot = rig.slot();
    let card = insert(CardSpec::piv_four_certs(), &slot);
    let sim = sim_with_scepman(&card.truth, Vec::new());
    // Nothing listens on port 9 of loopback.
    let station = Station::for_sim(
        "scepman-down",
        &sim,
        &scepman_section("http://127.0.0.1:9/"),
    );
    let json = station.scan(&slot);
    let r = &json["reconciliation"];
    assert_eq!(
        (r["state"].as_str(), r["verdict"].as_str()),
        (Some("matched"), Some("ok")),
        "{r:#}"
    );
    assert_eq!(codes(&json), Vec::<String>::new());
    for cert in &card.truth.certificates {
        let scepman = &certificate(&json, &cert.thumbprint)["scepman"];
        assert_eq!(scepman["status"], "unknown", "{scepman}");
        assert!(
            scepman["reason"]
                .as_str()
                .unwrap_or_default()
                .starts_with("connection_refused"),
            "{scepman}"
        );
    }
}

/// MIM CM records a minidriver card's id as a .NET Guid (Windows byte order): an IDPrime
/// card's cardid file is found that way, with its certificates.
#[test]
fn an_idprime_card_is_found_by_its_cardid_in_dotnet_guid_form() {
    let rig = Rig::get();
    let _shared = rig.shared();
    let slot = rig.slot();
    let spec = hw_tests::vcard::idprime::Spec::md840();
    let card = insert(CardSpec::idprime(spec), &slot);
    let sim = sim_knowing(&card.truth, true);
    let station = Station::for_sim("idprime", &sim, "");
    let json = station.scan(&slot);
    assert_eq!(json["kind"], "idprime");
    let r = &json["reconciliation"];
    assert_eq!(r["state"], "matched", "{r:#}");
    assert_eq!(r["verdict"], "ok", "{r:#}");
    assert_eq!(r["card_id_form"], "windows");
    assert_eq!(
        cardid_lookups(&sim),
        [format!("cardid={}", guid(&card.truth, true))]
    );
    let on_both = r["certificates"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["on_card"] == true && c["on_server"] == true)
        .count();
    assert_eq!(on_both, 3, "{r:#}");
}
