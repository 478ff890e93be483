//! End-to-end: what a station's history adds to a reconciliation, through `cardbridge run`,
//! real pcscd and the simulator: the last known answer while MIM CM is unreachable (also after a
//! restart), a YubiKey whose card id changed, and SCEPman answers reused until a sync.

mod common;

use common::daemon::{next_event, Daemon, HELPDESK};
use common::{insert, piv_card};
use hw_tests::rig::{insert_virtual, Rig};
use hw_tests::sim::{card_guid, scepman_certs, Simulator};
use hw_tests::vcard::{CardSpec, VirtualCard};
use serde_json::{json, Value};

fn cm_only(sim: &Simulator) -> String {
    format!(
        "[cm]\nbase_url = \"{}\"\nretries = 0\ntimeout_ms = 2000\n",
        sim.cm_base_url()
    )
}

fn sync(daemon: &Daemon, card_id: &str) {
    let auth = format!("Bearer {HELPDESK}");
    let (status, body) = daemon.request(
        "POST",
        &format!("/v1/cards/{card_id}/sync"),
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        "{}",
    );
    assert_eq!(status, 202, "{body}");
}

/// The parts of a successful reconciliation that `last_known` keeps.
fn kept(r: &Value) -> Value {
    json!({
        "checked_at": r["checked_at"], "state": r["state"], "verdict": r["verdict"],
        "server_card": r["server_card"], "findings": r["findings"],
        "certificates": r["certificates"],
    })
}

#[test]
fn the_last_known_answer_stays_while_cm_is_unreachable_and_across_a_restart() {
    let (_shared, _slot, card, card_id) = piv_card();
    let sim = common::simulator_knowing(&card.truth, false);
    let mut daemon = Daemon::start("last-known", &cm_only(&sim));
    let matched = daemon.wait_reconciliation(&card_id, "", "matched", |r| r["state"] == "matched");
    assert_eq!(matched["last_known"], Value::Null, "only while unreachable");

    drop(sim);
    sync(&daemon, &card_id);
    let down = daemon.wait_reconciliation(&card_id, "", "server_unavailable", |r| {
        r["state"] == "server_unavailable"
    });
    assert_eq!(
        down["verdict"], "unknown",
        "the verdict rules stay as they are"
    );
    assert_eq!(down["last_known"], kept(&matched), "{down:#}");

    daemon.kill9();
    daemon.restart();
    let after =
        daemon.wait_reconciliation(&card_id, "", "server_unavailable after a restart", |r| {
            r["state"] == "server_unavailable"
        });
    assert_eq!(after["last_known"], kept(&matched), "{after:#}");
}

#[test]
fn a_yubikey_whose_card_id_changed_is_found_by_its_earlier_id() {
    let rig = Rig::get();
    let _shared = rig.shared();
    let slot = rig.slot();
    common::wait_for_card(&slot.reader, false);
    let first = insert(CardSpec::piv_four_certs(), &slot);
    let old_id = first.truth.card_id.clone().expect("card id");
    let serial = first.truth.serial_number.clone().expect("YubiKey serial");
    let sim = common::simulator_knowing(&first.truth, false);
    let daemon = Daemon::start("card-id-changed", &cm_only(&sim));
    let mut events = daemon.events(None);
    daemon.wait_reconciliation(&old_id, "", "matched", |r| r["state"] == "matched");
    first.remove();

    // The same YubiKey after `ykman piv certificates import`: a new CHUID, the same serial.
    let serial_number: u32 = serial.parse().expect("numeric serial");
    let second = insert(
        CardSpec {
            yubikey_serial: Some(serial_number),
            ..CardSpec::piv_four_certs()
        },
        &slot,
    );
    let new_id = second.truth.card_id.clone().expect("card id");
    assert_ne!(new_id, old_id);
    let (_, _, data) = next_event(&mut events, |n, d| {
        n == "card.reconciled" && d.contains(&new_id)
    });
    let r: Value = serde_json::from_str(&data).expect("JSON");
    assert_eq!(r["state"], "matched", "{r:#}");
    assert_eq!(r["verdict"], "attention", "{r:#}");
    assert_eq!(
        r["earlier_card"],
        json!({"card_id": old_id, "serial_number": serial, "thumbprints": []})
    );
    let finding = r["findings"]
        .as_array()
        .and_then(|f| f.iter().find(|f| f["code"] == "card_id_changed"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(finding["severity"], "warning", "{r:#}");
    assert!(
        finding["message"]
            .as_str()
            .unwrap_or_default()
            .contains(&old_id),
        "{finding}"
    );
}

#[test]
fn a_card_without_an_id_is_linked_to_history_but_not_looked_up() {
    let rig = Rig::get();
    let _shared = rig.shared();
    let slot = rig.slot();
    common::wait_for_card(&slot.reader, false);
    let first = insert(CardSpec::piv_four_certs(), &slot);
    let old_id = first.truth.card_id.clone().expect("card id");
    let old_forms = [
        card_guid(&first.truth, true),
        card_guid(&first.truth, false),
    ];
    let serial = first.truth.serial_number.clone().expect("YubiKey serial");
    let sim = common::simulator_knowing(&first.truth, false);
    let daemon = Daemon::start("no-card-id-history", &cm_only(&sim));
    let mut events = daemon.events(None);
    daemon.wait_reconciliation(&old_id, "", "matched", |r| r["state"] == "matched");
    first.remove();
    sim.clear_log();

    let serial_number: u32 = serial.parse().expect("numeric serial");
    let _second = insert(
        CardSpec {
            yubikey_serial: Some(serial_number),
            card_id: Some([0; 16]),
            ..CardSpec::piv_four_certs()
        },
        &slot,
    );
    let (_, _, data) = next_event(&mut events, |n, d| {
        n == "card.reconciled" && d.contains("no_card_id")
    });
    let r: Value = serde_json::from_str(&data).expect("JSON");
    assert_eq!(r["verdict"], "unknown");
    assert_eq!(r["earlier_card"]["card_id"], old_id.as_str(), "{r:#}");
    assert_eq!(r["earlier_card"]["serial_number"], serial.as_str());
    // Neither a guessed id nor the earlier one is asked (the daemon also looks up cards that
    // other tests put in other slots, under their own ids).
    let asked: Vec<String> = sim.log().into_iter().filter_map(|l| l.query).collect();
    assert!(
        asked.iter().all(|q| !q.contains("00000000-0000")
            && old_forms
                .iter()
                .all(|form| !q.to_lowercase().contains(&form.to_lowercase()))),
        "{asked:?}"
    );
}

#[test]
fn scepman_answers_are_reused_until_a_sync_asks_again() {
    let rig = Rig::get();
    let _shared = rig.shared();
    let slot = rig.slot();
    common::wait_for_card(&slot.reader, false);
    let vcard = VirtualCard::new(CardSpec::piv_four_certs()).expect("virtual card");
    let card_id = vcard.truth.card_id.clone().expect("card id");
    let per_read = vcard.truth.certificates.len();
    let sim = common::simulator_knowing(&vcard.truth, true);
    let config = format!(
        "{}[scepman]\nbase_url = \"{}\"\nstatus_cache_seconds = 3600\n",
        cm_only(&sim),
        sim.scepman_base_url()
    );
    let daemon = Daemon::start("scepman-cache", &config);
    let mut events = daemon.events(None);
    // Only this card's searches: the daemon also reads cards other tests put in other slots.
    // cardbridge searches by the serial's canonical hex (no sign byte).
    let serials: Vec<String> = scepman_certs(&vcard.truth)
        .into_iter()
        .map(|c| c.serial_number.trim_start_matches('0').to_string())
        .collect();
    let searches = || {
        sim.log()
            .iter()
            .filter(|l| l.route == "search")
            .filter(|l| {
                l.query
                    .as_deref()
                    .is_some_and(|q| serials.iter().any(|s| q.contains(s.as_str())))
            })
            .count()
    };
    let mut reconciled = || {
        next_event(&mut events, |n, d| {
            n == "card.reconciled" && d.contains(&card_id)
        });
    };

    let inserted = insert_virtual(vcard.clone(), &slot).expect("insert");
    reconciled();
    assert_eq!(searches(), per_read, "one search per certificate");

    // The same card out and in again: read and reconciled again, SCEPman not asked.
    inserted.remove();
    let _inserted = insert_virtual(vcard, &slot).expect("insert again");
    reconciled();
    assert_eq!(
        searches(),
        per_read,
        "answers reused within status_cache_seconds"
    );

    // A sync asks again.
    sync(&daemon, &card_id);
    reconciled();
    assert_eq!(searches(), 2 * per_read);
}
