//! Entry points for fuzzing: every parser of untrusted bytes behind one `fn(&[u8])`.
//!
//! Cards, servers, token endpoints, API clients and administrators' configuration files all hand
//! cardbridge bytes it must not panic on. Each function here feeds arbitrary bytes to one parser
//! the way the daemon does, and asserts what must hold of the result. Two runners share them:
//! - the cargo-fuzz targets in `fuzz/` (nightly, libFuzzer; `hw-tests/fuzz --seconds N`);
//! - `tests/fuzz_corpora.rs`, which replays the committed corpora and regression inputs on
//!   stable in every `cargo test`, so a fixed crash stays fixed everywhere.
//!
//! A function passes an input by returning; a panic, an endless loop or an unbounded allocation
//! is a finding.

use std::time::Instant;

use reqwest::StatusCode;
use serde_json::{json, Value};
use time::OffsetDateTime;

use crate::card::{
    self, atr, cert::CertificateInfo, gids, idprime, minidriver, piv, tlv, Transport,
    TransportError,
};

/// One fuzz target: its name (the cargo-fuzz target and the corpus directory) and its function.
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
}

/// Every target, in the order `hw-tests/fuzz` runs them.
pub const TARGETS: &[Target] = &[
    Target {
        name: "atr",
        run: atr,
    },
    Target {
        name: "tlv",
        run: tlv,
    },
    Target {
        name: "piv_chuid",
        run: piv_chuid,
    },
    Target {
        name: "piv_cert_container",
        run: piv_cert_container,
    },
    Target {
        name: "piv_key_history",
        run: piv_key_history,
    },
    Target {
        name: "gids_masterfile",
        run: gids_masterfile,
    },
    Target {
        name: "minidriver_cmapfile",
        run: minidriver_cmapfile,
    },
    Target {
        name: "minidriver_certificate",
        run: minidriver_certificate,
    },
    Target {
        name: "idprime_index",
        run: idprime_index,
    },
    Target {
        name: "cert_summary",
        run: cert_summary,
    },
    Target {
        name: "card_read",
        run: card_read,
    },
    Target {
        name: "cm_json",
        run: cm_json,
    },
    Target {
        name: "scepman_json",
        run: scepman_json,
    },
    Target {
        name: "server_error",
        run: server_error,
    },
    Target {
        name: "oauth_token",
        run: oauth_token,
    },
    Target {
        name: "filter",
        run: filter,
    },
    Target {
        name: "config",
        run: config,
    },
    Target {
        name: "api_body",
        run: api_body,
    },
];

/// An answer to reset (the ATR): every field it yields must serialise.
pub fn atr(data: &[u8]) {
    let info = atr::parse(data);
    assert!(
        serde_json::to_string(&info).is_ok(),
        "AtrInfo does not serialise"
    );
}

/// BER-TLV: iteration ends, and every item consumes at least one byte.
pub fn tlv(data: &[u8]) {
    let items = tlv::iter(data).take_while(Result::is_ok).count();
    assert!(
        items <= data.len(),
        "{items} items from {} bytes",
        data.len()
    );
    let _ = tlv::single(data);
    let _ = tlv::find(data, 0x53);
}

pub fn piv_chuid(data: &[u8]) {
    if let Ok(chuid) = piv::parse_chuid(data) {
        if let Some(fascn) = chuid.fascn.as_deref() {
            let _ = piv::decode_fascn(fascn);
        }
    }
}

/// A certificate container: what comes out, inflated or not, stays within the object bound.
pub fn piv_cert_container(data: &[u8]) {
    if let Ok(Some((der, _))) = piv::parse_cert_container(data, "9A") {
        assert!(
            der.len() <= card::apdu::MAX_OBJECT_SIZE,
            "{} bytes",
            der.len()
        );
    }
}

pub fn piv_key_history(data: &[u8]) {
    let _ = piv::parse_key_history(data);
}

pub fn gids_masterfile(data: &[u8]) {
    let _ = gids::parse_masterfile(data);
}

/// The cmapfile GIDS and IDPrime share: every record kept is flagged valid and whole.
pub fn minidriver_cmapfile(data: &[u8]) {
    if let Ok(containers) = minidriver::parse_cmapfile(data) {
        assert!(containers.len() <= data.len() / minidriver::CMAP_RECORD);
        assert!(containers.iter().all(|c| c.name.chars().count() <= 40));
    }
}

/// A GIDS or IDPrime certificate file, compressed or not: the result stays within the object
/// bound, and a file that does not decode still gives its slot an entry with an error.
pub fn minidriver_certificate(data: &[u8]) {
    match minidriver::decode_certificate(data) {
        Ok((der, _)) => assert!(
            der.len() <= card::apdu::MAX_OBJECT_SIZE,
            "{} bytes",
            der.len()
        ),
        Err(_) => {
            let file = minidriver::CertFile::parse("kxc00");
            let info = file.map(|f| f.certificate(&[], data.to_vec()));
            assert!(info.is_some_and(|i| i.error.is_some()));
        }
    }
}

/// The IDPrime index, token info and CPLC: entries never claim more bytes than were given.
pub fn idprime_index(data: &[u8]) {
    if let Ok(entries) = idprime::parse_index(data) {
        assert!(entries.len() * 21 < data.len());
    }
    if let Some(label) = idprime::parse_token_info(data) {
        assert!(label.len() <= 3 * data.len());
    }
    if let Some((_, serial)) = idprime::parse_cplc(data) {
        assert_eq!(serial.len(), 8);
    }
}

/// The certificate summary: whatever the bytes, the thumbprints are those of the bytes.
pub fn cert_summary(data: &[u8]) {
    let info = CertificateInfo::from_der(
        "9A".into(),
        "PIV Authentication".into(),
        data.to_vec(),
        false,
    );
    assert_eq!(info.thumbprint.len(), 40, "{}", info.thumbprint);
    assert_eq!(info.sha256.len(), 64, "{}", info.sha256);
    assert_eq!(
        info.error.is_none(),
        x509_parser::parse_x509_certificate(data).is_ok()
    );
}

/// A whole read against a card that answers with the input. The input is the ATR (one length
/// byte, then the bytes), then each answer as a two-byte big-endian length and its bytes; a card
/// with no answer left is pulled. The read ends, and it never claims more than it did.
pub fn card_read(data: &[u8]) {
    let (atr, answers) = match data.split_first() {
        Some((&len, rest)) if rest.len() >= usize::from(len) => rest.split_at(usize::from(len)),
        _ => return,
    };
    let mut transport = ScriptedCard { answers, sent: 0 };
    let options = card::ReadOptions {
        smartcard_list: None,
        ..card::ReadOptions::default()
    };
    let clock = StillClock(Instant::now());
    let read = card::read_card(&mut transport, "Fuzz Reader 00 00", atr, &options, &clock);
    assert_eq!(read.apdu_count, transport.sent, "APDUs counted");
    for c in &read.certificates {
        assert_eq!(c.thumbprint.len(), 40, "{}", c.thumbprint);
    }
    assert!(
        serde_json::to_string(&read).is_ok(),
        "a card does not serialise"
    );
}

/// A card whose answers are the fuzz input, one after another, whatever the command; it counts
/// every command it is sent.
struct ScriptedCard<'a> {
    answers: &'a [u8],
    sent: u32,
}

impl Transport for ScriptedCard<'_> {
    fn transmit(&mut self, _command: &[u8]) -> Result<Vec<u8>, TransportError> {
        // A command that gets no answer was sent all the same.
        self.sent += 1;
        let [hi, lo, rest @ ..] = self.answers else {
            return Err(TransportError::CardRemoved);
        };
        let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(rest.len());
        let (answer, rest) = rest.split_at(len);
        self.answers = rest;
        Ok(answer.to_vec())
    }
}

/// Time that stands still, so a fuzz input is never cut short by the read deadline.
struct StillClock(Instant);

impl card::Clock for StillClock {
    fn now(&self) -> Instant {
        self.0
    }
    fn now_utc(&self) -> OffsetDateTime {
        OffsetDateTime::UNIX_EPOCH
    }
}

/// The first byte picks the status, as a server could answer anything.
fn status_of(first: u8) -> StatusCode {
    [200, 204, 400, 401, 404, 409, 500, 503]
        .get(usize::from(first % 8))
        .and_then(|&s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK)
}

/// MIM CM answers, as each of the models the client reads: smart cards, certificates, requests,
/// operations, and a created request's URI.
pub fn cm_json(data: &[u8]) {
    let Some((&first, body)) = data.split_first() else {
        return;
    };
    let status = status_of(first);
    let _ = crate::cm::decode_list::<crate::cm::model::Smartcard>(status, body);
    let _ = crate::cm::decode_list::<crate::cm::model::X509ClmCertificate>(status, body);
    let _ = crate::cm::decode_list::<crate::cm::model::Request>(status, body);
    let _ = crate::cm::decode_list::<String>(status, body);
    let _ = serde_json::from_slice::<String>(body);
}

/// A SCEPman search page, and the exact-serial lookup over it.
pub fn scepman_json(data: &[u8]) {
    let Some((&first, body)) = data.split_first() else {
        return;
    };
    if let Ok(page) = crate::scepman::decode_search_page(status_of(first), body) {
        let wanted = crate::serial::Serial::parse("7A2B");
        if let Some(item) = wanted.as_ref().ok().and_then(|w| page.find_serial(w)) {
            assert!(wanted.is_ok_and(|w| w.matches(&item.serial_number)));
        }
    }
}

/// A refusal from either server: its message, error code and correlation id.
pub fn server_error(data: &[u8]) {
    let Some((&first, body)) = data.split_first() else {
        return;
    };
    let error = crate::http::status_error(status_of(first), &String::from_utf8_lossy(body));
    let _ = error.to_string();
}

/// A token endpoint's answer. The access token never appears in the error made of a bad answer.
pub fn oauth_token(data: &[u8]) {
    let Some((&first, body)) = data.split_first() else {
        return;
    };
    let status = status_of(first).as_u16();
    if let Err(e) = crate::auth::oauth::parse_token_response(status, body) {
        if let Some(token) = access_token_in(body) {
            assert!(
                !e.to_string().contains(token),
                "the error shows the token: {e}"
            );
        }
    }
    let _ = crate::auth::oauth::peek_claims(&String::from_utf8_lossy(body));
}

/// The value of `"access_token":"…"` when the body spells one out (8 characters or more, so a
/// chance match with the error's own words is ruled out).
fn access_token_in(body: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(body).ok()?;
    let after = text.split_once("\"access_token\"")?.1;
    let value = after
        .trim_start()
        .strip_prefix(':')?
        .trim_start()
        .strip_prefix('"')?;
    let token = value.split('"').next()?;
    (token.len() >= 8).then_some(token)
}

/// `$filter` on both lists: a refusal points inside the text, a filter applies to any item.
pub fn filter(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let card = json!({"kind": "piv", "reader": "Reader 00", "read_ms": 50,
        "reconciliation": {"verdict": "ok", "state": "reconciled"}});
    let revocation = json!({"id": 3, "status": "failed", "created_at": "2026-11-02T10:00:00Z"});
    for (fields, item) in [
        (crate::api::cards::CARD_FILTER_FIELDS, &card),
        (crate::api::revocations::FILTER_FIELDS, &revocation),
    ] {
        match crate::api::filter::Filter::parse(text, fields) {
            Ok(filter) => {
                let _ = filter.matches(item);
                let _ = filter.matches(&Value::Null);
            }
            Err(e) => assert!(e.at <= text.len(), "{e} at {} of {}", e.at, text.len()),
        }
    }
}

/// The configuration file.
pub fn config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::config::Config::parse(text);
    }
}

/// API request bodies: a revocation (parsed, then planned against a card this station never
/// read) and a console sign-in.
pub fn api_body(data: &[u8]) {
    if let Ok(submission) = crate::api::revocations::parse_submission(data) {
        let known = crate::revoke::Known {
            card: None,
            reconciliation: None,
            scepman_configured: true,
            cm_configured: true,
        };
        let _ = crate::revoke::plan(&submission, &known);
    }
    let _ = crate::api::console::parse_session_request(data);
}
