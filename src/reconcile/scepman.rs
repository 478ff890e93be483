//! SCEPman as a second source of truth: whether each certificate on a card is still good there.
//!
//! [`rules`] is pure (answers and time in, statuses and findings out). [`StatusLookup`] does the
//! I/O: it asks `api/manage/search` for each serial number, one after the other on one kept-alive
//! connection, and keeps each answer for a configured time.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::{push, Reconciliation, Severity};
use crate::card::Card;
use crate::crl_reason::Reason;
use crate::scepman::{ScepmanClient, SearchItem};
use crate::serial::Serial;

/// A certificate's state according to SCEPman.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScepmanState {
    Active,
    Revoked,
    Expired,
    /// SCEPman does not list it, or could not be asked (`reason` says which).
    Unknown,
}

impl ScepmanState {
    pub fn as_str(self) -> &'static str {
        match self {
            ScepmanState::Active => "active",
            ScepmanState::Revoked => "revoked",
            ScepmanState::Expired => "expired",
            ScepmanState::Unknown => "unknown",
        }
    }
}

/// The `scepman` object of a certificate in the Reconciliation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScepmanStatus {
    pub status: ScepmanState,
    pub revocation_date: Option<String>,
    /// The RFC 5280 name (`keyCompromise`), or SCEPman's text when it is not a known number.
    pub revocation_reason: Option<String>,
    pub revoked_by: Option<String>,
    /// Why the status is `unknown`: `not_listed`, or the error code and details of the call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What SCEPman said about one serial number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Listed(SearchItem),
    NotListed,
    /// The call failed: the error's code, then its details.
    Unavailable(String),
}

/// SCEPman's answers for a card's certificates, by thumbprint. Empty when SCEPman is not
/// configured, and then the reconciliation has no `scepman` objects at all.
pub type Answers = BTreeMap<String, Answer>;

/// The status an answer gives at `now`.
pub fn status(answer: &Answer, now: OffsetDateTime) -> ScepmanStatus {
    let unknown = |reason: &str| ScepmanStatus {
        status: ScepmanState::Unknown,
        revocation_date: None,
        revocation_reason: None,
        revoked_by: None,
        reason: Some(reason.to_string()),
    };
    let item = match answer {
        Answer::Listed(item) => item,
        Answer::NotListed => return unknown("not_listed"),
        Answer::Unavailable(reason) => return unknown(reason),
    };
    let expired = item
        .expiration_date
        .as_deref()
        .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
        .is_some_and(|t| t < now);
    let state = match (&item.revocation_date, expired) {
        (Some(_), _) => ScepmanState::Revoked,
        (None, true) => ScepmanState::Expired,
        (None, false) => ScepmanState::Active,
    };
    ScepmanStatus {
        status: state,
        revocation_date: item.revocation_date.clone(),
        revocation_reason: item.revocation_reason.as_ref().and_then(reason_name),
        revoked_by: item.revoked_by.clone(),
        reason: None,
    }
}

/// A reason as SCEPman writes it: a CRLReason number, or text.
fn reason_name(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::Number(n) => Some(
            n.as_i64()
                .and_then(Reason::from_code)
                .map_or_else(|| n.to_string(), |r| r.as_str().to_string()),
        ),
        serde_json::Value::String(s) => Some(s.clone()),
        _ => None,
    }
}

/// Gives every certificate of the card that SCEPman was asked about its `scepman` status, and
/// adds the findings: `certificate_revoked` (critical) and `certificate_unknown_to_scepman`
/// (info: a card can hold certificates of another CA).
pub fn rules(r: &mut Reconciliation, card: &Card, answers: &Answers, now: OffsetDateTime) {
    if answers.is_empty() {
        return;
    }
    if r.certificates.is_empty() {
        r.certificates = super::certificate_union(card, &[]).into_values().collect();
    }
    for m in &mut r.certificates {
        let Some(answer) = answers.get(&m.thumbprint) else {
            continue;
        };
        let s = status(answer, now);
        let slot = m.slot.as_deref().unwrap_or("?");
        match (s.status, answer) {
            (ScepmanState::Revoked, _) => push(
                &mut r.findings,
                "certificate_revoked",
                Severity::Critical,
                format!(
                    "certificate {} in slot {slot} was revoked in SCEPman on {} ({}){}",
                    m.thumbprint,
                    s.revocation_date.as_deref().unwrap_or("?"),
                    s.revocation_reason.as_deref().unwrap_or("no reason given"),
                    s.revoked_by
                        .as_deref()
                        .map(|by| format!(" by {by}"))
                        .unwrap_or_default()
                ),
            ),
            (_, Answer::NotListed) => push(
                &mut r.findings,
                "certificate_unknown_to_scepman",
                Severity::Info,
                format!(
                    "certificate {} in slot {slot} is not listed by SCEPman",
                    m.thumbprint
                ),
            ),
            _ => {}
        }
        m.scepman = Some(s);
    }
}

/// Asks SCEPman about a card's certificates and remembers the answers for `ttl`.
pub struct StatusLookup {
    client: ScepmanClient,
    ttl: Duration,
    cache: Mutex<HashMap<Serial, (Instant, Answer)>>,
}

/// The most answers kept; a station sees a few cards, so this bound is only a guard.
const MAX_CACHED: usize = 4096;

impl StatusLookup {
    pub fn new(client: ScepmanClient, ttl: Duration) -> StatusLookup {
        StatusLookup {
            client,
            ttl,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The client it asks with (shared with the revocation outbox: one token for the station).
    pub fn client(&self) -> &ScepmanClient {
        &self.client
    }

    /// The answers for every certificate on `card` that has a serial number. With `fresh`
    /// (a sync, or after a revocation) the cache is bypassed and refilled. Once one call fails,
    /// the rest are not tried: they get the same answer instead of one timeout each.
    pub async fn answers(&self, card: &Card, fresh: bool) -> Answers {
        let mut answers = Answers::new();
        let mut failed: Option<String> = None;
        for cert in &card.certificates {
            let Some(serial) = cert.serial_number.as_deref() else {
                continue;
            };
            let Ok(serial) = Serial::parse(serial) else {
                continue;
            };
            let answer = match (&failed, self.cached(&serial, fresh)) {
                (Some(reason), _) => Answer::Unavailable(reason.clone()),
                (None, Some(answer)) => answer,
                (None, None) => self.ask(serial).await,
            };
            if let Answer::Unavailable(reason) = &answer {
                failed = Some(reason.clone());
            }
            answers.insert(cert.thumbprint.clone(), answer);
        }
        answers
    }

    async fn ask(&self, serial: Serial) -> Answer {
        let answer = match self.client.find_serial(&serial).await {
            Ok(Some(item)) => Answer::Listed(item),
            Ok(None) => Answer::NotListed,
            Err(e) => return Answer::Unavailable(format!("{}: {e}", e.code())),
        };
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_CACHED {
            cache.retain(|_, (at, _)| at.elapsed() < self.ttl);
        }
        if cache.len() < MAX_CACHED {
            cache.insert(serial, (Instant::now(), answer.clone()));
        }
        answer
    }

    fn cached(&self, serial: &Serial, fresh: bool) -> Option<Answer> {
        if fresh {
            return None;
        }
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .get(serial)
            .filter(|(at, _)| at.elapsed() < self.ttl)
            .map(|(_, answer)| answer.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t: &str) -> OffsetDateTime {
        OffsetDateTime::parse(t, &Rfc3339).unwrap()
    }

    fn item(revoked: Option<&str>, reason: Option<serde_json::Value>, expires: &str) -> Answer {
        Answer::Listed(SearchItem {
            serial_number: "1B00B010".into(),
            expiration_date: Some(expires.into()),
            revocation_date: revoked.map(str::to_string),
            revocation_reason: reason,
            revoked_by: revoked.map(|_| "helpdesk through API user x".to_string()),
        })
    }

    #[test]
    fn the_status_table() {
        let now = at("2026-11-22T12:00:00Z");
        let rows: [(Answer, ScepmanState, Option<&str>, Option<&str>); 7] = [
            (
                item(None, None, "2028-01-01T00:00:00Z"),
                ScepmanState::Active,
                None,
                None,
            ),
            (
                item(None, None, "2026-01-01T00:00:00Z"),
                ScepmanState::Expired,
                None,
                None,
            ),
            (
                item(
                    Some("2026-11-01T00:00:00Z"),
                    Some(1.into()),
                    "2028-01-01T00:00:00Z",
                ),
                ScepmanState::Revoked,
                Some("keyCompromise"),
                None,
            ),
            // Revoked wins over expired, and a text reason is kept as written.
            (
                item(
                    Some("2025-11-01T00:00:00Z"),
                    Some("Superseded".into()),
                    "2026-01-01T00:00:00Z",
                ),
                ScepmanState::Revoked,
                Some("Superseded"),
                None,
            ),
            (
                item(
                    Some("2026-11-01T00:00:00Z"),
                    Some(7.into()),
                    "2028-01-01T00:00:00Z",
                ),
                ScepmanState::Revoked,
                Some("7"),
                None,
            ),
            (
                Answer::NotListed,
                ScepmanState::Unknown,
                None,
                Some("not_listed"),
            ),
            (
                Answer::Unavailable("connection_refused: x".into()),
                ScepmanState::Unknown,
                None,
                Some("connection_refused: x"),
            ),
        ];
        for (answer, state, reason_name, why) in rows {
            let s = status(&answer, now);
            assert_eq!(s.status, state, "{answer:?}");
            assert_eq!(s.revocation_reason.as_deref(), reason_name, "{answer:?}");
            assert_eq!(s.reason.as_deref(), why, "{answer:?}");
        }
    }
}
