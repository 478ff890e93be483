//! Cross-check with an independent reader: OpenSC's `pkcs15-tool` must see the same certificates
//! (by SHA-1 of the DER) as `cardbridge scan --json` on the same virtual PIV card.

mod common;

use std::process::Command;

use common::{insert, scan_one};
use hw_tests::rig::{reader_index, Rig};
use hw_tests::vcard::CardSpec;
use sha1::{Digest, Sha1};

#[test]
fn thumbprints_equal_openscs_certificates() {
    let rig = Rig::get();
    let _shared = rig.shared();
    let slot = rig.slot();
    let card = insert(CardSpec::piv_four_certs(), &slot);
    let json = scan_one(&slot.reader, &[]);

    // pkcs15-tool takes the reader's position in pcscd's list.
    let index = reader_index(&slot.reader).expect("rig reader listed");
    // OpenSC caches certificates under $HOME; give it an empty one.
    let home = std::env::temp_dir().join(format!("cardbridge-opensc-{}", std::process::id()));
    std::fs::create_dir_all(&home).expect("temp home");
    // OpenSC's PIV ids: 01 = 9A, 02 = 9C, 03 = 9D, 04 = 9E, 05.. = retired 82...
    let ids = [("9A", "01"), ("9C", "02"), ("9D", "03"), ("82", "05")];
    for (slot_name, id) in ids {
        let out = Command::new("pkcs15-tool")
            .args(["--reader", &index.to_string(), "--read-certificate", id])
            .env("HOME", &home)
            .output()
            .expect("pkcs15-tool is installed (apt-get install opensc)");
        assert!(
            out.status.success(),
            "pkcs15-tool: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let der = common::pem_to_der(&String::from_utf8_lossy(&out.stdout))
            .expect("pkcs15-tool prints PEM");
        let opensc = hex::encode_upper(Sha1::digest(&der));
        let ours = json["certificates"]
            .as_array()
            .and_then(|certs| certs.iter().find(|c| c["slot"] == slot_name))
            .and_then(|c| c["thumbprint"].as_str())
            .unwrap_or_else(|| panic!("cardbridge did not report slot {slot_name}"));
        assert_eq!(ours, opensc, "slot {slot_name}");
        let truth = card
            .truth
            .certificates
            .iter()
            .find(|c| c.slot == slot_name)
            .map(|c| c.thumbprint.as_str());
        assert_eq!(Some(ours), truth);
    }
    let _ = std::fs::remove_dir_all(&home);
}
