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
use crate::http::ServerError;
use crate::revoke::{ActionKind, ActionStatus, Outcome, Revocation};
use crate::scepman::ScepmanClient;
use crate::store::{ActionUpdate, DueAction, Schedule, Store, StoreError};

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
            let wait = match (passed, self.store.next_due_ms()) {
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
        for due in self.store.due_actions(now_ms())? {
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
            if let Some(revocation) = self.store.revocation(due.revocation_id, false)? {
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
        self.store.update_action(
            due.action.id,
            &ActionUpdate {
                status: Some(ActionStatus::Sending),
                schedule: Schedule::At(now_ms()),
                ..ActionUpdate::default()
            },
        )
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
        self.store.record_attempt(due.action.id, call, &outcome)?;
        update.outcome = Some(outcome);
        self.store.update_action(due.action.id, &update)
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
        let marker = comment_marker(&due.action.marker);
        if due.action.status == ActionStatus::Sending {
            // An earlier attempt may have created the request: let it settle, then look before
            // sending again.
            let sent_ms = time::OffsetDateTime::parse(
                &due.action.updated_at,
                &time::format_description::well_known::Rfc3339,
            )
            .map_or(0, |t| (t.unix_timestamp_nanos() / 1_000_000) as i64);
            let settled_ms = sent_ms + self.pacing.settle.as_millis() as i64;
            if settled_ms > now_ms() {
                self.store.update_action(
                    due.action.id,
                    &ActionUpdate {
                        schedule: Schedule::At(settled_ms),
                        ..ActionUpdate::default()
                    },
                )?;
                return Ok(false);
            }
            let call = "GET api/v1.0/requests";
            match cm.requests().await {
                Err(e) => {
                    let next = self.backoff(due.action.attempts);
                    return self
                        .finish(
                            due,
                            call,
                            Outcome::from_error(&e),
                            ActionUpdate {
                                schedule: Schedule::At(next),
                                ..ActionUpdate::default()
                            },
                        )
                        .map(|()| true);
                }
                Ok(requests) => {
                    let found = requests
                        .into_iter()
                        .find(|r| r.comment.as_deref().is_some_and(|c| c.contains(&marker)));
                    if let Some(request) = found {
                        let uri = format!("api/v1.0/requests/{}", request.uuid);
                        return self
                            .finish(
                                due,
                                call,
                                Outcome::ok(200, &format!("found the request sent before: {uri}")),
                                ActionUpdate {
                                    request_uri: Some(uri),
                                    request_status: Some(crate::cm::model::request_status_name(
                                        request.status,
                                    )),
                                    schedule: Schedule::At(now_ms()),
                                    ..ActionUpdate::default()
                                },
                            )
                            .map(|()| true);
                    }
                }
            }
        }
        self.mark_sending(due)?;
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
        let result = match cm.create_request(&body).await {
            Ok(uri) => self.finish(
                due,
                call,
                Outcome::ok(201, &uri),
                ActionUpdate {
                    request_uri: Some(uri),
                    schedule: Schedule::At(now_ms() + self.poll_ms()),
                    attempted: true,
                    ..ActionUpdate::default()
                },
            ),
            // The request may or may not exist now: stay `sending`, look first next time.
            Err(e) if e.is_transient() || e.status() == Some(409) => {
                let next = self.backoff(due.action.attempts);
                self.finish(
                    due,
                    call,
                    Outcome::from_error(&e),
                    ActionUpdate {
                        schedule: Schedule::At(next),
                        attempted: true,
                        ..ActionUpdate::default()
                    },
                )
            }
            Err(e) => self.finish(
                due,
                call,
                Outcome::from_error(&e),
                ActionUpdate {
                    status: Some(ActionStatus::Failed),
                    schedule: Schedule::Never,
                    attempted: true,
                    ..ActionUpdate::default()
                },
            ),
        };
        result.map(|()| true)
    }

    fn poll_ms(&self) -> i64 {
        self.pacing.poll_interval.as_millis() as i64
    }

    /// Looks at a CM request the server is working on: Completed is done; Failed, Denied and
    /// Canceled are failures; anything else is looked at again later. Only changes and errors
    /// are written to the attempt log, not every look.
    async fn follow(
        &mut self,
        cm: &CmClient,
        due: &DueAction,
        uri: &str,
    ) -> Result<bool, StoreError> {
        let id = uri.trim_end_matches('/').rsplit('/').next().unwrap_or(uri);
        // The URI came from the server: only a GUID goes into the next URL.
        if id.is_empty()
            || !id
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || matches!(b, b'-' | b'{' | b'}'))
        {
            return self
                .finish(
                    due,
                    "-",
                    Outcome {
                        code: "bad_body".into(),
                        message: format!(
                            "the server gave a request URI without a request id: {uri:?}"
                        ),
                        ..Outcome::default()
                    },
                    ActionUpdate {
                        status: Some(ActionStatus::Failed),
                        schedule: Schedule::Never,
                        ..ActionUpdate::default()
                    },
                )
                .map(|()| true);
        }
        let call = format!("GET api/v1.0/requests/{id}");
        let later = now_ms() + self.poll_ms();
        let answer: Result<Option<crate::cm::Request>, ServerError> = cm.request(id).await;
        let result = match answer {
            Err(e) => self.finish(
                due,
                &call,
                Outcome::from_error(&e),
                ActionUpdate {
                    schedule: Schedule::At(self.backoff(0).max(later)),
                    ..ActionUpdate::default()
                },
            ),
            Ok(None) => self.finish(
                due,
                &call,
                Outcome {
                    code: "request_gone".into(),
                    message: "the server no longer has this request".into(),
                    http_status: Some(204),
                    ..Outcome::default()
                },
                ActionUpdate {
                    status: Some(ActionStatus::Failed),
                    schedule: Schedule::Never,
                    ..ActionUpdate::default()
                },
            ),
            Ok(Some(request)) => {
                let request_status = RequestStatus::from_code(request.status);
                let name = request_status.name();
                let (status, next) = match request_status.progress() {
                    RequestProgress::Completed => (ActionStatus::Done, Schedule::Never),
                    RequestProgress::Ended => (ActionStatus::Failed, Schedule::Never),
                    RequestProgress::Open => (ActionStatus::Sending, Schedule::At(later)),
                };
                let changed = due.action.request_status.as_deref() != Some(name.as_str());
                if !changed && status == ActionStatus::Sending {
                    let later = ActionUpdate {
                        schedule: next,
                        ..ActionUpdate::default()
                    };
                    return self
                        .store
                        .update_action(due.action.id, &later)
                        .map(|()| false);
                }
                let update = ActionUpdate {
                    status: Some(status),
                    schedule: next,
                    request_status: Some(name.clone()),
                    ..ActionUpdate::default()
                };
                let mut outcome = Outcome::ok(200, &format!("request {name}"));
                if status == ActionStatus::Failed {
                    outcome.code = "request_not_completed".into();
                }
                self.finish(due, &call, outcome, update)
            }
        };
        result.map(|()| true)
    }
}
