//! Helpers shared by the end-to-end tests: running the real `cardbridge` binary with a deadline,
//! and waiting for pcscd to notice a card.

#![allow(dead_code)] // Each test binary uses its own subset.

pub mod daemon;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use hw_tests::rig::{cardbridge_bin, Slot};
use hw_tests::sim::{matching_record, scepman_certs, Fixture, Simulator};
use hw_tests::vcard::CardSpec;
use hw_tests::vpcd::Inserted;
use serde_json::Value;

/// A fresh temporary directory that is removed when the guard is dropped, a failing test's
/// unwinding included.
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("cardbridge-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }
}

impl std::ops::Deref for TempDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Polls `f` until it gives a value, for at most `timeout`; panics naming `what` when it never
/// does. Every wait in the tests goes through here, so none is without a deadline.
pub fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let until = Instant::now() + timeout;
    loop {
        if let Some(value) = f() {
            return value;
        }
        assert!(Instant::now() < until, "waited {timeout:?} for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A 4-certificate PIV card in a leased reader slot, with its card id. Keep the guard and the
/// slot for the whole test (they drop after the card).
pub fn piv_card() -> (
    std::sync::RwLockReadGuard<'static, ()>,
    Slot,
    Inserted,
    String,
) {
    let rig = hw_tests::rig::Rig::get();
    let shared = rig.shared();
    let slot = rig.slot();
    wait_for_card(&slot.reader, false);
    let card = insert(CardSpec::piv_four_certs(), &slot);
    let card_id = card.truth.card_id.clone().expect("card id");
    (shared, slot, card, card_id)
}

/// The MIM CM / SCEPman simulator knowing a card: its MIM CM record (in Windows card-id order)
/// and, with `scepman`, SCEPman records of its certificates.
pub fn simulator_knowing(truth: &hw_tests::vcard::Truth, scepman: bool) -> Simulator {
    let fixture = Fixture {
        smartcards: vec![matching_record(truth, true)],
        scepman: if scepman {
            scepman_certs(truth)
        } else {
            Vec::new()
        },
        ..Fixture::default()
    };
    Simulator::start(fixture, 0).expect("simulator")
}

/// Puts a card built from `spec` into `slot` and waits until pcscd sees it.
pub fn insert(spec: CardSpec, slot: &Slot) -> Inserted {
    match hw_tests::rig::insert_card(spec, slot) {
        Ok(inserted) => inserted,
        Err(e) => panic!("cannot insert the virtual card: {e:#}"),
    }
}

/// Runs `cardbridge` with `args`; panics if it does not finish within `limit` (a hang is a bug).
pub fn run_cardbridge(args: &[&str], envs: &[(&str, &str)], limit: Duration) -> Output {
    let mut child = Command::new(cardbridge_bin())
        .args(args)
        .envs(envs.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start cardbridge");
    let until = Instant::now() + limit;
    loop {
        if child.try_wait().expect("wait for cardbridge").is_some() {
            return child.wait_with_output().expect("collect cardbridge output");
        }
        if Instant::now() > until {
            let _ = child.kill();
            panic!("cardbridge {args:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `cardbridge scan --json [--reader R] [extra…]`, parsed.
pub fn scan_json(reader: Option<&str>, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["scan", "--json"];
    if let Some(r) = reader {
        args.extend(["--reader", r]);
    }
    args.extend(extra);
    let out = run_cardbridge(&args, &[], Duration::from_secs(30));
    assert!(
        out.status.success(),
        "scan failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("scan --json prints JSON")
}

/// The one card `scan --json --reader R` reports.
pub fn scan_one(reader: &str, extra: &[&str]) -> Value {
    let cards = scan_json(Some(reader), extra);
    assert_eq!(cards.len(), 1, "expected one card in {reader}: {cards:#?}");
    cards.into_iter().next().unwrap_or_default()
}

/// Waits until pcscd reports `reader` with (or without) a card.
pub fn wait_for_card(reader: &str, present: bool) {
    if let Err(e) = hw_tests::rig::wait_for_card(reader, present) {
        panic!("{e:#}");
    }
}

/// Slot, thumbprint and compression of every certificate, in order.
pub fn cert_summary(card: &Value) -> Vec<(String, String, bool)> {
    card["certificates"]
        .as_array()
        .expect("certificates array")
        .iter()
        .map(|c| {
            (
                c["slot"].as_str().unwrap_or_default().to_string(),
                c["thumbprint"].as_str().unwrap_or_default().to_string(),
                c["compressed"].as_bool().unwrap_or_default(),
            )
        })
        .collect()
}

pub fn truth_summary(truth: &hw_tests::vcard::Truth) -> Vec<(String, String, bool)> {
    truth
        .certificates
        .iter()
        .map(|c| (c.slot.clone(), c.thumbprint.clone(), c.compressed))
        .collect()
}

/// The DER inside a PEM text (as `pkcs15-tool --read-certificate` prints it); `None` when it
/// holds none.
pub fn pem_to_der(pem: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(body.trim())
        .ok()
        .filter(|der| !der.is_empty())
}
