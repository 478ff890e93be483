//! Writes the seed corpora of the fuzz targets into `fuzz/corpus/<target>/`: where each
//! committed seed comes from, in one place.
//!
//! Card seeds are real card answers: virtual PIV, GIDS and IDPrime cards (the rig's `vcard`,
//! with real X.509 certificates, gzip- and zlib-compressed ones among them) are read through
//! `cardbridge::card::read_card`, every exchange is recorded, and each answer (for IDPrime,
//! each file put together from its reads) goes to the targets whose parser accepts it. Server, token, filter, configuration and API seeds follow the
//! documentation (`reference/cm-and-scepman-api.md`, the README's API section) and the shipped
//! example configuration. Run it again after changing the virtual card:
//!
//!   cargo run -p hw-tests --bin fuzz-seeds

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use cardbridge::card::{
    self, gids, idprime, minidriver, piv, tlv, CertificateInfo, Transport, TransportError,
};
use hw_tests::vcard::{self, Answer, CardSpec, Compress, VirtualCard};
use sha1::{Digest, Sha1};

/// Seeds by target name.
type Seeds = BTreeMap<&'static str, Vec<Vec<u8>>>;

fn main() -> Result<()> {
    let mut seeds = Seeds::new();
    for spec in cards() {
        record_card(spec, &mut seeds)?;
    }
    add_texts(&mut seeds);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    for (target, inputs) in &seeds {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
        for input in inputs {
            let name = hex::encode(Sha1::digest(input));
            std::fs::write(dir.join(name), input)?;
        }
        println!("{target}: {} seeds", inputs.len());
    }
    Ok(())
}

/// The card shapes the rig knows: PIV with and without compression, key history and a YubiKey
/// serial, GIDS, and IDPrime (compressed and plain certificates, a token label).
fn cards() -> Vec<CardSpec> {
    let mut zlib = CardSpec::piv_four_certs();
    zlib.slots = vec![(0x9A, Compress::Zlib), (0x9E, Compress::None)];
    zlib.key_history = false;
    zlib.yubikey_serial = None;
    zlib.extended_length = false;
    let mut retired = CardSpec::piv_four_certs();
    retired.retired = 3;
    vec![
        CardSpec::piv_four_certs(),
        zlib,
        retired,
        CardSpec::gids_two_containers(),
        CardSpec::idprime(vcard::idprime::Spec::idp940()),
    ]
}

/// A card that records what it was asked and what it answered.
struct Recorder {
    card: VirtualCard,
    exchanges: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Transport for Recorder {
    fn transmit(&mut self, command: &[u8]) -> Result<Vec<u8>, TransportError> {
        match self.card.process(command) {
            Answer::Reply(answer) => {
                self.exchanges.push((command.to_vec(), answer.clone()));
                Ok(answer)
            }
            Answer::Drop => Err(TransportError::CardRemoved),
        }
    }
}

struct SystemClock;

impl card::Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn now_utc(&self) -> time::OffsetDateTime {
        time::OffsetDateTime::now_utc()
    }
}

fn record_card(spec: CardSpec, seeds: &mut Seeds) -> Result<()> {
    let card = VirtualCard::new(spec)?;
    let atr = card.atr.clone();
    let mut recorder = Recorder {
        card,
        exchanges: Vec::new(),
    };
    let options = card::ReadOptions {
        smartcard_list: None,
        ..card::ReadOptions::default()
    };
    let read = card::read_card(
        &mut recorder,
        "Seed Reader 00 00",
        &atr,
        &options,
        &SystemClock,
    );
    anyhow::ensure!(
        read.error.is_none(),
        "the seed card did not read: {:?}",
        read.error
    );
    seeds.entry("atr").or_default().push(atr.clone());
    seeds
        .entry("card_read")
        .or_default()
        .push(script(&atr, &recorder.exchanges)?);
    for data in whole_answers(&recorder.exchanges) {
        sort_answer(&data, seeds);
    }
    for file in idprime_files(&recorder.exchanges) {
        sort_file(file, seeds);
    }
    for c in &read.certificates {
        seeds.entry("cert_summary").or_default().push(c.der.clone());
    }
    Ok(())
}

/// The card's answers in `card_read`'s input format: the ATR with a one-byte length, then each
/// answer with a two-byte length.
fn script(atr: &[u8], exchanges: &[(Vec<u8>, Vec<u8>)]) -> Result<Vec<u8>> {
    let mut out = vec![u8::try_from(atr.len())?];
    out.extend_from_slice(atr);
    for (_, answer) in exchanges {
        out.extend_from_slice(&u16::try_from(answer.len())?.to_be_bytes());
        out.extend_from_slice(answer);
    }
    Ok(out)
}

/// The answers' data with GET RESPONSE chains (`61xx`) joined, as the card layer sees them.
fn whole_answers(exchanges: &[(Vec<u8>, Vec<u8>)]) -> Vec<Vec<u8>> {
    let mut whole = Vec::new();
    let mut pending = Vec::new();
    for (_, answer) in exchanges {
        let (data, sw) = answer.split_at(answer.len().saturating_sub(2));
        pending.extend_from_slice(data);
        if sw.first() != Some(&0x61) {
            whole.push(std::mem::take(&mut pending));
        }
    }
    whole
}

/// IDPrime files as the card layer reads them: the data of the READ BINARY answers after each
/// SELECT FILE, joined; and the CPLC answer.
fn idprime_files(exchanges: &[(Vec<u8>, Vec<u8>)]) -> Vec<Vec<u8>> {
    let mut files: Vec<Vec<u8>> = Vec::new();
    for (command, answer) in exchanges {
        let data = &answer[..answer.len().saturating_sub(2)];
        match command.get(1..3) {
            Some([0xA4, 0x00]) => files.push(Vec::new()),
            Some([0xB0, _]) => {
                if let Some(file) = files.last_mut() {
                    file.extend_from_slice(data);
                }
            }
            Some([0xCA, 0x9F]) => files.push(data.to_vec()),
            _ => {}
        }
    }
    files.retain(|f| !f.is_empty());
    files
}

/// Sends one IDPrime file to every target whose parser takes it.
fn sort_file(file: Vec<u8>, seeds: &mut Seeds) {
    let accepted: [(&'static str, bool); 3] = [
        (
            "idprime_index",
            idprime::parse_index(&file).is_ok_and(|e| !e.is_empty())
                || idprime::parse_token_info(&file).is_some()
                || idprime::parse_cplc(&file).is_some(),
        ),
        (
            "minidriver_cmapfile",
            minidriver::parse_cmapfile(&file).is_ok_and(|c| !c.is_empty()),
        ),
        ("minidriver_certificate", is_minidriver_certificate(&file)),
    ];
    for (target, yes) in accepted {
        if yes {
            seeds.entry(target).or_default().push(file.clone());
        }
    }
}

/// Sends one answer's data to every target whose parser takes it: a PIV object (inside `53`) or
/// a GIDS data object (inside its own tag).
fn sort_answer(data: &[u8], seeds: &mut Seeds) {
    if data.is_empty() {
        return;
    }
    seeds.entry("tlv").or_default().push(data.to_vec());
    let Ok(outer) = tlv::single(data) else {
        return;
    };
    let value = outer.value.to_vec();
    let accepted: [(&'static str, bool); 6] = [
        ("piv_chuid", outer.tag == 0x53 && is_chuid(&value)),
        (
            "piv_cert_container",
            outer.tag == 0x53 && matches!(piv::parse_cert_container(&value, "9A"), Ok(Some(_))),
        ),
        (
            "piv_key_history",
            outer.tag == 0x53 && is_key_history(&value),
        ),
        (
            "gids_masterfile",
            outer.tag != 0x53 && gids::parse_masterfile(&value).is_ok_and(|f| !f.is_empty()),
        ),
        (
            "minidriver_cmapfile",
            outer.tag != 0x53 && minidriver::parse_cmapfile(&value).is_ok_and(|c| !c.is_empty()),
        ),
        (
            "minidriver_certificate",
            outer.tag != 0x53 && is_minidriver_certificate(&value),
        ),
    ];
    for (target, yes) in accepted {
        if yes {
            seeds.entry(target).or_default().push(value.clone());
        }
    }
}

fn is_chuid(value: &[u8]) -> bool {
    piv::parse_chuid(value).is_ok_and(|c| c.guid.is_some())
}

fn is_minidriver_certificate(value: &[u8]) -> bool {
    minidriver::decode_certificate(value).is_ok_and(|(der, compressed)| {
        CertificateInfo::from_der("kxc00".into(), String::new(), der, compressed)
            .error
            .is_none()
    })
}

fn is_key_history(value: &[u8]) -> bool {
    tlv::find(value, 0xC1).is_ok_and(|t| t.is_some()) && piv::parse_key_history(value).is_ok()
}

/// Seeds that are text: server answers, token responses, `$filter`s, configuration, API bodies.
/// The first byte of a server answer picks its status (see `cardbridge::fuzz`): 0 is 200, 2 is
/// 400, 5 is 409, 6 is 500.
fn add_texts(seeds: &mut Seeds) {
    let with_status = |status: u8, body: &str| {
        let mut out = vec![status];
        out.extend_from_slice(body.as_bytes());
        out
    };
    for (target, status, body) in SERVER_ANSWERS {
        seeds
            .entry(target)
            .or_default()
            .push(with_status(*status, body));
    }
    for (target, text) in LOCAL_TEXTS {
        seeds
            .entry(target)
            .or_default()
            .push(text.as_bytes().to_vec());
    }
    // ATRs of the shapes cards have: T=1 with historical bytes in COMPACT-TLV, a proprietary
    // category, an AID announced in the historical bytes, T=0 with several interface bytes, and
    // one cut short.
    for atr in [
        "3BFD1300008131FE158073C021C057597562694B657940",
        "3BF81300008131FE15597562696B65793404",
        "3B8F8001804F0CA0000003060300030000000068",
        "3BDC18FF8191FE1FC38073C821136605036351000250",
        "3B9F",
    ] {
        if let Ok(bytes) = hex::decode(atr) {
            seeds.entry("atr").or_default().push(bytes);
        }
    }
}

/// Server and token-endpoint answers: target, status selector, body.
const SERVER_ANSWERS: &[(&str, u8, &str)] = &[
    (
        "cm_json",
        0,
        r#"[{"Uuid":"0fa2c3c4-1b51-4c3d-9e36-1a2b3c4d5e6f","Status":1,"Flags":0,"AssignedUserUuid":"5e0f1d2c-3b4a-4958-a7b6-c5d4e3f2a1b0","ProfileTemplateUuid":"7c8d9e0f-1a2b-4c3d-8e4f-5a6b7c8d9e0f","ProfileTemplateVersion":3,"SerialNumber":"11409355","Atr":"3BF81300008131FE15597562696B65793404","Middleware":null,"Comment":""}]"#,
    ),
    (
        "cm_json",
        0,
        r#"{"Uuid":"0fa2c3c4-1b51-4c3d-9e36-1a2b3c4d5e6f","Status":6}"#,
    ),
    (
        "cm_json",
        0,
        r#"[{"IsKeyHistory":false,"ArchivedOnCa":false,"CertificateType":1,"TemplateCommonName":"ContosoSmartcardUser","SerialNumber":"7A2B00000000000000000000000000000001","Thumbprint":"A1B2C3D4E5F60718293A4B5C6D7E8F9012345678"}]"#,
    ),
    (
        "cm_json",
        0,
        r#"[{"Uuid":"a9b4c7d2-0000-4000-8000-000000000001","RequestType":5,"Status":6,"Comment":"lost","Submitted":"2026-11-02T10:00:00","Completed":null,"OldSmartcardUuid":"0fa2c3c4-1b51-4c3d-9e36-1a2b3c4d5e6f","NewSmartcardUuid":null}]"#,
    ),
    ("cm_json", 0, r#"["Retire","Revoke","Unblock"]"#),
    (
        "cm_json",
        0,
        r#""api/v1.0/requests/a9b4c7d2-0000-4000-8000-000000000001""#,
    ),
    ("cm_json", 1, ""),
    ("cm_json", 0, "null"),
    (
        "scepman_json",
        0,
        r#"{"items":[{"serialNumber":"7A2B","expirationDate":"2027-01-05T00:00:00Z","revocationDate":null,"revocationReason":null,"revokedBy":null},{"serialNumber":"17A2B9","revocationDate":"2026-11-01T10:00:00Z","revocationReason":1,"revokedBy":"admin@contoso.com"}],"continuationToken":"eyJxIjoiN0EyQiIsInAiOjF9"}"#,
    ),
    (
        "scepman_json",
        0,
        r#"{"items":[],"continuationToken":null}"#,
    ),
    (
        "server_error",
        5,
        r#"{"errorCode":5013,"errorMessage":"The certificate is already revoked."}"#,
    ),
    (
        "server_error",
        4,
        r#"{"errorCode":7012,"errorMessage":"Certificate not found."}"#,
    ),
    (
        "server_error",
        6,
        r#"{"Message":"An error has occurred. Correlation id: 4f6c2a1e-9b8d-4c7a-a1b2-c3d4e5f60718"}"#,
    ),
    ("server_error", 2, r#""The request is invalid.""#),
    (
        "oauth_token",
        0,
        r#"{"token_type":"Bearer","expires_in":3599,"ext_expires_in":3599,"access_token":"eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJhcGk6Ly9zY2VwbWFuIiwiZXhwIjoxNzk4NzYxNjAwLCJyb2xlcyI6WyJDZXJ0TWFzdGVyLlJldm9rZSJdfQ.c2lnbmF0dXJl"}"#,
    ),
    (
        "oauth_token",
        2,
        r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided.\r\nTrace ID: 0e6c\r\n","error_codes":[7000215],"timestamp":"2026-11-23 10:00:00Z"}"#,
    ),
    (
        "oauth_token",
        6,
        "<html><body>Service unavailable</body></html>",
    ),
];

/// Local texts: `$filter`s, API bodies, configuration files.
const LOCAL_TEXTS: &[(&str, &str)] = &[
    ("filter", "kind eq 'piv' and reconciliation/verdict eq 'critical'"),
    ("filter", "read_ms gt 100 or apdu_count le 12"),
    ("filter", "status eq 'failed' and created_at ge datetime'2026-11-01T00:00:00Z'"),
    ("filter", "reason ne 'it''s' and id lt 40"),
    ("api_body", r#"{"card_id":"3F1E2D4C5B6A79880011223344556677","target":"scepman","thumbprints":["A1B2C3D4E5F60718293A4B5C6D7E8F9012345678"],"reason":"keyCompromise","revoker":"helpdesk@contoso.com","comment":"lost on the train","dry_run":true}"#),
    ("api_body", r#"{"card_id":"3f:1e:2d:4c:5b:6a:79:88:00:11:22:33:44:55:66:77","target":"card","reason":"cessationOfOperation","operation":"retire"}"#),
    ("api_body", r#"{"code":"K7Q2-M9XD"}"#),
    ("api_body", r#"{"token":"cbk_0123456789abcdef"}"#),
    ("config", include_str!("../../../service/config.example.toml")),
    ("config", "[cm]\nurl = \"https://cm.contoso.com/CertificateManagement/\"\nauth = \"negotiate\"\n\n[api]\nlisten = \"127.0.0.1:8734\"\n"),
];
