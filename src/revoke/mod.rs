//! Revocation: what a kiosk asks for (`POST /v1/revocations`), the plan that turns it into
//! actions against SCEPman and MIM CM, and the statuses the outbox reports.
//!
//! Planning is pure: it takes the request, what the station knows about the card (its last read
//! and its last reconciliation) and which servers are configured, and either returns the actions
//! or says precisely why not. Nothing is stored and nothing is sent until the plan is valid; the
//! durable outbox lives in `store` and the delivery in `outbox`.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::card::Card;
use crate::cm::model::normalize_hex;
use crate::reconcile::Reconciliation;

pub use crate::crl_reason::Reason;

/// A SHA-1 thumbprint in hex, for the OpenAPI document.
#[derive(utoipa::ToSchema)]
#[schema(pattern = "^[0-9A-Fa-f]{2}([ :-]?[0-9A-Fa-f]{2}){19}$")]
#[allow(dead_code)] // Only its schema is used.
struct Thumbprint(String);

/// What is revoked.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// Certificates, through SCEPman (one PATCH per serial number).
    Certificates,
    /// The card, through a MIM CM request for its smartcard record.
    Card,
}

impl Target {
    pub fn as_str(self) -> &'static str {
        match self {
            Target::Certificates => "certificates",
            Target::Card => "card",
        }
    }

    /// The target a stored name stands for; `None` for a name this version does not know.
    pub fn parse(name: &str) -> Option<Target> {
        [Target::Certificates, Target::Card]
            .into_iter()
            .find(|t| t.as_str() == name)
    }
}

/// The MIM CM request type for `target: "card"`.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    clap::ValueEnum,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum CardOperation {
    /// Revokes the card's certificates (the CM request type `Revoke`).
    #[default]
    Revoke,
    /// Revokes them and retires the card (`Retire`).
    Retire,
}

impl CardOperation {
    pub fn as_str(self) -> &'static str {
        match self {
            CardOperation::Revoke => "revoke",
            CardOperation::Retire => "retire",
        }
    }

    pub fn parse(name: &str) -> Option<CardOperation> {
        [CardOperation::Revoke, CardOperation::Retire]
            .into_iter()
            .find(|o| o.as_str() == name)
    }

    /// The `type` of the CM request, as the REST API spells it.
    pub fn request_type(self) -> &'static str {
        match self {
            CardOperation::Revoke => "Revoke",
            CardOperation::Retire => "Retire",
        }
    }

    /// The name in a card's allowed operations (`GET smartcards/{id}/operations`, lower case).
    fn operation_name(self) -> &'static str {
        match self {
            CardOperation::Revoke => "revoke",
            CardOperation::Retire => "retire",
        }
    }
}

/// The body of `POST /v1/revocations`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Submission {
    /// The card's 16-byte id in hex (spaces, colons or dashes between bytes allowed).
    #[schema(pattern = "^[0-9A-Fa-f]{2}([ :-]?[0-9A-Fa-f]{2}){15}$")]
    pub card_id: String,
    pub target: Target,
    /// A subset of the card's certificates (SHA-1 thumbprints); absent: all of them.
    #[serde(default)]
    #[schema(inline, value_type = Option<Vec<Thumbprint>>)]
    pub thumbprints: Option<Vec<String>>,
    /// RFC 5280 reason name, e.g. `keyCompromise`.
    #[schema(value_type = Reason, inline)]
    pub reason: String,
    /// For `target: "card"`: `revoke` (default) or `retire`.
    #[serde(default)]
    pub operation: Option<CardOperation>,
    /// Who revokes (a UPN is recommended); SCEPman records it.
    #[serde(default)]
    #[schema(max_length = 512, pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]*$")]
    pub revoker: Option<String>,
    #[serde(default)]
    #[schema(max_length = 512, pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]*$")]
    pub comment: Option<String>,
    #[serde(default)]
    pub dry_run: bool,
}

/// A certificate the station read from a card.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownCertificate {
    pub thumbprint: String,
    pub serial_number: Option<String>,
}

impl KnownCertificate {
    pub fn of(card: &Card) -> Vec<KnownCertificate> {
        card.certificates
            .iter()
            .map(|c| KnownCertificate {
                thumbprint: c.thumbprint.clone(),
                serial_number: c.serial_number.clone(),
            })
            .collect()
    }
}

/// What the station knows about a card when a revocation is asked for.
pub struct Known<'a> {
    /// The certificates of the card's last successful read (in a reader now, or remembered);
    /// None when this station never read the card.
    pub card: Option<&'a [KnownCertificate]>,
    /// Its last reconciliation with MIM CM.
    pub reconciliation: Option<&'a Reconciliation>,
    pub scepman_configured: bool,
    pub cm_configured: bool,
}

/// One thing to do against one server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ActionKind {
    /// `PATCH api/manage/revoke/{serial_number}` on SCEPman.
    ScepmanRevoke {
        serial_number: String,
        thumbprint: String,
    },
    /// `POST api/v1.0/requests` on MIM CM for the card's record, then followed to its end.
    CmRequest {
        request_type: String,
        smartcard_uuid: String,
    },
}

/// A validated request: the canonical fields and the actions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub card_id: String,
    pub target: Target,
    pub reason: &'static str,
    pub reason_code: i64,
    pub operation: Option<CardOperation>,
    pub revoker: Option<String>,
    pub comment: Option<String>,
    pub actions: Vec<ActionKind>,
}

/// Why a request cannot be planned; each maps to an HTTP status and an error code.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PlanError {
    #[error("unknown reason {0:?}; use an RFC 5280 name: {names}", names = Reason::names())]
    BadReason(String),
    #[error("{0}")]
    BadField(String),
    #[error("{0}")]
    BadCombination(&'static str),
    #[error("this station has never read a card with id {0}")]
    UnknownCard(String),
    #[error("certificate {0} is not on this card")]
    CertificateNotOnCard(String),
    #[error("certificate {0} has no serial number to revoke it by")]
    NoSerialNumber(String),
    #[error("the card has no certificates to revoke")]
    NoCertificates,
    #[error("{0} is not configured on this station")]
    NotConfigured(&'static str),
    #[error("MIM CM has no record of this card (last reconciliation: {0})")]
    NotOnServer(String),
    #[error("MIM CM does not allow {operation} on this card now (allowed: {allowed})")]
    OperationNotAllowed {
        operation: &'static str,
        allowed: String,
    },
}

impl PlanError {
    /// The error code of the API's answer.
    pub fn code(&self) -> &'static str {
        match self {
            PlanError::BadReason(_) => "bad_reason",
            PlanError::BadField(_) => "bad_request",
            PlanError::BadCombination(_) => "bad_combination",
            PlanError::UnknownCard(_) => "unknown_card",
            PlanError::CertificateNotOnCard(_) => "certificate_not_on_card",
            PlanError::NoSerialNumber(_) => "no_serial_number",
            PlanError::NoCertificates => "no_certificates",
            PlanError::NotConfigured(_) => "server_not_configured",
            PlanError::NotOnServer(_) => "card_not_on_server",
            PlanError::OperationNotAllowed { .. } => "operation_not_allowed",
        }
    }

    /// 400 for a malformed request, 404 for a card the station does not know, 422 for a
    /// well-formed request that cannot be carried out.
    pub fn status(&self) -> u16 {
        match self {
            PlanError::BadReason(_) | PlanError::BadField(_) => 400,
            PlanError::UnknownCard(_) => 404,
            _ => 422,
        }
    }
}

/// Longest revoker or comment accepted (they end up in server audit logs).
const MAX_TEXT: usize = 512;

fn check_text(name: &str, value: &Option<String>) -> Result<Option<String>, PlanError> {
    match value.as_deref().map(str::trim) {
        None | Some("") => Ok(None),
        Some(v) if v.chars().count() > MAX_TEXT || v.chars().any(hidden) => {
            Err(PlanError::BadField(format!(
                "{name} must be at most {MAX_TEXT} characters without control, bidirectional or invisible formatting characters"
            )))
        }
        Some(v) => Ok(Some(v.to_string())),
    }
}

/// Characters that make text read differently from what it holds: controls, the bidirectional
/// overrides and isolates (Trojan Source), and invisible joiners and marks. A revoker or comment
/// ends up in audit trails that people read.
fn hidden(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{061C}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}')
}

/// Hex as a caller may write it: pairs of hex digits, optionally separated by spaces, colons or
/// dashes, `bytes` long; anything else is refused rather than dropped.
fn caller_hex(name: &str, text: &str, bytes: usize) -> Result<String, PlanError> {
    let bad = || PlanError::BadField(format!("{name} must be {bytes} bytes in hex"));
    if !text
        .chars()
        .all(|c| c.is_ascii_hexdigit() || matches!(c, ' ' | ':' | '-'))
    {
        return Err(bad());
    }
    let hex = normalize_hex(text);
    if hex.len() != 2 * bytes {
        return Err(bad());
    }
    Ok(hex)
}

/// Turns a submission into a plan, or says why it cannot be carried out.
pub fn plan(submission: &Submission, known: &Known) -> Result<Plan, PlanError> {
    let reason = Reason::parse(&submission.reason)
        .ok_or_else(|| PlanError::BadReason(submission.reason.clone()))?;
    let revoker = check_text("revoker", &submission.revoker)?;
    let comment = check_text("comment", &submission.comment)?;
    let card_id = caller_hex("card_id", &submission.card_id, 16)?;
    if submission.target == Target::Card && submission.thumbprints.is_some() {
        return Err(PlanError::BadCombination(
            "thumbprints apply to target \"certificates\" only",
        ));
    }
    if submission.target == Target::Certificates && submission.operation.is_some() {
        return Err(PlanError::BadCombination(
            "operation applies to target \"card\" only",
        ));
    }
    let actions = match submission.target {
        Target::Certificates => {
            let card = known
                .card
                .ok_or_else(|| PlanError::UnknownCard(card_id.clone()))?;
            if !known.scepman_configured {
                return Err(PlanError::NotConfigured("SCEPman"));
            }
            certificate_actions(card, submission.thumbprints.as_deref())?
        }
        Target::Card => {
            let reconciliation = match (known.card, known.reconciliation) {
                (None, None) => return Err(PlanError::UnknownCard(card_id.clone())),
                (_, r) => r,
            };
            if !known.cm_configured {
                return Err(PlanError::NotConfigured("MIM CM"));
            }
            let operation = submission.operation.unwrap_or_default();
            let server_card = reconciliation
                .and_then(|r| r.server_card.as_ref())
                .ok_or_else(|| {
                    PlanError::NotOnServer(
                        reconciliation.map_or("none", |r| r.state.as_str()).into(),
                    )
                })?;
            let allowed = &reconciliation
                .map(|r| r.operations.clone())
                .unwrap_or_default();
            if !allowed
                .iter()
                .any(|o| o.eq_ignore_ascii_case(operation.operation_name()))
            {
                return Err(PlanError::OperationNotAllowed {
                    operation: operation.operation_name(),
                    allowed: if allowed.is_empty() {
                        "nothing".into()
                    } else {
                        allowed.join(", ")
                    },
                });
            }
            vec![ActionKind::CmRequest {
                request_type: operation.request_type().into(),
                smartcard_uuid: server_card.uuid.clone(),
            }]
        }
    };
    Ok(Plan {
        card_id,
        target: submission.target,
        reason: reason.as_str(),
        reason_code: reason.code(),
        operation: (submission.target == Target::Card)
            .then(|| submission.operation.unwrap_or_default()),
        revoker,
        comment,
        actions,
    })
}

fn certificate_actions(
    card: &[KnownCertificate],
    thumbprints: Option<&[String]>,
) -> Result<Vec<ActionKind>, PlanError> {
    let selected: Vec<&KnownCertificate> = match thumbprints {
        None => card.iter().collect(),
        Some(wanted) => {
            let mut selected = Vec::new();
            for t in wanted {
                let t = caller_hex("a thumbprint", t, 20)?;
                let cert = card
                    .iter()
                    .find(|c| c.thumbprint == t)
                    .ok_or_else(|| PlanError::CertificateNotOnCard(t.clone()))?;
                if !selected
                    .iter()
                    .any(|c: &&KnownCertificate| c.thumbprint == t)
                {
                    selected.push(cert);
                }
            }
            selected
        }
    };
    if selected.is_empty() {
        return Err(PlanError::NoCertificates);
    }
    selected
        .into_iter()
        .map(|c| {
            let serial_number = c
                .serial_number
                .clone()
                .ok_or_else(|| PlanError::NoSerialNumber(c.thumbprint.clone()))?;
            Ok(ActionKind::ScepmanRevoke {
                serial_number,
                thumbprint: c.thumbprint.clone(),
            })
        })
        .collect()
}

/// Where one action stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionStatus {
    /// Waiting for its (next) attempt.
    Queued,
    /// Being delivered; for a CM request, also while the server works on it.
    Sending,
    Done,
    /// SCEPman said the certificate was already revoked (409, error code 5013).
    AlreadyRevoked,
    Failed,
}

impl ActionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ActionStatus::Queued => "queued",
            ActionStatus::Sending => "sending",
            ActionStatus::Done => "done",
            ActionStatus::AlreadyRevoked => "already_revoked",
            ActionStatus::Failed => "failed",
        }
    }

    pub fn parse(text: &str) -> Option<ActionStatus> {
        [
            ActionStatus::Queued,
            ActionStatus::Sending,
            ActionStatus::Done,
            ActionStatus::AlreadyRevoked,
            ActionStatus::Failed,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }

    fn succeeded(self) -> bool {
        matches!(self, ActionStatus::Done | ActionStatus::AlreadyRevoked)
    }
}

/// Where a whole revocation stands, derived from its actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RevocationStatus {
    Queued,
    InProgress,
    Succeeded,
    PartiallyFailed,
    Failed,
}

impl RevocationStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RevocationStatus::Queued => "queued",
            RevocationStatus::InProgress => "in_progress",
            RevocationStatus::Succeeded => "succeeded",
            RevocationStatus::PartiallyFailed => "partially_failed",
            RevocationStatus::Failed => "failed",
        }
    }

    /// Whether the revocation has ended, well or not.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            RevocationStatus::Succeeded
                | RevocationStatus::PartiallyFailed
                | RevocationStatus::Failed
        )
    }

    /// Queued while nothing has started; in progress while anything is unfinished; then
    /// succeeded, failed, or partially failed when some actions succeeded and some failed.
    pub fn of(actions: &[ActionStatus]) -> RevocationStatus {
        let finished = |s: &ActionStatus| s.succeeded() || *s == ActionStatus::Failed;
        if actions.iter().all(|s| *s == ActionStatus::Queued) {
            RevocationStatus::Queued
        } else if !actions.iter().all(finished) {
            RevocationStatus::InProgress
        } else if actions.iter().all(|s| s.succeeded()) {
            RevocationStatus::Succeeded
        } else if actions.iter().all(|s| *s == ActionStatus::Failed) {
            RevocationStatus::Failed
        } else {
            RevocationStatus::PartiallyFailed
        }
    }
}

/// A server's answer or failure, as kept with an action and in the attempt log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// `ok`, `already_revoked`, or the error class (`http_status`, `timeout`, …).
    pub code: String,
    pub message: String,
    pub http_status: Option<u16>,
    /// SCEPman's `errorCode`.
    pub server_error_code: Option<i64>,
    /// MIM CM's correlation id of a 500.
    pub correlation_id: Option<String>,
}

impl Outcome {
    pub fn from_error(e: &crate::http::ServerError) -> Outcome {
        let (server_error_code, correlation_id) = match e {
            crate::http::ServerError::Status {
                error_code,
                correlation_id,
                ..
            } => (*error_code, correlation_id.clone()),
            _ => (None, None),
        };
        Outcome {
            code: e.code().into(),
            message: e.to_string(),
            http_status: e.status(),
            server_error_code,
            correlation_id,
        }
    }

    pub fn ok(http_status: u16, message: &str) -> Outcome {
        Outcome {
            code: "ok".into(),
            message: message.into(),
            http_status: Some(http_status),
            ..Outcome::default()
        }
    }
}

/// One action as stored and shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Action {
    pub id: i64,
    #[serde(flatten)]
    pub kind: ActionKind,
    pub status: ActionStatus,
    pub attempts: i64,
    /// When the next attempt (or the next look at a CM request) is due, RFC 3339.
    pub next_attempt_at: Option<String>,
    /// The CM request's URI, once the server gave it.
    pub request_uri: Option<String>,
    /// The CM request's status name (`Pending`, `Approved`, `Completed`, …).
    pub request_status: Option<String>,
    /// The last answer or failure.
    pub last_outcome: Option<Outcome>,
    pub updated_at: String,
    /// Marker put in the CM request's comment, so the request can be found after a crash.
    #[serde(skip)]
    pub marker: String,
}

/// One delivery attempt, for the audit trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Attempt {
    pub action_id: i64,
    pub at: String,
    /// The HTTP call, e.g. `PATCH api/manage/revoke/1B00B010`.
    pub call: String,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// A stored revocation with its actions (and, when asked for one, its attempts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Revocation {
    pub id: i64,
    pub status: RevocationStatus,
    pub card_id: String,
    pub target: Target,
    pub reason: String,
    pub reason_code: i64,
    pub operation: Option<CardOperation>,
    pub revoker: Option<String>,
    pub comment: Option<String>,
    /// The API client that asked.
    pub client: String,
    pub idempotency_key: String,
    pub created_at: String,
    pub actions: Vec<Action>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempts: Option<Vec<Attempt>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::{ServerCard, State};

    fn card() -> Vec<KnownCertificate> {
        [("AA", Some("01")), ("BB", Some("02")), ("CC", None)]
            .into_iter()
            .map(|(t, s)| KnownCertificate {
                thumbprint: t.repeat(20),
                serial_number: s.map(str::to_string),
            })
            .collect()
    }

    fn reconciliation(operations: &[&str]) -> Reconciliation {
        let now = time::OffsetDateTime::now_utc();
        let mut failed = Card::failed("r", &[0x3B, 0x00], &crate::card::ReadError::Deadline, now);
        failed.card_id = Some("00112233445566778899AABBCCDDEEFF".into());
        let mut r = crate::reconcile::reconcile(
            &failed,
            &crate::reconcile::Lookup::NotFound,
            &Default::default(),
            now,
        );
        r.state = State::Matched;
        r.server_card = Some(ServerCard {
            uuid: "17cf063d-e337-4aa9-a822-346554ddd3c9".into(),
            status: "Active".into(),
            status_code: 2,
            assigned_user: None,
            profile_template: None,
            atr: None,
            flags: 0,
            serial_number: None,
        });
        r.operations = operations.iter().map(|s| s.to_string()).collect();
        r
    }

    fn submission(target: Target) -> Submission {
        Submission {
            card_id: "00112233 44556677 8899aabb ccddeeff".into(),
            target,
            thumbprints: None,
            reason: "KeyCompromise".into(),
            operation: None,
            revoker: Some("helpdesk@contoso.com".into()),
            comment: None,
            dry_run: false,
        }
    }

    #[test]
    fn plans_certificates_and_card_requests() {
        let (c, r) = (card(), reconciliation(&["retire", "revoke"]));
        let known = Known {
            card: Some(&c),
            reconciliation: Some(&r),
            scepman_configured: true,
            cm_configured: true,
        };
        let mut s = submission(Target::Certificates);
        s.thumbprints = Some(vec!["bb".repeat(20), "BB".repeat(20)]);
        let p = plan(&s, &known).unwrap();
        assert_eq!((p.reason, p.reason_code), ("keyCompromise", 1));
        assert_eq!(p.card_id, "00112233445566778899AABBCCDDEEFF");
        assert_eq!(
            p.actions,
            [ActionKind::ScepmanRevoke {
                serial_number: "02".into(),
                thumbprint: "BB".repeat(20)
            }]
        );
        let mut s = submission(Target::Card);
        s.operation = Some(CardOperation::Retire);
        let p = plan(&s, &known).unwrap();
        assert_eq!(
            p.actions,
            [ActionKind::CmRequest {
                request_type: "Retire".into(),
                smartcard_uuid: "17cf063d-e337-4aa9-a822-346554ddd3c9".into()
            }]
        );
    }

    #[test]
    fn every_validation_error() {
        let (c, r) = (card(), reconciliation(&["retire"]));
        let full = Known {
            card: Some(&c),
            reconciliation: Some(&r),
            scepman_configured: true,
            cm_configured: true,
        };
        let code = |s: &Submission, k: &Known| plan(s, k).unwrap_err().code();
        let mut s = submission(Target::Certificates);
        s.reason = "stolen".into();
        assert_eq!(code(&s, &full), "bad_reason");
        let mut s = submission(Target::Certificates);
        s.card_id = "12".into();
        assert_eq!(code(&s, &full), "bad_request");
        let mut s = submission(Target::Certificates);
        s.comment = Some("a\u{7}b".into());
        assert_eq!(code(&s, &full), "bad_request");
        for spoof in [
            "lost \u{202E}eulav\u{202C} card",
            "a\u{2066}b",
            "zero\u{200B}width",
        ] {
            let mut s = submission(Target::Certificates);
            s.comment = Some(spoof.into());
            assert_eq!(code(&s, &full), "bad_request", "{spoof:?}");
            let mut s = submission(Target::Certificates);
            s.revoker = Some(spoof.into());
            assert_eq!(code(&s, &full), "bad_request", "{spoof:?}");
        }
        // Junk around hex is refused, not dropped; separators between pairs are fine.
        let mut s = submission(Target::Certificates);
        s.card_id = format!("zzz-{}-xyz!", s.card_id);
        assert_eq!(code(&s, &full), "bad_request");
        let mut s = submission(Target::Certificates);
        s.thumbprints = Some(vec![format!("{}ZZZZ", "AA".repeat(20))]);
        assert_eq!(code(&s, &full), "bad_request");
        let mut s = submission(Target::Certificates);
        s.thumbprints = Some(vec!["AA:".repeat(19) + "AA"]);
        assert!(plan(&s, &full).is_ok(), "AA:AA:… is a thumbprint");
        let unknown = Known {
            card: None,
            reconciliation: None,
            ..full
        };
        assert_eq!(
            code(&submission(Target::Certificates), &unknown),
            "unknown_card"
        );
        assert_eq!(code(&submission(Target::Card), &unknown), "unknown_card");
        let mut s = submission(Target::Certificates);
        s.thumbprints = Some(vec!["DD".repeat(20)]);
        assert_eq!(code(&s, &full), "certificate_not_on_card");
        // All certificates: one of them has no serial number.
        assert_eq!(
            code(&submission(Target::Certificates), &full),
            "no_serial_number"
        );
        let mut s = submission(Target::Certificates);
        s.thumbprints = Some(Vec::new());
        assert_eq!(code(&s, &full), "no_certificates");
        let no_servers = Known {
            scepman_configured: false,
            cm_configured: false,
            ..full
        };
        let mut s = submission(Target::Certificates);
        s.thumbprints = Some(vec!["AA".repeat(20)]);
        assert_eq!(code(&s, &no_servers), "server_not_configured");
        assert_eq!(
            code(&submission(Target::Card), &no_servers),
            "server_not_configured"
        );
        // Revoke is not among the allowed operations (only retire).
        let e = plan(&submission(Target::Card), &full).unwrap_err();
        assert_eq!(e.code(), "operation_not_allowed");
        assert!(e.to_string().contains("retire"), "{e}");
        let not_found = Known {
            reconciliation: None,
            ..full
        };
        assert_eq!(
            code(&submission(Target::Card), &not_found),
            "card_not_on_server"
        );
        let mut s = submission(Target::Card);
        s.thumbprints = Some(vec!["AA".repeat(20)]);
        assert_eq!(code(&s, &full), "bad_combination");
        let mut s = submission(Target::Certificates);
        s.operation = Some(CardOperation::Retire);
        assert_eq!(code(&s, &full), "bad_combination");
    }

    #[test]
    fn the_revocation_status_follows_its_actions() {
        use ActionStatus::*;
        let of = RevocationStatus::of;
        assert_eq!(of(&[Queued, Queued]), RevocationStatus::Queued);
        assert_eq!(of(&[Done, Queued]), RevocationStatus::InProgress);
        assert_eq!(of(&[Sending]), RevocationStatus::InProgress);
        assert_eq!(of(&[Done, AlreadyRevoked]), RevocationStatus::Succeeded);
        assert_eq!(of(&[Done, Failed]), RevocationStatus::PartiallyFailed);
        assert_eq!(of(&[Failed, Failed]), RevocationStatus::Failed);
        for s in [Queued, Sending, Done, AlreadyRevoked, Failed] {
            assert_eq!(ActionStatus::parse(s.as_str()), Some(s));
        }
    }
}
