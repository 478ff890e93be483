//! End-to-end: virtual IDPrime cards (T=0, short APDUs) in vpcd readers of a real pcscd, read by
//! the real `cardbridge scan`, and cross-checked with OpenSC's idprime driver.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use hw_tests::rig::{reader_index, Rig};
use hw_tests::vcard::{idprime, CardSpec};
use serde_json::Value;
use sha1::{Digest, Sha1};

/// What every IDPrime card must show: kind, ATR, card id, serial, and each certificate with its
/// container, both hashes of its DER and no error.
fn assert_reads_whole(json: &Value, card: &hw_tests::vpcd::Inserted) {
    assert_eq!(json["error"], Value::Null, "{json:#}");
    assert_eq!(json["kind"], "idprime");
    assert_eq!(json["atr"], card.truth.atr.as_str());
    assert_eq!(json["card_id"].as_str(), card.truth.card_id.as_deref());
    assert_eq!(
        json["serial_number"].as_str(),
        card.truth.serial_number.as_deref()
    );
    assert_eq!(cert_summary(json), truth_summary(&card.truth));
    for (cert, truth) in json["certificates"]
        .as_array()
        .into_iter()
        .flatten()
        .zip(&card.truth.certificates)
    {
        let der = hex::decode(&truth.der).expect("truth DER");
        let sha256 = hex::encode_upper(<sha2::Sha256 as sha2::Digest>::digest(&der));
        assert_eq!(cert["sha256"], sha256.as_str());
        assert_eq!(cert["error"], Value::Null, "{cert:#}");
    }
    assert_eq!(json["notes"], serde_json::json!([]));
}

#[test]
fn an_idprime_840_reads_in_at_most_20_apdus() {
    let rig = Rig::get();
    let _shared = rig.shared();
    let slot = rig.slot();
    let card = insert(CardSpec::idprime(idprime::Spec::md840()), &slot);
    let json = scan_one(&slot.reader, &[]);
    assert_reads_whole(&json, &card);
    assert_eq!(json["idprime"]["model"], "IDPrime MD 840");
    assert_eq!(json["idprime"]["os_level"], 3);
    let algorithms: Vec<&str> = json["certificates"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["key_algorithm"].as_str())
        .collect();
    assert_eq!(algorithms, ["RSA 2048", "EC P-256", "RSA 2048"]);
    let labels: Vec<&str> = json["certificates"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["label"].as_str())
        .collect();
    assert_eq!(
        labels,
        [
            "Key exchange certificate kxc00",
            "Signature certificate ksc01",
            "Signature certificate ksc02"
        ]
    );
    // 20 for the read, and one more: the CPLC again at the end, which tells a card replaced
    // during the read (see `card::end_of_read`).
    let apdus = json["apdu_count"].as_u64().unwrap_or(u64::MAX);
    assert!(apdus <= 21, "{apdus} APDUs");
    assert_eq!(apdus, card.apdu_count());
}

#[test]
fn an_idprime_940_with_a_plain_certificate_and_a_token_label() {
    let rig = Rig::get();
    let _shared = rig.shared();
    let slot = rig.slot();
    let card = insert(CardSpec::idprime(idprime::Spec::idp940()), &slot);
    let json = scan_one(&slot.reader, &[]);
    assert_reads_whole(&json, &card);
    assert_eq!(json["idprime"]["model"], "IDPrime 940");
    assert_eq!(json["idprime"]["token_label"], "Contoso Helpdesk");
    assert_eq!(
        json["idprime"]["containers"].as_array().map(Vec::len),
        Some(6)
    );
    let plain: Vec<&Value> = json["certificates"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["compressed"] == false)
        .collect();
    assert_eq!(plain.len(), 1, "one certificate is stored plain");
}

/// OpenSC caches card data under $HOME; each run gets an empty one.
fn opensc(tool: &str, reader: usize, args: &[&str], home: &Path) -> String {
    let out = Command::new(tool)
        .args(["--reader", &reader.to_string()])
        .args(args)
        .env("HOME", home)
        .output()
        .unwrap_or_else(|e| panic!("{tool} is installed (apt-get install opensc): {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What OpenSC reads of the card in `reader`: its serial and the SHA-1 of every certificate it
/// can read (OpenSC 0.23 lists a plain certificate but cannot read it).
fn opensc_view(reader: &str, home: &Path) -> (Option<String>, Vec<String>) {
    let index = reader_index(reader).expect("rig reader listed");
    let serial = hw_tests::qualify::opensc_hex(&opensc("opensc-tool", index, &["--serial"], home));
    let listing = opensc("pkcs15-tool", index, &["--list-certificates"], home);
    let mut sha1 = Vec::new();
    for id in hw_tests::qualify::opensc_certificate_ids(&listing) {
        let pem = opensc("pkcs15-tool", index, &["--read-certificate", &id], home);
        if let Some(der) = pem_to_der(&pem) {
            sha1.push(hex::encode_upper(Sha1::digest(&der)));
        }
    }
    (serial, sha1)
}

#[test]
fn cardbridge_and_opensc_agree_where_opensc_reads_the_card() {
    let rig = Rig::get();
    let _shared = rig.shared();
    let slot = rig.slot();
    let home = TempDir::new("opensc-idprime");
    for spec in [idprime::Spec::md840(), idprime::Spec::idp940()] {
        let card = insert(CardSpec::idprime(spec.clone()), &slot);
        let json = scan_one(&slot.reader, &[]);
        let (serial, opensc_sha1) = opensc_view(&slot.reader, &home);
        // opensc-tool --serial prints the cardid file: cardbridge's card id.
        assert_eq!(serial.as_deref(), json["card_id"].as_str(), "{spec:?}");
        let ours: Vec<String> = cert_summary(&json).into_iter().map(|c| c.1).collect();
        for sha1 in &opensc_sha1 {
            assert!(
                ours.contains(sha1),
                "OpenSC read {sha1}, cardbridge did not"
            );
        }
        let compressed = spec.certificates.iter().filter(|c| c.compressed).count();
        assert!(
            opensc_sha1.len() >= compressed,
            "OpenSC read {} of the {compressed} compressed certificates",
            opensc_sha1.len()
        );
        assert_eq!(ours.len(), spec.certificates.len());
        card.remove();
    }
}
