//! `qualify --virtual` end to end: it passes on a sound virtual card, and fails, naming the
//! check, when the card answers another reader differently (the comparison can fail).

mod common;

use std::process::Command;

use common::TempDir;
use hw_tests::rig::Rig;
use hw_tests::vcard::{idprime, CardSpec};
use serde_json::Value;

/// Runs `qualify --virtual` with `spec`; returns its exit code and its report.
fn qualify(name: &str, spec: &CardSpec) -> (Option<i32>, Value) {
    let dir = TempDir::new(name);
    let spec_file = dir.join("spec.json");
    std::fs::write(&spec_file, serde_json::to_vec(spec).expect("spec JSON")).expect("spec");
    let report = dir.join("report.json");
    // The tool moves the card in a slot of the shared rig: nothing else may use the rig then.
    let _alone = Rig::get().exclusive();
    let out = Command::new(env!("CARGO_BIN_EXE_qualify"))
        .args([
            "--virtual",
            "--cycles",
            "2",
            "--ykman",
            "none",
            "--virtual-spec",
        ])
        .arg(&spec_file)
        .arg("--report")
        .arg(&report)
        .output()
        .expect("run qualify");
    let text = std::fs::read(&report).unwrap_or_default();
    let report = serde_json::from_slice(&text).unwrap_or_else(|_| {
        panic!(
            "no report; stdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code(), report)
}

fn failed_checks(report: &Value) -> Vec<String> {
    report["cards"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["checks"].as_array().cloned().unwrap_or_default())
        .filter(|c| c["outcome"] == "fail")
        .filter_map(|c| c["what"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn a_sound_card_passes_with_one_read_per_insertion() {
    let (code, report) = qualify("qualify-pass", &CardSpec::piv_four_certs());
    assert_eq!(code, Some(0), "{report:#}");
    assert_eq!(report["passed"], true);
    assert_eq!(failed_checks(&report), Vec::<String>::new());
    let cycles = &report["cycles"][0];
    assert_eq!(cycles["reads_per_insertion"], serde_json::json!([1, 1]));
    assert_eq!(cycles["insert_to_read"]["count"], 2);
    let passed = report["cards"][0]["checks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["outcome"] == "pass")
        .count();
    assert!(
        passed >= 10,
        "ATR, card id and two hashes per certificate: {report:#}"
    );
}

#[test]
fn a_thumbprint_that_disagrees_fails_the_run_and_names_the_slot() {
    let mut spec = CardSpec::piv_four_certs();
    spec.faults.swap_certificates_after_first_read = true;
    let (code, report) = qualify("qualify-fail", &spec);
    assert_eq!(code, Some(1), "{report:#}");
    assert_eq!(report["passed"], false);
    assert_eq!(
        failed_checks(&report),
        [
            "SHA-1 of slot 9A",
            "SHA-1 of slot 9C",
            "SHA-256 of slot 9A",
            "SHA-256 of slot 9C"
        ]
    );
}

/// IDPrime cards qualify against OpenSC's idprime driver: the card id (OpenSC's serial is the
/// cardid file) and every certificate OpenSC can read agree; the 940's plain certificate, which
/// OpenSC before 0.25 cannot read, is skipped with that reason rather than failed.
#[test]
fn idprime_cards_pass_against_opensc() {
    for spec in [idprime::Spec::md840(), idprime::Spec::idp940()] {
        let plain = spec.certificates.iter().filter(|c| !c.compressed).count();
        let (code, report) = qualify("qualify-idprime", &CardSpec::idprime(spec));
        assert_eq!(code, Some(0), "{report:#}");
        assert_eq!(failed_checks(&report), Vec::<String>::new());
        let checks = report["cards"][0]["checks"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let outcome = |what: &str| {
            checks
                .iter()
                .find(|c| c["what"] == what)
                .map(|c| c["outcome"].clone())
        };
        assert_eq!(outcome("card id"), Some("pass".into()), "{report:#}");
        let skipped = checks
            .iter()
            .filter(|c| {
                c["other"]
                    .as_str()
                    .is_some_and(|o| o.contains("stored plain"))
            })
            .count();
        // The SHA-1 and SHA-256 rows of each plain certificate, with an OpenSC before 0.25.
        let info = Command::new("opensc-tool")
            .arg("--info")
            .output()
            .expect("opensc-tool");
        let version = hw_tests::qualify::opensc_version(&String::from_utf8_lossy(&info.stdout));
        let expected = if version < Some((0, 25)) {
            2 * plain
        } else {
            0
        };
        assert_eq!(skipped, expected, "OpenSC {version:?}: {report:#}");
    }
}
