//! The revocation outbox: revocations, their actions and every delivery attempt, plus the
//! certificates of each card this station has read (so a card that is no longer in a reader,
//! lost or stolen, can still have its certificates revoked).
//!
//! A revocation and all its actions are inserted in one transaction before the API answers; the
//! database runs with `synchronous = FULL`, so a committed revocation survives a crash or a
//! power cut. Statuses change one statement at a time, each committed on its own, which is what
//! lets the worker record its intent to send before it sends.

use rusqlite::{params, Connection, OptionalExtension, Row};

use super::{Store, StoreError};
use crate::revoke::{
    Action, ActionKind, ActionStatus, Attempt, CardOperation, KnownCertificate, Outcome, Plan,
    Revocation, RevocationStatus, Target,
};

/// The revocation tables (schema version 3).
pub(super) const MIGRATION: &str = "
    CREATE TABLE cards (
        card_id TEXT PRIMARY KEY,
        seen_at TEXT NOT NULL
    );
    CREATE TABLE card_certificates (
        card_id       TEXT NOT NULL,
        thumbprint    TEXT NOT NULL,
        serial_number TEXT,
        seen_at       TEXT NOT NULL,
        PRIMARY KEY (card_id, thumbprint)
    );
    CREATE TABLE revocations (
        id              INTEGER PRIMARY KEY,
        client          TEXT NOT NULL,
        idempotency_key TEXT NOT NULL,
        request_hash    TEXT NOT NULL,
        card_id         TEXT NOT NULL,
        target          TEXT NOT NULL,
        reason          TEXT NOT NULL,
        reason_code     INTEGER NOT NULL,
        operation       TEXT,
        revoker         TEXT,
        comment         TEXT,
        created_at      TEXT NOT NULL,
        UNIQUE (client, idempotency_key)
    );
    CREATE TABLE revocation_actions (
        id              INTEGER PRIMARY KEY,
        revocation_id   INTEGER NOT NULL REFERENCES revocations (id),
        kind            TEXT NOT NULL,
        serial_number   TEXT,
        thumbprint      TEXT,
        request_type    TEXT,
        smartcard_uuid  TEXT,
        marker          TEXT NOT NULL,
        status          TEXT NOT NULL,
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_ms INTEGER,
        request_uri     TEXT,
        request_status  TEXT,
        last_outcome    TEXT,
        updated_at      TEXT NOT NULL
    );
    CREATE INDEX revocation_actions_due ON revocation_actions (status, next_attempt_ms);
    CREATE TABLE revocation_attempts (
        id                INTEGER PRIMARY KEY,
        action_id         INTEGER NOT NULL REFERENCES revocation_actions (id),
        at                TEXT NOT NULL,
        call              TEXT NOT NULL,
        code              TEXT NOT NULL,
        message           TEXT NOT NULL,
        http_status       INTEGER,
        server_error_code INTEGER,
        correlation_id    TEXT
    );";

/// How many revocations a listing returns at most (newest first).
/// A column of `revocations` a list can be narrowed by in SQL (with its index where it has one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Column {
    Id,
    CardId,
    Target,
    Reason,
    ReasonCode,
    Operation,
    Revoker,
    Comment,
    Client,
    /// `created_at` to the second (`YYYY-MM-DDTHH:MM:SS`): stored times carry a varying number
    /// of fraction digits, which do not compare as text.
    CreatedSecond,
}

impl Column {
    fn sql(self) -> &'static str {
        match self {
            Column::Id => "id",
            Column::CardId => "card_id",
            Column::Target => "target",
            Column::Reason => "reason",
            Column::ReasonCode => "reason_code",
            Column::Operation => "operation",
            Column::Revoker => "revoker",
            Column::Comment => "comment",
            Column::Client => "client",
            Column::CreatedSecond => "substr(created_at, 1, 19)",
        }
    }
}

/// How a [`Condition`] compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compare {
    Eq,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Compare {
    fn sql(self) -> &'static str {
        match self {
            Compare::Eq => "=",
            Compare::Lt => "<",
            Compare::Le => "<=",
            Compare::Gt => ">",
            Compare::Ge => ">=",
        }
    }
}

/// One `column op value` the database checks for [`Store::revocations_page`].
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    pub column: Column,
    pub op: Compare,
    pub value: rusqlite::types::Value,
}

/// An action due for delivery, with what the worker needs from its revocation.
#[derive(Debug, Clone)]
pub struct DueAction {
    pub action: Action,
    pub revocation_id: i64,
    pub reason_code: i64,
    pub reason: String,
    pub revoker: Option<String>,
    pub comment: Option<String>,
}

/// A change to one action; fields left None (and a `Keep` schedule) keep their value. An update
/// that only changes the schedule is a reschedule and keeps `updated_at` (which says when the
/// action last changed, e.g. when its request was sent).
#[derive(Debug, Clone, Default)]
pub struct ActionUpdate {
    pub status: Option<ActionStatus>,
    pub schedule: Schedule,
    pub request_uri: Option<String>,
    pub request_status: Option<String>,
    pub outcome: Option<Outcome>,
    /// Counts a delivery attempt.
    pub attempted: bool,
}

/// The outbox at a glance, for the metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutboxSummary {
    /// Actions by status.
    pub counts: Vec<(String, i64)>,
    /// When the oldest revocation with an action still waiting was submitted (RFC 3339).
    pub oldest: Option<String>,
}

/// When an action is due next.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Schedule {
    /// As it was.
    #[default]
    Keep,
    /// At this time (Unix milliseconds).
    At(i64),
    /// Never again: nothing more to do.
    Never,
}

fn now() -> String {
    crate::clock::now_rfc3339()
}

fn ms_to_rfc3339(ms: i64) -> Option<String> {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()?
        .format(&time::format_description::well_known::Rfc3339)
        .ok()
}

/// A stored value this version does not know, as the row conversion error it is.
fn unknown_value(column: usize, what: &str, value: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        column,
        rusqlite::types::Type::Text,
        format!("unknown {what} {value:?} (written by a newer cardbridge?)").into(),
    )
}

const ACTION_COLUMNS: &str = "a.id, a.kind, a.serial_number, a.thumbprint, a.request_type, \
    a.smartcard_uuid, a.marker, a.status, a.attempts, a.next_attempt_ms, a.request_uri, \
    a.request_status, a.last_outcome, a.updated_at";

fn action_from(row: &Row, at: usize) -> rusqlite::Result<Action> {
    let kind: String = row.get(at + 1)?;
    let text = |i: usize| row.get::<_, Option<String>>(at + i);
    // A kind this version does not know is an error, never another kind: delivering it as a
    // SCEPman revocation would send `PATCH api/manage/revoke/` with whatever columns it has.
    let kind = match kind.as_str() {
        "cm_request" => ActionKind::CmRequest {
            request_type: text(4)?.unwrap_or_default(),
            smartcard_uuid: text(5)?.unwrap_or_default(),
        },
        "scepman_revoke" => ActionKind::ScepmanRevoke {
            serial_number: text(2)?.unwrap_or_default(),
            thumbprint: text(3)?.unwrap_or_default(),
        },
        other => return Err(unknown_value(at + 1, "action kind", other)),
    };
    let status: String = row.get(at + 7)?;
    Ok(Action {
        id: row.get(at)?,
        kind,
        marker: row.get(at + 6)?,
        // A status this version does not know is shown as failed rather than hidden.
        status: ActionStatus::parse(&status).unwrap_or(ActionStatus::Failed),
        attempts: row.get(at + 8)?,
        next_attempt_at: row.get::<_, Option<i64>>(at + 9)?.and_then(ms_to_rfc3339),
        request_uri: text(10)?,
        request_status: text(11)?,
        last_outcome: text(12)?.and_then(|j| serde_json::from_str(&j).ok()),
        updated_at: row.get(at + 13)?,
    })
}

impl Store {
    /// Remembers the certificates of a card, replacing the previous ones, without a sighting
    /// (tests set cards up so; the daemon records them with the sighting of a read).
    #[cfg(test)]
    pub(super) fn save_card_certificates(
        &self,
        card_id: &str,
        certificates: &[KnownCertificate],
        seen_at: &str,
    ) -> Result<(), StoreError> {
        let tx = self.write_transaction()?;
        replace_card_certificates(&tx, card_id, certificates, seen_at)?;
        tx.commit()?;
        Ok(())
    }

    /// The certificates of the card's last successful read; None when it was never read here.
    pub fn card_certificates(
        &self,
        card_id: &str,
    ) -> Result<Option<Vec<KnownCertificate>>, StoreError> {
        let seen: Option<String> = self
            .conn
            .query_row(
                "SELECT seen_at FROM cards WHERE card_id = ?1",
                [card_id],
                |r| r.get(0),
            )
            .optional()?;
        if seen.is_none() {
            return Ok(None);
        }
        let mut statement = self.conn.prepare(
            "SELECT thumbprint, serial_number FROM card_certificates WHERE card_id = ?1 ORDER BY thumbprint",
        )?;
        let rows = statement.query_map([card_id], |r| {
            Ok(KnownCertificate {
                thumbprint: r.get(0)?,
                serial_number: r.get(1)?,
            })
        })?;
        Ok(Some(rows.collect::<Result<_, _>>()?))
    }

    /// The revocation a client already submitted under this idempotency key, with the hash of
    /// the request it was submitted with.
    pub fn revocation_by_key(
        &self,
        client: &str,
        key: &str,
    ) -> Result<Option<(i64, String)>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT id, request_hash FROM revocations WHERE client = ?1 AND idempotency_key = ?2",
                [client, key],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }

    /// Stores a planned revocation and its actions (queued, due now) in one transaction.
    /// `markers` gives each action the unique marker put in its CM request's comment.
    pub fn insert_revocation(
        &self,
        client: &str,
        key: &str,
        request_hash: &str,
        plan: &Plan,
        markers: &[String],
    ) -> Result<i64, StoreError> {
        let at = now();
        let due = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
        let tx = self.write_transaction()?;
        tx.execute(
            "INSERT INTO revocations (client, idempotency_key, request_hash, card_id, target, reason,
                 reason_code, operation, revoker, comment, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                client,
                key,
                request_hash,
                plan.card_id,
                plan.target.as_str(),
                plan.reason,
                plan.reason_code,
                plan.operation.map(CardOperation::as_str),
                plan.revoker,
                plan.comment,
                at
            ],
        )?;
        let id = tx.last_insert_rowid();
        for (action, marker) in plan.actions.iter().zip(markers) {
            let (kind, serial, thumbprint, request_type, uuid) = match action {
                ActionKind::ScepmanRevoke {
                    serial_number,
                    thumbprint,
                } => (
                    "scepman_revoke",
                    Some(serial_number),
                    Some(thumbprint),
                    None,
                    None,
                ),
                ActionKind::CmRequest {
                    request_type,
                    smartcard_uuid,
                } => (
                    "cm_request",
                    None,
                    None,
                    Some(request_type),
                    Some(smartcard_uuid),
                ),
            };
            tx.execute(
                "INSERT INTO revocation_actions (revocation_id, kind, serial_number, thumbprint,
                     request_type, smartcard_uuid, marker, status, next_attempt_ms, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'queued', ?8, ?9)",
                params![
                    id,
                    kind,
                    serial,
                    thumbprint,
                    request_type,
                    uuid,
                    marker,
                    due as i64,
                    at
                ],
            )?;
        }
        tx.commit()?;
        Ok(id)
    }

    fn actions_of(&self, revocation_id: i64) -> Result<Vec<Action>, StoreError> {
        let mut statement = self.conn.prepare(&format!(
            "SELECT {ACTION_COLUMNS} FROM revocation_actions a WHERE a.revocation_id = ?1 ORDER BY a.id"
        ))?;
        let rows = statement.query_map([revocation_id], |r| action_from(r, 0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn attempts_of(&self, revocation_id: i64) -> Result<Vec<Attempt>, StoreError> {
        let mut statement = self.conn.prepare(
            "SELECT t.action_id, t.at, t.call, t.code, t.message, t.http_status,
                    t.server_error_code, t.correlation_id
             FROM revocation_attempts t JOIN revocation_actions a ON a.id = t.action_id
             WHERE a.revocation_id = ?1 ORDER BY t.id",
        )?;
        let rows = statement.query_map([revocation_id], |r| {
            Ok(Attempt {
                action_id: r.get(0)?,
                at: r.get(1)?,
                call: r.get(2)?,
                outcome: Outcome {
                    code: r.get(3)?,
                    message: r.get(4)?,
                    http_status: r.get(5)?,
                    server_error_code: r.get(6)?,
                    correlation_id: r.get(7)?,
                },
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn revocation_from(&self, r: &Row) -> rusqlite::Result<Revocation> {
        let target: String = r.get(2)?;
        let operation: Option<String> = r.get(5)?;
        Ok(Revocation {
            id: r.get(0)?,
            status: RevocationStatus::Queued,
            card_id: r.get(1)?,
            target: Target::parse(&target)
                .ok_or_else(|| unknown_value(2, "revocation target", &target))?,
            reason: r.get(3)?,
            reason_code: r.get(4)?,
            operation: operation.and_then(|o| CardOperation::parse(&o)),
            revoker: r.get(6)?,
            comment: r.get(7)?,
            client: r.get(8)?,
            idempotency_key: r.get(9)?,
            created_at: r.get(10)?,
            actions: Vec::new(),
            attempts: None,
        })
    }

    fn complete(&self, mut revocation: Revocation) -> Result<Revocation, StoreError> {
        revocation.actions = self.actions_of(revocation.id)?;
        let statuses: Vec<ActionStatus> = revocation.actions.iter().map(|a| a.status).collect();
        revocation.status = RevocationStatus::of(&statuses);
        Ok(revocation)
    }

    const REVOCATION_COLUMNS: &'static str = "id, card_id, target, reason, reason_code, \
        operation, revoker, comment, client, idempotency_key, created_at";

    /// One revocation with its actions and, when asked, every delivery attempt.
    pub fn revocation(
        &self,
        id: i64,
        with_attempts: bool,
    ) -> Result<Option<Revocation>, StoreError> {
        let found = self
            .conn
            .query_row(
                &format!(
                    "SELECT {} FROM revocations WHERE id = ?1",
                    Self::REVOCATION_COLUMNS
                ),
                [id],
                |r| self.revocation_from(r),
            )
            .optional()?;
        let Some(revocation) = found else {
            return Ok(None);
        };
        let mut revocation = self.complete(revocation)?;
        if with_attempts {
            revocation.attempts = Some(self.attempts_of(id)?);
        }
        Ok(Some(revocation))
    }

    /// Revocations with ids below `before` (from the newest when `None`), newest first, at most
    /// `limit`, each row satisfying every condition; each with its actions and status.
    pub fn revocations_page(
        &self,
        before: Option<i64>,
        conditions: &[Condition],
        limit: i64,
    ) -> Result<Vec<Revocation>, StoreError> {
        let mut sql = format!(
            "SELECT {} FROM revocations WHERE id < ?1",
            Self::REVOCATION_COLUMNS
        );
        let mut values = vec![
            rusqlite::types::Value::Integer(before.unwrap_or(i64::MAX)),
            rusqlite::types::Value::Integer(limit),
        ];
        for c in conditions {
            values.push(c.value.clone());
            sql.push_str(&format!(
                " AND {} {} ?{}",
                c.column.sql(),
                c.op.sql(),
                values.len()
            ));
        }
        sql.push_str(" ORDER BY id DESC LIMIT ?2");
        let mut statement = self.conn.prepare(&sql)?;
        let rows: Vec<Revocation> = statement
            .query_map(rusqlite::params_from_iter(values), |r| {
                self.revocation_from(r)
            })?
            .collect::<Result<_, _>>()?;
        rows.into_iter().map(|r| self.complete(r)).collect()
    }

    /// Actions to work on now: queued or sending, due at or before `now_ms`.
    pub fn due_actions(&self, now_ms: i64) -> Result<Vec<DueAction>, StoreError> {
        let mut statement = self.conn.prepare(&format!(
            "SELECT {ACTION_COLUMNS}, r.id, r.reason_code, r.reason, r.revoker, r.comment
             FROM revocation_actions a JOIN revocations r ON r.id = a.revocation_id
             WHERE a.status IN ('queued', 'sending') AND a.next_attempt_ms <= ?1
             ORDER BY a.next_attempt_ms, a.id LIMIT 100"
        ))?;
        let rows = statement.query_map([now_ms], |r| {
            Ok(DueAction {
                action: action_from(r, 0)?,
                revocation_id: r.get(14)?,
                reason_code: r.get(15)?,
                reason: r.get(16)?,
                revoker: r.get(17)?,
                comment: r.get(18)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// When the next queued or sending action is due (unix ms), if any.
    /// Revocation actions by status, and when the oldest action still waiting for delivery
    /// (queued or sending) was submitted: what the metrics show of the outbox.
    pub fn outbox_summary(&self) -> Result<OutboxSummary, StoreError> {
        let mut statement = self.conn.prepare(
            "SELECT status, count(*) FROM revocation_actions GROUP BY status ORDER BY status",
        )?;
        let counts = statement
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<Vec<(String, i64)>, _>>()?;
        let oldest = self.conn.query_row(
            "SELECT min(r.created_at) FROM revocation_actions a JOIN revocations r ON r.id = a.revocation_id
             WHERE a.status IN ('queued', 'sending')",
            [],
            |r| r.get(0),
        )?;
        Ok(OutboxSummary { counts, oldest })
    }

    pub fn next_due_ms(&self) -> Result<Option<i64>, StoreError> {
        Ok(self.conn.query_row(
            "SELECT min(next_attempt_ms) FROM revocation_actions WHERE status IN ('queued', 'sending')",
            [],
            |r| r.get(0),
        )?)
    }

    /// Applies `update` to an action, committed on its own.
    pub fn update_action(&self, id: i64, update: &ActionUpdate) -> Result<(), StoreError> {
        let outcome = update
            .outcome
            .as_ref()
            .map(serde_json::to_string)
            .transpose()?;
        self.conn.execute(
            "UPDATE revocation_actions SET
                 status = coalesce(?2, status),
                 next_attempt_ms = CASE WHEN ?3 THEN ?4 ELSE next_attempt_ms END,
                 request_uri = coalesce(?5, request_uri),
                 request_status = coalesce(?6, request_status),
                 last_outcome = coalesce(?7, last_outcome),
                 attempts = attempts + ?8,
                 updated_at = CASE
                     WHEN ?2 IS NULL AND ?5 IS NULL AND ?6 IS NULL AND ?7 IS NULL AND ?8 = 0
                     THEN updated_at ELSE ?9 END
             WHERE id = ?1",
            params![
                id,
                update.status.map(ActionStatus::as_str),
                update.schedule != Schedule::Keep,
                match update.schedule {
                    Schedule::At(ms) => Some(ms),
                    Schedule::Keep | Schedule::Never => None,
                },
                update.request_uri,
                update.request_status,
                outcome,
                i64::from(update.attempted),
                now()
            ],
        )?;
        Ok(())
    }

    /// Appends a delivery attempt to the audit trail.
    pub fn record_attempt(
        &self,
        action_id: i64,
        call: &str,
        outcome: &Outcome,
    ) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO revocation_attempts (action_id, at, call, code, message, http_status,
                 server_error_code, correlation_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                action_id,
                now(),
                call,
                outcome.code,
                outcome.message,
                outcome.http_status,
                outcome.server_error_code,
                outcome.correlation_id
            ],
        )?;
        self.prune_attempts(action_id)?;
        Ok(())
    }
}

/// Replaces a card's remembered certificates and marks it seen, inside the caller's write
/// transaction (a sighting records its card's certificates in the same one).
pub(super) fn replace_card_certificates(
    conn: &Connection,
    card_id: &str,
    certificates: &[KnownCertificate],
    seen_at: &str,
) -> Result<(), StoreError> {
    conn.prepare_cached("DELETE FROM card_certificates WHERE card_id = ?1")?
        .execute([card_id])?;
    let mut insert = conn.prepare_cached(
        "INSERT OR REPLACE INTO card_certificates (card_id, thumbprint, serial_number, seen_at)
         VALUES (?1, ?2, ?3, ?4)",
    )?;
    for c in certificates {
        insert.execute(params![card_id, c.thumbprint, c.serial_number, seen_at])?;
    }
    conn.prepare_cached(
        "INSERT INTO cards (card_id, seen_at) VALUES (?1, ?2)
         ON CONFLICT (card_id) DO UPDATE SET seen_at = ?2",
    )?
    .execute(params![card_id, seen_at])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::revoke::{ActionKind, Plan, Target};

    fn plan() -> Plan {
        Plan {
            card_id: "00112233445566778899AABBCCDDEEFF".into(),
            target: Target::Certificates,
            reason: "superseded",
            reason_code: 4,
            operation: None,
            revoker: Some("helpdesk@contoso.com".into()),
            comment: None,
            actions: vec![
                ActionKind::ScepmanRevoke {
                    serial_number: "01".into(),
                    thumbprint: "AA".repeat(20),
                },
                ActionKind::ScepmanRevoke {
                    serial_number: "02".into(),
                    thumbprint: "BB".repeat(20),
                },
            ],
        }
    }

    #[test]
    fn a_revocation_survives_reopening_and_follows_its_actions() {
        let dir = std::env::temp_dir().join(format!("cardbridge-outbox-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let id = {
            let store = Store::open(&dir).unwrap();
            assert_eq!(store.card_certificates("X").unwrap(), None);
            store
                .save_card_certificates("X", &[], "2026-11-22T00:00:00Z")
                .unwrap();
            assert_eq!(store.card_certificates("X").unwrap(), Some(Vec::new()));
            store
                .insert_revocation("kiosk", "k1", "h", &plan(), &["m1".into(), "m2".into()])
                .unwrap()
        };
        let store = Store::open(&dir).unwrap();
        assert_eq!(
            store.revocation_by_key("kiosk", "k1").unwrap(),
            Some((id, "h".into()))
        );
        assert_eq!(store.revocation_by_key("other", "k1").unwrap(), None);
        let due = store.due_actions(i64::MAX).unwrap();
        assert_eq!(due.len(), 2);
        assert_eq!(due[0].reason_code, 4);
        let first = due[0].action.id;
        store
            .update_action(
                first,
                &ActionUpdate {
                    status: Some(ActionStatus::Done),
                    schedule: Schedule::Never,
                    outcome: Some(Outcome::ok(200, "revoked")),
                    attempted: true,
                    ..ActionUpdate::default()
                },
            )
            .unwrap();
        store
            .record_attempt(
                first,
                "PATCH api/manage/revoke/01",
                &Outcome::ok(200, "revoked"),
            )
            .unwrap();
        let r = store.revocation(id, true).unwrap().unwrap();
        assert_eq!(r.status, RevocationStatus::InProgress);
        assert_eq!(r.actions[0].status, ActionStatus::Done);
        assert_eq!(r.actions[0].attempts, 1);
        assert_eq!(r.actions[0].next_attempt_at, None);
        assert_eq!(r.attempts.as_ref().map(Vec::len), Some(1));
        assert_eq!(store.due_actions(i64::MAX).unwrap().len(), 1);
        let listed = store.revocations_page(None, &[], 10).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].status, RevocationStatus::InProgress);
        let by_id = |op, id| Condition {
            column: Column::Id,
            op,
            value: rusqlite::types::Value::Integer(id),
        };
        assert_eq!(
            store
                .revocations_page(None, &[by_id(Compare::Eq, id)], 10)
                .unwrap()
                .len(),
            1
        );
        assert!(store
            .revocations_page(None, &[by_id(Compare::Gt, id)], 10)
            .unwrap()
            .is_empty());
        assert!(store
            .revocations_page(Some(id), &[], 10)
            .unwrap()
            .is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_unknown_stored_kind_or_target_is_an_error_not_another_one() {
        let dir = std::env::temp_dir().join(format!("cardbridge-unknown-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir).unwrap();
        let id = store
            .insert_revocation("kiosk", "k1", "h", &plan(), &["m1".into(), "m2".into()])
            .unwrap();
        store
            .conn
            .execute("UPDATE revocation_actions SET kind = 'future_kind'", [])
            .unwrap();
        let e = store.due_actions(i64::MAX).unwrap_err();
        assert!(e.to_string().contains("future_kind"), "{e}");
        store
            .conn
            .execute("UPDATE revocation_actions SET kind = 'scepman_revoke'", [])
            .unwrap();
        assert!(store.revocation(id, false).is_ok());
        store
            .conn
            .execute("UPDATE revocations SET target = 'everything'", [])
            .unwrap();
        let e = store.revocation(id, false).unwrap_err();
        assert!(e.to_string().contains("everything"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
