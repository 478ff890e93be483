//! The outbox worker: delivers the stored revocation actions, one at a time, and follows MIM CM
//! requests to their end. It sits above both `revoke` (the plan's types) and `store` (the
//! durable outbox), so neither depends on the other's I/O.
//!
//! Exactly once, across crashes (the reasoning is in ARCHITECTURE.md):
//! - every status change is committed before the next step, and an action is marked `sending`
//!   (due now) *before* its request leaves, so a crash leaves a trace of every request that may
//!   have reached a server;
//! - SCEPman: an action found `sending` is simply sent again; a revocation that had gone through
//!   answers 409 (error code 5013) and is recorded as `already_revoked`;
//! - MIM CM: a request created twice would be a second workflow, so every request carries a
//!   unique marker in its comment; an action found `sending` without a request URI (a crash, a
//!   timeout, a dropped connection) is first looked for among the server's requests by that
//!   marker, and sent again only when the server has no such request. A failure to look is
//!   retried later: the worker never sends blind.

use std::sync::Arc;
use std::time::Duration;

use crate::cm::model::{RequestProgress, RequestStatus};
use crate::cm::{CmClient, NewRequest};
use crate::revoke::{ActionKind, ActionStatus, Outcome, Revocation};
use crate::scepman::ScepmanClient;
use crate::store::{blocking, ActionUpdate, DueAction, Schedule, Store, StoreError};

/// How the worker paces itself.
#[derive(Debug, Clone, Copy)]
pub struct Pacing {
    /// First delay after a transient failure; doubled on each further failure.
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// How often a CM request is looked at while the server works on it.
    pub poll_interval: Duration,
    /// How long after sending a CM request the worker waits before looking for it (the CM
    /// client's request timeout): a server may still be carrying out a request whose sender
    /// died, and looking too early would miss it and send it twice.
    pub settle: Duration,
}

impl Pacing {
    /// From `[revocation]`; the settle time is the CM client's request timeout.
    pub fn of(config: &crate::config::Config) -> Pacing {
        let r = &config.revocation;
        Pacing {
            retry_initial: Duration::from_millis(r.retry_initial_ms),
            retry_max: Duration::from_millis(r.retry_max_ms),
            poll_interval: Duration::from_millis(r.poll_interval_ms),
            settle: config
                .cm
                .as_ref()
                .map_or(Duration::ZERO, crate::config::ServerConfig::timeout),
        }
    }
}

/// The request id at the end of a URI the server gave; only a GUID goes into the next URL.
fn request_id(uri: &str) -> Option<&str> {
    let id = uri.trim_end_matches('/').rsplit('/').next()?;
    let guid = !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() || matches!(b, b'-' | b'{' | b'}'));
    guid.then_some(id)
}

/// An action that failed for good.
fn failed() -> ActionUpdate {
    ActionUpdate {
        status: Some(ActionStatus::Failed),
        schedule: Schedule::Never,
        ..ActionUpdate::default()
    }
}

/// What looking for an earlier request found.
enum Looked {
    Found,
    NotThere,
    /// The look-up failed; it is retried later.
    Failed,
}

/// Tells the daemon that a revocation changed (it publishes `revocation.updated`).
pub type Publish = Box<dyn Fn(&Revocation) + Send>;

pub struct Worker {
    store: Store,
    scepman: Option<ScepmanClient>,
    cm: Option<CmClient>,
    pacing: Pacing,
    publish: Publish,
}

/// The marker that identifies an action's CM request in its comment.
fn comment_marker(marker: &str) -> String {
    format!("[cardbridge:{marker}]")
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

impl Worker {
    pub fn new(
        store: Store,
        scepman: Option<ScepmanClient>,
        cm: Option<CmClient>,
        pacing: Pacing,
        publish: Publish,
    ) -> Worker {
        Worker {
            store,
            scepman,
            cm,
            pacing,
            publish,
        }
    }

    /// Works until `stop` resolves: every due action, then sleeps until the next one is due or
    /// `wake` is notified (a new revocation was stored).
    pub async fn run(
        mut self,
        wake: Arc<tokio::sync::Notify>,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        loop {
            // A stop abandons the pass where it is: every step is committed, and an action left
            // in `sending` is recovered at the next start.
            let passed = tokio::select! {
                _ = &mut stop => return,
                passed = self.pass() => passed,
            };
            let wait = match (passed, blocking(|| self.store.next_due_ms())) {
                (Ok(()), Ok(Some(due))) => {
                    Duration::from_millis(due.saturating_sub(now_ms()).max(0) as u64)
                }
                (Ok(()), Ok(None)) => Duration::from_secs(60),
                // The database is unwell: try again later rather than spin.
                (Err(e), _) | (_, Err(e)) => {
                    tracing::error!("revocation outbox: {e}");
                    Duration::from_secs(5)
                }
            }
            .min(Duration::from_secs(60));
            tokio::select! {
                _ = &mut stop => return,
                _ = wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Handles every action due now.
    async fn pass(&mut self) -> Result<(), StoreError> {
        for due in blocking(|| self.store.due_actions(now_ms()))? {
            let changed = match &due.action.kind {
                ActionKind::ScepmanRevoke { serial_number, .. } => {
                    let serial = serial_number.clone();
                    self.scepman_revoke(&due, &serial).await?;
                    true
                }
                ActionKind::CmRequest {
                    request_type,
                    smartcard_uuid,
                } => {
                    let (kind, uuid) = (request_type.clone(), smartcard_uuid.clone());
                    self.cm_request(&due, &kind, &uuid).await?
                }
            };
            if !changed {
                continue;
            }
            if let Some(revocation) = blocking(|| self.store.revocation(due.revocation_id, false))?
            {
                (self.publish)(&revocation);
            }
        }
        Ok(())
    }

    /// The delay before attempt `attempts + 1`: doubling from `retry_initial` up to `retry_max`,
    /// plus up to half again at random so stations do not retry in step.
    fn backoff(&self, attempts: i64) -> i64 {
        let initial = self.pacing.retry_initial.as_millis() as i64;
        let max = self.pacing.retry_max.as_millis() as i64;
        let base = initial
            .saturating_mul(1i64 << attempts.clamp(0, 30))
            .min(max)
            .max(1);
        now_ms() + base + fastrand::i64(0..=base / 2)
    }

    fn mark_sending(&self, due: &DueAction) -> Result<(), StoreError> {
        let sending = ActionUpdate {
            status: Some(ActionStatus::Sending),
            schedule: Schedule::At(now_ms()),
            ..ActionUpdate::default()
        };
        blocking(|| self.store.update_action(due.action.id, &sending))
    }

    /// Records a finished call: its attempt row and the action's new state.
    fn finish(
        &self,
        due: &DueAction,
        call: &str,
        outcome: Outcome,
        mut update: ActionUpdate,
    ) -> Result<(), StoreError> {
        tracing::info!(
            event = "revocation.attempt",
            revocation = due.revocation_id,
            action = due.action.id,
            call,
            outcome = %outcome.code,
            http_status = outcome.http_status,
            "{}",
            outcome.message
        );
        blocking(|| {
            self.store.record_attempt(due.action.id, call, &outcome)?;
            update.outcome = Some(outcome);
            self.store.update_action(due.action.id, &update)
        })
    }

    fn not_configured(&self, due: &DueAction, server: &str) -> Result<(), StoreError> {
        self.finish(
            due,
            "-",
            Outcome {
                code: "server_not_configured".into(),
                message: format!("{server} is no longer configured on this station"),
                ..Outcome::default()
            },
            ActionUpdate {
                status: Some(ActionStatus::Failed),
                schedule: Schedule::Never,
                ..ActionUpdate::default()
            },
        )
    }

    async fn scepman_revoke(&mut self, due: &DueAction, serial: &str) -> Result<(), StoreError> {
        let Some(scepman) = self.scepman.clone() else {
            return self.not_configured(due, "SCEPman");
        };
        let call = format!("PATCH {}", ScepmanClient::revoke_path(serial));
        self.mark_sending(due)?;
        let answer = scepman
            .revoke(serial, due.reason_code, due.revoker.as_deref())
            .await;
        let attempted = |status, schedule| ActionUpdate {
            status: Some(status),
            schedule,
            attempted: true,
            ..ActionUpdate::default()
        };
        match answer {
            Ok(code) => self.finish(
                due,
                &call,
                Outcome::ok(code, "revoked"),
                attempted(ActionStatus::Done, Schedule::Never),
            ),
            // Only 409 with error code 5013 means "already revoked"; any other conflict is a
            // failure whose answer is kept.
            Err(e)
                if e.status() == Some(409)
                    && e.error_code() == Some(crate::scepman::ALREADY_REVOKED) =>
            {
                let mut outcome = Outcome::from_error(&e);
                outcome.code = "already_revoked".into();
                self.finish(
                    due,
                    &call,
                    outcome,
                    attempted(ActionStatus::AlreadyRevoked, Schedule::Never),
                )
            }
            Err(e) if e.is_transient() => {
                let next = self.backoff(due.action.attempts);
                self.finish(
                    due,
                    &call,
                    Outcome::from_error(&e),
                    attempted(ActionStatus::Queued, Schedule::At(next)),
                )
            }
            Err(e) => self.finish(
                due,
                &call,
                Outcome::from_error(&e),
                attempted(ActionStatus::Failed, Schedule::Never),
            ),
        }
    }

    /// Sends, finds or follows an action's CM request; returns whether anything changed.
    ///
    /// The steps: follow a request whose URI is known; for an action found `sending` without
    /// one, wait until a request sent then has settled and look for it by its marker; send only
    /// when the server has no such request.
    async fn cm_request(
        &mut self,
        due: &DueAction,
        request_type: &str,
        smartcard_uuid: &str,
    ) -> Result<bool, StoreError> {
        let Some(cm) = self.cm.clone() else {
            return self.not_configured(due, "MIM CM").map(|()| true);
        };
        if let Some(uri) = due.action.request_uri.clone() {
            return self.follow(&cm, due, &uri).await;
        }
        if due.action.status == ActionStatus::Sending {
            if let Some(settled_ms) = self.unsettled(due) {
                let wait = ActionUpdate {
                    schedule: Schedule::At(settled_ms),
                    ..ActionUpdate::default()
                };
                blocking(|| self.store.update_action(due.action.id, &wait))?;
                return Ok(false);
            }
            match self.look_for_sent_request(&cm, due).await? {
                Looked::Found | Looked::Failed => return Ok(true),
                Looked::NotThere => {}
            }
        }
        self.send_request(&cm, due, request_type, smartcard_uuid)
            .await
            .map(|()| true)
    }

    /// When an action's request was sent less than the settle time ago: the time it settles.
    fn unsettled(&self, due: &DueAction) -> Option<i64> {
        let sent_ms = time::OffsetDateTime::parse(
            &due.action.updated_at,
            &time::format_description::well_known::Rfc3339,
        )
        .map_or(0, |t| (t.unix_timestamp_nanos() / 1_000_000) as i64);
        let settled_ms = sent_ms + self.pacing.settle.as_millis() as i64;
        (settled_ms > now_ms()).then_some(settled_ms)
    }

    /// Looks among the server's requests for one carrying the action's marker: found, its URI
    /// is adopted; a failure to look is retried later (never send blind).
    async fn look_for_sent_request(
        &mut self,
        cm: &CmClient,
        due: &DueAction,
    ) -> Result<Looked, StoreError> {
        let call = "GET api/v1.0/requests";
        let marker = comment_marker(&due.action.marker);
        let requests = match cm.requests().await {
            Ok(requests) => requests,
            Err(e) => {
                let update = ActionUpdate {
                    schedule: Schedule::At(self.backoff(due.action.attempts)),
                    ..ActionUpdate::default()
                };
                self.finish(due, call, Outcome::from_error(&e), update)?;
                return Ok(Looked::Failed);
            }
        };
        let found = requests
            .into_iter()
            .find(|r| r.comment.as_deref().is_some_and(|c| c.contains(&marker)));
        let Some(request) = found else {
            return Ok(Looked::NotThere);
        };
        let uri = format!("api/v1.0/requests/{}", request.uuid);
        let update = ActionUpdate {
            request_uri: Some(uri.clone()),
            request_status: Some(crate::cm::model::request_status_name(request.status)),
            schedule: Schedule::At(now_ms()),
            ..ActionUpdate::default()
        };
        let outcome = Outcome::ok(200, &format!("found the request sent before: {uri}"));
        self.finish(due, call, outcome, update)?;
        Ok(Looked::Found)
    }

    /// Sends the request (never retried here). A transient failure or a 409 may mean it was
    /// created: the action stays `sending`, to be looked for first next time.
    async fn send_request(
        &mut self,
        cm: &CmClient,
        due: &DueAction,
        request_type: &str,
        smartcard_uuid: &str,
    ) -> Result<(), StoreError> {
        self.mark_sending(due)?;
        let marker = comment_marker(&due.action.marker);
        let comment = match &due.comment {
            Some(c) => format!("{}: {c} {marker}", due.reason),
            None => format!("{} {marker}", due.reason),
        };
        let body = NewRequest {
            request_type: request_type.into(),
            smartcard: smartcard_uuid.into(),
            comment,
            datacollection: Vec::new(),
        };
        let call = "POST api/v1.0/requests";
        let (outcome, update) = match cm.create_request(&body).await {
            Ok(uri) => (
                Outcome::ok(201, &uri),
                ActionUpdate {
                    request_uri: Some(uri),
                    schedule: Schedule::At(now_ms() + self.poll_ms()),
                    ..ActionUpdate::default()
                },
            ),
            Err(e) if e.is_transient() || e.status() == Some(409) => (
                Outcome::from_error(&e),
                ActionUpdate {
                    schedule: Schedule::At(self.backoff(due.action.attempts)),
                    ..ActionUpdate::default()
                },
            ),
            Err(e) => (
                Outcome::from_error(&e),
                ActionUpdate {
                    status: Some(ActionStatus::Failed),
                    schedule: Schedule::Never,
                    ..ActionUpdate::default()
                },
            ),
        };
        let update = ActionUpdate {
            attempted: true,
            ..update
        };
        self.finish(due, call, outcome, update)
    }

    fn poll_ms(&self) -> i64 {
        self.pacing.poll_interval.as_millis() as i64
    }

    /// Looks at a sent CM request and records what changed: followed to its end (completed,
    /// or denied, failed, canceled), polled while the server works on it.
    async fn follow(
        &mut self,
        cm: &CmClient,
        due: &DueAction,
        uri: &str,
    ) -> Result<bool, StoreError> {
        let Some(id) = request_id(uri) else {
            let outcome = Outcome {
                code: "bad_body".into(),
                message: format!("the server gave a request URI without a request id: {uri:?}"),
                ..Outcome::default()
            };
            return self.finish(due, "-", outcome, failed()).map(|()| true);
        };
        let call = format!("GET api/v1.0/requests/{id}");
        let later = now_ms() + self.poll_ms();
        match cm.request(id).await {
            Err(e) => {
                let update = ActionUpdate {
                    schedule: Schedule::At(self.backoff(0).max(later)),
                    ..ActionUpdate::default()
                };
                self.finish(due, &call, Outcome::from_error(&e), update)
                    .map(|()| true)
            }
            Ok(None) => {
                let outcome = Outcome {
                    code: "request_gone".into(),
                    message: "the server no longer has this request".into(),
                    http_status: Some(204),
                    ..Outcome::default()
                };
                self.finish(due, &call, outcome, failed()).map(|()| true)
            }
            Ok(Some(request)) => self.request_seen(due, &call, &request, later),
        }
    }

    /// Records a request's status; an unchanged status of an open request is only a reschedule
    /// (no attempt row, so a long approval does not fill the audit trail).
    fn request_seen(
        &mut self,
        due: &DueAction,
        call: &str,
        request: &crate::cm::Request,
        later: i64,
    ) -> Result<bool, StoreError> {
        let request_status = RequestStatus::from_code(request.status);
        let name = request_status.name();
        let (status, schedule) = match request_status.progress() {
            RequestProgress::Completed => (ActionStatus::Done, Schedule::Never),
            RequestProgress::Ended => (ActionStatus::Failed, Schedule::Never),
            RequestProgress::Open => (ActionStatus::Sending, Schedule::At(later)),
        };
        let changed = due.action.request_status.as_deref() != Some(name.as_str());
        if !changed && status == ActionStatus::Sending {
            let reschedule = ActionUpdate {
                schedule,
                ..ActionUpdate::default()
            };
            return blocking(|| self.store.update_action(due.action.id, &reschedule))
                .map(|()| false);
        }
        let mut outcome = Outcome::ok(200, &format!("request {name}"));
        if status == ActionStatus::Failed {
            outcome.code = "request_not_completed".into();
        }
        let update = ActionUpdate {
            status: Some(status),
            schedule,
            request_status: Some(name),
            ..ActionUpdate::default()
        };
        self.finish(due, call, outcome, update).map(|()| true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_guid_from_the_server_goes_into_the_next_url() {
        let id = "a9b4c3d2-0000-4000-8000-000000000001";
        assert_eq!(request_id(&format!("api/v1.0/requests/{id}")), Some(id));
        assert_eq!(
            request_id(&format!("api/v1.0/requests/{{{id}}}/")),
            Some(&*format!("{{{id}}}"))
        );
        for bad in [
            "",
            "api/v1.0/requests/",
            "api/v1.0/requests/../../smartcards",
            "x?y=1",
        ] {
            assert_eq!(request_id(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_marker_is_what_the_comment_carries() {
        assert_eq!(comment_marker("ab12"), "[cardbridge:ab12]");
    }
}
