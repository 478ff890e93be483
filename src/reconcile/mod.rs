//! Reconciliation: what the physical card says against what MIM CM and SCEPman know about it.
//!
//! [`reconcile`] is a pure function of the card snapshot, the servers' data and the time, so
//! every rule is tested as a table without a server. [`Reconciler`] does the I/O: it finds the
//! card on MIM CM (trying both byte orders of the PIV card id) and fetches its certificates and
//! allowed operations, while [`scepman::StatusLookup`] asks SCEPman about each certificate.

pub mod history;
pub mod lookup;
pub mod recent;
pub mod scepman;

pub use history::{EarlierCard, LastKnown};
pub use lookup::Reconciler;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::card::Card;
use crate::cm::model::{normalize_guid, normalize_hex, smartcard_status_name, STATUS_ACTIVE};
use crate::cm::{Smartcard, X509ClmCertificate};
use crate::config::CardIdOrder;
use crate::http::ServerError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Matched,
    NotFound,
    ServerUnavailable,
    NotConfigured,
    NoCardId,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Ok,
    Attention,
    Critical,
    Unknown,
}

impl State {
    /// The name in the JSON contract.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Matched => "matched",
            State::NotFound => "not_found",
            State::ServerUnavailable => "server_unavailable",
            State::NotConfigured => "not_configured",
            State::NoCardId => "no_card_id",
        }
    }
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Attention => "attention",
            Verdict::Critical => "critical",
            Verdict::Unknown => "unknown",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    pub code: String,
    pub severity: Severity,
    pub message: String,
}

/// The server's record of the card, as the Reconciliation object shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerCard {
    pub uuid: String,
    pub status: String,
    pub status_code: i64,
    pub assigned_user: Option<String>,
    pub profile_template: Option<String>,
    pub atr: Option<String>,
    pub flags: i64,
    pub serial_number: Option<String>,
}

/// One certificate of the union of card and server, by thumbprint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateMatch {
    pub thumbprint: String,
    pub on_card: bool,
    pub on_server: bool,
    pub slot: Option<String>,
    pub template: Option<String>,
    pub key_history: bool,
    /// SCEPman's view of the certificate, when `[scepman]` is configured and the certificate
    /// is on the card.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scepman: Option<scepman::ScepmanStatus>,
}

/// The Reconciliation object of the JSON contract.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reconciliation {
    pub card_id: Option<String>,
    pub state: State,
    /// The byte order of the card-id string the server answered to.
    pub card_id_form: Option<CardIdForm>,
    pub server_card: Option<ServerCard>,
    pub certificates: Vec<CertificateMatch>,
    pub findings: Vec<Finding>,
    pub operations: Vec<String>,
    pub verdict: Verdict,
    /// Why the server could not be asked (`server_unavailable`), with the error's code first.
    pub reason: Option<String>,
    pub checked_at: String,
    /// With `server_unavailable`: the last successful comparison (information only; the
    /// verdict stays `unknown`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_known: Option<LastKnown>,
    /// The earlier card of this station this one appears to be, when the server did not know
    /// the card's own id or the card has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub earlier_card: Option<EarlierCard>,
}

/// What the server said about a card.
#[derive(Debug, Clone, Default)]
pub struct ServerData {
    pub smartcard: Smartcard,
    pub certificates: Vec<X509ClmCertificate>,
    pub operations: Vec<String>,
    pub card_id_form: CardIdForm,
}

/// The outcome of asking the server.
#[derive(Debug, Clone)]
pub enum Lookup {
    NotConfigured,
    NoCardId,
    NotFound,
    Unavailable(ServerError),
    Found(Box<ServerData>),
}

/// The pure rules: the card against MIM CM's `lookup` and SCEPman's `answers`.
pub fn reconcile(
    card: &Card,
    lookup: &Lookup,
    answers: &scepman::Answers,
    now: OffsetDateTime,
) -> Reconciliation {
    let mut r = Reconciliation {
        card_id: card.card_id.clone(),
        state: State::NotConfigured,
        card_id_form: None,
        server_card: None,
        certificates: Vec::new(),
        findings: Vec::new(),
        operations: Vec::new(),
        verdict: Verdict::Unknown,
        reason: None,
        checked_at: now.format(&Rfc3339).unwrap_or_default(),
        last_known: None,
        earlier_card: None,
    };
    card_validity_findings(card, now, &mut r.findings);
    match lookup {
        Lookup::NotConfigured => r.state = State::NotConfigured,
        Lookup::NoCardId => r.state = State::NoCardId,
        Lookup::Unavailable(e) => {
            r.state = State::ServerUnavailable;
            r.reason = Some(format!("{}: {e}", e.code()));
        }
        Lookup::NotFound => {
            r.state = State::NotFound;
            push(
                &mut r.findings,
                "card_not_found",
                Severity::Critical,
                format!(
                    "the server has no card with id {}",
                    card.card_guid.as_deref().unwrap_or("?")
                ),
            );
        }
        Lookup::Found(data) => {
            r.state = State::Matched;
            compare(card, data, &mut r);
        }
    }
    scepman::rules(&mut r, card, answers, now);
    r.verdict = verdict(r.state, &r.findings);
    r
}

/// The rules for a card the server knows, one function each, so a failing row of the rules
/// table points at a named rule.
fn compare(card: &Card, data: &ServerData, r: &mut Reconciliation) {
    let sc = &data.smartcard;
    r.card_id_form = Some(data.card_id_form);
    r.operations = data.operations.clone();
    r.server_card = Some(server_card(sc));
    status_rule(sc, &mut r.findings);
    atr_rule(card, sc, &mut r.findings);
    let union = certificate_union(card, &data.certificates);
    certificate_rules(&union, &mut r.findings);
    key_history_rule(&union, &mut r.findings);
    server_text_rule(data, &mut r.findings);
    r.certificates = union.into_values().collect();
}

fn server_card(sc: &Smartcard) -> ServerCard {
    ServerCard {
        uuid: normalize_guid(&sc.uuid),
        status: smartcard_status_name(sc.status),
        status_code: sc.status,
        assigned_user: sc.assigned_user_uuid.as_deref().map(normalize_guid),
        profile_template: sc.profile_template_uuid.as_deref().map(normalize_guid),
        atr: sc.atr.as_deref().map(normalize_hex),
        flags: sc.flags,
        serial_number: sc.serial_number.clone(),
    }
}

/// A card in a reader is in use: the server must record it as active.
fn status_rule(sc: &Smartcard, findings: &mut Vec<Finding>) {
    if sc.status != STATUS_ACTIVE {
        let status = smartcard_status_name(sc.status);
        push(
            findings,
            "status_not_active",
            Severity::Critical,
            format!("the server records this card as {status}, yet it is in use"),
        );
    }
}

fn atr_rule(card: &Card, sc: &Smartcard, findings: &mut Vec<Finding>) {
    let Some(server_atr) = sc
        .atr
        .as_deref()
        .map(normalize_hex)
        .filter(|a| !a.is_empty())
    else {
        return;
    };
    if server_atr != card.atr {
        push(
            findings,
            "atr_mismatch",
            Severity::Warning,
            format!(
                "the server recorded ATR {server_atr}, the card answers {}",
                card.atr
            ),
        );
    }
}

/// Every certificate on the card or on the server's record, by thumbprint.
fn certificate_union(
    card: &Card,
    server: &[X509ClmCertificate],
) -> BTreeMap<String, CertificateMatch> {
    let mut union: BTreeMap<String, CertificateMatch> = BTreeMap::new();
    for c in &card.certificates {
        union.insert(
            c.thumbprint.clone(),
            CertificateMatch {
                thumbprint: c.thumbprint.clone(),
                on_card: true,
                on_server: false,
                slot: Some(c.slot.clone()),
                template: c.template.clone(),
                key_history: false,
                scepman: None,
            },
        );
    }
    for s in server {
        let thumbprint = normalize_hex(&s.thumbprint);
        let entry = union.entry(thumbprint.clone()).or_insert(CertificateMatch {
            thumbprint,
            on_card: false,
            on_server: true,
            slot: None,
            template: s.template_common_name.clone(),
            key_history: s.is_key_history,
            scepman: None,
        });
        entry.on_server = true;
        entry.key_history = s.is_key_history;
        if entry.template.is_none() {
            entry.template = s.template_common_name.clone();
        }
    }
    union
}

/// The server's texts a person reads in a reconciliation (the card's serial number, user and
/// profile template, a certificate's template) get the warning a card's own text gets when they
/// hold characters that reverse or hide text: a record edited to read as another's must not
/// pass for it on a kiosk's screen.
fn server_text_rule(data: &ServerData, findings: &mut Vec<Finding>) {
    let sc = &data.smartcard;
    let mut fields: Vec<(String, &str)> = [
        ("serial number", &sc.serial_number),
        ("assigned user", &sc.assigned_user_uuid),
        ("profile template", &sc.profile_template_uuid),
    ]
    .into_iter()
    .filter_map(|(what, value)| Some((format!("the card's {what} on MIM CM"), value.as_deref()?)))
    .collect();
    for c in &data.certificates {
        if let Some(template) = &c.template_common_name {
            let thumbprint = normalize_hex(&c.thumbprint);
            fields.push((
                format!("the template of certificate {thumbprint} on MIM CM"),
                template,
            ));
        }
    }
    for (field, text) in fields {
        if let Some(message) = crate::card::hidden_characters_note(&field, text) {
            push(
                findings,
                "server_text_hides_characters",
                Severity::Warning,
                message,
            );
        }
    }
}

/// A certificate on one side only; key-history certificates are expected to be missing from a
/// card, so they are the key-history rule's business.
fn certificate_rules(union: &BTreeMap<String, CertificateMatch>, findings: &mut Vec<Finding>) {
    for m in union.values() {
        match (m.on_card, m.on_server, m.key_history) {
            (true, false, _) => push(
                findings,
                "certificate_unknown_to_server",
                Severity::Warning,
                format!(
                    "certificate {} in slot {} is not on the server's record of this card",
                    m.thumbprint,
                    m.slot.as_deref().unwrap_or("?")
                ),
            ),
            (false, true, false) => push(
                findings,
                "certificate_missing_from_card",
                Severity::Warning,
                format!(
                    "certificate {} ({}) is on the server's record but not on the card",
                    m.thumbprint,
                    m.template.as_deref().unwrap_or("no template")
                ),
            ),
            _ => {}
        }
    }
}

fn key_history_rule(union: &BTreeMap<String, CertificateMatch>, findings: &mut Vec<Finding>) {
    let history: Vec<&CertificateMatch> = union
        .values()
        .filter(|m| m.on_server && m.key_history)
        .collect();
    let total = history.len();
    if total == 0 {
        return;
    }
    let on_card = history.iter().filter(|m| m.on_card).count();
    let (code, message) = if on_card == total {
        (
            "key_history_present",
            format!("all {total} key-history certificates are on the card"),
        )
    } else {
        (
            "key_history_absent",
            format!("{on_card} of {total} key-history certificates are on the card"),
        )
    };
    push(findings, code, Severity::Info, message);
}

fn card_validity_findings(card: &Card, now: OffsetDateTime, findings: &mut Vec<Finding>) {
    for c in &card.certificates {
        let parse = |t: &Option<String>| {
            t.as_deref()
                .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
        };
        if parse(&c.not_after).is_some_and(|t| t < now) {
            push(
                findings,
                "certificate_expired",
                Severity::Warning,
                format!(
                    "certificate {} in slot {} expired on {}",
                    c.thumbprint,
                    c.slot,
                    c.not_after.as_deref().unwrap_or("?")
                ),
            );
        } else if parse(&c.not_before).is_some_and(|t| t > now) {
            push(
                findings,
                "certificate_not_yet_valid",
                Severity::Warning,
                format!(
                    "certificate {} in slot {} is valid only from {}",
                    c.thumbprint,
                    c.slot,
                    c.not_before.as_deref().unwrap_or("?")
                ),
            );
        }
    }
}

fn push(findings: &mut Vec<Finding>, code: &str, severity: Severity, message: String) {
    findings.push(Finding {
        code: code.to_string(),
        severity,
        message,
    });
}

/// `unknown` when the server could not be compared with, else the worst finding decides.
pub fn verdict(state: State, findings: &[Finding]) -> Verdict {
    let worst = findings.iter().map(|f| f.severity).max();
    match (state, worst) {
        (_, Some(Severity::Critical)) => Verdict::Critical,
        (State::ServerUnavailable | State::NotConfigured | State::NoCardId, _) => Verdict::Unknown,
        (_, Some(Severity::Warning)) => Verdict::Attention,
        _ => Verdict::Ok,
    }
}

/// The byte order in which a card id was written as the GUID the server answered to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CardIdForm {
    #[default]
    Rfc4122,
    Windows,
}

impl CardIdForm {
    pub fn as_str(self) -> &'static str {
        match self {
            CardIdForm::Rfc4122 => "rfc4122",
            CardIdForm::Windows => "windows",
        }
    }

    /// A stored name; `None` for one this version does not know.
    pub fn parse(name: &str) -> Option<CardIdForm> {
        [CardIdForm::Rfc4122, CardIdForm::Windows]
            .into_iter()
            .find(|f| f.as_str() == name)
    }
}

/// The card id as the server may know it: Windows `GUID` order (the first three fields
/// little-endian), or RFC 4122 order. Windows order comes first: Windows hands the minidriver's
/// card id around as a `GUID` and prints it that way, and msclmd builds its container names from
/// the CHUID GUID in that order (README, "Reconciliation with MIM CM and SCEPman").
pub fn card_id_forms(card_id: &[u8; 16], order: CardIdOrder) -> Vec<(CardIdForm, String)> {
    let rfc = crate::card::guid_string(card_id);
    let mut swapped = *card_id;
    swapped[0..4].reverse();
    swapped[4..6].reverse();
    swapped[6..8].reverse();
    let windows = crate::card::guid_string(&swapped);
    match order {
        CardIdOrder::Rfc4122 => vec![(CardIdForm::Rfc4122, rfc)],
        CardIdOrder::Windows => vec![(CardIdForm::Windows, windows)],
        CardIdOrder::Auto => vec![(CardIdForm::Windows, windows), (CardIdForm::Rfc4122, rfc)],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::card::{atr, CardKind, CertificateInfo};

    const NOW: &str = "2026-11-22T12:00:00Z";

    fn now() -> OffsetDateTime {
        OffsetDateTime::parse(NOW, &Rfc3339).unwrap()
    }

    fn cert(slot: &str, thumb: &str, not_before: &str, not_after: &str) -> CertificateInfo {
        CertificateInfo {
            slot: slot.into(),
            label: String::new(),
            thumbprint: thumb.into(),
            sha256: String::new(),
            serial_number: None,
            subject: None,
            issuer: None,
            not_before: Some(not_before.into()),
            not_after: Some(not_after.into()),
            template: None,
            key_algorithm: None,
            compressed: false,
            error: None,
            der: Vec::new(),
        }
    }

    fn card(certs: Vec<CertificateInfo>) -> Card {
        Card {
            reader: "r".into(),
            atr: "3B8B".into(),
            atr_info: atr::parse(&[0x3B, 0x8B]),
            kind: CardKind::Piv,
            card_id: Some("D1EF6869551742A08F0516CA1A0B834D".into()),
            card_guid: Some("d1ef6869-5517-42a0-8f05-16ca1a0b834d".into()),
            serial_number: None,
            piv: None,
            gids: None,
            idprime: None,
            certificates: certs,
            notes: Vec::new(),
            read_at: NOW.into(),
            read_ms: 1,
            apdu_count: 1,
            error: None,
        }
    }

    fn server(status: i64, atr: &str, certs: &[(&str, bool)]) -> Lookup {
        Lookup::Found(Box::new(ServerData {
            smartcard: Smartcard {
                uuid: "{438D1B30-F3B4-4BED-85FA-285E08605BA7}".into(),
                status,
                atr: Some(atr.into()),
                serial_number: Some("{d1ef6869-5517-42a0-8f05-16ca1a0b834d}".into()),
                ..Smartcard::default()
            },
            certificates: certs
                .iter()
                .map(|(t, history)| X509ClmCertificate {
                    thumbprint: t.to_string(),
                    is_key_history: *history,
                    ..X509ClmCertificate::default()
                })
                .collect(),
            operations: vec!["retire".into(), "revoke".into()],
            card_id_form: CardIdForm::Rfc4122,
        }))
    }

    const VALID: (&str, &str) = ("2026-01-01T00:00:00Z", "2027-01-01T00:00:00Z");

    fn codes(r: &Reconciliation) -> Vec<&str> {
        r.findings.iter().map(|f| f.code.as_str()).collect()
    }

    /// Name, card, what the server said, expected state, finding codes and verdict.
    type Case = (
        &'static str,
        Card,
        Lookup,
        State,
        Vec<&'static str>,
        Verdict,
    );

    #[test]
    fn rules_table() {
        let good = || {
            vec![
                cert("9A", "AA", VALID.0, VALID.1),
                cert("9C", "BB", VALID.0, VALID.1),
            ]
        };
        let unavailable = Lookup::Unavailable(ServerError::Timeout);
        let cases: Vec<Case> = vec![
            (
                "all matches",
                card(good()),
                server(2, "3b8b", &[("aa", false), ("BB", false)]),
                State::Matched,
                vec![],
                Verdict::Ok,
            ),
            (
                "not found",
                card(good()),
                Lookup::NotFound,
                State::NotFound,
                vec!["card_not_found"],
                Verdict::Critical,
            ),
            (
                "disabled",
                card(good()),
                server(3, "3B8B", &[("AA", false), ("BB", false)]),
                State::Matched,
                vec!["status_not_active"],
                Verdict::Critical,
            ),
            (
                "retired",
                card(good()),
                server(6, "3B8B", &[("AA", false), ("BB", false)]),
                State::Matched,
                vec!["status_not_active"],
                Verdict::Critical,
            ),
            (
                "atr differs",
                card(good()),
                server(2, "3B8D01", &[("AA", false), ("BB", false)]),
                State::Matched,
                vec!["atr_mismatch"],
                Verdict::Attention,
            ),
            (
                "unknown cert",
                card(good()),
                server(2, "3B8B", &[("AA", false)]),
                State::Matched,
                vec!["certificate_unknown_to_server"],
                Verdict::Attention,
            ),
            (
                "missing cert",
                card(good()),
                server(2, "3B8B", &[("AA", false), ("BB", false), ("CC", false)]),
                State::Matched,
                vec!["certificate_missing_from_card"],
                Verdict::Attention,
            ),
            (
                "key history absent is not missing",
                card(good()),
                server(2, "3B8B", &[("AA", false), ("BB", false), ("CC", true)]),
                State::Matched,
                vec!["key_history_absent"],
                Verdict::Ok,
            ),
            (
                "key history present",
                card(good()),
                server(2, "3B8B", &[("AA", false), ("BB", true)]),
                State::Matched,
                vec!["key_history_present"],
                Verdict::Ok,
            ),
            (
                "expired",
                card(vec![cert(
                    "9A",
                    "AA",
                    "2020-01-01T00:00:00Z",
                    "2021-01-01T00:00:00Z",
                )]),
                server(2, "3B8B", &[("AA", false)]),
                State::Matched,
                vec!["certificate_expired"],
                Verdict::Attention,
            ),
            (
                "not yet valid",
                card(vec![cert(
                    "9A",
                    "AA",
                    "2030-01-01T00:00:00Z",
                    "2031-01-01T00:00:00Z",
                )]),
                server(2, "3B8B", &[("AA", false)]),
                State::Matched,
                vec!["certificate_not_yet_valid"],
                Verdict::Attention,
            ),
            (
                "a server text turned around",
                card(good()),
                {
                    let mut lookup = server(2, "3B8B", &[("AA", false), ("BB", false)]);
                    if let Lookup::Found(data) = &mut lookup {
                        data.certificates[1].template_common_name =
                            Some("Contoso\u{202E}resU".into());
                    }
                    lookup
                },
                State::Matched,
                vec!["server_text_hides_characters"],
                Verdict::Attention,
            ),
            (
                "server down",
                card(good()),
                unavailable,
                State::ServerUnavailable,
                vec![],
                Verdict::Unknown,
            ),
            (
                "not configured",
                card(good()),
                Lookup::NotConfigured,
                State::NotConfigured,
                vec![],
                Verdict::Unknown,
            ),
            (
                "no card id",
                card(good()),
                Lookup::NoCardId,
                State::NoCardId,
                vec![],
                Verdict::Unknown,
            ),
        ];
        for (name, card, lookup, state, expected, verdict) in cases {
            let r = reconcile(&card, &lookup, &scepman::Answers::new(), now());
            assert_eq!(r.state, state, "{name}");
            assert_eq!(codes(&r), expected, "{name}");
            assert_eq!(r.verdict, verdict, "{name}");
        }
    }

    #[test]
    fn a_server_text_finding_names_the_field_and_the_characters() {
        let mut lookup = server(2, "3B8B", &[("AA", false)]);
        if let Lookup::Found(data) = &mut lookup {
            data.smartcard.assigned_user_uuid = Some("\u{200B}Mallory\u{202E}".into());
        }
        let r = reconcile(
            &card(vec![cert("9A", "AA", VALID.0, VALID.1)]),
            &lookup,
            &scepman::Answers::new(),
            now(),
        );
        let messages: Vec<&str> = r.findings.iter().map(|f| f.message.as_str()).collect();
        assert_eq!(
            messages,
            [
                "the card's assigned user on MIM CM holds characters that reverse or hide text \
              (U+200B, U+202E): show it isolated, with them visible"
            ]
        );
    }

    #[test]
    fn matched_details_are_normalised() {
        let r = reconcile(
            &card(vec![cert("9A", "AA", VALID.0, VALID.1)]),
            &server(2, "3b8b", &[("aa", false)]),
            &scepman::Answers::new(),
            now(),
        );
        let sc = r.server_card.unwrap();
        assert_eq!(sc.uuid, "438d1b30-f3b4-4bed-85fa-285e08605ba7");
        assert_eq!(sc.status, "Active");
        assert_eq!(sc.atr.as_deref(), Some("3B8B"));
        assert_eq!(r.operations, ["retire", "revoke"]);
        assert_eq!(r.certificates.len(), 1);
        assert!(r.certificates[0].on_card && r.certificates[0].on_server);
        assert_eq!(r.checked_at, NOW);
    }

    #[test]
    fn server_unavailable_keeps_the_reason() {
        let r = reconcile(
            &card(vec![]),
            &Lookup::Unavailable(ServerError::Refused("x".into())),
            &scepman::Answers::new(),
            now(),
        );
        assert!(r.reason.unwrap().starts_with("connection_refused"));
    }

    #[test]
    fn card_id_in_both_byte_orders() {
        let id: [u8; 16] = hex::decode("D1EF6869551742A08F0516CA1A0B834D")
            .unwrap()
            .try_into()
            .unwrap();
        let forms = card_id_forms(&id, CardIdOrder::Auto);
        assert_eq!(
            forms,
            [
                (
                    CardIdForm::Windows,
                    "6968efd1-1755-a042-8f05-16ca1a0b834d".to_string()
                ),
                (
                    CardIdForm::Rfc4122,
                    "d1ef6869-5517-42a0-8f05-16ca1a0b834d".to_string()
                ),
            ]
        );
        assert_eq!(card_id_forms(&id, CardIdOrder::Windows).len(), 1);
    }
}
