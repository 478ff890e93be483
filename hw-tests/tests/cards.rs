//! End-to-end: virtual cards in vpcd readers of a real pcscd, read by the real `cardbridge scan`.

mod common;

use std::time::Duration;

use common::*;
use hw_tests::rig::Rig;
use hw_tests::vcard::{idprime, CardSpec, Compress, Faults};
use serde_json::Value;

fn error_code(card: &Value) -> Option<&str> {
    card["error"]["code"].as_str()
}

#[test]
fn piv_card_with_compressed_and_retired_slots() {
    let rig = Rig::get();
    let _shared = rig.shared();
    let slot = rig.slot();
    let card = insert(CardSpec::piv_four_certs(), &slot);
    let json = scan_one(&slot.reader, &[]);

    assert_eq!(json["error"], Value::Null);
    assert_eq!(json["reader"], slot.reader.as_str());
    assert_eq!(json["kind"], "piv");
    assert_eq!(json["atr"], card.truth.atr.as_str());
    assert_eq!(json["card_id"].as_str(), card.truth.card_id.as_deref());
    let guid = json["card_guid"].as_str().expect("card_guid");
    assert_eq!(
        guid.replace('-', "").to_uppercase(),
        card.truth.card_id.clone().unwrap_or_default()
    );
    assert_eq!(
        json["serial_number"].as_str(),
        card.truth.serial_number.as_deref()
    );
    assert!(card.truth.serial_number.is_some());
    assert_eq!(json["piv"]["yubikey_version"], "5.4.3");
    assert_eq!(json["piv"]["key_history"]["keys_with_on_card_certs"], 1);
    assert_eq!(json["atr_info"]["extended_length"], true);
    assert_eq!(cert_summary(&json), truth_summary(&card.truth));
    for cert in json["certificates"].as_array().into_iter().flatten() {
        assert_eq!(cert["error"], Value::Null);
        assert_eq!(cert["template"], "ContosoSmartcardUser");
        assert_eq!(cert["key_algorithm"], "EC P-256");
        assert_eq!(cert["issuer"], "CN=Contoso Issuing CA 1, O=Contoso");
        assert_eq!(cert["sha256"].as_str().map(str::len), Some(64));
    }
    // SELECT, CHUID, 4 slots, key history, 1 retired, GET VERSION, GET SERIAL.
    let apdus = json["apdu_count"].as_u64().unwrap_or(u64::MAX);
    assert!(apdus <= 12, "{apdus} APDUs");
    assert_eq!(apdus, card.apdu_count());
}

#[test]
fn piv_card_with_short_apdus_zlib_and_no_key_history() {
    let rig = Rig::get();
    let _shared = rig.shared();
    let slot = rig.slot();
    let spec = CardSpec {
        slots: vec![(0x9A, Compress::Zlib), (0x9E, Compress::Gzip)],
        retired: 2,
        key_history: false,
        yubikey_serial: None,
        extended_length: false,
        ..CardSpec::piv_four_certs()
    };
    let card = insert(spec, &slot);
    let json = scan_one(&slot.reader, &[]);
    assert_eq!(json["error"], Value::Null);
    assert_eq!(cert_summary(&json), truth_summary(&card.truth));
    assert_eq!(json["serial_number"], Value::Null);
    assert_eq!(json["atr_info"]["extended_length"], false);
    // Without key history every retired slot is probed, and certificates arrive in 61xx chunks.
    let apdus = json["apdu_count"].as_u64().unwrap_or_default();
    assert!(apdus >= 1 + 1 + 4 + 1 + 20 + 1 + 4, "{apdus} APDUs");
}

#[test]
fn gids_card_with_two_containers() {
    let rig = Rig::get();
    let _shared = rig.shared();
    let slot = rig.slot();
    let card = insert(CardSpec::gids_two_containers(), &slot);
    let json = scan_one(&slot.reader, &[]);
    assert_eq!(json["error"], Value::Null);
    assert_eq!(json["kind"], "gids");
    assert_eq!(json["piv"], Value::Null);
    assert_eq!(json["gids"]["version"], 2);
    assert_eq!(json["gids"]["containers"].as_array().map(Vec::len), Some(2));
    assert_eq!(json["card_id"].as_str(), card.truth.card_id.as_deref());
    assert_eq!(cert_summary(&json), truth_summary(&card.truth));
    assert_eq!(json["certificates"][0]["template"], "ContosoGidsUser");
}

#[test]
fn two_readers_at_once() {
    let rig = Rig::get();
    let _shared = rig.shared();
    let (a, b) = (rig.slot(), rig.slot());
    let piv = insert(CardSpec::piv_four_certs(), &a);
    let gids = insert(CardSpec::gids_two_containers(), &b);
    let cards = scan_json(None, &[]);
    let find = |reader: &str| {
        cards
            .iter()
            .find(|c| c["reader"] == reader)
            .unwrap_or_else(|| panic!("no card for {reader} in {cards:#?}"))
    };
    assert_eq!(cert_summary(find(&a.reader)), truth_summary(&piv.truth));
    assert_eq!(cert_summary(find(&b.reader)), truth_summary(&gids.truth));
}

#[test]
fn card_pulled_mid_read_then_next_insert_reads() {
    let rig = Rig::get();
    let _shared = rig.shared();
    let slot = rig.slot();
    let spec = CardSpec {
        extended_length: false,
        faults: Faults {
            drop_mid_chain: true,
            ..Faults::default()
        },
        ..CardSpec::piv_four_certs()
    };
    let pulled = insert(spec, &slot);
    let json = scan_one(&slot.reader, &[]);
    assert_eq!(error_code(&json), Some("card_removed"), "{json:#}");
    assert_eq!(json["certificates"].as_array().map(Vec::len), Some(0));
    pulled.remove();

    let good = insert(CardSpec::piv_four_certs(), &slot);
    let json = scan_one(&slot.reader, &[]);
    assert_eq!(json["error"], Value::Null);
    assert_eq!(cert_summary(&json), truth_summary(&good.truth));
}

#[test]
fn malformed_cards_are_errors_not_panics_or_hangs() {
    let rig = Rig::get();
    let _shared = rig.shared();
    let slot = rig.slot();
    let cases: [(Faults, &str); 2] = [
        (
            Faults {
                wrong_tlv_length: true,
                ..Faults::default()
            },
            "malformed",
        ),
        (
            Faults {
                huge_length: true,
                ..Faults::default()
            },
            "malformed",
        ),
    ];
    for (faults, code) in cases {
        let spec = CardSpec {
            faults: faults.clone(),
            ..CardSpec::piv_four_certs()
        };
        let card = insert(spec, &slot);
        let json = scan_one(&slot.reader, &[]);
        assert_eq!(error_code(&json), Some(code), "{faults:?}: {json:#}");
        assert!(json["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
        card.remove();
    }
}

#[test]
fn a_garbage_certificate_is_reported_in_its_slot() {
    let rig = Rig::get();
    let _shared = rig.shared();
    let slot = rig.slot();
    let spec = CardSpec {
        faults: Faults {
            garbage_certificate: true,
            ..Faults::default()
        },
        ..CardSpec::piv_four_certs()
    };
    let card = insert(spec, &slot);
    let json = scan_one(&slot.reader, &[]);
    assert_eq!(json["error"], Value::Null);
    // The other slots read normally; 9A is there with its hash and an error.
    assert_eq!(cert_summary(&json), truth_summary(&card.truth));
    let first = &json["certificates"][0];
    assert_eq!(first["slot"], "9A");
    let error = first["error"].as_str().unwrap_or_default();
    assert!(error.contains("X.509"), "{first:#}");
    // A sentence, not the parser's debug text.
    assert!(
        !error.contains("Parsing Error") && !error.contains("Nom"),
        "{error}"
    );
    assert_eq!(first["subject"], Value::Null);
    assert_eq!(json["certificates"][1]["error"], Value::Null);
}

#[test]
fn a_slow_card_times_out_and_a_patient_read_succeeds() {
    let rig = Rig::get();
    let _shared = rig.shared();
    let slot = rig.slot();
    let spec = CardSpec {
        faults: Faults {
            slow_ms: 150,
            ..Faults::default()
        },
        ..CardSpec::piv_four_certs()
    };
    let card = insert(spec, &slot);
    let json = scan_one(&slot.reader, &["--card-timeout", "0.5"]);
    assert_eq!(error_code(&json), Some("timeout"), "{json:#}");
    let json = scan_one(&slot.reader, &["--card-timeout", "10"]);
    assert_eq!(json["error"], Value::Null);
    assert_eq!(cert_summary(&json), truth_summary(&card.truth));
}

#[test]
fn an_unknown_reader_name_is_an_error() {
    let rig = Rig::get();
    let _shared = rig.shared();
    let out = run_cardbridge(
        &["scan", "--reader", "no such reader"],
        &[],
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such reader"));
}

/// Each family with its first compressed certificate corrupt: that slot carries its own error,
/// and every other certificate is still reported.
#[test]
fn a_corrupt_compressed_certificate_is_its_own_slots_error() {
    let rig = Rig::get();
    let _shared = rig.shared();
    let slot = rig.slot();
    let corrupt = Faults {
        corrupt_compressed: true,
        ..Faults::default()
    };
    let cards = [
        CardSpec::piv_four_certs(),
        CardSpec::gids_two_containers(),
        CardSpec::idprime(idprime::Spec::md840()),
    ];
    for spec in cards {
        let spec = CardSpec {
            faults: corrupt.clone(),
            ..spec
        };
        let card = insert(spec, &slot);
        let json = scan_one(&slot.reader, &[]);
        assert_eq!(json["error"], Value::Null, "{json:#}");
        let certs = json["certificates"].as_array().cloned().unwrap_or_default();
        assert_eq!(certs.len(), card.truth.certificates.len(), "{json:#}");
        let broken: Vec<&Value> = certs.iter().filter(|c| !c["error"].is_null()).collect();
        assert_eq!(broken.len(), 1, "{json:#}");
        let error = broken[0]["error"].as_str().unwrap_or_default();
        assert!(error.contains("cannot be read"), "{error}");
        // The good ones are exactly the card's other certificates.
        let good: Vec<_> = cert_summary(&json)
            .into_iter()
            .filter(|(slot, _, _)| *slot != broken[0]["slot"])
            .collect();
        let truth: Vec<_> = truth_summary(&card.truth)
            .into_iter()
            .filter(|(slot, _, _)| *slot != broken[0]["slot"])
            .collect();
        assert_eq!(good, truth);
        card.remove();
    }
}

#[test]
fn a_blank_gids_card_is_an_empty_gids_card_with_a_note() {
    let rig = Rig::get();
    let _shared = rig.shared();
    let slot = rig.slot();
    let spec = CardSpec {
        faults: Faults {
            blank: true,
            ..Faults::default()
        },
        ..CardSpec::gids_two_containers()
    };
    let _card = insert(spec, &slot);
    let json = scan_one(&slot.reader, &[]);
    assert_eq!(json["error"], Value::Null, "{json:#}");
    assert_eq!(json["kind"], "gids");
    assert_eq!(json["card_id"], Value::Null);
    assert_eq!(json["certificates"], serde_json::json!([]));
    let notes = json["notes"].to_string();
    assert!(notes.contains("not initialised"), "{notes}");
}

/// A card whose ATR announces extended length but which refuses it, with either answer cards
/// give, is read whole in short APDUs.
#[test]
fn a_card_refusing_extended_length_is_read_with_short_apdus() {
    let rig = Rig::get();
    let _shared = rig.shared();
    let slot = rig.slot();
    for sw in [0x6700, 0x6D00] {
        let spec = CardSpec {
            faults: Faults {
                refuse_extended: Some(sw),
                ..Faults::default()
            },
            ..CardSpec::piv_four_certs()
        };
        let card = insert(spec, &slot);
        let json = scan_one(&slot.reader, &[]);
        assert_eq!(json["error"], Value::Null, "{sw:04X}: {json:#}");
        assert_eq!(json["atr_info"]["extended_length"], true);
        assert_eq!(json["kind"], "piv");
        assert_eq!(cert_summary(&json), truth_summary(&card.truth), "{sw:04X}");
        card.remove();
    }
}

#[test]
fn a_card_with_no_known_applet_names_the_applets_tried() {
    let rig = Rig::get();
    let _shared = rig.shared();
    let slot = rig.slot();
    let spec = CardSpec {
        faults: Faults {
            no_applet: true,
            ..Faults::default()
        },
        ..CardSpec::piv_four_certs()
    };
    let _card = insert(spec, &slot);
    let json = scan_one(&slot.reader, &[]);
    assert_eq!(json["error"], Value::Null, "{json:#}");
    assert_eq!(json["kind"], "unknown");
    let notes = json["notes"].to_string();
    for tried in ["PIV", "GIDS", "IDPrime", "A000000018800000000662"] {
        assert!(notes.contains(tried), "{tried} in {notes}");
    }
}

/// Windows container names are 38 characters; the table shows each one whole.
#[test]
fn the_table_shows_container_names_whole() {
    let rig = Rig::get();
    let _shared = rig.shared();
    let slot = rig.slot();
    let card = insert(CardSpec::gids_two_containers(), &slot);
    let out = run_cardbridge(
        &["scan", "--reader", &slot.reader],
        &[],
        Duration::from_secs(30),
    );
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    for c in &card.truth.certificates {
        assert!(c.slot.len() >= 38, "{}", c.slot);
        assert!(table.contains(&c.slot), "{} not in:\n{table}", c.slot);
        assert!(table.contains(&c.thumbprint));
    }
}

/// A card pulled and another put in between two APDUs, before pcscd polls the slot (vpcd lets
/// that happen under load): the rest of the read reaches the other card. The identity read once
/// more at the end is not the one from the start, so the read fails as a removal and reports
/// nothing of either card, in each family. Each card is replaced just after its identity was read.
#[test]
fn a_read_whose_apdus_reach_a_second_card_reports_neither() {
    let rig = Rig::get();
    let _shared = rig.shared();
    let slot = rig.slot();
    let cases = [
        ("PIV", CardSpec::piv_four_certs(), 3),
        ("GIDS", CardSpec::gids_two_containers(), 4),
        ("IDPrime", CardSpec::idprime(idprime::Spec::md840()), 2),
    ];
    for (family, spec, after) in cases {
        let spec = CardSpec {
            faults: Faults {
                replaced_after: Some(after),
                ..Faults::default()
            },
            ..spec
        };
        let card = insert(spec, &slot);
        let json = scan_one(&slot.reader, &[]);
        assert_eq!(json["error"]["code"], "card_removed", "{family}: {json:#}");
        let message = json["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("replaced during the read"),
            "{family}: {message}"
        );
        assert_eq!(json["certificates"], serde_json::json!([]), "{family}");
        assert_eq!(json["card_id"], Value::Null, "{family}");
        card.remove();
        wait_for_card(&slot.reader, false);
    }
}
