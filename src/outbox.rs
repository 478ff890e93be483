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

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::cm::model::{RequestProgress, RequestStatus};
use crate::cm::{CmClient, NewRequest, Request};
use crate::http::ServerError;
use crate::revoke::{ActionKind, ActionStatus, Outcome, Revocation};
use crate::scepman::ScepmanClient;
use crate::serial::Serial;
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

/// The time in Unix milliseconds. The worker's rules (settle, backoff, polling) read it only
/// through this, so tests drive them with a clock of their own.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The MIM CM calls the worker makes: [`CmClient`], or a scripted server in the tests.
pub trait CmCalls: Clone + Send + Sync + 'static {
    fn requests(&self) -> impl Future<Output = Result<Vec<Request>, ServerError>> + Send;
    fn create_request(
        &self,
        body: &NewRequest,
    ) -> impl Future<Output = Result<String, ServerError>> + Send;
    fn request(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<Request>, ServerError>> + Send;
}

/// The SCEPman call the worker makes: [`ScepmanClient`], or a scripted server in the tests.
pub trait ScepmanCalls: Clone + Send + Sync + 'static {
    fn revoke(
        &self,
        serial: &Serial,
        reason_code: i64,
        revoker: Option<&str>,
    ) -> impl Future<Output = Result<u16, ServerError>> + Send;
}

impl CmCalls for CmClient {
    fn requests(&self) -> impl Future<Output = Result<Vec<Request>, ServerError>> + Send {
        CmClient::requests(self)
    }
    fn create_request(
        &self,
        body: &NewRequest,
    ) -> impl Future<Output = Result<String, ServerError>> + Send {
        CmClient::create_request(self, body)
    }
    fn request(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<Request>, ServerError>> + Send {
        CmClient::request(self, id)
    }
}

impl ScepmanCalls for ScepmanClient {
    fn revoke(
        &self,
        serial: &Serial,
        reason_code: i64,
        revoker: Option<&str>,
    ) -> impl Future<Output = Result<u16, ServerError>> + Send {
        ScepmanClient::revoke(self, serial, reason_code, revoker)
    }
}

pub struct Worker<C: CmCalls = CmClient, S: ScepmanCalls = ScepmanClient> {
    store: Store,
    scepman: Option<S>,
    cm: Option<C>,
    pacing: Pacing,
    publish: Publish,
    clock: Clock,
}

/// The marker that identifies an action's CM request in its comment.
fn comment_marker(marker: &str) -> String {
    format!("[cardbridge:{marker}]")
}

/// The system's clock, in Unix milliseconds.
pub fn system_clock() -> Clock {
    Arc::new(|| (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64)
}

impl<C: CmCalls, S: ScepmanCalls> Worker<C, S> {
    pub fn new(
        store: Store,
        scepman: Option<S>,
        cm: Option<C>,
        pacing: Pacing,
        publish: Publish,
    ) -> Worker<C, S> {
        Worker {
            store,
            scepman,
            cm,
            pacing,
            publish,
            clock: system_clock(),
        }
    }

    /// The same worker on another clock (tests).
    pub fn with_clock(self, clock: Clock) -> Worker<C, S> {
        Worker { clock, ..self }
    }

    fn now_ms(&self) -> i64 {
        (self.clock)()
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
                    Duration::from_millis(due.saturating_sub(self.now_ms()).max(0) as u64)
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
        for due in blocking(|| self.store.due_actions(self.now_ms()))? {
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
        self.now_ms() + base + fastrand::i64(0..=base / 2)
    }

    fn mark_sending(&self, due: &DueAction) -> Result<(), StoreError> {
        let sending = ActionUpdate {
            status: Some(ActionStatus::Sending),
            schedule: Schedule::At(self.now_ms()),
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
        let message = format!("{server} is no longer configured on this station");
        self.refuse(due, "server_not_configured", message)
    }

    /// Ends an action that cannot be sent at all, with `code` and `message` as its outcome.
    fn refuse(&self, due: &DueAction, code: &str, message: String) -> Result<(), StoreError> {
        self.finish(
            due,
            "-",
            Outcome {
                code: code.into(),
                message,
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
        // Plans hold a serial the planner parsed; an older row may hold the DER form.
        let serial = match Serial::parse(serial) {
            Ok(serial) => serial,
            Err(e) => return self.refuse(due, "bad_serial_number", e.to_string()),
        };
        let call = format!("PATCH {}", ScepmanClient::revoke_path(&serial));
        self.mark_sending(due)?;
        let answer = scepman
            .revoke(&serial, due.reason_code, due.revoker.as_deref())
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
            // An answer that is not SCEPman's leaves the outcome unknown; sending the PATCH again
            // is harmless (an already revoked certificate answers 409/5013).
            Err(e) if e.is_transient() || matches!(e, ServerError::BadBody { .. }) => {
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
        (settled_ms > self.now_ms()).then_some(settled_ms)
    }

    /// Looks among the server's requests for one carrying the action's marker: found, its URI
    /// is adopted; a failure to look is retried later (never send blind).
    async fn look_for_sent_request(
        &mut self,
        cm: &C,
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
            schedule: Schedule::At(self.now_ms()),
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
        cm: &C,
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
                    schedule: Schedule::At(self.now_ms() + self.poll_ms()),
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
    async fn follow(&mut self, cm: &C, due: &DueAction, uri: &str) -> Result<bool, StoreError> {
        let Some(id) = request_id(uri) else {
            let outcome = Outcome {
                code: "bad_body".into(),
                message: format!("the server gave a request URI without a request id: {uri:?}"),
                ..Outcome::default()
            };
            return self.finish(due, "-", outcome, failed()).map(|()| true);
        };
        let call = format!("GET api/v1.0/requests/{id}");
        let later = self.now_ms() + self.poll_ms();
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
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::sync::Mutex;

    use crate::revoke::{Plan, Target};

    /// A MIM CM that keeps the requests it was sent, and can lose answers: a POST that fails
    /// may still have created its request (`created_anyway`), as a timeout or a 409 can.
    #[derive(Clone, Default)]
    struct ScriptedCm(Arc<Mutex<CmState>>);

    #[derive(Default)]
    struct CmState {
        requests: Vec<Request>,
        post_failures: VecDeque<(ServerError, bool)>,
        lookup_failures: VecDeque<ServerError>,
        posts: usize,
        lookups: usize,
    }

    impl ScriptedCm {
        fn state(&self) -> std::sync::MutexGuard<'_, CmState> {
            self.0.lock().unwrap()
        }

        /// POSTs and look-ups so far (one lock: two in one expression would deadlock).
        fn calls(&self) -> (usize, usize) {
            let s = self.state();
            (s.posts, s.lookups)
        }
    }

    impl CmCalls for ScriptedCm {
        fn requests(&self) -> impl Future<Output = Result<Vec<Request>, ServerError>> + Send {
            let mut s = self.state();
            s.lookups += 1;
            let answer = match s.lookup_failures.pop_front() {
                Some(e) => Err(e),
                None => Ok(s.requests.clone()),
            };
            async move { answer }
        }
        fn create_request(
            &self,
            body: &NewRequest,
        ) -> impl Future<Output = Result<String, ServerError>> + Send {
            let mut s = self.state();
            s.posts += 1;
            let uuid = format!("00000000-0000-4000-8000-{:012}", s.posts);
            let created = Request {
                uuid: uuid.clone(),
                status: 16,
                comment: Some(body.comment.clone()),
                ..Request::default()
            };
            let answer = match s.post_failures.pop_front() {
                Some((e, created_anyway)) => {
                    if created_anyway {
                        s.requests.push(created);
                    }
                    Err(e)
                }
                None => {
                    s.requests.push(created);
                    Ok(format!("api/v1.0/requests/{uuid}"))
                }
            };
            async move { answer }
        }
        fn request(
            &self,
            id: &str,
        ) -> impl Future<Output = Result<Option<Request>, ServerError>> + Send {
            let found = self.state().requests.iter().find(|r| r.uuid == id).cloned();
            async move { Ok(found) }
        }
    }

    /// A SCEPman whose answers to revocations are given in order.
    #[derive(Clone, Default)]
    struct ScriptedScepman(Arc<Mutex<VecDeque<Result<u16, ServerError>>>>);

    impl ScepmanCalls for ScriptedScepman {
        fn revoke(
            &self,
            _serial: &Serial,
            _reason: i64,
            _revoker: Option<&str>,
        ) -> impl Future<Output = Result<u16, ServerError>> + Send {
            let answer = self.0.lock().unwrap().pop_front().unwrap_or(Ok(200));
            async move { answer }
        }
    }

    const SETTLE_MS: i64 = 1000;

    /// A store with one revocation of `kind`, and a worker on a clock the test moves.
    struct Bench {
        worker: Worker<ScriptedCm, ScriptedScepman>,
        cm: ScriptedCm,
        scepman: ScriptedScepman,
        offset: Arc<AtomicI64>,
        dir: std::path::PathBuf,
        runtime: tokio::runtime::Runtime,
    }

    impl Bench {
        fn new(name: &str, kind: ActionKind) -> Bench {
            let dir = std::env::temp_dir()
                .join(format!("cardbridge-worker-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let store = Store::open(&dir).unwrap();
            let plan = Plan {
                card_id: "00112233445566778899AABBCCDDEEFF".into(),
                target: Target::Card,
                reason: "superseded",
                reason_code: 4,
                operation: None,
                revoker: None,
                comment: None,
                actions: vec![kind],
            };
            store
                .insert_revocation("kiosk", "k", "h", &plan, &["m1".into()])
                .unwrap();
            let (cm, scepman) = (ScriptedCm::default(), ScriptedScepman::default());
            let offset = Arc::new(AtomicI64::new(0));
            let clock = {
                let offset = offset.clone();
                let system = system_clock();
                Arc::new(move || system() + offset.load(Ordering::Relaxed)) as Clock
            };
            let pacing = Pacing {
                retry_initial: Duration::from_millis(10),
                retry_max: Duration::from_millis(10),
                poll_interval: Duration::from_millis(10),
                settle: Duration::from_millis(SETTLE_MS as u64),
            };
            let worker = Worker::new(
                store,
                Some(scepman.clone()),
                Some(cm.clone()),
                pacing,
                Box::new(|_| {}),
            )
            .with_clock(clock);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            Bench {
                worker,
                cm,
                scepman,
                offset,
                dir,
                runtime,
            }
        }

        fn cm_card() -> ActionKind {
            ActionKind::CmRequest {
                request_type: "Revoke".into(),
                smartcard_uuid: "438d1b30-f3b4-4bed-85fa-285e08605ba7".into(),
            }
        }

        /// One pass, `later_ms` after the last one (far enough for any backoff or poll).
        fn pass_after(&mut self, later_ms: i64) {
            self.offset.fetch_add(later_ms, Ordering::Relaxed);
            let worker = &mut self.worker;
            self.runtime.block_on(worker.pass()).unwrap();
        }

        fn action(&self) -> crate::revoke::Action {
            let r = self.worker.store.revocation(1, false).unwrap().unwrap();
            r.actions[0].clone()
        }

        /// A crash: a new worker on the same database and servers.
        fn restart(&mut self) {
            let store = Store::open(&self.dir).unwrap();
            let clock = self.worker.clock.clone();
            let pacing = self.worker.pacing;
            self.worker = Worker::new(
                store,
                Some(self.scepman.clone()),
                Some(self.cm.clone()),
                pacing,
                Box::new(|_| {}),
            )
            .with_clock(clock);
        }
    }

    impl Drop for Bench {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn a_request_is_sent_once_and_followed_to_its_end() {
        let mut b = Bench::new("once", Bench::cm_card());
        b.pass_after(0);
        assert_eq!(b.cm.state().posts, 1);
        assert!(b.action().request_uri.is_some());
        b.cm.state().requests[0].status = 8;
        b.pass_after(100);
        assert_eq!(b.action().status, ActionStatus::Done);
        assert_eq!(b.cm.calls(), (1, 0));
    }

    /// (what the lost POST did, whether a look-up fails first, POSTs in the end, outcome)
    #[test]
    fn a_lost_answer_is_looked_for_before_anything_is_sent_again() {
        let timeout = || ServerError::Timeout;
        let conflict = || ServerError::Status {
            status: 409,
            error_code: None,
            correlation_id: None,
            message: "conflict".into(),
        };
        let cases: [(&str, ServerError, bool, bool, usize); 5] = [
            ("timeout, created", timeout(), true, false, 1),
            ("timeout, not created", timeout(), false, false, 2),
            ("409, created", conflict(), true, false, 1),
            (
                "timeout, created, look-up fails once",
                timeout(),
                true,
                true,
                1,
            ),
            (
                "timeout, not created, look-up fails once",
                timeout(),
                false,
                true,
                2,
            ),
        ];
        for (name, failure, created, lookup_fails, posts) in cases {
            let mut b = Bench::new("lost", Bench::cm_card());
            b.cm.state().post_failures.push_back((failure, created));
            b.pass_after(0);
            assert_eq!(b.action().status, ActionStatus::Sending, "{name}");
            assert!(b.action().request_uri.is_none(), "{name}");
            // Before the settle time nothing is asked, nothing is sent.
            b.pass_after(100);
            assert_eq!(b.cm.calls(), (1, 0), "{name}: settle");
            if lookup_fails {
                b.cm.state().lookup_failures.push_back(ServerError::Timeout);
                b.pass_after(SETTLE_MS);
                assert_eq!(b.cm.state().posts, 1, "{name}: never sent blind");
            }
            b.pass_after(SETTLE_MS);
            assert_eq!(b.cm.state().posts, posts, "{name}");
            assert!(b.action().request_uri.is_some(), "{name}: found or sent");
        }
    }

    #[test]
    fn a_crash_at_each_step_neither_loses_nor_repeats_the_request() {
        // Killed after marking `sending`, before the POST left.
        let mut b = Bench::new("crash-before", Bench::cm_card());
        let due = b.worker.store.due_actions(i64::MAX).unwrap().remove(0);
        b.worker.mark_sending(&due).unwrap();
        b.restart();
        b.pass_after(SETTLE_MS + 1);
        assert_eq!(b.cm.state().posts, 1, "looked, not found, sent once");
        // Killed after the server created it, before the answer was recorded.
        let mut b = Bench::new("crash-after", Bench::cm_card());
        b.cm.state()
            .post_failures
            .push_back((ServerError::Timeout, true));
        b.pass_after(0);
        b.restart();
        b.pass_after(SETTLE_MS + 1);
        assert_eq!(b.cm.state().posts, 1, "found by its marker");
        assert!(b.action().request_uri.is_some());
    }

    #[test]
    fn scepman_answers_decide_the_action() {
        let status = |code: u16, error_code: Option<i64>| ServerError::Status {
            status: code,
            error_code,
            correlation_id: None,
            message: String::new(),
        };
        let revoke = || ActionKind::ScepmanRevoke {
            serial_number: "01".into(),
            thumbprint: "AA".repeat(20),
        };
        let cases = [
            ("revoked", Ok(200), ActionStatus::Done),
            (
                "5013",
                Err(status(409, Some(crate::scepman::ALREADY_REVOKED))),
                ActionStatus::AlreadyRevoked,
            ),
            (
                "another 409",
                Err(status(409, Some(4711))),
                ActionStatus::Failed,
            ),
            (
                "404",
                Err(status(404, Some(crate::scepman::NOT_FOUND))),
                ActionStatus::Failed,
            ),
            ("503: retried", Err(status(503, None)), ActionStatus::Queued),
            (
                "timeout: retried",
                Err(ServerError::Timeout),
                ActionStatus::Queued,
            ),
            (
                "a page that is not SCEPman's answer: retried, never taken as revoked",
                Err(ServerError::BadBody {
                    status: 200,
                    detail: "html".into(),
                }),
                ActionStatus::Queued,
            ),
        ];
        for (name, answer, expected) in cases {
            let mut b = Bench::new("scepman", revoke());
            b.scepman.0.lock().unwrap().push_back(answer);
            b.pass_after(0);
            assert_eq!(b.action().status, expected, "{name}");
        }
    }

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
